"""Data pipeline: converters round-trip exactly, evaluation sees every sample once across ranks x workers,
training streams are seeded per rank, corrupt input is skipped (training) or named (converters, evaluation)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import braceexpand
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
import webdataset as wds
from PIL import Image

import tarflow_scale.cli.data as data_cli
from tarflow_scale.config import DataConfig
from tarflow_scale.data import (
    BIN_WIDTH,
    DataError,
    DataStats,
    FolderSource,
    NpzSource,
    augment,
    bundled,
    make_eval_loader,
    make_train_loader,
    read_manifest,
    resolve_data_path,
    verify,
    write_manifest,
    write_split,
)
from tarflow_scale.data.manifest import file_sha256

# ----------------------------------------------------------------------------------------------------------
# Fixtures: tiny datasets in the official ImageNet64 .npz layout, converted to shards

TINY_SIZE = 16  # image side of the tiny datasets, pixels
TINY_CLASSES = 10
TINY_COUNTS = (23, 14)  # images per .npz file: 37 in all, not a multiple of the shard size or of ranks
TINY_SAMPLES_PER_SHARD = 5


def write_official_npz(path: str, images: np.ndarray, labels_1based: np.ndarray) -> None:
    """Save (N, H, W, 3) uint8 images the way the downsampled-ImageNet release does: `data` (N, 3*H*W) in
    planar order (all R, then G, then B, each row-major) and `labels` numbered from 1."""
    n = len(images)
    planar = images.transpose(0, 3, 1, 2).reshape(n, -1)  # (N, 3*H*W)
    np.savez(path, data=planar, labels=labels_1based)


def make_images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> dict:
    """Two .npz batch files in the official layout, and the expected sample per key."""
    folder = tmp_path_factory.mktemp("npz")
    paths, expected = [], {}
    for index, n in enumerate(TINY_COUNTS):
        images = make_images(n, TINY_SIZE, seed=index)
        labels = np.random.default_rng(100 + index).integers(1, TINY_CLASSES + 1, size=n)
        stem = f"train_data_batch_{index + 1}"
        path = str(folder / f"{stem}.npz")
        write_official_npz(path, images, labels)
        paths.append(path)
        for i in range(n):
            expected[f"{stem}-{i:07d}"] = (images[i], int(labels[i]) - 1)
    return {"paths": paths, "expected": expected}


@pytest.fixture(scope="session")
def tiny_shards_master(tiny_npz, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shards"))
    source = NpzSource(tiny_npz["paths"], image_size=TINY_SIZE, num_classes=TINY_CLASSES)
    for split in ("train", "val"):  # the same images under both split names keep the fixture small
        write_split(root, source, name="tiny", split=split, samples_per_shard=TINY_SAMPLES_PER_SHARD, progress=False)
    return root


@pytest.fixture
def tiny_shards(tiny_shards_master, tmp_path) -> str:
    """A private copy of the tiny sharded dataset (train and val splits), safe to damage."""
    root = str(tmp_path / "tiny")
    shutil.copytree(tiny_shards_master, root)
    assert os.path.exists(os.path.join(root, "val.json"))
    return root


def read_shards(root: str, split: str) -> dict[str, tuple[np.ndarray, int]]:
    """Decode a split with plain tarfile + PIL (independent of our loader): key -> ((H, W, 3) image, label)."""
    manifest = read_manifest(root, split)
    out = {}
    for shard in manifest.shards:
        with tarfile.open(os.path.join(root, shard)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
        for name, payload in members.items():
            key, ext = name.split(".", 1)
            if ext == "png":
                out[key] = (np.asarray(Image.open(io.BytesIO(payload))), int(members[f"{key}.cls"]))
    return out


def rewrite_shard(path: str, change) -> None:
    """Rewrite a shard through `change(sample) -> sample`, e.g. to damage one PNG."""
    samples = list(wds.WebDataset(path, shardshuffle=False))
    with wds.TarWriter(path) as writer:
        for s in samples:
            writer.write(change(s))  # webdataset's own "__url__" etc. are not written back


def eval_keys(cfg: DataConfig, world_size: int, batch_size: int = 4) -> list[tuple[int, str, np.ndarray, int]]:
    seen = []
    for rank in range(world_size):
        for images, labels, keys in make_eval_loader(cfg, batch_size, rank, world_size):
            assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and len(keys) == len(labels)
            for image, label, key in zip(images, labels, keys):
                seen.append((rank, key, image.permute(1, 2, 0).numpy(), int(label)))
    return seen


# ----------------------------------------------------------------------------------------------------------
# Converters


@pytest.mark.slow
def test_npz_round_trip_is_exact(tiny_npz, tmp_path):
    root = str(tmp_path)
    # Two processes: the parallel (spawned) writer path.
    source = NpzSource(tiny_npz["paths"], image_size=TINY_SIZE, num_classes=TINY_CLASSES)
    m = write_split(root, source, name="in", split="train", samples_per_shard=TINY_SAMPLES_PER_SHARD, num_procs=2)
    expected = tiny_npz["expected"]
    assert m.num_samples == len(expected) == 37
    assert m.samples_per_shard == [5] * 7 + [2]
    assert (m.image_size, m.channels, m.num_classes) == (TINY_SIZE, 3, TINY_CLASSES)
    assert m.pattern == "in-train-{000000..000007}.tar"
    assert list(braceexpand.braceexpand(m.pattern)) == m.shards
    assert m.sha256 == [file_sha256(os.path.join(root, s)) for s in m.shards]
    decoded = read_shards(root, "train")
    assert decoded.keys() == expected.keys()
    for key, (image, label) in expected.items():
        np.testing.assert_array_equal(decoded[key][0], image)
        assert decoded[key][1] == label
    # Deterministic bytes: converting again elsewhere gives the same checksums.
    again = write_split(str(tmp_path / "again"), source, name="in", split="train", samples_per_shard=5)
    assert again.sha256 == m.sha256


def _png(path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def test_folder_round_trip(tmp_path):
    src = tmp_path / "folder"
    (src / "cats").mkdir(parents=True)
    (src / "dogs" / "sub").mkdir(parents=True)
    exact = make_images(3, TINY_SIZE, seed=5)
    for i, image in enumerate(exact):
        _png(src / "cats" / f"c{i}.png", image)
    big = make_images(1, 40, seed=6)[0][:, :30]  # (40, 30, 3): resized and centre-cropped
    _png(src / "dogs" / "big.png", big)
    gray = make_images(1, TINY_SIZE, seed=7)[0][:, :, 0]
    _png(src / "dogs" / "sub" / "gray.png", gray)
    (src / "dogs" / "notes.txt").write_text("not an image: ignored")

    m = write_split(str(tmp_path / "out"), FolderSource(str(src), image_size=TINY_SIZE), name="f", split="train")
    assert m.class_names == ["cats", "dogs"] and m.num_classes == 2 and m.num_samples == 5
    got = read_shards(str(tmp_path / "out"), "train")
    for i in range(3):
        image, label = got[f"cats-c{i}_png"]
        np.testing.assert_array_equal(image, exact[i])
        assert label == 0
    x = torch.from_numpy(big).permute(2, 0, 1)
    want = TF.center_crop(TF.resize(x, [TINY_SIZE], antialias=True), [TINY_SIZE, TINY_SIZE]).permute(1, 2, 0)
    np.testing.assert_array_equal(got["dogs-big_png"][0], want.numpy())
    np.testing.assert_array_equal(got["dogs-sub-gray_png"][0], np.repeat(gray[:, :, None], 3, axis=2))
    assert got["dogs-big_png"][1] == got["dogs-sub-gray_png"][1] == 1


def test_bad_npz_inputs_name_the_file(tiny_npz, tmp_path):
    def convert(path):
        return NpzSource([str(path)], image_size=TINY_SIZE, num_classes=TINY_CLASSES)

    with pytest.raises(DataError, match="missing.npz: no such file"):
        convert(tmp_path / "missing.npz")
    good = open(tiny_npz["paths"][0], "rb").read()
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="cut.npz: not a readable .npz"):
        convert(tmp_path / "cut.npz")
    images = make_images(4, TINY_SIZE, seed=0)
    np.savez(tmp_path / "float.npz", data=images.reshape(4, -1).astype(np.float32), labels=np.ones(4, int))
    with pytest.raises(DataError, match="float.npz: 'data' is float32"):
        convert(tmp_path / "float.npz")
    write_official_npz(str(tmp_path / "size8.npz"), make_images(4, 8, seed=0), np.ones(4, int))
    with pytest.raises(DataError, match=r"size8.npz: .*shape \(4, 192\).*pass --size 8"):
        convert(tmp_path / "size8.npz")
    write_official_npz(str(tmp_path / "labels.npz"), images, np.array([1, 2, 3, TINY_CLASSES + 1]))
    with pytest.raises(DataError, match=r"labels.npz: labels\[3\] = 11 is outside 1..10"):
        convert(tmp_path / "labels.npz")
    write_official_npz(str(tmp_path / "zero.npz"), images, np.array([0, 1, 1, 1]))  # 0-based by mistake
    with pytest.raises(DataError, match=r"zero.npz: labels\[0\] = 0"):
        convert(tmp_path / "zero.npz")
    with zipfile.ZipFile(tmp_path / "nolabels.npz", "w") as zf:
        zf.writestr("data.npy", b"")
    with pytest.raises(DataError, match="nolabels.npz: no 'labels' array"):
        convert(tmp_path / "nolabels.npz")


def test_unreadable_image_fails_cleanly_then_resumes_and_verifies(tmp_path, capsys):
    src = tmp_path / "folder" / "only"
    src.mkdir(parents=True)
    for i, image in enumerate(make_images(6, TINY_SIZE, seed=1)):
        _png(src / f"{i}.png", image)
    (src / "3.png").write_bytes(b"this is not a png")  # shard 1 of 3
    out = str(tmp_path / "out")

    def convert():
        return write_split(out, FolderSource(str(src.parent), TINY_SIZE), name="f", split="s", samples_per_shard=2)

    with pytest.raises(DataError, match=r"only/3.png: unreadable image"):
        convert()
    files = sorted(os.listdir(out))
    assert "s.json" not in files and not any(f.endswith(".tmp") for f in files)
    assert "f-s-000000.tar" in files and "f-s-000001.tar" not in files  # only complete shards carry the name
    first = os.stat(os.path.join(out, "f-s-000000.tar"))

    _png(src / "3.png", make_images(1, TINY_SIZE, seed=2)[0])
    m = convert()  # resumes: shard 0 is kept, not rewritten
    assert m.num_samples == 6 and os.stat(os.path.join(out, "f-s-000000.tar")).st_mtime_ns == first.st_mtime_ns
    assert convert() == m  # a finished split is verified, not redone
    with pytest.raises(DataError, match="different settings"):
        write_split(out, FolderSource(str(src.parent), TINY_SIZE), name="f", split="s", samples_per_shard=3)

    assert data_cli.main(["verify", out]) == 0
    shard = os.path.join(out, "f-s-000002.tar")
    damaged = bytearray(open(shard, "rb").read())
    damaged[700] ^= 0xFF
    open(shard, "wb").write(bytes(damaged))
    assert verify(out, m) and "f-s-000002.tar: sha256" in verify(out, m)[0]
    with pytest.raises(DataError, match="f-s-000002.tar: sha256"):
        convert()
    capsys.readouterr()
    assert data_cli.main(["verify", out]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_cli_convert_npz(tiny_npz, tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["convert-npz", *tiny_npz["paths"], "--out", out, "--split", "train", "--size", str(TINY_SIZE)]
    args += ["--num-classes", str(TINY_CLASSES), "--samples-per-shard", "16", "--procs", "1", "--no-progress"]
    assert data_cli.main(args) == 0
    assert read_manifest(out, "train").shards == [f"imagenet16-train-{i:06d}.tar" for i in range(3)]
    assert data_cli.main(["verify", out, "--split", "train"]) == 0
    assert data_cli.main(["convert-npz", str(tmp_path / "nope.npz"), "--out", out, "--split", "x"]) == 1
    assert "nope.npz: no such file" in capsys.readouterr().err


def test_read_manifest_errors_name_the_file(tiny_shards):
    with pytest.raises(DataError, match="test.json: no manifest for split 'test'"):
        read_manifest(tiny_shards, "test")
    path = os.path.join(tiny_shards, "val.json")
    raw = json.load(open(path))
    raw["num_samples"] += 1
    json.dump(raw, open(path, "w"))
    with pytest.raises(DataError, match="val.json: samples_per_shard sums to 37"):
        read_manifest(tiny_shards, "val")
    open(path, "w").write("{ not json")
    with pytest.raises(DataError, match="val.json: not valid JSON"):
        read_manifest(tiny_shards, "val")


# ----------------------------------------------------------------------------------------------------------
# Loaders


@pytest.mark.parametrize("world_size", [2, 3])
def test_eval_sees_every_sample_exactly_once(tiny_shards, tiny_npz, world_size):
    cfg = DataConfig(path=tiny_shards, num_workers=2)
    seen = eval_keys(cfg, world_size)
    keys = [key for _, key, _, _ in seen]
    expected = tiny_npz["expected"]
    assert sorted(keys) == sorted(expected)  # no drops, no duplicates (37 samples: uneven for 2 and 3 ranks)
    per_rank = [sum(1 for r, *_ in seen if r == rank) for rank in range(world_size)]
    assert max(per_rank) - min(per_rank) <= 1
    for _, key, image, label in seen:
        np.testing.assert_array_equal(image, expected[key][0])
        assert label == expected[key][1]


@pytest.mark.slow  # a pipe: URL runs `cat` in a shell
def test_eval_through_pipe_url_and_downsampling(tiny_shards, tiny_npz):
    cfg = DataConfig(path=f"pipe:cat {tiny_shards}/{{file}}", num_workers=0, image_size=TINY_SIZE // 2)
    seen = eval_keys(cfg, 1, batch_size=8)
    assert len(seen) == 37
    for _, key, image, _ in seen:
        source = torch.from_numpy(tiny_npz["expected"][key][0]).permute(2, 0, 1).float()
        want = F.avg_pool2d(source, 2).round().permute(1, 2, 0).numpy()  # 2x2 box filter
        np.testing.assert_array_equal(image, want)


def _first_batches(cfg, rank, seed, n=4, world_size=2):
    loader = iter(make_train_loader(cfg, 8, rank=rank, world_size=world_size, seed=seed))
    return [next(loader) for _ in range(n)]


def test_train_stream_deterministic_per_seed_and_differs_across_ranks(tiny_shards, tiny_npz):
    cfg = DataConfig(path=tiny_shards, num_workers=2, shuffle_buffer=10)
    a = _first_batches(cfg, rank=0, seed=3)
    b = _first_batches(cfg, rank=0, seed=3)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    images = torch.cat([x for x, _ in a])
    assert images.shape == (32, 3, TINY_SIZE, TINY_SIZE) and images.dtype == torch.uint8
    assert not torch.equal(images, torch.cat([x for x, _ in _first_batches(cfg, rank=1, seed=3)]))
    assert not torch.equal(images, torch.cat([x for x, _ in _first_batches(cfg, rank=0, seed=4)]))
    # Every image is a source image, as is or mirrored (hflip), and its label is that image's label.
    originals = {img.tobytes(): label for img, label in tiny_npz["expected"].values()}
    mirrored = {img[:, ::-1].tobytes(): label for img, label in tiny_npz["expected"].values()}
    flips = 0
    for x, y in a:
        for image, label in zip(x.permute(0, 2, 3, 1).numpy(), y.tolist()):
            raw = image.tobytes()
            assert originals.get(raw, mirrored.get(raw)) == label
            flips += raw not in originals
    assert 0 < flips < 32


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_segments_reuse_one_loader_and_equal_fresh_loaders(tiny_shards, monkeypatch, num_workers):
    """The trainer keeps one loader per launch: iteration e (the segment from checkpoint boundary e) is the stream
    a fresh loader seeded by seed(e) gives, built on the same persistent workers (one DataLoader, no rebuild)."""
    from functools import partial

    from tarflow_scale.data import loader as loader_module

    built = []

    class CountedDataLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("persistent_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loader_module.torch.utils.data, "DataLoader", CountedDataLoader)
    cfg = DataConfig(path=tiny_shards, num_workers=num_workers, shuffle_buffer=10)
    seeds = [11, 5, 23]
    segments = make_train_loader(cfg, 4, rank=0, world_size=1, seed=partial(lambda s, e: s[e], seeds))
    for seed in seeds:
        reused = iter(segments)
        fresh = iter(make_train_loader(cfg, 4, rank=0, world_size=1, seed=seed))
        for _ in range(3):  # fewer batches than the workers prefetch: the rest of the segment is dropped
            (xa, ya), (xb, yb) = next(reused), next(fresh)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert built == [num_workers > 0] * (1 + len(seeds))  # the segmented loader once, one per fresh reference
    first, second = (next(iter(make_train_loader(cfg, 4, rank=0, world_size=1, seed=s))) for s in seeds[:2])
    assert not torch.equal(first[0], second[0])  # segments differ: the comparison above could fail


def _damage_png(key):
    def change(sample):
        if sample["__key__"] == key:
            sample["png"] = b"\x89PNG garbage"
        return sample

    return change


def test_train_skips_corrupt_samples_and_shards_and_counts_them(tiny_shards):
    m = read_manifest(tiny_shards, "train")
    rewrite_shard(os.path.join(tiny_shards, m.shards[0]), _damage_png("train_data_batch_1-0000002"))
    open(os.path.join(tiny_shards, m.shards[1]), "wb").write(b"not a tar file at all" * 50)
    os.remove(os.path.join(tiny_shards, m.shards[2]))
    stats = DataStats()
    cfg = DataConfig(path=tiny_shards, num_workers=2, shuffle_buffer=0)
    loader = iter(make_train_loader(cfg, 4, rank=0, world_size=1, seed=0, stats=stats))
    for _ in range(40):
        x, y = next(loader)
        assert x.shape == (4, 3, TINY_SIZE, TINY_SIZE)
    assert stats.batches == 40 and stats.samples == 160
    assert stats.skipped >= 3  # counted in the workers, summed in this process
    assert "tiny-train-" in stats.last_error


def test_train_gives_up_when_all_data_is_corrupt(tiny_shards):
    for shard in read_manifest(tiny_shards, "train").shards:
        open(os.path.join(tiny_shards, shard), "wb").write(b"garbage")
    cfg = DataConfig(path=tiny_shards, num_workers=0, max_corrupt_in_a_row=5)
    with pytest.raises(DataError, match="5 corrupt training samples/shards in a row"):
        next(iter(make_train_loader(cfg, 4, rank=0, world_size=1, seed=0)))


def test_eval_errors_name_shard_and_key(tiny_shards):
    m = read_manifest(tiny_shards, "val")
    cfg = DataConfig(path=tiny_shards, num_workers=0)
    second = os.path.join(tiny_shards, m.shards[1])
    intact = open(second, "rb").read()
    rewrite_shard(second, _damage_png("train_data_batch_1-0000007"))
    with pytest.raises(DataError, match=r"tiny-val-000001.tar: sample 'train_data_batch_1-0000007' is corrupt"):
        eval_keys(cfg, 1)
    open(second, "wb").write(intact)
    last = os.path.join(tiny_shards, m.shards[-1])
    os.remove(last)
    with pytest.raises(DataError, match="tiny-val-000007.tar: unreadable shard"):
        eval_keys(cfg, 1)
    third = os.path.join(tiny_shards, m.shards[3])
    data = open(third, "rb").read()
    open(third, "wb").write(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"tiny-val-000003.tar: (unreadable shard \(after sample|holds)"):
        eval_keys(cfg, 1)


# ----------------------------------------------------------------------------------------------------------
# Noise


def test_augment_scales_and_noise():
    u = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    u[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    x = augment(u, "none", 0.0)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    torch.testing.assert_close(x, u.float() / 127.5 - 1)
    d = augment(u, "uniform", 0.0, torch.Generator().manual_seed(0))
    low = u.float() * BIN_WIDTH - 1
    assert (d >= low).all() and (d < low + BIN_WIDTH).all()
    g = augment(u, "gaussian", 0.1, torch.Generator().manual_seed(0))
    assert abs((g - x).std().item() - 0.1) < 0.005
    assert torch.equal(g, augment(u, "gaussian", 0.1, torch.Generator().manual_seed(0)))
    with pytest.raises(TypeError):
        augment(u.float(), "none", 0.0)
    with pytest.raises(ValueError):
        augment(u, "salt", 0.1)


# ----------------------------------------------------------------------------------------------------------
# The bundled dataset


def _overlap(a: bundled.Crop, b: bundled.Crop) -> bool:
    return a.left < b.left + b.side and b.left < a.left + a.side and a.top < b.top + b.side and b.top < a.top + a.side


def test_bundled_val_crops_never_overlap_train_crops():
    for name in bundled.PHOTOS:
        h, w, _ = bundled.load_photo(name).shape  # every photo loads offline
        plans = bundled.plan_crops(h, w, 300, 60, np.random.default_rng(0))
        assert len(plans["train"]) == 300 and len(plans["val"]) == 60
        assert {c.side for c in plans["train"]} == set(bundled.CROP_SIDES)
        for v in plans["val"]:
            assert 0 <= v.top and v.top + v.side <= h and v.left + v.side <= w
            assert not any(_overlap(v, t) for t in plans["train"]), name


@pytest.fixture
def small_bundled(monkeypatch, tmp_path):
    monkeypatch.setattr(bundled, "NUM_TRAIN_PER_PHOTO", 8)
    monkeypatch.setattr(bundled, "NUM_VAL_PER_PHOTO", 4)
    monkeypatch.setenv("TARFLOW_DATA_DIR", str(tmp_path / "bundled"))
    return tmp_path / "bundled"


def test_bundled_builds_on_first_use_and_loads(small_bundled):
    said: list[str] = []
    root = resolve_data_path(DataConfig(), announce=said.append)
    assert root == str(small_bundled)
    assert len(said) == 2 and said[0].startswith("building the bundled dataset") and "ready" in said[1]
    train, val = read_manifest(root, "train"), read_manifest(root, "val")
    n = len(bundled.PHOTOS)
    assert (train.num_samples, val.num_samples, train.num_classes) == (8 * n, 4 * n, n)
    assert train.class_names == list(bundled.PHOTOS) and (train.image_size, train.channels) == (64, 3)
    mtime = os.stat(os.path.join(root, "train.json")).st_mtime_ns
    assert resolve_data_path(DataConfig(), announce=said.append) == root and len(said) == 2  # built: silent
    assert os.stat(os.path.join(root, "train.json")).st_mtime_ns == mtime
    x, y = next(iter(make_train_loader(DataConfig(num_workers=0), 16, rank=0, world_size=1, seed=0)))
    assert x.shape == (16, 3, 64, 64) and 0 <= y.min() and y.max() < n
    labels = torch.cat([y for _, y, _ in make_eval_loader(DataConfig(num_workers=0), 64, 0, 1)])
    assert torch.bincount(labels, minlength=n).tolist() == [4] * n
    assert resolve_data_path(DataConfig(path="~/x")) == os.path.expanduser("~/x")


@pytest.mark.slow
def test_bundled_concurrent_first_use(tmp_path):
    """Two processes resolving "bundled" at once both succeed, with one consistent, verified copy."""
    script = (
        "import tarflow_scale.data.bundled as b\n"
        "from tarflow_scale.config import DataConfig\n"
        "b.NUM_TRAIN_PER_PHOTO, b.NUM_VAL_PER_PHOTO = 8, 4\n"
        "print(b.resolve_data_path(DataConfig()))\n"
    )
    env = {**os.environ, "TARFLOW_DATA_DIR": str(tmp_path / "b")}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err.decode()[-2000:] for _, err in outputs]
    assert {out.decode().strip() for out, _ in outputs} == {str(tmp_path / "b")}
    for split in ("train", "val"):
        assert verify(str(tmp_path / "b"), read_manifest(str(tmp_path / "b"), split), deep=True) == []
    assert not [f for f in os.listdir(tmp_path / "b") if f.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------------
# Reliability (docs/reliability.md, issue 13 items 5-8)


def test_garbage_inside_a_tar_is_counted_against_the_manifest(tiny_shards):
    """Random bytes over a member header end Python's tar reader silently: the shortfall must be counted."""
    m = read_manifest(tiny_shards, "train")
    shard = os.path.join(tiny_shards, m.shards[0])
    with tarfile.open(shard) as tar:
        offset = [member.offset for member in tar][4]  # the header of sample 3's first member
    data = bytearray(open(shard, "rb").read())
    data[offset : offset + 512] = np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes()
    open(shard, "wb").write(bytes(data))
    yielded = sum(1 for _ in wds.tarfile_samples([{"url": shard}]))  # the silent truncation, reproduced
    assert yielded < m.samples_per_shard[0]

    only_first = DataConfig(path=tiny_shards, num_workers=0, shuffle_buffer=0, hflip=False)
    m.shards, m.samples_per_shard = m.shards[:1], m.samples_per_shard[:1]
    from tarflow_scale.data import loader as loader_module

    stream = loader_module._TrainStream(only_first, [shard], m, 1, (0, 0, 0, 1))
    stats = DataStats()
    batches = iter(loader_module.TrainLoader(stream, 0, stats, m))
    for _ in range(yielded + 1):  # one full pass over the shard, and the first sample of the next
        next(batches)
    assert stats.skipped == m.samples_per_shard[0] - yielded
    assert f"yielded {yielded} of its {m.samples_per_shard[0]} samples" in stats.last_error
    assert m.shards[0] in stats.last_error


