"""The per-worker training loop: this rank's data stream feeding a DeepSpeed ZeRO engine, run by Ray Train.

Determinism (so a resumed run reproduces an uninterrupted one step by step): model init is seeded identically
on every rank; the data stream restarts at every checkpoint boundary with a seed derived from the step (on the
same loader: its workers persist and prepare the next segment ahead);
noise and label dropout draw from generators seeded by (seed, step, micro-batch, rank); DeepSpeed checkpoints
the optimizer and our lr scheduler.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..artifacts.checkpoints import (
    CONFIG_FILE,
    EMA_FILE,
    adopt_verified,
    check_trusted,
    complete_checkpoints,
    latest_checkpoint,
    read_run_config,
    strip_wrapper_prefixes,
    write_complete_marker,
    write_rank_digests,
)
from ..artifacts.exports import EXPORT_NAME, save_export
from ..artifacts.load import build_model, load_initial_weights
from ..artifacts.weights import CheckpointError
from ..config import ConfigError, RunConfig, dump_config, from_dict
from ..data import DataStats, augment, make_train_loader
from ..models.likelihood import LOG_2, LOG_BIN_WIDTH_8BIT
from ..models.precision import apply_precision
from ..models.tarflow import NULL_LABEL, TarFlow
from ..models.transformer import TransformerLayer
from ..sampling import sample_indices, save_grid
from ..seeding import derive_seed
from .console import ConsoleOptions, apply_worker_settings, held_stdout
from .deepspeed_config import build_deepspeed_config, describe_precision, precision_warning, resolve_precision
from .metrics import MetricsLogger, emit
from .run_state import resume_source, stop_requested
from .schedule import make_scheduler

# Test hook, not a user setting: with TARFLOW_FAULT_AT_STEP=N in the driver's environment the last rank kills its
# own process once at step N (tests/test_training.py checks that a restarted worker group resumes exactly).
# launch() hands the variable to the workers; FAULT_MARKER in run_dir records the kill so a restart runs on.
FAULT_AT_STEP_ENV = "TARFLOW_FAULT_AT_STEP"
FAULT_MARKER = ".fault_injected"
# launch() passes --trust-checkpoint to the workers under this key of the train loop config (not a run setting).
TRUST_KEY = "_trust_checkpoint"
# ... and the checkpoints the driver verified before starting them (artifacts/checkpoints.py verified_signatures):
# rank 0 does not hash a checkpoint again that the driver just hashed and that has not changed since.
VERIFIED_KEY = "_verified_checkpoints"


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops, its last good checkpoint untouched."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; none on biases, norms, embeddings and the prior."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_matrix = param.ndim >= 2 and not name.endswith(("pos_embed", "class_embed", "log_std"))
        (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each Transformer layer in backward (non-reentrant: works under ZeRO-3)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply,
    )

    apply(model, check_fn=lambda module: isinstance(module, TransformerLayer))


class EMA:
    """Exponential moving average of the weights, kept in fp32 on every rank (ZeRO stages 0-2 only)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        # Keys without wrapper prefixes (activation checkpointing), so the shadow loads into a plain TarFlow.
        self.shadow = {k: v.detach().float().clone() for k, v in strip_wrapper_prefixes(model.state_dict()).items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in strip_wrapper_prefixes(model.state_dict()).items():
            self.shadow[key].lerp_(value.float(), 1.0 - self.decay)

    @torch.no_grad()
    def load(self, path: Path) -> None:
        """Restore the shadow from a checkpoint's EMA file, copied into the live shadow tensors: they stay on the
        weights' device in fp32 (safetensors loads onto the CPU, and `update` lerps them with the live weights)."""
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        if loaded.keys() != self.shadow.keys():
            missing, unexpected = sorted(self.shadow.keys() - loaded.keys()), sorted(loaded.keys() - self.shadow.keys())
            raise CheckpointError(
                f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for key, value in loaded.items():
            if value.shape != self.shadow[key].shape:
                raise CheckpointError(
                    f"{path}: {key} has shape {tuple(value.shape)}, the model's is {tuple(self.shadow[key].shape)}"
                )
            self.shadow[key].copy_(value)


def segment_seed(seed: int, first_step: int, checkpoint_every: int, segment: int) -> int:
    """Data seed of a launch's segment-th stream segment: the one starting at checkpoint boundary
    first_step + segment x checkpoint_every (first_step: the launch's first boundary, its data_start)."""
    return derive_seed(seed, "data", first_step + segment * checkpoint_every)


@dataclass
class LoopState:
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    # The data stream: seeded at step `data_start` (a checkpoint_every boundary), `batches_drawn` micro-batches read
    # since. A checkpoint taken between boundaries (a stop request) resumes the stream exactly where it was.
    data_start: int = 0
    batches_drawn: int = 0


def _all_reduce(values: list[float | torch.Tensor], device: torch.device, op=None) -> list[float]:
    """Reduce a few scalars (floats or 0-d tensors, kept on device until here) across ranks; one host sync."""
    import torch.distributed as dist

    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: allocated device memory on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _maybe_inject_fault(config: RunConfig, step: int, rank: int, world: int) -> None:
    """The test hook FAULT_AT_STEP_ENV: the last rank kills its own process once at that step."""
    fault_at = int(os.environ.get(FAULT_AT_STEP_ENV) or 0)
    if fault_at <= 0 or step != fault_at or rank != world - 1:
        return
    marker = Path(config.run_dir) / FAULT_MARKER
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def probe_batch(config: RunConfig, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fixed batch on which the engine logs its log-likelihood at the end, to check exports against."""
    c = config.model
    generator = torch.Generator().manual_seed(derive_seed(config.train.seed, "probe"))
    x = torch.rand(batch, c.in_channels, c.image_size, c.image_size, generator=generator) * 2 - 1
    y = torch.arange(batch) % c.num_classes if c.num_classes else None
    return x, y


def _gathered(engine, config: RunConfig):
    """Full weights on every rank for the duration (a no-op below ZeRO-3). Collective."""
    import deepspeed

    if config.deepspeed.zero_stage != 3:
        return nullcontext()
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))


def _plain_model(engine, config: RunConfig, rank: int) -> TarFlow | None:
    """Rank 0 gets a model with the current weights that runs outside the engine; others get None. Collective.

    Under ZeRO-3 the engine's module fetches its partitioned weights with collectives in every forward hook,
    so a rank-0-only forward would hang: copy the gathered weights into a hook-free model instead.
    """
    if config.deepspeed.zero_stage != 3:
        return engine.module if rank == 0 else None
    with _gathered(engine, config):
        if rank != 0:
            return None
        state = {k: v.detach().clone() for k, v in strip_wrapper_prefixes(engine.module.state_dict()).items()}
    model = build_model(config.model, state, "the engine's gathered ZeRO-3 weights")
    return model.to(next(iter(state.values())).device)


def _save_samples(engine, config: RunConfig, step: int, rank: int, logger: MetricsLogger) -> None:
    """Rank 0 writes a sample grid from the current weights (PNG, and an image in TensorBoard)."""
    model = _plain_model(engine, config, rank)
    if model is None:
        return
    n = config.train.num_samples
    param = next(model.parameters())
    labels = torch.arange(n, device=param.device) % config.model.num_classes if config.model.num_classes else None
    images = sample_indices(model, list(range(n)), seed=config.train.seed, labels=labels)
    save_grid(images, Path(config.run_dir) / "samples" / f"step_{step:08d}.png")
    logger.log_images("samples", images, step)


def configure_precision(model: TarFlow, config: RunConfig, device: torch.device) -> str:
    """Apply the precision policy (docs/gpu.md) to this process and model; returns the resolved precision.

    bf16: only the Transformer trunks autocast to bf16; the module keeps fp32 parameters (DeepSpeed's bf16
    section stays off), so its weights are the fp32 master weights. fp32 on GPU: TF32 matmuls unless
    deepspeed.tf32=false.
    """
    precision = resolve_precision(config)
    apply_precision(model, precision, device, tf32=config.deepspeed.tf32)
    return precision


def master_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights for export; they must be the fp32 master weights (not a bf16-rounded copy)."""
    state = strip_wrapper_prefixes(module.state_dict())
    rounded = sorted(k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32)
    if rounded:
        raise RuntimeError(
            f"the engine's module holds {state[rounded[0]].dtype} weights ({rounded[0]}, ...): exporting them would "
            "not give the fp32 master weights; export the checkpoint with tarflow-export instead"
        )
    return state


def _finish(
    engine, config: RunConfig, state: LoopState, logger: MetricsLogger, rank: int, device, verbose: bool
) -> None:
    """Log the engine's log-likelihood on the probe batch and write the slim export from the live weights (fp32
    master weights: the module's parameters stay fp32 under every precision policy)."""
    x, y = probe_batch(config)
    with torch.no_grad():  # collective under ZeRO-3: every rank runs the probe
        z, log_det = engine(x.to(device), None if y is None else y.to(device))
        probe_log_prob = (engine.module.prior(z) + log_det).float().cpu().tolist()
    logger.log(state.step, {"probe_log_prob": probe_log_prob})
    model = _plain_model(engine, config, rank)
    if model is not None:
        state_dict = master_state_dict(model)
        tag = f"step_{state.step:08d}"
        path = save_export(state_dict, config, Path(config.run_dir) / EXPORT_NAME, "live engine", tag, ema=False)
        if verbose:  # otherwise the driver's summary says where the export is
            emit(f"exported {path}")


def _save_checkpoint(engine, config: RunConfig, state: LoopState, metrics: dict, ema: EMA | None, rank: int) -> Path:
    """Collective: every rank writes its shard, then reports it; Ray merges them into one checkpoint folder."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        client_state = {
            "step": state.step,
            "nonfinite_total": state.nonfinite_total,
            "data_start": state.data_start,
            "batches_drawn": state.batches_drawn,
        }
        engine.save_checkpoint(tmp, tag=f"step_{state.step:08d}", client_state=client_state)
        if rank == 0:
            dump_config(config, Path(tmp) / CONFIG_FILE)
            if ema is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(Path(tmp) / EMA_FILE))
        write_rank_digests(tmp, rank)  # the checksums of this rank's files, hashed here while they are in cache
        name = f"checkpoint_{state.step:08d}"
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    # report() stored this rank's files (synchronous upload); once every rank is past it, seal the folder with
    # every rank's checksums.
    import torch.distributed as dist

    dist.barrier()
    stored = Path(config.run_dir) / name
    if rank == 0 and stored.is_dir():  # run_dir is Ray's storage folder (a local or shared file system)
        write_complete_marker(stored, state.step, dist.get_world_size())
    dist.barrier()  # nobody goes on (or stops) before the checkpoint counts
    return stored


def _chosen_checkpoint(config: RunConfig, rank: int, device: torch.device) -> Path | None:
    """The checkpoint every rank resumes from: the newest intact one of run_dir, else of `train.resume_from`.
    Collective: rank 0 alone verifies the checksums (reading the checkpoint once, not once per rank) and the others
    take the folder it chose."""
    source = resume_source(config)  # run_dir is a local (or mounted) path: launch() resolved it
    if source is None:
        return None
    candidates = complete_checkpoints(source, warn=False) or [source]  # a run directory, or a checkpoint itself
    chosen = candidates.index(latest_checkpoint(source)) if rank == 0 else 0
    (index,) = _all_reduce([float(chosen)], device)
    return candidates[int(index)]


def _resume(
    engine, config: RunConfig, ema: EMA | None, world: int, device: torch.device, trust: bool = False
) -> tuple[LoopState, Path | None]:
    """Continue from the newest intact checkpoint of run_dir (after a failure, or a re-run of the same command:
    the one export and evaluation would pick too), or from `train.resume_from`; fresh state otherwise.

    Ray's own latest checkpoint is not trusted blindly: it may be incomplete (its marker never written) or older
    than the newest complete one (a snapshot lost or damaged); run_dir is the record. DeepSpeed's engine load
    unpickles, so the folder must be the user's own unless `trust` (--trust-checkpoint)."""
    import ray.train
    from ray.train import Checkpoint

    run_dir = Path(config.run_dir)
    folder = _chosen_checkpoint(config, ray.train.get_context().get_world_rank(), device)
    if folder is None:
        if ray.train.get_checkpoint() is not None:
            emit(f"Ray reported a checkpoint, but {run_dir} holds no complete one: starting from step 0")
        return LoopState(), None
    check_trusted(folder, trust)
    checkpoint = Checkpoint.from_directory(str(folder))
    with checkpoint.as_directory() as directory:
        saved = read_run_config(directory)
        if saved.cluster.num_workers != world:
            raise ConfigError(
                f"checkpoint {directory} was written by {saved.cluster.num_workers} ranks but this run has {world}: "
                "a ZeRO checkpoint resumes only at the same cluster.num_workers (export it with tarflow-export "
                "to change the world size)"
            )
        load_path, client_state = engine.load_checkpoint(directory)
        if load_path is None:  # DeepSpeed only warns when `latest` is missing
            raise CheckpointError(f"checkpoint {directory} holds no DeepSpeed engine state ('latest' missing)")
        if ema is not None and (Path(directory) / EMA_FILE).is_file():
            ema.load(Path(directory) / EMA_FILE)
    step = client_state["step"]
    state = LoopState(
        step=step,
        nonfinite_total=client_state.get("nonfinite_total", 0),
        data_start=client_state.get("data_start", step),  # older checkpoints: always taken at a boundary
        batches_drawn=client_state.get("batches_drawn", 0),
    )
    return state, Path(checkpoint.path)


def train_worker(config_dict: dict) -> None:
    """Ray Train's per-worker function; the process group is already initialised by Ray."""
    config_dict = dict(config_dict)
    console = ConsoleOptions.from_dict(config_dict.pop("_console", None))
    trust = bool(config_dict.pop(TRUST_KEY, False))
    adopt_verified(config_dict.pop(VERIFIED_KEY, {}))
    apply_worker_settings(console)
    config: RunConfig = from_dict(RunConfig, config_dict).validate()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config.cluster.use_gpu else "cpu")
    import deepspeed
    import ray.train
    from deepspeed.accelerator import get_accelerator

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = torch.device(get_accelerator().current_device_name())
    train, data = config.train, config.data

    torch.manual_seed(derive_seed(train.seed, "init"))  # identical initial weights on every rank
    model = TarFlow(config.model)
    if train.init_from:  # fine-tuning: these weights, fresh optimizer and schedule; a resume below overrides them
        model.load_state_dict(load_initial_weights(train.init_from, config.model))
    configure_precision(model, config, device)
    if rank == 0:
        emit(describe_precision(config))
        if precision_warning(config):
            emit(f"WARNING: {precision_warning(config)}")
    if config.activation_checkpointing:  # as set, or derived from the memory estimate (config/memory.py)
        apply_activation_checkpointing(model)
    with held_stdout(console):  # DeepSpeed prints op-build notices unconditionally
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, config.optim.weight_decay),
            config=build_deepspeed_config(config),
            lr_scheduler=partial(make_scheduler, optim=config.optim, num_steps=train.num_steps),
            dist_init_required=False,
        )
    if config.deepspeed.compile:
        engine.compile()
    ema = EMA(engine.module, config.optim.ema_decay) if config.optim.ema_decay > 0 else None
    state, resumed_from = _resume(engine, config, ema, world, device, trust)
    # Without --verbose the driver draws the progress from metrics.jsonl: rank 0 writes, but does not print.
    logger = MetricsLogger(config.run_dir, train.num_steps, enabled=rank == 0, echo=console.verbose)
    if resumed_from is not None:  # every segment and every restart after a failure leaves a trace in the log
        logger.note(state.step, {"resumed_from": str(resumed_from)})
    stats = DataStats()
    num_dims = config.model.num_dims
    conditional = config.model.num_classes > 0
    stream, loader, last_metrics = None, None, {}
    # Loss terms accumulate on the device: reading them every micro-step would sync the GPU each time.
    window = {"loss": 0.0, "prior_nll": 0.0, "log_det": 0.0, "count": 0, "start": time.time(), "images": 0}

    while state.step < train.num_steps:
        if loader is None or state.step % train.checkpoint_every == 0:
            # Re-seeded at each checkpoint boundary, so a resumed run sees the same batches; a run resumed between
            # boundaries (after a stop request) replays the stream from its boundary up to where it stopped.
            if state.step % train.checkpoint_every == 0:
                state.data_start, state.batches_drawn = state.step, 0
            if stream is None:  # one loader per launch: each later boundary starts its next segment, on the same
                # worker processes, whose shuffle buffers filled while the previous segment was read
                seeds = partial(segment_seed, train.seed, state.data_start, train.checkpoint_every)
                stream = make_train_loader(data, config.micro_batch_size, rank, world, seeds, stats)
            loader = iter(stream)  # the segment starting at state.data_start
            for _ in range(state.batches_drawn):
                next(loader)
        _maybe_inject_fault(config, state.step, rank, world)
        # A stop request (SIGINT/SIGTERM on the driver) rides on the finiteness vote of the step's last micro-step:
        # every rank learns it from a collective it runs anyway, and only rank 0 reads the (shared) run_dir.
        stop = False
        for micro in range(config.grad_accum_steps):
            last_micro = micro == config.grad_accum_steps - 1
            attempt = 0
            while True:
                images, labels = next(loader)
                state.batches_drawn += 1
                generator = torch.Generator().manual_seed(derive_seed(train.seed, state.step, micro, rank, attempt))
                # fp32 under every policy: a bf16 input would round uniform dequantization back onto a lattice.
                x = augment(images, data.noise, data.noise_std, generator).to(device=device, dtype=torch.float32)
                y = None
                if conditional:
                    drop = torch.rand(labels.shape, generator=generator) < train.label_dropout
                    y = torch.where(drop, torch.full_like(labels, NULL_LABEL), labels).to(device)
                z, log_det = engine(x, y)
                prior_log_prob = engine.module.prior(z)
                prior_nll = -prior_log_prob.mean() / num_dims
                log_det_per_dim = log_det.mean() / num_dims
                loss = prior_nll - log_det_per_dim  # -log p(x) / D, nats
                # Every rank must agree, or the ZeRO collectives in backward would deadlock.
                asks_stop = float(last_micro and rank == 0 and stop_requested(config.run_dir))
                num_finite, stop_votes = _all_reduce([torch.isfinite(loss.detach()), asks_stop], device)  # one sync
                stop = stop_votes > 0
                if num_finite == world:
                    state.nonfinite_in_a_row = 0
                    break
                state.nonfinite_total += 1
                state.nonfinite_in_a_row += 1
                attempt += 1
                if rank == 0:
                    emit(f"step {state.step + 1}: non-finite loss, batch skipped ({state.nonfinite_total} so far)")
                if state.nonfinite_in_a_row >= train.max_nonfinite_in_a_row:
                    raise NonFiniteLossError(
                        f"{state.nonfinite_in_a_row} non-finite losses in a row at step {state.step + 1} "
                        f"(train.max_nonfinite_in_a_row={train.max_nonfinite_in_a_row}); the last good checkpoint "
                        f"in {config.run_dir} is untouched. Lower optim.lr or raise data.noise_std."
                    )
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.detach()
            window["prior_nll"] += prior_nll.detach()
            window["log_det"] += log_det_per_dim.detach()
            window["count"] += 1
        window["images"] += train.global_batch_size
        state.step += 1
        if ema is not None:
            ema.update(engine.module)

        is_last = state.step == train.num_steps
        if state.step % train.log_every == 0 or is_last:
            count = window["count"]
            loss_sum, prior_sum, log_det_sum, skipped = _all_reduce(
                [window["loss"], window["prior_nll"], window["log_det"], float(stats.skipped)], device
            )
            elapsed = time.time() - window["start"]
            import torch.distributed as dist

            (peak_mb,) = _all_reduce([peak_memory_mb(device)], device, op=dist.ReduceOp.MAX)
            grad_norm = engine.get_global_grad_norm()
            loss_mean = loss_sum / (count * world)
            last_metrics = {
                "loss": loss_mean,
                "prior_nll": prior_sum / (count * world),
                "log_det": log_det_sum / (count * world),
                # Dequantized 8-bit convention; with Gaussian noise this is the noisy-data NLL.
                "bits_per_dim": (loss_mean - LOG_BIN_WIDTH_8BIT) / LOG_2,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": scheduler.get_last_lr()[0],
                "images_per_s": window["images"] / elapsed if elapsed > 0 else float("nan"),
                "skipped_samples": int(skipped),
                "nonfinite_steps": state.nonfinite_total,
                "peak_mem_mb": peak_mb,  # the largest over ranks
            }
            logger.log(state.step, last_metrics)
            window = {"loss": 0.0, "prior_nll": 0.0, "log_det": 0.0, "count": 0, "start": time.time(), "images": 0}
        if (train.sample_every and state.step % train.sample_every == 0) or is_last:
            _save_samples(engine, config, state.step, rank, logger)
        if state.step % train.checkpoint_every == 0 or is_last or stop:
            saved = _save_checkpoint(engine, config, state, {"step": state.step, **last_metrics}, ema, rank)
        if stop and not is_last:
            if rank == 0:
                emit(f"stopped on request at step {state.step}; final checkpoint: {saved}")
            logger.close()
            return
    _finish(engine, config, state, logger, rank, device, console.verbose)
    logger.close()
    if not math.isfinite(last_metrics.get("loss", 0.0)):
        raise NonFiniteLossError("training ended with a non-finite loss")
