"""Seeded test operators ``Q diag(λ) Qᵀ`` with known spectra, shared by the solver tests."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from uba_auto.linear_operator import DenseOperator


@functools.lru_cache(maxsize=64)
def _orthogonal(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    # Fixing the signs of diag(R) makes Q Haar distributed rather than biased by the QR convention.
    return q * torch.sign(torch.diagonal(r))


def random_orthogonal(n: int, *, seed: int) -> Tensor:
    """A Haar-distributed orthogonal ``(n, n)`` float64 matrix from a seeded QR (cached)."""
    return _orthogonal(n, seed).clone()


def spectrum_operator(
    eigenvalues: Tensor, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> DenseOperator:
    """``DenseOperator(Q diag(eigenvalues) Qᵀ)`` built in float64, then cast to ``dtype``."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    q = random_orthogonal(lam.numel(), seed=seed)
    a = (q * lam) @ q.T
    return DenseOperator(((a + a.T) / 2).to(dtype))


def eigenvector_basis(n: int, *, seed: int = 0) -> Tensor:
    """The eigenvectors (columns) of :func:`spectrum_operator` with the same ``n`` and ``seed``."""
    return random_orthogonal(n, seed=seed)


def well_separated(n: int = 150) -> Tensor:
    """Bulk in [0.01, 3.2] plus three separated eigenvalues at each end, λ in [-1, 10]."""
    lam = torch.logspace(-2, 0.5, n, dtype=torch.float64)
    lam[:3] = torch.tensor([-1.0, -0.6, -0.3], dtype=torch.float64)
    lam[-3:] = torch.tensor([6.0, 8.0, 10.0], dtype=torch.float64)
    return lam


def clustered(n: int = 150) -> Tensor:
    """Most eigenvalues within 1e-3 of each other, a clustered top, and separated extremes."""
    lam = 1.0 + 1e-3 * torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lam[-10:] = 4.0 + 1e-3 * torch.linspace(0.0, 1.0, 10, dtype=torch.float64)
    lam[0] = -2.0
    return lam


def indefinite(n: int = 150) -> Tensor:
    """Large negative eigenvalues dominate: λ in [-50, 10], a third of them negative."""
    neg = -torch.logspace(0.0, math.log10(50.0), n // 3, dtype=torch.float64)
    pos = torch.linspace(0.0, 10.0, n - n // 3, dtype=torch.float64)
    return torch.cat([neg, pos]).sort().values


def near_degenerate_top(n: int = 120) -> Tensor:
    """Top pair λ1 - λ2 = 1e-6 λ1, bulk in [0, 0.5]."""
    lam = torch.linspace(0.0, 0.5, n, dtype=torch.float64)
    lam[-1], lam[-2] = 1.0, 1.0 - 1e-6
    return lam


def low_rank(n: int = 50) -> Tensor:
    """Rank 3 in dimension n: {5, 1, -2} and zeros."""
    lam = torch.zeros(n, dtype=torch.float64)
    lam[:3] = torch.tensor([5.0, 1.0, -2.0], dtype=torch.float64)
    return lam.sort().values
