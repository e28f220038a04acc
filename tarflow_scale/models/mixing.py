"""Invertible linear mixing of each token's features between TarFlow blocks: CDFlow and fixed permutations.

A TarFlow block transforms every feature of a token with its own elementwise map, so features only meet
through the Transformer's conditioning. A token-wise invertible linear layer between blocks, y_t = W x_t for
every token t, mixes them directly. It acts on each token separately, so it commutes with the token order
and leaves the next block's autoregressive (triangular) structure intact; the sequence flip of alternate
blocks stays as it is.

* `CirculantDiagonalMixer` (CDFlow, Feng & Liao, NeurIPS 2025, arXiv 2510.25323): W is a product of
  diagonal and circulant matrices, applied and inverted by FFT in O(m n log n) with O(m n) parameters, and
  its log-determinant is read off the factors in O(m n log n) instead of the O(n^3) of a dense LU.
* `FeaturePermutation`: a fixed random permutation (Glow's "shuffle"), orthogonal, log-determinant 0.

Both follow one interface: `forward(x) -> (y, log_det)`, `inverse(y) -> x`, `matrix() -> W` (n, n) and
`log_abs_det()`, acting on the last dimension of x (B, ..., n). Maths runs in at least fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .transforms.base import at_least_fp32


def circulant_matrix(c: Tensor) -> Tensor:
    """The circulant matrix with first column c (..., n): C[..., i, k] = c[..., (i - k) mod n]. (..., n, n)."""
    n = c.shape[-1]
    idx = (torch.arange(n, device=c.device)[:, None] - torch.arange(n, device=c.device)[None, :]) % n
    return c[..., idx]


def circulant_matmul(fourier_c: Tensor, x: Tensor) -> Tensor:
    """C x for x (..., n), given rfft(c) (n//2 + 1,): a circular convolution, diagonal in the Fourier basis."""
    n = x.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(x, dim=-1) * fourier_c, n=n, dim=-1)


def circulant_log_abs_det(fourier_c: Tensor, n: int) -> Tensor:
    """log|det C| = sum_k log|FFT(c)_k| over all n frequencies, from the n//2 + 1 rfft bins of c (..., n//2 + 1).

    A real c has a conjugate-symmetric spectrum, FFT(c)_{n-k} = conj(FFT(c)_k): every rfft bin other than
    k = 0 (and k = n/2 for even n) stands for two frequencies, so it is counted twice. Sums over the last dim.
    """
    log_abs = fourier_c.abs().log()
    total = 2 * log_abs.sum(-1) - log_abs[..., 0]
    return total - log_abs[..., -1] if n % 2 == 0 else total


def _per_sample(log_abs_det: Tensor, x: Tensor) -> Tensor:
    """A scalar log|det W| applied to every vector of x (B, ..., n) -> (B,) log-determinant per sample."""
    count = x.shape[1:-1].numel()  # tokens per sample (1 for x of shape (B, n))
    return (log_abs_det * count).expand(x.shape[0])


