r"""Lanczos on a mean of batch curvatures that keeps each batch's projection, and the decision stop.

For :math:`A = \sum_b c_b A_b` every Lanczos product :math:`A q_j` is computed as the weighted sum
of the batches' products :math:`p_b = A_b q_j`, and each :math:`p_b` is projected on the basis
before it is dropped: column :math:`j` of :math:`T_b = Q^\top A_b Q`. For a Ritz vector
:math:`y = Q s` of the mean (:math:`T s = \theta s`) the curvature batch :math:`b` shows along it is

.. math::

    y^\top A_b y = s^\top T_b s \qquad \text{(exactly: } y \text{ lies in the span of } Q),

so the per-batch curvature along the current top Ritz vector, and its relative spread (the
curvature noise σ the φ links read), are known at every step for no product beyond those Lanczos
takes anyway (the probe used to spend one more product per batch on them afterwards). The memory
is one product vector at a time and :math:`B m^2` numbers.

That is what lets the probe stop at the precision the φ decision needs (:class:`DecisionRule`):
σ and λ_max settle long before λ_max meets the report's tolerance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .._krylov import LanczosBasis
from .._validation import check_int
from ..linear_operator import SymmetricOperator

__all__ = [
    "DECISION_RULE",
    "NOISE_CEILING_MARGIN",
    "BatchProjections",
    "DecisionMonitor",
    "DecisionPoint",
    "DecisionRule",
    "rule_for_link",
]


class BatchProjections:
    """The product hook of :func:`~uba_auto._krylov.run_lanczos` that records :math:`T_b`.

    Args:
        batch_ops: the operator of each batch (``op.batch_operator(b)``), weight 1 each.
        weights: :math:`c_b`, so that the mean is :math:`\\sum_b c_b A_b`.
        max_steps: the most Lanczos steps the run can take.
        dtype, device: of the projections (those of the basis).
    """

    def __init__(
        self,
        batch_ops: Sequence[SymmetricOperator],
        weights: Sequence[float],
        max_steps: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if len(batch_ops) != len(weights) or not batch_ops:
            raise ValueError("batch_ops and weights must be non-empty and of the same length")
        self.batch_ops, self.weights = list(batch_ops), [float(c) for c in weights]
        # One batch: T_0 is the run's own tridiagonal over c_0, nothing to project.
        self.single = len(batch_ops) == 1
        size = 0 if self.single else max_steps
        self.T = torch.zeros((len(batch_ops), size, size), dtype=dtype, device=device)

    def product(self, q: Tensor, basis: LanczosBasis) -> Tensor:
        """:math:`\\sum_b c_b A_b q` for ``q`` = the basis' last row, filling column ``j``."""
        if self.single:
            return self.batch_ops[0].matvec(q).detach() * self.weights[0]
        j = basis.rows - 1
        total = None
        for b, (op_b, c) in enumerate(zip(self.batch_ops, self.weights, strict=True)):
            p = op_b.matvec(q).detach()
            col = basis.coefficients(p.to(basis.device)).to(self.T.dtype)
            self.T[b, : j + 1, j] = col
            self.T[b, j, : j + 1] = col
            total = p * c if total is None else total.add_(p, alpha=c)
            del p
        return total

    def curvatures(self, s: np.ndarray, theta: float) -> np.ndarray:
        """:math:`s^\\top T_b s` for every batch, for the Ritz pair ``(theta, s)`` of the mean
        (``s`` of length ``m``; with one batch, :math:`\\theta / c_0`)."""
        if self.single:
            return np.array([theta / self.weights[0]])
        m = s.shape[0]
        t = self.T[:, :m, :m].to("cpu", torch.float64).numpy()
        return np.einsum("i,bij,j->b", s, t, s)


def noise(curvatures: np.ndarray, lambda_max: float) -> float | None:
    """The curvature noise: sample std of the per-batch curvatures over ``lambda_max``."""
    if curvatures.size < 2 or not lambda_max > 0:
        return None
    return float(np.std(curvatures, ddof=1) / lambda_max)


