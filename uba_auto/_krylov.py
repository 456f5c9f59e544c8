r"""The Lanczos process shared by :mod:`uba_auto.lanczos` and :mod:`uba_auto.slq` (internal).

:func:`run_lanczos` builds, from a unit vector :math:`q_1`, an orthonormal basis :math:`Q_m` of the
Krylov space :math:`\mathcal{K}_m(A, q_1)` and the coefficients of the tridiagonal
:math:`T_m = Q_m^\top A Q_m`, with full re-orthogonalisation; :func:`tridiagonal_eigh` solves
:math:`T_m`, and :func:`ritz_residuals` turns its eigenvectors into the residuals of the Ritz pairs.
What is done with the eigen-solution (extreme eigenvalues, quadrature nodes) is left to the solvers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from uba_auto.linear_operator import SymmetricOperator

__all__ = [
    "DEFAULT_CHECK_EVERY",
    "LanczosBasis",
    "LanczosProcess",
    "compact_dtype",
    "gaussian_unit_vector",
    "ritz_residuals",
    "run_lanczos",
    "tridiagonal_eigh",
]


# Convergence and breakdown are tested on the host, which syncs with the device; every few steps
# keeps that cost negligible while wasting at most ``check_every - 1`` products after convergence.
DEFAULT_CHECK_EVERY = 5


def gaussian_unit_vector(op: SymmetricOperator, generator: torch.Generator) -> Tensor:
    """A random unit start vector in the operator's dtype and on its device."""
    # Gaussian rather than Rademacher: a sign vector can be exactly orthogonal to a structured
    # eigenvector (e.g. (1, -1)/sqrt(2)), a Gaussian one almost surely is not.
    v = torch.randn(op.size, generator=generator, dtype=op.dtype, device=op.device)
    return v / torch.linalg.vector_norm(v)


# Small blocks: a block is allocated whole, and a short run (a decision probe takes 3-10 steps) must
# not pay for 16 rows of a model-sized basis.
_BASIS_BLOCK = 4
_STORED_PRODUCT_BOUND = 2.0**14
"""K of :meth:`LanczosBasis._stored_coefficients`: a bound on its products, below float16's
largest finite value (65504) with room for the float32 accumulation's rounding."""


def _breakdown_rtol(dtype: torch.dtype) -> float:
    # Breakdown is judged against the step's own product ||A q_j||: when A q_j lies in span(Q) the
    # projections cancel it down to tens of ulps. Against ||A|| instead, float32 runs would stop
    # on genuine bulk directions of Hessians whose bulk is 1e-4 of the top eigenvalue. A
    # near-invariant space that escapes this test is harmless: two Gram-Schmidt passes keep the
    # next vector orthogonal, so the run continues as if restarted, and converged pairs stop it.
    return 100.0 * torch.finfo(dtype).eps


def compact_dtype(dtype: torch.dtype) -> torch.dtype:
    r"""The storage dtype of a compact basis for vectors of ``dtype``: about half its digits.

    float64 -> float32, float32 -> float16, anything else unchanged. The unit roundoff of the
    storage, :math:`2^{-24}` and :math:`2^{-11}`, is near the square root of the working one,
    :math:`\sqrt{2^{-53}}` and :math:`\sqrt{2^{-24}}`: the level of semi-orthogonality that keeps
    the Ritz values of Lanczos as accurate as with a fully orthogonal basis (Simon, 1984).

    Example:
        >>> compact_dtype(torch.float32), compact_dtype(torch.float64)
        (torch.float16, torch.float32)
    """
    return {torch.float64: torch.float32, torch.float32: torch.float16}.get(dtype, dtype)


