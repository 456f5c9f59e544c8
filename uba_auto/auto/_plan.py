r"""The probing plan: how many gradient-equivalents each probe of an ``auto_uba`` run may spend.

``probe_fraction`` of the budget (in gradient-equivalents: one gradient = one forward and backward
pass on one batch) is shared equally by the pre-training probe and every re-estimation the plan
will run (:func:`planned_reestimations`). A probe of :math:`B` batches costs

.. math::

    \text{cost} = B \cdot \text{SETUP} + \text{HVPs} \cdot \text{HVP}, \qquad
    \text{SETUP} = 1.5, \quad \text{HVP} = 3.5

gradient-equivalents, an upper bound of both ways the probe computes a product: with a batch's
cached double-backward graph (setup: a forward and a backward pass that keeps its graph; a
product measured 1.3-2.2 gradients in ``benchmarks/probe_benchmark.py``) and, for the batches
over the probe's memory cap (``probe_curvature(graph_memory=2.5)``: on every benchmark model at 8
batches, all of them), recomputed in every product (setup a forward; a product measured 2.9-4.1
gradients, 0.49-0.69x the cached rate, ``python benchmarks/peak_memory.py MODEL hvp_rate``). It is
a plan, the same on every rank, and errs towards spending less: a probe whose graphs are all
cached costs less than it is counted. The warm start's single-batch products
(``probe_curvature(warm_start=...)``) are the first batch's, cached or recomputed as that batch
is, and counted the same. What is left of a probe's share after its setup is its HVP budget
(:class:`~uba_auto.probe.ProbeSettings` ``hvp_budget``): the φ decision first, the report's
extras only with what remains.
"""

from __future__ import annotations

import math

from ..phi._plateau import cooldown_check_steps

__all__ = [
    "FORWARD_COST_IN_GRADIENTS",
    "HVP_COST_IN_GRADIENTS",
    "MAX_VAL_BATCHES",
    "SETUP_COST_IN_GRADIENTS",
    "hvp_budget",
    "overspend_note",
    "planned_reestimations",
    "probe_cost",
    "validation_batches",
    "validation_cost",
    "validation_overspend_note",
    "validation_plan",
]

HVP_COST_IN_GRADIENTS = 3.5
"""Cost of one Hessian-vector product in gradient evaluations, for the probing budget: a product
recomputed from its batch (the probe's default when the batches' graphs exceed its memory cap)
measured 2.9-4.1 gradients on the benchmark models; a product on a cached graph 1.3-2.2."""

SETUP_COST_IN_GRADIENTS = 1.5
"""Cost of building one batch's double-backward graph (a forward and a backward pass that keeps
its graph), in gradient evaluations."""


FORWARD_COST_IN_GRADIENTS = 1 / 3
"""Cost of one forward pass without a graph (a validation batch), in gradient evaluations."""

MAX_VAL_BATCHES = 8
"""The most validation batches :func:`validation_batches` gives (``auto_uba``'s default)."""


def validation_cost(checks: int, batches: float) -> float:
    """Gradient-equivalents of ``checks`` checks of the plateau rule on ``batches`` batches each
    (a validation batch counted as a training batch's forward pass)."""
    return checks * batches * FORWARD_COST_IN_GRADIENTS


def validation_batches(budget: int, checks: int, fraction: float) -> int:
    """The most validation batches per check, up to :data:`MAX_VAL_BATCHES` and at least 1,
    whose ``checks`` checks together cost at most ``fraction`` of ``budget`` gradient-equivalents
    (what the overspend note says fits; ``benchmarks/plateau_rule.py --auto-validation`` tested
    it as a default and it lost, BENCHMARKS.md §2).

    Example:
        >>> validation_batches(5000, 31, 0.02), validation_batches(1000, 31, 0.02)
        (8, 1)
        >>> validation_batches(2000, 31, 0.02)  # 40 gradient-equivalents / (31 / 3)
        3
    """
    if checks <= 0:
        return 1
    fit = math.floor(fraction * budget / validation_cost(checks, 1) + 1e-9)
    return max(1, min(MAX_VAL_BATCHES, fit))


