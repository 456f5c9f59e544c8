r"""The numbers a κ→φ link reads that are computed from measurements (see :mod:`uba_auto.phi`).

The condition number of the minibatch sharpness band and of the budget band (the stability edge
is in :mod:`uba_auto.phi._stability`).
"""

from __future__ import annotations

import math

from .._validation import check_positive_finite


def minibatch_condition_number(curvature_noise: float) -> float:
    r""":math:`\kappa_{mb} = (1 + \sigma)/(1 - \sigma)`, ``inf`` for :math:`\sigma \ge 1`.

    Example:
        >>> minibatch_condition_number(0.0), round(minibatch_condition_number(0.2), 6)
        (1.0, 1.5)
    """
    if not (isinstance(curvature_noise, (int, float)) and curvature_noise >= 0):
        raise ValueError(f"curvature_noise must be a number >= 0, got {curvature_noise!r}")
    if curvature_noise >= 1:
        return math.inf
    return (1.0 + curvature_noise) / (1.0 - curvature_noise)


def budget_condition_number(
    lambda_max: float, lambda_min_positive: float | None, peak_lr: float, budget: int
) -> float:
    r"""κ of the curvature band a peak rate ``peak_lr`` can act on in ``budget`` steps.

    .. math:: \kappa_T = \lambda_{\max} / \max(\lambda_{+},\ 1/(\eta T))

    Example:
        >>> budget_condition_number(2.0, 1e-6, 0.1, 1000)  # floor 1/(0.1 * 1000) = 0.01
        200.0
    """
    if not lambda_max > 0:
        raise ValueError(f"lambda_max must be > 0 to form a condition number, got {lambda_max!r}")
    peak_lr = check_positive_finite("peak_lr", peak_lr)
    floor = 1.0 / (peak_lr * budget)
    if lambda_min_positive is not None and lambda_min_positive > 0:
        floor = max(floor, lambda_min_positive)
    return lambda_max / floor
