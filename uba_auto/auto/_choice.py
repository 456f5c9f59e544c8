"""The steps of ``auto_uba``'s φ choice, as functions from numbers and states to new states.

Nothing here probes, draws batches, talks to other ranks or writes to an optimizer: that is
:class:`~uba_auto.auto.AutoUBA`'s part. Each function returns a new
:class:`~uba_auto.auto._state.AutoState` (or what goes into one) and leaves its inputs as they were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .._optim import group_peaks
from .._validation import check_nonnegative_finite
from ..phi import (
    LINKS,
    SUGGESTED_SHARE,
    OptimizerStability,
    PhiChoice,
    choose_phi,
    optimizer_stability,
    self_stabilising,
    stability_fraction,
    stability_limit,
)
from ..phi._plateau import HOLD_PHI
from ..probe import NEGATIVE_MASS_THRESHOLD, CurvatureEstimate
from ..report import CurvatureReport, ReestimationRecord
from ..scheduler import check_lr_min_args
from ._loss import default_loss
from ._plan import validation_plan
from ._state import AutoSettings, AutoState, PeakRate

__all__ = [
    "NEGATIVE_CURVATURE_NOTE_ABOVE",
    "adopt_optimizer",
    "as_pair",
    "check_final_rate",
    "choose",
    "default_loss",
    "edge_fraction",
    "held_for_plateau",
    "initial_state",
    "negative_curvature_note",
    "optimizer_limit",
    "phi_signal",
    "resolve_peak",
    "stability_fields",
    "stability_warning",
    "suggested_lr",
]


def check_final_rate(
    peaks: list[float] | None, lr_min: float | None, lr_min_ratio: float | None
) -> None:
    """The final-rate arguments the scheduler will get, checked before anything runs."""
    check_lr_min_args(lr_min, lr_min_ratio)
    if lr_min is not None:
        lr_min = check_nonnegative_finite("lr_min", lr_min)
        for i, peak in enumerate(peaks or []):
            if lr_min > peak:
                raise ValueError(
                    f"lr_min must be <= the peak rate of every param group, got lr_min={lr_min!r} "
                    f"> {peak!r} (param group {i}); lower lr_min or use lr_min_ratio"
                )


def optimizer_limit(optimizer: Any, estimate: CurvatureEstimate) -> OptimizerStability | None:
    """The stability limit of ``optimizer`` (:func:`~uba_auto.phi.optimizer_stability`), when
    ``estimate`` measured the curvature that optimizer sees: the raw curvature for SGD, the
    preconditioned one for an adaptive optimizer. ``None`` for an optimizer without a derived
    limit, settings outside the derivation, or an estimate of the other curvature."""
    try:
        stability = optimizer_stability(optimizer)
    except (TypeError, ValueError):
        return None
    # optimizer_stability checks its settings: the limit is positive, the decay finite >= 0.
    preconditioned = estimate.preconditioner is not None
    return stability if preconditioned == (stability.curvature == "preconditioned") else None


def as_pair(stability: OptimizerStability | None, peak: PeakRate) -> tuple[float, float] | None:
    """``(limit at the peak rate, weight decay)``, the form :class:`AutoState` keeps (and
    ``state_dict`` saves)."""
    if stability is None:
        return None
    return (stability.limit_at(peak.value), stability.weight_decay)


def resolve_peak(
    peak_lr: float | str | None, suggested: float | None, lambda_max: float, optimizer: Any
) -> PeakRate:
    """The peak rate of the pre-training choice, from ``auto_uba``'s ``peak_lr`` argument."""
    if peak_lr is not None and not isinstance(peak_lr, str):
        return PeakRate(float(peak_lr), "given as peak_lr")
    if peak_lr == "suggest":
        if suggested is None:
            raise ValueError(
                "peak_lr='suggest' needs positive curvature, but lambda_max = "
                f"{lambda_max:.3g} <= 0; pass peak_lr as a number"
            )
        return PeakRate(suggested, "suggested: a share of the stability limit (see report)")
    if optimizer is not None:
        return PeakRate(max(group_peaks(optimizer)), "the optimizer's largest group lr")
    if suggested is not None:
        return PeakRate(suggested, "no optimizer given: assumed the plain-SGD suggestion", True)
    return PeakRate(1.0, "unknown (no optimizer given, no positive curvature)", True)


