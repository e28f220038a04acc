"""Import reference TarFlow checkpoints (apple/ml-tarflow `Model` state_dicts) into exact tarflow_scale exports.

The reference format, and how each piece maps (docs/interop.md has the full table):

* `blocks.K.proj_in`, `blocks.K.attn_blocks.L.{attention.{norm,qkv,proj}, mlp.{norm,main.0,main.2}}` map one to one
  onto `blocks.K.proj_in`, `blocks.K.layers.L.{attn_norm, attn.qkv, attn.proj, mlp_norm, mlp.0, mlp.2}` (same
  head split of qkv, same fp32 LayerNorms, exact GELU, MLP x4, head size 64).
* `blocks.K.pos_embed` (T, C): the reference permutes it together with the tokens, so an odd (reversed) block adds
  row T-1-t at block position t; ours adds row t at block position t: odd blocks are flipped on import.
* `blocks.K.class_embed` (N, 1, C) -> (N, C) with model.null_label=mean (the reference's null vector is the mean).
* `blocks.K.proj_out` (C -> 2D, rows [all log-scales | all shifts]) -> ours (rows interleaved per dimension:
  2d = log-scale, 2d + 1 = shift). Same affine step z = (x - b) exp(-a). A shift-only head (nvp=False, C -> D)
  maps as is onto model.transform=shift (z = x - b). The reference has no LayerNorm before the head:
  model.final_norm=false.
* `var` (T, D): the prior variance the reference scales its sampling noise with -> model.prior=learned with
  log_std = log(var)/2 (model.prior=standard when var is all ones, as for every nvp=True model).
* `blocks.K.attn_mask`: the causal mask, implied by our attention; checked, not stored.

Log-determinants: the reference reports each block's mean over the T x D dimensions; ours is the sum in nats, so
reference_log_det = ours / num_dims (`reference_log_det`). The training noise comes from the file name
(`<dataset>_model_<patch>_<channels>_<blocks>_<layers>_<noise|uniform>.pth`) and is recorded in the export's run
config, so `tarflow-eval` denoises with the right sigma.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..artifacts.exports import save_export
from ..artifacts.load import build_model
from ..artifacts.weights import CheckpointError, file_sha256
from ..config import RunConfig, TarFlowConfig, from_dict, parse_overrides
from ..config.loading import merge_trees
from ..models.tarflow import unpatchify

FORMAT_NAME = "ml-tarflow"
REFERENCE_HEAD_DIM = 64  # the reference MetaBlock's fixed attention head size
FILENAME = re.compile(
    r"^(?P<dataset>.+?)_model_(?P<patch>\d+)_(?P<channels>\d+)_(?P<blocks>\d+)_(?P<layers>\d+)_"
    r"(?P<noise>uniform|\d+(?:\.\d+)?)$"
)
_BLOCK_KEYS = {"proj_in.weight", "proj_in.bias", "pos_embed", "class_embed", "proj_out.weight", "proj_out.bias",
               "attn_mask"}  # fmt: skip
# Per Transformer layer: reference sub-key -> our sub-key under blocks.K.layers.L.
_LAYER_KEYS = {
    "attention.norm.weight": "attn_norm.weight",
    "attention.norm.bias": "attn_norm.bias",
    "attention.qkv.weight": "attn.qkv.weight",
    "attention.qkv.bias": "attn.qkv.bias",
    "attention.proj.weight": "attn.proj.weight",
    "attention.proj.bias": "attn.proj.bias",
    "mlp.norm.weight": "mlp_norm.weight",
    "mlp.norm.bias": "mlp_norm.bias",
    "mlp.main.0.weight": "mlp.0.weight",
    "mlp.main.0.bias": "mlp.0.bias",
    "mlp.main.2.weight": "mlp.2.weight",
    "mlp.main.2.bias": "mlp.2.bias",
}
_KEY = re.compile(r"^blocks\.(\d+)\.(?:attn_blocks\.(\d+)\.)?(.+)$")
# Prefixes wrappers add to every key: DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class FileNameFacts:
    dataset: str
    patch_size: int
    channels: int
    num_blocks: int
    layers_per_block: int
    noise: str  # "gaussian" | "uniform"
    noise_std: float


def parse_filename(path: str | Path) -> FileNameFacts | None:
    """The architecture and training noise in a reference checkpoint's name, or None when it does not follow it."""
    m = FILENAME.match(Path(path).stem)
    if m is None:
        return None
    uniform = m["noise"] == "uniform"
    return FileNameFacts(
        m["dataset"], int(m["patch"]), int(m["channels"]), int(m["blocks"]), int(m["layers"]),
        "uniform" if uniform else "gaussian", 0.0 if uniform else float(m["noise"]),
    )  # fmt: skip


