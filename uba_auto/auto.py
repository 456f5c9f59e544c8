"""``auto_uba``: probe the curvature, choose φ, hand back a ready UBA scheduler, re-estimate φ.

The product in one call::

    auto = auto_uba(model, loader, budget, optimizer=optimizer, loss_fn=loss_fn)
    print(auto.report)                 # the pre-training curvature report
    for step in range(budget):
        ...                            # forward, backward
        optimizer.step()
        auto.scheduler.step()          # re-probes every `reestimate_every` steps if asked

Probing cost is counted in gradient-equivalents: one Hessian-vector product costs
:data:`HVP_COST_IN_GRADIENTS` gradients (the benchmark measures 1.3-1.8 for the cached-graph
engine), one training step one gradient. Re-estimations are skipped, and the skip recorded, once
they would take the total past ``probe_fraction`` of the budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ._distributed import DistributedProbeError, is_communication_failure, resolve_process_group
from ._optim import group_peaks
from ._validation import check_fraction, check_int, check_nonnegative_finite, check_positive_finite
from .phi import (
    LINKS,
    PHI_MAX,
    PHI_MIN,
    PhiChoice,
    choose_phi,
    stability_fraction,
    stability_limit,
)
from .probe import CurvatureEstimate, probe_curvature
from .report import CurvatureReport, ReestimationRecord
from .scheduler import UBAScheduler, check_lr_min_args

__all__ = ["HVP_COST_IN_GRADIENTS", "AutoUBA", "AutoUBAScheduler", "auto_uba"]

logger = logging.getLogger("uba_auto")

HVP_COST_IN_GRADIENTS = 2.0
"""Cost of one Hessian-vector product in gradient evaluations, for the probing budget (rounded up
from the 1.6-1.8 that ``benchmarks/probe_benchmark.py`` measures for the cached-graph engine)."""

_STATE_VERSION = 1
_STATE_KEYS = ("report", "history", "scheduler", "batches_drawn", "probe_hvps", "peak_lr")


def _default_loss(batch: Any) -> tuple[Any, str]:
    """The loss for a three-argument call, from the form of the first batch (recorded)."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return None, ""  # Hugging Face style: the model returns its own .loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        if batch[1].is_floating_point():
            return nn.functional.mse_loss, "loss_fn not given: mse_loss (floating-point targets)"
        return nn.functional.cross_entropy, "loss_fn not given: cross_entropy (integer targets)"
    raise ValueError(
        "loss_fn is required for batches that are neither (inputs, targets) pairs nor dicts; "
        "pass loss_fn=uba_auto.ModelLoss(fn) with fn(model, batch) -> scalar loss"
    )


def _sgd_stability(optimizer: torch.optim.Optimizer) -> tuple[float, float] | None:
    """``(stability limit, weight decay)`` of ``optimizer``'s group with the largest peak rate
    (see :func:`stability_limit`); ``None`` unless it is ``torch.optim.SGD`` with settings the
    limit is derived for (momentum and dampening in [0, 1))."""
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    peaks = group_peaks(optimizer)
    group = optimizer.param_groups[peaks.index(max(peaks))]
    try:
        limit = stability_limit(
            float(group.get("momentum", 0.0)),
            float(group.get("dampening", 0.0)),
            bool(group.get("nesterov", False)),
        )
    except ValueError:
        return None
    decay = float(group.get("weight_decay", 0.0))
    return (limit, decay) if math.isfinite(decay) and decay >= 0 else None


