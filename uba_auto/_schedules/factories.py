r"""Checked factories: validate a schedule's arguments once, return a :class:`.Schedule`.

Every schedule of :data:`~uba_auto.schedules.SCHEDULES` is the composition

.. math::

    \text{warm-up}(W) \;\Vert_W\; \text{decay}(T - W),

a warm-up of ``W`` steps joined at step ``W`` to the decay of its shape over the remaining
``T - W`` steps (:func:`build_schedule`; no warm-up piece when ``W = 0``). A UBA plan re-shaped by
:meth:`~uba_auto.scheduler.UBAScheduler.set_phi` at step :math:`t_0` is that schedule joined at
:math:`t_0` to a UBA decay over :math:`T - t_0` steps entered at the progress :func:`uba_reentry`
gives, so every rate comes from the same few functions.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Sequence
from typing import Any

from .._validation import (
    check_fraction,
    check_int,
    check_nonnegative_finite,
    check_positive_finite,
)
from . import compose
from .compose import WARMUP_SHAPES, Schedule
from .shapes import SHAPES, DecayShape, cosine_fraction

__all__ = [
    "build_schedule",
    "check_budget",
    "check_schedule_name",
    "decay_schedule",
    "join_schedules",
    "make_schedule",
    "uba_reentry",
    "warmup_schedule",
]


def check_schedule_name(name: Any) -> str:
    """``name`` if it names a schedule, else a ``ValueError`` listing the valid names."""
    if not isinstance(name, str) or name not in SHAPES:
        raise ValueError(f"unknown schedule {name!r}; valid names are {sorted(SHAPES)}")
    return name


def _check_rates(lr_max: Any, lr_min: Any) -> tuple[float, float]:
    lr_max = check_positive_finite("lr_max", lr_max)
    lr_min = check_nonnegative_finite("lr_min", lr_min)
    if lr_min > lr_max:
        raise ValueError(
            f"lr_min must be <= lr_max, got lr_min={lr_min!r} > lr_max={lr_max!r}; "
            "the schedule anneals from lr_max down to lr_min"
        )
    return lr_max, lr_min


def check_budget(total_steps: Any, warmup_steps: Any) -> tuple[int, int]:
    """``total_steps`` (>= 1) and ``warmup_steps`` (>= 0) as ints, with a decay phase left."""
    total_steps = check_int("total_steps", total_steps, minimum=1)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
    if warmup_steps >= total_steps:
        raise ValueError(
            f"total_steps must be > warmup_steps, got total_steps={total_steps} and "
            f"warmup_steps={warmup_steps}; the decay phase needs at least one step"
        )
    return total_steps, warmup_steps


def _check_common(
    total_steps: Any, lr_max: Any, lr_min: Any, warmup_steps: Any, warmup_start_lr: Any
) -> tuple[int, float, float, int, float]:
    total_steps, warmup_steps = check_budget(total_steps, warmup_steps)
    lr_max, lr_min = _check_rates(lr_max, lr_min)
    warmup_start_lr = check_nonnegative_finite("warmup_start_lr", warmup_start_lr)
    if warmup_start_lr > lr_max:
        raise ValueError(
            f"warmup_start_lr must lie in [0, lr_max={lr_max!r}], got {warmup_start_lr!r}"
        )
    return total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr


def _shape(name: str, kwargs: dict[str, Any]) -> DecayShape:
    """The decay shape of schedule ``name`` from its own arguments, naming any that do not fit."""
    params = inspect.signature(SHAPES[name]).parameters
    unknown = sorted(set(kwargs) - set(params))
    missing = [p for p, spec in params.items() if spec.default is spec.empty and p not in kwargs]
    if unknown or missing:
        own = sorted(params) or "none"
        what = f"got unexpected {unknown}" if unknown else f"needs {missing}"
        raise TypeError(f"schedule {name!r} {what}; its own arguments are {own}")
    return SHAPES[name](**kwargs)


def _onecycle_warmup(
    total: Any, lr_max: Any, warmup: tuple, *, pct_start: float = 0.3, div_factor: float = 25.0
) -> tuple[Any, Any]:
    """OneCycle's rise is its warm-up: ``(warmup_steps, warmup_start_lr)``, where ``None`` means
    ``round(pct_start * T)`` steps from ``lr_max / div_factor``."""
    warmup_steps, warmup_start_lr = warmup
    total = check_int("total_steps", total, minimum=1)
    if warmup_steps is None:
        pct_start = check_fraction("pct_start", pct_start, closed_low=False, closed_high=False)
        warmup_steps = round(pct_start * total)
    if warmup_start_lr is None:
        div_factor = check_positive_finite("div_factor", div_factor)
        if div_factor < 1:
            raise ValueError(f"div_factor must be >= 1, got {div_factor!r}")
        warmup_start_lr = check_positive_finite("lr_max", lr_max) / div_factor
    return warmup_steps, warmup_start_lr


def build_schedule(
    name: str,
    total_steps: Any,
    lr_max: Any,
    lr_min: Any,
    warmup_steps: Any,
    warmup_start_lr: Any,
    **kwargs: Any,
) -> Schedule:
    """Schedule ``name`` (a checked name) with the arguments of its public function, checked in
    that function's order (its own arguments first) and with its messages."""
    warmup_shape = "linear"
    if name == "onecycle":
        warmup = (warmup_steps, warmup_start_lr)
        warmup_steps, warmup_start_lr = _onecycle_warmup(total_steps, lr_max, warmup, **kwargs)
        shape, warmup_shape = cosine_fraction, "cosine"
    else:
        shape = _shape(name, kwargs)
    total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr = _check_common(
        total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr
    )
    decay = compose.decay(total_steps - warmup_steps, shape, lr_max, lr_min)
    if warmup_steps == 0:
        return decay
    ramp = compose.warmup(warmup_steps, warmup_start_lr, lr_max, warmup_shape)
    return compose.join([ramp, decay], [warmup_steps])