def reference_log_det(log_det: Tensor, num_dims: int) -> Tensor:
    """Our log|det| (sum over dimensions, nats) in the reference's convention (sum over blocks of the per-block
    mean over dimensions)."""
    return log_det / num_dims


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A reference checkpoint's tensors (weights only: no pickled code runs), wrapper prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"reference checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable PyTorch state_dict: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _check_keys(state: dict[str, Tensor], path: Path) -> tuple[int, int]:
    """(num_blocks, layers_per_block); the first key the reference format does not have is an error."""
    blocks: dict[int, set[int]] = {}
    for key in state:  # in file order: "first unknown key" is the one the user sees first in the file
        if key == "var":
            continue
        m = _KEY.match(key)
        ok = m is not None and (m[3] in _LAYER_KEYS if m[2] is not None else m[3] in _BLOCK_KEYS)
        if not ok:
            raise CheckpointError(
                f"{path}: unknown key {key!r} for an {FORMAT_NAME} TarFlow state_dict (expected var, "
                "blocks.K.{proj_in,pos_embed,class_embed,attn_mask,proj_out} and "
                "blocks.K.attn_blocks.L.{attention.{norm,qkv,proj},mlp.{norm,main.0,main.2}})"
            )
        layers = blocks.setdefault(int(m[1]), set())
        if m[2] is not None:
            layers.add(int(m[2]))
    if not blocks:
        raise CheckpointError(f"{path}: no blocks.K.* keys: not an {FORMAT_NAME} TarFlow state_dict")
    num_blocks = max(blocks) + 1
    num_layers = max(max(v, default=-1) for v in blocks.values()) + 1
    for k in range(num_blocks):
        required = ["proj_in.weight", "proj_in.bias", "pos_embed", "proj_out.weight", "proj_out.bias"]
        required += [f"attn_blocks.{j}.{s}" for j in range(num_layers) for s in _LAYER_KEYS]
        for sub in required:
            if f"blocks.{k}.{sub}" not in state:
                raise CheckpointError(f"{path}: missing key 'blocks.{k}.{sub}'")
    if "var" not in state:
        raise CheckpointError(f"{path}: missing key 'var' (the reference Model's prior variance buffer)")
    return num_blocks, num_layers