def _set_label(key, label):
    def change(sample):
        if sample["__key__"] == key:
            sample["cls"] = str(label).encode()
        return sample

    return change


@pytest.mark.parametrize("label", [-1, TINY_CLASSES, 99])
def test_out_of_range_labels_are_data_errors_naming_shard_and_key(tiny_shards, label):
    """Training skips and counts them (like any corrupt sample); evaluation stops naming shard and key."""
    for split in ("train", "val"):
        m = read_manifest(tiny_shards, split)
        rewrite_shard(os.path.join(tiny_shards, m.shards[0]), _set_label("train_data_batch_1-0000001", label))
    stats = DataStats()
    cfg = DataConfig(path=tiny_shards, num_workers=0, shuffle_buffer=0)
    loader = iter(make_train_loader(cfg, 4, rank=0, world_size=1, seed=0, stats=stats))
    seen = torch.cat([next(loader)[1] for _ in range(30)])
    assert seen.min() >= 0 and seen.max() < TINY_CLASSES
    assert stats.skipped >= 1 and f"has label {label}, outside [0, {TINY_CLASSES})" in stats.last_error
    assert "train_data_batch_1-0000001" in stats.last_error
    with pytest.raises(DataError, match=rf"tiny-val-000000.tar: sample 'train_data_batch_1-0000001' has label {label}"):
        eval_keys(DataConfig(path=tiny_shards, num_workers=0), 1)


