r"""From measured curvature to the UBA shape parameter φ.

Four links, kept apart because they have different standing. In one line each: ``"gated"`` (the
default) is cosine unless the probe sees no minibatch noise; ``"gated-edge"`` adds a second gate,
φ = 1 when an SGD peak rate sits far below the stability edge (fitted; it failed on a task it had
not seen, so it is not the default); ``"calibrated"`` maps the noise to φ by a power law fitted to
our study; ``"chebyshev"`` is the theory-only φ = 2κ. How each fared in training, on the five
calibration tasks and on tasks kept out of every fit, is in BENCHMARKS.md
(``benchmarks/phi_validation.py``).

**The gated link** (``link="gated"``, the default; a guard of ours, not a fitted map). With σ the
curvature noise (below),

.. math::

    \varphi = 2 \min\Big(1, \frac{\kappa_{mb} - 1}{\kappa_g - 1}\Big), \qquad
    \kappa_g = \frac{1 + \sigma_g}{1 - \sigma_g},\ \sigma_g = 0.05
    \ (:data:`GATE_NOISE`),

clamped to ``[phi_min, phi_max]``: cosine annealing (φ = 2) whenever the minibatches disagree about
the curvature by 5 % or more, and a rate held high for longer, down to φ = 0.25, as the training
becomes noise-free (full-batch gradient descent has σ = 0). Why: in our study cosine was within
1 % of the best φ in 13 of 18 task × budget cells, and the one quantity that said "deviate" was
the absence of gradient noise (least squares, where φ = 0.25 beats cosine by 3 %; out of sample it
held for full-batch logistic regression, −3 %, but not for a full-batch MLP with momentum, where
φ = 0.25 ended 1.5 % worse than cosine on its short budget). Every
minibatch statistic we tried, at initialisation or along the run (curvature noise, the SGD noise
floor, the distance to the stability edge, a noisy quadratic model, the held-out trend), failed to
say which minibatch tasks want a smaller or larger φ on tasks it was not fitted to (BENCHMARKS.md,
§2), and the calibrated link below, which tries, lost up to 208 % against cosine on a task at the
edge of its stable range of rates. The gate σ_g = 0.05 lies below every minibatch task we measured
(σ ≥ 0.067 per seed) and is not fitted.

**The gated-edge link** (``link="gated-edge"``; an empirical rule of ours, one threshold fitted,
not the default). The gated link, then a second gate on how far the peak rate η is below the rate
at which SGD on a quadratic becomes unstable along the top eigenvector. With :math:`\ell` the
stability limit of the optimizer (:func:`stability_limit`: :math:`\eta\lambda < 2(1+\beta)` for
heavy-ball momentum β) and

.. math:: e = \eta\,\lambda_{\max} / \ell

(:func:`stability_fraction`, at initialisation),

φ is capped at :data:`EDGE_PHI` = 1 when :math:`e <` :data:`EDGE_FRACTION` = 0.038: the idea is
that a rate that far below the edge is not held back by the curvature, so the run is
progress-limited and gains from keeping the rate high for longer. The threshold is the geometric
midpoint between the two groups of minibatch cells of our calibration study (best φ ≤ 1 at
:math:`e \le 0.030`, best φ ≥ 2 at :math:`e \ge 0.048`), so on those cells it is fitted, not
tested. It was fixed before new tasks were tried. On the two swept out-of-sample tasks it set φ = 1
on two of four cells, within 0.5 % of the best φ on both, and missed the same cell as the gated
link; but on the demo's task (a CNN that over-fits 500 digits, far below the edge at
:math:`e \approx 0.006`) φ = 1 ended 7–12 % worse than cosine in held-out loss on each of three
seeds: a small :math:`e` at initialisation does not tell a progress-limited run from an
over-fitting one. It is kept selectable so that this can be checked. The gate reads the optimizer:
it applies to ``torch.optim.SGD`` only (adaptive optimizers have no such edge in λ_max of the
Hessian) and is off, saying so in the reason, when no SGD optimizer is known. :math:`e` is measured
once, by the pre-training probe (the sharpness changes during training, and the threshold is set
on its value at initialisation); re-estimations re-apply the noise gate with the initial
:math:`e`.

**The theory-only link** (``link="chebyshev"``; our derivation, not the paper's statement). For
gradient descent on a quadratic whose curvature lies in :math:`[\lambda_{lo}, \lambda_{hi}]`, the
step sizes minimising the worst-case error after :math:`T` steps are the Chebyshev steps, and that
sequence is exactly UBA with

.. math:: \varphi = 2\kappa, \qquad \kappa = \lambda_{hi} / \lambda_{lo}.

For a network we take the band the schedule can act on within the budget:
:math:`\lambda_{hi} = \lambda_{\max}` and :math:`\lambda_{lo} = \max(\lambda_{+}, 1/(\eta T))`,
where :math:`\lambda_{+}` is the smallest positive eigenvalue the probe resolved and
:math:`1/(\eta T)` the smallest curvature a peak rate :math:`\eta` can make progress on in
:math:`T` steps (PAPER.md's first candidate). On the five calibration tasks of our study this κ
is between 24 and 2000 (``benchmarks/phi_sweep.py``), so φ = 2κ always hits the upper clamp, and on
the out-of-sample diabetes MLPs it is 3–7: the link decays too early (within 1 % of the best φ in 3
of 18 cells). It is kept selectable so that this can be checked, not recommended.

**The calibrated link** (``link="calibrated"``; an empirical calibration of ours, the default
before the gated link measured better).
The quantity that tracked the best φ of our sweep is how much the sharpness a single SGD step
sees fluctuates across minibatches. With :math:`v` the top eigenvector and
:math:`s_b = v^\top H_b v` the curvature of minibatch :math:`b` along it, the probe reports
:math:`\sigma = \operatorname{std}_b(s_b)/\lambda_{\max}` (``curvature_noise``), and we turn it into
the condition number of the band of sharpness the steps see,

.. math::

    \kappa_{mb} = \frac{1 + \sigma}{1 - \sigma} \quad (\ge 1;\ \infty \text{ for } \sigma \ge 1),

then map it with a power law fitted on our validation study
(``benchmarks/calibrate_phi.py``; constants below):

.. math:: \varphi = 2 \left(\frac{\kappa_{mb} - 1}{\kappa_c - 1}\right)^{p}.

Full-batch-like curvature (:math:`\kappa_{mb} \to 1`) gives small φ: keep the rate high and drop
it late (towards warm-up-stable-decay), the best choice when there is little gradient noise to
anneal. Noisy curvature gives large φ: decay early. :math:`\kappa_{mb} = \kappa_c` is cosine.
This direction (more spread, larger φ) is the opposite of reading φ = 2κ with κ the Hessian's
condition number, as PAPER.md's first sweep already suggested.

All links clamp φ to ``[phi_min, phi_max]`` (default [0.25, 16], the range our sweep covered:
outside it the calibration has no data) and say so when they do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._validation import check_positive_finite
from .probe import CurvatureEstimate

__all__ = [
    "EDGE_FRACTION",
    "EDGE_PHI",
    "GATE_NOISE",
    "KAPPA_COSINE",
    "LINKS",
    "PHI_MAX",
    "PHI_MIN",
    "SENSITIVITY",
    "PhiChoice",
    "budget_condition_number",
    "choose_phi",
    "minibatch_condition_number",
    "phi_from_condition_number",
    "stability_fraction",
    "stability_limit",
]

LINKS = ("gated", "gated-edge", "calibrated", "chebyshev")
PHI_MIN = 0.25
PHI_MAX = 16.0
FALLBACK_PHI = 2.0
"""φ used when no κ can be formed (no positive curvature): cosine annealing."""

# Fitted by `python benchmarks/calibrate_phi.py` (see BENCHMARKS.md for the data and the fit).
KAPPA_COSINE = 1.175
"""The minibatch condition number at which the calibrated link picks cosine (φ = 2)."""
SENSITIVITY = 0.5
"""The power ``p`` of the calibrated link."""
GATE_NOISE = 0.05
"""The curvature noise at and above which the gated link picks cosine (φ = 2): below every
minibatch task of our study (σ ≥ 0.067 per seed), above full-batch training (σ = 0)."""
EDGE_FRACTION = 0.038
"""The distance to the stability edge, ``peak_lr * lambda_max / stability_limit`` at
initialisation, below which the gated-edge link caps φ at :data:`EDGE_PHI` (fitted: the geometric
midpoint of 0.030 and 0.048, see the module docs)."""
EDGE_PHI = 1.0
"""The gated-edge link's φ for a peak rate far below the stability edge."""


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