class LanczosBasis:
    """The Lanczos vectors as rows, allocated on demand in blocks of ``_BASIS_BLOCK`` rows.

    Growing as the run proceeds (rather than allocating ``max_steps`` rows up front) keeps the
    memory at what the run actually used, which is usually far below ``max_steps`` rows when it
    converges.

    With a ``storage`` dtype narrower than ``dtype`` (a compact basis, :func:`compact_dtype`), each
    row is stored in it, scaled by its largest entry (so float16 neither overflows nor flushes to
    zero), except the two newest rows, which are kept in ``dtype`` only (a row is stored when it
    leaves them): the three-term recurrence (the tridiagonal's coefficients, the next vector) is
    computed at full precision, and only the re-orthogonalisation against the older rows, whose
    coefficients are at rounding level, and the Ritz vectors (:meth:`combine`) see the storage's
    rounding (relative :math:`2^{-11}` per entry in float16). Memory: ``(rows - 2) *
    itemsize(storage) + 2 * itemsize(dtype)`` per entry instead of ``rows * itemsize(dtype)``
    (plus the unused rows of the last block).

    The re-orthogonalisation (:meth:`orthogonalize`) forms the older rows' coefficients with one
    matrix-vector product in the storage dtype per block (the vector scaled into its range,
    :meth:`_stored_coefficients`), not a decoded row at a time: those coefficients are at the
    level of the storage's rounding, so rounding them to it again costs no accuracy, and a step
    costs a few kernels instead of a few per row.
    """

    def __init__(
        self,
        n: int,
        max_rows: int,
        dtype: torch.dtype,
        device: torch.device,
        storage: torch.dtype | None = None,
    ) -> None:
        self.n, self.max_rows, self.dtype, self.device = n, max_rows, dtype, device
        self.storage = dtype if storage is None else storage
        self.compact = self.storage != dtype
        self.block = min(max_rows, _BASIS_BLOCK)
        self.blocks: list[Tensor] = []  # in the storage dtype
        self.rows = 0  # rows written so far
        # Compact: each stored row's scale (its largest entry) and the newest rows (index -> row).
        self._scales = torch.empty(max_rows if self.compact else 0, dtype=dtype, device=device)
        self._recent: dict[int, Tensor] = {}

    def append(self, v: Tensor) -> None:
        if self.compact:
            # Kept, not copied (the solver never writes a row); a row goes to the storage when it
            # leaves the newest two, so the storage holds the older rows only.
            self._recent[self.rows] = v
            old = self.rows - 2
            if old >= 0:
                row = self._recent.pop(old)
                scale = row.abs().max().clamp_min(torch.finfo(self.dtype).tiny)
                self._slot(old).copy_(row / scale)
                self._scales[old] = scale
        else:
            self._slot(self.rows).copy_(v)
        self.rows += 1

    def _slot(self, j: int) -> Tensor:
        """Stored row ``j`` (the next one to store), its block allocated when ``j`` starts one."""
        if j == len(self.blocks) * self.block:
            size = min(self.block, self.max_rows - j)
            self.blocks.append(torch.empty((size, self.n), dtype=self.storage, device=self.device))
        return self._stored(j)

    def _stored(self, j: int) -> Tensor:
        return self.blocks[j // self.block][j % self.block]

    @property
    def _stored_only(self) -> int:
        """Compact: how many rows exist only in the storage (the rows before the newest two)."""
        return max(0, self.rows - 2)

    def row(self, j: int) -> Tensor:
        if self.compact:
            recent = self._recent.get(j)
            if recent is not None:
                return recent
            return self._stored(j).to(self.dtype) * self._scales[j]
        return self._stored(j)

    def _filled(self, rows: int | None = None) -> Iterator[Tensor]:
        """The blocks' written rows, up to row ``rows`` (default: all)."""
        rows = self.rows if rows is None else rows
        for i, blk in enumerate(self.blocks):
            if rows <= i * self.block:
                return
            yield blk[: min(self.block, rows - i * self.block)]

    def coefficients(self, w: Tensor) -> Tensor:
        """``Q w`` for the rows ``Q`` written so far (each row at the working precision)."""
        if self.compact:  # one row in working precision at a time
            return torch.stack([torch.dot(self.row(j), w) for j in range(self.rows)])
        return torch.cat([blk @ w for blk in self._filled()])

    def _stored_coefficients(self, w: Tensor, rows: int) -> Tensor:
        r"""``Q[:rows] w`` from the stored rows, one product per block in the storage dtype.

        ``w`` is divided by :math:`s = \max(\|w\|_\infty, \|w\|_2 / (K \min_j c_j))`
        (:math:`c_j` the rows' scales, :math:`K = 2^{14}`): its entries fit the storage
        (:math:`|w_i / s| \le 1`) and so does every product, since a stored row has norm
        :math:`1/c_j` and Cauchy-Schwarz bounds the products by :math:`K`. Accumulation is in
        float32 (CPU and CUDA kernels for float16 alike); the result carries the storage's
        relative rounding.
        """
        scales = self._scales[:rows]
        tiny = torch.finfo(self.dtype).tiny
        bound = torch.linalg.vector_norm(w) / (_STORED_PRODUCT_BOUND * scales.min())
        s = torch.maximum(w.abs().max(), bound).clamp_min(tiny)
        w_s = (w / s).to(self.storage)
        products = torch.cat([blk @ w_s for blk in self._filled(rows)])
        return products.to(self.dtype) * scales * s

    def orthogonalize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """One classical Gram-Schmidt pass: ``(w - Q^T h, h)`` with ``h = Q w``."""
        if not self.compact:
            h = self.coefficients(w)
            return self.subtract(w, h), h
        old = self._stored_only  # rows [old, rows) are the newest, kept in full
        parts = [self._stored_coefficients(w, old)] if old else []
        parts += [torch.dot(self._recent[j], w).reshape(1) for j in range(old, self.rows)]
        h = torch.cat(parts)
        return self.subtract(w, h), h

    def subtract(self, w: Tensor, h: Tensor) -> Tensor:
        """``w - Q^T h``."""
        if self.compact:
            w = w.clone()
            old = self._stored_only
            weighted = -h[:old] * self._scales[:old]
            for j in range(old):
                w.addcmul_(self._stored(j), weighted[j])
            for j in range(old, self.rows):
                w.sub_(self._recent[j] * h[j])
            return w
        start = 0
        for blk in self._filled():
            w = torch.addmv(w, blk.T, h[start : start + blk.shape[0]], alpha=-1)
            start += blk.shape[0]
        return w

    def combine(self, coeffs: Tensor, m: int) -> Tensor:
        """``Q[:m]^T coeffs`` for a ``(m, k)`` matrix of coefficients: Ritz vectors as columns."""
        out = torch.zeros((self.n, coeffs.shape[1]), dtype=self.dtype, device=self.device)
        if self.compact:
            for j in range(min(m, self.rows)):
                out.addr_(self.row(j), coeffs[j])
            return out
        start = 0
        for blk in self._filled():
            rows = min(blk.shape[0], m - start)
            if rows <= 0:
                break
            out += blk[:rows].T @ coeffs[start : start + rows]
            start += rows
        return out


@dataclass(frozen=True)
class LanczosProcess:
    """Raw output of :func:`run_lanczos` (internal)."""

    alpha: np.ndarray  # (m,) float64, diagonal of T
    beta: np.ndarray  # (m,) float64; beta[:-1] off-diagonal of T, beta[-1] = ||final residual||
    basis: LanczosBasis  # rows [:m] are the orthonormal Lanczos vectors
    num_steps: int
    num_matvecs: int
    breakdown: bool


def run_lanczos(
    op: SymmetricOperator,
    q0: Tensor,
    *,
    max_steps: int,
    basis_device: torch.device,
    check_every: int,
    should_stop: Callable[[np.ndarray, np.ndarray], bool] | None,
    product: Callable[[Tensor, LanczosBasis], Tensor] | None = None,
    basis_dtype: torch.dtype | None = None,
) -> LanczosProcess:
    r"""Run up to ``max_steps`` (<= n) Lanczos steps from the unit vector ``q0``.

    Every ``check_every`` steps (and at the last one) the coefficients are copied to the host, the
    run is truncated at the first breakdown (:math:`\beta_j \le` :func:`_breakdown_rtol`
    :math:`\cdot \|A q_j\|`), and ``should_stop(alpha, beta)`` may end it.

    ``product(q_j, basis)``, if given, computes :math:`A q_j` instead of ``op.matvec`` (on the
    operator's device), with ``basis`` holding rows :math:`q_0 \dots q_j`: a caller can project
    parts of the product on the basis as they are computed (see
    :class:`uba_auto.probe.projected.BatchProjections`). ``basis_dtype``: the storage of the
    basis (:class:`LanczosBasis`; ``None``: the operator's dtype).
    """
    n = op.size
    dtype = op.dtype
    basis = LanczosBasis(n, max_steps, dtype, basis_device, basis_dtype)
    # Coefficients stay on the device between checks so that no step waits for the host.
    alpha = torch.empty(max_steps, dtype=dtype, device=basis_device)
    beta = torch.empty(max_steps, dtype=dtype, device=basis_device)
    aq_norm = torch.empty(max_steps, dtype=dtype, device=basis_device)
    basis.append(q0.to(basis_device))
    rtol = _breakdown_rtol(dtype)
    tiny = torch.finfo(dtype).tiny

    for j in range(max_steps):
        # detach: the solver never differentiates through the operator, and a graph attached to
        # the product would otherwise be kept alive by the basis.
        q = basis.row(j).to(op.device)
        w = (op.matvec(q) if product is None else product(q, basis)).detach().to(basis_device)
        aq_norm[j] = torch.linalg.vector_norm(w)
        # Two classical Gram-Schmidt passes against the whole basis. The first pass also yields the
        # three-term recurrence (h[j] = alpha_j, h[j-1] = beta_{j-1}); the second removes what the
        # first left behind through rounding, which keeps Q orthonormal to working precision.
        w, h = basis.orthogonalize(w)
        w, h2 = basis.orthogonalize(w)
        alpha[j] = h[j] + h2[j]
        b = torch.linalg.vector_norm(w)
        beta[j] = b
        if j + 1 < max_steps:
            # clamp: an exact breakdown (w = 0) must not produce NaN before the next host check
            # finds it; the rows written after a breakdown are discarded there.
            basis.append(w / b.clamp_min(tiny))
        del w  # not held through the next product (a vector of the operator's size)

        m = j + 1
        if m % check_every != 0 and m != max_steps:
            continue
        alpha_h = alpha[:m].to("cpu", torch.float64).numpy()
        beta_h = beta[:m].to("cpu", torch.float64).numpy()
        aq_h = aq_norm[:m].to("cpu", torch.float64).numpy()
        if not (np.isfinite(alpha_h).all() and np.isfinite(beta_h).all()):
            bad = int(np.flatnonzero(~(np.isfinite(alpha_h) & np.isfinite(beta_h)))[0])
            raise ValueError(
                f"op.matvec returned non-finite values at Lanczos step {bad + 1}; check the "
                "operator (e.g. a Hessian evaluated at a diverged point) or use float64"
            )
        hits = np.flatnonzero(beta_h <= rtol * aq_h)
        if hits.size:
            m_b = int(hits[0]) + 1
            return LanczosProcess(
                alpha=alpha_h[:m_b].copy(),
                beta=beta_h[:m_b].copy(),
                basis=basis,
                num_steps=m_b,
                num_matvecs=j + 1,
                breakdown=True,
            )
        if m == max_steps or (should_stop is not None and should_stop(alpha_h, beta_h)):
            return LanczosProcess(
                alpha=alpha_h,
                beta=beta_h,
                basis=basis,
                num_steps=m,
                num_matvecs=j + 1,
                breakdown=False,
            )
    raise AssertionError("unreachable: the loop returns at its last step")  # pragma: no cover


def tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the tridiagonal with diagonal ``alpha`` and off-diagonal ``beta[:-1]``.

    ``alpha`` and ``beta`` are laid out as in :class:`LanczosProcess` and
    :class:`~uba_auto.lanczos.LanczosResult` (``beta[-1]``, the norm of the final residual vector,
    is not part of :math:`T_m`), so ``tridiagonal_eigh(alpha[:j], beta[:j])`` solves the
    :math:`T_j` of step ``j`` of the same run. Returns the eigenvalues, ascending, and the
    eigenvectors as columns.

    Example:
        >>> import numpy as np
        >>> theta, s = tridiagonal_eigh(np.array([2.0, 2.0]), np.array([1.0, 0.5]))
        >>> theta.round(12).tolist()
        [1.0, 3.0]
    """
    return scipy.linalg.eigh_tridiagonal(alpha, beta[: alpha.size - 1])


def ritz_residuals(beta_last: float, s: np.ndarray) -> np.ndarray:
    r"""Residuals :math:`|\beta_m s_{m,i}|` of the Ritz pairs from the eigenvectors ``s`` of T."""
    # ||A y_i - theta_i y_i|| = |beta_m| |s_{m,i}| because A Q_m = Q_m T_m + beta_m q_{m+1} e_m^T.
    return np.abs(beta_last * s[-1, :])
