r"""One budgeted training run of a task under a schedule, and the curvature probe at initialisation.

Time convention (the same for every schedule): a run of ``budget`` optimizer steps builds its
scheduler with ``total_steps = budget - 1`` and ``lr_min = 0``, so the rate is the peak at the first
update and exactly 0 at the last one. The last update is therefore a no-op for every annealing
schedule: each run makes ``budget - 1`` effective updates, the same for all, and ends exactly at the
end of its schedule (the held-out loss is read there). ``step`` is the exception that does not reach
0 (its final rate is ``gamma**2 = 0.01`` of the peak, as ``MultiStepLR``).

Baselines: ``cosine``, ``linear``, ``step`` (×0.1 at 50 % and 75 %), ``wsd`` (stable, then linear
decay over the last 20 %), all the defaults of :data:`uba_auto.SCHEDULES`.

Warm-up and clipping are the task's (:attr:`Task.warmup_fraction`, :attr:`Task.grad_clip`; none
for the SGD tasks): with ``W = task.warmup_steps(budget) > 0`` every schedule, UBA and baselines
alike, is built with the schedulers' own ``warmup_steps=W``, a linear rise from 0 at step 0 to the
peak at step ``W`` (the first update is a no-op, as with Hugging Face's
``get_cosine_schedule_with_warmup``), then the schedule's decay over steps ``W .. budget - 1``
(``wsd``'s 20 % and ``step``'s milestones are fractions of that decay phase). Clipping rescales the
gradient's total norm to at most ``grad_clip`` between ``backward`` and ``optimizer.step``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

import uba_auto
from benchmarks.tasks import Task

__all__ = ["RunResult", "ScheduleSpec", "evaluate", "probe_at_init", "train"]

SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
StepCallback = Callable[[int, nn.Module, torch.optim.Optimizer], None]


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule by name (``"uba"`` with ``phi``, or a baseline of :data:`uba_auto.SCHEDULES`).

    Picklable, so it can cross to worker processes; :meth:`factory` turns it into the scheduler
    factory :func:`train` takes.
    """

    name: str
    phi: float | None = None
    decay_fraction: float | None = None
    """``wsd`` only: the cool-down's share of the decay phase (``None``: the schedule's default,
    20 %); labelled ``wsd10`` for 0.1 and so on."""
    decay_shape: str | None = None
    """``wsd`` only: the cool-down's shape (``None``: the schedule's default, linear); a
    ``"cosine"`` cool-down is labelled ``wsd60cos`` for 0.6 and so on."""

    def __post_init__(self) -> None:
        for field_name in ("decay_fraction", "decay_shape"):
            if getattr(self, field_name) is not None and self.name != "wsd":
                raise ValueError(
                    f"{field_name} is a parameter of the 'wsd' schedule, not of {self.name!r}; "
                    "leave it None"
                )

    @property
    def label(self) -> str:
        if self.name == "uba":
            return f"phi={self.phi:g}"
        if self.decay_fraction is not None or self.decay_shape is not None:
            fraction = "" if self.decay_fraction is None else str(round(100 * self.decay_fraction))
            shapes = {None: "", "linear": "", "cosine": "cos"}
            shape = shapes.get(self.decay_shape, self.decay_shape)
            return f"wsd{fraction}{shape}"
        return self.name

    def factory(self, budget: int, warmup_steps: int = 0) -> SchedulerFactory:
        """The scheduler factory of a ``budget``-step run with a linear warm-up of
        ``warmup_steps`` steps (0: none, each schedule exactly as without the argument)."""
        total_steps = budget - 1  # the last update uses lr_min = 0 (see the module docstring)
        if self.name == "uba":
            if self.phi is None:
                raise ValueError("ScheduleSpec('uba') needs phi")
            phi = self.phi
            return lambda opt: uba_auto.UBAScheduler(
                opt, total_steps=total_steps, phi=phi, warmup_steps=warmup_steps
            )
        name = self.name
        # None, not 0, without a warm-up: the schedule's own default (OneCycle keeps its rise).
        warmup = warmup_steps or None
        extra = {
            k: v
            for k, v in (("decay_fraction", self.decay_fraction), ("decay_shape", self.decay_shape))
            if v is not None
        }
        return lambda opt: uba_auto.BudgetScheduler(
            opt, total_steps, schedule=name, warmup_steps=warmup, **extra
        )