def make_schedule(
    name: str, total_steps: int, *, lr_max: float, lr_min: float = 0.0, **kwargs: Any
) -> Schedule:
    """The schedule ``name`` of :data:`~uba_auto.schedules.SCHEDULES`, checked once.

    ``make_schedule(name, T, **kw)(step) == get_schedule(name)(step, T, **kw)`` bit for bit, for
    every kind of ``step``; the arguments are checked here, with the same messages, so a bad one
    fails before the first step.

    Args:
        name: a name in :data:`~uba_auto.schedules.SCHEDULES`.
        total_steps, lr_max, lr_min: as for the schedule functions.
        **kwargs: ``warmup_steps`` and ``warmup_start_lr`` (``None`` or left out: the schedule's
            default, none or OneCycle's ``pct_start`` rise from ``lr_max / div_factor``), and the
            schedule's own arguments (``phi`` for ``"uba"``, ``milestones`` for ``"step"``...).

    Example:
        >>> schedule = make_schedule("uba", 100, phi=4.0, lr_max=0.1)
        >>> round(schedule(50), 12)  # 0.1 * 2 / (2 + phi)
        0.033333333333
    """
    check_schedule_name(name)
    warmup_steps = kwargs.pop("warmup_steps", None)
    warmup_start_lr = kwargs.pop("warmup_start_lr", None)
    if name != "onecycle":
        warmup_steps = 0 if warmup_steps is None else warmup_steps
        warmup_start_lr = 0.0 if warmup_start_lr is None else warmup_start_lr
    return build_schedule(
        name, total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr, **kwargs
    )


def decay_schedule(
    name: str, steps: int, *, lr_max: float, lr_min: float = 0.0, entry: float = 0.0, **kwargs: Any
) -> Schedule:
    r"""The decay of schedule ``name`` over ``steps`` steps, entered at progress ``entry``.

    .. math::

        \eta_k = \eta_{\max} f(s_k) + \eta_{\min} (1 - f(s_k)), \qquad
        s_k = \min\bigl(1,\; s_0 + (1 - s_0)\,k / n\bigr)

    with ``f`` the schedule's remaining fraction (:func:`~uba_auto.schedules.uba_factor` for
    ``"uba"``), :math:`n` = ``steps`` and :math:`s_0` = ``entry``: the rest of the curve from
    progress :math:`s_0` on, stretched over ``steps`` steps. With ``entry = 0`` this is the decay
    phase of the schedule itself.

    Example:
        >>> d = decay_schedule("linear", 10, lr_max=1.0, entry=0.5)
        >>> d(0), d(5), d(10)
        (0.5, 0.25, 0.0)
    """
    shape = _shape(check_schedule_name(name), kwargs)
    steps = check_int("steps", steps, minimum=1)
    lr_max, lr_min = _check_rates(lr_max, lr_min)
    entry = check_fraction("entry", entry, closed_low=True, closed_high=True)
    return compose.decay(steps, shape, lr_max, lr_min, entry)