def _check_final_rate(
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


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects iterating ``loader`` draws from (each once)."""
    found: list[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


@contextlib.contextmanager
def _loader_generators_preserved(loader: Any) -> Iterator[None]:
    """Restore the states of ``loader``'s own generators on exit (:func:`_loader_generators`)."""
    saved = [(gen, gen.get_state()) for gen in _loader_generators(loader)]
    try:
        yield
    finally:
        for gen, state in saved:
            gen.set_state(state)


class AutoUBAScheduler(UBAScheduler):
    """A :class:`~uba_auto.scheduler.UBAScheduler` whose ``step()`` also re-estimates φ every
    ``reestimate_every`` steps through its :class:`AutoUBA` (collectively, at the same steps on
    every run, so a resumed run re-estimates at the same steps as an uninterrupted one)."""

    def __init__(self, optimizer: torch.optim.Optimizer, auto: AutoUBA, **kwargs: Any) -> None:
        self._auto = auto
        super().__init__(optimizer, **kwargs)

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        every = self._auto.reestimate_every
        # Not at step 0 (the pre-training probe just ran) nor at or after the last step.
        # At total_steps - 1 only the final step is left, and its rate is lr_min whatever phi is.
        if every and 0 < self.last_epoch < self.total_steps - 1 and self.last_epoch % every == 0:
            self._auto.reestimate()


class AutoUBA:
    """What :func:`auto_uba` returns: the chosen φ, the report, and the scheduler.

    Attributes:
        phi: the φ in force now.
        report: the :class:`~uba_auto.report.CurvatureReport` (with the re-estimation history).
        scheduler: the :class:`AutoUBAScheduler` for the optimizer given to :func:`auto_uba`,
            or ``None`` until :meth:`make_scheduler` is called.
        suggested_lr: ``1 / lambda_max``, a peak rate for plain SGD suggested by the curvature.
        budget, warmup_steps, reestimate_every, probe_fraction: the settings.
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        budget: int,
        *,
        loss_fn: Any,
        loss_note: str,
        warmup_steps: int,
        lr_min: float | None,
        lr_min_ratio: float | None,
        num_batches: int,
        reestimate_every: int | None,
        probe_fraction: float,
        link: str,
        phi_min: float,
        phi_max: float,
        probe_kwargs: dict[str, Any],
    ) -> None:
        self.model = model
        self.loader = loader
        self.budget = budget
        self.loss_fn = loss_fn
        self.warmup_steps = warmup_steps
        self.lr_min = lr_min
        self.lr_min_ratio = lr_min_ratio
        self.num_batches = num_batches
        self.reestimate_every = reestimate_every
        self.probe_fraction = probe_fraction
        self.link = link
        self.phi_min, self.phi_max = phi_min, phi_max
        self.probe_kwargs = probe_kwargs
        self._comm = probe_kwargs.get("process_group") or None
        self.scheduler: AutoUBAScheduler | None = None
        self._notes = [loss_note] if loss_note else []
        self._iterator: Iterator[Any] | None = None
        self.batches_drawn = 0
        self.probe_hvps = 0
        self.report: CurvatureReport  # set by _initial_probe
        self._peak_lr: float | None = None
        self._peak_source = ""
        self._peak_assumed = False  # no optimizer, no peak_lr: make_scheduler replaces it
        self._pending_scheduler_state: dict[str, Any] | None = None  # resumed, no scheduler yet
        self._choice_warnings: tuple[str, ...] = ()  # what the pre-training phi choice warned
        # For the gated-edge link: the SGD optimizer's (stability limit, weight decay) and the
        # peak rate as a fraction of that limit at init, read at every estimation.
        self._stability: tuple[float, float] | None = None
        self._edge_fraction: float | None = None

    # -- batches -----------------------------------------------------------------------------------
    def _next_batches(self) -> list[Any]:
        """The next ``num_batches`` batches of the loader (fresh data for each probe).

        The loader is restarted when it is exhausted, but never within a draw once that draw has
        batches: a loader shorter than ``num_batches`` gives a short draw (which the probe
        records), never a batch twice. Iterating runs under a forked RNG, because a shuffling
        ``DataLoader`` draws its seed from the global generator, and with the states of the
        loader's own generators (``DataLoader(generator=...)``, a sampler's ``generator``) restored
        afterwards: probing must not change the data order or dropout masks of the training run.
        The probe therefore sees the batches the training's next pass over the loader starts with.
        """
        out: list[Any] = []
        with torch.random.fork_rng(devices=[]), _loader_generators_preserved(self.loader):
            for _ in range(2):  # at most one restart, and only for an empty draw
                if self._iterator is None:
                    self._iterator = iter(self.loader)
                out += list(itertools.islice(self._iterator, self.num_batches - len(out)))
                if out:
                    if len(out) < self.num_batches:
                        self._iterator = None
                    break
                self._iterator = None
        self.batches_drawn += len(out)
        return out

    def _skip_to(self, drawn: int) -> Any:
        """Fast-forward a fresh loader iterator past ``drawn`` batches (used on resume); returns
        the first batch drawn (``None`` if none)."""
        self._iterator, self.batches_drawn = None, 0
        first = None
        while self.batches_drawn < drawn:
            got = self._next_batches()
            if not got:
                break
            if first is None:
                first = got[0]
        return first

    def _settings(self) -> dict[str, Any]:
        """The settings a resumed run (and every rank of a distributed one) must share."""
        return {
            "budget": self.budget,
            "warmup_steps": self.warmup_steps,
            "lr_min": self.lr_min,
            "lr_min_ratio": self.lr_min_ratio,
            "num_batches": self.num_batches,
            "reestimate_every": self.reestimate_every,
            "probe_fraction": self.probe_fraction,
            "link": self.link,
            "phi_min": self.phi_min,
            "phi_max": self.phi_max,
        }

    # -- probing -----------------------------------------------------------------------------------
    def _probe(self, batches: list[Any], **overrides: Any) -> CurvatureEstimate:
        kwargs = {**self.probe_kwargs, **overrides}
        est = probe_curvature(
            self.model, batches, self.loss_fn, num_batches=self.num_batches, **kwargs
        )
        self.probe_hvps += est.num_hvps
        return est

    def _choose(self, est: CurvatureEstimate, remaining: int) -> PhiChoice:
        return choose_phi(
            est,
            peak_lr=self._peak_lr,
            budget=remaining,
            link=self.link,
            phi_min=self.phi_min,
            phi_max=self.phi_max,
            edge_fraction=self._edge_fraction,
        )

    def _set_edge(self, est: CurvatureEstimate) -> None:
        """The peak rate as a fraction of the stability limit on the pre-training estimate
        (``None`` while the SGD optimizer, or a positive curvature, is unknown)."""
        lam = est.lambda_max
        known = self._stability is not None and not self._peak_assumed
        if known and math.isfinite(lam) and lam > 0 and self._peak_lr is not None:
            limit, decay = self._stability
            self._edge_fraction = stability_fraction(lam, self._peak_lr, limit, decay)
        else:
            self._edge_fraction = None

    def _agree_phi(self, error: Exception | None, phi: float | None, what: str) -> Any:
        """Under a process group, make this (re-)estimation's outcome collective: a failure on
        any rank becomes one on every rank, and φ must be bit-identical on every rank. Returns
        the error to handle (``None`` on success); see :mod:`uba_auto._distributed`."""
        if self._comm is None or isinstance(error, DistributedProbeError):
            return error  # a DistributedProbeError was already raised on every rank
        try:
            # The settings' fingerprint too: ranks with, say, different reestimate_every would
            # otherwise meet in different collectives later and wait for the group's timeout.
            fingerprint = zlib.crc32(repr(sorted(self._settings().items())).encode())
            self._comm.agree(
                error,
                what,
                equal={
                    "phi": math.nan if phi is None else phi,
                    "the auto_uba settings (budget, warmup_steps, lr_min, num_batches, "
                    "reestimate_every, probe_fraction, link, phi bounds)": float(fingerprint),
                },
                hint="pass the same auto_uba arguments on every rank; if they are the same, the "
                "ranks' estimates differ (see UBA_AUTO_DISTRIBUTED_CHECK)",
            )
        except (DistributedProbeError, ValueError) as err:
            return err
        return None

    def _initial_probe(self, peak_lr: float | str | None, optimizer: Any) -> None:
        batches = self._next_batches()
        # Under a process group an empty loader on one rank fails the probe's collective start.
        if not batches and self._comm is None:
            raise ValueError(
                "loader yielded no batches; auto_uba needs at least one batch to probe"
            )
        if self.loss_fn is None and batches:
            self.loss_fn, note = _default_loss(batches[0])
            if note:
                self._notes.append(note)
        t0 = time.perf_counter()
        est = self._probe(batches)
        suggested = 1.0 / est.lambda_max if est.lambda_max > 0 else None
        self.suggested_lr = suggested
        notes = list(self._notes)
        if peak_lr is not None and not isinstance(peak_lr, str):
            self._peak_lr, self._peak_source = float(peak_lr), "given as peak_lr"
        elif peak_lr == "suggest":
            if suggested is None:
                raise ValueError(
                    "peak_lr='suggest' needs positive curvature, but lambda_max = "
                    f"{est.lambda_max:.3g} <= 0; pass peak_lr as a number"
                )
            self._peak_lr, self._peak_source = suggested, "suggested: 1 / lambda_max"
            if optimizer is not None:
                # Check before writing: a failure must leave the optimizer as it was.
                _check_final_rate(
                    [suggested] * len(optimizer.param_groups), self.lr_min, self.lr_min_ratio
                )
                for group in optimizer.param_groups:
                    group["lr"] = suggested
                    group.pop("initial_lr", None)
                notes.append(f"peak_lr='suggest' set every param group's lr to {suggested:.4g}")
        elif optimizer is not None:
            self._peak_lr = max(group_peaks(optimizer))
            self._peak_source = "the optimizer's largest group lr"
        elif suggested is not None:
            self._peak_lr, self._peak_assumed = suggested, True
            self._peak_source = "no optimizer given: assumed 1 / lambda_max (plain SGD)"
        else:
            self._peak_lr, self._peak_assumed = 1.0, True
            self._peak_source = "unknown (no optimizer given, no positive curvature)"
        if optimizer is not None and self.link == "gated-edge":
            self._stability = _sgd_stability(optimizer)
        self._set_edge(est)
        try:
            choice, error = self._choose(est, self.budget), None
        except Exception as err:
            choice, error = None, err
        error = self._agree_phi(error, None if choice is None else choice.phi, "estimating phi")
        if error is not None:
            raise error
        record = ReestimationRecord(
            0,
            "ok",
            choice.kappa,
            choice.phi,
            est.num_hvps,
            time.perf_counter() - t0,
            "pre-training probe",
        )
        self._choice_warnings = tuple(choice.warnings)
        notes += list(choice.warnings) + list(est.warnings)
        if est.negative_mass is not None and est.negative_mass > 0.2:
            notes.append(
                f"{100 * est.negative_mass:.0f}% of the spectrum is negative curvature: the model "
                "is far from a minimum and its curvature will change as it trains; consider "
                "reestimate_every"
            )
        if est.curvature_noise is not None and est.curvature_noise > 0.5:
            notes.append(
                f"the curvature varies by {100 * est.curvature_noise:.0f}% across minibatches: "
                "phi is uncertain; probe more batches (num_batches) or larger ones"
            )
        share = self.probe_cost_fraction
        if self.reestimate_every and share > self.probe_fraction:
            notes.append(
                f"the pre-training probe alone cost {100 * share:.1f}% of the budget in "
                f"gradient-equivalents (probe_fraction {100 * self.probe_fraction:g}%): "
                "re-estimations will be skipped; lower num_batches or raise probe_fraction"
            )
        self.report = CurvatureReport(
            estimate=est,
            phi=choice.phi,
            phi_unclamped=choice.phi_unclamped,
            clamped=choice.clamped,
            phi_min=self.phi_min,
            phi_max=self.phi_max,
            kappa=choice.kappa,
            kappa_kind=choice.kappa_kind,
            link=choice.link,
            reason=choice.reason,
            peak_lr=self._peak_lr,
            peak_lr_source=self._peak_source,
            suggested_lr=suggested,
            budget=self.budget,
            warmup_steps=self.warmup_steps,
            probe_fraction=self.probe_fraction,
            history=(record,),
            warnings=tuple(notes),
            edge_fraction=choice.edge_fraction,
        )

    # -- public ------------------------------------------------------------------------------------
    @property
    def phi(self) -> float:
        """φ in force: the scheduler's, or before there is one, the last estimate's."""
        return self.scheduler.phi if self.scheduler is not None else self.report.history[-1].phi

    @property
    def probe_cost_fraction(self) -> float:
        """Probing spent so far, in gradient-equivalents, as a fraction of the budget."""
        return self.probe_hvps * HVP_COST_IN_GRADIENTS / self.budget

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> AutoUBAScheduler:
        """Build (and keep as :attr:`scheduler`) the UBA scheduler with the chosen φ.

        The schedule spans ``budget`` optimizer steps: ``total_steps = budget - 1``, so the last
        update of the budget uses ``lr_min``. If :func:`auto_uba` had no optimizer (and no
        ``peak_lr``), the peak rate it assumed is replaced by ``optimizer``'s largest group rate,
        in the report too, and φ is chosen again for that rate where the link depends on it; the
        same happens when ``optimizer`` is the first optimizer seen and the link reads its
        stability limit (the gated-edge link, with ``torch.optim.SGD``).
        After ``auto_uba(..., resume_from=state)``, the scheduler continues the saved one.
        """
        if self.scheduler is not None:
            raise ValueError(
                "make_scheduler was already called: use auto.scheduler (a second scheduler would "
                "restart the budget at step 0 while the report's history goes on)"
            )
        saved = dict(vars(self))  # restored if anything below fails: a retry starts clean
        try:
            self._adopt(optimizer)
            phi = self.report.history[-1].phi
            # Every rank builds its scheduler once: agree that phi is the same everywhere (a rank
            # whose optimizer differs could have re-chosen it differently above).
            error = self._agree_phi(None, phi, "building the scheduler")
            if error is not None:
                raise error
            self.scheduler = AutoUBAScheduler(
                optimizer,
                self,
                total_steps=self.budget - 1,
                phi=phi,
                lr_min=self.lr_min,
                lr_min_ratio=self.lr_min_ratio,
                warmup_steps=self.warmup_steps,
            )
            if self._pending_scheduler_state is not None:  # resumed: continue the saved schedule
                self._load_scheduler(self._pending_scheduler_state)
        except BaseException:
            vars(self).clear()
            vars(self).update(saved)
            raise
        return self.scheduler

    def _adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """Take what the first optimizer tells the φ choice: the peak rate if it was assumed, the
        SGD stability limit for the gated-edge link; choose φ again if that changes anything and
        φ has not moved on (a re-estimation ran, or the run is resumed)."""
        open_choice = len(self.report.history) == 1 and self._pending_scheduler_state is None
        changed = self._peak_assumed
        if self._peak_assumed:
            peaks = group_peaks(optimizer)
            _check_final_rate(peaks, self.lr_min, self.lr_min_ratio)
            self._peak_lr = max(peaks)
            self._peak_source = "the largest group lr of the optimizer given to make_scheduler"
            self._peak_assumed = False
        if open_choice and self.link == "gated-edge" and self._stability is None:
            self._stability = _sgd_stability(optimizer)
            changed = changed or self._stability is not None
        if not changed:
            return
        if open_choice:
            self._set_edge(self.report.estimate)
            self._rechoose_initial()
        else:
            self.report = replace(
                self.report, peak_lr=self._peak_lr, peak_lr_source=self._peak_source
            )

    def reestimate(self) -> ReestimationRecord:
        """Re-probe on fresh batches and set φ for the rest of the budget (no jump in the rate).

        Never raises because of the probe: a failure keeps the current φ and is recorded in the
        report's history (and warned about), so training continues. Under a process group it is
        collective: every rank calls it at the same step (the scheduler does), and a failure on
        any rank is recorded on every rank.
        """
        step = self.scheduler.last_epoch if self.scheduler is not None else 0
        remaining = self.budget - step
        expected = self._expected_reestimation_hvps()
        spent = self.probe_hvps * HVP_COST_IN_GRADIENTS
        if spent + expected * HVP_COST_IN_GRADIENTS > self.probe_fraction * self.budget:
            record = ReestimationRecord(
                step,
                "skipped",
                None,
                self.phi,
                0,
                0.0,
                f"probing budget: {spent:.0f} of {self.probe_fraction * self.budget:.0f} "
                "gradient-equivalents spent",
            )
            return self._record(record)
        t0 = time.perf_counter()
        choice, error, spent_before = None, None, self.probe_hvps
        try:
            est = self._probe(self._next_batches(), density=False)
            choice = self._choose(est, remaining)
        except Exception as err:  # a failed probe must never stop training
            if is_communication_failure(err):
                raise  # the process group is broken: training cannot go on either
            error = err
        what = f"estimating phi at step {step}"
        error = self._agree_phi(error, None if choice is None else choice.phi, what)
        if error is not None:
            message = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"uba-auto: re-estimation at step {step} failed, phi kept: {message}",
                RuntimeWarning,
                stacklevel=2,
            )
            spent_now = self.probe_hvps - spent_before  # a probe that ran before a later failure
            record = ReestimationRecord(
                step, "failed", None, self.phi, spent_now, time.perf_counter() - t0, message
            )
            return self._record(record)
        if self.scheduler is not None:
            self.scheduler.set_phi(choice.phi)
        record = ReestimationRecord(
            step,
            "ok",
            choice.kappa,
            choice.phi,
            est.num_hvps,
            time.perf_counter() - t0,
            choice.reason,
            warnings=(*choice.warnings, *est.warnings),
        )
        logger.info(
            "uba-auto: step %d, kappa=%.4g, phi -> %.4g", step, choice.kappa or math.nan, choice.phi
        )
        return self._record(record)

    def _rechoose_initial(self) -> None:
        """Choose the pre-training φ again for the current peak rate (before any scheduler)."""
        choice = self._choose(self.report.estimate, self.budget)
        first = replace(self.report.history[0], kappa=choice.kappa, phi=choice.phi)
        kept = tuple(w for w in self.report.warnings if w not in self._choice_warnings)
        self._choice_warnings = tuple(choice.warnings)
        self.report = replace(
            self.report,
            phi=choice.phi,
            phi_unclamped=choice.phi_unclamped,
            clamped=choice.clamped,
            kappa=choice.kappa,
            kappa_kind=choice.kappa_kind,
            reason=choice.reason,
            peak_lr=self._peak_lr,
            peak_lr_source=self._peak_source,
            history=(first, *self.report.history[1:]),
            warnings=(*kept, *choice.warnings),
            edge_fraction=choice.edge_fraction,
        )

    def _expected_reestimation_hvps(self) -> int:
        """What the next re-estimation will cost: the last one that ran, or else the pre-training
        probe without its spectral density (re-estimations do not probe the density)."""
        done = [r.hvps for r in self.report.history[1:] if r.status == "ok"]
        if done:
            return done[-1]
        est = self.report.estimate
        return est.num_hvps - est.hvps.get("density", 0)

    def _record(self, record: ReestimationRecord) -> ReestimationRecord:
        self.report = replace(self.report, history=(*self.report.history, record))
        return record

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """φ, its history, the scheduler and the probing counters (plain data + the report)."""
        return {
            "version": _STATE_VERSION,
            "report": self.report.to_dict(),
            "history": [list(dataclasses.astuple(r)) for r in self.report.history],
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "batches_drawn": self.batches_drawn,
            "probe_hvps": self.probe_hvps,
            "peak_lr": self._peak_lr,
            "peak_lr_source": self._peak_source,
            "peak_assumed": self._peak_assumed,
            "choice_warnings": list(self._choice_warnings),
            "stability": None if self._stability is None else list(self._stability),
            "edge_fraction": self._edge_fraction,
            "settings": self._settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the report (estimate, φ, history) becomes the saved run's,
        and the remaining learning-rate sequence is identical.

        The scheduler must exist (``optimizer=`` given to :func:`auto_uba` or
        :meth:`make_scheduler` called) if the state holds one. To resume without paying for a
        new pre-training probe, pass the state to ``auto_uba(..., resume_from=state)`` instead.
        """
        _check_state(state)
        if state["scheduler"] is not None and self.scheduler is None:
            raise ValueError(
                "the state holds a scheduler: call make_scheduler(optimizer) (or pass "
                "optimizer= to auto_uba) before load_state_dict"
            )
        self._restore(state)
        if self.scheduler is not None and state["scheduler"] is not None:
            self._load_scheduler(state["scheduler"])

    def _restore(self, state: dict[str, Any]) -> None:
        """All of ``state`` but the scheduler's own state (kept for :meth:`make_scheduler`)."""
        saved = state.get("settings")
        if saved is not None:
            differ = [
                f"{k}={saved[k]!r} (now {v!r})"
                for k, v in self._settings().items()
                if k in saved and saved[k] != v
            ]
            if differ:
                raise ValueError(
                    "the state was saved with other settings: "
                    + ", ".join(differ)
                    + "; pass the saved run's arguments to auto_uba"
                )
        report = CurvatureReport.from_dict(state["report"])
        # The history rows are authoritative (the report's copy is the same data).
        history = tuple(ReestimationRecord.from_row(row) for row in state["history"])
        self.report = replace(report, history=history)
        self.suggested_lr = report.suggested_lr
        self.probe_hvps = state["probe_hvps"]
        self._peak_lr, self._peak_source = state["peak_lr"], state["peak_lr_source"]
        self._peak_assumed = bool(state.get("peak_assumed", False))
        self._choice_warnings = tuple(state.get("choice_warnings", ()))
        stability = state.get("stability")
        self._stability = None if stability is None else (float(stability[0]), float(stability[1]))
        self._edge_fraction = state.get("edge_fraction")
        self._pending_scheduler_state = state["scheduler"]
        first = self._skip_to(state["batches_drawn"])
        if self.loss_fn is None and first is not None:
            self.loss_fn, _ = _default_loss(first)  # as the saved run chose it

    def _load_scheduler(self, scheduler_state: dict[str, Any]) -> None:
        assert self.scheduler is not None
        self.scheduler.load_state_dict(scheduler_state)
        self._pending_scheduler_state = None
        if not math.isclose(self.scheduler.phi, self.report.history[-1].phi):
            raise ValueError("state is inconsistent: the scheduler's phi differs from the history")