@dataclass(frozen=True)
class DecisionRule:
    r"""When the Lanczos run knows enough for the φ decision (the constants are fixed, see below).

    At step :math:`m \ge` ``min_steps``, with :math:`\theta_m` the top Ritz value, :math:`r_m` its
    residual and :math:`\sigma_m` the curvature noise along its Ritz vector:

    .. math::

        r_m \le \text{rtol}\,\max_i |\theta_i| \quad\text{and}\quad
        \Big(|\sigma_m - \sigma_{m-1}|
        \le \text{noise\_change}\cdot\max(\sigma_m, \text{noise\_floor})
        \ \text{or}\ \min(\sigma_m, \sigma_{m-1}) \ge \text{noise\_ceiling}\Big).

    With one batch only the residual test applies. ``max_steps``: the decision is taken there at
    the latest (with a note), so a run whose σ keeps moving cannot spend the whole budget on it.

    The constants were fixed on the Lanczos trajectories of the 24 cells of the φ study (every
    task and seed of ``benchmarks/results/phi_validation.json``, 8 batches each) and of the MLP,
    CNN and transformer of the probe benchmark (``python benchmarks/phi_decision_check.py`` reruns
    the check): σ moves by less than its own sampling error across 8 batches (about 27 %) once the
    top residual is 0.1, and λ_max is then within a few percent (its error falls as
    :math:`r^2/\text{gap}`). ``noise_floor`` is the gated link's gate (0.05): below it σ moves φ,
    above it φ is cosine whatever σ is.

    ``min_steps`` was 3 until 2026-12-07 and is 2 (the settled test needs two steps anyway):
    pre-registered on the φ study's 27 probes (total HVPs 887 → 815, no φ moved by more than
    0.1 against the 16-step reference, median λ_max error unchanged), then confirmed on sets
    kept out of that choice, the four benchmark models (140 → 132 HVPs, the transformer's
    decision 3 → 2 steps) and the representative tasks (402 → 394), with no φ newly off
    (``BENCHMARKS.md`` §1, "A decision at two steps"). The warm start keeps 3
    (:data:`~uba_auto.probe.steps.WARM_START_RULE`).

    ``noise_ceiling`` (default ``None``: off): σ at or above it at this step and the previous one
    counts as settled, for a reader whose φ does not move with σ up there. ``auto_uba`` sets it
    to 4 times the gate for the gated links (:func:`rule_for_link`: any σ above the gate gives
    them φ = 2), where a σ of 1.15 otherwise held the ResNet's decision to 5 steps, moving by more
    than 10 % a step. Pre-registered with the margin 4 and tested like ``min_steps`` (φ study
    783 against 815 HVPs, benchmark models 124 against 132, representative tasks 378 against
    394, no φ newly off; σ's median error 2.2 % → 3.7 % on the models, which the gated links do
    not read above the gate).
    """

    rtol: float = 0.1
    noise_change: float = 0.1
    noise_floor: float = 0.05
    min_steps: int = 2
    max_steps: int = 20
    noise_ceiling: float | None = None

    def __post_init__(self) -> None:
        for name in ("rtol", "noise_change", "noise_floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("min_steps", "max_steps"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        if self.min_steps > self.max_steps:
            raise ValueError(
                f"min_steps ({self.min_steps}) must be <= max_steps ({self.max_steps})"
            )
        ceiling = self.noise_ceiling
        if ceiling is not None and (
            isinstance(ceiling, bool) or not isinstance(ceiling, (int, float)) or not ceiling > 0
        ):
            raise ValueError(f"noise_ceiling must be None (off) or a number > 0, got {ceiling!r}")

    def settled(self, sigma: float | None, previous: float | None) -> bool:
        """The σ half of the rule: σ at this step (``None``: one batch, nothing to settle) against
        σ at the previous step (``None``: none yet)."""
        if sigma is None:
            return True
        if previous is None:
            return False
        if abs(sigma - previous) <= self.noise_change * max(sigma, self.noise_floor):
            return True
        return self.noise_ceiling is not None and min(sigma, previous) >= self.noise_ceiling


DECISION_RULE = DecisionRule()
"""The rule the probe uses (:class:`DecisionRule`'s defaults)."""

NOISE_CEILING_MARGIN = 4.0
""":func:`rule_for_link`'s ``noise_ceiling`` over the σ above which a link's φ stops moving: a
σ from 8 batches has a sampling error of about 27 %, so one measured at 4 times the gate is far
from falling below it."""


def rule_for_link(noise_flat_above: float | None) -> DecisionRule:
    """The decision rule for a φ link whose φ does not move with σ at or above
    ``noise_flat_above`` (``None``: it always may): :data:`DECISION_RULE` with ``noise_ceiling``
    :data:`NOISE_CEILING_MARGIN` times that σ.

    Example:
        >>> rule_for_link(0.05).noise_ceiling, rule_for_link(None) == DECISION_RULE
        (0.2, True)
    """
    if noise_flat_above is None:
        return DECISION_RULE
    return dataclasses.replace(DECISION_RULE, noise_ceiling=NOISE_CEILING_MARGIN * noise_flat_above)


@dataclass(frozen=True)
class DecisionPoint:
    """Where the decision rule was met (or given up on).

    Attributes:
        steps: Lanczos steps taken then.
        lambda_max: the top Ritz value then.
        curvature_noise: σ along its Ritz vector then (``None`` with one batch).
        residual: the top Ritz pair's residual relative to the spectral scale.
        reached: whether the rule was met (``False``: taken at ``max_steps`` or at the run's end).
    """

    steps: int
    lambda_max: float
    curvature_noise: float | None
    residual: float
    reached: bool


@dataclass
class DecisionMonitor:
    """Follows a projected Lanczos run step by step and records when :attr:`rule` is met.

    Call :meth:`update` with the run's tridiagonal eigenpairs after every step
    (``check_every=1``).
    """

    projections: BatchProjections
    rule: DecisionRule = DECISION_RULE
    point: DecisionPoint | None = None
    _last_noise: float | None = field(default=None, repr=False)
    _last: DecisionPoint | None = field(default=None, repr=False)

    def update(self, theta: np.ndarray, s: np.ndarray, beta_m: float) -> bool:
        """Take the step whose tridiagonal has eigenpairs ``(theta, s)`` (ascending) and last
        residual norm ``beta_m`` into account; return whether the decision is taken."""
        if self.point is not None:
            return True
        m = theta.size
        top = s[:, -1]
        scale = float(np.abs(theta).max())
        residual = float(abs(beta_m * top[-1]) / scale) if scale > 0 else float("inf")
        sigma = noise(self.projections.curvatures(top, float(theta[-1])), float(theta[-1]))
        previous, self._last_noise = self._last_noise, sigma
        self._last = DecisionPoint(m, float(theta[-1]), sigma, residual, False)
        if m < self.rule.min_steps or not theta[-1] > 0:
            return False
        if residual <= self.rule.rtol and self.rule.settled(sigma, previous):
            self.point = DecisionPoint(m, float(theta[-1]), sigma, residual, True)
        elif m >= self.rule.max_steps:
            self.point = self._last
        return self.point is not None

    def final(self) -> DecisionPoint | None:
        """The decision point, or the last step seen when the run ended before the rule."""
        return self.point if self.point is not None else self._last
