r"""The κ→φ links and their registry :data:`LINKS` (see :mod:`uba_auto.phi` for the math).

Each link is a :class:`Link`: the condition number it reads, its curve φ(κ, e) and the reason it
gives. Calling a link maps plain numbers (:class:`LinkInputs` and the run's peak rate, steps left,
clamp and edge fraction) to a :class:`PhiChoice`; :func:`link_inputs` is the one place that reads
a :class:`~uba_auto.probe.CurvatureEstimate`.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .._validation import check_int, check_positive_finite
from ._bands import budget_condition_number, minibatch_condition_number

if TYPE_CHECKING:
    from ..probe import CurvatureEstimate


PHI_MIN = 0.25
PHI_MAX = 16.0
FALLBACK_PHI = 2.0
"""φ used when no κ can be formed (no positive curvature): cosine annealing."""

# Fitted by `python benchmarks/calibrate_phi.py` (see BENCHMARKS.md for the data and the fit).
KAPPA_COSINE = 1.175
"""The minibatch condition number at which the calibrated link picks cosine (φ = 2)."""
SENSITIVITY = 0.5
"""The power ``p`` of the calibrated link."""
GATE_NOISE = 0.05
"""The curvature noise at and above which the gated link picks cosine (φ = 2): below every
minibatch task of our study (σ ≥ 0.067 per seed), above full-batch training (σ = 0)."""
EDGE_FRACTION = 0.038
"""The distance to the stability edge, ``peak_lr * lambda_max / stability_limit`` at
initialisation, below which the gated-edge link caps φ at :data:`EDGE_PHI` (fitted: the geometric
midpoint of 0.030 and 0.048, see BENCHMARKS.md, §2, finding 8). Fitted on SGD tasks only; for an
adaptive optimizer the same share of its own limit (on the preconditioned curvature) is used,
untested."""
EDGE_PHI = 1.0
"""The gated-edge link's φ for a peak rate far below the stability edge."""
HOLD_LINK_PHI = 0.25
"""The hold link's φ for a self-stabilising run (:func:`~uba_auto.phi.self_stabilising`).
Pre-registered (``benchmarks/results/prereg_hold_rule.md``): of 1/32, 1/8, 1/4, 1/2 and 1, the
smallest mean regret over the six swept cells of such runs (gpt_adamw, vit_adamw, resnet_bn at
two budgets each)."""
HOLD_EDGE_GUARD = 1.0
"""Without a warm-up, the hold link gives the gated φ when the peak rate at initialisation is at
least this share of the optimizer's stability limit (the limit itself: a theory constant)."""


# The curves: unclamped φ of κ and the edge fraction (read by the gated-edge link only).


def _gated_curve(kappa: float, edge_fraction: float | None) -> float:
    gate = minibatch_condition_number(GATE_NOISE)
    return 2.0 * min(1.0, (kappa - 1.0) / (gate - 1.0))


def _gated_edge_curve(kappa: float, edge_fraction: float | None) -> float:
    raw = _gated_curve(kappa, None)
    if edge_fraction is not None and edge_fraction < EDGE_FRACTION:
        raw = min(raw, EDGE_PHI)
    return raw


def _calibrated_curve(kappa: float, edge_fraction: float | None) -> float:
    if math.isinf(kappa):
        return math.inf
    return 2.0 * ((kappa - 1.0) / (KAPPA_COSINE - 1.0)) ** SENSITIVITY


def _chebyshev_curve(kappa: float, edge_fraction: float | None) -> float:
    return 2.0 * kappa


# The reasons each link gives (what the report prints).


def _gated_reason(name: str, noise: float, kappa: float, edge_fraction: float | None) -> str:
    return f"{name} link: curvature noise sigma = {noise:.3g} " + (
        f">= {GATE_NOISE:g}: minibatch noise, cosine (phi = 2)"
        if noise >= GATE_NOISE
        else f"< {GATE_NOISE:g}: (nearly) noise-free, keep the rate high longer; "
        f"phi = 2 (kappa_mb - 1)/(kappa_gate - 1)"
    )


def _gated_edge_reason(name: str, noise: float, kappa: float, edge_fraction: float | None) -> str:
    head = _gated_reason(name, noise, kappa, edge_fraction)
    return head + "; then " + _edge_reason(edge_fraction, _gated_curve(kappa, None))


