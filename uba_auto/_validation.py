"""Argument checks of the public API: each error names the argument, the value and the fix."""

from __future__ import annotations

import math
import numbers
from typing import Any


def _is_real(value: Any) -> bool:
    # bool is an int subclass; True as a step count or a rate is almost always a bug.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_finite(name: str, value: Any, *, hint: str = "") -> float:
    """Return ``float(value)`` if it is a real number in (0, inf), else raise naming ``name``."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number > 0, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}{hint}")
    return value


def check_nonnegative_finite(name: str, value: Any, *, hint: str = "") -> float:
    """Return ``float(value)`` if it is a real number in [0, inf), else raise naming ``name``."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number >= 0, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}{hint}")
    return value


def check_int(name: str, value: Any, *, minimum: int, hint: str = "") -> int:
    """Return ``int(value)`` if it is an integer >= ``minimum``, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{hint}")
    return value


def check_fraction(name: str, value: Any, *, closed_low: bool, closed_high: bool) -> float:
    """Return ``float(value)`` if it lies in the unit interval with the given closedness."""
    lo, hi = ("[" if closed_low else "("), ("]" if closed_high else ")")
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number in {lo}0, 1{hi}, got {value!r}")
    value = float(value)
    ok_low = value >= 0 if closed_low else value > 0
    ok_high = value <= 1 if closed_high else value < 1
    if not (math.isfinite(value) and ok_low and ok_high):
        raise ValueError(f"{name} must lie in {lo}0, 1{hi}, got {value!r}")
    return value
