"""The first hour: the driver's end-of-run summary (exact-once held-out bits/dim next to PNG's), `tarflow-sample`
and `sample_images`, readable exports, finished-run detection and the quiet/verbose console plumbing."""

from __future__ import annotations

import io
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow_scale.artifacts import save_export
from tarflow_scale.config import DataConfig, Guidance, RunConfig, TarFlowConfig, load_config
from tarflow_scale.data import write_split
from tarflow_scale.data.sources import ArraySource
from tarflow_scale.evaluation.bpd import perturb
from tarflow_scale.models.tarflow import TarFlow
from tarflow_scale.sampling import per_sample_noise, sample_images, to_uint8, tweedie_denoise

SIZE, CLASSES, NUM_VAL = 8, 3, 21
STD = 0.3
TRAIN_NOISE = 0.05


def tiny(**overrides) -> TarFlowConfig:
    fields = dict(image_size=SIZE, patch_size=2, channels=32, num_blocks=2, layers_per_block=1, head_dim=16)
    return TarFlowConfig(**{**fields, **overrides})


def random_model(num_classes: int = 0) -> TarFlow:
    torch.manual_seed(0)
    model = TarFlow(tiny(num_classes=num_classes))
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.05)
    return model.eval()


def pixels(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0.0, STD, size=(n, SIZE, SIZE, 3))
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def val_data(tmp_path_factory) -> tuple[str, np.ndarray, list[str]]:
    root = str(tmp_path_factory.mktemp("val_data"))
    images = pixels(NUM_VAL, 1)
    keys = [f"v{i:03d}" for i in range(NUM_VAL)]
    source = ArraySource(images, np.arange(NUM_VAL) % CLASSES, keys, CLASSES, ["a", "b", "c"], {"t": "val"})
    write_split(root, source, name="q", split="val", samples_per_shard=4, progress=False)  # 6 shards, last short
    return root, images, keys


# ----------------------------------------------------------------------------------------------------------
# The end-of-run summary