def _edge_reason(edge_fraction: float | None, noise_phi: float) -> str:
    if edge_fraction is None:
        return (
            "edge gate off: no stability limit known (it is read from the optimizer given to "
            "auto_uba or make_scheduler: SGD, Adam/AdamW, Adagrad or RMSprop; an adaptive one "
            "must be given to auto_uba, so that the probe measures the curvature it sees)"
        )
    head = f"the peak rate is {edge_fraction:.3g} of the optimizer's stability limit at init"
    if edge_fraction >= EDGE_FRACTION:
        return f"{head} (>= {EDGE_FRACTION:g}): no edge cap"
    if noise_phi <= EDGE_PHI:
        return f"{head} (< {EDGE_FRACTION:g}): the edge cap {EDGE_PHI:g} is above that phi already"
    return (
        f"{head} (< {EDGE_FRACTION:g}): far below the edge, keep the rate high longer, phi "
        f"capped at {EDGE_PHI:g}"
    )


def _calibrated_reason(name: str, noise: float, kappa: float, edge_fraction: float | None) -> str:
    return (
        f"calibrated link: curvature noise sigma = {noise:.3g} -> kappa_mb = {kappa:.4g}; "
        f"phi = 2 ((kappa_mb - 1)/({KAPPA_COSINE:g} - 1))^{SENSITIVITY:g}"
    )


def _chebyshev_reason(name: str, noise: float, kappa: float, edge_fraction: float | None) -> str:
    return f"phi = 2 kappa (Chebyshev min-max on the band, theory-only link), kappa = {kappa:.4g}"


@dataclass(frozen=True)
class PhiChoice:
    """φ and how it was reached (what the report prints)."""

    phi: float
    phi_unclamped: float
    clamped: bool
    kappa: float | None
    kappa_kind: str
    link: str
    reason: str
    warnings: tuple[str, ...] = field(default=())
    edge_fraction: float | None = None
    held_by: str | None = None
    """The hold link's reason to hold the rate (the run's :func:`~uba_auto.phi.self_stabilising`
    text) when it did; ``None`` for every other choice."""


@dataclass(frozen=True)
class LinkInputs:
    """The measured numbers a link reads (from a probe: :func:`link_inputs`).

    Attributes:
        lambda_max: the largest eigenvalue of the curvature.
        lambda_min_positive: the smallest positive eigenvalue resolved, or None.
        curvature_noise: σ, the relative spread across minibatches of the curvature along the top
            eigenvector, or None when it was not measured.
        num_batches: how many batches the numbers come from.
        method: how they were measured (named in the fallback warning).
    """

    lambda_max: float
    lambda_min_positive: float | None
    curvature_noise: float | None
    num_batches: int
    method: str = "lanczos"


def link_inputs(estimate: CurvatureEstimate | Any) -> LinkInputs:
    """The numbers of a :class:`~uba_auto.probe.CurvatureEstimate` that the links read.

    The one place that reads an estimate: any object with these attributes will do.
    """
    return LinkInputs(
        lambda_max=estimate.lambda_max,
        lambda_min_positive=estimate.lambda_min_positive,
        curvature_noise=estimate.curvature_noise,
        num_batches=estimate.num_batches,
        method=estimate.method,
    )


