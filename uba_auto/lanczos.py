r"""Lanczos with full re-orthogonalisation: both ends of a symmetric spectrum from one Krylov space.

The solver acts on a :class:`~uba_auto.linear_operator.SymmetricOperator`, never on a model. After
:math:`m` steps it holds an orthonormal basis :math:`Q_m` of the Krylov space
:math:`\mathcal{K}_m(A, q_1)` and the tridiagonal :math:`T_m = Q_m^\top A Q_m`, whose eigenvalues
(Ritz values) approximate the extreme eigenvalues of :math:`A` from the inside.

Every new basis vector is orthogonalised against all stored ones, twice (classical Gram-Schmidt,
"twice is enough"), so no spurious copies of converged eigenvalues ("ghosts") appear; the price is
an :math:`(m, n)` basis in memory, which ``basis_device`` can move off the accelerator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from uba_auto._validation import check_int as _check_int
from uba_auto._validation import check_positive_finite as _check_positive_float
from uba_auto.linear_operator import SymmetricOperator

__all__ = ["LanczosResult", "lanczos"]

_WHICH = ("both", "largest", "smallest")

# Convergence and breakdown are tested on the host, which syncs with the device; every few steps
# keeps that cost negligible while wasting at most ``check_every - 1`` products after convergence.
_DEFAULT_CHECK_EVERY = 5


# --------------------------------------------------------------------------------------------------
# Argument checks shared by the solver modules (lanczos, power_iteration, trace, slq).
# --------------------------------------------------------------------------------------------------


def _check_operator(op: Any) -> SymmetricOperator:
    if not isinstance(op, SymmetricOperator):
        raise TypeError(
            f"op must be a uba_auto.SymmetricOperator, got {type(op).__name__}; "
            "wrap a matrix with uba_auto.linear_operator.DenseOperator(matrix)"
        )
    if op.size < 1:
        raise ValueError(
            f"op.size must be >= 1, got {op.size}; the operator acts on an empty space"
        )
    return op


def _same_device(a: torch.device, b: torch.device) -> bool:
    # torch.device("cuda") and torch.device("cuda:0") name the same device in the default setup.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _resolve_generator(generator: Any, op: SymmetricOperator) -> torch.Generator:
    """The caller's generator, or a fresh one seeded with 0 so that results are reproducible."""
    if generator is None:
        # A private generator: the global RNG state of the caller is never consumed.
        return torch.Generator(device=op.device).manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
            f"use torch.Generator(device={str(op.device)!r}).manual_seed(seed)"
        )
    if not _same_device(generator.device, op.device):
        raise ValueError(
            f"generator must live on the operator's device {op.device}, got one on "
            f"{generator.device}; use torch.Generator(device={str(op.device)!r}).manual_seed(seed)"
        )
    return generator


def _check_v0(v0: Any, op: SymmetricOperator) -> Tensor:
    """Validate a user starting vector and return it normalised (one host sync, outside loops)."""
    if not isinstance(v0, Tensor):
        raise TypeError(f"v0 must be a torch.Tensor or None, got {type(v0).__name__}")
    if v0.shape != (op.size,):
        raise ValueError(
            f"v0 must have shape ({op.size},) to match op.size, got {tuple(v0.shape)}; "
            "flatten it or pass v0=None for a random start"
        )
    if v0.dtype != op.dtype or not _same_device(v0.device, op.device):
        raise ValueError(
            f"v0 must be {op.dtype} on {op.device} like the operator, got {v0.dtype} on "
            f"{v0.device}; use v0.to(device=op.device, dtype=op.dtype)"
        )
    norm = torch.linalg.vector_norm(v0)
    if not bool(torch.isfinite(norm)) or not bool(norm > 0):
        raise ValueError(
            f"v0 must be finite and nonzero, got a vector of norm {float(norm)!r}; "
            "pass v0=None for a random start"
        )
    return v0.detach() / norm.detach()


def _gaussian_unit_vector(op: SymmetricOperator, generator: torch.Generator) -> Tensor:
    # Gaussian rather than Rademacher: a sign vector can be exactly orthogonal to a structured
    # eigenvector (e.g. (1, -1)/sqrt(2)), a Gaussian one almost surely is not.
    v = torch.randn(op.size, generator=generator, dtype=op.dtype, device=op.device)
    return v / torch.linalg.vector_norm(v)


