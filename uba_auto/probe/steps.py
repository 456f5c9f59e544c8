r"""The probe's steps on a curvature operator, each returning a typed result.

:func:`extremes` finds both ends of the spectrum of one operator; :func:`per_batch_curvature`
measures what each batch alone shows, given a ``batch_operator(i)`` that yields batch ``i``'s
operator. The trace and the density are the solvers' own results
(:class:`~uba_auto.trace.TraceEstimate`, :class:`~uba_auto.slq.SpectralDensity`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._krylov import gaussian_unit_vector, tridiagonal_eigh
from .._validation import check_v0
from ..lanczos import LanczosResult, lanczos, solve_lanczos
from ..linear_operator import SymmetricOperator
from ..power_iteration import power_iteration
from .projected import DECISION_RULE, BatchProjections, DecisionMonitor, DecisionPoint, DecisionRule

__all__ = [
    "START_MIX",
    "WARM_START_RULE",
    "Extremes",
    "PerBatchCurvature",
    "ProjectedExtremes",
    "extremes",
    "gradient_start",
    "per_batch_curvature",
    "projected_extremes",
    "smallest_positive",
    "spread",
    "warm_start",
]


@dataclass(frozen=True)
class Extremes:
    r"""Both ends of a spectrum and how far to trust them.

    Attributes:
        lambda_max, lambda_min: the largest and smallest eigenvalue estimates.
        lambda_min_positive: the smallest positive Ritz value (Lanczos) or ``lambda_min`` when it
            is positive (power iteration); ``None`` if there is none.
        residuals: :math:`\|Ay - \theta y\|` by name (``"lambda_max"``, ``"lambda_min"`` and,
            when there is one, ``"lambda_min_positive"``).
        converged: whether each met the tolerance (same keys).
        top_vector: the unit eigenvector estimate of ``lambda_max``.
        num_matvecs: products with the operator spent.
    """

    lambda_max: float
    lambda_min: float
    lambda_min_positive: float | None
    residuals: dict[str, float]
    converged: dict[str, bool]
    top_vector: Tensor
    num_matvecs: int

    @property
    def ends_converged(self) -> bool:
        """Whether both ends converged (the interior positive value is not required to)."""
        return all(ok for k, ok in self.converged.items() if k != "lambda_min_positive")


def smallest_positive(ritz_values: Tensor, ritz_residuals: Tensor) -> tuple[float, float] | None:
    """The smallest Ritz value clearly above zero and its residual, or ``None``.

    Values within rounding of zero (``1e3`` machine epsilons of the spectral scale) are not
    "positive curvature".

    Example:
        >>> theta = torch.tensor([-1.0, 1e-17, 0.5, 2.0], dtype=torch.float64)
        >>> smallest_positive(theta, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
        (0.5, 0.3)
    """
    theta = ritz_values.numpy()
    scale = np.abs(theta).max() if theta.size else 0.0
    positive = np.flatnonzero(theta > 1e3 * np.finfo(np.float64).eps * scale)
    if positive.size == 0:
        return None
    i = int(positive[0])
    return float(theta[i]), float(ritz_residuals[i])


def _extremes_of(res: LanczosResult, tol: float) -> Extremes:
    residuals = {"lambda_max": float(res.residuals[-1]), "lambda_min": float(res.residuals[0])}
    converged = {"lambda_max": bool(res.converged[-1]), "lambda_min": bool(res.converged[0])}
    positive = smallest_positive(res.ritz_values, res.ritz_residuals)
    if positive is not None:
        scale = float(res.ritz_values.abs().max())
        residuals["lambda_min_positive"] = positive[1]
        converged["lambda_min_positive"] = bool(positive[1] <= tol * scale)
    return Extremes(
        lambda_max=float(res.eigenvalues[-1]),
        lambda_min=float(res.eigenvalues[0]),
        lambda_min_positive=None if positive is None else positive[0],
        residuals=residuals,
        converged=converged,
        top_vector=res.eigenvectors[:, -1],
        num_matvecs=res.num_matvecs,
    )


def _lanczos_extremes(
    op: SymmetricOperator,
    max_iters: int,
    tol: float,
    generator: torch.Generator,
    basis_device: torch.device | str | None,
    basis_dtype: torch.dtype | None = None,
) -> Extremes:
    res = lanczos(
        op,
        max_iters=max_iters,
        tol=tol,
        generator=generator,
        which="both",
        basis_device=basis_device,
        basis_dtype=basis_dtype,
    )
    return _extremes_of(res, tol)


@dataclass(frozen=True)
class ProjectedExtremes:
    """What :func:`projected_extremes` finds.

    Attributes:
        extremes: both ends of the mean operator, as :func:`extremes` gives them.
        top_curvature: the curvature each batch shows along the final top Ritz vector.
        decision: where the decision rule was met
            (:class:`~uba_auto.probe.projected.DecisionPoint`).
    """

    extremes: Extremes
    top_curvature: tuple[float, ...]
    decision: DecisionPoint | None


def projected_extremes(
    batch_ops: Sequence[SymmetricOperator],
    weights: Sequence[float],
    *,
    max_iters: int,
    tol: float,
    generator: torch.Generator,
    basis_device: torch.device | str | None = None,
    budget_steps: int | None = None,
    rule: DecisionRule = DECISION_RULE,
    basis_dtype: torch.dtype | None = None,
    v0: Tensor | None = None,
) -> ProjectedExtremes:
    r"""Both ends of :math:`\sum_b c_b A_b` by Lanczos, with each batch's curvature along the top
    Ritz vector at no extra product (:mod:`uba_auto.probe.projected`).

    Args:
        batch_ops, weights: the batches' operators :math:`A_b` and coefficients :math:`c_b`.
        max_iters, tol, generator, basis_device: as for :func:`extremes` (the start vector is
            drawn as there, so the run is that of :func:`extremes` on the mean, up to the
            rounding of the sum).
        budget_steps: ``None``: stop when both ends meet ``tol`` (or at ``max_iters``). Else the
            budgeted stop: first the decision ``rule``, whatever it costs (up to its
            ``max_steps``), then on only while both ends miss ``tol`` and fewer than
            ``budget_steps`` steps were taken.
        rule: the decision rule.
        basis_dtype: the basis' storage (``None``: the operators' dtype; see
            :class:`~uba_auto._krylov.LanczosBasis`).
        v0: the start vector (checked and normalised as :func:`~uba_auto.lanczos.lanczos`'s;
            ``None``: a Gaussian vector from ``generator``, which is not drawn from otherwise).

    Example:
        >>> from uba_auto.linear_operator import DenseOperator
        >>> mats = [torch.diag(torch.tensor([d, 1.0, 0.5], dtype=torch.float64)) for d in (3, 5)]
        >>> pe = projected_extremes([DenseOperator(m) for m in mats], [0.5, 0.5], max_iters=3,
        ...                         tol=1e-10, generator=torch.Generator().manual_seed(0))
        >>> round(pe.extremes.lambda_max, 8), [round(c, 8) for c in pe.top_curvature]
        (4.0, [3.0, 5.0])
    """
    first = batch_ops[0]
    basis_dev = torch.device(basis_device) if basis_device is not None else first.device
    steps = min(max_iters, first.size)
    projections = BatchProjections(batch_ops, weights, steps, first.dtype, basis_dev)
    monitor = DecisionMonitor(projections, rule)

    def stop(theta: np.ndarray, s: np.ndarray, beta_m: float, tol_met: bool) -> bool:
        decided = monitor.update(theta, s, beta_m)
        if budget_steps is None:
            return tol_met
        return decided and (tol_met or theta.size >= budget_steps)

    start = gaussian_unit_vector(first, generator) if v0 is None else check_v0(v0, first)
    del v0  # the normalised copy is what the run needs: the caller's vector may go (run_probe)
    res = solve_lanczos(
        first,
        start,
        max_iters=steps,
        tol=tol,
        which="both",
        k=1,
        basis_device=basis_dev,
        check_every=1,
        product=projections.product,
        stop=stop,
        basis_dtype=basis_dtype,
    )
    theta, s = tridiagonal_eigh(res.alpha.numpy(), res.beta.numpy())
    top = tuple(float(c) for c in projections.curvatures(s[:, -1], float(theta[-1])))
    ext = _extremes_of(res, tol)
    return ProjectedExtremes(extremes=ext, top_curvature=top, decision=monitor.final())


START_MIX = 0.1
"""Weight of the random unit vector in :func:`gradient_start`: enough that every eigenvector
has a share of the start (a Krylov space only reaches directions its start touches), small
enough that the gradient's alignment with the top of the spectrum is kept."""


