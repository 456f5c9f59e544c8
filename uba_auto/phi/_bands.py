r"""The numbers a κ→φ link reads that are computed from measurements (see :mod:`uba_auto.phi`).

The condition number of the minibatch sharpness band and of the budget band, and the distance of a
peak rate to the stability edge of ``torch.optim.SGD``.
"""

from __future__ import annotations

import math

from .._validation import check_positive_finite


def stability_limit(momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    r"""The largest stable :math:`\eta\lambda` of PyTorch's SGD on a quadratic of curvature λ.

    Heavy ball (``torch.optim.SGD(momentum=β, dampening=d)``): the step is
    :math:`v \leftarrow \beta v + (1-d) g,\ \theta \leftarrow \theta - \eta v`, stable for
    :math:`\eta\lambda < 2(1+\beta)/(1-d)`. Nesterov (``nesterov=True``, no dampening):
    :math:`\theta \leftarrow \theta - \eta(g + \beta v)`, stable for
    :math:`\eta\lambda < 2(1+\beta)/(1+2\beta)`. Plain SGD (β = 0, whatever the dampening): 2.

    Example:
        >>> stability_limit(), stability_limit(0.9), round(stability_limit(0.9, nesterov=True), 4)
        (2.0, 3.8, 1.3571)
    """
    for name, value in (("momentum", momentum), ("dampening", dampening)):
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if momentum == 0:
        return 2.0  # torch.optim.SGD ignores dampening (and Nesterov) without momentum
    if nesterov:
        if dampening:
            raise ValueError("nesterov momentum requires dampening=0 (as torch.optim.SGD does)")
        return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
    return 2.0 * (1.0 + momentum) / (1.0 - dampening)


def stability_fraction(
    lambda_max: float, peak_lr: float, limit: float, weight_decay: float = 0.0
) -> float:
    r"""The peak rate as a fraction of the stability limit: :math:`e = \eta(\lambda_{\max} +
    w)/\ell`.

    ``limit`` is :func:`stability_limit` of the optimizer and ``weight_decay`` :math:`w` its
    (coupled, as in ``torch.optim.SGD``) weight decay, which adds :math:`w` to every curvature;
    :math:`e \ge 1` means the top eigen-direction is unstable at the peak rate.

    Example:
        >>> round(stability_fraction(2.0, 0.1, stability_limit(0.9)), 6)  # 0.2 / 3.8
        0.052632
    """
    if not (isinstance(lambda_max, (int, float)) and math.isfinite(lambda_max) and lambda_max > 0):
        raise ValueError(f"lambda_max must be finite and > 0, got {lambda_max!r}")
    peak_lr = check_positive_finite("peak_lr", peak_lr)
    limit = check_positive_finite("limit", limit)
    if not (isinstance(weight_decay, (int, float)) and 0.0 <= weight_decay < math.inf):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    return peak_lr * (lambda_max + weight_decay) / limit


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