@dataclass(frozen=True)
class Link:
    """A κ→φ link of :data:`LINKS`: which condition number it reads, and its curve.

    Calling it chooses φ from plain numbers (:class:`LinkInputs` and the keyword arguments of
    :func:`choose_phi`); it reads nothing else, so the same numbers always give the same
    :class:`PhiChoice`.

    Attributes:
        name: its key in :data:`LINKS`.
        band: ``"minibatch"`` (κ_mb, from the curvature noise) or ``"budget"`` (κ_T, from the
            spectrum, the peak rate and the steps left).
        curve: the unclamped φ as a function of κ and the edge fraction ``e``.
        reason: the reason text, from (name, curvature noise σ, κ, e).
        reads_edge: whether ``e`` enters the curve (otherwise it is ignored, and not reported).
        noise_flat_above: the curvature noise σ at or above which φ no longer moves with σ
            (the gated links: the gate, where φ is 2 whatever σ is); ``None``: φ may move with
            σ anywhere. ``auto_uba`` lets its probe's decision stop waiting on σ well above it
            (:func:`~uba_auto.probe.projected.rule_for_link`).
        holds: the hold link: φ = :data:`HOLD_LINK_PHI` for a self-stabilising run (the
            ``stabiliser`` argument), else the curve's φ; see :meth:`__call__`.
    """

    name: str
    band: str
    curve: Callable[[float, float | None], float]
    reason: Callable[[str, float, float, float | None], str]
    reads_edge: bool = False
    noise_flat_above: float | None = None
    holds: bool = False

    def __post_init__(self) -> None:
        if self.band not in ("minibatch", "budget"):
            raise ValueError(f"band must be 'minibatch' or 'budget', got {self.band!r}")

    def phi(
        self, kappa: float, phi_min: float, phi_max: float, edge: float | None
    ) -> tuple[float, float]:
        """``(unclamped, clamped)`` φ at the condition number ``kappa``, arguments checked."""
        if not isinstance(kappa, (int, float)) or math.isnan(kappa) or kappa < 1:
            raise ValueError(f"kappa must be a condition number >= 1, got {kappa!r}")
        phi_min = check_positive_finite("phi_min", phi_min)
        phi_max = check_positive_finite("phi_max", phi_max)
        if phi_min > phi_max:
            raise ValueError(f"phi_min must be <= phi_max, got {phi_min} > {phi_max}")
        if edge is not None and not (isinstance(edge, (int, float)) and edge >= 0):
            raise ValueError(f"edge_fraction must be a number >= 0 or None, got {edge!r}")
        raw = self.curve(kappa, edge if self.reads_edge else None)
        return raw, min(max(raw, phi_min), phi_max)

    def __call__(
        self,
        inputs: LinkInputs,
        *,
        peak_lr: float | None,
        budget: int,
        phi_min: float = PHI_MIN,
        phi_max: float = PHI_MAX,
        edge_fraction: float | None = None,
        stabiliser: str | None = None,
        warmup_steps: int = 0,
    ) -> PhiChoice:
        """Choose φ from measured numbers (see :func:`choose_phi` for the arguments)."""
        warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        if stabiliser is not None and not isinstance(stabiliser, str):
            raise TypeError(f"stabiliser must be a str or None, got {type(stabiliser).__name__}")
        choice = self._from_curve(
            inputs,
            peak_lr=peak_lr,
            budget=budget,
            phi_min=phi_min,
            phi_max=phi_max,
            edge=(edge_fraction if self.reads_edge else None),
        )
        if not self.holds:
            return choice
        return _hold(choice, phi_min, phi_max, stabiliser, warmup_steps)

    def _from_curve(
        self,
        inputs: LinkInputs,
        *,
        peak_lr: float | None,
        budget: int,
        phi_min: float,
        phi_max: float,
        edge: float | None,
    ) -> PhiChoice:
        lam = inputs.lambda_max
        if not (math.isfinite(lam) and lam > 0):
            note = (
                f"no positive curvature measured (lambda_max = {lam:.4g}): fell back to phi = "
                f"{FALLBACK_PHI:g} (cosine annealing). The model may sit at a saddle or maximum; "
                "probe later in training or with more batches"
            )
            return _fallback(self.name, "fallback: no positive curvature", [note], None)
        notes: list[str] = []
        if self.band == "budget":
            if peak_lr is None:
                raise ValueError(f"link={self.name!r} needs peak_lr (the run's peak learning rate)")
            kappa = budget_condition_number(lam, inputs.lambda_min_positive, peak_lr, budget)
            if kappa < 1:
                notes.append(
                    f"the curvature band is empty at this learning rate: 1/(peak_lr * budget) = "
                    f"{1 / (peak_lr * budget):.3g} exceeds lambda_max = {lam:.3g}, so kappa is "
                    "taken as 1"
                )
                kappa = 1.0
            kind = "budget band: lambda_max / max(smallest positive, 1/(peak_lr * budget))"
            why = self.reason(self.name, math.nan, kappa, edge)
        else:
            noise = inputs.curvature_noise
            if noise is None and inputs.num_batches > 1:
                note = (
                    f"curvature noise not available from method={inputs.method!r}: fell back to "
                    f"phi = {FALLBACK_PHI:g} (cosine annealing); use method='lanczos' for the "
                    f"{self.name} link"
                )
                why = "fallback: curvature noise not measured"
                return _fallback(self.name, why, [note], edge)
            if noise is None:
                noise = 0.0
                notes.append(
                    "one batch probed: curvature noise across minibatches not measurable, treated "
                    "as full-batch (kappa_mb = 1). For minibatch training probe >= 2 batches "
                    "(num_batches), or this phi is too small"
                )
            kappa = minibatch_condition_number(noise)
            kind = "minibatch sharpness band: (1 + sigma)/(1 - sigma), sigma = curvature noise"
            why = self.reason(self.name, noise, kappa, edge)
            if inputs.num_batches < 4:
                notes.append(
                    f"curvature noise from only {inputs.num_batches} batch(es): phi is uncertain; "
                    "probe more batches (num_batches >= 8 recommended)"
                )
        raw, phi = self.phi(kappa, phi_min, phi_max, edge)
        clamped = phi != raw
        if clamped:
            notes.append(
                f"phi {raw:.4g} clamped to {phi:g} (range [{phi_min:g}, {phi_max:g}], where the "
                "link was validated)"
            )
        return PhiChoice(phi, raw, clamped, kappa, kind, self.name, why, tuple(notes), edge)