def infer_run_config(state: dict[str, Tensor], path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The run config (model section + training noise) an imported checkpoint implies; `overrides` are dotted
    RunConfig keys for what shapes and the file name cannot tell (model.in_channels, data.noise_std, data.path)."""
    path = Path(path)
    user = parse_overrides(overrides or [])
    user_model = user.get("model", {})
    num_blocks, num_layers = _check_keys(state, path)
    C, D = state["blocks.0.proj_in.weight"].shape
    T = state["blocks.0.pos_embed"].shape[0]
    facts = parse_filename(path)
    in_channels = int(user_model.get("in_channels", 3))
    if "patch_size" in user_model:
        patch = int(user_model["patch_size"])
    elif facts is not None:
        patch = facts.patch_size
    else:
        patch = math.isqrt(D // in_channels)
    side = math.isqrt(T)
    if D != in_channels * patch * patch or side * side != T:
        raise CheckpointError(
            f"{path}: tokens of {D} values in a sequence of {T} do not fit {in_channels} channels with patch size "
            f"{patch} on a square image; pass model.in_channels=... / model.patch_size=..."
        )
    head_rows = state["blocks.0.proj_out.weight"].shape[0]
    if head_rows not in (D, 2 * D):
        raise CheckpointError(f"{path}: blocks.0.proj_out has {head_rows} outputs, expected {2 * D} (nvp) or {D}")
    num_classes = state["blocks.0.class_embed"].shape[0] if "blocks.0.class_embed" in state else 0
    if facts is not None:
        named = {"channels": facts.channels, "num_blocks": facts.num_blocks, "layers_per_block": facts.layers_per_block}
        found = {"channels": C, "num_blocks": num_blocks, "layers_per_block": num_layers}
        wrong = [f"{k}: name {named[k]}, tensors {found[k]}" for k in named if named[k] != found[k]]
        if wrong:
            raise CheckpointError(f"{path}: the file name disagrees with its tensors ({'; '.join(wrong)})")
    var = state["var"]
    model = {
        "image_size": side * patch, "in_channels": in_channels, "patch_size": patch, "channels": C,
        "num_blocks": num_blocks, "layers_per_block": num_layers, "head_dim": REFERENCE_HEAD_DIM, "mlp_ratio": 4.0,
        "num_classes": num_classes, "null_label": "mean", "transform": "affine" if head_rows == 2 * D else "shift",
        "prior": "standard" if bool((var == 1).all()) else "learned", "final_norm": False, "mixer": "none",
    }  # fmt: skip
    data: dict[str, Any] = {"path": ""}  # unknown dataset: evaluation asks for data.path before reading data
    if facts is not None:
        data.update(noise=facts.noise, noise_std=facts.noise_std if facts.noise == "gaussian" else 0.05)
    user_data = user.get("data", {})
    if facts is None and "noise" not in user_data and "noise_std" not in user_data:
        raise CheckpointError(
            f"{path}: cannot read the training noise from the file name (expected "
            "<dataset>_model_<patch>_<channels>_<blocks>_<layers>_<noise std|uniform>.pth); pass data.noise_std=SIGMA "
            "(Gaussian noise augmentation) or data.noise=uniform"
        )
    tree = merge_trees({"model": model, "data": data}, user)
    if "noise_std" in user_data and "noise" not in user_data:
        tree["data"]["noise"] = "gaussian"  # a sigma given for a renamed file means Gaussian augmentation
    # Evaluate what needs no data by default; bits/dim and FID once data.path says where the data is.
    tree.setdefault("eval", {}).setdefault("jobs", ["bpd", "sample"] if tree["data"]["path"] else ["sample"])
    tree.setdefault("train", {}).setdefault("label_dropout", 0.1 if num_classes else 0.0)
    config = from_dict(RunConfig, tree)
    config.model.validate()
    config.data.validate()
    return config


def convert_state(state: dict[str, Tensor], config: TarFlowConfig) -> dict[str, Tensor]:
    """Reference tensors -> our state_dict for a TarFlow with `config` (the model section `infer_run_config` built)."""
    c = config
    D, T = c.token_dim, c.num_tokens
    out: dict[str, Tensor] = {}
    for k in range(c.num_blocks):
        src, dst = f"blocks.{k}.", f"blocks.{k}."
        reverse = k % 2 == 1  # the reference alternates identity / flip, starting with identity
        out[dst + "proj_in.weight"] = state[src + "proj_in.weight"]
        out[dst + "proj_in.bias"] = state[src + "proj_in.bias"]
        pos = state[src + "pos_embed"]
        out[dst + "pos_embed"] = pos.flip(0) if reverse else pos
        if c.num_classes:
            out[dst + "class_embed"] = state[src + "class_embed"].reshape(c.num_classes, c.channels)
        mask = state.get(src + "attn_mask")
        if mask is not None and not torch.equal(mask.bool(), torch.ones(T, T, dtype=torch.bool).tril()):
            raise CheckpointError(f"{src}attn_mask is not the causal (lower-triangular) mask of {T} tokens")
        for j in range(c.layers_per_block):
            for ref_key, our_key in _LAYER_KEYS.items():
                out[f"{dst}layers.{j}.{our_key}"] = state[f"{src}attn_blocks.{j}.{ref_key}"]
        weight, bias = state[src + "proj_out.weight"], state[src + "proj_out.bias"]
        if c.transform == "affine":  # rows [log-scales | shifts] -> interleaved (a_0, b_0, a_1, b_1, ...)
            out[dst + "proj_out.weight"] = torch.stack([weight[:D], weight[D:]], dim=1).reshape(2 * D, c.channels)
            out[dst + "proj_out.bias"] = torch.stack([bias[:D], bias[D:]], dim=1).reshape(2 * D)
        else:  # shift-only (nvp=False): one parameter per dimension, the same row order
            out[dst + "proj_out.weight"], out[dst + "proj_out.bias"] = weight, bias
    if c.prior == "learned":
        var = state["var"].double()
        if not bool((var > 0).all()):
            raise CheckpointError("var has non-positive entries: not a variance")
        log_std = unpatchify((0.5 * var.log()).unsqueeze(0), c.patch_size, c.in_channels, c.image_size)[0]
        out["prior.log_std"] = log_std.float()
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def import_checkpoint(src: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    """`tarflow-import ml-tarflow SRC OUT.safetensors [key=value ...]`: convert, check strictly, write the export."""
    src = Path(src)
    state = read_state_dict(src)
    run_config = infer_run_config(state, src, overrides)
    converted = convert_state(state, run_config.model)
    del state  # peak memory: the reference tensors, their converted copy, one model (a 450M-parameter model: ~5.4 GB)
    build_model(run_config.model, converted, str(src))  # strict: every key and shape
    extra = {
        "imported_from": FORMAT_NAME,
        "source_sha256": file_sha256(src),
        "reference_nvp": str(run_config.model.transform == "affine").lower(),
    }
    source = f"{FORMAT_NAME}:{src.resolve()}"
    return save_export(converted, run_config, out, source=source, tag="imported", ema=False, extra=extra)


__all__ = [
    "FORMAT_NAME",
    "convert_state",
    "import_checkpoint",
    "infer_run_config",
    "parse_filename",
    "read_state_dict",
    "reference_log_det",
]
