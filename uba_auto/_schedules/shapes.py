r"""Decay shapes: the remaining fraction :math:`f(s)` of ``lr_max - lr_min`` at progress ``s``.

A shape maps progress ``s`` in [0, 1] (an ``ndarray`` or a ``Tensor``, already clipped) to
:math:`f(s)` in [0, 1] with :math:`f(0) = 1`, in the same kind. :data:`SHAPES` makes one per
schedule name from that schedule's own arguments, checked once, with the messages of the public
functions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

from .._validation import check_fraction, check_positive_finite
from .arrays import clip01, cos, sin, where

__all__ = ["SHAPES", "DecayShape", "cosine_fraction", "uba_fraction"]

DecayShape = Callable[[Any], Any]


def uba_fraction(s: Any, phi: float) -> Any:
    r""":math:`2c^2 / (2c^2 + \varphi \sin^2(\pi s/2))`, :math:`c = \cos(\pi s/2)`: no term
    cancels, so both ends are exact."""
    c = cos((math.pi / 2.0) * s)
    # cos(pi/2) is 6e-17 in floating point, not 0: force the exact end value.
    c = where(s >= 1.0, 0.0 * c, c)
    sn = sin((math.pi / 2.0) * s)
    two_c2 = 2.0 * c * c
    return two_c2 / (two_c2 + phi * sn * sn)


def cosine_fraction(s: Any) -> Any:
    # (1 + cos(pi s)) / 2 = cos^2(pi s / 2): the squared form has no cancellation near s = 1.
    c = cos((math.pi / 2.0) * s)
    c = where(s >= 1.0, 0.0 * c, c)
    return c * c


def _linear_fraction(s: Any) -> Any:
    return 1.0 - s


def _uba_shape(*, phi: float) -> DecayShape:
    phi = check_positive_finite("phi", phi, hint="; phi = 2 is cosine annealing")
    return lambda s: uba_fraction(s, phi)


def _constant_shape() -> DecayShape:
    return lambda s: 0.0 * s + 1.0


def _step_shape(*, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1) -> DecayShape:
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
            f = where(s >= m, f * gamma, f)
        return f

    return shape


_WSD_SHAPES: dict[str, DecayShape] = {
    "linear": _linear_fraction,
    "cosine": cosine_fraction,
    "1-sqrt": lambda p: 1.0 - p**0.5,
}


def _wsd_shape(*, decay_fraction: float = 0.2, decay_shape: str = "linear") -> DecayShape:
    decay_fraction = check_fraction(
        "decay_fraction", decay_fraction, closed_low=False, closed_high=True
    )
    if decay_shape not in _WSD_SHAPES:
        raise ValueError(f"decay_shape must be one of {sorted(_WSD_SHAPES)}, got {decay_shape!r}")
    inner = _WSD_SHAPES[decay_shape]
    # Progress through the decay window, written so that s = 1 gives exactly 1.
    return lambda s: inner(clip01(1.0 - (1.0 - s) / decay_fraction))


def _rex_shape(*, beta: float = 0.5) -> DecayShape:
    beta = check_fraction("beta", beta, closed_low=True, closed_high=False)
    return lambda s: (1.0 - s) / (1.0 - beta * s)


SHAPES: dict[str, Callable[..., DecayShape]] = {
    "uba": _uba_shape,
    "constant": _constant_shape,
    "cosine": lambda: cosine_fraction,
    "linear": lambda: _linear_fraction,
    "step": _step_shape,
    "wsd": _wsd_shape,
    "rex": _rex_shape,
    # OneCycle's own arguments shape its warm-up (factories._onecycle_warmup); it decays as cosine.
    "onecycle": lambda: cosine_fraction,
}
"""Each schedule's decay shape, made from that schedule's keyword arguments (checked)."""
