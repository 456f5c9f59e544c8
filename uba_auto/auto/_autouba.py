"""The object :func:`~uba_auto.auto.auto_uba` returns: :class:`AutoUBA` and its scheduler.

:class:`AutoUBA` keeps its state explicit: its settings
(:class:`~uba_auto.auto._state.AutoSettings`) and where its φ choice stands
(:class:`~uba_auto.auto._state.AutoState`, frozen). Every transition
(the pre-training estimate, the first optimizer, a re-estimation, a resume) computes a new state
with :mod:`uba_auto.auto._choice`'s functions and commits it in one assignment, so one that fails
leaves the object as it was. The loader's position (:class:`~uba_auto._loaders.BatchStream`) is
the one thing a probe cannot give back: the batches it drew stay drawn.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._distributed import Communicator, is_communication_failure
from .._loaders import BatchStream
from .._validation import check_int
from ..phi import LINKS, self_stabilising
from ..probe import CurvatureEstimate, ProbeSettings, rule_for_link, run_probe
from ..report import CurvatureReport, ReestimationRecord
from ..scheduler import UBAScheduler
from ._choice import (
    adopt_optimizer,
    as_pair,
    check_final_rate,
    choose,
    default_loss,
    edge_fraction,
    initial_state,
    optimizer_limit,
    resolve_peak,
    suggested_lr,
)
from ._cooldown import PlateauCooldown
from ._plan import (
    HVP_COST_IN_GRADIENTS,
    hvp_budget,
    overspend_note,
    planned_reestimations,
    probe_cost,
    validation_overspend_note,
    validation_plan,
)
from ._state import AutoSettings, AutoState, SettingAttribute, check_state_dict, continue_schedule
from ._sync import agree_phi

__all__ = ["HVP_COST_IN_GRADIENTS", "AutoUBA", "AutoUBAScheduler"]

logger = logging.getLogger("uba_auto")


class AutoUBAScheduler(UBAScheduler):
    """A :class:`~uba_auto.scheduler.UBAScheduler` whose ``step()`` also re-estimates φ every
    ``reestimate_every`` steps through its :class:`AutoUBA` (collectively, at the same steps on
    every run, so a resumed run re-estimates at the same steps as an uninterrupted one); see
    :meth:`AutoUBA.maybe_reestimate`; with ``auto_uba(val_loader=...)`` it also runs the
    validation plateau rule's checks (:attr:`AutoUBA.plateau`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, auto: AutoUBA, **kwargs: Any) -> None:
        self._auto = auto
        super().__init__(optimizer, **kwargs)

    def step(self, epoch: int | None = None, *, val_losses: Sequence[float] | None = None) -> None:
        """Advance one step (and re-estimate φ, or run a due plateau check, as planned).

        Args:
            epoch: as for :meth:`torch.optim.lr_scheduler.LRScheduler.step` (deprecated there).
            val_losses: with ``auto_uba(val_loader=...)``, the per-batch validation losses
                your loop measured at this step (eval mode, the same batches in the same
                order at every check), used by the plateau check this step runs instead of
                its own forward passes: then the check costs nothing. Read
                :attr:`AutoUBA.validation_due` before calling ``step()`` to know whether one
                is due; losses given when none is due are not used. ``None``: the check
                measures the ``val_batches`` batches itself.

        Raises:
            ValueError: if ``val_losses`` is given to a run without ``val_loader`` (no
                plateau rule to feed), is empty, or is not a sequence of numbers.
        """
        if val_losses is not None:
            val_losses = self._auto._check_val_losses(val_losses)
        super().step(epoch)
        self._auto.maybe_reestimate(self.last_epoch)
        self._auto._check_plateau(val_losses)


