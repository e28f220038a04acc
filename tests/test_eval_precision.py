"""Evaluation precision and memory: the Tweedie score with frozen parameters (exact, smaller autograd state), the
precision each job runs at (sampling and the score at eval.decoding.precision, bits/dim at eval.bpd_precision,
strict fp32 by default), the policy's scope (restores the model and the TF32 flags), and its record in
metrics.json (evaluation/precision.py)."""

from __future__ import annotations

import math

import pytest
import torch
from test_eval import CLASSES, SIZE, dataset, load_split, random_model  # noqa: F401 (dataset: a fixture)

from tarflow_scale.config import ConfigError, DataConfig, EvalConfig, RunConfig, load_config, to_dict
from tarflow_scale.evaluation.bpd import batch_bits_per_dim
from tarflow_scale.evaluation.precision import job_precision
from tarflow_scale.evaluation.worker import EvalWorker
from tarflow_scale.models.precision import apply_precision, precision_scope
from tarflow_scale.sampling import score, tweedie_denoise

# |bits/dim with a bf16 trunk - strict fp32| per image (bits/dim ~8.5 on these Gaussian 8x8 images): bf16 matmuls
# carry ~3 significant digits into the transform parameters, the flow maths stays fp32; the training policy's
# tolerance (tests/test_precision.py). Measured here: max 1.4e-3, mean 7e-4 bits/dim.
BPD_TOLERANCE = 5e-3
# |Tweedie step with a bf16 trunk - fp32|: bf16 rounds each trunk op to 2^-9 relative; the score's trunk part
# moves by about that, so the step's move by under 2% of its largest value, and far below an 8-bit level (2/255).
# Measured: 0.45% of the move, 1.7e-4 absolute.
DENOISE_RELATIVE_TOLERANCE = 0.02
DENOISE_ABSOLUTE_TOLERANCE = 1e-3


def _saved_activation_bytes(model: torch.nn.Module, fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values())


def _unfrozen_score(model, x, y) -> torch.Tensor:
    """The score as autograd gives it with every parameter requiring grad (what `score` did before freezing)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model.log_prob(x, y).sum(), x)
    return grad


def test_score_freezes_the_parameters_exactly_and_saves_no_linear_inputs():
    """The frozen score equals autograd's unfrozen gradient w.r.t. x bit for bit (float64); no parameter gets a
    gradient; the caller's requires_grad flags come back; and autograd no longer keeps each Linear's input (kept
    only for a weight gradient): the saved activations shrink by at least those bytes (measured: by 40%)."""
    model = random_model(num_classes=CLASSES).double()
    x = 0.5 * torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, -1])  # a null label too
    model.blocks[1].pos_embed.requires_grad_(False)  # a parameter the caller froze stays frozen
    reference = _unfrozen_score(model, x, y)
    assert all(p.grad is None for p in model.parameters())

    during: list[bool] = []
    block = model.blocks[0]
    hook = block.register_forward_hook(lambda *_: during.append(any(p.requires_grad for p in block.parameters())))
    got = score(model, x, y)
    hook.remove()
    assert torch.equal(got, reference) and got.abs().max() > 0
    assert during == [False]
    assert all(p.grad is None for p in model.parameters())
    assert [name for name, p in model.named_parameters() if not p.requires_grad] == ["blocks.1.pos_embed"]

    linear_input_bytes = 0

    def count_input(module, inputs, output):
        nonlocal linear_input_bytes
        linear_input_bytes += inputs[0].numel() * inputs[0].element_size()

    hooks = [m.register_forward_hook(count_input) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    frozen = _saved_activation_bytes(model, lambda: score(model, x, y))
    for h in hooks:
        h.remove()
    assert linear_input_bytes > 0
    unfrozen = _saved_activation_bytes(model, lambda: _unfrozen_score(model, x, y))
    assert unfrozen - frozen >= linear_input_bytes, (unfrozen, frozen, linear_input_bytes)
    assert frozen <= 0.65 * unfrozen


def test_tweedie_step_at_the_sampling_precision():
    """precision=None and "fp32" give today's step bit for bit; bf16 (the trunk under bf16 autocast, the score and
    the step in fp32) stays within the stated tolerance and leaves the model as it found it."""
    model = random_model(seed=3, num_classes=CLASSES)
    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(16, 3, SIZE, SIZE, generator=g)
    y = torch.arange(16) % CLASSES
    fp32 = tweedie_denoise(model, x, 0.05, y)
    assert torch.equal(tweedie_denoise(model, x, 0.05, y, precision="fp32"), fp32)
    assert torch.equal(tweedie_denoise(model, x, 0.05, y, batch_size=5, precision="tf32"), fp32)  # CPU: no TF32
    bf16 = tweedie_denoise(model, x, 0.05, y, batch_size=5, precision="bf16")
    assert bf16.dtype == torch.float32
    gap, move = (bf16 - fp32).abs().max(), (fp32 - x).abs().max()
    assert 0 < gap <= DENOISE_RELATIVE_TOLERANCE * move and gap <= DENOISE_ABSOLUTE_TOLERANCE, (gap, move)
    assert all(block.trunk_dtype is None for block in model.blocks)
    with pytest.raises(ValueError, match="precision='fp16' is not one of fp32, bf16, tf32"):
        tweedie_denoise(model, x, 0.05, y, precision="fp16")


def test_precision_scope_applies_the_training_policy_and_restores_the_model_and_flags():
    """One policy (models/precision.py) for training and evaluation; a scope restores the trunk dtype and the
    process's TF32 flags (set here on a CPU machine: the flags are plain switches)."""
    model = random_model()
    cuda = torch.device("cuda")  # apply_precision only sets flags for a CUDA device; nothing runs on it here
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        apply_precision(model, "fp32", cuda, tf32=True)  # the trainer's fp32 policy: TF32 matmuls
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        model.set_trunk_dtype(torch.bfloat16)
        expected = {"fp32": (None, False), "tf32": (None, True), "bf16": (torch.bfloat16, False)}
        for precision, (trunk, tf32) in expected.items():
            with precision_scope(model, precision, cuda):
                assert all(block.trunk_dtype == trunk for block in model.blocks), precision
                assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
            assert all(block.trunk_dtype == torch.bfloat16 for block in model.blocks)
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with precision_scope(model, None, cuda):
            assert model.blocks[0].trunk_dtype == torch.bfloat16 and torch.backends.cuda.matmul.allow_tf32
        with pytest.raises(RuntimeError, match="inside"), precision_scope(model, "fp32", cuda):
            raise RuntimeError("inside")
        assert model.blocks[0].trunk_dtype == torch.bfloat16 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _worker(model, data_path: str, **eval_fields) -> EvalWorker:
    config = RunConfig(
        model=model.config,
        data=DataConfig(path=data_path, num_workers=0),
        eval=EvalConfig(batch_size=64, **eval_fields),
    )
    payload = {"model_config": to_dict(model.config), "state": model.state_dict(), "source": "test"}
    return EvalWorker(payload, to_dict(config), use_gpu=False, threads=1)