def test_heldout_bits_per_dim_scores_every_image_once_and_matches_a_closed_form(val_data):
    from tarflow_scale.evaluation.summary import heldout_bits_per_dim

    root, images, keys = val_data
    # The identity flow with prior N(0, STD^2): log p(x) is a sum of 1-D Gaussian log-densities.
    model = TarFlow(tiny(prior="learned"))
    with torch.no_grad():
        model.prior.log_std.fill_(math.log(STD))
    score = heldout_bits_per_dim(model.eval(), DataConfig(path=root, num_workers=0), batch_size=5)
    assert score.num_images == NUM_VAL and score.split == "val"
    # Independent: the same per-image dequantization noise, the density written out by hand.
    u = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = perturb(u, keys, "uniform", 0.0, seed=0, draw=0).double()
    dims = 3 * SIZE * SIZE
    log_p = (-0.5 * (x / STD) ** 2 - math.log(STD) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    bpd = (-log_p - dims * math.log(2 / 256)) / (dims * math.log(2))
    assert score.mean == pytest.approx(bpd.mean().item(), rel=1e-6)
    assert score.stderr == pytest.approx(bpd.std().item() / math.sqrt(NUM_VAL), rel=1e-4)


def test_png_bits_per_dim_matches_pil_and_is_cached(val_data):
    from tarflow_scale.evaluation.summary import comparison_line, png_bits_per_dim

    root, images, _ = val_data
    expected = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", optimize=True)
        expected.append(len(buffer.getvalue()) * 8 / image.size)
    cfg = DataConfig(path=root, num_workers=0)
    assert png_bits_per_dim(cfg, root) == pytest.approx(np.mean(expected), rel=1e-12)
    cache = Path(root) / "png_bpd-val.json"
    assert json.loads(cache.read_text())["num_images"] == NUM_VAL
    stored = json.loads(cache.read_text())
    cache.write_text(json.dumps({**stored, "png_bits_per_dim": 1.25}))  # proves the second call reads the cache
    assert png_bits_per_dim(cfg, root) == 1.25
    cache.write_text(json.dumps({**stored, "key": "stale", "png_bits_per_dim": 1.25}))  # a stale key: recomputed
    assert png_bits_per_dim(cfg, root) == pytest.approx(np.mean(expected), rel=1e-12)
    assert comparison_line(3.80, 3.94).startswith("beats PNG by 0.14 bits/dim")
    assert comparison_line(4.10, 3.94).startswith("does not beat PNG yet: 0.16 bits/dim worse")


def test_driver_summary_reports_heldout_and_png_figures_and_next_commands(val_data, tmp_path, monkeypatch):
    from tarflow_scale.cli.train import summary_lines
    from tarflow_scale.evaluation.summary import heldout_bits_per_dim, png_bits_per_dim
    from tarflow_scale.training.cluster import LaunchOutcome

    root, _, _ = val_data
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "q"
    model = random_model()
    config = load_config(None, [f"run_dir={run_dir}", f"data.path={root}", "data.noise=uniform", "data.num_workers=0"])
    config.model = model.config
    save_export(model.state_dict(), config, run_dir / "model.safetensors", "test", "t", ema=False)
    outcome = LaunchOutcome(run_dir, False, 0, 7, 65.0)
    text = "\n".join(summary_lines(config, outcome, evaluate=True))
    held = heldout_bits_per_dim(model, config.data)
    png = png_bits_per_dim(config.data, root)
    assert "done: 7 steps (7 in this launch) in 1m05s" in text
    assert f"held-out bits/dim {held.mean:.3f}" in text and f"{NUM_VAL} val images, each once" in text
    assert f"PNG (optimize=True) on the same images: {png:.3f} bits/dim" in text
    assert ("beats PNG by" in text) == (held.mean < png)
    for expected in ("runs/q/model.safetensors", "tarflow-eval runs/q/model.safetensors", "tarflow-sample"):
        assert expected in text
    assert "--address" in text
    # The suggested evaluation must run on this model: no Tweedie job for a model trained without Gaussian noise.
    eval_line = next(line for line in text.splitlines() if "tarflow-eval" in line)
    assert "eval.jobs=[bpd,sample,fid]" in eval_line
    config.data.noise = "gaussian"
    gaussian_text = "\n".join(summary_lines(config, outcome, evaluate=False))
    assert "eval.jobs=" not in next(line for line in gaussian_text.splitlines() if "tarflow-eval" in line)


# ----------------------------------------------------------------------------------------------------------
# Sampling


def test_sample_images_is_seeded_per_index_denoises_with_the_training_noise_and_needs_labels_for_guidance(tmp_path):
    model = random_model(num_classes=CLASSES)
    path = save_export(
        model.state_dict(),
        RunConfig(model=model.config, data=DataConfig(noise="gaussian", noise_std=TRAIN_NOISE)),
        tmp_path / "m.safetensors",
        "test",
        "t",
        ema=False,
    )
    images = sample_images(path, 5, labels="balanced", guidance=Guidance(1.5), seed=3, batch_size=2)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, SIZE, SIZE)
    # Independent of the batch size, and equal to the steps done by hand: noise, guided inverse, Tweedie step.
    assert torch.equal(sample_images(path, 5, labels="balanced", guidance=Guidance(1.5), seed=3, batch_size=5), images)
    y = torch.arange(5) % CLASSES
    eps = per_sample_noise(list(range(5)), (3, SIZE, SIZE), seed=3)
    by_hand = tweedie_denoise(model, model.sample(eps, y=y, guidance=Guidance(1.5)), TRAIN_NOISE, y)
    assert torch.equal(to_uint8(by_hand), images)
    undenoised = sample_images(path, 5, labels="balanced", guidance=Guidance(1.5), seed=3, denoise=False)
    assert torch.equal(undenoised, to_uint8(model.sample(eps, y=y, guidance=Guidance(1.5))))
    with pytest.raises(ValueError, match="needs labels.*balanced"):
        sample_images(model, 2, guidance=Guidance(2.0))
    with pytest.raises(ValueError, match="needs labels"):
        model.sample(2, guidance=Guidance(2.0))
    with pytest.raises(ValueError, match="outside"):
        sample_images(model, 2, labels=[0, CLASSES])
    with pytest.raises(ValueError, match="unconditional"):
        sample_images(random_model(), 2, labels=[0, 1])


