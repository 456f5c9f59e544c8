r"""The ``uba-auto demo``: probe a small CNN, then train it with the auto-chosen UBA schedule and
with cosine annealing under the same budget, and compare.

Everything is fixed except the learning-rate schedule, so that the comparison is about the
schedule only:

* the data: scikit-learn's ``load_digits`` (1797 images of 8×8 pixels, shipped with scikit-learn,
  nothing is downloaded), pixel values scaled to [0, 1], split once into :data:`NUM_TRAIN` train
  and 1297 held-out images by :data:`DATA_SEED` (the split does not depend on the run seed);
* the model, :func:`make_demo_model`, initialised from the run seed (the same weights for every
  schedule);
* the minibatch order and the augmentation (each train image shifted by at most one pixel in each
  direction, :func:`shift_images`), drawn from a private generator seeded from the run seed, so
  every schedule sees the same batches in the same order; the curvature probe uses the first
  ``num_batches`` of them;
* the optimizer, SGD with momentum :data:`DEMO_MOMENTUM`, batch :data:`DEMO_BATCH_SIZE`, and the
  peak rate :data:`DEMO_PEAK_LR` for every schedule; every schedule decays to 0 at the last of the
  ``budget`` steps (``total_steps = budget - 1``, as :meth:`AutoUBA.make_scheduler
  <uba_auto.auto.AutoUBA.make_scheduler>`).

:func:`run_demo` runs it and returns a :class:`DemoResult` (the table, the curves, the curvature
report); :meth:`DemoResult.plot` draws the figure and :func:`write_demo_files` writes the files.
scikit-learn and matplotlib come with ``pip install "uba-auto[demo]"``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._serialize import json_safe
from ._validation import check_int, check_positive_finite
from .report import CurvatureReport

__all__ = [
    "CURVE_POINTS",
    "DATA_SEED",
    "DEMO_BATCH_SIZE",
    "DEMO_BUDGET",
    "DEMO_FILES",
    "DEMO_MOMENTUM",
    "DEMO_PEAK_LR",
    "NUM_TRAIN",
    "QUICK_BUDGET",
    "QUICK_PROBE",
    "DemoResult",
    "DemoRun",
    "check_demo_dependencies",
    "make_demo_model",
    "resolve_device",
    "run_demo",
    "shift_images",
    "write_demo_files",
]

DATA_SEED = 12345
"""Seed of the train/held-out split (fixed; run seeds change the initial weights and batches)."""

NUM_TRAIN = 500
"""Train images; the other 1297 of the 1797 are held out. Few enough that the schedule matters:
the network fits the train set long before the budget ends, and the held-out loss separates the
schedules."""

DEMO_BATCH_SIZE = 64
DEMO_MOMENTUM = 0.9

DEMO_PEAK_LR = 0.05
"""The peak learning rate of every schedule (SGD, momentum 0.9, batch 64).