def test_bits_per_dim_stays_strict_fp32_unless_overridden(dataset):  # noqa: F811 (the fixture)
    """An evaluation worker's bits/dim equals today's fp32 computation bit for bit by default; only
    eval.bpd_precision=bf16 moves it, within BPD_TOLERANCE; the job leaves the worker's model as it was."""
    model = random_model(seed=2, num_classes=CLASSES)
    images, labels, keys = load_split(dataset, "val")
    kinds = [("dequantized", "uniform", 0.0)]
    today = batch_bits_per_dim(model, images, labels, keys, kind="uniform", num_draws=1, seed=0).numpy()

    default = _worker(model, dataset).bpd_part(0, 1, kinds)
    assert default["keys"] == keys and (default["values"]["dequantized"] == today).all()
    bf16_worker = _worker(model, dataset, bpd_precision="bf16")
    bf16 = bf16_worker.bpd_part(0, 1, kinds)["values"]["dequantized"]
    gap = abs(bf16 - today)
    assert 0 < gap.max() < BPD_TOLERANCE, gap.max()
    assert all(block.trunk_dtype is None for block in bf16_worker.model.blocks)
    assert all(math.isfinite(v) for v in bf16)


def test_eval_precision_settings_and_their_record():
    e = load_config(overrides=["eval.decoding.precision=bf16"]).eval
    assert e.bpd_precision == "fp32"  # bits/dim's default is not the sampling precision
    assert job_precision("bpd", e, denoised=False) == {"likelihood": "fp32"}
    assert job_precision("sample", e, denoised=False) == {"sampling": "bf16"}
    assert job_precision("denoise", e, denoised=True) == {"sampling": "bf16", "tweedie_score": "bf16"}
    assert job_precision("fid", e, denoised=True) == {"sampling": "bf16", "tweedie_score": "bf16", "features": "fp32"}
    assert job_precision("fid", e, denoised=False) == {"sampling": "bf16", "features": "fp32"}
    assert job_precision("fid_stats", e, denoised=False) == {"features": "fp32"}
    override = load_config(overrides=["eval.bpd_precision=bf16"]).eval
    assert job_precision("bpd", override, denoised=False)["likelihood"] == "bf16"
    assert "approximation" in job_precision("bpd", override, denoised=False)["note"]
    with pytest.raises(ConfigError, match="eval.bpd_precision"):
        load_config(overrides=["eval.bpd_precision=fp16"])


def test_sample_images_denoises_at_the_decoding_precision(monkeypatch):
    """`sample_images` (and `tarflow-sample`, which calls it) runs the Tweedie step at `decoding.precision`, and
    leaves the caller's model trainable and without gradients."""
    from tarflow_scale import sampling
    from tarflow_scale.config import Decoding

    seen: list[str | None] = []
    denoise = sampling.tweedie_denoise
    monkeypatch.setattr(
        sampling, "tweedie_denoise", lambda *a, **kw: seen.append(kw.get("precision")) or denoise(*a, **kw)
    )
    model = random_model(seed=1)
    images = sampling.sample_images(model, 3, decoding=Decoding(precision="bf16"), noise_std=0.05, batch_size=2)
    assert images.shape == (3, 3, SIZE, SIZE) and seen == ["bf16", "bf16"]
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(block.trunk_dtype is None for block in model.blocks)
