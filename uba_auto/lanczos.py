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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from uba_auto._krylov import (
    DEFAULT_CHECK_EVERY,
    LanczosBasis,
    gaussian_unit_vector,
    ritz_residuals,
    run_lanczos,
    tridiagonal_eigh,
)
from uba_auto._validation import (
    check_basis_device,
    check_int,
    check_operator,
    check_positive_finite,
    check_v0,
    resolve_generator,
)
from uba_auto.linear_operator import SymmetricOperator

__all__ = ["LanczosResult", "lanczos"]

_WHICH = ("both", "largest", "smallest")


def _check_basis_dtype(basis_dtype: object) -> torch.dtype | None:
    """``basis_dtype``: ``None`` or a floating ``torch.dtype``."""
    if basis_dtype is None:
        return None
    if not isinstance(basis_dtype, torch.dtype) or not basis_dtype.is_floating_point:
        raise TypeError(
            "basis_dtype must be None (the operator's dtype) or a floating torch.dtype such as "
            f"torch.float16, got {basis_dtype!r}"
        )
    return basis_dtype


def _wanted_indices(m: int, which: str, k: int) -> np.ndarray:
    """Ascending indices of the k smallest and/or k largest of m sorted Ritz values (a union)."""
    kk = min(k, m)
    idx: set[int] = set()
    if which in ("both", "smallest"):
        idx.update(range(kk))
    if which in ("both", "largest"):
        idx.update(range(m - kk, m))
    return np.array(sorted(idx), dtype=np.int64)


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
        ritz_values: all eigenvalues of the final :math:`T_m`, ascending, float64 CPU.
        ritz_residuals: the residual :math:`|\beta_m s_{m,i}|` of every Ritz value in
            :attr:`ritz_values`, same order, float64 CPU (:attr:`residuals` is its restriction to
            :attr:`eigenvalues`). With them a caller reads any Ritz pair's accuracy, e.g. the
            smallest positive one, without solving :math:`T_m` again.
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
    ritz_residuals: Tensor  # last: the fields before it keep their positions

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
    check_every: int = DEFAULT_CHECK_EVERY,
    basis_dtype: torch.dtype | None = None,
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
            vector of size ``n`` per step taken, allocated in blocks of 4 as the run proceeds.
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
        basis_dtype: store the basis in this floating dtype; ``None`` (default): the operator's.
            A narrower one (e.g. ``torch.float16`` for a float32 operator,
            :func:`~uba_auto._krylov.compact_dtype`) keeps the two newest vectors in the
            operator's dtype too, so the tridiagonal is computed at full precision and only the
            re-orthogonalisation against older vectors and the Ritz vectors see the storage's
            rounding (about :math:`2^{-11}` relative in float16); the memory is about half.

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
    op = check_operator(op)
    max_iters = check_int("max_iters", max_iters, minimum=1)
    tol = check_positive_finite(
        "tol", tol, hint="; typical values are 1e-8 (float64), 1e-5 (float32)"
    )
    if not isinstance(which, str) or which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    k = check_int("k", k, minimum=1)
    check_every = check_int("check_every", check_every, minimum=1)
    needed = 2 * k if which == "both" else k
    if max_iters < needed:
        raise ValueError(
            f"max_iters={max_iters} is too small for k={k} with which={which!r}: need "
            f"max_iters >= {needed}{' (= 2k)' if which == 'both' else ' (= k)'}; raise max_iters "
            "(a few times that number is typical) or lower k"
        )
    q0 = check_v0(v0, op) if v0 is not None else None
    basis_dev = check_basis_device(basis_device, op)
    if q0 is None:
        q0 = gaussian_unit_vector(op, resolve_generator(generator, op))
    return solve_lanczos(
        op,
        q0,
        max_iters=max_iters,
        tol=tol,
        which=which,
        k=k,
        basis_device=basis_dev,
        check_every=check_every,
        basis_dtype=_check_basis_dtype(basis_dtype),
    )


def solve_lanczos(
    op: SymmetricOperator,
    q0: Tensor,
    *,
    max_iters: int,
    tol: float,
    which: str,
    k: int,
    basis_device: torch.device,
    check_every: int,
    product: Callable[[Tensor, LanczosBasis], Tensor] | None = None,
    stop: Callable[[np.ndarray, np.ndarray, float, bool], bool] | None = None,
    basis_dtype: torch.dtype | None = None,
) -> LanczosResult:
    """:func:`lanczos` on checked arguments (internal), with two hooks for the probe.

    Args:
        product: computes each product in place of ``op.matvec``
            (:func:`~uba_auto._krylov.run_lanczos`).
        stop: ``stop(theta, s, beta_m, tol_met)`` decides, at each check, whether the run ends,
            from the eigenpairs of the current tridiagonal (solved once per check, for both
            tests), the norm of the last residual vector and ``tol_met``, whether every requested
            Ritz pair meets ``tol``. Default: stop when it does.
        basis_dtype: the basis' storage (:class:`~uba_auto._krylov.LanczosBasis`).
    """
    needed = 2 * k if which == "both" else k
    max_steps = min(max_iters, op.size)
    min_steps = min(needed, max_steps)

    def should_stop(alpha_h: np.ndarray, beta_h: np.ndarray) -> bool:
        if stop is None and alpha_h.size < min_steps:
            return False
        theta, s = tridiagonal_eigh(alpha_h, beta_h)
        tol_met = False
        if alpha_h.size >= min_steps:
            idx = _wanted_indices(theta.size, which, k)
            scale = np.abs(theta).max()
            tol_met = bool((ritz_residuals(beta_h[-1], s[:, idx]) <= tol * scale).all())
        return tol_met if stop is None else stop(theta, s, float(beta_h[-1]), tol_met)

    proc = run_lanczos(
        op,
        q0,
        max_steps=max_steps,
        basis_device=basis_device,
        check_every=check_every,
        should_stop=should_stop,
        product=product,
        basis_dtype=basis_dtype,
    )
    m = proc.num_steps
    theta, s = tridiagonal_eigh(proc.alpha, proc.beta)
    idx = _wanted_indices(m, which, k)
    all_residuals = ritz_residuals(proc.beta[-1], s)
    residuals = all_residuals[idx]
    converged = residuals <= tol * np.abs(theta).max()
    s_wanted = torch.from_numpy(np.ascontiguousarray(s[:, idx])).to(
        device=basis_device, dtype=op.dtype
    )
    eigenvectors = proc.basis.combine(s_wanted, m).to(op.device)
    return LanczosResult(
        eigenvalues=torch.from_numpy(theta[idx].copy()),
        residuals=torch.from_numpy(residuals),
        converged=torch.from_numpy(converged),
        eigenvectors=eigenvectors,
        ritz_values=torch.from_numpy(theta),
        ritz_residuals=torch.from_numpy(all_residuals),
        alpha=torch.from_numpy(proc.alpha),
        beta=torch.from_numpy(proc.beta),
        num_matvecs=proc.num_matvecs,
        num_iters=m,
        which=which,
        breakdown=proc.breakdown,
        tol=tol,
    )