def phi_from_condition_number(
    kappa: float,
    *,
    link: str = "gated",
    phi_min: float = PHI_MIN,
    phi_max: float = PHI_MAX,
    edge_fraction: float | None = None,
) -> float:
    r"""The κ→φ link, clamped to ``[phi_min, phi_max]``.

    ``link="gated"`` (default): :math:`\varphi = 2\min(1, (\kappa - 1)/(\kappa_g - 1))` with
    :math:`\kappa_g` the minibatch condition number at :data:`GATE_NOISE`.
    ``link="gated-edge"``: the same, capped at :data:`EDGE_PHI` when ``edge_fraction``
    (:func:`stability_fraction`) is below :data:`EDGE_FRACTION`; with ``edge_fraction=None``
    (unknown) it equals the gated link.
    ``link="chebyshev"``: :math:`\varphi = 2\kappa` (κ of a curvature band, see
    :func:`budget_condition_number`). ``link="calibrated"``:
    :math:`\varphi = 2((\kappa - 1)/(\kappa_c - 1))^p` with κ the minibatch condition number
    (:func:`minibatch_condition_number`), :data:`KAPPA_COSINE` and :data:`SENSITIVITY`.

    Args:
        kappa: a condition number, >= 1 (``inf`` maps to ``phi_max``).
        link: one of :data:`LINKS`.
        phi_min, phi_max: the clamp.
        edge_fraction: the peak rate's distance to the stability edge (gated-edge link only).

    Example:
        >>> phi_from_condition_number(3.0, link="chebyshev")
        6.0
        >>> phi_from_condition_number(KAPPA_COSINE, link="calibrated")
        2.0
        >>> phi_from_condition_number(1.0), phi_from_condition_number(1.5)  # gated
        (0.25, 2.0)
        >>> phi_from_condition_number(1.5, link="gated-edge", edge_fraction=0.01)  # far below
        1.0
        >>> phi_from_condition_number(float("inf"), link="calibrated")
        16.0
    """
    return _unclamped_and_clamped(kappa, link, phi_min, phi_max, edge_fraction)[1]