def test_16_bit_pngs_convert_to_their_8_bit_values(tmp_path):
    """PIL's convert("RGB") clips 16-bit grayscale at 255; the converter must map 65535 -> 255 instead."""
    src = tmp_path / "folder" / "gray16"
    src.mkdir(parents=True)
    values = np.linspace(0, 65535, TINY_SIZE * TINY_SIZE).reshape(TINY_SIZE, TINY_SIZE).astype(np.uint16)
    Image.fromarray(values).save(src / "ramp.png")
    assert Image.open(src / "ramp.png").mode.startswith("I")  # really a 16-bit file
    out = str(tmp_path / "out")
    write_split(out, FolderSource(str(src.parent), TINY_SIZE), name="g", split="s", progress=False)
    ((image, _),) = read_shards(out, "s").values()
    expected = np.floor(values / 65535 * 255 + 0.5)  # independent of the converter's arithmetic
    assert np.abs(image.astype(int) - expected[:, :, None]).max() <= 1
    assert image.min() == 0 and image.max() == 255


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: list[bytes], **chunks: bytes) -> bytes:
    """A PNG assembled chunk by chunk (PNG spec §5), for the kinds PIL cannot write (16-bit RGB, 2-bit gray)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    extra = b"".join(chunk(kind.encode(), data) for kind, data in chunks.items())
    idat = zlib.compress(b"".join(b"\x00" + row for row in rows))  # filter type 0 on every row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _decode(png: bytes, channels: int = 3, size: int = 2):
    from tarflow_scale.data.decode import SampleDecoder

    image, label, key = SampleDecoder(channels, size)({"__key__": "k", "__url__": "s.tar", "png": png, "cls": b"0"})
    return image.permute(1, 2, 0).numpy()


def test_decoder_reads_exact_8_bit_forms_and_refuses_the_rest():
    rgb = make_images(1, 2, seed=3)[0]
    np.testing.assert_array_equal(_decode(_png_bytes(Image.fromarray(rgb))), rgb)
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(_decode(_png_bytes(Image.fromarray(gray))), np.repeat(gray[:, :, None], 3, 2))
    np.testing.assert_array_equal(_decode(_png_bytes(Image.fromarray(gray)), channels=1), gray[:, :, None])
    palette = np.arange(3 * 256, dtype=np.uint8).reshape(256, 3)[::-1].copy()  # entry i -> 3 bytes
    indices = np.array([[0, 7], [200, 255]], np.uint8)
    paletted = Image.fromarray(indices, mode="P")
    paletted.putpalette(palette.tobytes())
    np.testing.assert_array_equal(_decode(_png_bytes(paletted)), palette[indices])
    # 2-bit grayscale: the PNG spec scales level v to v * 255 / 3 exactly.
    two_bit = _raw_png(2, 2, 2, 0, [bytes([0b00010000]), bytes([0b10110000])])
    np.testing.assert_array_equal(_decode(two_bit)[:, :, 0], [[0, 85], [170, 255]])

    # 16-bit RGB: PIL opens it as plain "RGB" by dropping each value's low byte, so it must be refused by header.
    rgb16 = _raw_png(2, 2, 16, 2, [bytes(range(12)), bytes(range(12, 24))])
    assert Image.open(io.BytesIO(rgb16)).mode == "RGB"
    gray16 = _png_bytes(Image.fromarray(np.full((2, 2), 40000, np.uint16)))
    assert Image.open(io.BytesIO(gray16)).mode.startswith("I")
    rgba = _png_bytes(Image.fromarray(np.dstack([rgb, np.full((2, 2), 255, np.uint8)])))
    transparent = paletted.copy()
    transparent.info["transparency"] = 0
    refused = {
        "a 16-bit RGB PNG": rgb16,
        "a 16-bit grayscale PNG": gray16,
        "an 8-bit RGBA PNG with transparency": rgba,
        "an 8-bit palette PNG with transparency": _png_bytes(transparent),
    }
    for what, png in refused.items():
        with pytest.raises(DataError, match=rf"s.tar: sample 'k' is {what}"):
            _decode(png)
    with pytest.raises(DataError, match=r"s.tar: sample 'k' is an 8-bit RGB PNG, which has no exact 1-channel form"):
        _decode(_png_bytes(Image.fromarray(rgb)), channels=1)
    with pytest.raises(DataError, match=r"s.tar: sample 'k' is corrupt"):
        _decode(b"\xff\xd8\xff\xe0 a JPEG is not a PNG")


def _replace_png(key: str, png: bytes):
    def change(sample):
        if sample["__key__"] == key:
            sample["png"] = png
        return sample

    return change


def _reseal(root: str, split: str) -> None:
    """Record the shards' current checksums and sizes, as a converter writing them this way would have."""
    m = read_manifest(root, split)
    m.sha256 = [file_sha256(os.path.join(root, s)) for s in m.shards]
    m.shard_bytes = [os.path.getsize(os.path.join(root, s)) for s in m.shards]
    write_manifest(root, m)


