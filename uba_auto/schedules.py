r"""Learning-rate schedules as pure functions of an explicit step.

Every schedule here shares one signature style::

    schedule(step, total_steps, *, lr_max, lr_min=0.0, warmup_steps=0, warmup_start_lr=0.0, ...)

and one time convention, the one of :class:`torch.optim.lr_scheduler.CosineAnnealingLR`:

* steps ``0 .. warmup_steps - 1`` are a linear warm-up from ``warmup_start_lr`` towards ``lr_max``;
* the decay phase runs from ``lr_max`` at ``step = warmup_steps`` to its final value at
  ``step = total_steps`` (``lr_min`` for every schedule that anneals; ``step`` and ``constant`` end
  where their shape ends);
* past ``total_steps`` the final value is held (documented, never wrapped around).

If you train for ``N`` optimizer steps with a scheduler stepped once per optimizer step, the
optimizer sees steps ``0 .. N - 1``; pass ``total_steps = N - 1`` if the very last update must use
``lr_min`` exactly, or ``total_steps = N`` for the usual "reaches ``lr_min`` just after the budget"
convention of PyTorch and Hugging Face.

``step`` may be a Python number, a NumPy array or a torch tensor (vectorised, for plots and tests).
The result has the matching kind: ``float``, ``numpy.ndarray`` (float64), or a tensor on the same
device (float64, float32 on MPS).

The UBA schedule (Tang et al., 2025) with progress :math:`s = (t - W)/(T - W)` is

.. math::

    \eta_t = \eta_{\min} + (\eta_{\max} - \eta_{\min})
             \frac{2u}{2\varphi + (2 - \varphi)\,u}, \qquad u = 1 + \cos(\pi s),

equivalently :math:`\eta_{\min} + (\eta_{\max} - \eta_{\min})
/ (1 + \tfrac{\varphi}{2}\tan^2(\pi s/2))`.
We evaluate it in the form :math:`2c^2 / (2c^2 + \varphi\,\sin^2(\pi s / 2))` with
:math:`c = \cos(\pi s/2)`: every term is non-negative, so there is no cancellation near either end,
and both endpoints are exact.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from ._validation import (
    check_fraction,
    check_int,
    check_nonnegative_finite,
    check_positive_finite,
)

__all__ = [
    "SCHEDULES",
    "constant_lr",
    "cosine_lr",
    "get_schedule",
    "linear_lr",
    "onecycle_lr",
    "rex_lr",
    "step_lr",
    "uba_factor",
    "uba_lr",
    "wsd_lr",
]

Steps = Union[int, float, np.ndarray, Tensor]  # noqa: UP007 (a runtime alias on Python 3.10)
# A decay shape maps progress s in [0, 1] (same kind as the input: ndarray or Tensor) to the
# remaining fraction f(s) in [0, 1] of (lr_max - lr_min), with f(0) = 1.
DecayShape = Callable[[Any], Any]


# --------------------------------------------------------------------------------------------------
# Array plumbing: one implementation serves Python numbers, NumPy arrays and torch tensors.


def _as_array(step: Steps, name: str = "step") -> tuple[Any, str]:
    """Convert ``step`` to a float array (ndarray or Tensor) and remember the kind to return."""
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


def _finish(arr: Any, kind: str) -> Steps:
    return float(arr) if kind == "scalar" else arr


def _where(cond: Any, a: Any, b: Any) -> Any:
    if isinstance(cond, Tensor):
        return torch.where(cond, a, b)
    return np.where(cond, a, b)


def _cos(x: Any) -> Any:
    return torch.cos(x) if isinstance(x, Tensor) else np.cos(x)


def _sin(x: Any) -> Any:
    return torch.sin(x) if isinstance(x, Tensor) else np.sin(x)


def _floor(x: Any) -> Any:
    return torch.floor(x) if isinstance(x, Tensor) else np.floor(x)


def _clip01(x: Any) -> Any:
    return torch.clamp(x, 0.0, 1.0) if isinstance(x, Tensor) else np.clip(x, 0.0, 1.0)


def _check_common(
    total_steps: int, lr_max: float, lr_min: float, warmup_steps: int, warmup_start_lr: float
) -> tuple[int, float, float, int, float]:
    total_steps = check_int("total_steps", total_steps, minimum=1)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
    if warmup_steps >= total_steps:
        raise ValueError(
            f"total_steps must be > warmup_steps, got total_steps={total_steps} and "
            f"warmup_steps={warmup_steps}; the decay phase needs at least one step"
        )
    lr_max = check_positive_finite("lr_max", lr_max)
    lr_min = check_nonnegative_finite("lr_min", lr_min)
    if lr_min > lr_max:
        raise ValueError(
            f"lr_min must be <= lr_max, got lr_min={lr_min!r} > lr_max={lr_max!r}; "
            "the schedule anneals from lr_max down to lr_min"
        )
    warmup_start_lr = check_nonnegative_finite("warmup_start_lr", warmup_start_lr)
    if warmup_start_lr > lr_max:
        raise ValueError(
            f"warmup_start_lr must lie in [0, lr_max={lr_max!r}], got {warmup_start_lr!r}"
        )
    return total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr


def _schedule(
    step: Steps,
    total_steps: int,
    lr_max: float,
    lr_min: float,
    warmup_steps: int,
    warmup_start_lr: float,
    shape: DecayShape,
    *,
    warmup_shape: str = "linear",
) -> Steps:
    """Warm-up, then ``lr_max * f(s) + lr_min * (1 - f(s))`` with ``s`` the decay-phase progress.

    The convex combination (rather than ``lr_min + (lr_max - lr_min) f``) makes both endpoints exact
    in floating point: ``f = 1`` gives ``lr_max`` and ``f = 0`` gives ``lr_min`` bit for bit.
    """
    total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr = _check_common(
        total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr
    )
    t, kind = _as_array(step)
    s = _clip01((t - warmup_steps) / (total_steps - warmup_steps))
    f = shape(s)
    lr = lr_max * f + lr_min * (1.0 - f)
    if warmup_steps > 0:
        p = t / warmup_steps
        if warmup_shape == "cosine":
            p = (1.0 - _cos(math.pi * p)) / 2.0
        warm = warmup_start_lr * (1.0 - p) + lr_max * p
        lr = _where(t < warmup_steps, warm, lr)
    return _finish(lr, kind)


# --------------------------------------------------------------------------------------------------
# UBA


def uba_factor(progress: Steps, phi: float) -> Steps:
    r"""The remaining fraction :math:`f_\varphi(s)` of the UBA decay at progress ``s`` in [0, 1].

    .. math::

        f_\varphi(s) = \frac{2\cos^2(\pi s/2)}{2\cos^2(\pi s/2) + \varphi \sin^2(\pi s/2)}
                     = \frac{1}{1 + \tfrac{\varphi}{2}\tan^2(\pi s / 2)}

    :math:`f(0) = 1` and :math:`f(1) = 0` exactly for every :math:`\varphi > 0`; progress past 1 is
    clipped to 1.

    Args:
        progress: ``s``, a number, NumPy array or tensor with values >= 0.
        phi: the UBA shape parameter, finite and > 0.

    Example:
        >>> round(uba_factor(0.5, phi=2.0), 12)  # 2 / (2 + phi) at the midpoint
        0.5
    """
    phi = check_positive_finite("phi", phi)
    s, kind = _as_array(progress, "progress")
    s = _clip01(s)
    c = _cos((math.pi / 2.0) * s)
    # cos(pi/2) is 6e-17 in floating point, not 0: force the exact end value.
    c = _where(s >= 1.0, 0.0 * c, c)
    sn = _sin((math.pi / 2.0) * s)
    two_c2 = 2.0 * c * c
    return _finish(two_c2 / (two_c2 + phi * sn * sn), kind)


def uba_lr(
    step: Steps,
    total_steps: int,
    *,
    phi: float,
    lr_max: float,
    lr_min: float = 0.0,
    warmup_steps: int = 0,
    warmup_start_lr: float = 0.0,
) -> Steps:
    r"""The UBA learning rate at ``step``: linear warm-up, then the UBA curve to ``lr_min``.

    .. math::

        \eta_t = \eta_{\min} + (\eta_{\max} - \eta_{\min})\,
                 \frac{1}{1 + \tfrac{\varphi}{2}\tan^2(\pi s/2)},
        \qquad s = \frac{t - W}{T - W}

    :math:`\varphi = 2` is cosine annealing exactly; small :math:`\varphi` keeps the rate high for
    longer (towards warm-up-stable-decay), large :math:`\varphi` decays early. At mid-decay the
    remaining fraction is :math:`2/(2 + \varphi)`.

    Args:
        step: the step ``t`` (>= 0): int, float, NumPy array or tensor.
        total_steps: ``T``, the step at which the rate reaches ``lr_min`` (int > ``warmup_steps``).
        phi: the UBA shape parameter, finite and > 0.
        lr_max: the peak rate, reached at ``step = warmup_steps``.
        lr_min: the final rate, in ``[0, lr_max]``.
        warmup_steps: ``W``, length of the linear warm-up (0 for none).
        warmup_start_lr: the rate at step 0 when ``warmup_steps > 0``, in ``[0, lr_max]``.

    Returns:
        The rate, of the same kind as ``step`` (see the module docstring).

    Raises:
        ValueError: on ``phi <= 0`` or non-finite, ``total_steps <= warmup_steps``, negative steps,
            ``lr_min > lr_max`` or negative rates.

    Example:
        >>> uba_lr(0, 100, phi=4.0, lr_max=0.1)
        0.1
        >>> round(uba_lr(50, 100, phi=4.0, lr_max=0.1), 12)  # 0.1 * 2 / (2 + 4)
        0.033333333333
        >>> uba_lr(100, 100, phi=4.0, lr_max=0.1, lr_min=0.001)
        0.001
    """
    phi = check_positive_finite("phi", phi, hint="; phi = 2 is cosine annealing")
    return _schedule(
        step,
        total_steps,
        lr_max,
        lr_min,
        warmup_steps,
        warmup_start_lr,
        lambda s: uba_factor(s, phi),
    )


# --------------------------------------------------------------------------------------------------
# Baselines


def constant_lr(
    step: Steps,
    total_steps: int,
    *,
    lr_max: float,
    lr_min: float = 0.0,
    warmup_steps: int = 0,
    warmup_start_lr: float = 0.0,
) -> Steps:
    """A constant rate ``lr_max`` after the warm-up.

    ``lr_min`` is accepted so that every schedule in :data:`SCHEDULES` takes the same arguments; it
    is validated and does not change the rate (a constant schedule never anneals).

    Example:
        >>> constant_lr(7, 10, lr_max=0.5)
        0.5
    """
    return _schedule(
        step, total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr, lambda s: 0.0 * s + 1.0
    )


def _cosine_shape(s: Any) -> Any:
    # (1 + cos(pi s)) / 2 = cos^2(pi s / 2): the squared form has no cancellation near s = 1.
    c = _cos((math.pi / 2.0) * s)
    c = _where(s >= 1.0, 0.0 * c, c)
    return c * c


def cosine_lr(
    step: Steps,
    total_steps: int,
    *,
    lr_max: float,
    lr_min: float = 0.0,
    warmup_steps: int = 0,
    warmup_start_lr: float = 0.0,
) -> Steps:
    r"""Cosine annealing: :math:`\eta_{\min} + (\eta_{\max} - \eta_{\min})(1 + \cos \pi s)/2`.

    Identical to :class:`torch.optim.lr_scheduler.CosineAnnealingLR` with ``T_max = total_steps``
    (when ``warmup_steps = 0``), and to :func:`uba_lr` with ``phi = 2``.

    Example:
        >>> round(cosine_lr(50, 100, lr_max=1.0), 12)
        0.5
    """
    return _schedule(
        step, total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr, _cosine_shape
    )


def linear_lr(
    step: Steps,
    total_steps: int,
    *,
    lr_max: float,
    lr_min: float = 0.0,
    warmup_steps: int = 0,
    warmup_start_lr: float = 0.0,
) -> Steps:
    """Linear decay from ``lr_max`` to ``lr_min`` (Li et al. 2020, "Budgeted training").

    Example:
        >>> linear_lr(25, 100, lr_max=1.0)
        0.75
    """
    return _schedule(
        step, total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr, lambda s: 1.0 - s
    )


def step_lr(
    step: Steps,
    total_steps: int,
    *,
    lr_max: float,
    lr_min: float = 0.0,
    warmup_steps: int = 0,
    warmup_start_lr: float = 0.0,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> Steps:
    r"""Multi-step decay: the rate is multiplied by ``gamma`` at each milestone.

    .. math:: \eta_t = \eta_{\min} + (\eta_{\max} - \eta_{\min})\,\gamma^{k(s)}

    with :math:`k(s)` the number of milestones :math:`\le s`. Milestones are fractions of the decay
    phase (so one setting serves every budget), strictly increasing in (0, 1). The rate does not
    reach ``lr_min`` at the end: it holds :math:`\gamma^{k}` of the way down, the shape of the
    schedule (as in :class:`torch.optim.lr_scheduler.MultiStepLR`).

    Example:
        >>> step_lr(80, 100, lr_max=1.0, milestones=(0.5, 0.75), gamma=0.1)
        0.010000000000000002
    """
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
        raise TypeError(
            f"milestones must be a sequence of fractions in (0, 1), got {type(milestones).__name__}"
        )
    marks = [
        check_fraction(f"milestones[{i}]", m, closed_low=False, closed_high=False)
        for i, m in enumerate(milestones)
    ]
    if any(b <= a for a, b in itertools.pairwise(marks)):
        raise ValueError(f"milestones must be strictly increasing, got {list(milestones)!r}")
    gamma = check_fraction("gamma", gamma, closed_low=False, closed_high=True)

    def shape(s: Any) -> Any:
        # Repeated products rather than gamma**k: pow differs in the last bit between NumPy's
        # vectorised and scalar paths, and a schedule must not depend on how it was called.
        f = 0.0 * s + 1.0
        for m in marks:
            f = _where(s >= m, f * gamma, f)
        return f

    return _schedule(step, total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr, shape)


_WSD_SHAPES: dict[str, DecayShape] = {
    "linear": lambda p: 1.0 - p,
    "cosine": _cosine_shape,
    "1-sqrt": lambda p: 1.0 - p**0.5,
}


def wsd_lr(
    step: Steps,
    total_steps: int,
    *,
    lr_max: float,
    lr_min: float = 0.0,
    warmup_steps: int = 0,
    warmup_start_lr: float = 0.0,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
) -> Steps:
    """Warm-up, stable, decay (Hu et al. 2024): ``lr_max`` until the last ``decay_fraction`` of the
    decay phase, then ``decay_shape`` ("linear", "cosine" or "1-sqrt") down to ``lr_min``.

    Example:
        >>> wsd_lr(70, 100, lr_max=1.0, decay_fraction=0.2)
        1.0
        >>> round(wsd_lr(90, 100, lr_max=1.0, decay_fraction=0.2), 12)
        0.5
    """
    decay_fraction = check_fraction(
        "decay_fraction", decay_fraction, closed_low=False, closed_high=True
    )
    if decay_shape not in _WSD_SHAPES:
        raise ValueError(f"decay_shape must be one of {sorted(_WSD_SHAPES)}, got {decay_shape!r}")
    inner = _WSD_SHAPES[decay_shape]

    def shape(s: Any) -> Any:
        # Progress through the decay window, written so that s = 1 gives exactly 1.
        return inner(_clip01(1.0 - (1.0 - s) / decay_fraction))

    return _schedule(step, total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr, shape)


def rex_lr(
    step: Steps,
    total_steps: int,
    *,
    lr_max: float,
    lr_min: float = 0.0,
    warmup_steps: int = 0,
    warmup_start_lr: float = 0.0,
    beta: float = 0.5,
) -> Steps:
    r"""REX, the reflected-exponential schedule (Chen, Wolfe, Kyrillidis 2022).

    .. math:: f(s) = \frac{1 - s}{1 - \beta s}

    ``beta = 0.5`` is the paper's schedule, :math:`(1-s)/(\tfrac12 + \tfrac12(1-s))`; ``beta = 0``
    is linear decay. ``beta`` must lie in [0, 1).

    Example:
        >>> round(rex_lr(50, 100, lr_max=1.0), 12)  # 0.5 / 0.75
        0.666666666667
    """
    beta = check_fraction("beta", beta, closed_low=True, closed_high=False)
    return _schedule(
        step,
        total_steps,
        lr_max,
        lr_min,
        warmup_steps,
        warmup_start_lr,
        lambda s: (1.0 - s) / (1.0 - beta * s),
    )


def onecycle_lr(
    step: Steps,
    total_steps: int,
    *,
    lr_max: float,
    lr_min: float = 0.0,
    warmup_steps: int | None = None,
    warmup_start_lr: float | None = None,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
) -> Steps:
    """OneCycle (Smith 2018), with cosine phases as :class:`torch.optim.lr_scheduler.OneCycleLR`.

    A cosine rise from ``warmup_start_lr`` to ``lr_max`` over the first ``warmup_steps`` steps,
    then a cosine anneal to ``lr_min`` at ``total_steps``. OneCycle's rise *is* its warm-up, so the
    generic arguments have OneCycle defaults: ``warmup_steps`` defaults to
    ``round(pct_start * total_steps)`` and ``warmup_start_lr`` to ``lr_max / div_factor``.

    Example:
        >>> onecycle_lr(0, 100, lr_max=1.0)
        0.04
        >>> onecycle_lr(30, 100, lr_max=1.0)
        1.0
    """
    total_steps = check_int("total_steps", total_steps, minimum=1)
    if warmup_steps is None:
        pct_start = check_fraction("pct_start", pct_start, closed_low=False, closed_high=False)
        warmup_steps = round(pct_start * total_steps)
    if warmup_start_lr is None:
        div_factor = check_positive_finite("div_factor", div_factor)
        if div_factor < 1:
            raise ValueError(f"div_factor must be >= 1, got {div_factor!r}")
        warmup_start_lr = check_positive_finite("lr_max", lr_max) / div_factor
    return _schedule(
        step,
        total_steps,
        lr_max,
        lr_min,
        warmup_steps,
        warmup_start_lr,
        _cosine_shape,
        warmup_shape="cosine",
    )


SCHEDULES: dict[str, Callable[..., Steps]] = {
    "uba": uba_lr,
    "constant": constant_lr,
    "cosine": cosine_lr,
    "linear": linear_lr,
    "step": step_lr,
    "wsd": wsd_lr,
    "rex": rex_lr,
    "onecycle": onecycle_lr,
}
"""Every schedule by name. All share ``(step, total_steps, *, lr_max, lr_min, warmup_steps,
warmup_start_lr)``; ``uba`` also needs ``phi``."""


def get_schedule(name: str) -> Callable[..., Steps]:
    """Look a schedule up by name in :data:`SCHEDULES`.

    Raises:
        ValueError: for an unknown name, listing the valid ones.

    Example:
        >>> get_schedule("cosine") is cosine_lr
        True
    """
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names are {sorted(SCHEDULES)}")
    return SCHEDULES[name]