def _unclamped_and_clamped(
    kappa: float, link: str, phi_min: float, phi_max: float, edge_fraction: float | None = None
) -> tuple[float, float]:
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    if not isinstance(kappa, (int, float)) or math.isnan(kappa) or kappa < 1:
        raise ValueError(f"kappa must be a condition number >= 1, got {kappa!r}")
    phi_min = check_positive_finite("phi_min", phi_min)
    phi_max = check_positive_finite("phi_max", phi_max)
    if phi_min > phi_max:
        raise ValueError(f"phi_min must be <= phi_max, got {phi_min} > {phi_max}")
    if edge_fraction is not None and not (
        isinstance(edge_fraction, (int, float)) and edge_fraction >= 0
    ):
        raise ValueError(f"edge_fraction must be a number >= 0 or None, got {edge_fraction!r}")
    if link == "chebyshev":
        raw = 2.0 * kappa
    elif link in ("gated", "gated-edge"):
        gate = minibatch_condition_number(GATE_NOISE)
        raw = 2.0 * min(1.0, (kappa - 1.0) / (gate - 1.0))
        if link == "gated-edge" and edge_fraction is not None and edge_fraction < EDGE_FRACTION:
            raw = min(raw, EDGE_PHI)
    elif math.isinf(kappa):
        raw = math.inf
    else:
        raw = 2.0 * ((kappa - 1.0) / (KAPPA_COSINE - 1.0)) ** SENSITIVITY
    return raw, min(max(raw, phi_min), phi_max)


@dataclass(frozen=True)
class PhiChoice:
    """φ and how it was reached (what the report prints)."""

    phi: float
    phi_unclamped: float
    clamped: bool
    kappa: float | None
    kappa_kind: str
    link: str
    reason: str
    warnings: tuple[str, ...] = field(default=())
    edge_fraction: float | None = None