def _check_state(state: Any) -> None:
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        got = type(state).__name__
        if isinstance(state, dict):
            got = f"version {state.get('version')!r}"
        raise ValueError(
            f"state must come from AutoUBA.state_dict() of this uba-auto version, got {got}"
        )
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"state is not a whole AutoUBA.state_dict(): it has no {missing[0]!r}; save and pass "
            "the dict state_dict() returns, unchanged"
        )


def auto_uba(
    model: nn.Module,
    loader: Iterable[Any],
    budget: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Any = None,
    warmup_steps: int = 0,
    lr_min: float | None = None,
    lr_min_ratio: float | None = None,
    peak_lr: float | str | None = None,
    num_batches: int = 8,
    reestimate_every: int | None = None,
    probe_fraction: float = 0.02,
    link: str = "gated",
    phi_min: float = PHI_MIN,
    phi_max: float = PHI_MAX,
    curvature: str = "hessian",
    density: bool = True,
    seed: int = 0,
    progress: bool | None = None,
    process_group: Any = "auto",
    resume_from: dict[str, Any] | None = None,
    **probe_kwargs: Any,
) -> AutoUBA:
    """Probe the curvature, choose φ, and return the UBA schedule for a budget of ``budget`` steps.

    Args:
        model: the model to train (never modified by the probe).
        loader: the training loader; the first ``num_batches`` batches are probed, later
            re-estimations draw the following ones (cycling).
        budget: optimizer steps the run will take; the schedule ends at ``lr_min`` on the last.
        optimizer: if given, :attr:`AutoUBA.scheduler` is ready at once; else call
            :meth:`AutoUBA.make_scheduler`.
        loss_fn: as for :func:`~uba_auto.probe.probe_curvature`. If ``None`` with
            ``(inputs, targets)`` batches: cross-entropy for integer targets, MSE for floating
            targets (recorded in the report).
        warmup_steps: linear warm-up length.
        lr_min, lr_min_ratio: the final rate (absolute, or a fraction of each group's peak).
        peak_lr: the peak rate the φ mapping should assume: a number; ``"suggest"`` to use (and,
            with an optimizer, set on every param group) ``1 / lambda_max``, the plain-SGD
            suggestion from the curvature; ``None`` takes the optimizer's largest group lr (or the
            suggestion when there is no optimizer).
        num_batches: minibatches per probe (8: the curvature noise that drives the gated and
            calibrated links is a standard deviation across batches, and needs several).
        reestimate_every: re-probe every this many steps (``None``: never).
        probe_fraction: the most probing may cost, as a fraction of the budget in
            gradient-equivalents (re-estimations past it are skipped and recorded).
        link: the κ→φ link: ``"gated"`` (default: cosine, φ = 2, unless the probe sees almost
            no minibatch noise, then down to 0.25; worse than cosine by more than 1 % in 1 of the
            18 cells of our study), ``"gated-edge"`` (also φ = 1 when, with
            ``torch.optim.SGD``, the peak rate is under 3.8 % of the stability limit at init;
            fitted, and 7-12 % worse than cosine on the demo's task, so not the default),
            ``"calibrated"`` (a power law in the curvature noise fitted to our study; it lost
            badly there) or ``"chebyshev"`` (the theory-only link φ = 2κ); see
            :mod:`uba_auto.phi` and BENCHMARKS.md.
        phi_min, phi_max: the range φ is clamped to.
        curvature: ``"hessian"`` or ``"ggn"``.
        density: probe the spectral density for the report (pre-training probe only).
        seed: seed of the probe's random vectors.
        progress: progress bar during probes (``None``: when stderr is a terminal).
        process_group: ``"auto"`` (default): under ``torch.distributed`` (e.g. a DDP script run
            with ``torchrun``) every probe is collective: it measures the curvature of the loss on
            the global batch (each rank draws ``num_batches`` batches of its own loader), φ and
            the scheduler are identical on every rank (checked at every estimation), and
            re-estimations happen at the same step on every rank; a failure on any rank is
            recorded as failed on every rank (φ kept everywhere). Call ``auto_uba`` and step the
            scheduler on every rank. ``None``/``False``: each process probes alone. Or a
            ``torch.distributed.ProcessGroup``. See
            :func:`~uba_auto.probe.probe_curvature`.
        resume_from: an :meth:`AutoUBA.state_dict` saved by an earlier run with the same
            settings: no pre-training probe is made; the report, φ, its history, the probing
            counters and (with ``optimizer=``, or at :meth:`~AutoUBA.make_scheduler`) the
            scheduler are the saved run's, and the loader is fast-forwarded past the batches it
            probed, so the run goes on exactly as if it had not stopped.
        **probe_kwargs: passed to :func:`~uba_auto.probe.probe_curvature` (e.g. ``max_hvps``,
            ``mode``, ``dtype``).

    Returns:
        An :class:`AutoUBA`.

    Raises:
        ValueError: ``budget <= warmup_steps + 1``, an empty loader, bad option values; anything
            :func:`~uba_auto.probe.probe_curvature` raises for the pre-training probe.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    budget = check_int("budget", budget, minimum=2)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
    if budget - 1 <= warmup_steps:
        raise ValueError(
            f"budget must be > warmup_steps + 1, got budget={budget} and warmup_steps="
            f"{warmup_steps}; the UBA phase needs at least one step"
        )
    num_batches = check_int("num_batches", num_batches, minimum=1)
    if reestimate_every is not None:
        reestimate_every = check_int("reestimate_every", reestimate_every, minimum=1)
    probe_fraction = check_fraction(
        "probe_fraction", probe_fraction, closed_low=True, closed_high=True
    )
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    phi_min = check_positive_finite("phi_min", phi_min)
    phi_max = check_positive_finite("phi_max", phi_max)
    if phi_min > phi_max:
        raise ValueError(f"phi_min must be <= phi_max, got {phi_min} > {phi_max}")
    if isinstance(peak_lr, str) and peak_lr != "suggest":
        raise ValueError(f"peak_lr must be a number, 'suggest' or None, got {peak_lr!r}")
    if peak_lr is not None and not isinstance(peak_lr, str):
        check_positive_finite("peak_lr", peak_lr)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    # Checked now, so that a bad setting fails before the probe's cost, not after it.
    peaks = None
    if optimizer is not None and peak_lr != "suggest":
        peaks = group_peaks(optimizer)
    _check_final_rate(peaks, lr_min, lr_min_ratio)
    if reestimate_every is not None and getattr(loader, "persistent_workers", False):
        raise ValueError(
            "reestimate_every needs a loader auto_uba can iterate on its own, but this DataLoader "
            "has persistent_workers=True: iterating it would reset the training loop's iterator. "
            "Pass a separate DataLoader (same dataset, persistent_workers=False) as loader"
        )
    loss_note = ""
    auto = AutoUBA(
        model,
        loader,
        budget,
        loss_fn=loss_fn,
        loss_note=loss_note,
        warmup_steps=warmup_steps,
        lr_min=lr_min,
        lr_min_ratio=lr_min_ratio,
        num_batches=num_batches,
        reestimate_every=reestimate_every,
        probe_fraction=probe_fraction,
        link=link,
        phi_min=phi_min,
        phi_max=phi_max,
        # Defaults sized for a pre-training probe: the report's spread comes from the curvature
        # noise (one HVP per batch), not from a Lanczos run per batch; callers can override all.
        probe_kwargs={
            "curvature": curvature,
            "seed": seed,
            "progress": progress,
            "density": density,
            "per_batch": False,
            "trace_matvecs": 12,
            "density_probes": 2,
            "density_iters": 24,
            **probe_kwargs,
            "process_group": resolve_process_group(process_group) or False,
        },
    )
    if resume_from is not None:
        _check_state(resume_from)
        auto._restore(resume_from)
    else:
        auto._initial_probe(peak_lr, optimizer)
    if optimizer is not None:
        auto.make_scheduler(optimizer)
    return auto