def test_sample_cli_writes_pngs_grid_and_npz_and_refuses_guidance_without_labels(tmp_path, capsys):
    from tarflow_scale.cli.sample import main

    model = random_model(num_classes=CLASSES)
    run = RunConfig(model=model.config, data=DataConfig(noise="gaussian", noise_std=TRAIN_NOISE))
    path = save_export(model.state_dict(), run, tmp_path / "m.safetensors", "test", "t", ema=False)
    out = tmp_path / "out"
    argv = [str(path), "--num", "5", "--class", "2", "0", "--guidance", "1", "--seed", "4", "--out", str(out)]
    assert main(argv + ["--batch-size", "2"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"{k:06d}.png" for k in range(5)] + ["grid.png", "samples.npz"]
    saved = np.load(out / "samples.npz")
    assert saved["labels"].tolist() == [2, 0, 2, 0, 2]
    settings = json.loads(str(saved["settings"]))
    assert settings["denoised"] and settings["denoise_noise_std"] == TRAIN_NOISE
    assert settings["guidance"] == {"weight": 1.0, "annealed": False, "attn_temp": 1.0}
    expected = sample_images(path, 5, labels=[2, 0, 2, 0, 2], guidance=Guidance(1.0), seed=4)
    assert np.array_equal(saved["images"], expected.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(np.asarray(Image.open(out / "000003.png")), saved["images"][3])
    assert main([str(path), "--num", "2", "--guidance", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--class C" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([str(tmp_path / "missing.safetensors")]) == 2
    # Parallel decoding through the CLI: tol 0 runs every Jacobi iteration, so the images are the sequential ones
    # up to float rounding (a pixel may flip by one level only where it sits on a rounding boundary).
    jacobi = tmp_path / "jacobi"
    assert main(argv[:-1] + [str(jacobi), "--decoding", "jacobi", "--tol", "0"]) == 0
    parallel = np.load(jacobi / "samples.npz")
    diff = np.abs(parallel["images"].astype(int) - saved["images"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    recorded = json.loads(str(parallel["settings"]))
    decoding = recorded["decoding"]
    assert (decoding["mode"], decoding["tol"], decoding["precision"]) == ("jacobi", 0.0, "fp32")
    # gs_jacobi with its options, the last block (inverted first) sequential: again the sequential images at tol 0.
    segmented = tmp_path / "segmented"
    last = model.config.num_blocks - 1
    options = ["--decoding", "gs_jacobi", "--tol", "0", "--segment-size", "3", "--sequential-blocks", str(last)]
    assert main(argv[:-1] + [str(segmented), *options]) == 0
    gs = np.load(segmented / "samples.npz")
    diff = np.abs(gs["images"].astype(int) - saved["images"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    recorded = json.loads(str(gs["settings"]))
    assert (recorded["decoding"]["segment_size"], recorded["decoding"]["sequential_blocks"]) == (3, [last])
    assert main(argv[:-1] + [str(tmp_path / "oob"), "--decoding", "gs_jacobi", "--sequential-blocks", "9"]) == 2
    assert "--sequential-blocks [9] out of range" in capsys.readouterr().err and not (tmp_path / "oob").exists()
    # --cuda-graph is refused, saying why, where it cannot run (before anything is written).
    graphed = [str(path), "--num", "2", "--cuda-graph", "--out", str(tmp_path / "g")]
    assert main(graphed + ["--device", "cpu"]) == 2
    assert "--cuda-graph needs a CUDA device; sampling runs on cpu" in capsys.readouterr().err
    assert main(graphed + ["--device", "cuda", "--decoding", "jacobi"]) == 2
    assert "--cuda-graph applies to --decoding sequential" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    # Bad values fail on one line naming the flag (rc 2), before the model is loaded.
    missing = str(tmp_path / "missing.safetensors")
    for flags, message in (
        (["--guidance", "nan"], "--guidance=nan is not a finite number"),
        (["--attn-temp", "0"], "--attn-temp=0.0 must be a finite number > 0"),
        (["--tol", "-1"], "--tol=-1.0 must be a number >= 0"),
        (
            ["--compile", "--cuda-graph"],
            "--compile and --cuda-graph are alternatives for the sequential step: pick one",
        ),
    ):
        assert main([missing, *flags]) == 2
        assert capsys.readouterr().err == f"tarflow-sample: {message}\n"  # checked before the model is read


def test_sample_cli_flags_are_the_sampling_settings_fields_with_their_defaults():
    """tarflow-sample's guidance and decoding flags come from Guidance and Decoding: one flag per field, the
    dataclass defaults when absent, every field settable (the flag names users already type are kept)."""
    import dataclasses

    from tarflow_scale.cli.sample import FLAG_NAMES, parse_args, settings_from_args
    from tarflow_scale.config import Decoding

    fields = [f.name for cls in (Guidance, Decoding) for f in dataclasses.fields(cls)]
    assert sorted(FLAG_NAMES) == sorted(fields)
    assert [FLAG_NAMES[k] for k in ("weight", "annealed", "attn_temp", "mode", "segment_size", "cuda_graph")] == [
        "--guidance", "--annealed", "--attn-temp", "--decoding", "--segment-size", "--cuda-graph",
    ]  # fmt: skip
    defaults = parse_args(["m.safetensors"])
    assert settings_from_args(defaults, Guidance, "guidance") == Guidance()
    assert settings_from_args(defaults, Decoding, "decoding") == Decoding()
    args = parse_args([
        "m.safetensors", "--guidance", "2", "--annealed", "--attn-temp", "1.5", "--decoding", "gs_jacobi",
        "--tol", "0", "--max-iters", "3", "--segment-size", "8", "--sequential-blocks", "1", "2",
        "--precision", "bf16", "--compile",
    ])  # fmt: skip
    assert settings_from_args(args, Guidance, "guidance") == Guidance(2.0, annealed=True, attn_temp=1.5)
    expected = Decoding("gs_jacobi", 0.0, 3, 8, (1, 2), precision="bf16", compile=True)
    assert settings_from_args(args, Decoding, "decoding") == expected


def test_exports_are_readable_by_others(tmp_path):
    model = random_model()
    path = save_export(model.state_dict(), RunConfig(model=model.config), tmp_path / "e.safetensors", "t", "t", False)
    for file in (path, path.with_suffix(".json")):
        assert stat.S_IMODE(os.stat(file).st_mode) == 0o644, file
    assert not list(tmp_path.glob("*.partial"))


# ----------------------------------------------------------------------------------------------------------
# Finished runs and the console


def fake_finished_run(run_dir: Path, step: int, export: bool = True) -> None:
    from tarflow_scale.artifacts.checkpoints import write_complete_marker

    checkpoint = run_dir / f"checkpoint_{step:08d}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "latest").write_text(f"step_{step:08d}")
    (checkpoint / "config.yaml").write_text("{}\n")
    write_complete_marker(checkpoint, step, world_size=2)  # sealed: a complete checkpoint
    (run_dir / "checkpoint_00000001").mkdir()  # incomplete (no completeness marker): ignored
    if export:
        (run_dir / "model.safetensors").write_bytes(b"x")


def test_rerunning_a_finished_run_returns_before_ray_starts_unless_num_steps_was_raised(tmp_path, monkeypatch):
    from tarflow_scale.training import cluster

    run_dir = tmp_path / "done"
    fake_finished_run(run_dir, 6)
    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: pytest.fail("Ray must not start for a finished run"))
    outcome = cluster.launch(load_config(None, [f"run_dir={run_dir}", "train.num_steps=6"]))
    assert outcome.already_finished and outcome.end_step == 6 and outcome.seconds == 0
    assert cluster.finished_step(load_config(None, [f"run_dir={run_dir}", "train.num_steps=8"])) is None
    (run_dir / "model.safetensors").unlink()  # the final export never got written: not finished
    assert cluster.finished_step(load_config(None, [f"run_dir={run_dir}", "train.num_steps=6"])) is None


def test_cli_passes_verbose_and_says_a_finished_run_is_finished(tmp_path, monkeypatch, capsys):
    from tarflow_scale.cli import train as cli
    from tarflow_scale.training import cluster

    seen = {}

    def fake_launch(config, address=None, allow_config_change=(), console=None, trust_checkpoint=False):
        seen["console"], seen["trust"] = console, trust_checkpoint
        return cluster.LaunchOutcome(Path(config.run_dir), True, 6, 6, 0.0)

    monkeypatch.setattr(cluster, "launch", fake_launch)
    assert cli.main(["-v", f"run_dir={tmp_path / 'r'}"]) == 0
    assert seen["console"].verbose is True
    assert "already finished at step 6" in capsys.readouterr().out
    assert cli.main([f"run_dir={tmp_path / 'r'}"]) == 0
    assert seen["console"].verbose is False and seen["trust"] is False
    assert cli.main(["--trust-checkpoint", f"run_dir={tmp_path / 'r'}"]) == 0 and seen["trust"] is True


def test_quiet_and_verbose_library_settings():
    from tarflow_scale.training.console import ConsoleOptions, ray_init_kwargs, ray_train_log_level

    quiet, verbose = ConsoleOptions(), ConsoleOptions(verbose=True)
    assert ray_train_log_level(quiet) == "WARNING" and ray_train_log_level(verbose) == "INFO"
    assert ray_init_kwargs(quiet)["env_vars"] == {"RAY_LOGGER_LEVEL": "error", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    assert ray_init_kwargs(verbose)["env_vars"] == {}
    assert ray_init_kwargs(quiet)["log_to_driver"]  # worker warnings and errors still reach the console
    assert ConsoleOptions.from_dict(verbose.to_dict()) == verbose


def test_driver_progress_lines_have_rate_and_eta_and_never_eta_unknown(tmp_path):
    from tarflow_scale.training.console import TrainingProgress
    from tarflow_scale.training.metrics import MetricsLogger

    stream = io.StringIO()
    progress = TrainingProgress(tmp_path / "metrics.jsonl", total_steps=40, every_s=0.0, stream=stream, terminal=False)
    logger = MetricsLogger(tmp_path, total_steps=40, tensorboard=False, echo=False)
    for step, t in ((10, 100.0), (20, 110.0), (30, 120.0), (40, 130.0)):
        logger.log(step, {"loss": 1.0, "bits_per_dim": 4.5})
        record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
        progress.feed({**record, "time": t}, now=t)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # the first record alone has no rate: nothing printed for it
    assert lines[0] == "step 20/40 | train bits/dim 4.500 | 1.00 step/s | eta 0m20s"
    assert lines[-1].startswith("step 40/40") and all("eta ?" not in line for line in lines)


def test_worker_progress_lines_print_only_when_echoing(tmp_path, capsys):
    from tarflow_scale.training.metrics import MetricsLogger

    MetricsLogger(tmp_path / "a", 10, tensorboard=False, echo=False).log(1, {"loss": 1.0})
    assert capsys.readouterr().out == ""
    MetricsLogger(tmp_path / "b", 10, tensorboard=False, echo=True).log(1, {"loss": 1.0})
    out = capsys.readouterr().out
    assert out.startswith("step 1/10 | loss 1") and "eta ?" not in out


def test_eval_console_says_when_the_fid_line_is_a_pipeline_check():
    from tarflow_scale.cli.eval import summary

    def report(extractor: str) -> dict:
        fid = {"fid": 0.093, "kid": 0.001, "num_generated": 256, "feature_extractor": extractor}
        return {"results": {"fid": fid}, "metrics_file": "m.json"}

    check = summary(report("pooled_pixels"))
    assert "NOT FID" in check and not check.startswith("FID")
    assert summary(report("inception")).startswith("FID 0.093")


def test_eval_console_reports_parallel_decoding_passes_but_not_sequential_ones():
    from tarflow_scale.cli.eval import summary
    from tarflow_scale.models.decoding import DecodingStats

    def report(decoding: str, passes: dict[int, int]) -> dict:
        stats = DecodingStats(passes, num_tokens=256, calls=1)
        sample = {
            "num_samples": 16, "num_nonfinite_redrawn": 0, "files": {"grid": "s.png"},
            "settings": {"decoding": {"mode": decoding, "tol": 1e-4}}, "decoding_passes": stats.summary(),
        }  # fmt: skip
        return {"results": {"sample": sample}, "metrics_file": "m.json"}

    parallel = summary(report("jacobi", {0: 6, 1: 19, 2: 20, 3: 41}))
    assert "decoding jacobi (tol 0.0001): mean passes per block [41.0, 20.0, 19.0, 6.0]" in parallel
    assert "vs 255 sequential, pass ratio 11.86x" in parallel
    assert "passes" not in summary(report("sequential", {k: 255 for k in range(4)}))


def test_every_command_line_option_has_help_text():
    import ast

    package = Path(__file__).resolve().parents[1] / "tarflow_scale"
    missing = []
    for path in sorted([*package.glob("cli/*.py"), *package.glob("benchmarks/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            is_option = isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
            if is_option and not any(k.arg == "help" for k in node.keywords):
                missing.append(f"{path.name}:{node.lineno}")
    assert not missing, f"options without --help text: {missing}"


def test_held_stdout_hides_library_prints_when_quiet_and_replays_them_on_failure(capsys):
    from tarflow_scale.training.console import ConsoleOptions, held_stdout

    with held_stdout(ConsoleOptions()):
        print("op built successfully")
    assert capsys.readouterr().out == ""
    with pytest.raises(RuntimeError), held_stdout(ConsoleOptions()):
        print("context for the failure")
        raise RuntimeError("boom")
    assert "context for the failure" in capsys.readouterr().err
    with held_stdout(ConsoleOptions(verbose=True)):
        print("shown")
    assert capsys.readouterr().out == "shown\n"


def test_evaluation_metrics_and_grids_go_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tarflow_scale.evaluation.outputs import write_tensorboard
    from tarflow_scale.sampling import save_grid

    grid = save_grid(torch.zeros(4, 3, SIZE, SIZE), tmp_path / "samples.png")
    report = {
        "checkpoint": {"metadata": {"tag": "step_00000200"}},
        "results": {
            "bpd": {"dequantized": {"mean": 3.7, "stderr": 0.03}},
            "sample": {"files": {"grid": str(grid)}},
            "fid": {"fid": 0.09, "kid": 0.001, "feature_extractor": "pooled_pixels"},
        },
    }
    events = EventAccumulator(str(write_tensorboard(report, tmp_path)))
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == {"eval/bpd_dequantized", "eval/pipeline_check/fid", "eval/pipeline_check/kid"}
    (scalar,) = events.Scalars("eval/bpd_dequantized")
    assert scalar.step == 200 and scalar.value == pytest.approx(3.7)
    assert tags["images"] == ["eval/samples"]


def test_training_sample_grids_go_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tarflow_scale.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, 10, echo=False)
    logger.log_images("samples", torch.rand(4, 3, SIZE, SIZE) * 2 - 1, step=5)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    (image,) = events.Images("samples")
    assert image.step == 5 and image.width > SIZE