def test_a_16_bit_png_in_a_shard_is_refused_by_verify_training_and_evaluation(tiny_shards, capsys):
    """PIL's convert("RGB") turns this image white; every reader must name its shard and key instead."""
    from tarflow_scale.data import check_first_sample

    key = "train_data_batch_1-0000003"
    gray16 = _png_bytes(Image.fromarray(np.full((TINY_SIZE, TINY_SIZE), 40000, np.uint16)))
    assert Image.open(io.BytesIO(gray16)).mode == "I;16"
    for split in ("train", "val"):
        rewrite_shard(os.path.join(tiny_shards, read_manifest(tiny_shards, split).shards[0]), _replace_png(key, gray16))
        _reseal(tiny_shards, split)

    assert data_cli.main(["verify", tiny_shards]) == 0  # the bytes are exactly what the manifests record
    capsys.readouterr()
    assert data_cli.main(["verify", tiny_shards, "--deep"]) == 1
    out = capsys.readouterr().out
    for split in ("train", "val"):
        assert f"FAIL {tiny_shards}/tiny-{split}-000000.tar: sample '{key}' is a 16-bit grayscale PNG" in out
        assert f"FAIL   {split}: 37 samples" in out

    stats = DataStats()
    cfg = DataConfig(path=tiny_shards, num_workers=0, shuffle_buffer=0, hflip=False)
    loader = iter(make_train_loader(cfg, 4, rank=0, world_size=1, seed=0, stats=stats))
    images = torch.cat([next(loader)[0] for _ in range(30)])  # 120 samples: every shard several times
    assert stats.skipped >= 1 and f"tiny-train-000000.tar: sample '{key}' is a 16-bit grayscale PNG" in stats.last_error
    assert not (images == 255).flatten(1).all(1).any()  # the clipped all-white image never reaches training

    with pytest.raises(DataError, match=rf"tiny-val-000000.tar: sample '{key}' is a 16-bit grayscale PNG"):
        eval_keys(DataConfig(path=tiny_shards, num_workers=0), 1)

    # A split that starts with such an image fails the check a run makes before its workers start.
    check_first_sample(tiny_shards, read_manifest(tiny_shards, "train"))
    first = "train_data_batch_1-0000000"
    rewrite_shard(os.path.join(tiny_shards, "tiny-train-000000.tar"), _replace_png(first, gray16))
    _reseal(tiny_shards, "train")
    with pytest.raises(DataError, match=rf"tiny-train-000000.tar: sample '{first}' is a 16-bit grayscale PNG"):
        check_first_sample(tiny_shards, read_manifest(tiny_shards, "train"))