def warmup_schedule(
    steps: int, *, start_lr: float, end_lr: float, shape: str = "linear"
) -> Schedule:
    """A warm-up from ``start_lr`` at step 0 to ``end_lr`` at step ``steps``, then ``end_lr``.

    ``shape`` is ``"linear"`` or ``"cosine"`` (half a cosine, OneCycle's rise).

    Example:
        >>> warmup_schedule(4, start_lr=0.0, end_lr=1.0)(1)
        0.25
    """
    steps = check_int("steps", steps, minimum=1)
    start_lr = check_nonnegative_finite("start_lr", start_lr)
    end_lr = check_nonnegative_finite("end_lr", end_lr)
    if shape not in WARMUP_SHAPES:
        raise ValueError(f"shape must be one of {sorted(WARMUP_SHAPES)}, got {shape!r}")
    return compose.warmup(steps, start_lr, end_lr, shape)


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """One schedule after another: ``schedules[i + 1]`` runs after step ``boundaries[i]``.

    The model is optax's ``join_schedules``: each later schedule is evaluated at its own step
    count, ``step - boundaries[i]``. The boundary step itself still belongs to the schedule that
    ends there, so a schedule joined at ``b`` changes nothing up to and including ``b``.

    Args:
        schedules: :class:`~uba_auto.schedules.Schedule` objects, at least one.
        boundaries: ``len(schedules) - 1`` strictly increasing steps (ints >= 0).

    Example:
        >>> warm = warmup_schedule(10, start_lr=0.0, end_lr=1.0)
        >>> joined = join_schedules([warm, decay_schedule("linear", 90, lr_max=1.0)], [10])
        >>> joined(5), joined(10), joined(55)
        (0.5, 1.0, 0.5)
    """
    schedules, boundaries = list(schedules), list(boundaries)
    for i, schedule in enumerate(schedules):
        if not isinstance(schedule, Schedule):
            raise TypeError(
                f"schedules[{i}] must be a Schedule (from make_schedule, decay_schedule, "
                f"warmup_schedule or join_schedules), got {type(schedule).__name__}"
            )
    if not schedules or len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"join_schedules needs at least one schedule and one boundary fewer than schedules, "
            f"got {len(schedules)} schedules and {len(boundaries)} boundaries"
        )
    marks = [check_int(f"boundaries[{i}]", b, minimum=0) for i, b in enumerate(boundaries)]
    if any(b <= a for a, b in itertools.pairwise(marks)):
        raise ValueError(f"boundaries must be strictly increasing, got {marks!r}")
    return compose.join(schedules, marks) if marks else schedules[0]


def uba_reentry(progress: float, phi: float, new_phi: float) -> float:
    r"""The progress on the UBA curve of ``new_phi`` with the remaining fraction that the curve of
    ``phi`` has at ``progress``: :math:`f_{\varphi'}(s') = f_\varphi(s)`, i.e.

    .. math:: \tan\frac{\pi s'}{2} = \sqrt{\varphi / \varphi'}\,\tan\frac{\pi s}{2}.

    Example:
        >>> round(uba_reentry(0.5, 1.0, 4.0), 12)  # tan(pi s'/2) = 1/2
        0.295167235301
    """
    progress = check_fraction("progress", progress, closed_low=True, closed_high=True)
    phi = check_positive_finite("phi", phi)
    new_phi = check_positive_finite("new_phi", new_phi)
    return (2.0 / math.pi) * math.atan(
        math.sqrt(phi / new_phi) * math.tan(math.pi * progress / 2.0)
    )