Chosen by a sweep of cosine annealing at the default budget and seed 0 (held-out loss at the end:
0.086 at 0.025, 0.069 at 0.05, 0.073 at 0.1; at 0.2 the network does not train). At 0.05 the UBA
family trains over the whole range the auto choice can pick (φ = 0.25 and φ = 16 reach held-out
losses of 0.077 and 0.072). It is deliberately not ``1 / λ_max`` of the probe
(``peak_lr="suggest"``), a rule for plain SGD, and it is the same for every schedule, so that the
comparison is about the shape of the schedule only."""

DEMO_BUDGET = 6000
"""Default budget in optimizer steps: about 20 s per schedule on two idle CPU cores."""

CURVE_POINTS = 50
"""Default number of points of the loss and learning-rate curves; the held-out set is evaluated
at each."""

QUICK_BUDGET = 40
"""Budget of ``uba-auto demo --quick`` (a smoke test of a few seconds, not a comparison)."""

QUICK_PROBE: dict[str, Any] = {"max_hvps": 24, "trace_matvecs": 3, "density_iters": 8}
"""Probe settings of ``--quick``: a coarse probe, enough to exercise every part of the report."""

_DEPENDENCIES = (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))


def check_demo_dependencies(*, plot: bool = True) -> None:
    """Raise :class:`ImportError` naming what the demo needs and is not installed.

    Args:
        plot: also check matplotlib (the figure); scikit-learn (the data) is always needed.

    Raises:
        ImportError: if scikit-learn (or matplotlib) cannot be imported; the message gives the
            command that installs them.
    """
    import importlib

    missing = []
    for module, package in _DEPENDENCIES[: 2 if plot else 1]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(
            f"the demo needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install with: "
            'pip install "uba-auto[demo]"'
        )


def resolve_device(device: str | torch.device, name: str = "device") -> torch.device:
    """The device asked for: ``"auto"`` is CUDA when available, else the CPU.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a :class:`torch.device`.
        name: how the argument is called in error messages (``"--device"`` for the CLI).

    Raises:
        ValueError: for an unknown device, or CUDA asked for and not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{name} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name} {str(device)!r} asks for CUDA, but CUDA is not available here "
                "(torch.cuda.is_available() is False: no GPU, or a CPU-only PyTorch build); "
                "use 'cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name} {str(device)!r}: there are only {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def make_demo_model() -> nn.Module:
    """The demo's CNN for ``(N, 1, 8, 8)`` images: conv32-conv64-pool-fc128-fc10 (≈150k weights).

    Example:
        >>> make_demo_model()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def shift_images(images: Tensor, shifts: Tensor) -> Tensor:
    """Shift each image by at most one pixel per axis, filling with zeros.

    Args:
        images: ``(N, C, H, W)``.
        shifts: ``(2, N)`` integers in {0, 1, 2}: the row and column offsets plus one (1 keeps
            the image in place; 0 moves its content down/right, 2 up/left).

    Returns:
        The shifted images, same shape.

    Example:
        >>> img = torch.arange(9.0).view(1, 1, 3, 3)
        >>> shift_images(img, torch.tensor([[0], [1]]))[0, 0]
        tensor([[0., 0., 0.],
                [0., 1., 2.],
                [3., 4., 5.]])
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1))
    dev = images.device
    rows = torch.arange(h, device=dev)[None, :] + shifts[0].to(dev)[:, None]
    cols = torch.arange(w, device=dev)[None, :] + shifts[1].to(dev)[:, None]
    return padded[
        torch.arange(n, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def _load_data(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and held-out images ``(N, 1, 8, 8)`` in [0, 1] and labels, on ``device``."""
    check_demo_dependencies(plot=False)
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(DATA_SEED))
    train, held = order[:NUM_TRAIN], order[NUM_TRAIN:]
    return x[train].to(device), y[train].to(device), x[held].to(device), y[held].to(device)


def _batch_stream(
    x: Tensor, y: Tensor, batch_size: int, seed: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Reshuffled epochs of shifted train images; depends on ``seed`` only (private generator)."""
    gen = torch.Generator().manual_seed(1_000_003 * seed + 17)
    n = x.shape[0]
    while True:
        order = torch.randperm(n, generator=gen)
        # Drop the last incomplete batch: every step has the same batch size.
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size].to(x.device)
            shifts = torch.randint(0, 3, (2, batch_size), generator=gen)
            yield shift_images(x[idx], shifts), y[idx]


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).float().mean()


@dataclass(frozen=True)
class DemoRun:
    """One training run of the demo.

    Attributes:
        name: ``"auto"``, ``"cosine"`` or ``"phi=X"``.
        label: how tables and plots name it.
        phi: the φ of the schedule (2 for cosine, which is UBA with φ = 2).
        final_train_loss, final_train_accuracy: on the whole (unshifted) train set at the end.
        final_heldout_loss, final_heldout_accuracy: on the held-out set at the end.
        diverged: the training loss became NaN or infinite (the run stopped there).
        wall_time_s: training time, evaluation of the curves included.
        curve_steps: optimizer steps done at each curve point.
        curve_train_loss: mean minibatch loss since the previous point (the loss training saw).
        curve_heldout_loss: held-out loss at each point.
        curve_lr: the rate of the last update before each point.
    """

    name: str
    label: str
    phi: float
    final_train_loss: float
    final_train_accuracy: float
    final_heldout_loss: float
    final_heldout_accuracy: float
    diverged: bool
    wall_time_s: float
    curve_steps: tuple[int, ...]
    curve_train_loss: tuple[float, ...]
    curve_heldout_loss: tuple[float, ...]
    curve_lr: tuple[float, ...]

    def summary(self) -> dict[str, Any]:
        """The final numbers, without the curves (one row of the CSV)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.name.startswith("curve_")
        }


_CSV_FIELDS = tuple(f.name for f in dataclasses.fields(DemoRun) if not f.name.startswith("curve_"))


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` returns.

    Attributes:
        report: the curvature report of the pre-training probe.
        runs: the auto-chosen UBA run first, then cosine, then any fixed φ.
        budget, seed, peak_lr, batch_size, momentum: the settings.
        device: where it ran.
        num_train, num_heldout, num_params: sizes.
        probe_time_s: wall time of the pre-training probe (:func:`~uba_auto.auto.auto_uba`).
        probe_share: ``probe_time_s`` over the training time of the auto run.
        probe_cost_fraction: the probe in gradient-equivalents over the budget
            (:attr:`AutoUBA.probe_cost_fraction <uba_auto.auto.AutoUBA.probe_cost_fraction>`).
        wall_time_s: the whole demo.
    """

    report: CurvatureReport
    runs: tuple[DemoRun, ...]
    budget: int
    seed: int
    peak_lr: float
    batch_size: int
    momentum: float
    device: str
    num_train: int
    num_heldout: int
    num_params: int
    probe_time_s: float
    probe_share: float
    probe_cost_fraction: float
    wall_time_s: float

    def run(self, name: str) -> DemoRun:
        """The run called ``name`` (``"auto"``, ``"cosine"``, ``"phi=0.5"``...)."""
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(f"no run named {name!r}; runs: {[r.name for r in self.runs]}")

    def table(self) -> str:
        """The comparison as a text table, with the probe cost below it."""
        cosine = next((r for r in self.runs if r.name == "cosine"), None)
        header = (
            "schedule",
            "phi",
            "train loss",
            "train acc",
            "held-out loss",
            "held-out acc",
            "vs cosine",
            "time (s)",
        )
        rows = []
        for r in self.runs:
            if r.diverged:
                rel = "diverged"
            elif cosine is None or r is cosine or not cosine.final_heldout_loss > 0:
                rel = ""
            else:
                rel = f"{100 * (r.final_heldout_loss / cosine.final_heldout_loss - 1):+.1f} %"
            rows.append(
                (
                    r.label,
                    f"{r.phi:.3g}",
                    f"{r.final_train_loss:.4g}",
                    f"{100 * r.final_train_accuracy:.1f} %",
                    f"{r.final_heldout_loss:.4g}",
                    f"{100 * r.final_heldout_accuracy:.2f} %",
                    rel,
                    f"{r.wall_time_s:.1f}",
                )
            )
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            first = f"{cells[0]:<{widths[0]}}"
            return "  ".join(
                [first, *(f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True))]
            )

        est = self.report.estimate
        lines = [
            f"{self.budget} steps of SGD (momentum {self.momentum:g}, batch {self.batch_size}, "
            f"peak lr {self.peak_lr:g}) on {self.num_train} digits, {self.num_heldout} held out, "
            f"seed {self.seed}, {self.device}",
            line(header),
            line(["-" * w for w in widths]),
            *(line(row) for row in rows),
            f"probe: {est.num_hvps} HVPs on {est.num_batches} batches in {self.probe_time_s:.1f} s "
            f"= {100 * self.probe_share:.0f} % of the auto run's training time "
            f"({100 * self.probe_cost_fraction:.0f} % of the budget in gradient-equivalents)",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the settings, every run with its curves, and the report."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["report"] = self.report.to_dict()
        out["runs"] = [dataclasses.asdict(r) for r in self.runs]
        return json_safe(out)

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as a JSON string (``indent=2`` unless given)."""
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    def to_csv(self) -> str:
        """One row per run with the final numbers (no curves)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in self.runs:
            writer.writerow(r.summary())
        return buf.getvalue()

    def plot(self) -> Any:
        """Training and held-out loss curves, the learning rates, and the spectral density.

        Returns:
            The matplotlib Figure.
        """
        from .plotting import draw_density, new_figure

        fig = new_figure((11.0, 7.5))
        (ax_train, ax_held), (ax_lr, ax_density) = fig.subplots(2, 2)
        for i, r in enumerate(self.runs):
            style = {"color": f"C{i}", "lw": 2 if r.name == "auto" else 1.3}
            if r.name == "cosine":
                style.update(color="k", ls="--")
            ax_train.plot(r.curve_steps, r.curve_train_loss, label=r.label, **style)
            ax_held.plot(r.curve_steps, r.curve_heldout_loss, label=r.label, **style)
            ax_lr.plot(r.curve_steps, r.curve_lr, label=r.label, **style)
        for ax, title in (
            (ax_train, "training loss (mean over the minibatches since the previous point)"),
            (ax_held, f"held-out loss ({self.num_heldout} digits)"),
        ):
            ax.set_yscale("log")
            ax.set_title(title, fontsize="medium")
        ax_lr.set_title("learning rate", fontsize="medium")
        ax_lr.set_ylim(bottom=0)
        for ax in (ax_train, ax_held, ax_lr):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(frameon=False, fontsize="small")
        mass = self.report.estimate.negative_mass
        draw_density(
            ax_density,
            self.report.estimate,
            title="Hessian spectral density at initialisation"
            + ("" if mass is None else f", {100 * mass:.0f} % negative"),
        )
        fig.suptitle(
            f"uba-auto demo: CNN on digits, {self.budget} steps, peak lr {self.peak_lr:g}, "
            f"auto φ = {self.report.phi:.3g}"
        )
        return fig


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
    num_batches: int = 8,
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
    from .auto import auto_uba
    from .scheduler import BudgetScheduler, UBAScheduler

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
        data = _load_data(dev)
        x_train, y_train = data[0], data[1]

        def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
            torch.manual_seed(seed)
            model = make_demo_model().to(dev)
            opt = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=DEMO_MOMENTUM)
            return model, opt

        def stream() -> Iterator[tuple[Tensor, Tensor]]:
            return _batch_stream(x_train, y_train, DEMO_BATCH_SIZE, seed)

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


DEMO_FILES = {
    "figure": "demo.png",
    "report": "curvature_report.json",
    "results_json": "results.json",
    "results_csv": "results.csv",
}
"""The files :func:`write_demo_files` writes, by role."""


def write_demo_files(result: DemoResult, out: str | Path, *, dpi: int = 120) -> dict[str, Path]:
    """Write the figure, the curvature report and the results into the folder ``out``.

    The folder is created if needed; files of an earlier demo there are replaced.

    Returns:
        The paths written, by role (the keys of :data:`DEMO_FILES`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {role: out / name for role, name in DEMO_FILES.items()}
    fig = result.plot()
    fig.savefig(paths["figure"], dpi=dpi)
    paths["report"].write_text(result.report.to_json() + "\n", encoding="utf-8")
    paths["results_json"].write_text(result.to_json() + "\n", encoding="utf-8")
    paths["results_csv"].write_text(result.to_csv(), encoding="utf-8")
    return paths
