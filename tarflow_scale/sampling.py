"""Sampling: per-sample seeded noise (the same image for the same index whatever the batch or worker count),
labels and guidance, the Tweedie denoising step, uint8 images and grids; `sample_images` does it in one call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .atomic import atomic_path
from .config import Decoding, Guidance
from .models.decoding import DecodingStats
from .models.precision import precision_scope
from .models.tarflow import TarFlow

# Large odd multiplier so (seed, index) pairs map to well-separated generator seeds.
_SEED_STRIDE = 1_000_003
# Images per Tweedie forward+backward when sampling: the backward pass keeps the score's activations.
DENOISE_BATCH_SIZE = 16


def per_sample_noise(indices: list[int] | Tensor, shape: tuple[int, ...], seed: int, device=None, dtype=None) -> Tensor:
    """Standard-normal noise (N, *shape): row k depends only on (seed, indices[k])."""
    rows = []
    for index in torch.as_tensor(indices).tolist():
        generator = torch.Generator().manual_seed(seed * _SEED_STRIDE + int(index))
        rows.append(torch.randn(shape, generator=generator))
    return torch.stack(rows).to(device=device, dtype=dtype)


def sample_indices(
    model: TarFlow,
    indices: list[int] | Tensor,
    seed: int,
    labels: Tensor | None = None,
    guidance: Guidance | None = None,
    decoding: Decoding | str | None = None,
    stats: DecodingStats | None = None,
) -> Tensor:
    """Images in [-1, 1]-ish model space for the given sample indices (B, C, H, W); see TarFlow.inverse for
    `guidance`, `decoding` and `stats`."""
    c = model.config
    param = next(model.parameters())
    eps = per_sample_noise(indices, (c.in_channels, c.image_size, c.image_size), seed, param.device, param.dtype)
    return model.sample(eps, y=labels, guidance=guidance, decoding=decoding, stats=stats)


@contextlib.contextmanager
def _frozen(model: TarFlow) -> Iterator[None]:
    """The model's parameters do not require grad for the duration; those that did do again after."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def score(model: TarFlow, x: Tensor, y: Tensor | None = None, precision: str | None = None) -> Tensor:
    """grad_x log p(x | y), (B, C, H, W), by autograd through the exact flow likelihood.

    The per-sample log-densities are summed before differentiating: sample b's log p depends only on x[b], so
    the gradient of the sum is every sample's own score. Runs with grad enabled even under `torch.no_grad()`.
    The parameters are frozen for the call (and restored after: not for a model another thread is training), so
    autograd keeps only what the gradient w.r.t. x needs, not each Linear's input for a weight gradient.
    `precision` ("fp32", "tf32", "bf16": models/precision.py `precision_scope`) for the call; None: as set.
    """
    with torch.enable_grad(), _frozen(model), precision_scope(model, precision, x.device):
        x = x.detach().requires_grad_(True)
        log_p = model.log_prob(x, y).sum()
        (grad,) = torch.autograd.grad(log_p, x)
    return grad.to(x.dtype)


