"""Config loading: defaults -> YAML -> dotted overrides, typed and validated, errors naming the key."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from tarflow_scale.config import (
    ConfigError,
    RunConfig,
    TarFlowConfig,
    dump_config,
    from_dict,
    load_config,
    model_config_from_dict,
    parse_overrides,
    to_dict,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_override_order_defaults_then_yaml_then_cli(tmp_path):
    path = write(tmp_path, "model:\n  channels: 128\n  num_blocks: 6\ntrain:\n  num_steps: 5\n")
    config = load_config(path, ["model.channels=256", "run_dir=/tmp/x"])
    assert config.model.channels == 256  # CLI beats YAML
    assert config.model.num_blocks == 6  # YAML beats defaults
    assert config.model.patch_size == TarFlowConfig().patch_size  # untouched default
    assert config.train.num_steps == 5 and config.run_dir == "/tmp/x"


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "model:\n  chanels: 128\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown config key model\.chanels"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config key train\.num_step\b"):
        load_config(None, ["train.num_step=3"])


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.channels: expected an integer, got 'wide'"):
        load_config(None, ["model.channels=wide"])
    with pytest.raises(ConfigError, match=r"model\.transform: 'splines' is not one of"):
        load_config(None, ["model.transform=splines"])
    with pytest.raises(ConfigError, match=r"data\.hflip: expected true/false"):
        load_config(write(tmp_path, "data:\n  hflip: 3\n"))
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides(["model.channels"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match=r"micro_batch_size=16 cannot work .*global_batch_size=30 gives 15"):
        load_config(None, ["train.global_batch_size=30", "train.micro_batch_size=16", "cluster.num_workers=2"])
    with pytest.raises(ConfigError, match="not divisible by model.patch_size"):
        load_config(None, ["model.image_size=15"])
    with pytest.raises(ConfigError, match="needs model.prior=learned"):
        load_config(None, ["model.transform=affine_vp"])
    config = load_config(None, ["train.global_batch_size=64", "train.micro_batch_size=8", "cluster.num_workers=2"])
    assert config.grad_accum_steps == 4


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does-not-exist.yaml does not exist"):
        load_config(tmp_path / "does-not-exist.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_dump_round_trip(tmp_path):
    config = load_config(None, ["model.channels=96", "optim.betas=[0.8, 0.9]", "eval.jobs=[bpd]"])
    dump_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert again.optim.betas == (0.8, 0.9)
    assert model_config_from_dict(to_dict(config)["model"]) == config.model


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)


def test_required_overrides_are_accepted():
    config = load_config(
        CONFIG_DIR / "tiny.yaml",
        [
            "run_dir=/tmp/r",
            "train.num_steps=3",
            "cluster.num_workers=1",
            "deepspeed.zero_stage=3",
            "data.path=/d",
        ],
    )
    assert (config.run_dir, config.train.num_steps, config.cluster.num_workers) == ("/tmp/r", 3, 1)
    assert (config.deepspeed.zero_stage, config.data.path) == (3, "/d")


def test_tiny_yaml_is_the_builtin_default():
    """The Quickstart runs the built-in defaults; configs/tiny.yaml documents them and must not drift."""
    assert load_config(CONFIG_DIR / "tiny.yaml") == load_config(None)


@pytest.mark.parametrize("workers", [1, 2, 4, 8, 16, 32, 64])
def test_micro_batch_is_derived_for_any_worker_count(workers):
    """A recipe runs at any worker count dividing the global batch by changing only cluster.num_workers."""
    config = load_config(
        None, ["train.global_batch_size=256", "train.max_micro_batch_size=32", f"cluster.num_workers={workers}"]
    )
    micro, accum = config.micro_batch_size, config.grad_accum_steps
    assert micro * accum * workers == 256 and micro <= 32
    assert accum == max(1, 256 // workers // 32)  # the fewest accumulation steps within the cap


def test_explicit_batch_values_error_only_when_they_cannot_work():
    ok = load_config(None, ["train.global_batch_size=256", "train.micro_batch_size=32", "cluster.num_workers=4"])
    assert (ok.micro_batch_size, ok.grad_accum_steps) == (32, 2)
    ok = load_config(None, ["train.global_batch_size=256", "train.grad_accum_steps=4", "cluster.num_workers=8"])
    assert (ok.micro_batch_size, ok.grad_accum_steps) == (8, 4)
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size=32 cannot work with cluster\.num_workers=16"):
        load_config(None, ["train.global_batch_size=256", "train.micro_batch_size=32", "cluster.num_workers=16"])
    with pytest.raises(ConfigError, match=r"global_batch_size=256 is not divisible by cluster\.num_workers=3"):
        load_config(None, ["train.global_batch_size=256", "cluster.num_workers=3"])
    with pytest.raises(ConfigError, match=r"micro_batch_size=8 x train\.grad_accum_steps=2 x cluster\.num_workers=4"):
        load_config(
            None,
            [
                "train.global_batch_size=256",
                "train.micro_batch_size=8",
                "train.grad_accum_steps=2",
                "cluster.num_workers=4",
            ],
        )


def test_eval_num_workers_was_replaced_by_cluster_num_workers():
    with pytest.raises(ConfigError, match=r"eval\.num_workers was removed: set cluster\.num_workers"):
        load_config(None, ["eval.num_workers=8"])


def test_run_dir_accepts_file_uris_and_refuses_object_stores():
    from tarflow_scale.config import local_run_dir

    assert str(local_run_dir("file:///shared/runs/c1")) == "/shared/runs/c1"
    assert str(local_run_dir("runs/tiny")) == "runs/tiny"
    with pytest.raises(ConfigError, match=r"run_dir=s3://bucket/runs/c1: s3:// storage is not supported"):
        load_config(None, ["run_dir=s3://bucket/runs/c1"])
    with pytest.raises(ConfigError, match="absolute path"):
        load_config(None, ["run_dir=file://relative/x"])


GPU_RECIPES = ["imagenet64_cond", "imagenet64_uncond", "imagenet64_density"]


@pytest.mark.parametrize("name", [*GPU_RECIPES, "imagenet64_cond_p4w1024", "imagenet64_uncond_p4w1024"])
def test_gpu_recipes_run_at_8_16_32_workers_changing_only_the_worker_count(name):
    for workers in (8, 16, 32):
        config = load_config(name, [f"cluster.num_workers={workers}"])
        assert config.micro_batch_size * config.grad_accum_steps * workers == config.train.global_batch_size == 256


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_paper_recipes_match_the_reference_imagenet64_model(name):
    """The reference README's ImageNet64 runs: patch 2, width 768, 8 blocks x 8 layers, batch 256, lr 1e-4;
    uniform dequantization for bits/dim (100 epochs), Gaussian 0.05 for generation (200 epochs)."""
    config = load_config(name)
    m = config.model
    assert (m.patch_size, m.channels, m.num_blocks, m.layers_per_block) == (2, 768, 8, 8)
    assert (config.train.global_batch_size, config.optim.lr) == (256, 1e-4)
    epochs = config.train.num_steps * 256 / 1_281_167
    if name == "imagenet64_density":
        assert config.data.noise == "uniform" and round(epochs) == 100
    else:
        assert (config.data.noise, config.data.noise_std, round(epochs)) == ("gaussian", 0.05, 200)
    assert m.num_classes == (1000 if name == "imagenet64_cond" else 0)
    if m.num_classes:
        assert config.train.label_dropout == 0.1


@dataclasses.dataclass
class _Inner:
    weight: float = 0.0


@dataclasses.dataclass
class _Section:
    MOVED_KEYS: typing.ClassVar[dict[str, str]] = {"old_tol": "s.inner.weight", "inner": "s.inner.weight"}
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_moved_keys_are_named_with_their_new_key():
    with pytest.raises(ConfigError, match=r"s\.old_tol was removed: set s\.inner\.weight instead"):
        from_dict(_Section, {"old_tol": 1.0}, prefix="s.")
    with pytest.raises(ConfigError, match=r"s\.inner was removed: set s\.inner\.weight instead"):
        from_dict(_Section, {"inner": 2.0}, prefix="s.")
    assert from_dict(_Section, {"inner": {"weight": 2.0}}, prefix="s.").inner.weight == 2.0


# Every sampling key that moved into eval.guidance / eval.decoding (config/sampling.py), with its new key.
MOVED_SAMPLING_KEYS = {
    "eval.guidance=2": "eval.guidance.weight",
    "eval.guidance_annealed=true": "eval.guidance.annealed",
    "eval.attn_temp=1.5": "eval.guidance.attn_temp",
    "eval.decoding=jacobi": "eval.decoding.mode",
    "eval.decoding_tol=1e-6": "eval.decoding.tol",
    "eval.decoding_max_iters=3": "eval.decoding.max_iters",
    "eval.decoding_segment_size=8": "eval.decoding.segment_size",
    "eval.decoding_sequential_blocks=[0]": "eval.decoding.sequential_blocks",
    "eval.decoding_compile=true": "eval.decoding.compile",
    "eval.decoding_cuda_graph=true": "eval.decoding.cuda_graph",
    "eval.precision=bf16": "eval.decoding.precision",
}


@pytest.mark.parametrize("override,new_key", MOVED_SAMPLING_KEYS.items())
def test_each_removed_sampling_key_names_its_new_key(override, new_key, tmp_path):
    old_key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(old_key)} was removed: set {re.escape(new_key)} instead"):
        load_config(None, [override])
    path = tmp_path / "old.yaml"  # the same in a config file
    path.write_text(f"eval:\n  {old_key.split('.')[1]}: {override.split('=')[1]}\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: config key {re.escape(old_key)} was removed"):
        load_config(path)


def test_nested_sampling_settings_load_from_overrides_and_yaml_and_are_checked(tmp_path):
    from tarflow_scale.config import Decoding, Guidance

    overrides = ["eval.guidance.weight=2", "eval.guidance.annealed=true", "eval.decoding.mode=gs_jacobi",
                 "eval.decoding.sequential_blocks=[3, 1]", "eval.decoding.precision=bf16"]  # fmt: skip
    e = load_config(None, overrides).eval
    assert e.guidance == Guidance(2.0, annealed=True)
    assert e.decoding == Decoding("gs_jacobi", sequential_blocks=(3, 1), precision="bf16")
    path = tmp_path / "run.yaml"  # a tuple field of a frozen section, from YAML, and the override order
    path.write_text("eval:\n  decoding:\n    sequential_blocks: [2]\n    tol: 3e-3\n  guidance:\n    attn_temp: 0.5\n")
    e = load_config(path, ["eval.decoding.tol=1e-5"]).eval
    assert (e.decoding.sequential_blocks, e.decoding.tol, e.guidance.attn_temp) == ((2,), 1e-5, 0.5)
    assert load_config(path).eval.decoding.tol == 3e-3
    dumped = tmp_path / "dumped.yaml"  # the resolved config round-trips
    dump_config(load_config(path), dumped)
    assert load_config(dumped).eval == load_config(path).eval
    bad = {
        "eval.guidance.weight=.nan": "eval.guidance.weight=nan is not a finite number",
        "eval.guidance.weight=.inf": "eval.guidance.weight=inf is not a finite number",
        "eval.guidance.attn_temp=0": "eval.guidance.attn_temp=0.0 must be a finite number > 0",
        "eval.guidance.attn_temp=.nan": "eval.guidance.attn_temp=nan must be a finite number > 0",
        "eval.decoding.tol=-1": "eval.decoding.tol=-1.0 must be a number >= 0",
        "eval.decoding.tol=.nan": "eval.decoding.tol=nan must be a number >= 0",
        "eval.decoding.max_iters=-1": "eval.decoding.max_iters=-1 must be >= 0",
        "eval.decoding.segment_size=0": "eval.decoding.segment_size=0 must be >= 1",
        "eval.decoding.sequential_blocks=[-1]": "eval.decoding.sequential_blocks=[-1] must be indices >= 0",
        "eval.decoding.precision=fp16": "eval.decoding.precision: 'fp16' is not one of",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=re.escape(f"command-line override: {message}")):
            load_config(None, [override])
    both = ["eval.decoding.compile=true", "eval.decoding.cuda_graph=true"]
    with pytest.raises(ConfigError, match="eval.decoding.compile and eval.decoding.cuda_graph are alternatives"):
        load_config(None, both)
    with pytest.raises(ConfigError, match="eval.decoding.cuda_graph applies to eval.decoding.mode sequential"):
        load_config(None, ["eval.decoding.mode=jacobi", "eval.decoding.cuda_graph=true"])
    path.write_text("eval:\n  guidance:\n    weight: .nan\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: eval.guidance.weight=nan is not a finite number")):
        load_config(path)


@dataclasses.dataclass(frozen=True)
class _Frozen:
    weight: float = 0.0
    blocks: tuple[int, ...] = ()


@dataclasses.dataclass
class _Outer:
    frozen: _Frozen = dataclasses.field(default_factory=_Frozen)
    precision: typing.Literal["fp32", "bf16"] = "fp32"


def test_nested_frozen_sections_take_lists_as_tuples_and_name_bad_items():
    outer = from_dict(_Outer, {"frozen": {"weight": 2, "blocks": [0, 3]}, "precision": "bf16"}, prefix="e.")
    assert outer.frozen == _Frozen(2.0, (0, 3)) and isinstance(outer.frozen.weight, float)
    assert from_dict(_Outer, {"frozen": {"weight": "3e-3"}}).frozen.weight == 0.003  # YAML 1.1's "3e-3" string
    with pytest.raises(ConfigError, match=r"e\.frozen\.blocks\[1\]: expected an integer, got 1\.5"):
        from_dict(_Outer, {"frozen": {"blocks": [0, 1.5]}}, prefix="e.")
    with pytest.raises(ConfigError, match=r"unknown config key e\.frozen\.weigth \(valid keys: blocks, weight\)"):
        from_dict(_Outer, {"frozen": {"weigth": 1}}, prefix="e.")
    with pytest.raises(ConfigError, match=r"e\.frozen: expected a mapping, got 2"):
        from_dict(_Outer, {"frozen": 2}, prefix="e.")