def suggested_lr(
    estimate: CurvatureEstimate,
    stability: OptimizerStability | None = None,
    warmup_steps: int = 0,
) -> float | None:
    """The peak rate the curvature suggests: the rate at which the sharpness the optimizer sees is
    :data:`~uba_auto.phi.SUGGESTED_SHARE` of its stability limit
    (:meth:`~uba_auto.phi.OptimizerStability.rate_for_share`; plain SGD, limit 2, without an
    optimizer). For an adaptive optimizer without a warm-up the share is capped at 1 (its share,
    measured with a warm-up, is above the limit at initialisation). ``None`` without positive
    curvature, or for an adaptive optimizer whose curvature was not measured."""
    lam = estimate.lambda_max
    if not (math.isfinite(lam) and lam > 0):
        return None
    if stability is None:
        if estimate.preconditioner is not None:
            return None
        return SUGGESTED_SHARE["hessian"] * stability_limit() / lam
    share = SUGGESTED_SHARE[stability.curvature]
    if stability.curvature == "preconditioned" and not warmup_steps:
        share = min(share, 1.0)
    return stability.rate_for_share(share, lam)


def edge_fraction(
    estimate: CurvatureEstimate, stability: tuple[float, float] | None, peak: PeakRate
) -> float | None:
    """The peak rate as a fraction of the stability limit on the pre-training ``estimate``
    (``None`` while the optimizer's limit, the peak rate, or a positive curvature, is unknown)."""
    lam = estimate.lambda_max
    if stability is None or peak.assumed or not (math.isfinite(lam) and lam > 0):
        return None
    limit, decay = stability
    return stability_fraction(lam, peak.value, limit, decay)


def stability_fields(
    estimate: CurvatureEstimate, stability: OptimizerStability | None, peak: PeakRate
) -> dict[str, Any]:
    """The report's optimizer rows: the sharpness the optimizer sees, its stability limit, the
    peak rate's share of it, and the formula (all ``None``/empty while unknown)."""
    if stability is None:
        empty = dict.fromkeys(("optimizer_sharpness", "stability_limit", "stability_share"))
        return {**empty, "stability_note": ""}
    return {
        "optimizer_sharpness": estimate.lambda_max + stability.weight_decay,
        "stability_limit": stability.limit_at(peak.value),
        "stability_share": edge_fraction(estimate, as_pair(stability, peak), peak),
        "stability_note": stability.formula,
    }


def stability_warning(fields: Mapping[str, Any], peak: PeakRate, warmup_steps: int) -> list[str]:
    """A warning when the peak rate exceeds the optimizer's stability limit at initialisation,
    with what to do: a warm-up (or a longer one), or a lower peak."""
    share = fields["stability_share"]
    if share is None or share <= 1:
        return []
    stable = fields["stability_limit"] / fields["optimizer_sharpness"]
    head = (
        f"the peak lr {peak.value:.4g} is {share:.3g}x the optimizer's stability limit at "
        f"initialisation (sharpness it sees {fields['optimizer_sharpness']:.4g}, stable below lr "
        f"{stable:.3g})"
    )
    if warmup_steps:
        return [
            f"{head}: the warm-up of {warmup_steps} steps must bring the sharpness down before "
            "the rate gets there (on our one AdamW task, gpt_adamw, the tuned peaks start 6-11x "
            "above it and a 5 % warm-up brought it to 0.2-0.6 of the limit, BENCHMARKS.md §3); if "
            f"the loss spikes early, lengthen the warm-up or lower the peak toward {stable:.3g}"
        ]
    return [
        f"{head}: steps at the peak from the first one are unstable along the sharpest "
        "direction; use a warm-up (warmup_steps), during which the sharpness usually falls, or "
        f"lower the peak toward {stable:.3g}"
    ]


def choose(
    estimate: CurvatureEstimate,
    settings: AutoSettings,
    peak: PeakRate,
    edge: float | None,
    remaining: int,
    stabiliser: str | None = None,
) -> PhiChoice:
    """φ for ``remaining`` steps from ``estimate``, at the ``peak`` rate and ``edge`` fraction;
    under the validation plateau rule (``settings.plateau``) the rule's starting φ, with what the
    link would have chosen in its reason (:func:`held_for_plateau`). ``stabiliser``: for the
    hold link (:func:`~uba_auto.phi.self_stabilising`)."""
    choice = choose_phi(
        estimate,
        peak_lr=peak.value,
        budget=remaining,
        link=settings.link,
        phi_min=settings.phi_min,
        phi_max=settings.phi_max,
        edge_fraction=edge,
        stabiliser=stabiliser,
        warmup_steps=settings.warmup_steps,
    )
    return held_for_plateau(choice) if settings.plateau else choice


