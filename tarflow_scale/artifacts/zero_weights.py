"""The fp32 weights of a DeepSpeed ZeRO checkpoint (stage 1, 2 or 3), read without running any pickled code.

DeepSpeed's own consolidation (`deepspeed.utils.zero_to_fp32`) and its engine load the engine-state files with
`torch.load(weights_only=False)`, so a `__reduce__` planted in a shared checkpoint runs in whoever opens it. This
reader gives the same state dict as `get_fp32_state_dict_from_zero_checkpoint` (tests compare them on real ZeRO
1/2/3 checkpoints) through torch's weights-only unpickler: tensors, containers and plain values, plus three DeepSpeed
objects the files are known to hold, each read as an inert stand-in defined here (never DeepSpeed's class, so no
DeepSpeed code runs and DeepSpeed need not be installed). Anything else in a file is refused, naming the file.

Layout (DeepSpeed 0.19): `TAG/*_model_states.pt` (one per data-parallel rank under ZeRO-3, else one) holds the
parameter shapes in flat-group order, buffers, shared and frozen parameters; `TAG/*_optim_states.pt` (one per rank)
holds that rank's fp32 master partition of every parameter group.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import torch

from .weights import CheckpointError

MODEL_STATES_GLOB = "*_model_states.pt"
OPTIM_STATES_GLOB = "*_optim_states.pt"
# A DeepSpeed tag (the `latest` file's content) is one folder name inside the checkpoint: never a path elsewhere.
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class DeepSpeedRecord:
    """An inert stand-in for a DeepSpeed object inside an engine-state file (its attributes, no behaviour)."""


class ZeroStage(int):
    """DeepSpeed's ZeroStageEnum, read as its number."""


