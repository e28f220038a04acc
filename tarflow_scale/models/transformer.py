"""Causal pre-LayerNorm Transformer layers with an explicit, preallocated key/value cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 (or fp64) whatever the input dtype: bf16 statistics drift in deep flows."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


@dataclass
class KVCache:
    """Keys and values of every layer of one block, preallocated for the whole sequence.

    keys, values: (num_layers, B, num_heads, T, head_dim). A pass over positions [s, s + L) writes those slots in
    place and attends to slots [0, s + L): no per-step concatenation, no hidden module state. One cache serves
    every block of a sampling call (each block overwrites a slot before reading it), so a whole sampling call
    allocates it once.
    """

    keys: Tensor
    values: Tensor

    @classmethod
    def allocate(
        cls, num_layers: int, batch: int, num_heads: int, num_tokens: int, head_dim: int, like: Tensor
    ) -> KVCache:
        shape = (num_layers, batch, num_heads, num_tokens, head_dim)
        # Zeros, not empty: the static-shape pass reads every slot under a mask, and a masked slot still enters
        # the weighted sum as 0 x value, which is NaN if uninitialised memory holds a NaN.
        return cls(like.new_zeros(shape), like.new_zeros(shape))

    def prefix(self, length: int) -> KVCache:
        """The first `length` slots of every layer as a view: writes through it land in this cache. The static-shape
        pass reads every slot of the cache it is given, so a prefix bounds what it reads (models/decoding/static.py).
        """
        return KVCache(self.keys[:, :, :, :length], self.values[:, :, :, :length])


class CausalSelfAttention(nn.Module):
    def __init__(self, channels: int, head_dim: int):
        super().__init__()
        self.num_heads = channels // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def _split_heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (B, nh, T, hd)

    def _merge_heads(self, out: Tensor) -> Tensor:
        B, _, T, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, T, -1))

    @staticmethod
    def _apply_temperature(q: Tensor, attn_temp: Tensor | None) -> Tensor:
        # Dividing q by the temperature divides every logit q.k: per-sample temperatures (B,) let the
        # conditional and temperature-guided passes share one batch.
        return q if attn_temp is None else q / attn_temp.view(-1, 1, 1, 1).to(q.dtype)

    def forward(self, h: Tensor, attn_temp: Tensor | None = None) -> Tensor:
        """Full causal pass. h: (B, T, C)."""
        q, k, v = self._split_heads(h)
        q = self._apply_temperature(q, attn_temp)
        return self._merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def cached(
        self, h: Tensor, start: int | Tensor, cache: KVCache, layer: int, attn_temp: Tensor | None = None
    ) -> Tensor:
        """Tokens at positions [start, start + L) attending causally to themselves and to the cached [0, start).

        Writes their keys/values into slots [start, start + L) of the cache (a later call for the same positions
        overwrites them: Jacobi iterations refine a segment in place). h: (B, L, C); a one-token step is L = 1.
        `start` an int reads the slots [0, start + L) only (the fewest reads). `start` a 0-d int64 tensor gives the
        same result with the same shapes at every position, for torch.compile / CUDA graphs: the slots are written
        with index_copy_ and every slot of `cache` is read under a mask (keys after each query's position excluded).
        The static decoders pass a `KVCache.prefix` covering start + L, one length per bucket of positions.
        """
        q, k, v = self._split_heads(h)
        L = h.shape[1]
        q = self._apply_temperature(q, attn_temp)
        if isinstance(start, Tensor):
            slots = start.view(1) + torch.arange(L, device=h.device)
            cache.keys[layer].index_copy_(2, slots, k)
            cache.values[layer].index_copy_(2, slots, v)
            keys, values = cache.keys[layer], cache.values[layer]  # (B, nh, S, hd): every slot of this cache (view)
            mask = torch.arange(keys.shape[2], device=h.device) <= slots.unsqueeze(-1)  # (L, S): query, key
        else:
            end = start + L
            cache.keys[layer, :, :, start:end] = k
            cache.values[layer, :, :, start:end] = v
            keys, values = cache.keys[layer, :, :, :end], cache.values[layer, :, :, :end]  # (B, nh, end, hd)
            # One query sees every key written so far (no mask); from position 0 the plain causal mask; else query
            # i (position start + i) sees keys [0, start + i], the causal mask aligned to the lower right, which
            # SDPA's fused kernels apply without materialising an (L, end) mask (~30% faster on CPU than a bool one).
            if L == 1 or start == 0:
                mask = None
            else:  # imported here: torch.nn.attention.bias pulls in torch._dynamo (~1.4 s per process start)
                from torch.nn.attention.bias import causal_lower_right

                mask = causal_lower_right(L, end)
        causal = mask is None and L > 1
        return self._merge_heads(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal))


class TransformerLayer(nn.Module):
    """Pre-LN residual layer: h + Attn(LN(h)), then h + MLP(LN(h))."""

    def __init__(self, channels: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.attn_norm = LayerNorm32(channels)
        self.attn = CausalSelfAttention(channels, head_dim)
        self.mlp_norm = LayerNorm32(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, h: Tensor, attn_temp: Tensor | None = None) -> Tensor:
        h = h + self.attn(self.attn_norm(h), attn_temp)
        return h + self.mlp(self.mlp_norm(h))

    def cached(
        self, h: Tensor, start: int | Tensor, cache: KVCache, layer: int, attn_temp: Tensor | None = None
    ) -> Tensor:
        """`forward` for tokens at positions [start, start + L) after the cached ones (CausalSelfAttention.cached)."""
        h = h + self.attn.cached(self.attn_norm(h), start, cache, layer, attn_temp)
        return h + self.mlp(self.mlp_norm(h))