def gradient_start(gradient: Tensor, generator: torch.Generator, mix: float = START_MIX) -> Tensor:
    r"""The Lanczos start :math:`(\hat g + \mu \hat r) / \|\hat g + \mu \hat r\|`, with
    :math:`\hat g` the unit loss gradient (in the operator's coordinates), :math:`\hat r` a unit
    Gaussian vector from ``generator`` and :math:`\mu` = ``mix``.

    A network's gradient lies mostly in the span of the Hessian's top eigenvectors (Gur-Ari,
    Roberts and Dyer 2018, "Gradient descent happens in a tiny subspace"), so Lanczos started there
    needs fewer products than from a random vector, at both ends (BENCHMARKS.md §1, "The gradient
    start"). The random part keeps every direction in reach; a gradient that is zero or not finite
    gives :math:`\hat r` alone. ``generator`` is drawn from exactly as for a random start (one
    Gaussian vector), so what the probe draws after the start is the same either way.

    Args:
        gradient: the flat gradient, in the operator's dtype and on its device.
        generator: the probe's generator.
        mix: :math:`\mu \ge 0`.

    Example:
        >>> g = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
        >>> v = gradient_start(g, torch.Generator().manual_seed(0), mix=0.0)
        >>> v.tolist()
        [1.0, 0.0, 0.0]
    """
    r = torch.randn(
        gradient.numel(), generator=generator, dtype=gradient.dtype, device=gradient.device
    )
    r /= torch.linalg.vector_norm(r)
    norm = torch.linalg.vector_norm(gradient)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return r
    v = gradient.reshape(-1) / norm
    v += mix * r
    return v / torch.linalg.vector_norm(v)


