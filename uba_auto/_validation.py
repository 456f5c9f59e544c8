"""Argument checks of the public API: each error names the argument, the value and the fix.

The first group checks plain numbers (every layer); the second the arguments every solver of a
:class:`~uba_auto.linear_operator.SymmetricOperator` shares (operator, start vector, generator,
basis device), so that lanczos, power_iteration, trace and slq raise the same errors.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from uba_auto.linear_operator import SymmetricOperator


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


# Checks shared by the solvers (lanczos, power_iteration, trace, slq).


def check_operator(op: Any) -> SymmetricOperator:
    """Return ``op`` if it is a :class:`SymmetricOperator` on a nonempty space, else raise."""
    if not isinstance(op, SymmetricOperator):
        raise TypeError(
            f"op must be a uba_auto.SymmetricOperator, got {type(op).__name__}; "
            "wrap a matrix with uba_auto.linear_operator.DenseOperator(matrix)"
        )
    if op.size < 1:
        raise ValueError(
            f"op.size must be >= 1, got {op.size}; the operator acts on an empty space"
        )
    return op


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same, an unindexed device matching any index of its type."""
    # torch.device("cuda") and torch.device("cuda:0") name the same device in the default setup.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def resolve_generator(generator: Any, op: SymmetricOperator) -> torch.Generator:
    """The caller's generator, or a fresh one seeded with 0 so that results are reproducible."""
    if generator is None:
        # A private generator: the global RNG state of the caller is never consumed.
        return torch.Generator(device=op.device).manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
            f"use torch.Generator(device={str(op.device)!r}).manual_seed(seed)"
        )
    if not same_device(generator.device, op.device):
        raise ValueError(
            f"generator must live on the operator's device {op.device}, got one on "
            f"{generator.device}; use torch.Generator(device={str(op.device)!r}).manual_seed(seed)"
        )
    return generator


def check_v0(v0: Any, op: SymmetricOperator) -> Tensor:
    """Validate a user starting vector and return it normalised (one host sync, outside loops)."""
    if not isinstance(v0, Tensor):
        raise TypeError(f"v0 must be a torch.Tensor or None, got {type(v0).__name__}")
    if v0.shape != (op.size,):
        raise ValueError(
            f"v0 must have shape ({op.size},) to match op.size, got {tuple(v0.shape)}; "
            "flatten it or pass v0=None for a random start"
        )
    if v0.dtype != op.dtype or not same_device(v0.device, op.device):
        raise ValueError(
            f"v0 must be {op.dtype} on {op.device} like the operator, got {v0.dtype} on "
            f"{v0.device}; use v0.to(device=op.device, dtype=op.dtype)"
        )
    norm = torch.linalg.vector_norm(v0)
    if not bool(torch.isfinite(norm)) or not bool(norm > 0):
        raise ValueError(
            f"v0 must be finite and nonzero, got a vector of norm {float(norm)!r}; "
            "pass v0=None for a random start"
        )
    return v0.detach() / norm.detach()


def check_basis_device(basis_device: Any, op: SymmetricOperator) -> torch.device:
    """Where a Krylov basis is stored: ``basis_device`` as a ``torch.device``, default the op's."""
    if basis_device is None:
        return op.device
    try:
        return torch.device(basis_device)
    except (TypeError, RuntimeError) as err:
        raise ValueError(
            f"basis_device must be None, a torch.device or a device string such as 'cpu', got "
            f"{basis_device!r}"
        ) from err
