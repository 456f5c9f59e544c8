"""The flags of ``uba-auto`` and their help: one sub-parser per command, each bound to its
function in :mod:`~uba_auto.cli.commands`."""

from __future__ import annotations

import argparse
from typing import Any

from .. import __version__
from ..curvature import MODES
from .commands import demo_command, plot_command, report_command
from .factories import LOSSES

__all__ = ["PROG", "Parser", "build_parser"]

PROG = "uba-auto"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr that says where to find help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``uba-auto``: ``--version`` and the commands ``plot``, ``demo``, ``report``;
    each command's namespace has ``func``, the function of :mod:`~uba_auto.cli.commands` to call."""
    parser = Parser(
        prog=PROG,
        description=(
            "Curvature-aware UBA learning-rate schedules for budgeted-iteration training "
            "in PyTorch."
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    _add_plot(sub)
    _add_demo(sub)
    _add_report(sub)
    return parser


def _add_plot(sub: Any) -> None:  # sub: what add_subparsers returned
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
    plot.set_defaults(func=plot_command)


def _add_demo(sub: Any) -> None:  # sub: what add_subparsers returned
    from ..demo import DEMO_BUDGET, QUICK_BUDGET

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
            "a minute on two idle CPU cores, up to a quarter of an hour when other jobs share "
            "them; --quick: about 15 s on two cores, longer under load."
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
        help=f"a smoke test: {QUICK_BUDGET} steps and a coarse probe (about 15 s on two cores)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=demo_command)


def _add_report(sub: Any) -> None:  # sub: what add_subparsers returned
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
            "ones (rows of probabilities, e.g. soft labels, are refused: name the loss), the "
            "model's own .loss for dict batches; the guess is the report's first line"
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
        help="your peak learning rate (default: the plain-SGD suggestion from the curvature, "
        "a share of the stability limit; see auto_uba)",
    )
    report.add_argument(
        "--mode",
        default=None,
        choices=MODES,
        help=(
            "how the probe sets the model's layers (auto_uba's mode=): train-deterministic "
            "(default: the loss training sees, normalisation on batch statistics, dropout off), "
            "eval (every module in eval mode, BatchNorm on running statistics) or as-is (the "
            "training flags the factory left; no random layer may be active)"
        ),
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
    report.set_defaults(func=report_command)