def validation_plan(budget: int, warmup_steps: int, batches: float) -> tuple[int, float]:
    """The plateau rule's checks in a run of ``budget`` steps and what they all cost in
    gradient-equivalents at ``batches`` validation batches each (fewer once it has switched).

    Example:
        >>> checks, cost = validation_plan(5000, 0, 8)
        >>> checks, round(cost, 1)
        (14, 37.3)
    """
    checks = len(cooldown_check_steps(budget - 1, warmup_steps))
    return checks, validation_cost(checks, batches)


def validation_overspend_note(
    checks: int, batches: int, cost: float, budget: int, fraction: float
) -> str:
    """The loud note of plateau-rule checks that can cost more than their share of the budget."""
    fit = validation_batches(budget, checks, fraction)
    why = (
        "even at one validation batch per check"
        if batches <= fit
        else f"(it fits {fit} batch{'es' if fit > 1 else ''} per check)"
    )
    return (
        f"validation checks over budget: the plateau rule's {checks} checks of {batches} "
        f"validation batch{'es' if batches > 1 else ''} can cost {cost:.0f} gradient-equivalents "
        f"({100 * cost / budget:.1f}% of the {budget}-step budget), over a share of "
        f"{fraction * budget:.0f} (probe_fraction {100 * fraction:g}%) {why}. They run anyway: "
        "in our benchmark at equal total cost, batches sized down to the share lost more on 4 "
        "of 5 held-out cells than the steps they saved (BENCHMARKS.md section 2). To spend "
        "less: lower val_batches, or leave val_loader out (phi from the curvature before "
        "training, no checks); a loop that "
        "evaluates anyway can pass the losses it measures, scheduler.step(val_losses=...) "
        "when auto.validation_due (then the checks cost nothing and this note does not apply)"
    )


def planned_reestimations(total_steps: int, every: int | None) -> int:
    """How many re-estimations the plan runs: at every multiple of ``every`` in
    ``(0, total_steps - 1)`` (see :meth:`~uba_auto.auto.AutoUBA.maybe_reestimate`).

    Example:
        >>> planned_reestimations(999, 100), planned_reestimations(999, None)
        (9, 0)
    """
    if not every:
        return 0
    return max(0, (total_steps - 2) // every)


def probe_cost(hvps: int, batches: int) -> float:
    """Gradient-equivalents of a probe of ``batches`` batches that spent ``hvps`` HVPs."""
    return batches * SETUP_COST_IN_GRADIENTS + hvps * HVP_COST_IN_GRADIENTS


def hvp_budget(share: float, batches: int) -> int:
    """The HVPs a probe of ``batches`` batches may spend within ``share`` gradient-equivalents
    (0 when the setup alone uses it up).

    Example:
        >>> hvp_budget(100.0, 8)  # 5000 steps at 2 %: (100 - 8 * 1.5) / 3.5
        25
    """
    return max(0, math.floor((share - batches * SETUP_COST_IN_GRADIENTS) / HVP_COST_IN_GRADIENTS))


def overspend_note(
    what: str, cost: float, share: float, budget: int, fraction: float, extras: tuple = ()
) -> str:
    """The loud note of a probe that cost more than its share (``extras``: the report extras
    it computed because they were asked for)."""
    asked = (
        f" (plus the {' and the '.join(extras)} you asked for)"
        if extras
        else ", with no report extras"
    )
    return (
        f"probing budget exceeded: {what} cost {cost:.0f} gradient-equivalents "
        f"({100 * cost / budget:.1f}% of the {budget}-step budget), over its share of "
        f"{share:.0f} (probe_fraction {100 * fraction:g}%). It ran anyway{asked}: phi needs "
        "lambda_max and the curvature noise at the decision's precision, and that is the "
        "smallest useful probe. To stay within it: raise probe_fraction, lower "
        "num_batches (a noisier curvature noise), reestimate less often, or give phi yourself "
        "(UBAScheduler) and skip the probe"
    )