WARM_START_RULE = DecisionRule(min_steps=3)
"""The warm start's stop: :class:`~uba_auto.probe.projected.DecisionRule`'s residual test at 3
steps at least. Looser starts (``rtol`` 0.2-0.5, or at most 4-5 steps) changed the products of
the φ study's probes by -3 % to +2 %, and the one a pre-registered rule picked there (at most 4
steps) cost 20 % more on the benchmark models, whose mean run then needed more of its costlier
steps (``BENCHMARKS.md`` §1, "A decision at two steps")."""


def warm_start(
    op: SymmetricOperator,
    *,
    tol: float,
    generator: torch.Generator,
    basis_device: torch.device | str | None = None,
    basis_dtype: torch.dtype | None = None,
    rule: DecisionRule = WARM_START_RULE,
    v0: Tensor | None = None,
) -> Tensor:
    r"""The top Ritz vector of one batch's operator at the decision rule's precision: the start of
    the Lanczos run on the mean of all batches (:func:`projected_extremes` ``v0``).

    A step on one batch is one product where a step on the mean is one per batch, and one batch's
    top eigenvector is close to the mean's wherever the batches agree, so the run on the mean
    meets :class:`~uba_auto.probe.projected.DecisionRule` in fewer of its costly steps (each one
    product per batch). The answer is still the mean's: the start changes how fast Lanczos gets
    there, not where. Measured in ``benchmarks/warm_start.py`` (BENCHMARKS.md §1), including the
    case it is slow on: a top direction that lives in other batches than this one.

    Args:
        op: the operator of one batch.
        tol, generator, basis_device, basis_dtype: as for :func:`projected_extremes`.
        rule: stop at its residual test (``rtol``, at least ``min_steps`` steps, at most
            ``max_steps``).
        v0: the start of this run (``None``: a Gaussian vector from ``generator``).

    Example:
        >>> from uba_auto.linear_operator import DenseOperator
        >>> a = torch.diag(torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64))
        >>> v = warm_start(DenseOperator(a), tol=1e-10, generator=torch.Generator().manual_seed(0))
        >>> round(float(abs(v[0])), 6)
        1.0
    """
    found = projected_extremes(
        [op],
        [1.0],
        max_iters=rule.max_steps,
        tol=tol,
        generator=generator,
        basis_device=basis_device,
        budget_steps=0,
        rule=rule,
        basis_dtype=basis_dtype,
        v0=v0,
    )
    return found.extremes.top_vector


class _Shifted(SymmetricOperator):
    """``A - shift * I``: power iteration on it finds the end of the spectrum far from ``shift``."""

    def __init__(self, inner: SymmetricOperator, shift: float) -> None:
        super().__init__()
        self.inner, self.shift = inner, shift
        self.size, self.dtype, self.device = inner.size, inner.dtype, inner.device

    def _matvec(self, v: Tensor) -> Tensor:
        return self.inner.matvec(v) - self.shift * v


