"""Step arrays: one implementation of each schedule serves numbers, NumPy arrays and tensors.

A schedule's inner function (its ``rate``) works on a float array, an ``ndarray`` or a ``Tensor``;
:func:`as_array` checks a user's step and makes that array, :func:`finish` turns the result back
into the kind the user passed.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["Steps", "as_array", "clip01", "cos", "finish", "sin", "where"]

Steps = Union[int, float, np.ndarray, Tensor]  # noqa: UP007 (a runtime alias on Python 3.10)


def as_array(step: Steps, name: str = "step") -> tuple[Any, str]:
    """Check ``step`` and convert it to a float array; also return the kind to give back.

    Tensors become float64 (float32 on MPS, which has no float64) on their own device, arrays and
    numbers float64 NumPy arrays. Steps must be real, not NaN and >= 0.
    """
    if isinstance(step, Tensor):
        if step.is_complex() or step.dtype == torch.bool:
            raise TypeError(f"{name} must hold real step numbers, got a {step.dtype} tensor")
        dtype = torch.float32 if step.device.type == "mps" else torch.float64
        arr, kind = step.to(dtype), "tensor"
    elif isinstance(step, np.ndarray):
        if step.dtype.kind not in "iuf":
            raise TypeError(f"{name} must hold real step numbers, got an array of {step.dtype}")
        arr, kind = step.astype(np.float64), "ndarray"
    elif isinstance(step, (int, float, np.integer, np.floating)) and not isinstance(step, bool):
        arr, kind = np.asarray(float(step)), "scalar"
    else:
        raise TypeError(
            f"{name} must be an int, a float, a numpy array or a torch tensor, "
            f"got {type(step).__name__}"
        )
    bad_nan = bool(torch.isnan(arr).any()) if kind == "tensor" else bool(np.isnan(arr).any())
    if bad_nan:
        raise ValueError(f"{name} must not contain NaN")
    negative = bool((arr < 0).any())
    if negative:
        first = float(arr[arr < 0].reshape(-1)[0])
        raise ValueError(f"{name} must be >= 0, got {first:g}; steps count from 0")
    return arr, kind


def finish(arr: Any, kind: str) -> Steps:
    """The result in the kind :func:`as_array` recorded: a ``float`` for a number."""
    return float(arr) if kind == "scalar" else arr


def where(cond: Any, a: Any, b: Any) -> Any:
    if isinstance(cond, Tensor):
        return torch.where(cond, a, b)
    return np.where(cond, a, b)


def cos(x: Any) -> Any:
    return torch.cos(x) if isinstance(x, Tensor) else np.cos(x)


def sin(x: Any) -> Any:
    return torch.sin(x) if isinstance(x, Tensor) else np.sin(x)


def clip01(x: Any) -> Any:
    return torch.clamp(x, 0.0, 1.0) if isinstance(x, Tensor) else np.clip(x, 0.0, 1.0)