@dataclass
class RunResult:
    """What one run produced. Losses are means over the named set; ``inf`` after a divergence.

    ``curve_*`` are sampled every ``curve_every`` steps (after that many updates) and at the end:
    ``curve_train_loss`` is the mean minibatch loss since the previous point (the loss training
    saw), ``curve_heldout_loss`` the loss on ``task.curve_heldout()``, ``curve_lr`` the rate used
    by the last update before the point.
    """

    task: str
    schedule: str
    phi: float | None
    budget: int
    seed: int
    peak_lr: float
    final_train_loss: float
    final_heldout_loss: float
    final_heldout_accuracy: float | None
    diverged: bool
    curve_every: int
    curve_steps: list[int] = field(default_factory=list)
    curve_train_loss: list[float] = field(default_factory=list)
    curve_heldout_loss: list[float] = field(default_factory=list)
    curve_lr: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    decay_fraction: float | None = None

    @property
    def label(self) -> str:
        return ScheduleSpec(self.schedule, self.phi, self.decay_fraction).label

    def to_dict(self) -> dict:
        """JSON-ready: non-finite floats become ``None`` (JSON has no inf/NaN)."""
        return {k: _json_float(v) for k, v in asdict(self).items()}


def _json_float(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_float(v) for v in value]
    return value


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float | None]:
    """Mean loss and (for classification) accuracy of ``model`` on ``(x, y)``, in chunks.

    The loss is the mean over rows of ``x`` (each row's loss a mean over its targets); the accuracy
    is over every target of ``y`` (a row of a sequence task has one target per position).
    """
    # Eval mode: BatchNorm on its running statistics (the held-out set never enters them) and no
    # dropout; the models of the SGD and GPT tasks have neither, so their losses are unchanged.
    was_training = model.training
    model.eval()
    try:
        return _evaluate(task, model, x, y)
    finally:
        model.train(was_training)


def _evaluate(task: Task, model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float | None]:
    total, correct, n = 0.0, 0, x.shape[0]
    for start in range(0, n, 8192):
        xb, yb = x[start : start + 8192], y[start : start + 8192]
        out = model(xb)
        total += float(task.loss_fn(out, yb)) * xb.shape[0]
        if task.kind == "classification":
            pred = (out > 0).to(yb.dtype) if out.ndim == 1 else out.argmax(dim=-1)
            correct += int((pred == yb).sum())
    loss = total / n
    return loss, (correct / y.numel() if task.kind == "classification" else None)


