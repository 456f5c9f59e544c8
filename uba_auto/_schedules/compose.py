r"""Schedules as values: :class:`Schedule`, and the pieces every schedule is composed of.

A :class:`Schedule` wraps a ``rate``, a function from a float array of steps to rates (see
:mod:`.arrays`) whose arguments were checked when it was made; calling the schedule checks only
the step. :func:`decay`, :func:`warmup` and :func:`join` build schedules from already-checked
arguments (the public factories in :mod:`.factories` check them first).

Joining follows optax's ``join_schedules``: the piece after ``boundaries[i]`` is evaluated at
``step - boundaries[i]``, its own step count. Unlike optax, the boundary step itself belongs to the
piece that ends there: pieces meet at their boundaries, so joining a new piece at step ``b``
changes nothing up to ``b`` -- what re-shaping a plan mid-run needs -- and a warm-up of ``W`` steps
hands over after step ``W``, where it has reached the peak the decay starts from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .arrays import Steps, as_array, clip01, cos, finish, where
from .shapes import DecayShape

__all__ = ["WARMUP_SHAPES", "Schedule", "decay", "decay_progress", "join", "warmup"]


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule with its arguments checked: a pure function of the step.

    ``schedule(step)`` takes a Python number, a NumPy array or a tensor of steps (>= 0) and returns
    the rate in the same kind, as the functions of :data:`~uba_auto.schedules.SCHEDULES` do.
    Make one with :func:`~uba_auto.schedules.make_schedule`,
    :func:`~uba_auto.schedules.decay_schedule`, :func:`~uba_auto.schedules.warmup_schedule` or
    :func:`~uba_auto.schedules.join_schedules`.

    Attributes:
        rate: the unchecked inner function, from a float ``ndarray`` or ``Tensor`` of steps to
            rates of the same kind and shape. A piece of a join is evaluated at every step of
            the joined schedule, so ``rate`` must also accept negative steps (their values are
            not used).
    """

    rate: Callable[[Any], Any] = field(repr=False)

    def __call__(self, step: Steps) -> Steps:
        t, kind = as_array(step)
        return finish(self.rate(t), kind)


def decay_progress(step: Any, steps: int, entry: float = 0.0) -> Any:
    r"""Progress :math:`s = s_0 + (1 - s_0)\,k / n`, clipped to [0, 1], at step ``k`` of a decay of
    ``n = steps`` steps entered at progress :math:`s_0 = ` ``entry``.

    Works on numbers and on float arrays alike (a number gives a NumPy scalar).

    Example:
        >>> float(decay_progress(5, 10, entry=0.5))  # halfway through the remaining half
        0.75
    """
    return clip01(entry + (1.0 - entry) * step / steps)


def decay(
    steps: int, shape: DecayShape, lr_max: float, lr_min: float, entry: float = 0.0
) -> Schedule:
    """``lr_max * f(s) + lr_min * (1 - f(s))`` with ``s = decay_progress(step, steps, entry)``.

    The convex combination (rather than ``lr_min + (lr_max - lr_min) f``) makes both ends exact in
    floating point: ``f = 1`` gives ``lr_max`` and ``f = 0`` gives ``lr_min`` bit for bit. Past
    ``steps`` the progress is 1, so the rate holds ``lr_max * f(1) + lr_min * (1 - f(1))``.
    """

    def rate(k: Any) -> Any:
        f = shape(decay_progress(k, steps, entry))
        return lr_max * f + lr_min * (1.0 - f)

    return Schedule(rate)


WARMUP_SHAPES: dict[str, Callable[[Any], Any]] = {
    "linear": lambda p: p,
    "cosine": lambda p: (1.0 - cos(math.pi * p)) / 2.0,
}


def warmup(steps: int, start_lr: float, end_lr: float, shape: str = "linear") -> Schedule:
    """From ``start_lr`` at step 0 to ``end_lr`` at step ``steps``, then ``end_lr`` held."""
    ramp = WARMUP_SHAPES[shape]

    def rate(t: Any) -> Any:
        p = ramp(clip01(t / steps))
        return start_lr * (1.0 - p) + end_lr * p

    return Schedule(rate)


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``schedules[0]`` up to ``boundaries[0]``, then ``schedules[i + 1]`` evaluated at
    ``step - boundaries[i]`` for the steps after ``boundaries[i]`` (up to the next boundary)."""
    first, rest = schedules[0], list(zip(boundaries, schedules[1:], strict=True))

    def rate(t: Any) -> Any:
        out = first.rate(t)
        for boundary, piece in rest:
            out = where(t > boundary, piece.rate(t - boundary), out)
        return out

    return Schedule(rate)
