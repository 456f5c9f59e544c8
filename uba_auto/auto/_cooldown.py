"""Drive a UBA scheduler's φ from a validation loss: :class:`PlateauCooldown`.

A thin stateful wrapper around the pure rule of :mod:`uba_auto.phi._plateau`: it holds the
validation batches, measures their losses at the rule's check steps, and calls
:meth:`~uba_auto.UBAScheduler.set_phi` once (``restart=True``), at the first plateau or at 40 % of
the budget.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .._batches import collect_batches
from .._loaders import check_reiterable
from .._state import preserve_state
from .._validation import check_int
from ..curvature.batch_loss import loss_at
from ..phi import _plateau as rule
from ..scheduler import UBAScheduler
from ._loss import default_loss

__all__ = ["PlateauCheck", "PlateauCooldown", "under_several_ranks"]


def under_several_ranks() -> bool:
    """Whether an initialised default process group has more than one rank (where the rule,
    which judges one process's validation batches, is refused)."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


@dataclass(frozen=True)
class PlateauCheck:
    """One check of :class:`PlateauCooldown`.

    Attributes:
        step: the scheduler step (updates done) at the check.
        status: ``"hold"`` (still improving), ``"cooled"`` (φ switched to ``COOL_PHI`` here) or
            ``"failed"`` (the validation loss could not be measured; φ kept).
        loss: the mean validation loss (``nan`` when it failed, and at the cool-down at 40 %,
            which measures nothing).
        phi: φ in force after the check.
        seconds: wall time of the check.
        reason: why, in one sentence.
    """

    step: int
    status: str
    loss: float
    phi: float
    seconds: float
    reason: str


class PlateauCooldown:
    """Hold the rate, and cool down at the first plateau of the validation loss or at 40 % of
    the budget, whichever comes first (the shape rule).

    On construction the scheduler's φ becomes :data:`~uba_auto.phi._plateau.HOLD_PHI` (the
    rate held near its peak); call :meth:`step` after every ``scheduler.step()``. At the rule's
    check steps (every 2.5 % of the budget from 5 % up to
    :data:`~uba_auto.phi._plateau.SWITCH_BY`, 40 %:
    :func:`~uba_auto.phi._plateau.cooldown_check_steps`) it measures the loss of the same
    ``num_batches`` validation batches, in eval mode without gradients, and at the first
    plateau or spike (:func:`~uba_auto.phi._plateau.plateau_decision`) it switches φ to
    ``COOL_PHI`` with ``restart=True`` (a whole cosine from the current rate to ``lr_min`` over
    the rest of the budget, no jump) and stops checking. Without a plateau
    by then, the same switch happens at :func:`~uba_auto.phi._plateau.cooldown_step` (40 % of the
    budget), with no check. So the rate is held for at most 40 % of the budget and annealed over
    the rest, a shape no fixed φ draws. The model's parameters, buffers, ``.grad``, ``training``
    flags, the global RNG and the validation loader's generators are as they were after every
    check.

    Measured (BENCHMARKS.md §2, findings 24-25, ``benchmarks/plateau_rule.py --rule shape``):
    pre-registered and tested on a fifth set of new tasks, with its checks charged it beat cosine
    by 1.7 % on average and was never worse than it by more than 1 %; it still loses where the
    run is on its stability edge from the first steps (the held rate diverges) or over-fits
    early; read the tables before relying on it.

    Args:
        scheduler: a :class:`~uba_auto.UBAScheduler` (or ``auto_uba``'s scheduler) that has not
            stepped yet.
        model: the model being trained.
        val_loader: validation batches (a ``DataLoader`` or a list), never the training loader:
            a held-out loss is the point. The first ``num_batches`` are taken once and reused at
            every check.
        loss_fn: ``loss(outputs, targets)`` for ``(inputs, targets)`` batches, a
            :class:`~uba_auto.ModelLoss`, or ``None`` (dict batches: the model's own ``.loss``;
            pairs: cross-entropy for integer targets, MSE for float ones).
        num_batches: validation batches per check.
        resume_from: a :meth:`state_dict` of the run being resumed: the scheduler (already
            loaded with its own saved state, e.g. by ``auto_uba(..., resume_from=...)``) keeps
            its φ and the checks go on where the saved run left them.

    Raises:
        TypeError: if ``scheduler`` is not a ``UBAScheduler``.
        ValueError: if the scheduler has stepped, if ``val_loader`` is a one-shot iterator or
            yields no batch, or under an initialised process group of more than one rank (not
            supported yet: each rank would judge its own validation shard).

    Example:
        >>> import torch
        >>> from uba_auto import UBAScheduler
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sched = UBAScheduler(opt, total_steps=99, phi=2.0)
        >>> val = [(torch.randn(8, 2), torch.randn(8, 1)) for _ in range(2)]
        >>> watch = PlateauCooldown(sched, model, val, torch.nn.functional.mse_loss)
        >>> sched.phi
        0.03125
    """

    def __init__(
        self,
        scheduler: UBAScheduler,
        model: nn.Module,
        val_loader: Iterable[Any],
        loss_fn: Any = None,
        *,
        num_batches: int = 8,
        resume_from: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(scheduler, UBAScheduler):
            raise TypeError(
                f"scheduler must be a uba_auto.UBAScheduler (the rule re-shapes it with set_phi), "
                f"got {type(scheduler).__name__}"
            )
        if scheduler.last_epoch != 0 and resume_from is None:
            raise ValueError(
                f"the scheduler has already stepped ({scheduler.last_epoch} steps): build "
                "PlateauCooldown before training, so the hold starts at the first step, or pass "
                "resume_from=<its state_dict()> to continue a saved run"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        num_batches = check_int("num_batches", num_batches, minimum=1)
        if under_several_ranks():
            raise ValueError(
                "PlateauCooldown does not support a process group of more than one rank yet "
                "(each rank would judge its own validation shard and the ranks' phi could "
                "differ); run it without one, or keep auto_uba's phi"
            )
        check_reiterable(val_loader, "PlateauCooldown(val_loader=...)")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._batches = collect_batches(val_loader, num_batches, device=device).batches
        if loss_fn is None:
            loss_fn, _ = default_loss(self._batches[0])
        self.scheduler = scheduler
        self.model = model
        self.loss_fn = loss_fn
        self.check_steps = rule.cooldown_check_steps(scheduler.total_steps, scheduler.warmup_steps)
        self.cooldown_step = rule.cooldown_step(scheduler.total_steps, scheduler.warmup_steps)
        self.checks: list[PlateauCheck] = []
        self.switched_at: int | None = None
        self._history: list[list[float]] = []
        self.initial_phi = scheduler.phi
        if resume_from is not None:
            self.load_state_dict(resume_from)
        else:
            scheduler.set_phi(rule.HOLD_PHI)

    @property
    def due(self) -> bool:
        """Whether the scheduler's current step is a check the rule still needs (call
        :meth:`step` now, with your own validation losses if you measure them anyway)."""
        return self.due_at(self.scheduler.last_epoch)

    def due_at(self, step: int) -> bool:
        """Whether the rule still needs a check when the scheduler has taken ``step`` steps."""
        return self.switched_at is None and step in self.check_steps

    def step(self, losses: Sequence[float] | None = None) -> PlateauCheck | None:
        """Check if the scheduler's step is a check step; call it after every
        ``scheduler.step()``. Returns the :class:`PlateauCheck`, or ``None`` when none was due.

        Args:
            losses: the per-batch validation losses at this step, if your loop measures them
                anyway (then this check costs no forward pass of its own): the same batches, in
                the same order, at every check, eval mode. ``None`` measures them on the
                batches taken from ``val_loader``.

        Never raises because of the validation loss: a failure keeps φ, is recorded (status
        ``"failed"``) and warned about, and the next check tries again."""
        step = self.scheduler.last_epoch
        if self.switched_at is None and step >= self.cooldown_step:
            # The latest cool-down: the hold ends here, whatever the loss (no check is made).
            t0 = time.perf_counter()
            self.scheduler.set_phi(rule.COOL_PHI, restart=True)
            self.switched_at = step
            why = (
                f"no plateau by {100 * rule.SWITCH_BY:g} % of the budget: the hold ends and "
                "the cosine starts here"
            )
            return self._record(step, "cooled", math.nan, t0, why)
        if not self.due:
            return None
        t0 = time.perf_counter()
        try:
            measured = self._losses() if losses is None else [float(x) for x in losses]
            decision = rule.plateau_decision([*self._history, measured])
        except Exception as err:  # a failed check must never stop training
            message = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"uba-auto: validation check at step {step} failed, phi kept: {message}",
                RuntimeWarning,
                stacklevel=2,
            )
            return self._record(step, "failed", math.nan, t0, message)
        self._history.append(measured)
        if decision.plateaued:
            self.scheduler.set_phi(rule.COOL_PHI, restart=True)
            self.switched_at = step
            return self._record(step, "cooled", decision.loss, t0, decision.reason)
        return self._record(step, "hold", decision.loss, t0, decision.reason)

    def _record(self, step: int, status: str, loss: float, t0: float, why: str) -> PlateauCheck:
        check = PlateauCheck(
            step, status, float(loss), self.scheduler.phi, time.perf_counter() - t0, why
        )
        self.checks.append(check)
        return check

    @torch.no_grad()
    def _losses(self) -> list[float]:
        """The validation batches' losses in eval mode; flags and RNG as they were after."""
        model = self.model
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        with preserve_state(model):
            model.eval()
            return [
                float(loss_at(state, model, batch, self.loss_fn, batch_index=i))
                for i, batch in enumerate(self._batches)
            ]

    def state_dict(self) -> dict[str, Any]:
        """The checks, their losses and the switch (the scheduler saves its own state)."""
        return {
            "history": [list(row) for row in self._history],
            "checks": [asdict(c) for c in self.checks],
            "switched_at": self.switched_at,
            "initial_phi": self.initial_phi,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (load the scheduler's own state alongside)."""
        missing = {"history", "checks", "switched_at", "initial_phi"} - set(state)
        if missing:
            raise ValueError(f"not a PlateauCooldown state: missing {sorted(missing)}")
        self._history = [list(map(float, row)) for row in state["history"]]
        self.checks = [PlateauCheck(**c) for c in state["checks"]]
        self.switched_at = state["switched_at"]
        self.initial_phi = state["initial_phi"]