def train(
    task: Task,
    scheduler_factory: SchedulerFactory | ScheduleSpec,
    budget: int,
    seed: int,
    peak_lr: float,
    callback: StepCallback | None = None,
) -> RunResult:
    """Train ``task``'s model from seed ``seed`` for ``budget`` steps of ``task``'s optimizer
    (:meth:`Task.make_optimizer`) under a schedule, with the task's warm-up and gradient clipping.

    Args:
        task: the task.
        scheduler_factory: ``factory(optimizer) -> scheduler`` stepped once per optimizer step
            (after it), or a :class:`ScheduleSpec` (built with ``total_steps = budget - 1`` and
            ``warmup_steps = task.warmup_steps(budget)``). A factory must build the task's warm-up
            itself: when ``task.warmup_steps(budget) > 0`` its scheduler's ``warmup_steps``
            attribute must equal it (``BudgetScheduler``, ``UBAScheduler`` and ``auto_uba``'s
            scheduler have one).
        budget: optimizer steps.
        seed: seeds the initialisation and the minibatch order.
        peak_lr: the optimizer's ``lr`` at construction, the schedule's peak.
        callback: ``callback(step, model, optimizer)``, called after every update (``step`` from 1,
            after ``scheduler.step()``), e.g. to probe the curvature along the run. It must leave
            the model, the optimizer and the global RNG as they were (the probe does), or the run
            is no longer the same run.

    Returns:
        A :class:`RunResult`. A run whose loss becomes non-finite stops there with ``diverged``
        set and infinite final losses.

    Raises:
        ValueError: if ``task`` has a warm-up and the factory's scheduler does not report the same
            ``warmup_steps``.
    """
    spec = scheduler_factory if isinstance(scheduler_factory, ScheduleSpec) else None
    warmup = task.warmup_steps(budget)
    factory = spec.factory(budget, warmup) if spec is not None else scheduler_factory
    start = time.perf_counter()
    model = task.make_model(seed)
    model.train()
    opt = task.make_optimizer(model, peak_lr)
    sched = factory(opt)
    if warmup and getattr(sched, "warmup_steps", None) != warmup:
        raise ValueError(
            f"task {task.name!r} warms up over {warmup} steps of a {budget}-step budget, but the "
            f"scheduler_factory built a scheduler with warmup_steps="
            f"{getattr(sched, 'warmup_steps', None)!r}; build it with "
            f"warmup_steps=task.warmup_steps(budget) (= {warmup}) or pass a ScheduleSpec"
        )
    clip = task.grad_clip
    x_curve, y_curve = task.curve_heldout()
    every = max(1, budget // 50)
    result = RunResult(
        task=task.name,
        schedule=spec.name if spec is not None else type(sched).__name__,
        phi=spec.phi if spec is not None else getattr(sched, "phi", None),
        decay_fraction=spec.decay_fraction if spec is not None else None,
        budget=budget,
        seed=seed,
        peak_lr=peak_lr,
        final_train_loss=math.inf,
        final_heldout_loss=math.inf,
        final_heldout_accuracy=None,
        diverged=False,
        curve_every=every,
    )
    running = torch.zeros(())
    since = 0
    for step, (xb, yb) in enumerate(itertools.islice(task.batches(seed), budget), start=1):
        lr = opt.param_groups[0]["lr"]
        loss = task.loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        if callback is not None:
            callback(step, model, opt)
        running += loss.detach()
        since += 1
        if step % every == 0 or step == budget:
            train_loss = float(running) / since
            held_loss, _ = evaluate(task, model, x_curve, y_curve)
            result.curve_steps.append(step)
            result.curve_train_loss.append(train_loss)
            result.curve_heldout_loss.append(held_loss)
            result.curve_lr.append(float(lr))
            running.zero_()
            since = 0
            if not (math.isfinite(train_loss) and math.isfinite(held_loss)):
                result.diverged = True
                break
    if not result.diverged:
        x_tr, y_tr = task.train_eval()
        result.final_train_loss, _ = evaluate(task, model, x_tr, y_tr)
        loss, acc = evaluate(task, model, task.x_heldout, task.y_heldout)
        result.final_heldout_loss, result.final_heldout_accuracy = loss, acc
        if not math.isfinite(loss):
            result.diverged = True
    result.wall_time_s = time.perf_counter() - start
    return result


def probe_at_init(
    task: Task, seed: int, num_batches: int | None = None, **probe_kwargs
) -> uba_auto.CurvatureEstimate:
    """The curvature of ``task``'s model at initialisation (seed ``seed``), by
    :func:`uba_auto.probe_curvature` on the first ``num_batches`` (default
    ``task.probe_batches``) minibatches of the run's own stream (the batches training sees first),
    in float64, with the SLQ density.

    ``probe_kwargs`` override the defaults (``density=True``, ``dtype=torch.float64``,
    ``seed=seed``, ``progress=False``).
    """
    num_batches = num_batches or task.probe_batches
    model = task.make_model(seed)
    model.train()
    batches = init_batches(task, seed, num_batches)
    kwargs = dict(
        num_batches=num_batches,
        density=True,
        dtype=torch.float64,
        seed=seed,
        progress=False,
    )
    kwargs.update(probe_kwargs)
    return uba_auto.probe_curvature(model, batches, task.loss_fn, **kwargs)


def init_batches(task: Task, seed: int, num: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``num`` minibatches of run ``seed``'s stream (one for a full-batch task)."""
    return list(itertools.islice(task.batches(seed), num if task.batch_size else 1))


def gradient_stats(task: Task, model: nn.Module, batches: list) -> dict:
    r"""Minibatch gradient statistics of ``model`` on ``batches`` (its ``.grad`` left cleared).

    ``trS``: :math:`\operatorname{tr}\Sigma_B`, the unbiased variance of the per-batch gradients
    (0 for a single batch); ``g2``: the squared norm of their mean; ``loss``: their mean loss.
    """
    grads, losses = [], []
    for xb, yb in batches:
        model.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(xb), yb)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.reshape(-1).double() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    g = torch.stack(grads)
    mean = g.mean(0)
    n = len(batches)
    return {
        "trS": float(((g - mean) ** 2).sum()) / (n - 1) if n > 1 else 0.0,
        "g2": float(mean @ mean),
        "loss": sum(losses) / n,
    }