def test_skip_bad_leaves_unreadable_images_out_and_records_them(tmp_path, capsys):
    src = tmp_path / "folder" / "only"
    src.mkdir(parents=True)
    for i, image in enumerate(make_images(6, TINY_SIZE, seed=1)):
        _png(src / f"{i}.png", image)
    (src / "3.png").write_bytes(b"this is not a png")
    out = str(tmp_path / "out")
    args = ["convert-folder", str(src.parent), "--out", out, "--split", "s", "--samples-per-shard", "2"]
    assert data_cli.main([*args, "--no-progress", "--procs", "1"]) == 1  # without the flag: stops, names the file
    assert "3.png: unreadable image" in capsys.readouterr().err
    assert data_cli.main([*args, "--no-progress", "--procs", "1", "--skip-bad"]) == 0  # the re-run is accepted
    m = read_manifest(out, "s")
    assert m.num_samples == 5 and m.samples_per_shard == [2, 1, 2]
    assert len(m.skipped_inputs) == 1 and "only/3.png: unreadable image" in m.skipped_inputs[0]
    assert "skipped:" in capsys.readouterr().err
    assert verify(out, m) == [] and len(read_shards(out, "s")) == 5
    evaluated = sorted(k for _, k, _, _ in eval_keys(DataConfig(path=out, eval_split="s", num_workers=0), 2))
    assert evaluated == sorted(read_shards(out, "s")) and not any("3" in k for k in evaluated)


def test_shard_sizes_are_checked_before_a_run_starts(tiny_shards):
    from tarflow_scale.data import check_shard_sizes

    m = read_manifest(tiny_shards, "train")
    assert m.shard_bytes and len(m.shard_bytes) == len(m.shards)
    check_shard_sizes(tiny_shards, m)
    shard = os.path.join(tiny_shards, m.shards[2])
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:-1024])
    with pytest.raises(DataError, match=rf"{m.shards[2]}: {len(data) - 1024} bytes, the manifest says {len(data)}"):
        check_shard_sizes(tiny_shards, m)
    os.remove(shard)
    with pytest.raises(DataError, match=rf"{m.shards[2]}: shard listed in train.json is missing"):
        check_shard_sizes(tiny_shards, m)
