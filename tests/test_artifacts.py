"""Model artifacts: weights checksums (corruption is an error naming the file), self-describing model directories
(save_pretrained / from_pretrained / `tarflow-export --format dir` with a model card), `model.final_norm`, and the
`train.init_from` model check."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import tarflow_scale.cli.export as export_cli
import tarflow_scale.cli.train as train_cli
from tarflow_scale.checkpoint import (
    CheckpointError,
    check_initial_weights,
    load_initial_weights,
    load_model,
    save_export,
)
from tarflow_scale.config import DataConfig, RunConfig, TarFlowConfig, TrainConfig
from tarflow_scale.models.tarflow import TarFlow
from tarflow_scale.weights import CHECKSUM_KEY, read_weights


def tiny_config(**overrides) -> TarFlowConfig:
    fields = dict(image_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2, layers_per_block=1)
    return TarFlowConfig(**{**fields, **overrides})


def random_model(seed: int = 0, **overrides) -> TarFlow:
    torch.manual_seed(seed)
    model = TarFlow(tiny_config(**overrides))
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.05)
    return model.eval()


def export(model: TarFlow, path: Path, **data) -> Path:
    run = RunConfig(
        model=model.config,
        data=DataConfig(path="/data/tiny64", noise="gaussian", noise_std=0.07, **data),
        train=TrainConfig(num_steps=1234),
    )
    return save_export(model.state_dict(), run, path, source="test-run", tag="step_00001234", ema=False)


def flip_data_byte(path: Path, offset_in_data: int) -> None:
    """Corrupt one byte of the tensor data (after the 8-byte header length and the JSON header)."""
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    raw[8 + header_len + offset_in_data] ^= 0x40  # an exponent bit: the kind of flip that evaluates to NaN/inf
    path.write_bytes(bytes(raw))


def same_weights(a: TarFlow, b: TarFlow) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------------------
# Integrity


def test_export_records_a_checksum_and_loads_verified(tmp_path):
    model = random_model()
    path = export(model, tmp_path / "m.safetensors")
    state, metadata = read_weights(path)
    assert len(metadata[CHECKSUM_KEY]) == 64 and metadata["integrity"] == "verified"
    assert same_weights(load_model(path), model)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_flipped_byte_in_the_weights_is_an_error_naming_the_file(tmp_path, where):
    model = random_model()
    path = export(model, tmp_path / "m.safetensors")
    size = sum(v.numel() * 4 for v in model.state_dict().values())
    flip_data_byte(path, {"start": 3, "middle": size // 2 + 1, "end": size - 1}[where])
    for load in (load_model, TarFlow.from_pretrained):
        with pytest.raises(CheckpointError, match=rf"{path}.* is corrupt"):
            load(path)


def test_corrupt_model_directory_is_an_error_naming_its_weights_file(tmp_path):
    random_model().save_pretrained(tmp_path / "dir")
    flip_data_byte(tmp_path / "dir" / "model.safetensors", 100)
    with pytest.raises(CheckpointError, match=r"dir/model\.safetensors is corrupt"):
        TarFlow.from_pretrained(tmp_path / "dir")


def test_exports_from_before_checksums_still_load_with_a_note(tmp_path):
    from safetensors.torch import save_file

    model = random_model()
    path = export(model, tmp_path / "new.safetensors")
    state, metadata = read_weights(path)
    old = {k: v for k, v in metadata.items() if k not in (CHECKSUM_KEY, "integrity")}
    save_file(state, str(tmp_path / "old.safetensors"), metadata=old)  # the format as written before checksums
    _, old_metadata = read_weights(tmp_path / "old.safetensors")
    assert old_metadata["integrity"].startswith("not verified")
    assert same_weights(load_model(tmp_path / "old.safetensors"), model)


# ------------------------------------------------------------------------------------------------------------
# Model directories


def test_save_pretrained_round_trip_and_model_card(tmp_path):
    model = load_model(export(random_model(num_classes=3), tmp_path / "m.safetensors"))  # carries its provenance
    metrics = {"results": {"bpd": {"dequantized": {"mean": 3.4567, "stderr": 0.01, "num_images": 50}}}}
    model.save_pretrained(tmp_path / "dir", metrics=metrics)
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    described = json.loads((tmp_path / "dir" / "config.json").read_text())
    assert described["model"]["num_classes"] == 3 and described["model"]["final_norm"] is True
    assert described["training_noise"] == {"noise": "gaussian", "noise_std": 0.07}
    assert described["training"]["num_steps"] == 1234
    card = (tmp_path / "dir" / "README.md").read_text()
    for expected in (
        "/data/tiny64",
        "1234",
        "step_00001234",
        "3.4567",
        "noise_std: 0.07",
        "library_name: tarflow_scale",
    ):
        assert expected in card, expected
    for loaded in (TarFlow.from_pretrained(tmp_path / "dir"), load_model(tmp_path / "dir")):
        assert same_weights(loaded, model) and loaded.config == model.config
        assert json.loads(loaded.provenance["run_config"])["data"]["noise_std"] == 0.07
        assert not loaded.training  # ready to sample
    assert TarFlow(tiny_config()).provenance == {}  # construction is unchanged by the mixin


def test_from_pretrained_local_errors_never_reach_the_network(tmp_path):
    for missing in (tmp_path / "nope", "./nope", "runs/a/b", "model.safetensors"):
        with pytest.raises(CheckpointError, match="does not exist"):
            TarFlow.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model directory.*config.json"):
        TarFlow.from_pretrained(tmp_path / "empty")
    torch.save({}, tmp_path / "afhq_model_8_768_8_8_0.07.pth")
    with pytest.raises(CheckpointError, match="tarflow-import ml-tarflow"):
        TarFlow.from_pretrained(tmp_path / "afhq_model_8_768_8_8_0.07.pth")


def test_export_cli_writes_a_directory_with_the_evaluation_beside_it(tmp_path, capsys):
    model = random_model(seed=3)
    path = export(model, tmp_path / "run" / "model.safetensors")
    (tmp_path / "run" / "eval").mkdir()
    fid = {"fid": 12.345, "kid": 0.001, "num_generated": 500, "feature_extractor": "inception"}
    (tmp_path / "run" / "eval" / "metrics.json").write_text(json.dumps({"results": {"fid": fid}}))
    out = tmp_path / "published"
    assert export_cli.main([str(path), str(out), "--format", "dir"]) == 0
    assert "12.345" in (out / "README.md").read_text()
    assert same_weights(TarFlow.from_pretrained(out), model)
    assert export_cli.main([str(path), str(out), "--format", "dir"]) == 0  # replaces a previous export
    assert not list(tmp_path.glob("published.*"))  # no temp folders left behind

    from tarflow_scale.evaluation.resolve import inspect_checkpoint, resolve_config, training_noise

    info = inspect_checkpoint(out)  # tarflow-eval reads a model directory like an export
    assert info.kind == "model_dir" and training_noise(info).noise_std == 0.07
    assert resolve_config(info).data.path == "/data/tiny64"


# ------------------------------------------------------------------------------------------------------------
# model.final_norm


def test_final_norm_false_drops_only_the_norm_keys_and_stays_invertible():
    with_norm, without = TarFlow(tiny_config()), random_model(final_norm=False)
    dropped = set(with_norm.state_dict()) - set(without.state_dict())
    assert dropped == {f"blocks.{k}.norm_out.{p}" for k in range(2) for p in ("weight", "bias")}
    assert set(without.state_dict()) < set(with_norm.state_dict())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    without = without.double()
    z, _ = without(x)
    torch.testing.assert_close(without.inverse(z), x, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# train.init_from


def test_init_from_checks_the_model_section(tmp_path):
    path = export(random_model(seed=4), tmp_path / "m.safetensors")
    state = load_initial_weights(path, tiny_config())
    assert torch.equal(state["blocks.0.proj_out.weight"], load_model(path).state_dict()["blocks.0.proj_out.weight"])
    with pytest.raises(CheckpointError) as e:
        check_initial_weights(path, tiny_config(channels=64, final_norm=False))
    assert "model.channels: config 64, checkpoint 32" in str(e.value)
    assert "model.final_norm: config False, checkpoint True" in str(e.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        check_initial_weights(tmp_path / "missing.safetensors", tiny_config())


def test_train_cli_refuses_a_mismatching_init_from_before_any_worker_starts(tmp_path, capsys):
    path = export(random_model(), tmp_path / "m.safetensors")
    argv = [f"train.init_from={path}", "model.image_size=8", "model.patch_size=2", "model.channels=48",
            "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1"]  # fmt: skip
    assert train_cli.main(argv) == 2
    assert "model.channels: config 48, checkpoint 32" in capsys.readouterr().err


def test_hub_ids_go_through_the_mixin_to_the_same_verified_loader(tmp_path, monkeypatch):
    """`from_pretrained("org/name")`: the mixin fetches config.json, our hook fetches the files (both stubbed
    here with a local folder: no network in tests) and loads them like a local directory, checksum included."""
    import huggingface_hub
    import huggingface_hub.hub_mixin

    model = random_model(seed=9)
    model.save_pretrained(tmp_path / "snapshot")
    fetched = []

    def fake_file(repo_id, filename, **kwargs):
        fetched.append((repo_id, filename))
        return str(tmp_path / "snapshot" / filename)

    def fake_snapshot(repo_id, allow_patterns=None, **kwargs):
        fetched.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert same_weights(TarFlow.from_pretrained("org/tiny-tarflow"), model)
    assert fetched == [("org/tiny-tarflow", "config.json"),
                       ("org/tiny-tarflow", ("config.json", "model.safetensors", "README.md"))]  # fmt: skip