def _check_basis_device(basis_device: Any, op: SymmetricOperator) -> torch.device:
    if basis_device is None:
        return op.device
    try:
        return torch.device(basis_device)
    except (TypeError, RuntimeError) as err:
        raise ValueError(
            f"basis_device must be None, a torch.device or a device string such as 'cpu', got "
            f"{basis_device!r}"
        ) from err


# --------------------------------------------------------------------------------------------------
# The Lanczos process, shared with stochastic Lanczos quadrature.
# --------------------------------------------------------------------------------------------------


def _breakdown_rtol(dtype: torch.dtype) -> float:
    # Breakdown is judged against the step's own product ||A q_j||: when A q_j lies in span(Q) the
    # projections cancel it down to tens of ulps. Against ||A|| instead, float32 runs would stop
    # on genuine bulk directions of Hessians whose bulk is 1e-4 of the top eigenvalue. A
    # near-invariant space that escapes this test is harmless: two Gram-Schmidt passes keep the
    # next vector orthogonal, so the run continues as if restarted, and converged pairs stop it.
    return 100.0 * torch.finfo(dtype).eps


class _Basis:
    """The Lanczos vectors as rows of blocks allocated on demand.

    Growing block by block (rather than allocating ``max_steps`` rows up front) keeps the memory at
    what the run actually used, which is usually far below ``max_steps`` rows when it converges.
    """

    def __init__(self, n: int, max_rows: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n, self.max_rows, self.dtype, self.device = n, max_rows, dtype, device
        self.block = min(max_rows, _BASIS_BLOCK)
        self.blocks: list[Tensor] = []
        self.rows = 0  # rows written so far

    def append(self, v: Tensor) -> None:
        if self.rows == len(self.blocks) * self.block:
            size = min(self.block, self.max_rows - self.rows)
            self.blocks.append(torch.empty((size, self.n), dtype=self.dtype, device=self.device))
        self.blocks[-1][self.rows % self.block] = v
        self.rows += 1

    def row(self, j: int) -> Tensor:
        return self.blocks[j // self.block][j % self.block]

    def _filled(self) -> Iterator[Tensor]:
        for i, blk in enumerate(self.blocks):
            yield blk[: min(self.block, self.rows - i * self.block)]

    def coefficients(self, w: Tensor) -> Tensor:
        """``Q w`` for the rows ``Q`` written so far."""
        return torch.cat([blk @ w for blk in self._filled()])

    def subtract(self, w: Tensor, h: Tensor) -> Tensor:
        """``w - Q^T h``."""
        start = 0
        for blk in self._filled():
            w = torch.addmv(w, blk.T, h[start : start + blk.shape[0]], alpha=-1)
            start += blk.shape[0]
        return w

    def combine(self, coeffs: Tensor, m: int) -> Tensor:
        """``Q[:m]^T coeffs`` for a ``(m, k)`` matrix of coefficients: Ritz vectors as columns."""
        out = torch.zeros((self.n, coeffs.shape[1]), dtype=self.dtype, device=self.device)
        start = 0
        for blk in self._filled():
            rows = min(blk.shape[0], m - start)
            if rows <= 0:
                break
            out += blk[:rows].T @ coeffs[start : start + rows]
            start += rows
        return out


_BASIS_BLOCK = 16


@dataclass(frozen=True)
class _LanczosProcess:
    """Raw output of :func:`_run_lanczos` (internal)."""

    alpha: np.ndarray  # (m,) float64, diagonal of T
    beta: np.ndarray  # (m,) float64; beta[:-1] off-diagonal of T, beta[-1] = ||final residual||
    basis: _Basis  # rows [:m] are the orthonormal Lanczos vectors
    num_steps: int
    num_matvecs: int
    breakdown: bool


def _run_lanczos(
    op: SymmetricOperator,
    q0: Tensor,
    *,
    max_steps: int,
    basis_device: torch.device,
    check_every: int,
    should_stop: Callable[[np.ndarray, np.ndarray], bool] | None,
) -> _LanczosProcess:
    r"""Run up to ``max_steps`` (<= n) Lanczos steps from the unit vector ``q0``.

    Every ``check_every`` steps (and at the last one) the coefficients are copied to the host, the
    run is truncated at the first breakdown (:math:`\beta_j \le` :func:`_breakdown_rtol`
    :math:`\cdot \|A q_j\|`), and ``should_stop(alpha, beta)`` may end it.
    """
    n = op.size
    dtype = op.dtype
    start_count = op.num_matvecs
    basis = _Basis(n, max_steps, dtype, basis_device)
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
        w = op.matvec(basis.row(j).to(op.device)).detach().to(basis_device)
        aq_norm[j] = torch.linalg.vector_norm(w)
        # Two classical Gram-Schmidt passes against the whole basis. The first pass also yields the
        # three-term recurrence (h[j] = alpha_j, h[j-1] = beta_{j-1}); the second removes what the
        # first left behind through rounding, which keeps Q orthonormal to working precision.
        h = basis.coefficients(w)
        w = basis.subtract(w, h)
        h2 = basis.coefficients(w)
        w = basis.subtract(w, h2)
        alpha[j] = h[j] + h2[j]
        b = torch.linalg.vector_norm(w)
        beta[j] = b
        if j + 1 < max_steps:
            # clamp: an exact breakdown (w = 0) must not produce NaN before the next host check
            # finds it; the rows written after a breakdown are discarded there.
            basis.append(w / b.clamp_min(tiny))

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
            return _LanczosProcess(
                alpha=alpha_h[:m_b].copy(),
                beta=beta_h[:m_b].copy(),
                basis=basis,
                num_steps=m_b,
                num_matvecs=op.num_matvecs - start_count,
                breakdown=True,
            )
        if m == max_steps or (should_stop is not None and should_stop(alpha_h, beta_h)):
            return _LanczosProcess(
                alpha=alpha_h,
                beta=beta_h,
                basis=basis,
                num_steps=m,
                num_matvecs=op.num_matvecs - start_count,
                breakdown=False,
            )
    raise AssertionError("unreachable: the loop returns at its last step")  # pragma: no cover


def _tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the tridiagonal with diagonal ``alpha`` and off-diagonal ``beta[:-1]``."""
    return scipy.linalg.eigh_tridiagonal(alpha, beta[: alpha.size - 1])


def _wanted_indices(m: int, which: str, k: int) -> np.ndarray:
    """Ascending indices of the k smallest and/or k largest of m sorted Ritz values (a union)."""
    kk = min(k, m)
    idx: set[int] = set()
    if which in ("both", "smallest"):
        idx.update(range(kk))
    if which in ("both", "largest"):
        idx.update(range(m - kk, m))
    return np.array(sorted(idx), dtype=np.int64)


def _ritz_residuals(beta_last: float, s: np.ndarray) -> np.ndarray:
    # ||A y_i - theta_i y_i|| = |beta_m| |s_{m,i}| because A Q_m = Q_m T_m + beta_m q_{m+1} e_m^T.
    return np.abs(beta_last * s[-1, :])


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LanczosResult:
    r"""Ritz pairs from :func:`lanczos` and what is needed to trust them.

    Attributes:
        eigenvalues: the requested Ritz values (the ``k`` smallest and/or ``k`` largest of
            :attr:`ritz_values`), ascending, float64 on the CPU. Fewer than ``2k`` when the Krylov
            space is smaller (tiny ``n`` or a breakdown), since the two ends then overlap.
        residuals: :math:`\|A y_i - \theta_i y_i\| = |\beta_m s_{m,i}|` for each of them.
        converged: ``residuals <= tol * max_i |theta_i|`` (bool tensor).
        eigenvectors: the Ritz vectors :math:`y_i = Q_m s_i` as columns, ``(n, len(eigenvalues))``,
            in the operator's dtype and on its device.
        ritz_values: all eigenvalues of the final :math:`T_m`, ascending, float64.
        alpha: diagonal of :math:`T_m`, float64 CPU, length :attr:`num_iters`.
        beta: float64 CPU, length :attr:`num_iters`: ``beta[:-1]`` is the off-diagonal of
            :math:`T_m` and ``beta[-1]`` the norm :math:`\beta_m` of the final residual vector.
        num_matvecs: products with the operator spent by this call (may exceed :attr:`num_iters`
            by fewer than ``check_every`` when a breakdown is found at a periodic check).
        num_iters: the Krylov dimension :math:`m` the result is computed from.
        which: the end(s) requested, ``"both"``, ``"largest"`` or ``"smallest"``.
        breakdown: True when the Krylov space became invariant (e.g. ``n`` was reached, or the
            start vector lies in the span of a few eigenvectors):
            :math:`\beta_m \le 100 \varepsilon \|A q_m\|`, :math:`\varepsilon` the dtype's
            machine epsilon. All Ritz values are then eigenvalues of ``A`` to working precision.
            Rounding often keeps :math:`\beta_m` above that level (e.g. for a low-rank operator,
            whose null space the start vector reaches): the run then goes on with a direction that
            is orthogonal to the basis but carries no new information, and stops by convergence,
            since all residuals are tiny.
        tol: the relative tolerance the :attr:`converged` flags were decided with.
    """

    eigenvalues: Tensor
    residuals: Tensor
    converged: Tensor
    eigenvectors: Tensor
    ritz_values: Tensor
    alpha: Tensor
    beta: Tensor
    num_matvecs: int
    num_iters: int
    which: str
    breakdown: bool
    tol: float

    @property
    def lambda_max(self) -> float | None:
        """The largest Ritz value, or None if ``which="smallest"``."""
        return float(self.eigenvalues[-1]) if self.which in ("both", "largest") else None

    @property
    def lambda_min(self) -> float | None:
        """The smallest Ritz value, or None if ``which="largest"``."""
        return float(self.eigenvalues[0]) if self.which in ("both", "smallest") else None

    @property
    def all_converged(self) -> bool:
        """Whether every requested Ritz pair met the tolerance."""
        return bool(self.converged.all())


def lanczos(
    op: SymmetricOperator,
    *,
    max_iters: int = 100,
    tol: float = 1e-8,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    which: str = "both",
    k: int = 1,
    basis_device: torch.device | str | None = None,
    check_every: int = _DEFAULT_CHECK_EVERY,
) -> LanczosResult:
    r"""Extreme eigenvalues of a symmetric operator by Lanczos with full re-orthogonalisation.

    After :math:`m` steps from a unit vector :math:`q_1`,

    .. math::

        A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^\top, \qquad
        T_m = \operatorname{tridiag}(\beta_{1:m-1}, \alpha_{1:m}, \beta_{1:m-1}),

    and each eigenpair :math:`T_m s_i = \theta_i s_i` gives a Ritz pair
    :math:`(\theta_i, y_i = Q_m s_i)` with residual
    :math:`\|A y_i - \theta_i y_i\| = |\beta_m s_{m,i}|`. Since :math:`A` is symmetric some
    eigenvalue lies within that residual of :math:`\theta_i`. The run stops when every requested
    pair satisfies

    .. math::

        |\beta_m s_{m,i}| \le \mathrm{tol} \cdot \max_j |\theta_j|,

    i.e. the tolerance is relative to the spectral scale seen so far (a lower bound on
    :math:`\|A\|`), so that it means the same for a Hessian with :math:`\|A\| = 10^{-3}` or
    :math:`10^{3}`. It also stops on breakdown (:math:`\beta_m \approx 0`: the Krylov space is
    invariant and the Ritz values are exact) and after ``min(max_iters, n)`` steps. The test runs
    every ``check_every`` steps, because it needs the coefficients on the host.

    Args:
        op: the symmetric operator.
        max_iters: the most Lanczos steps (= products), capped at ``op.size``. The basis holds one
            vector of size ``n`` per step taken, allocated in blocks of 16 as the run proceeds.
        tol: relative residual tolerance, see above. The default ``1e-8`` is for float64; with
            float32 operators use ``tol >= 1e-5`` (residuals cannot drop below rounding).
        v0: starting vector, shape ``(n,)``, the operator's dtype and device, nonzero. Default: a
            Gaussian vector from ``generator``.
        generator: a ``torch.Generator`` on the operator's device for the random start; ``None``
            uses a fresh generator seeded with 0 (reproducible, global RNG untouched). Ignored when
            ``v0`` is given.
        which: ``"both"`` ends of the spectrum (one Krylov space gives both), ``"largest"`` or
            ``"smallest"``.
        k: number of eigenvalues wanted at each requested end.
        basis_device: where to store the Lanczos basis (e.g. ``"cpu"`` to spare GPU memory);
            default the operator's device.
        check_every: test convergence and breakdown every this many steps (host syncs).

    Returns:
        A :class:`LanczosResult`.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range, or the operator returns non-finite values.

    Notes:
        A small residual certifies that :math:`\theta_i` is close to *some* eigenvalue, not that
        it is the largest: an eigenvector nearly orthogonal to the start vector, or one hidden in
        a tight cluster, can surface only after more steps (raise ``max_iters`` or ``k``, or lower
        ``tol``, if that matters). Like any Krylov method, Lanczos cannot see an eigenvector the
        start vector is orthogonal to, nor the multiplicity of an eigenvalue (one copy per
        distinct eigenvalue appears).

    Example:
        >>> import torch
        >>> from uba_auto.linear_operator import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.arange(-3.0, 7.0, dtype=torch.float64)))
        >>> result = lanczos(op)
        >>> round(result.lambda_max, 10), round(result.lambda_min, 10), result.all_converged
        (6.0, -3.0, True)
    """
    op = _check_operator(op)
    max_iters = _check_int("max_iters", max_iters, minimum=1)
    tol = _check_positive_float(
        "tol", tol, hint="; typical values are 1e-8 (float64), 1e-5 (float32)"
    )
    if not isinstance(which, str) or which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    k = _check_int("k", k, minimum=1)
    check_every = _check_int("check_every", check_every, minimum=1)
    needed = 2 * k if which == "both" else k
    if max_iters < needed:
        raise ValueError(
            f"max_iters={max_iters} is too small for k={k} with which={which!r}: need "
            f"max_iters >= {needed}{' (= 2k)' if which == 'both' else ' (= k)'}; raise max_iters "
            "(a few times that number is typical) or lower k"
        )
    q0 = _check_v0(v0, op) if v0 is not None else None
    basis_dev = _check_basis_device(basis_device, op)
    if q0 is None:
        q0 = _gaussian_unit_vector(op, _resolve_generator(generator, op))

    max_steps = min(max_iters, op.size)
    min_steps = min(needed, max_steps)

    def should_stop(alpha_h: np.ndarray, beta_h: np.ndarray) -> bool:
        if alpha_h.size < min_steps:
            return False
        theta, s = _tridiagonal_eigh(alpha_h, beta_h)
        idx = _wanted_indices(theta.size, which, k)
        scale = np.abs(theta).max()
        return bool((_ritz_residuals(beta_h[-1], s[:, idx]) <= tol * scale).all())

    proc = _run_lanczos(
        op,
        q0,
        max_steps=max_steps,
        basis_device=basis_dev,
        check_every=check_every,
        should_stop=should_stop,
    )
    m = proc.num_steps
    theta, s = _tridiagonal_eigh(proc.alpha, proc.beta)
    idx = _wanted_indices(m, which, k)
    residuals = _ritz_residuals(proc.beta[-1], s[:, idx])
    converged = residuals <= tol * np.abs(theta).max()
    s_wanted = torch.from_numpy(np.ascontiguousarray(s[:, idx])).to(
        device=basis_dev, dtype=op.dtype
    )
    eigenvectors = proc.basis.combine(s_wanted, m).to(op.device)
    return LanczosResult(
        eigenvalues=torch.from_numpy(theta[idx].copy()),
        residuals=torch.from_numpy(residuals),
        converged=torch.from_numpy(converged),
        eigenvectors=eigenvectors,
        ritz_values=torch.from_numpy(theta),
        alpha=torch.from_numpy(proc.alpha),
        beta=torch.from_numpy(proc.beta),
        num_matvecs=proc.num_matvecs,
        num_iters=m,
        which=which,
        breakdown=proc.breakdown,
        tol=tol,
    )