def _hold(
    choice: PhiChoice, phi_min: float, phi_max: float, stabiliser: str | None, warmup_steps: int
) -> PhiChoice:
    """The hold link's choice: :data:`HOLD_LINK_PHI` for a self-stabilising run, unless it has no
    warm-up and starts at its stability edge; else ``choice`` (the gated curve's), said why."""
    gated = f"the gated curve reads phi = {choice.phi:.4g} ({choice.reason})"
    edge = choice.edge_fraction
    at_edge = not warmup_steps and edge is not None and edge >= HOLD_EDGE_GUARD
    if stabiliser is None or at_edge:
        why = (
            "not a self-stabilising run (no adaptive optimizer, no normalisation layer with "
            "weight decay, or no optimizer given)"
            if stabiliser is None
            else f"{stabiliser}, but without a warm-up the peak rate starts at {edge:.3g} of the "
            f"optimizer's stability limit (>= {HOLD_EDGE_GUARD:g}): a held rate is unsafe"
        )
        return replace(choice, reason=f"hold link: {why}; {gated}")
    phi = min(max(HOLD_LINK_PHI, phi_min), phi_max)
    notes = []
    if phi != HOLD_LINK_PHI:
        notes.append(f"phi {HOLD_LINK_PHI:g} clamped to {phi:g} (range [{phi_min:g}, {phi_max:g}])")
    if not warmup_steps and edge is None:
        notes.append(
            "hold link: the edge guard could not be checked (the optimizer's stability limit on "
            "the curvature it sees is unknown: pass the optimizer to auto_uba, or use a warm-up); "
            "without a warm-up a held rate at a peak past that limit is unsafe"
        )
    return replace(
        choice,
        phi=phi,
        phi_unclamped=HOLD_LINK_PHI,
        clamped=phi != HOLD_LINK_PHI,
        held_by=stabiliser,
        reason=(
            f"hold link: {stabiliser}: a self-stabilising run, so the rate is held near its peak "
            f"(phi = {HOLD_LINK_PHI:g}); {gated}"
        ),
        # the curve's notes about sigma (few batches, a clamp) are about a phi not used; a
        # fallback's note (no positive curvature) is kept: the report should still say it
        warnings=tuple(w for w in choice.warnings if choice.kappa is None) + tuple(notes),
    )


def _fallback(link: str, reason: str, notes: list[str], edge: float | None) -> PhiChoice:
    return PhiChoice(
        FALLBACK_PHI, FALLBACK_PHI, False, None, "none (fallback)", link, reason, tuple(notes), edge
    )


LINKS: Mapping[str, Link] = types.MappingProxyType(
    {
        link.name: link
        for link in (
            Link("gated", "minibatch", _gated_curve, _gated_reason, noise_flat_above=GATE_NOISE),
            Link(
                "gated-edge",
                "minibatch",
                _gated_edge_curve,
                _gated_edge_reason,
                True,
                noise_flat_above=GATE_NOISE,
            ),
            Link(
                "hold",
                "minibatch",
                _gated_curve,
                _gated_reason,
                True,
                noise_flat_above=GATE_NOISE,
                holds=True,
            ),
            Link("calibrated", "minibatch", _calibrated_curve, _calibrated_reason),
            Link("chebyshev", "budget", _chebyshev_curve, _chebyshev_reason),
        )
    }
)
"""The κ→φ links by name, the default ``"gated"`` first."""


