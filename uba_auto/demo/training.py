"""The demo's training runs: one pre-training probe, then the same training under each schedule."""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._validation import check_int, check_positive_finite
from ..auto import auto_uba
from ..scheduler import BudgetScheduler, UBAScheduler
from .data import batch_stream, load_data, make_demo_model
from .environment import resolve_device
from .result import DemoResult, DemoRun
from .settings import (
    CURVE_POINTS,
    DEMO_BATCH_SIZE,
    DEMO_BUDGET,
    DEMO_MOMENTUM,
    DEMO_NUM_BATCHES,
    DEMO_PEAK_LR,
)

__all__ = ["run_demo"]


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).float().mean()


def _train(
    name: str,
    label: str,
    phi: float,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: Iterator[tuple[Tensor, Tensor]],
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    budget: int,
    curve_points: int,
    progress: bool | None,
) -> DemoRun:
    from tqdm.auto import tqdm

    x_train, y_train, x_held, y_held = data
    every = math.ceil(budget / curve_points)
    steps: list[int] = []
    train_curve: list[float] = []
    held_curve: list[float] = []
    lr_curve: list[float] = []
    show = progress if progress is not None else sys.stderr.isatty()
    running = torch.zeros((), device=x_train.device)
    since = 0
    diverged = False
    t0 = time.perf_counter()
    with tqdm(total=budget, desc=f"{label:<14}", unit="step", disable=not show) as bar:
        for step, (inputs, targets) in enumerate(itertools.islice(batches, budget)):
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            running += loss.detach()
            since += 1
            done = step + 1
            if done % every == 0 or done == budget:
                # One synchronisation per curve point, not per step.
                train_loss = float(running) / since
                running.zero_()
                since = 0
                held_loss, _ = _evaluate(model, x_held, y_held)
                steps.append(done)
                train_curve.append(train_loss)
                held_curve.append(float(held_loss))
                lr_curve.append(float(lr))
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{train_loss:.3g}", held_out=f"{float(held_loss):.3g}")
                if not math.isfinite(train_loss):
                    diverged = True
                    break
    train_loss, train_acc = _evaluate(model, x_train, y_train)
    held_loss, held_acc = _evaluate(model, x_held, y_held)
    return DemoRun(
        name=name,
        label=label,
        phi=phi,
        final_train_loss=float(train_loss),
        final_train_accuracy=float(train_acc),
        final_heldout_loss=float(held_loss),
        final_heldout_accuracy=float(held_acc),
        diverged=diverged or not math.isfinite(float(train_loss)),
        wall_time_s=time.perf_counter() - t0,
        curve_steps=tuple(steps),
        curve_train_loss=tuple(train_curve),
        curve_heldout_loss=tuple(held_curve),
        curve_lr=tuple(lr_curve),
    )


