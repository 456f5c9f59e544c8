"""The ``uba-auto`` command line: a thin layer over the public functions.

Commands: ``plot`` (the UBA family), ``demo`` (:func:`uba_auto.demo.run_demo`) and ``report``
(the pre-training curvature report of :func:`uba_auto.auto.auto_uba` for your own model).
Every failure the user can cause ends with exit status 2 and one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__

PROG = "uba-auto"

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")

LOSSES = {
    "cross_entropy": "cross_entropy",
    "nll": "nll_loss",
    "mse": "mse_loss",
    "l1": "l1_loss",
    "smooth_l1": "smooth_l1_loss",
    "huber": "huber_loss",
    "bce": "binary_cross_entropy",
    "bce_with_logits": "binary_cross_entropy_with_logits",
}
"""``--loss`` names and the :mod:`torch.nn.functional` losses they stand for."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr that says where to find help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    """``text`` on one line (messages of torch and of users' code may span several)."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _check_phis(phis: Sequence[float]) -> None:
    bad = [p for p in phis if not (math.isfinite(p) and p > 0)]
    if bad:
        raise ValueError(f"--phi values must be finite and > 0, got {bad[0]:g}")


def _check_output(path: str, flag: str, suffixes: Sequence[str]) -> Path:
    """The output file ``path`` of ``flag``, checked before any work: its suffix, and that its
    folder is a folder that exists or can be created, and is writable."""
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        allowed = (
            ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
        )
        raise ValueError(f"{flag} must end in {allowed}, got {path!r}")
    _check_folder(out.parent, flag)
    return out


def _check_folder(folder: Path, flag: str) -> None:
    """Raise unless ``folder`` is, or can be created as, a writable folder."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"{flag}: cannot write into {str(folder)!r}: {str(existing)!r} is a file, not a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag}: cannot write into {str(folder)!r}: {str(existing)!r} is not writable"
        )


# ------------------------------------------------------------------------------------------ plot
def _cmd_plot(args: argparse.Namespace) -> int:
    from .plotting import plot_schedules

    _check_phis(args.phi)
    if args.total_steps < 1:
        raise ValueError(f"--total-steps must be >= 1, got {args.total_steps}")
    if not 0 <= args.warmup < args.total_steps:
        raise ValueError(
            f"--warmup must lie in [0, --total-steps), got --warmup {args.warmup} with "
            f"--total-steps {args.total_steps}"
        )
    out = _check_output(args.out, "--out", FIGURE_SUFFIXES)
    fig = plot_schedules(
        args.phi,
        total_steps=args.total_steps,
        warmup_steps=args.warmup,
        include_linear=not args.no_linear,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------ demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import (
        CURVE_POINTS,
        DEMO_BUDGET,
        QUICK_BUDGET,
        QUICK_PROBE,
        check_demo_dependencies,
        resolve_device,
        run_demo,
        write_demo_files,
    )

    check_demo_dependencies()
    _check_phis(args.phi)
    budget = args.budget
    if budget is None:
        budget = QUICK_BUDGET if args.quick else DEMO_BUDGET
    if budget < 2:
        raise ValueError(f"--budget must be >= 2 (optimizer steps per run), got {budget}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    device = resolve_device(args.device, "--device")
    out = Path(args.out)
    _check_folder(out, "--out")

    def say(text: str) -> None:
        print(text, flush=True)  # before the progress bars on stderr

    result = run_demo(
        budget,
        seed=args.seed,
        device=device,
        phis=args.phi,
        num_batches=2 if args.quick else 8,
        probe_kwargs=QUICK_PROBE if args.quick else None,
        curve_points=10 if args.quick else CURVE_POINTS,
        progress=False if args.no_progress else None,
        log=say,
    )
    paths = write_demo_files(result, out)
    say("")
    say(result.table())
    say("")
    say(f"wrote {', '.join(p.name for p in paths.values())} into {out}")
    say(f"demo finished in {result.wall_time_s:.0f} s")
    return 0


# ---------------------------------------------------------------------------------------- report
def _import_object(spec: str, flag: str) -> Any:
    """The object ``module:attr`` names, imported as ``python -m`` would (current folder first)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(
            f"{flag} must have the form PKG.MODULE:NAME (e.g. mypackage.models:make_model), "
            f"got {spec!r}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"{flag} {spec}: cannot import module {module_name!r} ({type(err).__name__}: {err}); "
            "run uba-auto from the folder that contains it or add that folder to PYTHONPATH"
        ) from None
    except Exception as err:  # the module's own code failed while importing
        raise ImportError(
            f"{flag} {spec}: importing module {module_name!r} raised {type(err).__name__}: {err}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{flag} {spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _call_factory(spec: str, flag: str) -> Any:
    factory = _import_object(spec, flag)
    if not callable(factory):
        raise TypeError(
            f"{flag} {spec} must name a function (factory) called with no arguments, got a "
            f"{type(factory).__name__}"
        )
    try:
        return factory()
    except Exception as err:  # the user's code: report it, not our traceback
        raise ValueError(f"{flag} factory {spec} raised {type(err).__name__}: {err}") from None


def _resolve_loss(name: str) -> Any:
    """``None`` for ``auto``, a :mod:`torch.nn.functional` loss for a known name, or the callable
    that ``PKG.MODULE:FN`` names."""
    if name == "auto":
        return None
    if name in LOSSES:
        from torch.nn import functional

        return getattr(functional, LOSSES[name])
    if ":" not in name:
        raise ValueError(
            f"--loss must be one of {', '.join(['auto', *LOSSES])} or PKG.MODULE:FN, got {name!r}"
        )
    fn = _import_object(name, "--loss")
    if not callable(fn):
        raise TypeError(
            f"--loss {name} must name a callable loss(outputs, targets), got a {type(fn).__name__}"
        )
    return fn


def _cmd_report(args: argparse.Namespace) -> int:
    from torch import Tensor, nn

    from .auto import auto_uba
    from .demo import resolve_device

    if args.budget < 2:
        raise ValueError(f"--budget must be >= 2 (optimizer steps of your run), got {args.budget}")
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.peak_lr is not None and not (math.isfinite(args.peak_lr) and args.peak_lr > 0):
        raise ValueError(f"--peak-lr must be finite and > 0, got {args.peak_lr:g}")
    json_out = _check_output(args.json, "--json", (".json",)) if args.json else None
    plot_out = _check_output(args.plot, "--plot", FIGURE_SUFFIXES) if args.plot else None
    if plot_out is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError(
                '--plot needs matplotlib, which is not installed; pip install "uba-auto[plot]"'
            ) from None
    device = None if args.device is None else resolve_device(args.device, "--device")
    loss_fn = _resolve_loss(args.loss)
    import torch

    torch.manual_seed(args.seed)  # the factories' initialisation and shuffling, reproducibly
    model = _call_factory(args.model, "--model")
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"--model factory {args.model} must return a torch.nn.Module, got "
            f"{type(model).__name__}"
        )
    data = _call_factory(args.data, "--data")
    if isinstance(data, (Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"--data factory {args.data} must return an iterable of batches (a DataLoader or a "
            f"list of (inputs, targets) pairs), got {type(data).__name__}"
        )
    if device is not None:
        model = model.to(device)
    try:
        auto = auto_uba(
            model,
            data,
            args.budget,
            loss_fn=loss_fn,
            warmup_steps=args.warmup,
            peak_lr=args.peak_lr,
            num_batches=args.batches,
            seed=args.seed,
        )
    except (ValueError, TypeError):  # the library's own messages already name the fix
        raise
    except Exception as err:  # raised inside the user's model, data or loss (shape, KeyError...)
        raise ValueError(
            f"the probe failed: {type(err).__name__}: {err} (raised in the model, the data or "
            "the loss; call your factories and loss in Python to see the traceback)"
        ) from None
    print(auto.report)
    warmup = f", warmup_steps={args.warmup}" if args.warmup else ""
    print(
        f"\nuse it: UBAScheduler(optimizer, total_steps={args.budget - 1}, "
        f"phi={auto.phi:.4g}{warmup})"
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(auto.report.to_json() + "\n", encoding="utf-8")
        print(f"wrote {json_out}")
    if plot_out is not None:
        plot_out.parent.mkdir(parents=True, exist_ok=True)
        auto.report.plot().savefig(plot_out, dpi=120)
        print(f"wrote {plot_out}")
    return 0


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .demo import DEMO_BUDGET, QUICK_BUDGET

    parser = _Parser(
        prog=PROG,
        description=(
            "Curvature-aware UBA learning-rate schedules for budgeted-iteration training "
            "in PyTorch."
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    plot = sub.add_parser(
        "plot",
        help="plot the UBA schedule family next to cosine annealing",
        description="Plot UBA schedules for several phi next to cosine annealing and linear decay.",
    )
    plot.add_argument(
        "--phi",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
        metavar="PHI",
        help="values of phi to draw (default: 0.25 0.5 1 2 4 8)",
    )
    plot.add_argument("--warmup", type=int, default=0, metavar="W", help="warm-up steps (0)")
    plot.add_argument(
        "--total-steps", type=int, default=1000, metavar="T", help="budget in steps (1000)"
    )
    plot.add_argument("--no-linear", action="store_true", help="do not draw linear decay")
    plot.add_argument("--dpi", type=int, default=120, help="resolution of a PNG (120)")
    plot.add_argument("--out", required=True, metavar="PATH", help="where to write the figure")
    plot.set_defaults(func=_cmd_plot)

    demo = sub.add_parser(
        "demo",
        help="probe a small CNN on the digits, train it with the auto-chosen UBA schedule and "
        "with cosine, compare",
        description=(
            "Probe the curvature of a small CNN on scikit-learn's digits (nothing is downloaded), "
            "print the curvature report, train the CNN with the auto-chosen UBA schedule, with "
            "cosine annealing and with any --phi for the same budget, peak learning rate, "
            "initial weights and minibatch order, print the comparison and write a figure, the "
            'report and the results into --out. Needs: pip install "uba-auto[demo]". About '
            "a minute on two CPU cores (under 1 s per 100 steps and schedule)."
        ),
    )
    demo.add_argument(
        "--budget",
        type=int,
        default=None,
        metavar="N",
        help=f"optimizer steps per run ({DEMO_BUDGET}; {QUICK_BUDGET} with --quick)",
    )
    demo.add_argument("--seed", type=int, default=0, help="initial weights and batch order (0)")
    demo.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="auto (CUDA when available), cpu, cuda or cuda:N (auto)",
    )
    demo.add_argument(
        "--phi",
        type=float,
        nargs="+",
        default=[0.5, 8.0],
        metavar="PHI",
        help="also train with these fixed phi (default: 0.5 8, a late and an early decay)",
    )
    demo.add_argument(
        "--out",
        default="uba-auto-out/demo",
        metavar="DIR",
        help="folder for the figure, the report and the results (uba-auto-out/demo)",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke test of a few seconds: {QUICK_BUDGET} steps and a coarse probe",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    report = sub.add_parser(
        "report",
        help="the pre-training curvature report and the chosen phi for your own model",
        description=(
            "Build your model and data with your own factories, probe the curvature and print "
            "the report of auto_uba: the eigenvalues, the phi chosen and why. FACTORY is a "
            "function called with no arguments, named as PKG.MODULE:NAME and imported with the "
            "current folder first on the path (as python -m does)."
        ),
    )
    report.add_argument(
        "--model", required=True, metavar="PKG.MODULE:FACTORY", help="returns a torch.nn.Module"
    )
    report.add_argument(
        "--data",
        required=True,
        metavar="PKG.MODULE:FACTORY",
        help="returns an iterable of batches: a DataLoader or a list of (inputs, targets)",
    )
    report.add_argument(
        "--loss",
        default="auto",
        metavar="NAME|PKG.MODULE:FN",
        help=(
            f"loss(outputs, targets): one of {', '.join(LOSSES)} (torch.nn.functional), or your "
            "own function; auto (default): cross_entropy for integer targets, mse for floating "
            "ones, the model's own .loss for dict batches"
        ),
    )
    report.add_argument(
        "--budget", required=True, type=int, metavar="N", help="optimizer steps of your run"
    )
    report.add_argument(
        "--batches", type=int, default=8, metavar="K", help="minibatches to probe (8)"
    )
    report.add_argument("--warmup", type=int, default=0, metavar="W", help="warm-up steps (0)")
    report.add_argument(
        "--peak-lr",
        type=float,
        default=None,
        metavar="LR",
        help="your peak learning rate (default: 1 / lambda_max, the plain-SGD suggestion)",
    )
    report.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="move the model to cpu, cuda, cuda:N or auto (default: where the factory put it)",
    )
    report.add_argument(
        "--seed", type=int, default=0, help="seeds torch before the factories, and the probe (0)"
    )
    report.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    report.add_argument(
        "--plot", metavar="PATH", help="also plot the spectral density and the schedule"
    )
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, ImportError, OSError) as err:
        print(f"{PROG} {args.command}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