def check_link(link: Any) -> str:
    """Return ``link`` if it names a link of :data:`LINKS`, else raise naming the allowed names.

    Example:
        >>> check_link("gated")
        'gated'
        >>> check_link("magic")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: link must be one of ('gated', 'gated-edge', ...), got 'magic'
    """
    if not isinstance(link, str) or link not in LINKS:
        raise ValueError(f"link must be one of {tuple(LINKS)}, got {link!r}")
    return link


def phi_from_condition_number(
    kappa: float,
    *,
    link: str = "gated",
    phi_min: float = PHI_MIN,
    phi_max: float = PHI_MAX,
    edge_fraction: float | None = None,
) -> float:
    r"""The κ→φ link, clamped to ``[phi_min, phi_max]``.

    ``link="gated"`` (default): :math:`\varphi = 2\min(1, (\kappa - 1)/(\kappa_g - 1))` with
    :math:`\kappa_g` the minibatch condition number at :data:`GATE_NOISE`.
    ``link="gated-edge"``: the same, capped at :data:`EDGE_PHI` when ``edge_fraction``
    (:func:`~uba_auto.phi.stability_fraction`) is below :data:`EDGE_FRACTION`; with
    ``edge_fraction=None`` (unknown) it equals the gated link.
    ``link="hold"``: the gated curve (its hold depends on the run's optimizer and model, which
    only :func:`choose_phi` reads).
    ``link="chebyshev"``: :math:`\varphi = 2\kappa` (κ of a curvature band, see
    :func:`~uba_auto.phi.budget_condition_number`). ``link="calibrated"``:
    :math:`\varphi = 2((\kappa - 1)/(\kappa_c - 1))^p` with κ the minibatch condition number
    (:func:`~uba_auto.phi.minibatch_condition_number`), :data:`KAPPA_COSINE` and
    :data:`SENSITIVITY`.

    Args:
        kappa: a condition number, >= 1 (``inf`` maps to ``phi_max``).
        link: one of :data:`LINKS`.
        phi_min, phi_max: the clamp.
        edge_fraction: the peak rate's distance to the stability edge (gated-edge link only).

    Example:
        >>> phi_from_condition_number(3.0, link="chebyshev")
        6.0
        >>> phi_from_condition_number(KAPPA_COSINE, link="calibrated")
        2.0
        >>> phi_from_condition_number(1.0), phi_from_condition_number(1.5)  # gated
        (0.25, 2.0)
        >>> phi_from_condition_number(1.5, link="gated-edge", edge_fraction=0.01)  # far below
        1.0
        >>> phi_from_condition_number(float("inf"), link="calibrated")
        16.0
    """
    return LINKS[check_link(link)].phi(kappa, phi_min, phi_max, edge_fraction)[1]


def choose_phi(
    estimate: CurvatureEstimate,
    *,
    peak_lr: float | None,
    budget: int,
    link: str = "gated",
    phi_min: float = PHI_MIN,
    phi_max: float = PHI_MAX,
    edge_fraction: float | None = None,
    stabiliser: str | None = None,
    warmup_steps: int = 0,
) -> PhiChoice:
    """Choose φ from a :class:`~uba_auto.probe.CurvatureEstimate` (the links: :mod:`uba_auto.phi`).

    Never raises for a measured spectrum it cannot use: no positive curvature falls back to
    cosine (φ = 2) with a warning in the result.

    Args:
        estimate: the probe's result.
        peak_lr: the run's peak learning rate (used by the Chebyshev link).
        budget: steps left in the run.
        link: one of :data:`LINKS`.
        phi_min, phi_max: the clamp.
        edge_fraction: for the gated-edge link, the peak rate's distance to the stability edge at
            initialisation (:func:`stability_fraction`); ``None`` when the optimizer is unknown or
            not SGD, which turns the edge gate off (said in the reason). The hold link reads it
            too, for its guard.
        stabiliser: for the hold link, why the run is self-stabilising
            (:func:`~uba_auto.phi.self_stabilising`), or ``None`` (it is not, or unknown).
        warmup_steps: the run's warm-up length (the hold link's edge guard applies without one).
    """
    return LINKS[check_link(link)](
        link_inputs(estimate),
        peak_lr=peak_lr,
        budget=budget,
        phi_min=phi_min,
        phi_max=phi_max,
        edge_fraction=edge_fraction,
        stabiliser=stabiliser,
        warmup_steps=warmup_steps,
    )
