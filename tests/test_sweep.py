"""FID sweeps (eval.sweep) and scoring existing samples (eval.fid_samples): a sweep's per-setting FID/KID equal
separate single-setting runs exactly, resumes and shares units per setting; existing PNGs or shards score exactly
as generating them; KID's std replays clean-fid's subsets; every bad setting or file is refused before workers
start, naming the key or the file. Tiny models and the pooled-pixel extractor (tests/test_eval.py's helpers)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import CLASSES, SIZE, export, gaussian_pixels, random_model

import tarflow_scale.cli.eval as eval_cli
from tarflow_scale.config import DataConfig, Decoding, EvalConfig, Guidance, SweepConfig, load_config
from tarflow_scale.data import make_eval_loader, make_range_loader, write_split
from tarflow_scale.data.sources import ArraySource
from tarflow_scale.evaluation import fid as fidlib
from tarflow_scale.evaluation.generate import generate
from tarflow_scale.evaluation.outputs import sweep_hparams
from tarflow_scale.evaluation.sweep import write_sweep_outputs
from tarflow_scale.sampling import to_uint8

NUM_TRAIN = 40
FID_N = 14  # not a multiple of the batch size (4): a short last chunk
COMMON = [
    "data.num_workers=0", "eval.batch_size=4", f"eval.fid_num_samples={FID_N}", "eval.kid_max_features=10",
    "eval.fid_feature_extractor=pooled_pixels", "eval.progress_every_s=60", "eval.jobs=[fid]",
]  # fmt: skip


def write_images(root: Path, split: str, images: np.ndarray, name: str = "gauss", per_shard: int = 8) -> str:
    n = len(images)
    source = ArraySource(
        images=images, labels=np.arange(n) % CLASSES, keys=[f"{split}{i:04d}" for i in range(n)],
        num_classes=CLASSES, class_names=[f"c{k}" for k in range(CLASSES)], description={"test": split},
    )  # fmt: skip
    write_split(str(root), source, name=name, split=split, samples_per_shard=per_shard, progress=False)
    return str(root)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("sweep_data")
    write_images(root, "train", gaussian_pixels(NUM_TRAIN, 2))
    return write_images(root, "val", gaussian_pixels(9, 1))


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def run(path: Path, out: Path, *overrides: str) -> dict:
    assert eval_cli.main([str(path), "--out", str(out), *COMMON, *overrides]) == 0
    return json.loads((out / "metrics.json").read_text())


def refused(capsys, path: Path, *overrides: str) -> str:
    """The one-line error of a command refused before any worker starts."""
    assert eval_cli.main([str(path), *COMMON, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def csv_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


# ----------------------------------------------------------------------------------------------------------
# Settings and their checks (no Ray)


def test_sweep_lists_expand_to_their_grid_through_the_sampling_validators():
    sweep = SweepConfig(guidance=[0.0, 2.0], decoding_mode=["sequential", "jacobi"], denoise_step=[1.0, 0.5])
    base_guidance, base_decoding = Guidance(annealed=True, attn_temp=0.7), Decoding(tol=1e-3)
    points = sweep.points(base_guidance, base_decoding, 1.0)
    assert sweep.swept() == ["guidance.weight", "denoise_step", "decoding.mode"]
    assert len(points) == 8
    assert [(p.guidance.weight, p.denoise_step, p.decoding.mode) for p in points] == [
        (w, s, m) for w in (0.0, 2.0) for s in (1.0, 0.5) for m in ("sequential", "jacobi")
    ]
    # What is not swept keeps the base settings.
    assert all(p.guidance.annealed and p.guidance.attn_temp == 0.7 and p.decoding.tol == 1e-3 for p in points)
    assert points[1].label(sweep.swept()) == "guidance.weight=0 denoise_step=1 decoding.mode=jacobi"
    assert SweepConfig().points(base_guidance, base_decoding, 0.3)[0].values() == {
        "guidance.weight": 0.0, "guidance.attn_temp": 0.7, "denoise_step": 0.3, "decoding.mode": "sequential",
    }  # fmt: skip
    assert not SweepConfig().active and SweepConfig(attn_temp=[0.5]).active


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.sweep.guidance=[0,.nan]"], "eval.sweep.guidance[1]=nan is not a finite number"),
        (["eval.sweep.attn_temp=[1,0]"], "eval.sweep.attn_temp[1]=0.0 must be a finite number > 0"),
        (["eval.sweep.decoding_mode=[sequential,fast]"], "eval.sweep.decoding_mode[1]: 'fast' is not one of"),
        (["eval.sweep.denoise_step=[1,.inf]"], "eval.sweep.denoise_step[1]=inf must be a finite number"),
        (["eval.sweep.guidance=[1,1.0]"], "eval.sweep.guidance lists 1.0 twice"),
        (["eval.sweep.guidance.weight=[0,1]"], "eval.sweep.guidance.weight is written eval.sweep.guidance"),
        (["eval.sweep.decoding.mode=[jacobi]"], "eval.sweep.decoding.mode is written eval.sweep.decoding_mode"),
        (["eval.sweep.guidance=[1]", "eval.jobs=[sample]"], "eval.sweep (guidance.weight) scores FID per setting"),
        (["eval.sweep.guidance=[1]", "eval.fid_samples=/x"], "eval.sweep and eval.fid_samples exclude each other"),
        (
            ["eval.sweep.decoding_mode=[sequential,jacobi]", "eval.decoding.compile=true"],
            "eval.decoding.compile applies to eval.sweep.decoding_mode[1] sequential",
        ),
        (["eval.fid_samples_split=train"], "eval.fid_samples_split is set but eval.fid_samples is empty"),
    ],
)
def test_bad_sweeps_are_refused_naming_the_key(tmp_path, dataset, capsys, overrides, message):
    path = export(random_model(num_classes=CLASSES), tmp_path / "m.safetensors", data_path=dataset)
    assert message in refused(capsys, path, *overrides)


def test_a_sweep_of_the_tweedie_step_needs_denoised_fid_samples(tmp_path, dataset, capsys):
    """Known only from the checkpoint (its training noise): refused in the pre-flight, before Ray starts."""
    path = export(random_model(num_classes=CLASSES), tmp_path / "m.safetensors", data_path=dataset, noise="uniform")
    assert "eval.sweep.denoise_step is set but the FID samples are not denoised" in refused(
        capsys, path, "eval.sweep.denoise_step=[0.5,1]"
    )


def test_the_sweep_section_round_trips_through_the_config(tmp_path):
    config = load_config(None, ["eval.sweep.guidance=[0,0.5,1,2,3]", "eval.sweep.decoding_mode=[jacobi]"])
    assert config.eval.sweep == SweepConfig(guidance=[0, 0.5, 1, 2, 3], decoding_mode=["jacobi"])
    assert EvalConfig().sweep == SweepConfig()


# ----------------------------------------------------------------------------------------------------------
# KID and the sweep's files (no Ray)


def test_kid_std_comes_from_clean_fid_s_own_subsets():
    """The KID equals cleanfid.fid.kernel_distance bit for bit under the same seed; its std is the spread of the
    subsets' unbiased MMD^2 estimates, recomputed here with scikit-learn's polynomial kernel."""
    from cleanfid import fid as cleanfid_fid
    from sklearn.metrics.pairwise import polynomial_kernel

    rng = np.random.default_rng(0)
    gen, ref = rng.normal(size=(60, 6)), rng.normal(size=(90, 6)) + 0.4
    kid, std = fidlib.kernel_distance_and_std(gen, ref, seed=3)
    np.random.seed(3)
    assert kid == cleanfid_fid.kernel_distance(gen, ref)
    np.random.seed(3)
    m, estimates = 60, []
    for _ in range(fidlib.KID_NUM_SUBSETS):  # clean-fid's draw order: the reference rows first
        x = ref[np.random.choice(len(ref), m, replace=False)]
        y = gen[np.random.choice(len(gen), m, replace=False)]
        k = lambda a, b: polynomial_kernel(a, b, degree=3, gamma=1 / 6, coef0=1)  # noqa: E731
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        off = lambda a: (a.sum() - np.trace(a)) / (m * (m - 1))  # noqa: E731
        estimates.append(off(kxx) + off(kyy) - 2 * kxy.mean())
    assert kid == pytest.approx(np.mean(estimates), rel=1e-10)
    assert std == pytest.approx(np.std(estimates), rel=1e-8) and std > 0
    assert fidlib.kernel_distance_and_std(gen[:1], ref, 0) == (None, None)


@pytest.mark.slow  # matplotlib's first import on a machine runs fc-list to build its font cache
def test_sweep_files_name_the_best_setting(tmp_path):
    settings = [
        {"guidance.weight": w, "guidance.attn_temp": 1.0, "denoise_step": 1.0, "decoding.mode": m}
        for w in (0.0, 1.0, 2.0) for m in ("sequential", "jacobi")
    ]  # fmt: skip
    fids = [5.0, 5.5, 3.0, 3.25, 4.0, float("nan")]
    rows = [
        {"setting": s, "fid": f, "kid": f / 100, "kid_std": 0.01, "images_per_s_per_worker": 10.0 + i,
         "decoding_passes": {"mean_passes_per_block": [15.0, 7.5], "pass_ratio": 1.5}, "num_generated": 16,
         "num_nonfinite_redrawn": 0}
        for i, (s, f) in enumerate(zip(settings, fids))
    ]  # fmt: skip
    grids = [np.full((16, 3, SIZE, SIZE), 40 * i, np.uint8) for i in range(6)]
    out = write_sweep_outputs(rows, ["guidance.weight", "decoding.mode"], grids, tmp_path, "inception")
    assert out["best"]["row"] == 2 and out["best"]["label"] == "guidance.weight=1 decoding.mode=sequential"
    table = csv_rows(tmp_path / "sweep.csv")
    assert [(r["guidance.weight"], r["decoding.mode"]) for r in table] == [
        (repr(s["guidance.weight"]), s["decoding.mode"]) for s in settings
    ]
    assert [float(r["fid"]) if r["fid"] else None for r in table][:5] == fids[:5] and table[5]["fid"] == "nan"
    assert [r["best"] for r in table] == ["False", "False", "True", "False", "False", "False"]
    assert table[0]["mean_passes_per_block"] == "15 7.5" and table[1]["decoding.mode"] == "jacobi"
    with Image.open(tmp_path / "sweep.png") as plot:
        assert plot.size[0] > 300 and plot.size[1] > 200
    with Image.open(tmp_path / "sweep_grid.png") as sheet:
        pixels = np.asarray(sheet.convert("RGB"))
    # guidance.weight left to right (3 panels), decoding.mode top to bottom (2): 4x4 grids >= MIN_PANEL_PIXELS wide.
    assert sheet.size[0] >= 3 * 128 and 2 * 128 <= sheet.size[1] < 3 * 128
    assert (pixels == 200).all(axis=2).any() and (pixels == 40).all(axis=2).any()  # panels 5 and 1 are there
    assert out["files"] == {"csv": str(tmp_path / "sweep.csv"), "plot": str(tmp_path / "sweep.png"),
                            "grid": str(tmp_path / "sweep_grid.png")}  # fmt: skip
    no_grid = write_sweep_outputs(rows, ["guidance.weight", "decoding.mode"], [None] * 6, tmp_path, "inception")
    assert no_grid["files"]["grid"] is None  # units saved without their first samples: the numbers still stand


def test_range_loader_reads_exactly_the_range_in_order(dataset):
    cfg = DataConfig(path=dataset, num_workers=0)
    everything = [k for _, _, keys in make_eval_loader(cfg, 64, 0, 1, split="train") for k in keys]
    for start, stop in ((0, 40), (3, 21), (8, 16), (39, 40), (5, 5)):
        got = [k for _, _, keys in make_range_loader(cfg, 4, start, stop, split="train") for k in keys]
        assert got == everything[start:stop]
    with pytest.raises(ValueError, match=r"\[30, 41\) is not a range of the 40 samples"):
        make_range_loader(cfg, 4, 30, 41, split="train")


# ----------------------------------------------------------------------------------------------------------
# eval.fid_samples: refused before any worker starts


def test_unconditional_samples_may_omit_their_label_conditional_ones_may_not():
    """Sampled shards of an unconditional model carry no .cls (issue 21's format); a conditional split needs it."""
    from tarflow_scale.data import DataError
    from tarflow_scale.data.decode import SampleDecoder

    buffer = io.BytesIO()
    Image.fromarray(gaussian_pixels(1, 0)[0]).save(buffer, format="PNG")
    sample = {"__key__": "000007", "__url__": "samples-train-000000.tar", "png": buffer.getvalue()}
    image, label, key = SampleDecoder(3, SIZE, num_classes=0)(sample)
    assert label == 0 and key == "000007" and np.array_equal(image.permute(1, 2, 0).numpy(), gaussian_pixels(1, 0)[0])
    with pytest.raises(DataError, match="samples-train-000000.tar: sample '000007' has no 'cls' field"):
        SampleDecoder(3, SIZE, num_classes=CLASSES)(sample)


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_bad_sample_folders_are_refused_naming_the_file(tmp_path, dataset, capsys):
    path = export(random_model(num_classes=CLASSES), tmp_path / "m.safetensors", data_path=dataset)
    images = gaussian_pixels(FID_N, 5)
    folder = tmp_path / "pngs"
    for i, image in enumerate(images):
        save_png(folder / f"{i:06d}.png", image)
    assert "is not a folder" in refused(capsys, path, f"eval.fid_samples={tmp_path / 'nothing'}")
    assert "holds neither a tarflow-data manifest" in refused(capsys, path, f"eval.fid_samples={tmp_path}")
    err = refused(capsys, path, f"eval.fid_samples={folder}", f"eval.fid_num_samples={FID_N + 1}")
    assert f"holds {FID_N} images, fewer than eval.fid_num_samples={FID_N + 1}" in err

    save_png(folder / "000003.png", np.zeros((16, 16, 3), np.uint8))  # another size
    assert f"{folder / '000003.png'} is 16x16 pixels but the FID reference statistics are of 8x8" in refused(
        capsys, path, f"eval.fid_samples={folder}"
    )
    Image.fromarray(np.full((SIZE, SIZE), 40000, np.uint16)).save(folder / "000003.png")  # 16-bit
    assert f"{folder / '000003.png'} is a 16-bit grayscale PNG" in refused(capsys, path, f"eval.fid_samples={folder}")
    Image.fromarray(np.zeros((SIZE, SIZE, 4), np.uint8)).save(folder / "000003.png")  # alpha
    assert f"{folder / '000003.png'} is an 8-bit RGBA PNG with transparency" in refused(
        capsys, path, f"eval.fid_samples={folder}"
    )

    shards = write_images(tmp_path / "big", "train", np.zeros((20, 16, 16, 3), np.uint8), name="samples")
    assert "(split train) holds 3x16x16 images but the FID reference statistics are of 3x8x8" in refused(
        capsys, path, f"eval.fid_samples={shards}"
    )
    write_images(tmp_path / "big", "val", np.zeros((20, 16, 16, 3), np.uint8), name="samples")
    assert "holds the splits train, val: choose one with eval.fid_samples_split=NAME" in refused(
        capsys, path, f"eval.fid_samples={shards}"
    )
    assert "eval.fid_samples_split=test: " in refused(
        capsys, path, f"eval.fid_samples={shards}", "eval.fid_samples_split=test"
    )


# ----------------------------------------------------------------------------------------------------------
# On Ray workers


@pytest.mark.slow
def test_a_2x2_sweep_equals_four_single_runs_resumes_and_shares_units(ray_session, tmp_path, dataset):
    model = random_model(seed=5, num_classes=CLASSES)
    path = export(model, tmp_path / "model.safetensors", data_path=dataset, noise="uniform")
    sweep_args = ["eval.sweep.guidance=[0,2]", "eval.sweep.decoding_mode=[sequential,jacobi]", "cluster.num_workers=2"]
    out = tmp_path / "sweep"
    report = run(path, out, *sweep_args, "eval.decoding.tol=0.05")
    fid = report["results"]["fid"]
    sweep = fid["sweep"]
    assert sweep["swept"] == ["guidance.weight", "decoding.mode"] and sweep["num_settings"] == 4
    assert sweep["values"] == {"guidance.weight": [0.0, 2.0], "decoding.mode": ["sequential", "jacobi"]}
    rows = sweep["rows"]
    assert [(r["setting"]["guidance.weight"], r["setting"]["decoding.mode"]) for r in rows] == [
        (0.0, "sequential"), (0.0, "jacobi"), (2.0, "sequential"), (2.0, "jacobi"),
    ]  # fmt: skip
    assert len({r["fid"] for r in rows}) >= 3  # guidance changes the samples
    T, num_blocks = model.config.num_tokens, model.config.num_blocks
    assert rows[0]["decoding_passes"]["mean_passes_per_block"] == [T - 1] * num_blocks
    assert rows[1]["decoding_passes"]["pass_ratio"] > 1  # jacobi at tol 0.05: fewer passes than T - 1

    # Four separate single-setting runs (fresh folders, one worker): exactly the sweep's figures.
    for row in rows:
        s = row["setting"]
        single = run(
            path, tmp_path / f"single_{s['guidance.weight']}_{s['decoding.mode']}", "cluster.num_workers=1",
            f"eval.guidance.weight={s['guidance.weight']}", f"eval.decoding.mode={s['decoding.mode']}",
            "eval.decoding.tol=0.05",
        )["results"]["fid"]  # fmt: skip
        assert "sweep" not in single and single["units"]["reused"] == 0
        for key in ("fid", "kid", "kid_std", "num_generated", "kid_num_generated"):
            assert single[key] == row[key], (s, key)
        assert single["decoding_passes"] == row["decoding_passes"]

    # The files: one csv row per setting, the best named in metrics.json and marked in the csv, the plot, the grid.
    best = min(range(4), key=lambda i: rows[i]["fid"])
    assert sweep["best"]["row"] == best and sweep["best"]["setting"] == rows[best]["setting"]
    table = csv_rows(out / "sweep.csv")
    assert [float(r["fid"]) for r in table] == [r["fid"] for r in rows]
    assert [float(r["kid_std"]) for r in table] == [r["kid_std"] for r in rows]
    assert [r["best"] == "True" for r in table] == [i == best for i in range(4)]
    assert all(float(r["images_per_s_per_worker"]) > 0 for r in table)
    assert sweep["files"]["plot"] == str(out / "sweep.png") and (out / "sweep.png").is_file()
    assert sweep["files"]["grid"] == str(out / "sweep_grid.png") and (out / "sweep_grid.png").is_file()
    assert [h for h, _ in sweep_hparams(report)] == [r["setting"] for r in rows]
    assert sorted(p.name for p in (out / "tensorboard").glob("sweep_*")) == [f"sweep_{i:03d}" for i in range(4)]
    # Each setting keeps its first 16 samples (the grid's), drawn from the same seeds under every setting.
    folders = {f.name: f for f in (out / "units").glob("fid-*")}
    assert len(folders) == 4
    chunks = [list(range(c, min(c + 4, FID_N))) for c in range(0, FID_N, 4)]  # the fid job's chunks
    for row, guidance in ((rows[0], 0.0), (rows[2], 2.0)):
        units = sorted(Path(row["units"]["folder"]).glob("chunk_*.npz"))
        grid = np.concatenate([np.load(unit)["grid"] for unit in units])
        assert grid.shape == (FID_N, 3, SIZE, SIZE)  # 14 samples < 16: all of them
        local = [to_uint8(generate(model, c, Guidance(guidance), Decoding(), seed=0)[0]) for c in chunks]
        np.testing.assert_array_equal(grid, torch.cat(local).numpy())

    # Resume: metrics.json lost, two units of one setting lost; the re-run recomputes only those two.
    (out / "metrics.json").unlink()
    lost = sorted(Path(rows[3]["units"]["folder"]).glob("chunk_*.npz"))[1:3]
    for unit in lost:
        unit.unlink()
    resumed = run(path, out, *sweep_args, "eval.decoding.tol=0.05")["results"]["fid"]["sweep"]
    assert [r["units"]["computed"] for r in resumed["rows"]] == [0, 0, 0, 2]
    assert [r["units"]["reused"] for r in resumed["rows"]] == [4, 4, 4, 2]
    for a, b in zip(resumed["rows"], rows):
        assert (a["fid"], a["kid"], a["kid_std"], a["decoding_passes"]) == (
            b["fid"], b["kid"], b["kid_std"], b["decoding_passes"]
        )  # fmt: skip

    # Another sweep in the same folder reuses the settings it shares (and a single run, planned the same way).
    other = run(path, out, "eval.sweep.guidance=[2,1]", "cluster.num_workers=2", "eval.decoding.tol=0.05")
    again = other["results"]["fid"]["sweep"]["rows"]
    assert [r["units"]["reused"] for r in again] == [4, 0] and again[0]["fid"] == rows[2]["fid"]
    single = run(path, out, "eval.guidance.weight=0", "eval.decoding.mode=jacobi", "eval.decoding.tol=0.05")
    assert single["results"]["fid"]["units"]["computed"] == 0 and single["results"]["fid"]["fid"] == rows[1]["fid"]


@pytest.mark.slow
def test_existing_pngs_and_shards_score_as_generating_them(ray_session, tmp_path, dataset):
    model = random_model(seed=6, num_classes=CLASSES)
    path = export(model, tmp_path / "model.safetensors", data_path=dataset)  # Gaussian noise: denoised FID
    generated = run(path, tmp_path / "gen", "eval.fid_save_png=true", "eval.guidance.weight=1.5")["results"]["fid"]
    pngs = tmp_path / "gen" / "fid_samples"
    assert sorted(p.name for p in pngs.iterdir()) == [f"{i:06d}.png" for i in range(FID_N)]

    from_pngs = run(path, tmp_path / "pngs", f"eval.fid_samples={pngs}", "cluster.num_workers=2")["results"]["fid"]
    for key in ("fid", "kid", "kid_std", "num_generated", "kid_num_generated", "num_reference"):
        assert from_pngs[key] == generated[key], key
    assert from_pngs["samples"]["format"] == "png" and from_pngs["samples"]["num_scored"] == FID_N
    assert "were not used" in from_pngs["note"] and "settings" not in from_pngs

    # The same images as a sampled shard set (the format tarflow-sample --format shards writes), with two more
    # samples than scored: the first FID_N are scored.
    arrays = [np.asarray(Image.open(pngs / f"{i:06d}.png")) for i in range(FID_N)]
    extra = gaussian_pixels(2, 9)
    shards = write_images(tmp_path / "shards", "train", np.stack([*arrays, *extra]), name="samples", per_shard=5)
    from_shards = run(path, tmp_path / "shards_eval", f"eval.fid_samples={shards}")["results"]["fid"]
    for key in ("fid", "kid", "kid_std", "num_generated"):
        assert from_shards[key] == generated[key], key
    assert from_shards["samples"]["format"] == "shards" and from_shards["samples"]["num_images"] == FID_N + 2

    # Resumable: the re-run reuses the unit; scoring other images starts fresh.
    again = run(path, tmp_path / "shards_eval", f"eval.fid_samples={shards}")["results"]["fid"]
    assert again["units"]["reused"] == 1 and again["units"]["computed"] == 0 and again["fid"] == generated["fid"]
    fewer = run(path, tmp_path / "shards_eval", f"eval.fid_samples={shards}", "eval.fid_num_samples=10")
    assert fewer["results"]["fid"]["units"]["reused"] == 0 and fewer["results"]["fid"]["num_generated"] == 10


@pytest.mark.slow
def test_the_sweep_benchmark_prints_both_costs_and_the_bound(capsys):
    from tarflow_scale.benchmarks import sweep as bench

    overrides = ["eval.sweep.guidance=[0,1]", "model.image_size=8", "model.patch_size=2", "model.num_blocks=1"]
    args = ["--workers", "1", "--num-samples", "8", "--batch-size", "4", "--num-reference", "16", *overrides]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("tarflow-bench sweep: 2 settings (guidance.weight), 8 samples each")
    assert sum(line.startswith("single guidance.weight=") for line in lines) == 2
    assert any(line.startswith("separate runs, total") for line in lines)
    assert any(line.startswith("one sweep") for line in lines)
    assert "x the bound" in out and "model loads: 1 pool start-up vs 2" in out
