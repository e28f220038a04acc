"""Smoke test of tools/study_transforms.py: two tiny models, a 2-second budget each, on a shrunken bundled set."""

from __future__ import annotations

import json
import math

import pytest
from conftest import load_tool

from tarflow_scale.data import bundled

study_transforms = load_tool("study_transforms")


@pytest.fixture
def small_bundled(monkeypatch, tmp_path):
    monkeypatch.setattr(bundled, "NUM_TRAIN_PER_PHOTO", 8)  # 64 train images
    monkeypatch.setattr(bundled, "NUM_VAL_PER_PHOTO", 4)  # 32 val images
    monkeypatch.setenv("TARFLOW_DATA_DIR", str(tmp_path / "bundled"))
    return tmp_path / "bundled"


@pytest.mark.slow  # platform.processor() runs `uname -p`
def test_study_writes_finite_bpd_and_positive_rates(small_bundled, tmp_path, capsys):
    out = tmp_path / "study"
    argv = [
        "--budget-s=2",
        "--image-size=8",
        "--batch-size=16",
        "--sample-batch-size=4",
        "--sample-repeats=1",
        "--variants",
        "affine",
        "spline4",
        f"--out={out}",
        "model.channels=16",
        "model.head_dim=8",
        "model.num_blocks=1",
        "model.layers_per_block=1",
        "optim.warmup_steps=2",
    ]
    assert study_transforms.main(argv) == 0
    report = json.loads((out / "study_transforms.json").read_text())
    rows = report["rows"]
    assert [r["variant"] for r in rows] == ["affine", "spline4"]
    assert [r["model"]["transform"] for r in rows] == ["affine", "spline"] and rows[1]["model"]["num_bins"] == 4
    for r in rows:
        assert r["val_images"] == 32 and r["val_nonfinite_images"] == 0  # the FULL val split, every image once
        assert math.isfinite(r["val_bpd"]) and 0 < r["val_bpd"] < 16
        assert r["train_images_per_s"] > 0 and r["sample_images_per_s"] > 0 and r["steps"] > 0
        assert r["train_seconds"] >= 2 and r["num_params"] > 0
    assert rows[0]["val_bpd_minus_first"] == 0
    table = (out / "study_transforms.md").read_text()
    assert table.count("\n") == 4 and "spline K=4" in table  # header, rule, two rows
    assert "[1/2 affine]" in capsys.readouterr().out  # a progress line per model


def test_overriding_a_variant_field_is_an_error(capsys):
    assert study_transforms.main(["model.transform=spline"]) == 2
    assert "set by each variant" in capsys.readouterr().err