class AutoUBA:
    """What :func:`auto_uba` returns: the chosen φ, the report, and the scheduler.

    Built by :func:`auto_uba`, which checks the arguments and resolves the process group
    (``comm``) once; constructing one runs the pre-training probe (or, with ``resume_from``,
    restores a saved state), so an ``AutoUBA`` always has its report.

    Attributes:
        phi: the φ in force now.
        report: the :class:`~uba_auto.report.CurvatureReport` (with the re-estimation history).
        scheduler: the :class:`AutoUBAScheduler` for the optimizer given to :func:`auto_uba`,
            or ``None`` until :meth:`make_scheduler` is called.
        suggested_lr: the peak rate the curvature suggests: a share
            (:data:`~uba_auto.phi.SUGGESTED_SHARE`) of the optimizer's stability limit over the
            sharpness it sees (for plain SGD when the optimizer is unknown); ``None`` without
            positive curvature. A starting point for a peak-rate search, not a tuned rate.
        budget, warmup_steps, reestimate_every, probe_fraction: the settings (as are
            ``lr_min``, ``lr_min_ratio``, ``num_batches``, ``link``, ``phi_min``, ``phi_max``).
        probe_kwargs: the keywords every probe passes to
            :func:`~uba_auto.probe.probe_curvature`.
        probe_hvps, batches_drawn: Hessian-vector products and batches the probes took so far.
        plateau: with ``auto_uba(val_loader=...)``, the :class:`~uba_auto.PlateauCooldown` that
            decides φ from the validation loss (its ``checks``, ``switched_at``), built with the
            scheduler; else ``None``. A switch, or a failed check, is also a record of the
            report's history.
    """

    budget = SettingAttribute()
    warmup_steps = SettingAttribute()
    lr_min = SettingAttribute()
    lr_min_ratio = SettingAttribute()
    num_batches = SettingAttribute()
    reestimate_every = SettingAttribute()
    probe_fraction = SettingAttribute()
    link = SettingAttribute()
    phi_min = SettingAttribute()
    phi_max = SettingAttribute()

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        settings: AutoSettings,
        *,
        loss_fn: Any = None,
        probe_kwargs: Mapping[str, Any] | None = None,
        comm: Communicator | None = None,
        peak_lr: float | str | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        resume_from: Mapping[str, Any] | None = None,
        val_loader: Iterable[Any] | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.plateau: PlateauCooldown | None = None
        self._val_loader = val_loader
        self._pending_plateau = None if resume_from is None else resume_from.get("plateau")
        self.probe_kwargs = dict(probe_kwargs or {})
        self.scheduler: AutoUBAScheduler | None = None
        self._settings = settings
        self._comm = comm
        self._batches = BatchStream(loader)
        self._optimizer = optimizer  # re-estimations before make_scheduler read its state
        if resume_from is not None:
            self._state = self._resumed(resume_from)
        else:
            self._state = self._estimated(peak_lr, optimizer)

    # -- read-outs ---------------------------------------------------------------------------------
    @property
    def loader(self) -> Iterable[Any]:
        return self._batches.loader

    @property
    def report(self) -> CurvatureReport:
        return self._state.report

    @property
    def phi(self) -> float:
        """φ in force: the scheduler's, or before there is one, the last estimate's."""
        return self.scheduler.phi if self.scheduler is not None else self._state.phi

    @property
    def suggested_lr(self) -> float | None:
        return self._state.report.suggested_lr

    @property
    def probe_hvps(self) -> int:
        return self._state.probe_hvps

    @property
    def batches_drawn(self) -> int:
        return self._batches.drawn

    @property
    def probe_cost_fraction(self) -> float:
        """Probing spent so far, in gradient-equivalents (graph setup and HVPs,
        :func:`~uba_auto.auto._plan.probe_cost`), as a fraction of the budget."""
        return probe_cost(self.probe_hvps, self._batches.drawn) / self.budget

    @property
    def probe_share(self) -> float:
        """Each probe's share of ``probe_fraction * budget``, in gradient-equivalents: the
        pre-training probe and every planned re-estimation get the same."""
        settings = self._settings
        count = 1 + planned_reestimations(settings.total_steps, settings.reestimate_every)
        return settings.probe_fraction * settings.budget / count

    @property
    def _stability(self) -> tuple[float, float] | None:
        return self._state.stability

    # -- probing -----------------------------------------------------------------------------------
    def _probe(self, batches: list[Any], optimizer: Any, **overrides: Any) -> CurvatureEstimate:
        """The one place that runs the probe (every estimation of this object goes through it),
        on the curvature ``optimizer`` sees (``None``: the raw curvature)."""
        kwargs = {**self.probe_kwargs, **overrides}
        if "max_hvps" not in kwargs:  # the user's max_hvps turns the plan off
            kwargs.setdefault("hvp_budget", hvp_budget(self.probe_share, len(batches)))
        # The decision waits on sigma only where the link's phi moves with it.
        flat = LINKS[self._settings.link].noise_flat_above
        kwargs.setdefault("decision_rule", rule_for_link(flat))
        settings = ProbeSettings(num_batches=self.num_batches, **kwargs)
        return run_probe(
            self.model, batches, self.loss_fn, settings, self._comm, optimizer=optimizer
        )

    def _reestimation_optimizer(self) -> Any:
        """Whose curvature a re-estimation measures: that of the pre-training probe (raw stays
        raw, one curvature for the whole φ history), read from the live optimizer's state."""
        if self._state.report.estimate.optimizer is None:
            return None
        return self.scheduler.optimizer if self.scheduler is not None else self._optimizer

    def _estimated(self, peak_lr: float | str | None, optimizer: Any) -> AutoState:
        """The state of the pre-training estimate (and, for ``peak_lr='suggest'``, the
        optimizer's rates set to the suggestion, only once φ is chosen: a failure leaves the
        optimizer as it was)."""
        settings = self._settings
        batches = self._batches.draw(settings.num_batches)
        # Under a process group an empty loader on one rank fails the probe's collective start.
        if not batches and self._comm is None:
            raise ValueError(
                "loader yielded no batches; auto_uba needs at least one batch to probe"
            )
        notes, loss_guess = [], ""
        if self.loss_fn is None and batches:
            self.loss_fn, loss_guess = default_loss(batches[0])
        t0 = time.perf_counter()
        est = self._probe(batches, optimizer)
        cost = probe_cost(est.num_hvps, est.num_batches)
        if cost > self.probe_share:
            extras = tuple(k for k in ("trace", "density") if k in est.hvps)
            note = overspend_note(
                "the pre-training probe",
                cost,
                self.probe_share,
                settings.budget,
                settings.probe_fraction,
                extras,
            )
            notes.append(note)
            warnings.warn(f"uba-auto: {note}", RuntimeWarning, stacklevel=4)
        if settings.plateau:
            checks, val_cost = validation_plan(
                settings.budget, settings.warmup_steps, settings.val_batches
            )
            if val_cost > settings.probe_fraction * settings.budget:
                note = validation_overspend_note(
                    checks, settings.val_batches, val_cost, settings.budget, settings.probe_fraction
                )
                notes.append(note)
                warnings.warn(f"uba-auto: {note}", RuntimeWarning, stacklevel=4)
        stability = None if optimizer is None else optimizer_limit(optimizer, est)
        suggested = suggested_lr(est, stability, settings.warmup_steps)
        peak = resolve_peak(peak_lr, suggested, est.lambda_max, optimizer)
        suggest = isinstance(peak_lr, str) and optimizer is not None
        if suggest:  # checked now, written only once everything below has succeeded
            check_final_rate(
                [peak.value] * len(optimizer.param_groups), settings.lr_min, settings.lr_min_ratio
            )
        edge = edge_fraction(est, as_pair(stability, peak), peak)  # the limit at the peak rate
        stabiliser = self_stabilising(self.model, optimizer)
        try:
            choice, error = choose(est, settings, peak, edge, settings.budget, stabiliser), None
        except Exception as err:
            choice, error = None, err
        phi = None if choice is None else choice.phi
        error = agree_phi(self._comm, settings, error, phi, "estimating phi")
        if error is not None:
            raise error  # the optimizer is as it was
        if suggest:
            for group in optimizer.param_groups:
                group["lr"] = peak.value
                group.pop("initial_lr", None)
            notes.append(f"peak_lr='suggest' set every param group's lr to {peak.value:.4g}")
            stability = optimizer_limit(optimizer, est)  # its formula at the rate just set
        return initial_state(
            est,
            choice,
            settings,
            peak=peak,
            stability=stability,
            edge=edge,
            stabiliser=stabiliser,
            seconds=time.perf_counter() - t0,
            notes=notes,
            probe_share=cost / settings.budget,
            loss_guess=loss_guess,
        )

    def _resumed(self, saved: Mapping[str, Any]) -> AutoState:
        """The state ``saved`` holds (its scheduler state pending), the loader fast-forwarded
        past the batches the saved run probed."""
        state = AutoState.from_dict(saved, self._settings)
        self._check_plateau_state(saved)
        self._fast_forward(saved)
        return state

    def _check_plateau_state(self, saved: Mapping[str, Any]) -> None:
        """A run with the plateau rule resumes a scheduler only from a state that holds the rule's
        checks (one saved before its scheduler existed has none, and needs none)."""
        started = saved.get("scheduler") is not None or self.plateau is not None
        if self._settings.plateau and started and not saved.get("plateau"):
            raise ValueError(
                "the state holds no validation plateau rule state (it was saved by a run "
                "without val_loader, or before the scheduler existed): resume it without "
                "val_loader, or start a new run"
            )

    def _fast_forward(self, saved: Mapping[str, Any]) -> None:
        """Move the probe's loader past the batches the saved run drew (from the start, so a
        repeat is harmless), and take the loss the saved run took by default."""
        first = self._batches.skip_to(saved["batches_drawn"], self.num_batches)
        if self.loss_fn is None and first is not None:
            self.loss_fn, _ = default_loss(first)  # as the saved run chose it

    # -- transitions -------------------------------------------------------------------------------
    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> AutoUBAScheduler:
        """Build (and keep as :attr:`scheduler`) the UBA scheduler with the chosen φ.

        The schedule spans ``budget`` optimizer steps: ``total_steps = budget - 1``, so the last
        update of the budget uses ``lr_min``. If :func:`auto_uba` had no optimizer (and no
        ``peak_lr``), the peak rate it assumed is replaced by ``optimizer``'s largest group rate,
        in the report too, and φ is chosen again for that rate where the link depends on it; the
        same happens when ``optimizer`` is the first optimizer seen and the link reads its
        stability limit (the gated-edge link; an optimizer whose curvature the pre-training probe
        measured: SGD always, an adaptive one only if it was given to :func:`auto_uba`).
        After ``auto_uba(..., resume_from=state)``, the scheduler continues the saved one.
        If it raises, this object is as it was, and a retry starts from the same state.
        """
        if self.scheduler is not None:
            raise ValueError(
                "make_scheduler was already called: use auto.scheduler (a second scheduler would "
                "restart the budget at step 0 while the report's history goes on)"
            )
        settings = self._settings
        state = adopt_optimizer(self._state, settings, optimizer, self.model)
        # Every rank builds its scheduler once: agree that phi is the same everywhere (a rank
        # whose optimizer differs could have re-chosen it differently above).
        error = agree_phi(self._comm, settings, None, state.phi, "building the scheduler")
        if error is not None:
            raise error
        scheduler = AutoUBAScheduler(
            optimizer,
            self,
            total_steps=settings.total_steps,
            phi=state.phi,
            lr_min=settings.lr_min,
            lr_min_ratio=settings.lr_min_ratio,
            warmup_steps=settings.warmup_steps,
        )
        state = continue_schedule(scheduler, state)  # resumed: continue the saved schedule
        plateau = None
        if settings.plateau:
            plateau = PlateauCooldown(
                scheduler,
                self.model,
                self._val_loader,
                self.loss_fn,
                num_batches=settings.val_batches,
                resume_from=self._pending_plateau,
            )
        self._state, self.scheduler, self.plateau = state, scheduler, plateau
        self._pending_plateau = None
        return scheduler

    def maybe_reestimate(self, step: int) -> ReestimationRecord | None:
        """Re-estimate φ (:meth:`reestimate`) if the plan says so at scheduler step ``step``.

        The plan: every ``reestimate_every`` steps, but not at step 0 (the pre-training probe
        just ran) nor at or after ``total_steps - 1`` (only the final step is left then, and its
        rate is ``lr_min`` whatever φ is). :meth:`AutoUBAScheduler.step` calls it after every
        step, so the same steps re-estimate on every run and every rank.

        Args:
            step: the scheduler step just reached (the scheduler's ``last_epoch``).

        Returns:
            The :class:`~uba_auto.report.ReestimationRecord`, or ``None`` if none is due.

        Raises:
            ValueError: if a re-estimation is due and ``step`` is not the scheduler's step.
        """
        step = check_int("step", step, minimum=0)
        every = self.reestimate_every
        sched = self.scheduler
        total = self._settings.total_steps if sched is None else sched.total_steps
        if not every or not 0 < step < total - 1 or step % every:
            return None
        if sched is not None and step != sched.last_epoch:
            raise ValueError(
                f"step must be the scheduler's step ({sched.last_epoch}), got {step}; "
                "AutoUBAScheduler.step() calls maybe_reestimate itself"
            )
        return self._reestimate_at(step)

    def reestimate(self) -> ReestimationRecord:
        """Re-probe on fresh batches and set φ for the rest of the budget (no jump in the rate).

        Never raises because of the probe: a failure keeps the current φ and is recorded in the
        report's history (and warned about), so training continues. Under a process group it is
        collective: every rank calls it at the same step (the scheduler does), and a failure on
        any rank is recorded on every rank.

        Raises:
            ValueError: under ``auto_uba(val_loader=...)``, where the validation plateau rule
                decides φ (a curvature estimate would override its hold or its switch).
        """
        if self._settings.plateau:
            raise ValueError(
                "phi follows the validation plateau rule (auto_uba was given val_loader): a "
                "re-estimation from the curvature would override it; build auto_uba without "
                "val_loader to re-estimate"
            )
        return self._reestimate_at(self.scheduler.last_epoch if self.scheduler is not None else 0)

    def _reestimate_at(self, step: int) -> ReestimationRecord:
        settings, state = self._settings, self._state
        spent = probe_cost(state.probe_hvps, self._batches.drawn)
        allowed = settings.probe_fraction * settings.budget
        expected = probe_cost(self._expected_reestimation_hvps(), settings.num_batches)
        if spent + expected > allowed:
            message = f"probing budget: {spent:.0f} of {allowed:.0f} gradient-equivalents spent"
            record = ReestimationRecord(step, "skipped", None, self.phi, 0, 0.0, message)
            self._state = state.with_record(record)
            return record
        t0 = time.perf_counter()
        est, choice, error = None, None, None
        try:
            batches = self._batches.draw(settings.num_batches)
            est = self._probe(batches, self._reestimation_optimizer(), density=False)
            remaining = settings.budget - step
            choice = choose(
                est, settings, state.peak, state.edge_fraction, remaining, state.stabiliser
            )
        except Exception as err:  # a failed probe must never stop training
            if is_communication_failure(err):
                raise  # the process group is broken: training cannot go on either
            error = err
        what = f"estimating phi at step {step}"
        error = agree_phi(
            self._comm, self._settings, error, None if choice is None else choice.phi, what
        )
        hvps = 0 if est is None else est.num_hvps  # a probe that ran before a later failure
        if error is not None:
            message = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"uba-auto: re-estimation at step {step} failed, phi kept: {message}",
                RuntimeWarning,
                stacklevel=3,  # the caller of reestimate / maybe_reestimate
            )
            seconds = time.perf_counter() - t0
            record = ReestimationRecord(step, "failed", None, self.phi, hvps, seconds, message)
            self._state = state.with_record(record, hvps)
            return record
        if self.scheduler is not None:
            self.scheduler.set_phi(choice.phi)
        record = ReestimationRecord(
            step,
            "ok",
            choice.kappa,
            choice.phi,
            hvps,
            time.perf_counter() - t0,
            choice.reason,
            warnings=(*choice.warnings, *est.warnings),
        )
        logger.info(
            "uba-auto: step %d, kappa=%.4g, phi -> %.4g", step, choice.kappa or math.nan, choice.phi
        )
        self._state = state.with_record(record, hvps)
        return record

    @property
    def validation_due(self) -> bool:
        """Whether the scheduler's next ``step()`` runs a plateau check (``auto_uba(val_loader=
        ...)`` only; ``False`` once the rule has switched, or without it): measure the
        validation losses in your loop then and pass them, ``scheduler.step(val_losses=...)``,
        so that the check costs no forward pass of its own.
        """
        watch = self.plateau
        return watch is not None and watch.due_at(watch.scheduler.last_epoch + 1)

    def _check_val_losses(self, val_losses: Any) -> list[float]:
        """``val_losses`` as floats, or a ValueError naming what is wrong and the fix."""
        if not self._settings.plateau:
            raise ValueError(
                "val_losses was given, but this run has no validation plateau rule (auto_uba "
                "was called without val_loader): pass val_loader=<held-out batches> to "
                "auto_uba, or call scheduler.step() without val_losses"
            )
        try:
            values = [float(v) for v in val_losses]
        except (TypeError, ValueError) as err:
            raise ValueError(
                "val_losses must be a sequence of per-batch validation losses (numbers or "
                f"one-element tensors), got {type(val_losses).__name__}: {err}"
            ) from None
        if not values:
            raise ValueError(
                "val_losses is empty: pass the per-batch losses of your validation batches, "
                "or None to let the check measure them"
            )
        return values

    def _check_plateau(self, losses: Sequence[float] | None = None) -> None:
        """Run the plateau rule's check if one is due (after every scheduler step), on
        ``losses`` when the loop measured them; a switch of φ or a failed check goes into the
        report's history."""
        if self.plateau is None:
            return
        check = self.plateau.step(losses)
        if check is None or check.status == "hold":
            return
        status = "ok" if check.status == "cooled" else "failed"
        message = f"validation plateau rule: {check.reason}"
        record = ReestimationRecord(check.step, status, None, check.phi, 0, check.seconds, message)
        self._state = self._state.with_record(record)

    def _expected_reestimation_hvps(self) -> int:
        """What the next re-estimation will cost: the last one that ran, or else the pre-training
        probe without its spectral density (re-estimations do not probe the density)."""
        done = [r.hvps for r in self.report.history[1:] if r.status == "ok"]
        if done:
            return done[-1]
        est = self.report.estimate
        return est.num_hvps - est.hvps.get("density", 0)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """φ, its history, the scheduler and the probing counters (plain data + the report);
        with ``val_loader``, also the plateau rule's checks (``"plateau"``)."""
        scheduler = None if self.scheduler is None else self.scheduler.state_dict()
        state = self._state.to_dict(
            self._settings, scheduler=scheduler, batches_drawn=self._batches.drawn
        )
        if self._settings.plateau:  # the validation plateau rule's checks
            state["plateau"] = (
                self._pending_plateau if self.plateau is None else self.plateau.state_dict()
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the report (estimate, φ, history) becomes the saved run's,
        and the remaining learning-rate sequence is identical.

        The scheduler must exist (``optimizer=`` given to :func:`auto_uba` or
        :meth:`make_scheduler` called) if the state holds one. To resume without paying for a
        new pre-training probe, pass the state to ``auto_uba(..., resume_from=state)`` instead.
        If it raises, this object and its scheduler are as they were.
        """
        check_state_dict(state)
        if state["scheduler"] is not None and self.scheduler is None:
            raise ValueError(
                "the state holds a scheduler: call make_scheduler(optimizer) (or pass "
                "optimizer= to auto_uba) before load_state_dict"
            )
        restored = AutoState.from_dict(state, self._settings)  # raises before anything changes
        self._check_plateau_state(state)
        if self.scheduler is not None:
            before = self.scheduler.state_dict()
            try:
                restored = continue_schedule(self.scheduler, restored)
            except Exception:
                self.scheduler.load_state_dict(before)  # a failed load leaves it as it was
                raise
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
        elif self._settings.plateau:
            self._pending_plateau = state.get("plateau")  # for make_scheduler
        self._fast_forward(state)
        self._state = restored
