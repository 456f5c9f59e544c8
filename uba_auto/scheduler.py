r"""PyTorch schedulers over the pure schedules of :mod:`uba_auto.schedules`.

:class:`BudgetScheduler` does the param-group plumbing for any schedule in
:data:`~uba_auto.schedules.SCHEDULES`; :class:`UBAScheduler` adds the UBA shape parameter
:math:`\varphi` and :meth:`UBAScheduler.set_phi`, which re-shapes the rest of the budget.

Both follow the interface of :mod:`torch.optim.lr_scheduler` (``step()`` once per optimizer step,
``get_last_lr()``, ``state_dict()`` / ``load_state_dict()``), but compute every rate in closed form
from the explicit step count, never recursively from the previous rate. That is what makes these
guarantees hold:

* the first optimizer step already uses the rate of step 0 (the warm-up start when warming up);
* each param group's peak is its ``initial_lr`` if present (left there by an earlier scheduler and
  restored with the optimizer's state dict), else its current ``lr``; constructing a scheduler after
  ``optimizer.load_state_dict`` therefore neither crashes nor takes a decayed rate as the peak;
* ``load_state_dict`` writes the restored step's rate back into the optimizer, so the remaining
  rate sequence after a resume is bit-identical to an uninterrupted run, whichever order the
  optimizer and the scheduler are restored in;
* stepping past ``total_steps`` holds the final rate (``lr_min``), it never wraps around, and a
  :class:`PastBudgetWarning` says so once per run when an optimizer step used such a rate (a loop
  of ``total_steps + 1`` steps is silent); the state dict records it, so a resumed run does not
  repeat a warning given before its checkpoint, as an uninterrupted run would not;
* the state dict holds only numbers, strings, lists and dicts, so ``torch.load(weights_only=True)``
  (PyTorch's default since 2.6) reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ._optim import group_peaks, per_group
from ._scheduler_state import (
    STATE_VERSION,
    PastBudgetWarning,
    check_state,
    warn_past_budget,
    write_rates,
)
from ._schedules.factories import check_budget
from ._validation import check_fraction, check_int, check_positive_finite
from .schedules import (
    Schedule,
    decay_progress,
    decay_schedule,
    get_schedule,
    join_schedules,
    make_schedule,
    uba_factor,
    uba_reentry,
)

__all__ = ["BudgetScheduler", "PastBudgetWarning", "PhiChange", "UBAScheduler"]


def check_lr_min_args(lr_min: Any, lr_min_ratio: Any) -> float | None:
    """Check that at most one of ``lr_min`` / ``lr_min_ratio`` is given; return the ratio.

    Shared by the schedulers and :func:`~uba_auto.auto.auto_uba` (which checks before probing).
    """
    if lr_min is not None and lr_min_ratio is not None:
        raise ValueError(
            "pass either lr_min or lr_min_ratio, not both "
            f"(got lr_min={lr_min!r}, lr_min_ratio={lr_min_ratio!r})"
        )
    if lr_min_ratio is None:
        return None
    return check_fraction("lr_min_ratio", lr_min_ratio, closed_low=True, closed_high=True)


class BudgetScheduler(LRScheduler):
    """Any schedule of :data:`~uba_auto.schedules.SCHEDULES` as a PyTorch scheduler.

    Step it once per optimizer step, after ``optimizer.step()``. Each param group anneals from its
    own peak (``initial_lr`` if set, else its ``lr`` at construction) to its own ``lr_min``.

    Args:
        optimizer: the optimizer whose param groups' ``lr`` this scheduler sets.
        total_steps: the step at which the rate reaches its final value (``lr_min``); see
            :mod:`uba_auto.schedules` for the time convention.
        schedule: a name in :data:`~uba_auto.schedules.SCHEDULES`.
        lr_min: final rate, one float for all groups or one per group. Default 0.
        lr_min_ratio: alternatively, the final rate as a fraction of each group's peak, in [0, 1].
        warmup_steps: length of the warm-up; ``None`` keeps the schedule's default (none, or
            OneCycle's ``pct_start`` rise).
        warmup_start_lr: rate at step 0 when warming up, one float or one per group; ``None`` keeps
            the schedule's default (0, or ``lr_max / div_factor`` for OneCycle).
        **schedule_kwargs: extra arguments of the named schedule (``milestones`` for ``"step"``...).

    Raises:
        TypeError: if ``optimizer`` is not an optimizer or a group's ``lr`` is not a number.
        ValueError: on any out-of-range argument, naming it (checked at construction, so a bad
            setting never surfaces mid-training).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = BudgetScheduler(opt, 4, schedule="linear")
        >>> [sched.lr_at(t)[0] for t in range(6)]  # past total_steps the final rate holds
        [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        *,
        schedule: str = "cosine",
        lr_min: float | Sequence[float] | None = None,
        lr_min_ratio: float | None = None,
        warmup_steps: int | None = None,
        warmup_start_lr: float | Sequence[float] | None = None,
        **schedule_kwargs: Any,
    ) -> None:
        peaks = group_peaks(optimizer)
        get_schedule(schedule)  # an unknown name is the first thing to report
        self.schedule = schedule
        given = 0 if warmup_steps is None else warmup_steps  # None: the schedule's own (_plan)
        self.total_steps, warmup = check_budget(total_steps, given)
        self.warmup_steps = None if warmup_steps is None else warmup
        ratio = check_lr_min_args(lr_min, lr_min_ratio)
        if ratio is not None:
            self.lr_mins = [ratio * p for p in peaks]
        else:
            self.lr_mins = per_group("lr_min", 0.0 if lr_min is None else lr_min, len(peaks))
        self.warmup_start_lrs = per_group("warmup_start_lr", warmup_start_lr, len(peaks))
        self.schedule_kwargs = dict(schedule_kwargs)
        self.peak_lrs = peaks
        self._plans = self._build_plans()  # checks every argument before the optimizer is touched
        self._past_budget_warned = False
        super().__init__(optimizer, last_epoch=-1)

    # -- the schedule ------------------------------------------------------------------------------

    def _plan(self, group: int) -> Schedule:
        # Warm-up arguments left at None keep each schedule's own default (OneCycle's rise is its
        # warm-up; the others default to none).
        return make_schedule(
            self.schedule,
            self.total_steps,
            lr_max=self.peak_lrs[group],
            lr_min=self.lr_mins[group],
            warmup_steps=self.warmup_steps,
            warmup_start_lr=None if self.warmup_start_lrs is None else self.warmup_start_lrs[group],
            **self._extra_kwargs(),
        )

    def _extra_kwargs(self) -> dict[str, Any]:
        return self.schedule_kwargs

    def _build_plans(self) -> list[Schedule]:
        """One checked schedule per param group, naming the group whose arguments do not fit."""
        plans = []
        for i in range(len(self.peak_lrs)):
            try:
                plans.append(self._plan(i))
            except (ValueError, TypeError) as err:
                raise type(err)(f"param group {i}: {err}") from None
        return plans

    def lr_at(self, step: int) -> list[float]:
        """The rate of every param group at an explicit ``step`` (>= 0), without stepping.

        Rates past ``total_steps`` are the final rate. After :meth:`UBAScheduler.set_phi` this is
        the re-shaped plan.
        """
        step = check_int("step", step, minimum=0)
        return [plan(step) for plan in self._plans]

    def get_lr(self) -> list[float]:
        """The rates for the current step count (``last_epoch``), in closed form."""
        return self.lr_at(self.last_epoch)

    _get_closed_form_lr = get_lr

    def step(self, epoch: int | None = None) -> None:
        """Advance one step; warn once if the optimizer took a step past ``total_steps``."""
        super().step(epoch)
        if not self._past_budget_warned and self.last_epoch > self.total_steps + 1:
            self._past_budget_warned = True
            warn_past_budget(type(self).__name__, self.total_steps, self.last_epoch, self.lr_mins)

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: plain numbers, strings, lists and dicts only."""
        return {
            "version": STATE_VERSION,
            "class": type(self).__name__,
            "schedule": self.schedule,
            "schedule_kwargs": dict(self.schedule_kwargs),
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "peak_lrs": list(self.peak_lrs),
            "lr_mins": list(self.lr_mins),
            "warmup_start_lrs": (
                None if self.warmup_start_lrs is None else list(self.warmup_start_lrs)
            ),
            "base_lrs": list(self.base_lrs),
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "_last_lr": list(self._last_lr),
            "past_budget_warned": self._past_budget_warned,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` and write the restored step's rate into the
        optimizer, so training resumes with exactly the rate it would have had.

        Raises:
            ValueError: if the state comes from another scheduler class, another number of param
                groups, or a newer version of uba-auto.
        """
        check_state(state_dict, type(self).__name__, len(self.optimizer.param_groups))
        self.schedule = state_dict["schedule"]
        self.schedule_kwargs = dict(state_dict["schedule_kwargs"])
        self.total_steps = state_dict["total_steps"]
        self.warmup_steps = state_dict["warmup_steps"]
        self.peak_lrs = list(state_dict["peak_lrs"])
        self.lr_mins = list(state_dict["lr_mins"])
        starts = state_dict["warmup_start_lrs"]
        self.warmup_start_lrs = None if starts is None else list(starts)
        self.base_lrs = list(state_dict["base_lrs"])
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict["_step_count"]
        # Absent from states saved before the warning existed: those warn when they cross.
        self._past_budget_warned = bool(state_dict.get("past_budget_warned", False))
        self._load_extra(state_dict)
        self._plans = self._build_plans()
        write_rates(self.optimizer, self.get_lr())
        self._last_lr = list(state_dict["_last_lr"])

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        """Hook for subclasses to restore their own state before the rate is re-applied."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(schedule={self.schedule!r}, total_steps={self.total_steps}, "
            f"warmup_steps={self.warmup_steps}, step={self.last_epoch}, "
            f"peak_lrs={self.peak_lrs}, lr_mins={self.lr_mins})"
        )


class PhiChange(NamedTuple):
    """A :meth:`UBAScheduler.set_phi` call: at ``step``, φ went from ``old_phi`` to ``new_phi``."""

    step: int
    old_phi: float
    new_phi: float


class _Segment(NamedTuple):
    """A stretch of the decay under one φ: from ``start`` on, entered at progress ``entry``; a
    restarted one (``set_phi(restart=True)``) is a fresh decay from ``level`` of the way from
    ``lr_min`` to the peak (1: the peak itself)."""

    start: int
    phi: float
    entry: float
    level: float = 1.0


class UBAScheduler(BudgetScheduler):
    r"""The UBA schedule as a PyTorch scheduler, with φ adjustable mid-training.

    .. math::

        \eta_t = \eta_{\min} + (\eta_{\max} - \eta_{\min})
                 \frac{1}{1 + \tfrac{\varphi}{2}\tan^2(\pi s/2)}, \qquad s = \frac{t - W}{T - W}

    **Re-shaping with** :meth:`set_phi`. At step :math:`t_0` with progress :math:`s_0` under the
    current :math:`\varphi`, the rest of the budget follows the curve of the new :math:`\varphi'`
    *entered at the same rate*: the entry point :math:`s_0'` solves
    :math:`f_{\varphi'}(s_0') = f_{\varphi}(s_0)`, i.e.

    .. math::

        \tan\frac{\pi s_0'}{2} = \sqrt{\varphi / \varphi'}\,\tan\frac{\pi s_0}{2},

    and the remaining steps :math:`t_0 \dots T` are mapped linearly onto :math:`s_0' \dots 1`: the
    plan becomes the old one joined at :math:`t_0` to a UBA decay of :math:`T - t_0` steps entered
    at :math:`s_0'` (:func:`~uba_auto.schedules.join_schedules`,
    :func:`~uba_auto.schedules.decay_schedule`, :func:`~uba_auto.schedules.uba_reentry`). So
    the rate is continuous at :math:`t_0` (the rate at :math:`t_0` is not touched), still reaches
    ``lr_min`` exactly at ``total_steps``, and the remainder has the shape of the new φ's curve from
    the current level down. Changing φ during the warm-up or at the very start of the decay is the
    same as having built the scheduler with the new φ. Each change is kept in
    :attr:`phi_history` as a :class:`PhiChange` and saved in :meth:`state_dict`.

    Args:
        optimizer: the optimizer to schedule.
        total_steps: the step at which the rate reaches ``lr_min``.
        phi: the UBA shape parameter, finite and > 0 (2 is cosine annealing).
        lr_min, lr_min_ratio, warmup_steps, warmup_start_lr: as in :class:`BudgetScheduler`.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> sched = UBAScheduler(opt, total_steps=100, phi=4.0)
        >>> for _ in range(50):
        ...     opt.step()
        ...     sched.step()
        >>> round(sched.get_last_lr()[0], 12)  # 0.1 * 2 / (2 + phi)
        0.033333333333
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        *,
        phi: float,
        lr_min: float | Sequence[float] | None = None,
        lr_min_ratio: float | None = None,
        warmup_steps: int = 0,
        warmup_start_lr: float | Sequence[float] = 0.0,
    ) -> None:
        phi = check_positive_finite("phi", phi, hint="; phi = 2 is cosine annealing")
        warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        self.phi = phi
        # The decay phase as segments. Segment 0 starts at the end of the warm-up; a later segment
        # is joined at its start, so it applies to the steps after it and the rate at the step
        # where set_phi was called is never recomputed.
        self._segments = [_Segment(warmup_steps, phi, 0.0)]
        self.phi_history: list[PhiChange] = []
        super().__init__(
            optimizer,
            total_steps,
            schedule="uba",
            lr_min=lr_min,
            lr_min_ratio=lr_min_ratio,
            warmup_steps=warmup_steps,
            warmup_start_lr=warmup_start_lr,
        )

    def _extra_kwargs(self) -> dict[str, Any]:
        return {"phi": self._segments[0].phi}

    def _plan(self, group: int) -> Schedule:
        """The UBA schedule of segment 0, joined at each later segment's start to that segment's
        UBA decay over the rest of the budget."""
        plan, later = super()._plan(group), self._segments[1:]
        if not later:
            return plan
        peak, low, total = self.peak_lrs[group], self.lr_mins[group], self.total_steps
        decays = [
            decay_schedule(
                "uba",
                total - s.start,
                phi=s.phi,
                lr_max=peak if s.level == 1.0 else low + s.level * (peak - low),
                lr_min=low,
                entry=s.entry,
            )
            for s in later
        ]
        return join_schedules([plan, *decays], [s.start for s in later])

    def set_phi(self, phi: float, *, restart: bool = False) -> PhiChange:
        r"""Use ``phi`` for the rest of the budget, with no jump in the rate (see the class docs).

        Call it between steps; the rate already in the optimizer is kept, the new shape applies from
        the next :meth:`step`. After ``total_steps`` the change is recorded but has nothing left to
        shape (the rate holds ``lr_min``).

        Args:
            phi: the new shape parameter, finite and > 0.
            restart: ``False`` (default): the rest follows the new φ's curve entered at the
                current rate (the class docs). ``True``: a fresh UBA decay of the new φ from the
                current rate, :math:`\eta_t = \eta_{\min} + (\eta_{t_0} - \eta_{\min})
                f_{\varphi'}\big((t - t_0)/(T - t_0)\big)`: the whole shape of the new φ over
                the remaining steps (e.g. a full cosine after a hold, as ``PlateauCooldown``
                cools down). Both are continuous at :math:`t_0` and end at ``lr_min``.

        Returns:
            The :class:`PhiChange` appended to :attr:`phi_history`.
        """
        phi = check_positive_finite("phi", phi, hint="; phi = 2 is cosine annealing")
        step = self.last_epoch
        change = PhiChange(step, self.phi, phi)
        if step <= self.warmup_steps:
            # Nothing of the decay phase has been used: the new curve starts where the old one did.
            self._segments = [_Segment(self.warmup_steps, phi, 0.0)]
        elif step < self.total_steps:
            # Drop a segment started at this very step: the shape in force at `step` is the one
            # before it (the last one left), and that is the level the new curve is entered at.
            self._segments = [seg for seg in self._segments if seg.start < step]
            old = self._segments[-1]
            span = self.total_steps - old.start
            s_old = float(decay_progress(step - old.start, span, old.entry))
            if restart:
                # The share of the way from lr_min to the peak at `step`, the same in every group
                # (one shape for all): where the fresh decay starts.
                level = old.level * float(uba_factor(s_old, old.phi))
                self._segments.append(_Segment(step, phi, 0.0, level))
            else:  # re-entered on the new curve, at the level the current segment decays from
                entry = uba_reentry(s_old, old.phi, phi)
                self._segments.append(_Segment(step, phi, entry, old.level))
        self._plans = self._build_plans()
        self.phi = phi
        self.phi_history.append(change)
        return change

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["phi"] = self.phi
        # A segment that is not a restart keeps the three fields earlier versions read.
        state["segments"] = [
            list(seg) if seg.level != 1.0 else list(seg[:3]) for seg in self._segments
        ]
        state["phi_history"] = [list(change) for change in self.phi_history]
        return state

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        self.phi = state_dict["phi"]
        # Three fields in states saved before restarts existed (level 1: not restarted).
        self._segments = [
            _Segment(int(seg[0]), float(seg[1]), float(seg[2]), *map(float, seg[3:4]))
            for seg in state_dict["segments"]
        ]
        self.phi_history = [
            PhiChange(int(a), float(b), float(c)) for a, b, c in state_dict["phi_history"]
        ]

    def __repr__(self) -> str:
        return (
            f"UBAScheduler(phi={self.phi:g}, total_steps={self.total_steps}, "
            f"warmup_steps={self.warmup_steps}, step={self.last_epoch}, "
            f"peak_lrs={self.peak_lrs}, lr_mins={self.lr_mins}, "
            f"phi_changes={len(self.phi_history)})"
        )
