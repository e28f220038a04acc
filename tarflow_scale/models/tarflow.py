"""The TarFlow model: patchify, a stack of autoregressive flow blocks, a Gaussian prior (arXiv 2412.06329).

Forward (data -> noise) is one causal Transformer pass per block. The inverse (sampling) solves each block's
triangular system token by token with a KV cache; faster decoders of the same system are in models/decoding/.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import Decoding, Guidance, TarFlowConfig
from .decoding import DecodingStats, block_decoder, cache_dtype, matmul_precision
from .likelihood import bits_per_dim
from .mixing import build_mixer
from .priors import GaussianPrior
from .transformer import KVCache, LayerNorm32, TransformerLayer
from .transforms import TokenTransform, build_transform

NULL_LABEL = -1  # label value meaning "no class": unconditional sampling, or a label dropped in training


def trunk_autocast(x: Tensor, dtype: torch.dtype | None):
    """Autocast for a block's Transformer trunk: matmuls and attention in `dtype` (bf16 policy); None leaves the
    ambient autocast state alone. fp64 inputs are never autocast (torch skips doubles), so float64 tests stay exact.
    """
    return nullcontext() if dtype is None else torch.autocast(x.device.type, dtype=dtype)


def no_autocast(x: Tensor):
    """The flow's own maths (transforms, log-dets, mixers) never runs in reduced precision."""
    return torch.autocast(x.device.type, enabled=False)


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, T, D) with T = (H/p)(W/p) patches in raster order and D = C p^2."""
    B, C, H, W = x.shape
    p = patch_size
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: Tensor, patch_size: int, channels: int, image_size: int) -> Tensor:
    """Exact inverse of `patchify`: (B, T, D) -> (B, C, H, W)."""
    B = tokens.shape[0]
    p, n = patch_size, image_size // patch_size
    x = tokens.reshape(B, n, n, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/p, p, W/p, p)
    return x.reshape(B, channels, image_size, image_size)


@dataclass(frozen=True)
class Conditioning:
    """What every Transformer pass of one block inverse shares. Guided, the batch has 2B rows: the conditional ones
    (the samples' labels, attention temperature 1), then the guiding ones (null label, `guidance.attn_temp`)."""

    label: Tensor | float  # (rows, 1, C) label embedding; 0.0 for an unconditional model
    attn_temp: Tensor | None  # (rows,) attention temperature of each row; None: 1 everywhere
    guidance: Guidance
    rows: int


class FlowBlock(nn.Module):
    """One autoregressive flow block: z_t = f(x_t; theta_t(x_<t)) along this block's token order.

    The block's order is the identity or the reversed sequence (alternating over blocks, TarFlow Sec. 2.2),
    so every token gets to condition on every other across the stack. A causal Transformer reads the tokens;
    its outputs are shifted one position right, so token t's parameters depend only on tokens < t and token 0
    gets zero parameters, i.e. the identity. That keeps the Jacobian triangular in block order and its
    log-determinant the plain sum of per-element log-derivatives.
    """

    def __init__(self, config: TarFlowConfig, transform: TokenTransform, reverse_order: bool):
        super().__init__()
        C, D, T = config.channels, config.token_dim, config.num_tokens
        self.config = config
        self.transform = transform
        self.reverse_order = reverse_order
        # Precision policy (docs/gpu.md): the dtype the Transformer trunk autocasts to (None: the input's dtype).
        # Infrastructure, not architecture: set by TarFlow.set_trunk_dtype, never stored in a checkpoint.
        self.trunk_dtype: torch.dtype | None = None
        self.proj_in = nn.Linear(D, C)
        self.pos_embed = nn.Parameter(torch.randn(T, C) * 0.02)
        if config.num_classes:
            num_rows = config.num_classes + (1 if config.null_label == "learned" else 0)
            self.class_embed = nn.Parameter(torch.randn(num_rows, C) * 0.02)
        self.layers = nn.ModuleList(
            TransformerLayer(C, config.head_dim, config.mlp_ratio) for _ in range(config.layers_per_block)
        )
        # model.final_norm=false: no LayerNorm (and no state-dict keys) between the Transformer and the head.
        self.norm_out = LayerNorm32(C) if config.final_norm else nn.Identity()
        self.proj_out = nn.Linear(C, D * transform.num_params)
        # Zero (or near-zero) output projection: every block starts at the identity map (stable deep stacks).
        transform.init_head(self.proj_out)

    def permute(self, tokens: Tensor) -> Tensor:
        """Into (and, being an involution, back out of) this block's token order."""
        return tokens.flip(1) if self.reverse_order else tokens

    def label_embedding(self, y: Tensor | None, batch: int, like: Tensor) -> Tensor | float:
        """(B, 1, C) class vectors; NULL_LABEL rows get the learned null vector or the classes' mean."""
        if not self.config.num_classes:
            if y is not None:
                raise ValueError("labels given to an unconditional model (model.num_classes=0)")
            return 0.0
        num_classes = self.config.num_classes
        if self.config.null_label == "learned":
            null = self.class_embed[num_classes]
        else:
            null = self.class_embed[:num_classes].mean(0)
        if y is None:
            return null.to(like.dtype).expand(batch, 1, -1)
        if y.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(y.shape)}")
        is_null = (y == NULL_LABEL).unsqueeze(-1)
        rows = self.class_embed[y.clamp(min=0)]
        return torch.where(is_null, null, rows).to(like.dtype).unsqueeze(1)

    def _embed(self, tokens: Tensor, positions: slice | Tensor, label: Tensor | float) -> Tensor:
        """Tokens (B, L, D) at `positions` (a slice or L indices) -> the Transformer's input (B, L, C)."""
        return self.proj_in(tokens) + self.pos_embed[positions].to(tokens.dtype) + label

    def _head(self, h: Tensor) -> Tensor:
        """Transformer output (B, L, C) -> transform parameters (B, L, D, P)."""
        return self.proj_out(self.norm_out(h)).unflatten(-1, (self.config.token_dim, self.transform.num_params))

    def transform_params(self, x: Tensor, y: Tensor | None = None, attn_temp: Tensor | None = None) -> Tensor:
        """Parameters of every token's transform from a full causal pass. x: (B, T, D) in block order.

        Returns (B, T, D, P) in x's dtype; row t depends only on x[:, :t] (row 0 is zero). Under the bf16 policy
        the trunk's matmuls run in bf16 while the residual stream h stays fp32 (bf16 outputs add onto fp32).
        """
        with trunk_autocast(x, self.trunk_dtype):
            h = self._embed(x, slice(None), self.label_embedding(y, x.shape[0], x))
            for layer in self.layers:
                h = layer(h, attn_temp)
            params = self._head(h)
        params = params.to(x.dtype)  # the transform's parameters enter the flow maths at full precision
        # TarFlow Sec. 3: the shift by one keeps the Jacobian triangular; token 0 gets the identity.
        return torch.cat([torch.zeros_like(params[:, :1]), params[:, :-1]], dim=1)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, T, D) tokens -> z (B, T, D), log|det dz/dx| (B,) in nats."""
        x = self.permute(x)
        params = self.transform_params(x, y)
        with no_autocast(x):  # flow state, transform and log-det keep the input's precision (fp32)
            z, log_det = self.transform.forward(x, params)
        return self.permute(z), log_det.flatten(1).sum(1)

    def inverse(
        self,
        z: Tensor,
        y: Tensor | None = None,
        guidance: Guidance | None = None,
        cache: KVCache | None = None,
        decoder: Callable[..., tuple[Tensor, int]] | None = None,
    ) -> tuple[Tensor, int]:
        """Exact inverse z (B, T, D) -> x (B, T, D), and the number of Transformer passes it took.

        Guidance (TarFlow Sec. 2.5): the transform's parameters become p_c + w_t (p_c - p_u) (Guidance.weight_at);
        for an unconditional model both passes differ only by the attention temperature. `cache` (from
        TarFlow.inverse, one per sampling call) must have this call's batch rows (2B when guided); None allocates
        one. `decoder(block, z, cond, cache) -> (x, passes)` solves the system in block order: None is
        `decode_sequential`, models/decoding.block_decoder gives the others.
        """
        guidance = guidance or Guidance()
        z = self.permute(z)
        cond = self.conditioning(y, z.shape[0], guidance, z)
        if cache is None:
            cache = self.allocate_cache(cond.rows, z)
        x, passes = (decoder or FlowBlock.decode_sequential)(self, z, cond, cache)
        return self.permute(x), passes

    def decode_sequential(self, z: Tensor, cond: Conditioning, cache: KVCache) -> tuple[Tensor, int]:
        """Token by token in block order: x_0 = z_0 (the identity), then x_{t+1} = f^-1(z_{t+1}; theta(x_<=t)), the
        parameters from one cached single-token pass each (T - 1 passes)."""
        T = z.shape[1]
        x = z.clone()
        for t in range(T - 1):
            params = self.predict(x[:, t : t + 1], t, cond, cache)[:, 0]  # parameters of token t + 1
            x[:, t + 1] = self.transform.inverse(z[:, t + 1], params)
        return x, T - 1

    def conditioning(self, y: Tensor | None, batch: int, guidance: Guidance, like: Tensor) -> Conditioning:
        """Labels and attention temperatures of the Transformer passes of an inverse of `batch` samples."""
        if not guidance.active:
            return Conditioning(self.label_embedding(y, batch, like), None, guidance, batch)
        labels = None
        if self.config.num_classes:
            uncond = torch.full((batch,), NULL_LABEL, device=like.device)
            labels = torch.cat([y if y is not None else uncond, uncond])
        ones = torch.ones(batch, device=like.device, dtype=like.dtype)
        temps = torch.cat([ones, ones * guidance.attn_temp])
        return Conditioning(self.label_embedding(labels, 2 * batch, like), temps, guidance, 2 * batch)

    def allocate_cache(self, batch: int, like: Tensor) -> KVCache:
        c = self.config
        return KVCache.allocate(len(self.layers), batch, c.channels // c.head_dim, c.num_tokens, c.head_dim, like)

    def predict(self, tokens: Tensor, start: int | Tensor, cond: Conditioning, cache: KVCache) -> Tensor:
        """Transform parameters (B, L, D, P) of tokens start + 1 .. start + L from x's tokens [start, start + L)
        (B, L, D) and the cached ones before them: embed, the cached Transformer, the head, guidance. The pass of
        every decoder; `start` a 0-d tensor gives the static-shape pass (TransformerLayer.cached)."""
        L, dtype = tokens.shape[1], tokens.dtype
        guided = cond.guidance.active
        if isinstance(start, Tensor):
            positions = start.view(1) + torch.arange(L, device=start.device)
        else:
            positions = slice(start, start + L)
        h = self._embed(torch.cat([tokens, tokens]) if guided else tokens, positions, cond.label)
        for index, layer in enumerate(self.layers):
            h = layer.cached(h, start, cache, index, cond.attn_temp)
        params = self._head(h).to(dtype)  # bf16 head outputs: guidance and the transform run in the state's dtype
        if not guided:
            return params
        if isinstance(start, Tensor):
            produced = (positions + 1).to(dtype).view(1, L, 1, 1)  # indices of the tokens these parameters invert
        elif L == 1:
            produced = start + 1  # a Python number, so the eager sequential sampler computes w_t in double
        else:
            produced = torch.arange(start + 1, start + L + 1, device=tokens.device, dtype=dtype).view(1, L, 1, 1)
        weight = cond.guidance.weight_at(produced, self.config.num_tokens)
        return self.transform.guide(*params.chunk(2), weight)


class TarFlow(nn.Module):
    """Transformer autoregressive flow over image patches, with an exact log-likelihood and exact sampling.

    Loading, saving and the Hugging Face Hub: tarflow_scale.artifacts (`load_model`, `PretrainedTarFlow`).

    >>> model = TarFlow(TarFlowConfig(image_size=8, patch_size=2, channels=32, num_blocks=2))
    >>> x = torch.randn(4, 3, 8, 8)
    >>> z, log_det = model(x)            # z (4, 3, 8, 8); log_det (4,) in nats
    >>> torch.allclose(model.inverse(z), x, atol=1e-5)
    True
    """

    def __init__(self, config: TarFlowConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transform = build_transform(config)
        self.blocks = nn.ModuleList(
            FlowBlock(config, self.transform, reverse_order=bool(k % 2)) for k in range(config.num_blocks)
        )
        # mixers[k] mixes each token's features between blocks k and k + 1 (token-wise, so the next block's
        # autoregressive structure is untouched). Empty for model.mixer=none: no state-dict keys, so the paper's
        # architecture (and an imported reference checkpoint) loads with strict=True.
        mixers = (
            build_mixer(config.mixer, config.token_dim, config.mixer_factors, seed=k)
            for k in range(config.num_blocks - 1)
        )
        self.mixers = nn.ModuleList(m for m in mixers if m is not None)
        shape = (config.in_channels, config.image_size, config.image_size)
        self.prior = GaussianPrior(shape, learned=config.prior == "learned")

    @property
    def num_dims(self) -> int:
        return self.config.num_dims

    def set_trunk_dtype(self, dtype: torch.dtype | None) -> TarFlow:
        """Precision policy: run every block's Transformer trunk under autocast to `dtype` (torch.bfloat16 for the
        bf16 policy), or in the input's dtype (None). Parameters, the flow state between blocks, transforms,
        log-determinants, mixers and the prior keep the input's dtype (fp32) either way. Applies to `forward`
        (training, bits/dim, the Tweedie score); sampling precision is the sampler's choice (Decoding.precision)."""
        for block in self.blocks:
            block.trunk_dtype = dtype
        return self

    def _check_input(self, x: Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, C, H, W) -> z (B, C, H, W), log|det dz/dx| (B,) in nats, summed over all blocks and mixers."""
        self._check_input(x)
        c = self.config
        tokens = patchify(x, c.patch_size)
        log_det = torch.zeros(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        for k, block in enumerate(self.blocks):
            tokens, block_log_det = block(tokens, y)
            log_det = log_det + block_log_det
            if k < len(self.mixers):
                with no_autocast(tokens):
                    tokens, mixer_log_det = self.mixers[k](tokens)
                log_det = log_det + mixer_log_det
        return unpatchify(tokens, c.patch_size, c.in_channels, c.image_size), log_det

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x) in nats per sample (B,): log N(z) + log|det dz/dx| (change of variables)."""
        z, log_det = self(x, y)
        return self.prior(z) + log_det

    def bits_per_dim(self, x: Tensor, y: Tensor | None = None, log_bin_width: float | None = None) -> Tensor:
        """(B,) bits per dimension; pass LOG_BIN_WIDTH_8BIT for dequantized 8-bit data in [-1, 1]."""
        return bits_per_dim(self.log_prob(x, y), self.num_dims, log_bin_width)

    @torch.no_grad()
    def inverse(
        self,
        z: Tensor,
        y: Tensor | None = None,
        guidance: Guidance | None = None,
        decoding: Decoding | str | None = None,
        stats: DecodingStats | None = None,
    ) -> Tensor:
        """Exact inverse of `forward`: z (B, C, H, W) -> x (B, C, H, W), the last block first.

        guidance: None is plain sampling (FlowBlock.inverse). decoding: how each block is solved and at which
        precision (a Decoding, or a mode name with default options; None: sequential in fp32); the flow state,
        transforms and mixers stay in z's dtype. One KV cache serves every block of the call. stats: if given, the
        model passes of each block are added to it.
        """
        self._check_input(z)
        guidance = guidance or Guidance()
        decoding = Decoding.of(decoding)
        decoding.check(self, z.device.type)
        c = self.config
        tokens = patchify(z, c.patch_size)
        rows = 2 * z.shape[0] if guidance.active else z.shape[0]
        cache_like = tokens.new_empty((), dtype=cache_dtype(decoding.precision, z.dtype))
        cache = self.blocks[0].allocate_cache(rows, cache_like)
        if stats is not None:
            stats.num_tokens = c.num_tokens
            stats.calls += 1
        for k in reversed(range(len(self.blocks))):
            if k < len(self.mixers):
                tokens = self.mixers[k].inverse(tokens)
            with matmul_precision(decoding.precision, z.device.type):
                tokens, passes = self.blocks[k].inverse(tokens, y, guidance, cache, block_decoder(decoding, k))
            if stats is not None:
                stats.add(k, passes)
        return unpatchify(tokens, c.patch_size, c.in_channels, c.image_size)

    @torch.no_grad()
    def sample(
        self,
        n_or_z: int | Tensor,
        y: Tensor | None = None,
        guidance: Guidance | None = None,
        decoding: Decoding | str | None = None,
        generator: torch.Generator | None = None,
        stats: DecodingStats | None = None,
    ) -> Tensor:
        """Draw images: z ~ prior (or the standard-normal noise given as `n_or_z`, scaled by the prior), then invert.

        A class-conditional model guided (guidance.weight != 0) needs labels `y`: without them the guiding pass
        would extrapolate the null label against itself. (Without labels, attention-temperature guidance,
        attn_temp != 1, is still meaningful: the null-label model against itself at another temperature.)
        """
        c = self.config
        guidance = guidance or Guidance()
        if guidance.active and c.num_classes and y is None and guidance.attn_temp == 1.0:
            raise ValueError(
                f"guidance={guidance.weight} on a class-conditional model ({c.num_classes} classes) needs labels: pass "
                f"y=torch.tensor([...]) (one class per sample), or class-balanced ones, y=torch.arange(n) % "
                f"{c.num_classes} (tarflow_scale.sampling.sample_images(..., labels='balanced') does this)"
            )
        if isinstance(n_or_z, int):
            param = next(self.parameters())
            shape = (n_or_z, c.in_channels, c.image_size, c.image_size)
            eps = torch.randn(shape, generator=generator, device=param.device, dtype=param.dtype)
        else:
            eps = n_or_z
        return self.inverse(self.prior.scale(eps), y, guidance, decoding, stats)
