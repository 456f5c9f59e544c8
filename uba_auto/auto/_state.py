"""The explicit state of :class:`~uba_auto.auto.AutoUBA`: its settings and its φ-choice state.

Both are frozen dataclasses. :class:`AutoUBA <uba_auto.auto.AutoUBA>` computes a new
:class:`AutoState` for each transition (the pre-training estimate, the first optimizer, a
(re-)estimation, a resume) and commits it in one assignment, so a transition that fails leaves
the state it started from untouched. :meth:`AutoState.to_dict` / :meth:`AutoState.from_dict` are
the ``AutoUBA.state_dict()`` format; the φ history is stored once, in the report (and in the
dict once, as the ``"history"`` rows).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .._validation import check_fraction, check_int, check_positive_finite
from ..phi import check_link
from ..report import CurvatureReport, ReestimationRecord

__all__ = [
    "STATE_VERSION",
    "AutoSettings",
    "AutoState",
    "PeakRate",
    "SettingAttribute",
    "check_state_dict",
    "continue_schedule",
]

STATE_VERSION = 1
_STATE_KEYS = ("report", "history", "scheduler", "batches_drawn", "probe_hvps", "peak_lr")


@dataclass(frozen=True)
class AutoSettings:
    """The settings of an ``auto_uba`` run that a resumed run (and every rank of a distributed
    one) must share; see :func:`~uba_auto.auto.auto_uba` for their meaning."""

    budget: int
    warmup_steps: int
    lr_min: float | None
    lr_min_ratio: float | None
    num_batches: int
    reestimate_every: int | None
    probe_fraction: float
    link: str
    phi_min: float
    phi_max: float
    val_batches: int | None = None

    @classmethod
    def checked(cls, **settings: Any) -> AutoSettings:
        """The settings, each checked (``ValueError``/``TypeError`` naming it and the fix).

        ``lr_min`` and ``lr_min_ratio`` are checked against the optimizer's rates by
        ``auto_uba``, and kept as given (they are compared on resume as given).

        Example:
            >>> settings = AutoSettings.checked(
            ...     budget=10, warmup_steps=0, lr_min=None, lr_min_ratio=None, num_batches=8,
            ...     reestimate_every=None, probe_fraction=0.02, link="gated", phi_min=0.25,
            ...     phi_max=16.0)
            >>> settings.total_steps
            9
        """
        s = dict(settings)
        budget = check_int("budget", s["budget"], minimum=2)
        warmup_steps = check_int("warmup_steps", s["warmup_steps"], minimum=0)
        if budget - 1 <= warmup_steps:
            raise ValueError(
                f"budget must be > warmup_steps + 1, got budget={budget} and warmup_steps="
                f"{warmup_steps}; the UBA phase needs at least one step"
            )
        num_batches = check_int("num_batches", s["num_batches"], minimum=1)
        every, link = s["reestimate_every"], s["link"]
        if every is not None:
            every = check_int("reestimate_every", every, minimum=1)
        fraction = check_fraction(
            "probe_fraction", s["probe_fraction"], closed_low=True, closed_high=True
        )
        link = check_link(link)
        phi_min = check_positive_finite("phi_min", s["phi_min"])
        phi_max = check_positive_finite("phi_max", s["phi_max"])
        if phi_min > phi_max:
            raise ValueError(f"phi_min must be <= phi_max, got {phi_min} > {phi_max}")
        val_batches = s.get("val_batches")
        if val_batches is not None:
            val_batches = check_int("val_batches", val_batches, minimum=1)
            if every is not None:
                raise ValueError(
                    "val_loader and reestimate_every both decide phi mid-run: pass one of them "
                    "(val_loader: the validation plateau rule; reestimate_every: re-probed "
                    "curvature)"
                )
        return cls(
            budget=budget,
            warmup_steps=warmup_steps,
            lr_min=s["lr_min"],
            lr_min_ratio=s["lr_min_ratio"],
            num_batches=num_batches,
            reestimate_every=every,
            probe_fraction=fraction,
            link=link,
            phi_min=phi_min,
            phi_max=phi_max,
            val_batches=val_batches,
        )

    @property
    def plateau(self) -> bool:
        """Whether φ follows the validation plateau rule (``auto_uba(val_loader=...)``)."""
        return self.val_batches is not None

    @property
    def total_steps(self) -> int:
        """The scheduler's ``total_steps``: the last update of the budget uses ``lr_min``."""
        return self.budget - 1

    def to_dict(self) -> dict[str, Any]:
        """The settings as the state dict's ``"settings"`` entry."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> float:
        """A float equal on ranks (and runs) with equal settings (``hash`` is salted)."""
        return float(zlib.crc32(repr(sorted(self.to_dict().items())).encode()))

    def differences(self, saved: Mapping[str, Any]) -> list[str]:
        """``"name=saved (now current)"`` for each setting in ``saved`` that differs."""
        return [
            f"{k}={saved[k]!r} (now {v!r})"
            for k, v in self.to_dict().items()
            if k in saved and saved[k] != v
        ]


@dataclass(frozen=True)
class PeakRate:
    """The peak learning rate the φ mapping assumes.

    Attributes:
        value: the rate.
        source: where it came from, in words (the report's ``peak_lr_source``).
        assumed: ``True`` when neither an optimizer nor ``peak_lr`` gave it: the first optimizer
            (at ``make_scheduler``) replaces it.
    """

    value: float
    source: str
    assumed: bool = False


@dataclass(frozen=True)
class AutoState:
    """Where a run's φ choice stands.

    Attributes:
        report: the curvature report; ``report.history`` is the φ history (its last record holds
            the φ in force).
        peak: the :class:`PeakRate` the mapping assumes.
        probe_hvps: Hessian-vector products spent by every probe so far.
        choice_warnings: what the pre-training φ choice warned (replaced if φ is chosen again).
        stability: the optimizer's ``(stability limit at the peak rate, coupled weight decay)``
            (:func:`~uba_auto.phi.optimizer_stability`), for the report and the gated-edge link
            (``None`` while unknown).
        edge_fraction: the peak rate as a fraction of that limit at init (``None`` if unknown).
        stabiliser: why the run is self-stabilising (:func:`~uba_auto.phi.self_stabilising`,
            read by the hold link), ``None`` if it is not or while no optimizer is known.
        pending_scheduler: a resumed scheduler's state, until ``make_scheduler`` loads it.
    """

    report: CurvatureReport
    peak: PeakRate
    probe_hvps: int
    choice_warnings: tuple[str, ...] = ()
    stability: tuple[float, float] | None = None
    edge_fraction: float | None = None
    stabiliser: str | None = None
    pending_scheduler: Mapping[str, Any] | None = None

    @property
    def history(self) -> tuple[ReestimationRecord, ...]:
        return self.report.history

    @property
    def phi(self) -> float:
        """φ after the last (re-)estimation."""
        return self.report.history[-1].phi

    def with_record(self, record: ReestimationRecord, hvps: int = 0) -> AutoState:
        """This state with ``record`` appended to the history and ``hvps`` more products spent."""
        report = replace(self.report, history=(*self.report.history, record))
        return replace(self, report=report, probe_hvps=self.probe_hvps + hvps)

    def to_dict(
        self,
        settings: AutoSettings,
        *,
        scheduler: Mapping[str, Any] | None,
        batches_drawn: int,
    ) -> dict[str, Any]:
        """The ``AutoUBA.state_dict()`` format: plain data (``torch.load(weights_only=True)``
        reads it). ``scheduler`` is the live scheduler's state (else the pending one is kept)."""
        report = self.report.to_dict()
        del report["history"]  # stored once, as the rows below
        return {
            "version": STATE_VERSION,
            "report": report,
            "history": [r.to_row() for r in self.report.history],
            "scheduler": self.pending_scheduler if scheduler is None else scheduler,
            "batches_drawn": batches_drawn,
            "probe_hvps": self.probe_hvps,
            "peak_lr": self.peak.value,
            "peak_lr_source": self.peak.source,
            "peak_assumed": self.peak.assumed,
            "choice_warnings": list(self.choice_warnings),
            "stability": None if self.stability is None else list(self.stability),
            "edge_fraction": self.edge_fraction,
            "stabiliser": self.stabiliser,
            "settings": settings.to_dict(),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], settings: AutoSettings) -> AutoState:
        """The state :meth:`to_dict` saved (also from earlier versions, whose report held a copy
        of the history), with its scheduler state pending.

        Raises:
            ValueError: if ``state`` is not a whole state dict of this version, or was saved
                with other ``settings`` (naming them).
        """
        check_state_dict(state)
        differ = settings.differences(state.get("settings") or {})
        if differ:
            raise ValueError(
                "the state was saved with other settings: "
                + ", ".join(differ)
                + "; pass the saved run's arguments to auto_uba"
            )
        history = tuple(ReestimationRecord.from_row(row) for row in state["history"])
        stability = state.get("stability")
        return cls(
            report=replace(CurvatureReport.from_dict(state["report"]), history=history),
            peak=PeakRate(
                state["peak_lr"], state["peak_lr_source"], bool(state.get("peak_assumed", False))
            ),
            probe_hvps=state["probe_hvps"],
            choice_warnings=tuple(state.get("choice_warnings", ())),
            stability=None if stability is None else (float(stability[0]), float(stability[1])),
            edge_fraction=state.get("edge_fraction"),
            stabiliser=state.get("stabiliser"),
            pending_scheduler=state["scheduler"],
        )


class SettingAttribute:
    """An attribute of :class:`~uba_auto.auto.AutoUBA` that reads one of its ``_settings``;
    assigning it replaces them with checked ones (:meth:`AutoSettings.checked`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, auto: Any | None, owner: type | None = None) -> Any:
        return self if auto is None else getattr(auto._settings, self.name)

    def __set__(self, auto: Any, value: Any) -> None:
        auto._settings = AutoSettings.checked(**{**auto._settings.to_dict(), self.name: value})


def check_state_dict(state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` is a whole ``AutoUBA.state_dict()`` of this version."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
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


def continue_schedule(scheduler: Any, state: AutoState) -> AutoState:
    """Load ``state``'s pending scheduler state (if any) into ``scheduler``; the state without
    it."""
    if state.pending_scheduler is None:
        return state
    scheduler.load_state_dict(dict(state.pending_scheduler))
    if not math.isclose(scheduler.phi, state.phi):
        raise ValueError("state is inconsistent: the scheduler's phi differs from the history")
    return replace(state, pending_scheduler=None)