def _power_extremes(
    op: SymmetricOperator, max_iters: int, tol: float, generator: torch.Generator
) -> Extremes:
    # Half the budget for the dominant eigenvalue, half for the far end.
    half = max(1, max_iters // 2)
    dominant = power_iteration(op, max_iters=half, tol=tol, generator=generator)
    shifted = _Shifted(op, dominant.eigenvalue)
    far = power_iteration(shifted, max_iters=half, tol=tol, generator=generator)
    other = far.eigenvalue + dominant.eigenvalue
    hi, lo = (dominant, far) if dominant.eigenvalue >= other else (far, dominant)
    top, bottom = max(dominant.eigenvalue, other), min(dominant.eigenvalue, other)
    return Extremes(
        lambda_max=top,
        lambda_min=bottom,
        lambda_min_positive=bottom if bottom > 0 else None,
        residuals={"lambda_max": hi.residual, "lambda_min": lo.residual},
        converged={"lambda_max": hi.converged, "lambda_min": lo.converged},
        top_vector=hi.eigenvector,
        num_matvecs=dominant.num_matvecs + far.num_matvecs,
    )


def extremes(
    op: SymmetricOperator,
    *,
    method: str,
    max_iters: int,
    tol: float,
    generator: torch.Generator,
    basis_device: torch.device | str | None = None,
    basis_dtype: torch.dtype | None = None,
) -> Extremes:
    """Both ends of the spectrum of ``op``.

    Args:
        op: the operator.
        method: ``"lanczos"`` (one Krylov space gives both ends and the smallest positive Ritz
            value) or ``"power"`` (power iteration, then on ``op - lambda I`` for the far end,
            half of ``max_iters`` each).
        max_iters: the most products.
        tol: relative residual tolerance.
        generator: draws the start vectors.
        basis_device: where Lanczos keeps its basis.
        basis_dtype: its storage (``None``: the operator's dtype; see
            :class:`~uba_auto._krylov.LanczosBasis`).

    Example:
        >>> from uba_auto.linear_operator import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)))
        >>> ext = extremes(op, method="lanczos", max_iters=10, tol=1e-8,
        ...                generator=torch.Generator().manual_seed(0))
        >>> [round(x, 8) for x in (ext.lambda_max, ext.lambda_min, ext.lambda_min_positive)]
        [2.0, -1.0, 0.5]
    """
    if method == "lanczos":
        return _lanczos_extremes(op, max_iters, tol, generator, basis_device, basis_dtype)
    if method == "power":
        return _power_extremes(op, max_iters, tol, generator)
    raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")


def spread(values: Sequence[float]) -> float | None:
    """Sample standard deviation, or ``None`` with fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


@dataclass(frozen=True)
class PerBatchCurvature:
    r"""What each probed batch alone shows.

    Attributes:
        top_curvature: :math:`v^\top H_b v` for each batch :math:`b`, with :math:`v` the top
            eigenvector of the mean operator (one product per batch).
        lambda_max, lambda_min: each batch's extreme eigenvalues (empty unless asked for).
        unconverged: the batches whose extremes did not converge.
        num_matvecs: products with the per-batch operators (each a single-batch HVP).
    """

    top_curvature: tuple[float, ...]
    lambda_max: tuple[float, ...]
    lambda_min: tuple[float, ...]
    unconverged: tuple[int, ...]
    num_matvecs: int

    def curvature_noise(self, lambda_max: float) -> float | None:
        """Spread of :attr:`top_curvature` relative to ``lambda_max`` (``None`` if undefined)."""
        noise = spread(self.top_curvature)
        return noise / lambda_max if noise is not None and lambda_max > 0 else None


def per_batch_curvature(
    batch_operator: Callable[[int], SymmetricOperator],
    num_batches: int,
    top_vector: Tensor,
    batch_extremes: Callable[[SymmetricOperator], Extremes] | None = None,
) -> PerBatchCurvature:
    """The curvature each batch shows along ``top_vector`` and, optionally, its extremes.

    Args:
        batch_operator: ``batch_operator(i)`` is batch ``i``'s operator (one is held at a time).
        num_batches: how many batches.
        top_vector: the top eigenvector of the mean operator.
        batch_extremes: if given, run on each batch's operator (e.g. :func:`extremes` with the
            probe's settings).

    Example:
        >>> from uba_auto.linear_operator import DenseOperator
        >>> mats = [torch.diag(torch.tensor([d, 1.0], dtype=torch.float64)) for d in (1.0, 3.0)]
        >>> v = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> pb = per_batch_curvature(lambda i: DenseOperator(mats[i]), 2, v)
        >>> pb.top_curvature, pb.num_matvecs, round(pb.curvature_noise(2.0), 6)
        ((1.0, 3.0), 2, 0.707107)
    """
    top: list[float] = []
    maxima: list[float] = []
    minima: list[float] = []
    unconverged: list[int] = []
    num_matvecs = 0
    for i in range(num_batches):
        sub = batch_operator(i)
        top.append(float(top_vector @ sub.matvec(top_vector)))
        if batch_extremes is not None:
            ext = batch_extremes(sub)
            maxima.append(ext.lambda_max)
            minima.append(ext.lambda_min)
            if not ext.ends_converged:
                unconverged.append(i)
        num_matvecs += sub.num_matvecs
        del sub  # one batch's graph at a time
    return PerBatchCurvature(
        top_curvature=tuple(top),
        lambda_max=tuple(maxima),
        lambda_min=tuple(minima),
        unconverged=tuple(unconverged),
        num_matvecs=num_matvecs,
    )
