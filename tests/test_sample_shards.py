"""`tarflow-sample --format shards`: the shards hold exactly the images of the one-process PNG sampler (pixel for
pixel, whatever the workers, batch or shard size), every index exactly once, resumable after a killed driver,
refusing a re-run with other settings, readable by `tarflow-data verify --deep` and the data loaders."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import CLASSES, export, random_model

import tarflow_scale.cli.data as data_cli
import tarflow_scale.cli.sample as sample_cli
from tarflow_scale.config import DataConfig, Decoding, Guidance, to_dict
from tarflow_scale.data import make_eval_loader, read_manifest, verify
from tarflow_scale.evaluation.shard_sampling import SettingsMismatch, claim_folder, settings_record
from tarflow_scale.evaluation.shard_worker import ShardSampling, ShardWorker
from tarflow_scale.evaluation.units import model_fingerprint
from tarflow_scale.sampling import resolve_labels, sample_images

REPO_ROOT = Path(__file__).resolve().parents[1]


def read_shards(root: Path) -> dict[int, dict[str, bytes]]:
    """Every sample of every shard in `root`: index -> {field: bytes}; an index met twice fails."""
    samples: dict[int, dict[str, bytes]] = {}
    for path in sorted(root.glob("samples-train-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, field = member.name.split(".", 1)
                fields = samples.setdefault(int(key), {"shard": path.name.encode()})
                assert field not in fields, f"{member.name} twice"
                fields[field] = tar.extractfile(member).read()
    return samples


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def shard_hashes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("samples-train-*.tar"))}


def payload(model) -> dict:
    return {"model_config": to_dict(model.config), "state": model.state_dict(), "source": "test"}


# ----------------------------------------------------------------------------------------------------------
# Without Ray: the worker's shard against the one-process sampler, the settings record


def test_a_worker_shard_holds_the_one_process_images_whatever_the_batch_and_shard_size():
    model = random_model(num_classes=CLASSES)
    spec = ShardSampling(num=11, seed=3, labels=(2, 0), guidance=Guidance(1.0), denoise_noise_std=0.05, shard_size=4)
    labels = resolve_labels([(2, 0)[k % 2] for k in range(11)], 11, CLASSES)  # what tarflow-sample --class 2 0 gives
    expected = sample_images(model, 11, labels=labels, guidance=Guidance(1.0), noise_std=0.05, seed=3, batch_size=11)
    worker = ShardWorker(payload(model), spec, model_fingerprint(model), use_gpu=False, threads=1)
    for batch_size in (1, 3):
        seen = []
        for shard in range(spec.num_shards):  # 4 + 4 + 3
            result = worker.shard(shard, batch_size)
            with tarfile.open(fileobj=io.BytesIO(result["tar"])) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar}
            keys = sorted({name.split(".")[0] for name in members})
            assert [int(k) for k in keys] == list(spec.shard_indices(shard)) and result["count"] == len(keys)
            for key in keys:
                k = int(key)
                image = pixels(members[f"{key}.png"])
                assert np.array_equal(image, expected[k].permute(1, 2, 0).numpy()), k
                assert int(members[f"{key}.cls"]) == int(labels[k])
                meta = json.loads(members[f"{key}.json"])
                assert (meta["index"], meta["label"], meta["seed"]) == (k, int(labels[k]), 3)
                assert meta["guidance"]["weight"] == 1.0 and meta["denoise_noise_std"] == 0.05
                assert meta["model_sha256"] == model_fingerprint(model)
                seen.append(k)
        assert seen == list(range(11))
    # A shard's bytes depend only on its samples (fixed tar member times and owner).
    assert worker.shard(1, 2)["tar"] == worker.shard(1, 4)["tar"]


def test_the_denoising_step_of_a_shard_runs_at_the_sampling_precision():
    """Under bf16 sampling the one-process sampler's Tweedie score runs in bf16 too; a worker's shard must hold
    the same pixels, so that its denoising cannot have run at another precision."""
    model = random_model(num_classes=CLASSES)
    bf16 = Decoding(precision="bf16")
    spec = ShardSampling(num=6, seed=4, labels="balanced", decoding=bf16, denoise_noise_std=0.5, shard_size=6)
    labels = resolve_labels([k % CLASSES for k in range(6)], 6, CLASSES)
    expected = sample_images(model, 6, labels=labels, decoding=bf16, noise_std=0.5, seed=4, batch_size=6)
    undenoised = sample_images(model, 6, labels=labels, decoding=bf16, noise_std=0.5, seed=4, batch_size=6,
                               denoise=False)  # fmt: skip
    worker = ShardWorker(payload(model), spec, model_fingerprint(model), use_gpu=False, threads=1)
    with tarfile.open(fileobj=io.BytesIO(worker.shard(0, 3)["tar"])) as tar:
        images = [pixels(tar.extractfile(f"{k:09d}.png").read()) for k in range(6)]
    assert not torch.equal(expected, undenoised), "the Tweedie step must move the pixels for this test to mean much"
    for k, image in enumerate(images):
        assert np.array_equal(image, expected[k].permute(1, 2, 0).numpy()), k


def test_unlabelled_samples_carry_no_class_and_a_grayscale_model_writes_grayscale_pngs():
    model = random_model(in_channels=1)
    spec = ShardSampling(num=3, seed=1, shard_size=3)
    worker = ShardWorker(payload(model), spec, "x", use_gpu=False, threads=1)
    with tarfile.open(fileobj=io.BytesIO(worker.shard(0, 2)["tar"])) as tar:
        names = sorted(m.name for m in tar)
        first = tar.extractfile("000000000.png").read()
    assert not [n for n in names if n.endswith(".cls")] and len(names) == 6
    expected = sample_images(model, 3, seed=1)
    assert np.array_equal(pixels(first), expected[0, 0].numpy())  # (H, W): an 8-bit grayscale PNG


def test_the_decoder_reads_unlabelled_samples_only_where_the_manifest_has_no_classes():
    from tarflow_scale.data import DataError
    from tarflow_scale.data.decode import SampleDecoder
    from tarflow_scale.data.sources import encode_png

    image = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    sample = {"__key__": "000000007", "__url__": "s.tar", "png": encode_png(image.permute(1, 2, 0).numpy())}
    decoded, label, key = SampleDecoder(3, 4, num_classes=0)(sample)
    assert torch.equal(decoded, image) and (label, key) == (0, "000000007")
    with pytest.raises(DataError, match="s.tar: sample '000000007' has no 'cls' field"):
        SampleDecoder(3, 4, num_classes=2)(sample)


def test_the_folder_refuses_other_settings_naming_each_and_foreign_shards(tmp_path):
    model = random_model(num_classes=CLASSES)
    fingerprint = model_fingerprint(model)
    spec = ShardSampling(num=8, seed=0, labels="balanced", guidance=Guidance(1.0), shard_size=4)
    record = settings_record(spec, model, fingerprint)
    (tmp_path / "a").mkdir()
    assert claim_folder(tmp_path / "a", record, "m.safetensors") is False  # the first run records its settings
    assert claim_folder(tmp_path / "a", record, "elsewhere/m.safetensors") is True  # the same settings: a resume
    other = ShardSampling(num=8, seed=1, labels="balanced", guidance=Guidance(2.0), decoding=Decoding("jacobi"),
                          shard_size=4)  # fmt: skip
    names = {"guidance.weight": "--guidance", "seed": "--seed", "decoding.mode": "--decoding"}
    with pytest.raises(SettingsMismatch) as e:
        claim_folder(tmp_path / "a", settings_record(other, model, fingerprint), "m", names)
    message = str(e.value)
    assert "--guidance: 1.0 there, 2.0 now" in message and "--seed: 0 there, 1 now" in message
    assert '--decoding: "sequential" there, "jacobi" now' in message and "shard_size" not in message
    with pytest.raises(SettingsMismatch, match="the model: other weights"):
        claim_folder(tmp_path / "a", settings_record(spec, model, "0" * 64), "m")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "samples-train-000000.tar").write_bytes(b"")
    with pytest.raises(Exception, match="samples-train-000000.tar but no .sampling.json"):
        claim_folder(tmp_path / "b", record, "m")


def test_cli_refuses_shard_flags_with_png_and_other_settings_before_ray(tmp_path, capsys):
    model = random_model(num_classes=CLASSES)
    path = export(model, tmp_path / "m.safetensors")
    assert sample_cli.main([str(path), "--num", "4", "--workers", "2", "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err == "tarflow-sample: --workers apply to --format shards\n"
    assert sample_cli.DEFAULT_SHARD_SIZE == ShardSampling(num=1).shard_size  # --help's default is the library's
    out = tmp_path / "s"
    out.mkdir()
    spec = ShardSampling(num=4, seed=0, labels="balanced", denoise_noise_std=0.05, shard_size=1000)
    claim_folder(out, settings_record(spec, model, model_fingerprint(model)), str(path))
    argv = [str(path), "--num", "4", "--balanced", "--format", "shards", "--out", str(out)]
    assert sample_cli.main([*argv, "--guidance", "1.5", "--no-denoise"]) == 2  # refused before Ray is started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tarflow-sample: --out {out} holds samples drawn with other settings")
    assert "--guidance: 0.0 there, 1.5 now" in err[0] and "the denoising noise std" in err[0]
    assert not (out / ".tarflow.lock").exists()  # the lock is released


def test_ctrl_c_says_the_complete_shards_are_kept_and_releases_the_folder(tmp_path, monkeypatch, capsys):
    import tarflow_scale.evaluation.shard_sampling as shard_sampling

    path = export(random_model(num_classes=CLASSES), tmp_path / "m.safetensors")
    out = tmp_path / "s"
    monkeypatch.setattr(shard_sampling, "sample_to_shards", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert sample_cli.main([str(path), "--num", "4", "--format", "shards", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tarflow-sample: interrupted; the complete shards are kept in {out}: re-run the same command to continue"
    ]
    assert not (out / ".tarflow.lock").exists()


# ----------------------------------------------------------------------------------------------------------
# With Ray


@pytest.mark.slow
def test_a_killed_driver_resumes_into_a_verified_set_with_each_index_exactly_once(tmp_path):
    """SIGKILL the sampler (its whole process group: driver and its embedded Ray) once a few shards exist; the
    re-run keeps them, writes the rest, and the set equals an uninterrupted run's, shard for shard."""
    path = export(random_model(num_classes=CLASSES), tmp_path / "m.safetensors")
    out = tmp_path / "killed"
    argv = [str(path), "--num", "120", "--balanced", "--guidance", "1", "--format", "shards", "--shard-size", "2",
            "--batch-size", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    child = subprocess.Popen(
        [sys.executable, "-m", "tarflow_scale.cli.sample", *argv], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        while time.time() < deadline and child.poll() is None and len(list(out.glob("samples-train-*.tar"))) < 3:
            time.sleep(0.02)
        killed_with = len(list(out.glob("samples-train-*.tar")))
        assert child.poll() is None, child.stdout.read().decode()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(60)
    assert 3 <= killed_with < 60 and not (out / "train.json").exists()
    kept = shard_hashes(out)

    import ray

    try:
        with pytest.warns(UserWarning, match="taking over the lock of pid .* which no longer runs"):
            assert sample_cli.main(argv + ["--workers", "2"]) == 0  # the same settings; the worker count may differ
    finally:
        if ray.is_initialized():
            ray.shutdown()
    after = shard_hashes(out)
    assert all(after[name] == data for name, data in kept.items())  # complete shards are kept as they were
    manifest = read_manifest(str(out), "train")
    assert manifest.num_samples == 120 and len(manifest.shards) == 60 and manifest.num_classes == CLASSES
    assert verify(str(out), manifest, deep=True) == []
    assert sorted(read_shards(out)) == list(range(120))  # exactly once (read_shards fails on a repeat)
    assert not list(out.glob(".*.tmp"))  # the killed run's temp files are gone


@pytest.fixture(scope="module")
def ray_session():
    """One embedded 2-CPU Ray cluster for the rest of the file (the sampler joins it instead of starting its own)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_shards_at_1_and_2_workers_equal_the_png_sampler_and_verify(ray_session, tmp_path, capsys):
    model = random_model(num_classes=CLASSES)
    path = export(model, tmp_path / "m.safetensors")  # trained with Gaussian noise: denoised by default
    common = [str(path), "--num", "13", "--balanced", "--guidance", "1", "--seed", "5"]
    assert sample_cli.main([*common, "--out", str(tmp_path / "png"), "--batch-size", "13"]) == 0
    one, two = tmp_path / "one", tmp_path / "two"
    shards = [*common, "--format", "shards", "--shard-size", "4"]
    assert sample_cli.main([*shards, "--workers", "1", "--batch-size", "3", "--out", str(one)]) == 0
    assert sample_cli.main([*shards, "--workers", "2", "--batch-size", "2", "--out", str(two)]) == 0
    printed = capsys.readouterr().out
    assert (
        "images/s" in printed and "per worker" in printed and f"{two}/samples-train-{{000000..000003}}.tar" in printed
    )
    assert shard_hashes(one) == shard_hashes(two) and len(shard_hashes(one)) == 4  # 4 + 4 + 4 + 1
    samples = read_shards(two)
    assert sorted(samples) == list(range(13))
    for k, fields in samples.items():
        png = np.asarray(Image.open(tmp_path / "png" / f"{k:06d}.png"))
        assert np.array_equal(pixels(fields["png"]), png), k
        assert int(fields["cls"]) == k % CLASSES
    manifest = read_manifest(str(two), "train")
    assert (manifest.image_size, manifest.channels, manifest.num_classes) == (8, 3, CLASSES)
    assert manifest.samples_per_shard == [4, 4, 4, 1] and manifest.shard_bytes == [
        (two / n).stat().st_size for n in manifest.shards
    ]
    assert manifest.source["guidance"]["weight"] == 1.0 and manifest.source["seed"] == 5
    assert data_cli.main(["verify", str(two), "--deep"]) == 0
    # A training or FID job reads them through the data loaders: the same pixels and labels.
    images, labels, keys = zip(*make_eval_loader(DataConfig(path=str(two), num_workers=0), 5, 0, 1, split="train"))
    images, labels, keys = torch.cat(images), torch.cat(labels), [k for ks in keys for k in ks]
    for image, label, key in zip(images, labels, keys):
        assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels(samples[int(key)]["png"]))
        assert int(label) == int(key) % CLASSES
    # The same command again: nothing to draw, the same files; other settings: refused, naming them.
    before = shard_hashes(two)
    assert sample_cli.main([*shards, "--workers", "2", "--out", str(two)]) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 shards already complete" in printed and "nothing to draw" in printed
    assert shard_hashes(two) == before
    assert sample_cli.main([*shards, "--seed", "6", "--out", str(two)]) == 2
    assert "--seed: 5 there, 6 now" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unconditional_models_shards_verify_without_labels(ray_session, tmp_path):
    model = random_model()
    path = export(model, tmp_path / "m.safetensors", noise="uniform")
    out = tmp_path / "u"
    argv = [str(path), "--num", "5", "--attn-temp", "1.5", "--guidance", "0.5", "--format", "shards"]
    assert sample_cli.main([*argv, "--shard-size", "2", "--out", str(out)]) == 0
    manifest = read_manifest(str(out), "train")
    assert manifest.num_classes == 0 and verify(str(out), manifest, deep=True) == []
    samples = read_shards(out)
    assert sorted(samples) == list(range(5)) and not any("cls" in s for s in samples.values())
    expected = sample_images(model, 5, guidance=Guidance(0.5, attn_temp=1.5))
    for k, fields in samples.items():
        assert np.array_equal(pixels(fields["png"]), expected[k].permute(1, 2, 0).numpy())
