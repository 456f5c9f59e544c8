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

from collections.abc import Callable, Sequence

from ._schedules.arrays import Steps, as_array, clip01, finish
from ._schedules.compose import Schedule, decay_progress
from ._schedules.factories import (
    build_schedule,
    check_schedule_name,
    decay_schedule,
    join_schedules,
    make_schedule,
    uba_reentry,
    warmup_schedule,
)
from ._schedules.shapes import uba_fraction
from ._validation import check_positive_finite

__all__ = [
    "SCHEDULES",
    "Schedule",
    "Steps",
    "constant_lr",
    "cosine_lr",
    "decay_progress",
    "decay_schedule",
    "get_schedule",
    "join_schedules",
    "linear_lr",
    "make_schedule",
    "onecycle_lr",
    "rex_lr",
    "step_lr",
    "uba_factor",
    "uba_lr",
    "uba_reentry",
    "warmup_schedule",
    "wsd_lr",
]


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
    s, kind = as_array(progress, "progress")
    return finish(uba_fraction(clip01(s), phi), kind)


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
    schedule = build_schedule(
        "uba", total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr, phi=phi
    )
    return schedule(step)


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
    return build_schedule("constant", total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr)(
        step
    )


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
    return build_schedule("cosine", total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr)(
        step
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
    return build_schedule("linear", total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr)(
        step
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
    schedule = build_schedule(
        "step",
        total_steps,
        lr_max,
        lr_min,
        warmup_steps,
        warmup_start_lr,
        milestones=milestones,
        gamma=gamma,
    )
    return schedule(step)


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
    schedule = build_schedule(
        "wsd",
        total_steps,
        lr_max,
        lr_min,
        warmup_steps,
        warmup_start_lr,
        decay_fraction=decay_fraction,
        decay_shape=decay_shape,
    )
    return schedule(step)


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
    schedule = build_schedule(
        "rex", total_steps, lr_max, lr_min, warmup_steps, warmup_start_lr, beta=beta
    )
    return schedule(step)


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
    schedule = build_schedule(
        "onecycle",
        total_steps,
        lr_max,
        lr_min,
        warmup_steps,
        warmup_start_lr,
        pct_start=pct_start,
        div_factor=div_factor,
    )
    return schedule(step)


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
    return SCHEDULES[check_schedule_name(name)]