def choose_phi(
    estimate: CurvatureEstimate,
    *,
    peak_lr: float | None,
    budget: int,
    link: str = "gated",
    phi_min: float = PHI_MIN,
    phi_max: float = PHI_MAX,
    edge_fraction: float | None = None,
) -> PhiChoice:
    """Choose φ from a :class:`~uba_auto.probe.CurvatureEstimate` (see the module docstring).

    Never raises for a measured spectrum it cannot use: no positive curvature falls back to
    cosine (φ = 2) with a warning in the result.

    Args:
        estimate: the probe's result.
        peak_lr: the run's peak learning rate (used by the Chebyshev link).
        budget: steps left in the run.
        link: one of :data:`LINKS`.
        phi_min, phi_max: the clamp.
        edge_fraction: for the gated-edge link, the peak rate's distance to the stability edge at
            initialisation (:func:`stability_fraction`); ``None`` when the optimizer is unknown or
            not SGD, which turns the edge gate off (said in the reason).
    """
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    notes: list[str] = []
    lam = estimate.lambda_max
    if not (math.isfinite(lam) and lam > 0):
        notes.append(
            f"no positive curvature measured (lambda_max = {lam:.4g}): fell back to phi = "
            f"{FALLBACK_PHI:g} (cosine annealing). The model may sit at a saddle or maximum; "
            "probe later in training or with more batches"
        )
        return PhiChoice(
            FALLBACK_PHI,
            FALLBACK_PHI,
            False,
            None,
            "none (fallback)",
            link,
            "fallback: no positive curvature",
            tuple(notes),
        )
    if link == "chebyshev":
        if peak_lr is None:
            raise ValueError("link='chebyshev' needs peak_lr (the run's peak learning rate)")
        kappa = budget_condition_number(lam, estimate.lambda_min_positive, peak_lr, budget)
        if kappa < 1:
            notes.append(
                f"the curvature band is empty at this learning rate: 1/(peak_lr * budget) = "
                f"{1 / (peak_lr * budget):.3g} exceeds lambda_max = {lam:.3g}, so kappa is taken "
                "as 1"
            )
            kappa = 1.0
        kind = "budget band: lambda_max / max(smallest positive, 1/(peak_lr * budget))"
        why = (
            f"phi = 2 kappa (Chebyshev min-max on the band, theory-only link), kappa = {kappa:.4g}"
        )
    else:
        noise = estimate.curvature_noise
        if noise is None and estimate.num_batches > 1:
            notes.append(
                f"curvature noise not available from method={estimate.method!r}: fell back to "
                f"phi = {FALLBACK_PHI:g} (cosine annealing); use method='lanczos' for the "
                f"{link} link"
            )
            return PhiChoice(
                FALLBACK_PHI,
                FALLBACK_PHI,
                False,
                None,
                "none (fallback)",
                link,
                "fallback: curvature noise not measured",
                tuple(notes),
                edge_fraction if link == "gated-edge" else None,
            )
        if noise is None:
            noise = 0.0
            notes.append(
                "one batch probed: curvature noise across minibatches not measurable, treated as "
                "full-batch (kappa_mb = 1). For minibatch training probe >= 2 batches "
                "(num_batches), or this phi is too small"
            )
        kappa = minibatch_condition_number(noise)
        kind = "minibatch sharpness band: (1 + sigma)/(1 - sigma), sigma = curvature noise"
        if link in ("gated", "gated-edge"):
            why = f"{link} link: curvature noise sigma = {noise:.3g} " + (
                f">= {GATE_NOISE:g}: minibatch noise, cosine (phi = 2)"
                if noise >= GATE_NOISE
                else f"< {GATE_NOISE:g}: (nearly) noise-free, keep the rate high longer; "
                f"phi = 2 (kappa_mb - 1)/(kappa_gate - 1)"
            )
            if link == "gated-edge":
                noise_phi = _unclamped_and_clamped(kappa, "gated", phi_min, phi_max)[0]
                why += "; then " + _edge_reason(edge_fraction, noise_phi)
        else:
            why = (
                f"calibrated link: curvature noise sigma = {noise:.3g} -> kappa_mb = {kappa:.4g}; "
                f"phi = 2 ((kappa_mb - 1)/({KAPPA_COSINE:g} - 1))^{SENSITIVITY:g}"
            )
        if estimate.num_batches < 4:
            notes.append(
                f"curvature noise from only {estimate.num_batches} batch(es): phi is uncertain; "
                "probe more batches (num_batches >= 8 recommended)"
            )
    edge = edge_fraction if link == "gated-edge" else None
    raw, phi = _unclamped_and_clamped(kappa, link, phi_min, phi_max, edge)
    clamped = phi != raw
    if clamped:
        notes.append(
            f"phi {raw:.4g} clamped to {phi:g} (range [{phi_min:g}, {phi_max:g}], where the "
            "link was validated)"
        )
    return PhiChoice(phi, raw, clamped, kappa, kind, link, why, tuple(notes), edge)


def _edge_reason(edge_fraction: float | None, noise_phi: float) -> str:
    if edge_fraction is None:
        return (
            "edge gate off: no stability limit known (it is read from a torch.optim.SGD "
            "optimizer with momentum < 1, given to auto_uba or make_scheduler)"
        )
    head = f"the peak rate is {edge_fraction:.3g} of the optimizer's stability limit at init"
    if edge_fraction >= EDGE_FRACTION:
        return f"{head} (>= {EDGE_FRACTION:g}): no edge cap"
    if noise_phi <= EDGE_PHI:
        return f"{head} (< {EDGE_FRACTION:g}): the edge cap {EDGE_PHI:g} is above that phi already"
    return (
        f"{head} (< {EDGE_FRACTION:g}): far below the edge, keep the rate high longer, phi "
        f"capped at {EDGE_PHI:g}"
    )
