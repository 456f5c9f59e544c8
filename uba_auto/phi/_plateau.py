r"""The plateau rule: hold the rate while the validation loss improves, cool down when it stops.

The φ study (BENCHMARKS.md §2) found one pattern across 19 cells: a small φ (the rate held high,
then dropped late, as WSD does) lowers the *training* loss in 17 of them, and the held-out loss
follows wherever the held-out loss still falls under that hold (a GPT with AdamW, least squares,
logistic regression, a character LM: 1–7 % below cosine); where it loses (up to 14 % above
cosine), the held-out loss of the held run has flattened or turned up by 30–50 % of the budget
while the training loss still fell: the run over-fits, and the earlier decay of cosine (or a
larger φ) is worth more than the extra optimisation. Which of the two a run is in cannot be read
from its curvature at initialisation (no measured signal separated the cells, findings 7–13);
it can be read, while training, from a validation loss.

The rule (constants fixed on the calibration cells before any held-out representative task ran
with a φ other than cosine; BENCHMARKS.md §2, ``benchmarks/plateau_rule.py``):

* train with φ = :data:`HOLD_PHI` (the rate held near its peak, dropping over the last ~15 %);
* every :data:`CHECK_EVERY` of the budget from :data:`FIRST_CHECK` (after the warm-up) to
  :data:`LAST_CHECK`, measure the validation loss on the same validation batches;
* the run has **plateaued** at a check when its loss is more than :data:`MAX_RISE` above the
  best earlier check (a spike: the held rate is unstable), or when, against the check
  :data:`WINDOW` checks earlier (10 % of the budget), the per-batch gains
  :math:`g_b = L_b^{(k-W)} - L_b^{(k)}` average less than :data:`MIN_GAIN` of that earlier loss,
  or when a loss is not finite;
* at the first plateau, switch to φ = :data:`COOL_PHI` for the rest of the budget (cosine from
  the current rate, no jump; :meth:`~uba_auto.UBAScheduler.set_phi`), and stop checking.

What it does not catch (measured, BENCHMARKS.md §2): a run whose peak sits on its stability
edge from the first steps (``digits_cnn``: the held rate blows the run up before the first
spike is seen, +63 % and +250 % against cosine), and a run that over-fits within its first
third (``digits_mlp`` at 300 steps, +5 %): there cosine's earlier decay was worth more.

What ``PlateauCooldown`` (and so ``auto_uba(val_loader=)``) runs since 2026-12-08 is the shape
rule built on this test (pre-registered in ``benchmarks/results/prereg_shape_rule.md``, passed
on a fifth set of new tasks, BENCHMARKS.md §2, finding 25): the checks of
:func:`cooldown_check_steps` (those before :data:`SWITCH_BY`, 40 % of the budget), and at the
first plateau or at :func:`cooldown_step`, whichever comes first, a whole cosine from the current
rate (``set_phi(COOL_PHI, restart=True)``). The rule as first studied (checks to
:data:`LAST_CHECK`, cooling along φ = 2's curve) is what the measurements above describe.

Everything here is pure: :func:`plateau_check_steps` and :func:`cooldown_check_steps` give the
steps to check, :func:`plateau_decision` judges one check from per-batch losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CHECK_EVERY",
    "COOL_PHI",
    "FIRST_CHECK",
    "HOLD_PHI",
    "LAST_CHECK",
    "MAX_RISE",
    "MIN_GAIN",
    "SWITCH_BY",
    "WINDOW",
    "PlateauDecision",
    "cooldown_check_steps",
    "cooldown_step",
    "plateau_check_steps",
    "plateau_decision",
]

HOLD_PHI = 1 / 32
"""φ while the validation loss improves: UBA's "hold, then drop" end (the rate is still 87 % of
the peak at 80 % of the decay)."""
COOL_PHI = 2.0
"""φ after the plateau: cosine annealing of the rest of the budget from the current rate."""
FIRST_CHECK = 0.05
"""First check, as a fraction of the budget (after the warm-up, whichever is later)."""
CHECK_EVERY = 0.025
"""Spacing of the checks, as a fraction of the budget."""
LAST_CHECK = 0.80
"""No check after this fraction of the budget: the held schedule's own drop is under way."""
WINDOW = 4
"""A check compares with the check this many checks earlier (10 % of the budget)."""
MIN_GAIN = 0.01
"""Smallest relative improvement over the window that still counts as progress."""
MAX_RISE = 0.25
"""A check whose loss is this much (relative) above the best earlier check cools down at once."""
SWITCH_BY = 0.40
"""The latest cool-down, as a fraction of the budget: without a plateau before it, the cosine
starts here (the shape rule, pre-registered in ``benchmarks/results/prereg_shape_rule.md`` and
shipped after it passed its test, BENCHMARKS.md §2, finding 25); no check is made from here on."""


@dataclass(frozen=True)
class PlateauDecision:
    """One check of the plateau rule.

    Attributes:
        plateaued: whether the run should cool down now.
        gain: mean per-batch improvement of the validation loss over the window (positive:
            better), ``nan`` when a loss was not finite.
        relative_gain: ``gain`` over the mean loss at the start of the window.
        standard_error: standard error of the per-batch gains (0 with one batch).
        loss: the mean validation loss now.
        reason: one sentence saying why, for the report.
    """

    plateaued: bool
    gain: float
    relative_gain: float
    standard_error: float
    loss: float
    reason: str


