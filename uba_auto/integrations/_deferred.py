"""What both trainer integrations share: ``auto_uba``'s arguments now, the probe (or the resume)
when the trainer starts training.

A trainer (``transformers.Trainer``, Lightning's ``Trainer``) wants its scheduler before it has
restored a checkpoint, but whether :func:`~uba_auto.auto_uba` must probe the model or resume a
saved state is only known after that restore. So the trainer gets a
:class:`DeferredUBAScheduler`, a placeholder that touches nothing, and a callback calls
:meth:`DeferredAutoUBA.start` when training begins: a fresh run probes the model then, a resumed
run passes the state the trainer restored into the placeholder to ``auto_uba(...,
resume_from=...)`` and probes nothing.

The whole :meth:`AutoUBA.state_dict() <uba_auto.AutoUBA.state_dict>` travels as the scheduler's
state: both trainers save ``scheduler.state_dict()`` with every checkpoint and call
``scheduler.load_state_dict`` on resume, before training begins, so the φ history, the probing
counters, the probe loader's position and the schedule are restored exactly, from the checkpoint
being resumed, with no file or path of our own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ..auto import AutoUBA, auto_uba

__all__ = ["STATE_KEY", "DeferredAutoUBA", "DeferredUBAScheduler", "import_extra"]

STATE_KEY = "uba_auto"
"""The key of the :meth:`AutoUBA.state_dict` in :meth:`DeferredUBAScheduler.state_dict`."""

_NOT_AUTO_UBA_ARGUMENTS = {
    "model": "the trainer's model is probed",
    "optimizer": "pass the optimizer to .scheduler(optimizer)",
    "resume_from": "the state is restored from the trainer's checkpoint",
}


def import_extra(module: str, what: str) -> Any:
    """Import ``module`` for ``what``, or raise an ``ImportError`` that names the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs {module.split('.')[0]}, which is not installed: "
            "pip install 'uba-auto[integrations]' (or install it yourself)"
        ) from err