class CirculantDiagonalMixer(nn.Module):
    """CDFlow: y = W x with W = D_0 C_0 D_1 C_1 ... D_{m-1} C_{m-1} D_m, on the last dimension of x.

    m = `num_factors` circulant matrices C_j (first column c_j, C_j[i, k] = c_j[(i - k) mod n]) interleaved
    with m + 1 diagonal matrices D_j = diag(exp(s_j)): the paper's layer with m + 1 diagonals and m
    circulants. Products of O(n) such factors reach almost every n x n matrix (Huhtanen & Peramaki, 2015); a
    small m trades that reach for O(m n) cost. Parameters, (2m + 1) n in all:
      * `log_diag` (m + 1, n): s_j. Positive diagonals never pass through zero, so only the circulants can make
        W singular; signs are left to the circulants, whose spectra are unconstrained.
      * `circulant` (m, n): c_j - e_0, the first columns' offset from the identity's. Zero-initialised, like the
        output projections of the blocks, so W starts as the identity (and weight decay pulls towards it).

    Maths: C x = irfft(rfft(c) * rfft(x)); C^{-1} y = irfft(rfft(y) / rfft(c));
    log|det W| = sum_j sum_i s_j[i] + sum_j sum_k log|FFT(c_j)_k|. The forward, inverse and log-determinant all
    cost O(m n log n) against O(n^2), O(n^2) (with a cached O(n^3) factorisation) and O(n^3) for a dense W.
    W is singular where some FFT(c_j)_k = 0; nothing prevents training from approaching that, but starting at
    the identity (det W = 1 > 0) the flow stays orientation preserving as long as W stays invertible.

    >>> mixer = CirculantDiagonalMixer(dim=12, num_factors=2)
    >>> x = torch.randn(4, 16, 12)                # (B, T, n): every token mixed by the same W
    >>> y, log_det = mixer(x)                     # y (4, 16, 12); log_det (4,) = 16 log|det W| (0 at init)
    >>> torch.allclose(mixer.inverse(y), x, atol=1e-5)
    True
    """

    def __init__(self, dim: int, num_factors: int):
        super().__init__()
        if dim < 1 or num_factors < 1:
            raise ValueError(f"dim={dim} and num_factors={num_factors} must both be >= 1")
        self.dim = dim
        self.num_factors = num_factors
        self.log_diag = nn.Parameter(torch.zeros(num_factors + 1, dim))
        self.circulant = nn.Parameter(torch.zeros(num_factors, dim))

    def _first_columns(self, dtype: torch.dtype) -> Tensor:
        """c_j = e_0 + offset_j, (m, n) in `dtype`."""
        first_columns = self.circulant.to(dtype).clone()
        first_columns[:, 0] += 1.0
        return first_columns

    def _factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Diagonals d (m + 1, n) and the circulants' spectra rfft(c) (m, n//2 + 1), in `dtype`."""
        return self.log_diag.to(dtype).exp(), torch.fft.rfft(self._first_columns(dtype), dim=-1)

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        # fp32 at least (bf16 training promotes), fp64 when either the input or the parameters are fp64.
        return torch.promote_types(at_least_fp32(x).dtype, at_least_fp32(self.log_diag).dtype)

    def log_abs_det(self, fourier: Tensor | None = None) -> Tensor:
        """log|det W|, a scalar in nats (`fourier`: the circulants' spectra when the caller has them)."""
        if fourier is None:
            fourier = torch.fft.rfft(self._first_columns(at_least_fp32(self.log_diag).dtype), dim=-1)
        return self.log_diag.to(fourier.real.dtype).sum() + circulant_log_abs_det(fourier, self.dim).sum()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, ..., n) -> y = x W^T (B, ..., n), log|det dy/dx| (B,) = log|det W| x (vectors per sample)."""
        dtype = self._compute_dtype(x)
        diag, fourier = self._factors(dtype)
        h = x.to(dtype) * diag[-1]  # rightmost factor first: D_m
        for j in reversed(range(self.num_factors)):
            h = circulant_matmul(fourier[j], h) * diag[j]  # D_j C_j
        return h.to(x.dtype), _per_sample(self.log_abs_det(fourier), x)

    def inverse(self, y: Tensor) -> Tensor:
        """y (B, ..., n) -> x = W^{-1} y = D_m^{-1} C_{m-1}^{-1} ... C_0^{-1} D_0^{-1} y, left factor first.

        C^{-1} is the circulant with spectrum 1 / FFT(c) (Fourier division); the reciprocals of the small
        factors are taken once, so the batch only sees multiplications.
        """
        dtype = self._compute_dtype(y)
        inv_diag = (-self.log_diag.to(dtype)).exp()
        inv_fourier = torch.fft.rfft(self._first_columns(dtype), dim=-1).reciprocal()
        h = y.to(dtype) * inv_diag[0]
        for j in range(self.num_factors):
            h = circulant_matmul(inv_fourier[j], h) * inv_diag[j + 1]  # D_{j+1}^{-1} C_j^{-1}
        return h.to(y.dtype)

    def matrix(self) -> Tensor:
        """W materialised as a dense (n, n) matrix from its factors (for tests and the dense baseline)."""
        dtype = at_least_fp32(self.log_diag).dtype
        diag, first_columns = self.log_diag.to(dtype).exp(), self._first_columns(dtype)
        W = torch.diag(diag[0])
        for j in range(self.num_factors):
            W = W @ circulant_matrix(first_columns[j]) @ torch.diag(diag[j + 1])
        return W

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_factors={self.num_factors}"


class FeaturePermutation(nn.Module):
    """y[..., i] = x[..., perm[i]] with a fixed random permutation (Glow's shuffle); log|det| = 0.

    The permutation is drawn from `seed` and stored as a buffer, so checkpoints carry it.
    """

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        self.dim = dim
        perm = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)

    def log_abs_det(self) -> Tensor:
        return torch.zeros(())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, ..., n) -> x[..., perm], zero log-determinant (B,)."""
        log_det = torch.zeros(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        return x[..., self.perm], log_det

    def inverse(self, y: Tensor) -> Tensor:
        return y[..., torch.argsort(self.perm)]

    def matrix(self) -> Tensor:
        """The permutation matrix P with x P^T = x[..., perm], (n, n)."""
        return torch.eye(self.dim, device=self.perm.device)[self.perm]

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


TokenMixer = CirculantDiagonalMixer | FeaturePermutation

MIXERS = ("none", "permute", "cdflow")


def build_mixer(kind: str, dim: int, num_factors: int = 2, seed: int = 0) -> TokenMixer | None:
    """The mixer of one gap between blocks: None for "none", else a module acting on (B, T, dim) tokens."""
    if kind == "none":
        return None
    if kind == "permute":
        return FeaturePermutation(dim, seed)
    if kind == "cdflow":
        return CirculantDiagonalMixer(dim, num_factors)
    raise ValueError(f"model.mixer={kind!r} is not one of {', '.join(MIXERS)}")