def run_demo(
    budget: int = DEMO_BUDGET,
    *,
    seed: int = 0,
    device: str | torch.device = "auto",
    phis: Sequence[float] = (),
    peak_lr: float = DEMO_PEAK_LR,
    num_batches: int = DEMO_NUM_BATCHES,
    probe_kwargs: dict[str, Any] | None = None,
    curve_points: int = CURVE_POINTS,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Probe the demo CNN, train it with the auto-chosen UBA schedule, cosine and fixed φ.

    Every run starts from the same initial weights and sees the same minibatches in the same
    order at the same peak rate (see the module docstring); only the schedule differs. The
    caller's global torch RNG state (CPU, and the CUDA device used) is the same afterwards: the
    demo runs under :func:`torch.random.fork_rng`.

    Args:
        budget: optimizer steps of every run (>= 2).
        seed: initial weights, minibatch order and augmentation, and the probe's random vectors.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        phis: extra fixed φ to train with, for comparison.
        peak_lr: the peak rate of every schedule (default :data:`DEMO_PEAK_LR`, which says how it
            was chosen).
        num_batches: minibatches the curvature probe uses (the first ones of the training stream).
        probe_kwargs: passed to :func:`~uba_auto.auto.auto_uba` (e.g. :data:`QUICK_PROBE`).
        curve_points: points of the curves (at most ``budget``); each evaluates the held-out set.
        progress: progress bars on stderr; ``None`` shows them when stderr is a terminal.
        log: called with text worth showing as it happens (the curvature report once probed,
            a line per finished run); ``print`` in the CLI.

    Returns:
        A :class:`DemoResult`.

    Raises:
        ImportError: if scikit-learn is not installed (``pip install "uba-auto[demo]"``).
        ValueError: for a bad budget, φ, peak rate or device.
    """
    budget = check_int("budget", budget, minimum=2)
    seed = check_int("seed", seed, minimum=0)
    phis = [check_positive_finite("phis", p) for p in phis]
    peak_lr = check_positive_finite("peak_lr", peak_lr)
    num_batches = check_int("num_batches", num_batches, minimum=1)
    curve_points = min(check_int("curve_points", curve_points, minimum=1), budget)
    dev = resolve_device(device)
    say = log if log is not None else (lambda _text: None)
    t_start = time.perf_counter()
    cuda = (
        [dev.index if dev.index is not None else torch.cuda.current_device()]
        if (dev.type == "cuda")
        else []
    )
    with torch.random.fork_rng(devices=cuda):
        data = load_data(dev)
        x_train, y_train = data[0], data[1]

        def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
            torch.manual_seed(seed)
            model = make_demo_model().to(dev)
            opt = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=DEMO_MOMENTUM)
            return model, opt

        def stream() -> Iterator[tuple[Tensor, Tensor]]:
            return batch_stream(x_train, y_train, DEMO_BATCH_SIZE, seed)

        model, opt = fresh()
        t0 = time.perf_counter()
        auto = auto_uba(
            model,
            list(itertools.islice(stream(), num_batches)),
            budget,
            optimizer=opt,
            loss_fn=F.cross_entropy,
            num_batches=num_batches,
            seed=seed,
            progress=progress,
            **(probe_kwargs or {}),
        )
        probe_time = time.perf_counter() - t0
        say(str(auto.report))
        say("")

        runs: list[DemoRun] = []

        def train(
            name: str, label: str, phi: float, model: nn.Module, opt: Any, sched: Any
        ) -> None:
            run = _train(
                name, label, phi, model, opt, sched, stream(), data, budget, curve_points, progress
            )
            runs.append(run)
            say(
                f"{run.label}: held-out loss {run.final_heldout_loss:.4g}, accuracy "
                f"{100 * run.final_heldout_accuracy:.2f} %"
                + (" (diverged)" if run.diverged else "")
                + f", {run.wall_time_s:.1f} s"
            )

        train("auto", f"UBA auto φ={auto.phi:.3g}", auto.phi, model, opt, auto.scheduler)
        if auto.phi == 2.0:  # UBA with phi = 2 is cosine: the same run, not trained twice
            runs.append(dataclasses.replace(runs[0], name="cosine", label="cosine"))
            say("cosine: the same run (the auto-chosen φ = 2 is cosine annealing)")
        else:
            model, opt = fresh()
            cosine = BudgetScheduler(opt, budget - 1, schedule="cosine")
            train("cosine", "cosine", 2.0, model, opt, cosine)
        for phi in phis:
            model, opt = fresh()
            sched = UBAScheduler(opt, total_steps=budget - 1, phi=phi)
            train(f"phi={phi:g}", f"UBA φ={phi:g}", phi, model, opt, sched)
    return DemoResult(
        report=auto.report,
        runs=tuple(runs),
        budget=budget,
        seed=seed,
        peak_lr=peak_lr,
        batch_size=DEMO_BATCH_SIZE,
        momentum=DEMO_MOMENTUM,
        device=str(dev),
        num_train=int(data[0].shape[0]),
        num_heldout=int(data[2].shape[0]),
        num_params=sum(p.numel() for p in model.parameters()),
        probe_time_s=probe_time,
        probe_share=probe_time / runs[0].wall_time_s,
        probe_cost_fraction=auto.probe_cost_fraction,
        wall_time_s=time.perf_counter() - t_start,
    )
