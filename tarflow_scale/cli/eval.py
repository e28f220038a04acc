"""`tarflow-eval`: evaluate a checkpoint (bits/dim, samples, denoising, FID) on local Ray or a cluster.

    tarflow-eval CHECKPOINT [--config FILE] [--address ADDR] [--out DIR] [--dry-run] [key=value ...]

CHECKPOINT is an exported .safetensors file, a training checkpoint folder or a run directory. The run config is
built as defaults -> the checkpoint's own training config -> FILE -> dotted overrides (`eval.jobs=[bpd,sample]
eval.num_samples=64 cluster.num_workers=2 data.path=...`); the model always comes from the checkpoint, and a
model section that disagrees with it is an error. Results go to OUT/metrics.json (default: `eval/` beside the
checkpoint) with PNG grids. `eval.jobs=[fid] eval.sweep.guidance=[0,1,2]` scores FID per setting in one run
(sweep.csv, sweep.png, sweep_grid.png); `eval.fid_samples=DIR` scores existing shards or PNGs instead of sampling.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from tarflow_scale.atomic import is_storage_error, storage_error_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tarflow-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="exported .safetensors, training checkpoint folder or run directory")
    parser.add_argument("--config", help="YAML run config (its eval section names the jobs)")
    parser.add_argument("--address", help="Ray cluster to join (default: cluster.address, RAY_ADDRESS, else local)")
    parser.add_argument("--out", help="output folder (default: eval.out_dir, else eval/ beside the checkpoint)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show Ray's own log lines")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.jobs=[bpd] cluster.num_workers=4")
    args = parser.parse_intermixed_args(argv)

    from tarflow_scale.artifacts import CheckpointError, read_provenance
    from tarflow_scale.config import ConfigError, to_dict
    from tarflow_scale.data import DataError
    from tarflow_scale.evaluation.fid import FidError
    from tarflow_scale.evaluation.generate import NonFiniteSamplesError
    from tarflow_scale.evaluation.outputs import NonFiniteResultError
    from tarflow_scale.evaluation.resolve import default_out_dir, resolve_config

    out_dir = None
    try:
        info = read_provenance(args.checkpoint)
        config = resolve_config(info, args.config, args.overrides)
        out_dir = args.out or config.eval.out_dir or str(default_out_dir(info))
        if args.dry_run:
            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            print(f"# checkpoint: {info.resolved} ({info.kind}); output: {out_dir}")
            return 0
        from tarflow_scale.evaluation.orchestrate import evaluate
        from tarflow_scale.run_lock import lock_output_dir

        label = f"--out {out_dir}" if args.out else f"eval.out_dir={out_dir}" if config.eval.out_dir else out_dir
        command = ["tarflow-eval", *(sys.argv[1:] if argv is None else argv)]
        with lock_output_dir(out_dir, label, command=" ".join(command)):  # one evaluation per output folder
            report = evaluate(config, info, out_dir, address=args.address, verbose=args.verbose, argv=command)
    except (ConfigError, CheckpointError, DataError, FidError, NonFiniteSamplesError, NonFiniteResultError) as e:
        print(f"tarflow-eval: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a read-only output folder while units are saved
        if not is_storage_error(e):
            raise
        print(
            f"tarflow-eval: error: {storage_error_line(e)} (finished units are kept; re-run to continue)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        kept = f"; the finished units are kept in {out_dir}/units: re-run the same command to continue"
        print(f"tarflow-eval: interrupted{kept if out_dir else ''}", file=sys.stderr)
        return 130
    print(summary(report))
    return 0


def summary(report: dict) -> str:
    """A few human-readable lines of the headline numbers."""
    results, lines = report["results"], []
    if "bpd" in results:
        for name in ("dequantized", "noisy_data_nll"):
            if name in results["bpd"]:
                r = results["bpd"][name]
                lines.append(f"bpd ({name}): {r['mean']:.4f} +- {r['stderr']:.4f} over {r['num_images']} images")
    if "sample" in results:
        r = results["sample"]
        lines.append(f"samples: {r['num_samples']} ({r['num_nonfinite_redrawn']} redrawn) -> {r['files']['grid']}")
        passes, decoding = r.get("decoding_passes"), r["settings"]["decoding"]
        if passes and decoding["mode"] != "sequential":
            lines.append(
                f"decoding {decoding['mode']} (tol {decoding['tol']:g}): mean passes per block "
                f"{passes['mean_passes_per_block']} (sampling order) vs {passes['sequential_passes_per_block']} "
                f"sequential, pass ratio {passes['pass_ratio']}x"
            )
    if "denoise" in results:
        r = results["denoise"]
        lines.append(
            f"denoised (sigma {r['noise_std']}): rms change {r['rms_change']:.4f} -> {r['files']['denoised_grid']}"
        )
    if "fid" in results:
        r = results["fid"]
        if "sweep" in r:
            lines += _sweep_lines(r)
        else:
            source = f"{r['num_generated']} samples"
            if "samples" in r:  # eval.fid_samples: scored, not generated
                source = f"{r['num_generated']} of the {r['samples']['num_images']} images in {r['samples']['path']}"
            lines.append(_fid_line(r, r["fid"], r["kid"], r.get("kid_std"), source))
    lines.append(f"metrics: {report['metrics_file']}")
    return "\n".join(lines)


def _kid(kid: float | None, std: float | None) -> str:
    return "n/a" if kid is None else f"{kid:.5f}" + ("" if std is None else f" +- {std:.5f}")


def _fid_line(r: dict, fid: float | None, kid: float | None, kid_std: float | None, source: str) -> str:
    shown = "n/a" if fid is None else f"{fid:.3f}"
    if r["feature_extractor"] == "inception":
        return f"FID {shown}, KID {_kid(kid, kid_std)} ({source}, inception)"
    # The quick preset's pooled-pixel features: the same code path, but these numbers are not FID.
    return (
        f"pipeline check (NOT FID: {r['feature_extractor']} features, not Inception): Frechet distance {shown}, "
        f"kernel distance {_kid(kid, kid_std)} ({source})"
    )


def _sweep_lines(r: dict) -> list[str]:
    """One line per setting, then the best one and the files."""
    sweep = r["sweep"]
    names = sweep["swept"]
    inception = r["feature_extractor"] == "inception"
    what = "FID, KID" if inception else f"pipeline check (NOT FID: {r['feature_extractor']} features): distances"
    lines = [f"sweep of {sweep['num_settings']} settings ({' x '.join(names)}), {r['num_generated_per_setting']} "
             f"samples each from the same seeds; {what}:"]  # fmt: skip
    labels = [" ".join(f"{n}={row['setting'][n]}" for n in names) for row in sweep["rows"]]
    width = max(len(label) for label in labels)
    for label, row in zip(labels, sweep["rows"]):
        fid = "n/a" if row["fid"] is None else f"{row['fid']:.3f}"
        lines.append(f"  {label:<{width}}  {'FID' if inception else 'Frechet'} {fid}  "
                     f"{'KID' if inception else 'kernel'} {_kid(row['kid'], row.get('kid_std'))}")  # fmt: skip
    best = sweep["best"]
    if best is not None:
        lines.append(f"best: {best['label']} ({'FID' if inception else 'Frechet distance'} {best['fid']:.3f})")
    files = sweep["files"]
    lines.append(f"sweep: {files['csv']}, {files['plot']}" + (f", {files['grid']}" if files.get("grid") else ""))
    return lines


if __name__ == "__main__":
    sys.exit(main())