class DeferredUBAScheduler(LRScheduler):
    """The scheduler a trainer steps: the :class:`~uba_auto.AutoUBAScheduler` of an
    :func:`~uba_auto.auto_uba` that runs when training begins.

    Until :meth:`DeferredAutoUBA.start` attaches the :class:`~uba_auto.AutoUBA`, it holds only the
    optimizer and, on resume, the state the trainer restored; then every call goes to
    ``auto.scheduler``. It deliberately does not run ``LRScheduler.__init__``, which would write a
    rate into the optimizer before the probe has chosen φ.

    Its :meth:`state_dict` is ``{"uba_auto": auto.state_dict()}``: plain data, so the trainers'
    ``torch.load(..., weights_only=True)`` reads it.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                "pass the optimizer you give the trainer"
            )
        self.optimizer = optimizer
        self.auto: AutoUBA | None = None
        self.saved_state: dict[str, Any] | None = None

    def _started(self) -> LRScheduler:
        if self.auto is None:
            raise RuntimeError(
                "the UBA scheduler was stepped before training began, so no probe has chosen phi "
                "yet: add the UBA callback that made this scheduler to the trainer's callbacks "
                "(it starts the scheduler when training begins)"
            )
        return self.auto.scheduler

    # -- what the trainers read --------------------------------------------------------------------
    @property
    def last_epoch(self) -> int:
        return -1 if self.auto is None else self.auto.scheduler.last_epoch

    @property
    def base_lrs(self) -> list[float]:
        if self.auto is None:
            return [float(group["lr"]) for group in self.optimizer.param_groups]
        return self.auto.scheduler.base_lrs

    def step(self, epoch: int | None = None) -> None:
        self._started().step(epoch)

    def get_lr(self) -> list[float]:
        return self._started().get_lr()

    def get_last_lr(self) -> list[float]:
        return self._started().get_last_lr()

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"uba_auto": auto.state_dict()}`` (the saved state still pending before start)."""
        return {STATE_KEY: self.saved_state if self.auto is None else self.auto.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a :meth:`state_dict` for the start (or, once started, load it into the
        :class:`~uba_auto.AutoUBA`)."""
        if not isinstance(state_dict, dict) or STATE_KEY not in state_dict:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"state_dict must come from DeferredUBAScheduler.state_dict() (a dict with key "
                f"{STATE_KEY!r}), got {got}: the checkpoint's scheduler state was saved by another "
                "scheduler; resume from a checkpoint written by a run with the UBA callback"
            )
        saved = state_dict[STATE_KEY]
        if self.auto is None:
            self.saved_state = saved
        elif saved is not None:
            self.auto.load_state_dict(saved)

    def __repr__(self) -> str:
        inner = "not started" if self.auto is None else repr(self.auto.scheduler)
        return f"DeferredUBAScheduler({inner})"


class DeferredAutoUBA:
    """:func:`~uba_auto.auto_uba`'s arguments, kept until training begins (see the module docs).

    Args:
        loader: the loader the probe draws from (a loader of its own, not the trainer's: the
            probe must not consume training batches).
        budget: optimizer steps of the whole run; ``None`` takes the trainer's total.
        **auto_uba_kwargs: any other argument of :func:`~uba_auto.auto_uba` (``loss_fn``,
            ``warmup_steps``, ``lr_min_ratio``, ``reestimate_every``, probe keywords...); not
            ``model``, ``optimizer`` or ``resume_from``, which the trainer supplies.
    """

    def __init__(
        self, loader: Iterable[Any], *, budget: int | None = None, **auto_uba_kwargs: Any
    ) -> None:
        for name, why in _NOT_AUTO_UBA_ARGUMENTS.items():
            if name in auto_uba_kwargs:
                raise TypeError(f"{name}= is not an argument here: {why}")
        if loader is None:
            raise TypeError("loader must be the loader the probe draws its batches from, got None")
        self.loader = loader
        self.budget = budget
        self.auto_uba_kwargs = dict(auto_uba_kwargs)
        self._scheduler: DeferredUBAScheduler | None = None
        super().__init__()  # the trainer's callback class, when a callback derives from this

    def steps(self, scheduler: Any) -> bool:
        """Whether ``scheduler`` is the one :meth:`scheduler` made last (the one to start)."""
        return scheduler is not None and scheduler is self._scheduler

    @property
    def auto(self) -> AutoUBA | None:
        """The :class:`~uba_auto.AutoUBA` (report, φ, history), ``None`` until training begins."""
        return None if self._scheduler is None else self._scheduler.auto

    def scheduler(self, optimizer: Optimizer) -> DeferredUBAScheduler:
        """The scheduler to hand the trainer for ``optimizer`` (one per run; a second call before
        training begins replaces the first)."""
        if self.auto is not None:
            raise ValueError(
                "scheduler() was called after training began: the running scheduler is "
                "callback.auto.scheduler; use a new callback for a new run"
            )
        self._scheduler = DeferredUBAScheduler(optimizer)
        return self._scheduler

    def start(
        self,
        model: nn.Module,
        *,
        total_steps: int | None,
        step: int,
        stepped: Iterable[Any],
        trainer: str,
        grad_clip: float | None = None,
    ) -> AutoUBA:
        """Probe (fresh run) or resume (a state was restored): build the :class:`AutoUBA`.

        Args:
            model: the model the trainer trains.
            total_steps: the trainer's optimizer steps in all (``None``: unbounded), the default
                ``budget``.
            step: the trainer's step now (``> 0`` when resuming).
            stepped: the schedulers the trainer will step (checked to include ours).
            trainer: the trainer's name, for messages.
            grad_clip: the trainer's gradient-norm clipping, for the probe's estimate of an
                adaptive optimizer's preconditioner before its first step (``grad_clip`` of
                :func:`~uba_auto.probe.probe_curvature`), unless the callback was given one.

        Raises:
            ValueError: the trainer steps no scheduler of this object, has no budget, or resumes
                at a step > 0 from a checkpoint without the UBA state.
        """
        sched = self._scheduler
        if not any(self.steps(s) for s in stepped):
            raise ValueError(
                f"the {trainer} does not step this callback's scheduler: build it with "
                "callback.scheduler(optimizer) and give it to the trainer (see the callback's "
                "docstring), else the probe's phi would never reach the learning rate"
            )
        if sched.auto is not None:  # a second train()/fit() of the same objects: go on
            return sched.auto
        saved = sched.saved_state
        if saved is None and step > 0:
            raise ValueError(
                f"the {trainer} resumes at step {step}, but its checkpoint holds no UBA state "
                "(the scheduler state was not saved, or not by this callback's scheduler): a new "
                "probe here would restart the schedule at step 0. Resume from a full checkpoint "
                "of a run with the UBA callback"
            )
        budget = total_steps if self.budget is None else self.budget
        if budget is None:
            raise ValueError(
                f"the {trainer} has no finite number of optimizer steps, and the UBA schedule "
                "needs its budget: set the trainer's max_steps, or pass budget= to the callback"
            )
        kwargs = dict(self.auto_uba_kwargs)
        if grad_clip is not None and grad_clip > 0:
            kwargs.setdefault("grad_clip", float(grad_clip))
        sched.auto = auto_uba(
            model,
            self.loader,
            budget,
            optimizer=sched.optimizer,
            resume_from=saved,
            **kwargs,
        )
        sched.saved_state = None
        return sched.auto