def plateau_check_steps(total_steps: int, warmup_steps: int = 0) -> list[int]:
    """The steps (counted from 1, after that many updates) at which the rule checks.

    Checks fall every :data:`CHECK_EVERY` of ``total_steps`` from :data:`FIRST_CHECK` (or the end
    of the warm-up plus one spacing, whichever is later) to :data:`LAST_CHECK`, at least one step
    apart; an empty list when the budget is too short to hold ``WINDOW + 1`` checks.

    Example:
        >>> plateau_check_steps(200)[:6]
        [10, 15, 20, 25, 30, 35]
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    spacing = CHECK_EVERY * total_steps
    start = max(FIRST_CHECK * total_steps, warmup_steps + spacing)
    steps: list[int] = []
    k = 0
    while True:
        at = start + k * spacing
        if at > LAST_CHECK * total_steps + 1e-9:
            break
        step = max(1, round(at))
        if not steps or step > steps[-1]:
            steps.append(step)
        k += 1
    return steps if len(steps) > WINDOW else []


def cooldown_step(total_steps: int, warmup_steps: int = 0) -> int:
    """The step at which the cosine starts when no plateau came first: ``round(SWITCH_BY * T)``
    (at least 1), or the end of a warm-up longer than that (no hold at all: the cosine starts
    at the peak).

    Example:
        >>> cooldown_step(200), cooldown_step(200, warmup_steps=100)
        (80, 100)
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    return max(1, round(SWITCH_BY * total_steps), warmup_steps)


def cooldown_check_steps(total_steps: int, warmup_steps: int = 0) -> list[int]:
    """The checks the shipped rule makes: :func:`plateau_check_steps` before
    :func:`cooldown_step` (where the cosine starts without a check).

    Example:
        >>> cooldown_check_steps(200)[-3:]
        [65, 70, 75]
    """
    last = cooldown_step(total_steps, warmup_steps)
    return [s for s in plateau_check_steps(total_steps, warmup_steps) if s < last]


def plateau_decision(history: Sequence[Sequence[float]]) -> PlateauDecision:
    """Judge the latest check: has the validation loss stopped improving?

    Args:
        history: per-batch validation losses at every check so far, oldest first, the same
            batches in the same order at each check; the last entry is the check to judge.

    Returns:
        A :class:`PlateauDecision` (see the module docs for the tests).

    Example:
        >>> falling = [[1.0 - 0.05 * k, 1.2 - 0.05 * k] for k in range(5)]
        >>> plateau_decision(falling).plateaued
        False
        >>> flat = [[1.0, 1.2]] * 4 + [[0.999, 1.195]]
        >>> plateau_decision(flat).plateaued
        True
    """
    if not history:
        raise ValueError("history must hold at least one check's validation losses")
    rows = [[float(x) for x in row] for row in history]
    width = len(rows[-1])
    if width == 0 or any(len(row) != width for row in rows):
        raise ValueError(
            "every check must hold the same validation batches' losses, got "
            f"{[len(row) for row in rows]} values per check"
        )
    now = rows[-1]
    loss_now = sum(now) / width
    nan = float("nan")
    if not all(math.isfinite(x) for row in rows for x in row):
        return PlateauDecision(
            True, nan, nan, nan, loss_now, "the validation loss is not finite: cooling down now"
        )
    means = [sum(row) / width for row in rows]
    if len(rows) > 1:
        best = min(means[:-1])
        if loss_now > (1 + MAX_RISE) * best:
            why = (
                f"the validation loss rose {100 * (loss_now / best - 1):.1f} % above its best "
                f"(> {100 * MAX_RISE:g} %)"
            )
            return PlateauDecision(True, nan, nan, nan, loss_now, why)
    if len(rows) <= WINDOW:
        why = f"{len(rows)} of the {WINDOW + 1} checks the gain test needs"
        return PlateauDecision(False, nan, nan, nan, loss_now, why)
    earlier = rows[-1 - WINDOW]
    base = means[-1 - WINDOW]
    gains = [a - b for a, b in zip(earlier, now, strict=True)]
    gain = sum(gains) / width
    if width > 1:
        var = sum((g - gain) ** 2 for g in gains) / (width - 1)
        se = math.sqrt(var / width)
    else:
        se = 0.0
    relative = gain / base if base > 0 else (math.inf if gain > 0 else 0.0)
    span = f"over the last {WINDOW} checks"
    if relative < MIN_GAIN:
        change = (
            f"improved by {100 * relative:.2f} %"
            if relative >= 0
            else f"got worse by {-100 * relative:.2f} %"
        )
        why = f"the validation loss {change} {span} (less than {100 * MIN_GAIN:g} % better)"
        return PlateauDecision(True, gain, relative, se, loss_now, why)
    why = f"the validation loss still improves ({100 * relative:.2f} % {span})"
    return PlateauDecision(False, gain, relative, se, loss_now, why)
