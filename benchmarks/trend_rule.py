"""The trend rule (issue 14; pre-registered in ``benchmarks/results/prereg_trend_rule.md``).

Start on cosine. At the checks at 40-45 % of the budget, while still on cosine, *hold* at the first
check where the validation loss still gains at least :data:`HOLD_GAIN` (relative, over the last 10 %
of the budget: the plateau rule's window), is at its lowest so far and is finite: from there the
rest of the budget follows a fresh UBA curve with φ = :data:`HOLD_PHI` started at the current rate
(:func:`restart`). After a hold, the plateau rule's test (``plateau_decision`` on the checks since
the hold) cools down with a fresh cosine from the current rate. No hold at the decision checks:
cosine to the end, nothing more checked.

The rule is the symmetric counterpart of the plateau rule (which starts by holding and loses where
a run wants an early decay). It is a benchmark rule until it passes its pre-registered test; the
runs go through ``benchmarks/plateau_rule.py --rule trend``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import uba_auto
from uba_auto.phi import _plateau as P
from uba_auto.schedules import decay_schedule, join_schedules

DECISION_FROM = 0.40
"""First decision check, as a fraction of the decay's total steps."""
DECISION_TO = 0.45
"""Last decision check (inclusive)."""
HOLD_GAIN = 0.02
"""Smallest relative gain of the validation loss over the window that counts as still progressing
(chosen from {0.02, 0.03} on 25 calibration cells by the prereg's rule: both worse than cosine
by more than 1 % in 1 cell, mean rule vs cosine -0.94 % against -0.72 %)."""
HOLD_PHI = 1 / 32
"""φ of the restarted curve after a hold: the rate stays near its level until the last ~15 %."""
COOL_PHI = 2.0
"""φ of the restarted curve after the hold's plateau: cosine from the current rate."""
START_PHI = 2.0
"""φ the run starts with: cosine."""
FIRST_CHECK: float | None = None
"""Exploration only (``--set FIRST_CHECK=0.3``, after the test): make no check before this
fraction of the budget, so that fewer checks are paid for; ``None``, the pre-registered rule:
every check of the plateau rule's schedule."""


def _slack(total_steps: int) -> float:
    """A check step is its nominal fraction of the budget rounded to a step: half a step either
    way still counts as that fraction."""
    return 0.5 / total_steps + 1e-9


def check_steps(total_steps: int, warmup_steps: int = 0) -> list[int]:
    """The steps the rule checks at: the plateau rule's (``plateau_check_steps``), from
    :data:`FIRST_CHECK` on when that is set (with the decision window's half-step slack)."""
    steps = P.plateau_check_steps(total_steps, warmup_steps)
    if FIRST_CHECK is None:
        return steps
    return [s for s in steps if s / total_steps >= FIRST_CHECK - _slack(total_steps)]


def restart(sched: uba_auto.UBAScheduler, phi: float) -> None:
    """From the scheduler's current step ``t0`` on, a fresh UBA decay with ``phi`` that starts at
    each group's rate at ``t0`` and ends at its ``lr_min`` at ``total_steps``:
    ``η_t = η_min + (η_t0 − η_min) f_φ((t − t0) / (T − t0))``. The rate at ``t0`` is unchanged.

    A benchmark device, not resumable: it replaces the scheduler's private plans and leaves its
    segments and ``phi_history`` alone, so ``state_dict``/``load_state_dict`` or a later
    ``set_phi`` go back to the curve without the restart. The benchmark's runs never checkpoint.
    """
    t0, total = sched.last_epoch, sched.total_steps
    if t0 >= total:
        return
    plans = []
    for i, old in enumerate(sched._plans):
        now = old(t0)
        new = decay_schedule("uba", total - t0, phi=phi, lr_max=now, lr_min=sched.lr_mins[i])
        plans.append(join_schedules([old, new], [t0]))
    sched._plans = plans
    sched.phi = phi


def _mean(row: Sequence[float]) -> float:
    return sum(row) / len(row)


@dataclass
class TrendRule:
    """The rule's state over one run: call :meth:`check` at every plateau-rule check step with
    that check's per-batch validation losses; it returns ``(action, reason)`` with ``action``
    one of ``"hold"``, ``"cool"``, ``"stop"`` (nothing more to check) or ``None``."""

    total_steps: int
    state: str = "cosine"
    history: list[list[float]] = field(default_factory=list)
    since_hold: list[list[float]] = field(default_factory=list)

    def check(self, step: int, losses: Sequence[float]) -> tuple[str | None, str]:
        losses = [float(x) for x in losses]
        fraction = step / self.total_steps
        slack = _slack(self.total_steps)
        if self.state == "cosine":
            self.history.append(losses)
            if fraction < DECISION_FROM - slack:
                return None, "before the decision checks"
            if fraction > DECISION_TO + slack:
                self.state = "stayed"
                return "stop", "no decision check showed progress enough to hold: cosine"
            d = P.plateau_decision(self.history)
            finite = all(math.isfinite(x) for row in self.history for x in row)
            lowest = _mean(losses) <= min(_mean(row) for row in self.history)
            if finite and lowest and d.relative_gain >= HOLD_GAIN:
                self.state = "held"
                self.since_hold = [losses]
                why = (
                    f"the validation loss still gains {100 * d.relative_gain:.2f} % per tenth "
                    f"of the budget at {100 * fraction:.0f} % (>= {100 * HOLD_GAIN:g} %): hold"
                )
                return "hold", why
            return None, f"gain {100 * d.relative_gain:.2f} %, lowest so far: {lowest}"
        if self.state == "held":
            self.since_hold.append(losses)
            d = P.plateau_decision(self.since_hold)
            if d.plateaued:
                self.state = "cooled"
                return "cool", d.reason
            return None, d.reason
        return "stop", f"nothing more to check ({self.state})"