def held_for_plateau(choice: PhiChoice) -> PhiChoice:
    """The choice of a run whose φ the validation plateau rule decides: φ =
    :data:`~uba_auto.phi.HOLD_PHI` from the first step (not clamped: the rule's φ are its own),
    ``choice`` (the link's, which decides nothing here) named in the reason."""
    return replace(
        choice,
        phi=HOLD_PHI,
        phi_unclamped=HOLD_PHI,
        clamped=False,
        warnings=(),  # the link's notes (a clamp, a fallback) are about a phi not used
        reason=(
            f"validation plateau rule: phi = {HOLD_PHI:g} (the rate held near its peak) while the "
            f"validation loss improves, then a whole cosine from the rate then at its first "
            f"plateau or at 40% of the budget; the {choice.link} link, which does not decide here, "
            f"reads phi = "
            f"{choice.phi:.4g} ({choice.reason})"
        ),
    )


def phi_signal(choice: PhiChoice, settings: AutoSettings) -> str:
    """Which measured signal decided φ, in words (the report's "φ decided by")."""
    if settings.plateau:
        checks, cost = validation_plan(settings.budget, settings.warmup_steps, settings.val_batches)
        return (
            f"the validation loss, mid-run (plateau rule: at most {checks} checks of "
            f"{settings.val_batches} validation batch{'es' if settings.val_batches > 1 else ''}, "
            f"about {cost:.0f} gradient-equivalents, {100 * cost / settings.budget:.1f}% of the "
            "budget); the curvature is for this report"
        )
    link = LINKS[choice.link]
    if choice.held_by is not None:
        guard = (
            "; the edge guard is off with a warm-up"
            if settings.warmup_steps
            else "; the peak rate's share of the stability limit was its guard"
            if choice.edge_fraction is not None
            else "; its edge guard could not be checked (stability limit unknown)"
        )
        who = f"the run's optimizer and model, a self-stabilising run: {choice.held_by}"
        return f"{who} (hold link){guard}"
    if choice.kappa is None:
        return f"nothing measured it could use ({choice.reason}): phi = {choice.phi:g}, cosine"
    if link.band == "budget":
        return (
            "the spectrum's condition number in the band the peak rate and budget reach "
            f"({link.name} link)"
        )
    edge = " and the peak rate's share of the stability limit" if link.reads_edge else ""
    return f"the curvature noise sigma along the top eigenvector{edge} ({link.name} link)"


def _report_fields(choice: PhiChoice, settings: AutoSettings) -> dict[str, Any]:
    """The fields of the report that come from the φ choice."""
    fields = ("phi", "phi_unclamped", "clamped", "kappa", "kappa_kind", "reason", "edge_fraction")
    return {
        **{name: getattr(choice, name) for name in fields},
        "phi_signal": phi_signal(choice, settings),
    }


NEGATIVE_CURVATURE_NOTE_ABOVE = 0.2
"""The resolved negative-curvature mass (:attr:`CurvatureEstimate.negative_mass`) above which the
report warns that the model is far from a minimum."""


def negative_curvature_note(estimate: CurvatureEstimate) -> str | None:
    """The report's warning of negative curvature, or ``None`` below
    :data:`NEGATIVE_CURVATURE_NOTE_ABOVE`.

    It reads ``estimate.negative_mass``, the mass the density resolves below
    ``-NEGATIVE_MASS_THRESHOLD * lambda_max`` (:func:`uba_auto.probe.estimate.negative_mass`): a
    coarse density's node for the near-zero bulk that lands just under the cut-off is not
    counted, so the warning is only given for negative curvature the density can tell apart.
    """
    mass = estimate.negative_mass
    if mass is None or not mass > NEGATIVE_CURVATURE_NOTE_ABOVE:
        return None
    cutoff = NEGATIVE_MASS_THRESHOLD * abs(estimate.lambda_max)
    return (
        f"{100 * mass:.0f}% of the spectrum is negative curvature (eigenvalues below "
        f"-{cutoff:.3g}, resolved by the density): the model is far from a minimum and its "
        "curvature will change as it trains; consider reestimate_every"
    )