def tweedie_denoise(
    model: TarFlow,
    x: Tensor,
    noise_std: float,
    y: Tensor | None = None,
    step: float = 1.0,
    batch_size: int = 0,
    precision: str | None = None,
) -> Tensor:
    """One Tweedie step x + step * sigma^2 * grad_x log p(x), (B, C, H, W) -> (B, C, H, W).

    When p is the density of x = x0 + sigma * eps (the model learned noisy data) and step = 1, this is exactly the
    posterior mean E[x0 | x] (Tweedie's formula; TarFlow §2.4). `step` scales the move (0: identity).

    `batch_size` > 0 runs the forward+backward over at most that many images at a time: the backward pass keeps
    the activations the score needs, about 1.9 GiB per 64x64 image for the paper's model in fp32 (docs/gpu.md), so
    a whole sampling chunk would not fit a GPU. Each image's score depends only on that image, so the result equals
    the unbatched call. `precision`: the score's (see `score`); evaluation and `sample_images` pass the sampling
    precision.
    """
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0 (0: all at once), got {batch_size}")
    size = batch_size or x.shape[0]
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], size):
        part = slice(start, start + size)
        y_part = None if y is None else y[part]
        out[part] = (x[part] + step * noise_std**2 * score(model, x[part], y_part, precision)).detach()
    return out


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 pixels (values outside are clipped; NaN becomes mid-grey)."""
    images = torch.nan_to_num(images.float(), nan=0.0, posinf=1.0, neginf=-1.0)
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a PNG grid of images (B, C, H, W): floats in [-1, 1], or uint8 pixels."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1
    nrow = nrow or max(1, int(len(images) ** 0.5))
    with atomic_path(path, suffix=".png") as tmp:  # save_image picks the format from the suffix
        save_image(images.float().clamp(-1, 1), tmp, nrow=nrow, normalize=True, value_range=(-1, 1))
    return path


def resolve_labels(labels: Sequence[int] | Tensor | int | str | None, num: int, num_classes: int) -> Tensor | None:
    """Labels (num,) int64 for a sampling call, or None for an unconditional draw.

    `labels`: None; "balanced" (sample k gets class k mod num_classes); one class for every sample; or one class
    per sample. Errors name the bad value.
    """
    if labels is None:
        return None
    if not num_classes:
        raise ValueError("labels were given but the model is unconditional (model.num_classes=0)")
    if isinstance(labels, str):
        if labels != "balanced":
            raise ValueError(f"labels={labels!r}: pass 'balanced', a class index or one class per sample")
        return torch.arange(num) % num_classes
    if isinstance(labels, int):
        labels = [labels] * num
    out = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if len(out) != num:
        raise ValueError(f"{len(out)} labels for {num} samples (give one per sample, one class, or 'balanced')")
    bad = out[(out < 0) | (out >= num_classes)]
    if len(bad):
        raise ValueError(f"class {int(bad[0])} is outside [0, {num_classes}) for this model")
    return out


def sample_images(
    model: TarFlow | str | Path,
    num: int,
    *,
    labels: Sequence[int] | Tensor | int | str | None = None,
    guidance: Guidance | None = None,
    decoding: Decoding | str | None = None,
    denoise: bool | None = None,
    noise_std: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    denoise_batch_size: int = DENOISE_BATCH_SIZE,
) -> Tensor:
    """Draw `num` images in one call: uint8 (num, C, H, W).

    `model` is a TarFlow or the path of an export / checkpoint folder / run directory (loaded on `device`, CPU by
    default). Sample k depends only on (seed, k, its label and the settings), not on `batch_size`.
    `labels`: see `resolve_labels`; guidance on a class-conditional model needs them. `guidance` and `decoding`
    (a Decoding or a mode name: "sequential", "jacobi", "gs_jacobi") go to TarFlow.inverse (docs/sampling.md).
    `denoise`: one Tweedie step with the training noise (TarFlow §2.4); None denoises exactly when the model was
    trained with Gaussian noise, whose std is read from the checkpoint (or given as `noise_std` with a model
    object); its score runs at `decoding`'s precision. `on_batch(done, num)` is called after each batch (progress).

    >>> images = sample_images("runs/tiny/model.safetensors", 8, seed=1)   # doctest: +SKIP
    """
    if num < 1:
        raise ValueError(f"num={num} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if isinstance(model, (str, Path)):
        from .artifacts import load_model, read_provenance

        trained_with = read_provenance(model).noise
        if noise_std is None and trained_with.noise == "gaussian":
            noise_std = trained_with.noise_std
        model = load_model(model, device or "cpu")
    elif device is not None:
        model = model.to(device)
    model.eval()
    c = model.config
    y_all = resolve_labels(labels, num, c.num_classes)
    guidance = guidance or Guidance()
    decoding = Decoding.of(decoding)
    if guidance.active and c.num_classes and y_all is None and guidance.attn_temp == 1.0:
        raise ValueError(
            f"guidance={guidance.weight} on a class-conditional model ({c.num_classes} classes) needs labels: pass "
            f"labels=[...] (one class per sample), labels=C (every sample class C) or labels='balanced' "
            f"(sample k gets class k mod {c.num_classes}); on the command line --class C [C ...] or --balanced"
        )
    if denoise is None:
        denoise = bool(noise_std)
    if denoise and not noise_std:
        raise ValueError(
            "denoise=True needs the training noise std: pass noise_std=..., or a checkpoint path whose run was "
            "trained with data.noise=gaussian"
        )
    param = next(model.parameters())
    out = []
    for start in range(0, num, batch_size):
        indices = list(range(start, min(num, start + batch_size)))
        y = None if y_all is None else y_all[indices].to(param.device)
        x = sample_indices(model, indices, seed, y, guidance, decoding)
        if denoise:
            x = tweedie_denoise(
                model, x, float(noise_std), y, batch_size=denoise_batch_size, precision=decoding.precision
            )
        out.append(to_uint8(x).cpu())
        if on_batch is not None:
            on_batch(indices[-1] + 1, num)
    return torch.cat(out)
