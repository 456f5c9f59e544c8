"""Checks of the command line's flags, run before any work, with messages that name the flag."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "FIGURE_SUFFIXES",
    "check_folder",
    "check_matplotlib",
    "check_minimum",
    "check_output",
    "check_phis",
    "one_line",
]

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
"""The figure formats ``--out`` of ``plot`` and ``--plot`` of ``report`` accept."""


def one_line(text: str) -> str:
    """``text`` on one line (messages of torch and of users' code may span several).

    Example:
        >>> one_line("shape mismatch\\n  expected 4\\n")
        'shape mismatch; expected 4'
    """
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def check_minimum(flag: str, value: int, minimum: int, why: str = "") -> None:
    """Raise unless the integer ``value`` of ``flag`` is at least ``minimum``.

    Example:
        >>> check_minimum("--budget", 1, 2, "optimizer steps per run")
        Traceback (most recent call last):
        ValueError: --budget must be >= 2 (optimizer steps per run), got 1
    """
    if value < minimum:
        note = f" ({why})" if why else ""
        raise ValueError(f"{flag} must be >= {minimum}{note}, got {value}")


def check_phis(phis: Sequence[float]) -> None:
    """Raise unless every ``--phi`` value is finite and positive."""
    bad = [p for p in phis if not (math.isfinite(p) and p > 0)]
    if bad:
        raise ValueError(f"--phi values must be finite and > 0, got {bad[0]:g}")


def check_output(path: str, flag: str, suffixes: Sequence[str]) -> Path:
    """The output file ``path`` of ``flag``, checked before any work: its suffix, and that its
    folder is a folder that exists or can be created, and is writable."""
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        allowed = (
            ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
        )
        raise ValueError(f"{flag} must end in {allowed}, got {path!r}")
    check_folder(out.parent, flag)
    return out


def check_folder(folder: Path, flag: str) -> None:
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


def check_matplotlib(flag: str) -> None:
    """Raise :class:`ImportError` if ``flag`` asks for a figure and matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            f'{flag} needs matplotlib, which is not installed; pip install "uba-auto[plot]"'
        ) from None
