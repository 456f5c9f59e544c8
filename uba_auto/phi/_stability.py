r"""The stability edge of an optimizer: the largest stable :math:`\eta\lambda` on a quadratic.

:func:`optimizer_stability` reads a ``torch.optim`` optimizer (the param group with the largest
peak rate η) and returns an :class:`OptimizerStability`: the limit on :math:`\eta\lambda`, and which
λ it bounds: the top eigenvalue of the Hessian H (plus SGD's coupled weight decay) for SGD, of the
preconditioned curvature :math:`A = P^{-1/2} H P^{-1/2}` for the adaptive optimizers, ``P`` the
diagonal their update divides by and any coupled weight decay w inside the operator
(:math:`P^{-1/2}(H + wI)P^{-1/2}`). :func:`stability_limit` is its ``.limit`` (or, given numbers,
SGD's limit as before) and :func:`stability_fraction` the peak rate as a share of a limit.

Derivation. Take :math:`f(\theta) = \tfrac12 \theta^\top H \theta` and hold ``P`` frozen (the
second moments move slowly late in training; this is the frozen-preconditioner threshold of Cohen
et al. 2022, "Adaptive gradient methods at the edge of stability"). In :math:`y = P^{1/2}\theta`
the preconditioned gradient is :math:`P^{-1/2}g = Ay`, a scalar decay :math:`\theta \leftarrow
c\theta` stays :math:`y \leftarrow cy`, so each eigen-direction of A (eigenvalue a, q = ηa) obeys
its own linear recurrence. Its characteristic polynomial :math:`z^2 + a_1 z + a_0` has both roots
in the unit disc (Schur stable) iff the Jury conditions hold:

.. math:: |a_0| < 1, \qquad 1 + a_1 + a_0 > 0, \qquad 1 - a_1 + a_0 > 0.

* SGD (``torch.optim.SGD``, P = I, a = λ + w): heavy ball :math:`v \leftarrow \beta v + (1-d)g,\
  \theta \leftarrow \theta - \eta v` gives :math:`z^2 - (1 + \beta - (1-d)q)z + \beta`; the third
  condition binds: :math:`q < 2(1+\beta)/(1-d)` (plain SGD, β = 0: q < 2, torch ignores the
  dampening). Nesterov (:math:`\theta \leftarrow \theta - \eta(g + \beta v)`, v the updated
  buffer, d = 0) gives :math:`z^2 - (1 + \beta - (1+\beta)q)z + \beta(1-q)`:
  :math:`q < 2(1+\beta)/(1+2\beta)` (the first condition, q < 1 + 1/β, is looser). The first
  step's buffer (``v = g``) is a transient.
* Adam, AdamW (``torch.optim.Adam``/``AdamW``, :math:`P = \sqrt{\hat v} + \epsilon`, the maximum
  of :math:`\hat v` with ``amsgrad``): torch applies the decoupled decay before the step, with the
  gradient taken at the undecayed point: :math:`m \leftarrow \beta_1 m + (1-\beta_1)g,\ \theta
  \leftarrow (1-\eta w)\theta - \eta P^{-1}m`. With c = 1 − ηw:
  :math:`z^2 - (c + \beta_1 - (1-\beta_1)q)z + c\beta_1`; :math:`1 + a_1 + a_0 = (1-\beta_1)(\eta w
  + q) > 0`, :math:`|c\beta_1| < 1` for :math:`0 \le \eta w < 2`, and the third condition binds:
  :math:`q < (1+\beta_1)(2-\eta w)/(1-\beta_1)` (38 for β₁ = 0.9, w = 0). The limit depends on η
  itself and is evaluated at the peak rate, where it binds (:math:`\eta(a + w(1+\beta_1)/(1-
  \beta_1))` grows with η). The bias correction of m (a step :math:`\eta/(1-\beta_1^t)`) is
  ignored: this is the limit once :math:`\beta_1^t \approx 0`. Coupled decay (Adam's
  ``weight_decay`` without ``decoupled_weight_decay``) is a gradient term, inside the operator.
* Adagrad (:math:`P = \sqrt{\text{sum}} + \epsilon`): :math:`\theta \leftarrow \theta -
  \text{clr}\,P^{-1}g`, :math:`\text{clr} = \eta/(1 + s\,\text{lr\_decay})` at the next step (s the
  steps already taken, the group's fewest): z = 1 − clr·a, so :math:`\eta a < 2(1 + s\,
  \text{lr\_decay})`.
* RMSprop (:math:`P = \sqrt{\text{square\_avg}} + \epsilon`, centered
  :math:`\sqrt{\text{square\_avg} - \text{grad\_avg}^2} + \epsilon`): momentum μ is a heavy ball on
  the preconditioned gradient (:math:`b \leftarrow \mu b + P^{-1}g,\ \theta \leftarrow \theta -
  \eta b`), the SGD case with d = 0: :math:`q < 2(1+\mu)`; q < 2 without momentum.

Subclasses of these classes are accepted (``isinstance``) on the assumption that they keep the
parent's update. Everything else (NAdam, RAdam, Adamax, Adadelta, ASGD, Rprop, LBFGS, SparseAdam,
and optimizers outside ``torch.optim``) is refused, as are ``maximize=True`` and settings outside
the derivation, with a ``ValueError`` that names them.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer

from .._optim import group_peaks
from .._validation import check_fraction, check_nonnegative_finite, check_positive_finite

__all__ = [
    "SUGGESTED_SHARE",
    "OptimizerStability",
    "optimizer_stability",
    "stability_fraction",
    "stability_limit",
]

SUGGESTED_SHARE = types.MappingProxyType({"hessian": 0.1, "preconditioned": 8.0})
r"""The share of the stability limit at which ``auto_uba(peak_lr="suggest")`` sets the peak rate,
by the curvature the optimizer's limit is on: ``"hessian"`` for SGD, ``"preconditioned"`` for
the adaptive optimizers. Each is the geometric mean (rounded) of the share
:math:`e^* = \eta^*\lambda/\ell` at which the peak tuned for cosine annealing sat at
initialisation (``benchmarks/suggest_share.py``; BENCHMARKS.md, §3): for SGD over the 10
calibration cells of the φ study (0.097; the tuned shares spread over 0.004–1.9, and the held-out
cells' over 0.0005–2), for AdamW over the two budgets of ``gpt_adamw``, the one AdamW task (8.0:
its tuned peaks sit 6–11x above Adam's limit at initialisation, and a 5 % warm-up carries the run
there; the sharpness AdamW sees falls to 0.2–0.6 of its limit by the end of the warm-up; measured
with the pre-training estimate of P clipped as the loop clips, ``grad_clip=1``: without it the
estimated sharpness is ~2.6x lower and the suggestion as much higher). ``auto_uba`` caps the
adaptive share at 1 when there is no warm-up. Neither share is validated beyond these tasks: a
suggestion is a starting point for a peak-rate search."""

_SUPPORTED = "torch.optim.SGD, Adam, AdamW, Adagrad and RMSprop (and their subclasses)"


@dataclass(frozen=True)
class OptimizerStability:
    r"""The stability edge of an optimizer's param group, from :func:`optimizer_stability`.

    The top eigen-direction is stable while :math:`\eta(\lambda + w) <` ``limit``, λ the top
    eigenvalue of ``curvature`` and w = ``weight_decay``.

    Attributes:
        optimizer: the optimizer's class name, e.g. ``"AdamW"``.
        limit: the largest stable :math:`\eta\lambda`, η the group's peak rate (its
            ``initial_lr`` once a scheduler has run, else ``lr``).
        curvature: ``"hessian"`` (SGD: λ of H) or ``"preconditioned"`` (adaptive optimizers: λ of
            :math:`P^{-1/2} H P^{-1/2}`, any coupled weight decay inside that operator).
        weight_decay: coupled weight decay to add to λ before comparing (SGD's); 0.0 for the
            adaptive optimizers.
        group: the index of the param group read, the one with the largest peak rate (the first).
        formula: one line with the formula, its numbers and its assumptions, for a report.
        peak_lr: the peak rate η read from that group (AdamW's limit depends on it).
        decoupled_decay: AdamW's decoupled weight decay w of that group (0.0 otherwise), which
            makes the limit depend on the rate: :math:`k(2 - \eta w)`, see :meth:`limit_at`.
    """

    optimizer: str
    limit: float
    curvature: str
    weight_decay: float
    group: int
    formula: str
    peak_lr: float
    decoupled_decay: float = 0.0

    def limit_at(self, lr: float) -> float:
        """The limit at another peak rate ``lr`` (only AdamW's depends on it).

        Raises:
            ValueError: if ``lr * decoupled_decay >= 2``: the decay alone diverges there, so no
                rate is stable (as :func:`optimizer_stability` says for the group's own rate).

        Example:
            >>> import torch
            >>> opt = torch.optim.AdamW([torch.zeros(1)], lr=1e-3, weight_decay=0.1)
            >>> s = optimizer_stability(opt)
            >>> round(s.limit, 6), round(s.limit_at(1.0), 6)  # 19 (2 - 1e-4), 19 (2 - 0.1)
            (37.9981, 36.1)
        """
        lr = check_positive_finite("lr", lr)
        if not self.decoupled_decay:
            return self.limit
        if lr * self.decoupled_decay >= 2:
            raise ValueError(
                f"lr * weight_decay = {lr * self.decoupled_decay:g} >= 2 for {self.optimizer}'s "
                f"param group {self.group} at lr={lr:g}: the decoupled decay theta <- theta * "
                "(1 - lr * weight_decay) alone diverges, so no rate is stable; lower the peak "
                "rate or weight_decay"
            )
        per_unit = self.limit / (2.0 - self.peak_lr * self.decoupled_decay)
        return per_unit * (2.0 - lr * self.decoupled_decay)

    def rate_for_share(self, share: float, sharpness: float) -> float:
        r"""The rate η at which :math:`\eta(\lambda + w) = ` ``share`` × the limit at η, λ =
        ``sharpness`` (what :func:`~uba_auto.auto_uba`'s ``peak_lr="suggest"`` sets). For AdamW
        the limit is :math:`k(2 - \eta w_d)`, so :math:`\eta = 2 s k/(\lambda + s k w_d)`.

        Example:
            >>> import torch
            >>> s = optimizer_stability(torch.optim.SGD([torch.zeros(1)], lr=0.1, momentum=0.9))
            >>> round(s.rate_for_share(0.5, 1.9), 6)  # 0.5 * 3.8 / 1.9
            1.0
        """
        share = check_positive_finite("share", share)
        sharpness = check_positive_finite("sharpness", sharpness)
        if not self.decoupled_decay:
            return share * self.limit / (sharpness + self.weight_decay)
        per_unit = self.limit / (2.0 - self.peak_lr * self.decoupled_decay)
        return 2.0 * share * per_unit / (sharpness + share * per_unit * self.decoupled_decay)


def optimizer_stability(optimizer: Any) -> OptimizerStability:
    r"""The stability limit on :math:`\eta\lambda` of ``optimizer`` (derivation: module docs).

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam``, ``AdamW``, ``Adagrad`` or ``RMSprop`` (or a
            subclass); never changed.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
        ValueError: no limit is derived for its class, or its group's settings lie outside the
            derivation (``maximize=True``, Nesterov with dampening, AdamW with lr·w ≥ 2, ...).

    Example:
        >>> import torch
        >>> p = [torch.zeros(2)]
        >>> s = optimizer_stability(torch.optim.AdamW(p, lr=0.1, weight_decay=1.0))
        >>> s.curvature, round(s.limit, 6), s.weight_decay  # 19 * (2 - 0.1 * 1.0)
        ('preconditioned', 36.1, 0.0)
        >>> optimizer_stability(torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4)).limit
        3.8
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; pass the "
            "optimizer that trains the model (e.g. torch.optim.AdamW(model.parameters()))"
        )
    derive = next((rule for cls, rule in _RULES if isinstance(optimizer, cls)), None)
    if derive is None:
        cls = type(optimizer)
        raise ValueError(
            f"no stability limit is derived for {cls.__module__}.{cls.__qualname__}: limits exist "
            f"for {_SUPPORTED}. Everything that does not read the limit works without it: "
            "probe_curvature, the report's curvature, and the 'gated' (default), 'calibrated' "
            "and 'chebyshev' links; the 'gated-edge' link falls back to 'gated' and says so"
        )
    peaks = group_peaks(optimizer)
    index = peaks.index(max(peaks))
    group = optimizer.param_groups[index]
    if group.get("maximize", False):
        raise ValueError(
            f"optimizer.param_groups[{index}]['maximize'] is True: the stability limit is derived "
            "for minimisation of the probed loss; construct the optimizer with maximize=False"
        )
    derived = derive(optimizer, group, f"optimizer.param_groups[{index}]", peaks[index])
    name = type(optimizer).__name__
    return OptimizerStability(
        optimizer=name,
        limit=derived.limit,
        curvature=derived.curvature,
        weight_decay=derived.weight_decay,
        group=index,
        formula=f"{name}: {derived.formula}",
        peak_lr=peaks[index],
        decoupled_decay=derived.decoupled_decay,
    )


def _number(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)  # torch accepts tensor hyper-parameters
    return value


def _unit(name: str, value: Any) -> float:
    return check_fraction(name, _number(value), closed_low=True, closed_high=False)


def _nonnegative(name: str, value: Any) -> float:
    return check_nonnegative_finite(name, _number(value))


def _heavy_ball_limit(momentum: float, dampening: float, nesterov: bool) -> float:
    if momentum == 0:
        return 2.0  # torch.optim.SGD ignores dampening (and Nesterov) without momentum
    if nesterov:
        return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
    return 2.0 * (1.0 + momentum) / (1.0 - dampening)


class _Derived(NamedTuple):
    limit: float
    curvature: str
    weight_decay: float
    formula: str  # without the class name
    decoupled_decay: float = 0.0


def _sgd(optimizer: Any, group: dict, key: str, lr: float) -> _Derived:
    momentum = _unit(f"{key}['momentum']", group.get("momentum", 0.0))
    dampening = _unit(f"{key}['dampening']", group.get("dampening", 0.0))
    decay = _weight_decay(group, key)
    nesterov = bool(group.get("nesterov", False))
    if nesterov and momentum and dampening:
        raise ValueError(
            f"{key} has nesterov=True with dampening={dampening!r}: the Nesterov limit is derived "
            "(and torch.optim.SGD is built) for dampening=0; set dampening to 0"
        )
    limit = _heavy_ball_limit(momentum, dampening, nesterov)
    if momentum == 0:
        rule = "2 (gradient descent)"
    elif nesterov:
        rule = f"2(1+b)/(1+2b) = {limit:.6g} (Nesterov, b={momentum:g})"
    else:
        rule = f"2(1+b)/(1-d) = {limit:.6g} (heavy ball, b={momentum:g}, d={dampening:g})"
    formula = (
        f"eta*(lambda_max(H) + w) < {rule}; w={decay:g} coupled weight decay; quadratic model, "
        "constant rate"
    )
    return _Derived(limit, "hessian", decay, formula)


def _weight_decay(group: dict, key: str) -> float:
    return _nonnegative(f"{key}['weight_decay']", group.get("weight_decay", 0.0))


def _preconditioned(limit: float, rule: str, moment: str, decay: float) -> _Derived:
    """A limit on the preconditioned curvature; a coupled weight decay is a gradient term, so it
    sits inside the operator."""
    operator = f"P^-1/2 (H + {decay:g} I) P^-1/2" if decay else "P^-1/2 H P^-1/2"
    formula = f"eta*lambda_max({operator}) < {rule}; P = sqrt({moment})+eps frozen"
    return _Derived(limit, "preconditioned", 0.0, formula)


def _adam(optimizer: Any, group: dict, key: str, lr: float) -> _Derived:
    beta1 = _unit(f"{key}['betas'][0]", group.get("betas", (0.9, 0.999))[0])
    decay = _weight_decay(group, key)
    default = isinstance(optimizer, torch.optim.AdamW)  # older torch: no such group key
    decoupled = bool(group.get("decoupled_weight_decay", default))
    shrink = lr * decay if decoupled else 0.0
    if shrink >= 2:
        raise ValueError(
            f"{key} has lr * weight_decay = {shrink!r} >= 2: the decoupled decay "
            "theta <- theta * (1 - lr * weight_decay) alone diverges, so no rate is stable; "
            "lower lr or weight_decay"
        )
    limit = (1.0 + beta1) * (2.0 - shrink) / (1.0 - beta1)
    rule = (
        f"(1+b1)(2-eta*w)/(1-b1) = {limit:.6g} (b1={beta1:g}, eta={lr:g}, decoupled "
        f"w={decay if decoupled else 0.0:g})"
    )
    moment = "max(v_hat)" if group.get("amsgrad", False) else "v_hat"
    derived = _preconditioned(limit, rule, moment, 0.0 if decoupled else decay)
    note = ", bias correction of m ignored (the limit once b1^t ~ 0)"
    return derived._replace(
        formula=derived.formula + note, decoupled_decay=decay if decoupled else 0.0
    )


def _adagrad(optimizer: Any, group: dict, key: str, lr: float) -> _Derived:
    lr_decay = _nonnegative(f"{key}['lr_decay']", group.get("lr_decay", 0.0))
    # Steps already taken (0 before the first); the fewest in the group is the most restrictive.
    # state.get: optimizer.state is a defaultdict, and indexing it would add entries.
    states = [optimizer.state.get(p, {}) for p in group["params"]]
    taken = min((float(state["step"]) for state in states if "step" in state), default=0.0)
    limit = 2.0 * (1.0 + taken * lr_decay)
    rule = (
        f"2(1 + s*lr_decay) = {limit:.6g} (s={taken:g} steps taken, lr_decay={lr_decay:g}: "
        "the next step's rate)"
    )
    return _preconditioned(limit, rule, "sum", _weight_decay(group, key))


def _rmsprop(optimizer: Any, group: dict, key: str, lr: float) -> _Derived:
    momentum = _unit(f"{key}['momentum']", group.get("momentum", 0.0))
    limit = 2.0 * (1.0 + momentum)
    rule = f"2(1+mu) = {limit:.6g} (heavy ball, mu={momentum:g})" if momentum else "2"
    moment = "square_avg - grad_avg^2" if group.get("centered", False) else "square_avg"
    return _preconditioned(limit, rule, moment, _weight_decay(group, key))


# Matched with isinstance, in order; AdamW is a subclass of Adam and shares its rule.
_RULES: tuple[tuple[type, Callable[[Any, dict, str, float], _Derived]], ...] = (
    (torch.optim.SGD, _sgd),
    (torch.optim.Adam, _adam),
    (torch.optim.Adagrad, _adagrad),
    (torch.optim.RMSprop, _rmsprop),
)


def stability_limit(momentum: Any = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    r"""The largest stable :math:`\eta\lambda` of an optimizer, or of PyTorch's SGD given numbers.

    Given an optimizer: ``optimizer_stability(optimizer).limit`` (:func:`optimizer_stability`
    says which λ it bounds). Given numbers, ``torch.optim.SGD`` on a quadratic of curvature λ:
    heavy ball (``momentum=β, dampening=d``, :math:`v \leftarrow \beta v + (1-d) g,\ \theta
    \leftarrow \theta - \eta v`) is stable for :math:`\eta\lambda < 2(1+\beta)/(1-d)`; Nesterov
    (``nesterov=True``, no dampening, :math:`\theta \leftarrow \theta - \eta(g + \beta v)`) for
    :math:`\eta\lambda < 2(1+\beta)/(1+2\beta)`; plain SGD (β = 0, whatever the dampening) for 2.

    Example:
        >>> stability_limit(), stability_limit(0.9), round(stability_limit(0.9, nesterov=True), 4)
        (2.0, 3.8, 1.3571)
        >>> import torch
        >>> round(stability_limit(torch.optim.Adam([torch.zeros(1)], lr=1e-3)), 9)  # 2(1.9)/0.1
        38.0
    """
    if isinstance(momentum, Optimizer):
        if dampening != 0.0 or nesterov is not False:
            raise TypeError(
                "stability_limit(optimizer) reads dampening and nesterov from the optimizer, got "
                f"dampening={dampening!r}, nesterov={nesterov!r}; pass the optimizer alone"
            )
        return optimizer_stability(momentum).limit
    for name, value in (("momentum", momentum), ("dampening", dampening)):
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            kind = " or a torch.optim.Optimizer" if name == "momentum" else ""
            raise ValueError(f"{name} must be a number in [0, 1){kind}, got {value!r}")
    if momentum and nesterov and dampening:
        raise ValueError("nesterov momentum requires dampening=0 (as torch.optim.SGD does)")
    return _heavy_ball_limit(momentum, dampening, nesterov)


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