# The DeepSpeed globals that engine-state files hold, by the name pickle records, and what each is read as.
STAND_INS = (
    (DeepSpeedRecord, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),  # the optimizer's (unused) loss scale
    (DeepSpeedRecord, "deepspeed.utils.tensor_fragment.fragment_address"),  # ZeRO-1/2 parameter group bookkeeping
    (ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
)


def load_tensors(path: Path) -> dict:
    """A `.pt` file through torch's weights-only unpickler (CPU, memory-mapped); CheckpointError naming the file
    when it holds anything else (a planted `__reduce__` is refused before it can run)."""
    try:
        with torch.serialization.safe_globals(list(STAND_INS)):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler met something other than tensors and values
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ["?"]
        # torch's message is a page of advice; the line that says what was refused is the one to show
        why = next((line.split("error:", 1)[1].strip() for line in lines if "Unpickler error:" in line), lines[0])
        raise CheckpointError(
            f"{path} is not plain DeepSpeed engine state ({why.split(' was not an allowed global')[0][:200]}): "
            "refused unread, since unpickling it could run code planted in it"
        ) from None
    except Exception as e:  # truncated or damaged: torch's zip reader, EOFError, ...
        raise CheckpointError(f"{path} is not a readable engine-state file: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not DeepSpeed engine state")
    return state


def engine_state_dir(checkpoint_dir: Path) -> Path:
    """The folder of the engine state a checkpoint's `latest` file names (a plain name inside the checkpoint)."""
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{checkpoint_dir} holds no DeepSpeed engine state ('latest' missing)")
    tag = latest.read_text().strip()
    if not _TAG.fullmatch(tag) or tag == "..":
        raise CheckpointError(f"{latest} names {tag[:80]!r}, not an engine-state folder inside {checkpoint_dir}")
    folder = checkpoint_dir / tag
    if not folder.is_dir():
        raise CheckpointError(f"{latest} names {tag}, but {folder} does not exist")
    return folder


def _natural_sorted(paths: list[Path]) -> list[Path]:
    """Rank order (zero_pp_rank_10 after zero_pp_rank_9), as DeepSpeed sorts them."""
    return sorted(paths, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def _files(folder: Path, pattern: str) -> list[Path]:
    found = _natural_sorted(list(folder.glob(pattern)))
    if not found:
        raise CheckpointError(f"{folder} has no {pattern} files: not a DeepSpeed ZeRO checkpoint")
    return found


def _numel(shape) -> int:
    return math.prod(shape)


def read_zero_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO 1/2/3 checkpoint folder (the one holding `latest`): buffers, frozen and
    trainable parameters from the fp32 master partitions, shared parameters; what DeepSpeed's
    `get_fp32_state_dict_from_zero_checkpoint` returns, read with the weights-only unpickler."""
    folder = engine_state_dir(Path(checkpoint_dir))
    model_files = _files(folder, MODEL_STATES_GLOB)
    models = [load_tensors(f) for f in model_files]
    for path, state in zip(model_files, models):
        if not {"buffer_names", "param_shapes", "module", "shared_params"} <= state.keys():
            raise CheckpointError(f"{path} is not a DeepSpeed model-states file")
    optim_files = _files(folder, OPTIM_STATES_GLOB)
    groups, stage, world = [], None, None
    for path in optim_files:
        optim = load_tensors(path).get("optimizer_state_dict")
        if not isinstance(optim, dict) or "zero_stage" not in optim:
            raise CheckpointError(f"{path} is not a ZeRO optimizer shard")
        stage, count = int(optim["zero_stage"]), optim["partition_count"]
        world = max(count) if isinstance(count, list) else int(count)  # ZeRO-2 records one count per group
        key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        if key not in optim:
            raise CheckpointError(f"{path}: ZeRO stage {stage} shard without its fp32 master weights ({key})")
        groups.append((list(optim[key]), optim.get("param_alignment_paddings")))
    if world != len(optim_files):
        raise CheckpointError(
            f"{folder} holds {len(optim_files)} optimizer shards but was written by {world} ranks: a rank's shard "
            "is missing or left over from another save"
        )
    first = models[0]
    buffers = {k: v for k, v in first["module"].items() if k in first["buffer_names"]}
    state = {k: v.float() if v.is_floating_point() else v for k, v in buffers.items()}
    frozen = first.get("frozen_param_shapes") or {}
    if stage == 3:
        for name, shape in frozen.items():
            parts = torch.cat([m["frozen_param_fragments"][name] for m in models])
            state[name] = parts[: _numel(shape)].view(shape).clone()
        state.update(_zero3_params(first["param_shapes"], [g for g, _ in groups], folder))
    elif stage in (1, 2):
        for name in frozen:
            state[name] = first["frozen_param_fragments"][name].clone()
        state.update(_zero12_params(first["param_shapes"], [g for g, _ in groups], groups[0][1], world, folder))
    else:
        raise CheckpointError(f"{optim_files[0]}: unknown ZeRO stage {stage}")
    for name, source in first["shared_params"].items():
        if source in state:
            state[name] = state[source]
    return state


def _zero12_params(param_shapes, rank_groups, paddings, world: int, folder: Path) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: each group is one flat vector split across the ranks in rank order; parameters lie in it in
    `param_shapes` order, each followed by its alignment padding, the whole padded to a multiple of 2 x world."""
    state = {}
    align = 2 * world
    for index, shapes in enumerate(param_shapes):
        flat = torch.cat([groups[index] for groups in rank_groups])
        offset = 0
        group_paddings = paddings[index] if paddings is not None else None
        if group_paddings is not None and len(group_paddings) != len(shapes):
            listed = f"{len(group_paddings)} paddings for {len(shapes)} tensors"
            raise CheckpointError(f"{folder}: group {index} lists {listed}")
        for k, (name, shape) in enumerate(shapes.items()):
            n = _numel(shape)
            state[name] = flat.narrow(0, offset, n).view(shape)
            offset += n + (group_paddings[k] if group_paddings is not None else 0)
        if align * math.ceil(offset / align) != align * math.ceil(flat.numel() / align):
            raise CheckpointError(f"{folder}: group {index} holds {flat.numel()} values, its tensors {offset}")
    return state


def _zero3_params(param_shapes, rank_groups, folder: Path) -> dict[str, torch.Tensor]:
    """ZeRO-3: every parameter is split across the ranks (padded to a multiple of world), each rank's parts
    concatenated in `param_shapes` order across its groups."""
    world = len(rank_groups)
    flats = [torch.cat(groups) for groups in rank_groups]  # (per-rank numel,)
    if len({flat.numel() for flat in flats}) != 1:
        raise CheckpointError(f"{folder}: the ranks' shards differ in size: {[flat.numel() for flat in flats]}")
    shapes = {name: shape for group in param_shapes for name, shape in group.items()}
    state, offset = {}, 0
    for name, shape in shapes.items():
        n = _numel(shape)
        part = math.ceil(n / world)
        pieces = [flat[offset : offset + part] for flat in flats]
        state[name] = torch.cat(pieces)[:n].view(shape)
        offset += part
    if offset != flats[0].numel():
        raise CheckpointError(f"{folder}: each rank holds {flats[0].numel()} values, its tensors {offset}")
    return state