def initial_state(
    estimate: CurvatureEstimate,
    choice: PhiChoice,
    settings: AutoSettings,
    *,
    peak: PeakRate,
    stability: OptimizerStability | None,
    edge: float | None,
    stabiliser: str | None = None,
    seconds: float,
    notes: list[str],
    probe_share: float,
    loss_guess: str = "",
) -> AutoState:
    """The state after the pre-training estimate, whose report lists ``notes`` first (a suggested
    rate set), then what the choice and the probe warned, then what the estimate says about
    trusting φ and the peak rate. ``probe_share``: the probe's cost as a share of the budget;
    ``stability``: the optimizer's limit (``None`` while unknown); ``loss_guess``: the loss
    guessed from the targets (:func:`default_loss`), the report's first line."""
    est = estimate
    optimizer_rows = stability_fields(est, stability, peak)
    record = ReestimationRecord(
        0, "ok", choice.kappa, choice.phi, est.num_hvps, seconds, "pre-training probe"
    )
    notes = [*notes, *choice.warnings, *est.warnings]
    negative = negative_curvature_note(est)
    if negative is not None:
        notes.append(negative)
    if est.curvature_noise is not None and est.curvature_noise > 0.5:
        notes.append(
            f"the curvature varies by {100 * est.curvature_noise:.0f}% across minibatches: "
            "phi is uncertain; probe more batches (num_batches) or larger ones"
        )
    if settings.reestimate_every and probe_share > settings.probe_fraction:
        notes.append(
            f"the pre-training probe alone cost {100 * probe_share:.1f}% of the budget in "
            f"gradient-equivalents (probe_fraction {100 * settings.probe_fraction:g}%): "
            "re-estimations will be skipped; lower num_batches or raise probe_fraction"
        )
    notes += stability_warning(optimizer_rows, peak, settings.warmup_steps)
    report = CurvatureReport(
        estimate=est,
        **_report_fields(choice, settings),
        phi_min=settings.phi_min,
        phi_max=settings.phi_max,
        link=choice.link,
        peak_lr=peak.value,
        peak_lr_source=peak.source,
        suggested_lr=suggested_lr(est, stability, settings.warmup_steps),
        budget=settings.budget,
        warmup_steps=settings.warmup_steps,
        probe_fraction=settings.probe_fraction,
        history=(record,),
        warnings=tuple(notes),
        **optimizer_rows,
        loss_guess=loss_guess,
    )
    return AutoState(
        report=report,
        peak=peak,
        probe_hvps=est.num_hvps,
        choice_warnings=tuple(choice.warnings),
        stability=as_pair(stability, peak),
        edge_fraction=edge,
        stabiliser=stabiliser,
    )


def _rechoose_initial(state: AutoState, settings: AutoSettings) -> AutoState:
    """The pre-training φ chosen again for ``state``'s peak rate and edge (before any
    scheduler): the first record and the report follow, the old choice's warnings go."""
    report = state.report
    choice = choose(
        report.estimate,
        settings,
        state.peak,
        state.edge_fraction,
        settings.budget,
        state.stabiliser,
    )
    first = replace(report.history[0], kappa=choice.kappa, phi=choice.phi)
    kept = tuple(w for w in report.warnings if w not in state.choice_warnings)
    report = replace(
        report,
        **_report_fields(choice, settings),
        peak_lr=state.peak.value,
        peak_lr_source=state.peak.source,
        history=(first, *report.history[1:]),
        warnings=(*kept, *choice.warnings),
    )
    return replace(state, report=report, choice_warnings=tuple(choice.warnings))


def adopt_optimizer(
    state: AutoState, settings: AutoSettings, optimizer: Any, model: Any = None
) -> AutoState:
    """``state`` after the first optimizer: its largest group rate replaces an assumed peak, and
    its stability limit (when the estimate measured the curvature it sees) goes to the report and
    to the gated-edge link. φ is chosen again if that changes anything and the choice is still
    open (no re-estimation ran, the run is not resumed). ``model``: the trained module, for the
    hold link's :func:`~uba_auto.phi.self_stabilising` (read when the state has none yet).

    Raises:
        ValueError: if ``lr_min`` exceeds a group's rate of an optimizer met only now.
    """
    open_choice = len(state.history) == 1 and state.pending_scheduler is None
    peak, pair, report = state.peak, state.stability, state.report
    changed = peak.assumed
    if peak.assumed:
        peaks = group_peaks(optimizer)
        check_final_rate(peaks, settings.lr_min, settings.lr_min_ratio)
        source = "the largest group lr of the optimizer given to make_scheduler"
        peak = PeakRate(max(peaks), source)
    if open_choice and pair is None:
        stability = optimizer_limit(optimizer, report.estimate)
        if stability is not None:
            pair = as_pair(stability, peak)
            rows = stability_fields(report.estimate, stability, peak)
            extra = stability_warning(rows, peak, settings.warmup_steps)
            report = replace(report, **rows, warnings=(*report.warnings, *extra))
            changed = changed or LINKS[settings.link].reads_edge
    stabiliser = state.stabiliser
    if open_choice and stabiliser is None:
        stabiliser = self_stabilising(model, optimizer)
        changed = changed or (stabiliser is not None and LINKS[settings.link].holds)
    if not changed:
        return replace(state, stability=pair, report=report, stabiliser=stabiliser)
    state = replace(state, peak=peak, stability=pair, report=report, stabiliser=stabiliser)
    if open_choice:
        edge = edge_fraction(state.report.estimate, pair, peak)
        return _rechoose_initial(replace(state, edge_fraction=edge), settings)
    report = replace(state.report, peak_lr=peak.value, peak_lr_source=peak.source)
    return replace(state, report=report)
