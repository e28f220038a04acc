"""The TarFlow model: patchify, a stack of autoregressive flow blocks, a Gaussian prior (arXiv 2412.06329)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import Tensor, nn

from ..config import TarFlowConfig
from .decoding import Decoding, DecodingStats, cache_dtype, check_precision, matmul_precision
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

    def _head(self, h: Tensor) -> Tensor:
        """Transformer output (B, T', C) -> transform parameters (B, T', D, P)."""
        return self.proj_out(self.norm_out(h)).unflatten(-1, (self.config.token_dim, self.transform.num_params))

    def transform_params(self, x: Tensor, y: Tensor | None = None, attn_temp: Tensor | None = None) -> Tensor:
        """Parameters of every token's transform from a full causal pass. x: (B, T, D) in block order.

        Returns (B, T, D, P) in x's dtype; row t depends only on x[:, :t] (row 0 is zero). Under the bf16 policy
        the trunk's matmuls run in bf16 while the residual stream h stays fp32 (bf16 outputs add onto fp32).
        """
        with trunk_autocast(x, self.trunk_dtype):
            h = self.proj_in(x) + self.pos_embed.to(x.dtype) + self.label_embedding(y, x.shape[0], x)
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

    def guided_batch(
        self, y: Tensor | None, batch: int, guidance: float, attn_temp: float, like: Tensor
    ) -> tuple[Tensor | None, Tensor | None, int]:
        """Labels, per-sample attention temperatures and batch size of the Transformer passes of an inverse.

        With guidance w != 0 the conditional pass (labels y, temperature 1) and the guiding pass (null labels,
        temperature `attn_temp`) run as one batch of 2B.
        """
        if guidance == 0.0:
            return y, None, batch
        labels = None
        if self.config.num_classes:
            uncond = torch.full((batch,), NULL_LABEL, device=like.device)
            labels = torch.cat([y if y is not None else uncond, uncond])
        ones = torch.ones(batch, device=like.device, dtype=like.dtype)
        return labels, torch.cat([ones, ones * attn_temp]), 2 * batch

    def inverse(
        self,
        z: Tensor,
        y: Tensor | None = None,
        guidance: float = 0.0,
        guidance_annealed: bool = False,
        attn_temp: float = 1.0,
        decoding: str | Decoding | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, int]:
        """Exact inverse z (B, T, D) -> x (B, T, D), and the number of model passes it took.

        Guidance: the transform's parameters become p_c + w_t (p_c - p_u), with w_t = w (t / (T - 1)) when
        annealed; for an unconditional model both passes differ only by the attention temperature (TarFlow
        Sec. 2.5). `decoding` picks sequential / jacobi / gs_jacobi (models/decoding.py); the block's own index is
        not known here, so `sequential_blocks` is applied by TarFlow.inverse. `cache` (from TarFlow.inverse, one
        per sampling call) must have exactly this call's batch rows (2B when guided); None allocates one.
        """
        options = Decoding.of(decoding)
        z = self.permute(z)
        B, T, _ = z.shape
        labels, temps, batch = self.guided_batch(y, B, guidance, attn_temp, z)
        if cache is None:
            cache = self.allocate_cache(batch, z)
        cond_embed = self.label_embedding(labels, batch, z)
        if options.mode == "sequential" and options.cuda_graph:
            x, passes = self._inverse_graphed(z, cond_embed, temps, guidance, guidance_annealed, cache)
        elif options.mode == "sequential" and options.compile:
            x, passes = self._inverse_static(z, cond_embed, temps, guidance, guidance_annealed, cache)
        elif options.mode == "sequential":
            x, passes = self._inverse_sequential(z, cond_embed, temps, guidance, guidance_annealed, cache)
        else:
            segment = T - 1 if options.mode == "jacobi" else options.segment_size
            x, passes = self._inverse_jacobi(z, cond_embed, temps, guidance, guidance_annealed, cache, segment, options)
        return self.permute(x), passes

    def allocate_cache(self, batch: int, like: Tensor) -> KVCache:
        c = self.config
        return KVCache.allocate(len(self.layers), batch, c.channels // c.head_dim, c.num_tokens, c.head_dim, like)

    def _guide(self, params: Tensor, guided: bool, weight: Tensor | float, dtype: torch.dtype) -> Tensor:
        """Raw head outputs of the (cond, guiding) batch -> the transform's parameters, in the flow's dtype."""
        params = params.to(dtype)  # bf16 head outputs: guidance and the transform run in the state's precision
        return self.transform.guide(*params.chunk(2), weight) if guided else params

    def _inverse_sequential(self, z, cond_embed, temps, guidance, guidance_annealed, cache) -> tuple[Tensor, int]:
        """Token by token with the KV cache, attending to the slice [0, t] (the fewest reads in eager mode)."""
        T = z.shape[1]
        guided = guidance != 0.0
        x = z.clone()  # x[:, 0] = z[:, 0]: token 0 is the identity
        for t in range(T - 1):
            token = x[:, t : t + 1]
            if guided:
                token = torch.cat([token, token])
            h = self.proj_in(token) + self.pos_embed[t].to(z.dtype) + cond_embed
            for index, layer in enumerate(self.layers):
                h = layer.step(h, t, cache, index, temps)
            weight = guidance * (t + 1) / (T - 1) if guidance_annealed else guidance
            params = self._guide(self._head(h)[:, 0], guided, weight, z.dtype)  # parameters of token t + 1
            x[:, t + 1] = self.transform.inverse(z[:, t + 1], params)
        return x, T - 1

    def static_step(
        self,
        token: Tensor,
        z_next: Tensor,
        pos: Tensor,
        cond_embed: Tensor | float,
        temps: Tensor | None,
        cache: KVCache,
        guidance: float,
        guidance_annealed: bool,
    ) -> Tensor:
        """x_{pos+1} from x_pos (token, (B, 1, D)) and z_{pos+1} (B, D), with the same shapes at every position:
        `pos` is a 0-d int64 tensor and the cache is read under a mask, so torch.compile builds one graph (and a
        GPU can capture it as one CUDA graph) for all T - 1 positions."""
        T = self.config.num_tokens
        if guidance != 0.0:
            token = torch.cat([token, token])
        h = self.proj_in(token) + self.pos_embed.index_select(0, pos.view(1)).to(z_next.dtype) + cond_embed
        for index, layer in enumerate(self.layers):
            h = layer.step_static(h, pos, cache, index, temps)
        weight = guidance * (pos + 1).to(z_next.dtype) / (T - 1) if guidance_annealed else guidance
        params = self._guide(self._head(h)[:, 0], guidance != 0.0, weight, z_next.dtype)
        return self.transform.inverse(z_next, params)

    def _inverse_static(self, z, cond_embed, temps, guidance, guidance_annealed, cache) -> tuple[Tensor, int]:
        """Sequential decoding through the compiled static-shape step (Decoding.compile)."""
        step = torch.compile(self.static_step, dynamic=False)
        T = z.shape[1]
        x = z.clone()
        positions = torch.arange(T, device=z.device)
        for t in range(T - 1):
            x[:, t + 1] = step(x[:, t : t + 1], z[:, t + 1], positions[t], cond_embed, temps, cache, guidance,
                               guidance_annealed)  # fmt: skip
        return x, T - 1

    def _inverse_graphed(self, z, cond_embed, temps, guidance, guidance_annealed, cache) -> tuple[Tensor, int]:
        """Sequential decoding with `static_step` captured once as a CUDA graph (Decoding.cuda_graph) and replayed
        at every position: its inputs are copied into fixed buffers, and the cache, weights, labels and
        temperatures keep their addresses for the whole block, which is what replay requires."""
        if not self.transform.closed_form_inverse:
            raise ValueError(
                f"decoding cuda_graph needs a closed-form token inverse; {type(self.transform).__name__} inverts "
                "by iteration with a host-side stopping test (use compile=True or the eager sampler)"
            )
        if z.device.type != "cuda":
            raise ValueError(f"decoding cuda_graph needs a CUDA device; the flow state is on {z.device}")
        T = z.shape[1]
        x = z.clone()
        token, z_next = x[:, :1].clone(), z[:, 1].clone()
        pos = torch.zeros((), dtype=torch.int64, device=z.device)

        def step() -> Tensor:
            return self.static_step(token, z_next, pos, cond_embed, temps, cache, guidance, guidance_annealed)

        # Under bf16 sampling, autocast's cache of cast weights must be off while capturing: cached copies made
        # during capture are freed when the cache clears, and replays would read freed memory.
        bf16 = torch.is_autocast_enabled("cuda")
        autocast = torch.autocast("cuda", torch.get_autocast_dtype("cuda"), cache_enabled=False) if bf16 else None
        side = torch.cuda.Stream(z.device)  # warm-up off the capturing stream, as CUDA graph capture requires
        side.wait_stream(torch.cuda.current_stream(z.device))
        with torch.cuda.stream(side), autocast or nullcontext():
            step()  # position 0: writes the cache slot that the first replay writes again
        torch.cuda.current_stream(z.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), autocast or nullcontext():
            out = step()
        for t in range(T - 1):
            token.copy_(x[:, t : t + 1])
            z_next.copy_(z[:, t + 1])
            pos.fill_(t)
            graph.replay()
            x[:, t + 1] = out
        return x, T - 1

    def _inverse_jacobi(
        self, z, cond_embed, temps, guidance, guidance_annealed, cache, segment_size: int, options: Decoding
    ) -> tuple[Tensor, int]:
        """Gauss-Seidel over segments of input positions, Jacobi inside each (models/decoding.py).

        Input positions [a, b) produce the parameters of tokens [a + 1, b + 1) (the one-token shift). x[a] is
        final when the segment starts (token 0, or solved by the previous segment); iteration k makes token
        a + k final, so b - a iterations are exact and the keys/values left in the cache for [a, b) come from
        final (or, after an early stop, within-tol) inputs. Iteration k re-runs only positions [a + k, b).
        """
        T = z.shape[1]
        guided = guidance != 0.0
        positions = torch.arange(1, T, device=z.device, dtype=z.dtype)  # token indices 1 .. T-1
        x = z.clone()  # initial guess x = z; token 0 is already exact
        passes = 0
        for a in range(0, T - 1, max(1, segment_size)):
            b = min(a + segment_size, T - 1)
            limit = b - a if options.max_iters == 0 else min(b - a, options.max_iters)
            for iteration in range(limit):
                # Positions [a, s) hold keys/values computed from final inputs (written by earlier iterations
                # when tokens <= s - 1 were already exact), so each iteration re-runs only [s, b): less work,
                # same fixed point.
                s = a + iteration
                inputs = x[:, s:b]
                if guided:
                    inputs = torch.cat([inputs, inputs])
                h = self.proj_in(inputs) + self.pos_embed[s:b].to(z.dtype) + cond_embed
                for index, layer in enumerate(self.layers):
                    h = layer.chunk(h, s, cache, index, temps)
                weight = (guidance * positions[s:b] / (T - 1)).view(1, -1, 1, 1) if guidance_annealed else guidance
                params = self._guide(self._head(h), guided, weight, z.dtype)  # tokens s+1 .. b
                new = self.transform.inverse(z[:, s + 1 : b + 1], params)
                passes += 1
                last = iteration == limit - 1
                change = None if last else (new - x[:, s + 1 : b + 1]).abs().max()
                x[:, s + 1 : b + 1] = new
                if not last and bool(change <= options.tol):  # one host sync per iteration
                    break
        return x, passes


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
        # autoregressive structure is untouched). Empty for model.mixer=none: no state-dict keys, old
        # checkpoints load with strict=True.
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
        (training, bits/dim, the Tweedie score); sampling precision is the sampler's choice."""
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
        guidance: float = 0.0,
        guidance_annealed: bool = False,
        attn_temp: float = 1.0,
        decoding: str | Decoding | None = None,
        precision: str = "fp32",
        stats: DecodingStats | None = None,
    ) -> Tensor:
        """Exact inverse of `forward`: z (B, C, H, W) -> x (B, C, H, W). See FlowBlock.inverse for guidance.

        decoding: "sequential" (default), "jacobi", "gs_jacobi" or a Decoding with its options (models/decoding.py).
        precision: the Transformer's matmuls and KV cache in "fp32", "bf16" or "tf32"; the flow state, transforms
        and mixers stay in z's dtype. One KV cache is allocated for the whole call and shared by every block.
        stats: if given, the model passes of each block are added to it.
        """
        self._check_input(z)
        options = Decoding.of(decoding)
        check_precision(precision)
        c = self.config
        bad = [k for k in options.sequential_blocks if not 0 <= k < len(self.blocks)]
        if bad:
            raise ValueError(f"decoding sequential_blocks {bad} out of range for a model of {len(self.blocks)} blocks")
        tokens = patchify(z, c.patch_size)
        batch = 2 * z.shape[0] if guidance != 0.0 else z.shape[0]
        cache = self.blocks[0].allocate_cache(batch, tokens.new_empty((), dtype=cache_dtype(precision, z.dtype)))
        if stats is not None:
            stats.num_tokens = c.num_tokens
            stats.calls += 1
        for k in reversed(range(len(self.blocks))):
            if k < len(self.mixers):
                tokens = self.mixers[k].inverse(tokens)
            block_decoding = replace(options, mode=options.mode_for_block(k))
            with matmul_precision(precision, z.device.type):
                tokens, passes = self.blocks[k].inverse(
                    tokens, y, guidance, guidance_annealed, attn_temp, block_decoding, cache
                )
            if stats is not None:
                stats.add(k, passes)
        return unpatchify(tokens, c.patch_size, c.in_channels, c.image_size)

    @torch.no_grad()
    def sample(
        self,
        n_or_z: int | Tensor,
        y: Tensor | None = None,
        guidance: float = 0.0,
        guidance_annealed: bool = False,
        attn_temp: float = 1.0,
        generator: torch.Generator | None = None,
        decoding: str | Decoding | None = None,
        precision: str = "fp32",
        stats: DecodingStats | None = None,
    ) -> Tensor:
        """Draw images: z ~ prior (or the standard-normal noise given as `n_or_z`, scaled by the prior), then invert.

        A class-conditional model guided (guidance != 0) needs labels `y`: without them the guiding pass would
        extrapolate the null label against itself. (Without labels, attention-temperature guidance, attn_temp != 1,
        is still meaningful: the null-label model against itself at another temperature.)
        """
        c = self.config
        if guidance != 0.0 and c.num_classes and y is None and attn_temp == 1.0:
            raise ValueError(
                f"guidance={guidance} on a class-conditional model ({c.num_classes} classes) needs labels: pass "
                f"y=torch.tensor([...]) (one class per sample), or class-balanced ones, y=torch.arange(n) % "
                f"{c.num_classes} (tarflow_scale.sampling.sample_images(..., labels='balanced') does this)"
            )
        if isinstance(n_or_z, int):
            param = next(self.parameters())
            shape = (n_or_z, c.in_channels, c.image_size, c.image_size)
            eps = torch.randn(shape, generator=generator, device=param.device, dtype=param.dtype)
        else:
            eps = n_or_z
        return self.inverse(
            self.prior.scale(eps), y, guidance, guidance_annealed, attn_temp, decoding, precision, stats
        )
