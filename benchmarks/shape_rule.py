"""The shape rule (issue 14; pre-registered in ``benchmarks/results/prereg_shape_rule.md``).

Hold the peak (φ = 1/32, the plateau rule's hold) and anneal with a fresh cosine from the current
rate at the first plateau of the validation loss (the plateau rule's test), or at
:data:`uba_auto.phi._plateau.SWITCH_BY` (40 %) of the budget if none comes first; check nothing
after that. It is the shape of finding 24 (BENCHMARKS.md §2: the peak until 40 %, then a cosine,
which no φ of UBA's family draws) with the validation loss as a guard while the rate is held: a
run whose validation loss stops falling early is annealed early, as the plateau rule does, and
the guard's checks stop at 40 % of the budget, about half the plateau rule's.

A benchmark rule until it passes its pre-registered test; the runs go through
``benchmarks/plateau_rule.py --rule shape``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from uba_auto.phi import _plateau as P

COOL_PHI = 2.0
"""φ of the restarted curve: a cosine from the current rate to ``lr_min``."""
START_PHI = P.HOLD_PHI
"""φ the run starts with: the plateau rule's hold."""
COOL_BY_RESTART = 1.0
"""1: the cosine is a fresh curve from the current rate by ``trend_rule.restart`` (the
pre-registered rule); 0: by ``UBAScheduler.set_phi(COOL_PHI, restart=True)``, what the library's
``PlateauCooldown`` calls (``--set COOL_BY_RESTART=0``: the check that the shipped rule is the
tested one; the rates agree to 1e-15)."""


def switch_step(total_steps: int) -> int:
    """The step at which the cosine starts if no plateau came first: ``round(SWITCH_BY * T)``
    (:func:`uba_auto.phi._plateau.cooldown_step`, the shipped rule's; ``P.SWITCH_BY``, 0.40,
    is what ``--set SWITCH_BY=...`` overrides)."""
    return P.cooldown_step(total_steps)


def check_steps(total_steps: int, warmup_steps: int = 0) -> list[int]:
    """The plateau rule's check steps (``plateau_check_steps``) before :func:`switch_step` (at
    that step the cosine starts without a check): the shipped
    :func:`~uba_auto.phi._plateau.cooldown_check_steps`, the same for any warm-up under 40 %."""
    return P.cooldown_check_steps(total_steps, warmup_steps)


@dataclass
class ShapeRule:
    """The rule's state over one run: call :meth:`check` at every :func:`check_steps` step with
    that check's per-batch validation losses, and :meth:`due` at every step; both say when the
    cosine starts (``"cool"``)."""

    total_steps: int
    state: str = "held"
    history: list[list[float]] = field(default_factory=list)

    def check(self, step: int, losses: Sequence[float]) -> tuple[str | None, str]:
        if self.state != "held":
            return None, f"nothing more to check ({self.state})"
        self.history.append([float(x) for x in losses])
        d = P.plateau_decision(self.history)
        if d.plateaued:
            self.state = "cooled"
            return "cool", d.reason
        return None, d.reason

    def due(self, step: int) -> tuple[str | None, str]:
        if self.state == "held" and step >= switch_step(self.total_steps):
            self.state = "cooled"
            why = (
                f"no plateau by {100 * P.SWITCH_BY:g} % of the budget: the cosine starts there "
                "(the shape's hold ends)"
            )
            return "cool", why
        return None, ""
