"""The ``uba-auto`` command line: a thin layer over the public functions.

Every failure the user can cause ends with exit status 2 and one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__

PROG = "uba-auto"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr that says where to find help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plotting import plot_schedules

    bad = [p for p in args.phi if not (math.isfinite(p) and p > 0)]
    if bad:
        raise ValueError(f"--phi values must be finite and > 0, got {bad[0]:g}")
    if args.total_steps < 1:
        raise ValueError(f"--total-steps must be >= 1, got {args.total_steps}")
    if not 0 <= args.warmup < args.total_steps:
        raise ValueError(
            f"--warmup must lie in [0, --total-steps), got --warmup {args.warmup} with "
            f"--total-steps {args.total_steps}"
        )
    out = Path(args.out)
    if out.suffix.lower() not in {".png", ".pdf", ".svg"}:
        raise ValueError(f"--out must end in .png, .pdf or .svg, got {str(out)!r}")
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


def build_parser() -> argparse.ArgumentParser:
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
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
