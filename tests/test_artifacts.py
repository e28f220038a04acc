"""Model artifacts: weights checksums (corruption or a missing checksum is an error naming the file),
self-describing model directories (save_pretrained / from_pretrained / `tarflow-export --format dir` with a model
card), one provenance reader for every artifact kind, one strict builder behind every loader, `model.final_norm`,
and the `train.init_from` model check."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from test_eval import random_model as eval_random_model
from test_eval import tiny_config

import tarflow_scale.cli.export as export_cli
import tarflow_scale.cli.train as train_cli
from tarflow_scale.artifacts import CheckpointError, PretrainedTarFlow, load_model, read_provenance, save_export
from tarflow_scale.artifacts.load import check_initial_weights, load_initial_weights
from tarflow_scale.artifacts.weights import CHECKSUM_KEY, read_weights
from tarflow_scale.config import DataConfig, RunConfig, TrainConfig
from tarflow_scale.models.tarflow import TarFlow


def random_model(seed: int = 0, **overrides) -> PretrainedTarFlow:
    """test_eval's model with live heads, as the Hub mixin's class (save_pretrained, push_to_hub)."""
    return eval_random_model(seed, PretrainedTarFlow, **overrides)


def training_run(model: TarFlow, noise: str = "gaussian", **data) -> RunConfig:
    return RunConfig(
        model=model.config,
        data=DataConfig(path="/data/tiny64", noise=noise, noise_std=0.07, **data),
        train=TrainConfig(num_steps=1234),
    )


def export(model: TarFlow, path: Path, **data) -> Path:
    run = training_run(model, **data)
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
    for load in (load_model, PretrainedTarFlow.from_pretrained):
        with pytest.raises(CheckpointError, match=rf"{path}.* is corrupt"):
            load(path)


def test_corrupt_model_directory_is_an_error_naming_its_weights_file(tmp_path):
    random_model().save_pretrained(tmp_path / "dir")
    flip_data_byte(tmp_path / "dir" / "model.safetensors", 100)
    with pytest.raises(CheckpointError, match=r"dir/model\.safetensors is corrupt"):
        PretrainedTarFlow.from_pretrained(tmp_path / "dir")


def test_a_weight_file_without_a_checksum_is_refused_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    model = random_model()
    path = export(model, tmp_path / "new.safetensors")
    state, metadata = read_weights(path)
    unchecked = {k: v for k, v in metadata.items() if k not in (CHECKSUM_KEY, "integrity")}
    save_file(state, str(tmp_path / "old.safetensors"), metadata=unchecked)  # a valid file, but unverifiable
    for load in (read_weights, load_model, PretrainedTarFlow.from_pretrained):
        with pytest.raises(CheckpointError, match=rf"{tmp_path / 'old.safetensors'} records no weights checksum"):
            load(tmp_path / "old.safetensors")
    model.save_pretrained(tmp_path / "dir")
    save_file(state, str(tmp_path / "dir" / "model.safetensors"), metadata=unchecked)
    with pytest.raises(CheckpointError, match=r"dir/model\.safetensors records no weights checksum"):
        load_model(tmp_path / "dir")


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
    for loaded in (PretrainedTarFlow.from_pretrained(tmp_path / "dir"), load_model(tmp_path / "dir")):
        assert same_weights(loaded, model) and loaded.config == model.config
        assert json.loads(loaded.provenance["run_config"])["data"]["noise_std"] == 0.07
        assert not loaded.training  # ready to sample
    assert PretrainedTarFlow(tiny_config()).provenance == {}  # construction is unchanged by the mixin
    assert not hasattr(TarFlow(tiny_config()), "provenance")  # the model file holds the architecture only


def test_from_pretrained_local_errors_never_reach_the_network(tmp_path):
    for missing in (tmp_path / "nope", "./nope", "runs/a/b", "model.safetensors"):
        with pytest.raises(CheckpointError, match="does not exist"):
            PretrainedTarFlow.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model directory.*config.json"):
        PretrainedTarFlow.from_pretrained(tmp_path / "empty")
    torch.save({}, tmp_path / "afhq_model_8_768_8_8_0.07.pth")
    with pytest.raises(CheckpointError, match="tarflow-import ml-tarflow"):
        PretrainedTarFlow.from_pretrained(tmp_path / "afhq_model_8_768_8_8_0.07.pth")


def test_export_cli_writes_a_directory_with_the_evaluation_beside_it(tmp_path, capsys):
    model = random_model(seed=3)
    path = export(model, tmp_path / "run" / "model.safetensors")
    (tmp_path / "run" / "eval").mkdir()
    fid = {"fid": 12.345, "kid": 0.001, "num_generated": 500, "feature_extractor": "inception"}
    (tmp_path / "run" / "eval" / "metrics.json").write_text(json.dumps({"results": {"fid": fid}}))
    out = tmp_path / "published"
    assert export_cli.main([str(path), str(out), "--format", "dir"]) == 0
    assert "12.345" in (out / "README.md").read_text()
    assert same_weights(PretrainedTarFlow.from_pretrained(out), model)
    assert export_cli.main([str(path), str(out), "--format", "dir"]) == 0  # replaces a previous export
    assert not list(tmp_path.glob("published.*"))  # no temp folders left behind

    from tarflow_scale.evaluation.resolve import resolve_config

    info = read_provenance(out)  # tarflow-eval reads a model directory like an export
    assert info.kind == "model_dir" and info.noise.noise_std == 0.07
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
    assert same_weights(PretrainedTarFlow.from_pretrained("org/tiny-tarflow"), model)
    assert fetched == [("org/tiny-tarflow", "config.json"),
                       ("org/tiny-tarflow", ("config.json", "model.safetensors", "README.md"))]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# One provenance reader, one builder


def fake_checkpoint(run_dir: Path, run: RunConfig, step: int = 7) -> Path:
    """A sealed training checkpoint folder as the trainer leaves it (engine state aside): config.yaml, latest."""
    from tarflow_scale.artifacts.checkpoints import write_complete_marker
    from tarflow_scale.config import dump_config

    folder = run_dir / f"checkpoint_{step:08d}"
    folder.mkdir(parents=True)
    dump_config(run, folder / "config.yaml")
    (folder / "latest").write_text(f"step_{step:08d}")
    write_complete_marker(folder, step, world_size=2)
    return folder


@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
def test_read_provenance_gives_the_same_run_config_and_noise_for_every_artifact_kind(tmp_path, noise):
    model = random_model(num_classes=3)
    run = training_run(model, noise=noise)
    path = save_export(model.state_dict(), run, tmp_path / "m.safetensors", source="test-run", tag="t", ema=False)
    load_model(path).save_pretrained(tmp_path / "dir")
    folder = fake_checkpoint(tmp_path / "run", run)
    described = {
        "export": read_provenance(path),
        "model_dir": read_provenance(tmp_path / "dir"),
        "training_checkpoint": read_provenance(folder),
        "run directory": read_provenance(tmp_path / "run"),
    }
    expected_std = 0.07 if noise == "gaussian" else 0.0
    for kind, p in described.items():
        assert p.kind == ("training_checkpoint" if kind == "run directory" else kind), kind
        assert p.run_config == run and p.model_config == model.config, kind
        assert (p.noise.noise, p.noise.noise_std) == (noise, expected_std), kind
        assert str(p.resolved) in p.noise.source, kind
    assert described["run directory"].resolved == folder and described["run directory"].tag == "step_00000007"
    assert described["export"].source == described["model_dir"].source == "test-run"
    # config.json of a model directory records the same noise (the model card's one lookup)
    recorded = json.loads((tmp_path / "dir" / "config.json").read_text())["training_noise"]
    assert recorded == {"noise": noise, "noise_std": expected_std}


def test_provenance_without_a_run_config_is_unknown_noise_and_a_bad_one_is_an_error_naming_the_file(tmp_path):
    from tarflow_scale.artifacts.weights import write_weights

    random_model().save_pretrained(tmp_path / "bare")  # constructed, never trained: no run config to record
    bare = read_provenance(tmp_path / "bare")
    assert bare.run_config is None and (bare.noise.noise, bare.noise.noise_std) == ("unknown", 0.0)
    path = export(random_model(), tmp_path / "m.safetensors")
    state, metadata = read_weights(path)
    stale = {k: v for k, v in metadata.items() if k != "integrity"}
    stale["run_config"] = json.dumps({"data": {"noise_stdev": 0.1}})  # a key this schema does not know
    write_weights(tmp_path / "stale.safetensors", state, stale)
    for read in (read_provenance, load_model):
        with pytest.raises(CheckpointError, match=r"stale\.safetensors: .*run config.*data\.noise_stdev"):
            read(tmp_path / "stale.safetensors")


def mismatched_state() -> dict[str, torch.Tensor]:
    """Weights of the tiny model with one tensor missing: every strict builder must refuse them."""
    state = random_model().state_dict()
    del state["blocks.1.proj_out.bias"]
    return state


def test_every_loader_goes_through_the_one_strict_builder_naming_the_source(tmp_path, monkeypatch):
    from contextlib import nullcontext
    from types import SimpleNamespace

    from tarflow_scale.artifacts.load import build_model
    from tarflow_scale.artifacts.weights import write_weights
    from tarflow_scale.config import to_dict
    from tarflow_scale.evaluation.worker import EvalWorker
    from tarflow_scale.sampling import sample_images
    from tarflow_scale.training import trainer

    missing = r"does not match its model config(?s:.*)blocks\.1\.proj_out\.bias"
    with pytest.raises(CheckpointError, match=rf"the source {missing}"):
        build_model(tiny_config(), mismatched_state(), "the source")
    # An export file whose weights do not fit its embedded config: load_model, from_pretrained and sampling.
    good = export(random_model(), tmp_path / "good.safetensors")
    _, metadata = read_weights(good)
    metadata = {k: v for k, v in metadata.items() if k != "integrity"}
    bad = write_weights(tmp_path / "bad.safetensors", mismatched_state(), metadata)
    for load in (load_model, PretrainedTarFlow.from_pretrained, lambda p: sample_images(p, 1)):
        with pytest.raises(CheckpointError, match=rf"{bad} {missing}"):
            load(bad)
    # The evaluation worker builds from the payload the pool sends (config + state + the checkpoint's name).
    payload = {"model_config": to_dict(tiny_config()), "state": mismatched_state(), "source": str(bad)}
    threads = torch.get_num_threads()  # the worker sets its process's thread count
    try:
        with pytest.raises(CheckpointError, match=rf"{bad} {missing}"):
            EvalWorker(payload, to_dict(training_run(random_model())), use_gpu=False, threads=threads)
    finally:
        torch.set_num_threads(threads)
    # The trainer's rank-0 copy of ZeRO-3 weights (gathering stubbed: no engine needed to reach the builder).
    config = training_run(random_model())
    config.deepspeed.zero_stage = 3
    engine = SimpleNamespace(module=SimpleNamespace(state_dict=mismatched_state))
    monkeypatch.setattr(trainer, "_gathered", lambda engine, config: nullcontext())
    with pytest.raises(CheckpointError, match=rf"the engine's gathered ZeRO-3 weights {missing}"):
        trainer._plain_model(engine, config, rank=0)


def test_push_to_hub_uploads_a_directory_that_loads_back_with_its_provenance(tmp_path, monkeypatch):
    """`push_to_hub` (the mixin's, stubbed upload: no network in tests) writes our config.json and card, not the
    mixin's default dataclass dump, so the uploaded folder loads back verified and keeps the training noise."""
    import shutil

    import huggingface_hub.hub_mixin

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    model = load_model(export(random_model(seed=5, num_classes=3), tmp_path / "m.safetensors"))
    model.push_to_hub("org/tiny-tarflow")
    uploaded = load_model(tmp_path / "uploaded")
    assert same_weights(uploaded, model) and uploaded.provenance == model.provenance
    assert read_provenance(tmp_path / "uploaded").noise.noise_std == 0.07
    assert "/data/tiny64" in (tmp_path / "uploaded" / "README.md").read_text()
