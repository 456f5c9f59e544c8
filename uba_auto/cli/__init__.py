"""The ``uba-auto`` command line: a thin layer over the public functions.

Commands: ``plot`` (the UBA family), ``demo`` (:func:`uba_auto.demo.run_demo`) and ``report``
(the pre-training curvature report of :func:`uba_auto.auto.auto_uba` for your own model).
Every failure the user can cause ends with exit status 2 and one line on stderr, no traceback.

The package, by concern: :mod:`~uba_auto.cli.parser` (the flags and their help),
:mod:`~uba_auto.cli.commands` (one function per command), :mod:`~uba_auto.cli.checks` (flag
checks run before any work) and :mod:`~uba_auto.cli.factories` (the user's factories and loss).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .checks import one_line
from .parser import PROG, build_parser

__all__ = ["PROG", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 2 for a failure the user can fix (one line on stderr), 130 when
        interrupted; argparse's own usage errors exit with 2 through :class:`SystemExit`.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, ImportError, OSError) as err:
        print(f"{PROG} {args.command}: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
