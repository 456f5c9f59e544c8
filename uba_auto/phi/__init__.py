r"""From measured curvature to the UBA shape parameter φ: the κ→φ links.

A link is a pure function of plain numbers: what the probe measured (:class:`LinkInputs`, read
from a :class:`~uba_auto.probe.CurvatureEstimate` in one place, :func:`link_inputs`) and the run's
own numbers (peak rate η, steps left T, the clamp ``[phi_min, phi_max]``, the distance e to the
stability edge) go in, a :class:`PhiChoice` comes out. :data:`LINKS` holds the links by name;
:func:`check_link` validates a name, :func:`choose_phi` applies a link to an estimate, and
:func:`phi_from_condition_number` evaluates a link's curve at a given κ.

A link reads one of two condition numbers. The minibatch sharpness band comes from the curvature
noise :math:`\sigma = \operatorname{std}_b(v^\top H_b v)/\lambda_{\max}` (:math:`v` the top
eigenvector, :math:`H_b` the Hessian of minibatch :math:`b`); the budget band is the curvature a
peak rate η can act on in T steps (:math:`\lambda_{+}` the smallest positive eigenvalue resolved):

.. math::

    \kappa_{mb} = \frac{1 + \sigma}{1 - \sigma}\ (\infty \text{ for } \sigma \ge 1), \qquad
    \kappa_T = \frac{\lambda_{\max}}{\max(\lambda_{+},\ 1/(\eta T))}.

* ``"gated"`` (the default): :math:`\varphi = 2 \min(1, (\kappa_{mb} - 1)/(\kappa_g - 1))`, with
  :math:`\kappa_g` the :math:`\kappa_{mb}` of :math:`\sigma_g` = :data:`GATE_NOISE`: cosine
  (φ = 2) whenever the minibatches disagree about the curvature by :math:`\sigma_g` or more, and a
  rate held high for longer as the training becomes noise-free (full batch: σ = 0).
* ``"gated-edge"``: the gated φ, capped at :data:`EDGE_PHI` when
  :math:`e = \eta(\lambda_{\max} + w)/\ell <` :data:`EDGE_FRACTION` (:func:`stability_fraction`;
  :math:`\ell` the :func:`stability_limit` of ``torch.optim.SGD``, :math:`\eta\lambda < 2(1+\beta)`
  for heavy-ball momentum β, and :math:`w` its weight decay). The caller measures e once, at
  initialisation; without it (no SGD optimizer known) the link is the gated one, and says so.
* ``"hold"``: φ = :data:`HOLD_LINK_PHI` (1/4, the rate held near its peak) for a
  self-stabilising run (:func:`self_stabilising`: an adaptive optimizer, or a normalisation layer
  with weight decay), unless the run has no warm-up and its peak starts at or past the
  optimizer's stability limit (e ≥ :data:`HOLD_EDGE_GUARD`); otherwise the gated φ.
  Pre-registered and tested on tasks kept out of its choice: BENCHMARKS.md, §2.
* ``"calibrated"``: :math:`\varphi = 2 ((\kappa_{mb} - 1)/(\kappa_c - 1))^{p}`, with
  :math:`\kappa_c` = :data:`KAPPA_COSINE` and :math:`p` = :data:`SENSITIVITY` fitted by
  ``benchmarks/calibrate_phi.py``: more spread, larger φ (earlier decay); :math:`\kappa_c` is
  cosine.
* ``"chebyshev"``: :math:`\varphi = 2\kappa_T`. For gradient descent on a quadratic with curvature
  in :math:`[\lambda_{lo}, \lambda_{hi}]`, the step sizes minimising the worst-case error after T
  steps are the Chebyshev steps, and that sequence is UBA with
  :math:`\varphi = 2\lambda_{hi}/\lambda_{lo}`.

Every link clamps φ to ``[phi_min, phi_max]`` (default [0.25, 16]) and says so when it does. No
positive curvature, or no curvature noise from several batches, falls back to cosine annealing
(:data:`FALLBACK_PHI`) with a warning in the result.

The plateau rule (:func:`plateau_decision`, :func:`plateau_check_steps`; driven by
:class:`uba_auto.PlateauCooldown`) is not a link: it decides φ mid-run from a validation loss,
holding φ = 1/32 while the loss improves and switching to cosine at the first plateau or at 40 %
of the budget (:func:`~uba_auto.phi._plateau.cooldown_check_steps`).

How each link fared in training, and why ``"gated"`` is the default while the others are only
selectable: BENCHMARKS.md, §2 (``benchmarks/phi_sweep.py``, ``benchmarks/phi_validation.py``).
"""

from ._bands import budget_condition_number, minibatch_condition_number
from ._hold import ADAPTIVE_OPTIMIZERS, NORMALISERS, self_stabilising
from ._links import (
    EDGE_FRACTION,
    EDGE_PHI,
    FALLBACK_PHI,
    GATE_NOISE,
    HOLD_EDGE_GUARD,
    HOLD_LINK_PHI,
    KAPPA_COSINE,
    LINKS,
    PHI_MAX,
    PHI_MIN,
    SENSITIVITY,
    Link,
    LinkInputs,
    PhiChoice,
    check_link,
    choose_phi,
    link_inputs,
    phi_from_condition_number,
)
from ._plateau import PlateauDecision, plateau_check_steps, plateau_decision
from ._stability import (
    SUGGESTED_SHARE,
    OptimizerStability,
    optimizer_stability,
    stability_fraction,
    stability_limit,
)

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "EDGE_FRACTION",
    "EDGE_PHI",
    "FALLBACK_PHI",
    "GATE_NOISE",
    "HOLD_EDGE_GUARD",
    "HOLD_LINK_PHI",
    "KAPPA_COSINE",
    "LINKS",
    "NORMALISERS",
    "PHI_MAX",
    "PHI_MIN",
    "SENSITIVITY",
    "SUGGESTED_SHARE",
    "Link",
    "LinkInputs",
    "OptimizerStability",
    "PhiChoice",
    "PlateauDecision",
    "budget_condition_number",
    "check_link",
    "choose_phi",
    "link_inputs",
    "minibatch_condition_number",
    "optimizer_stability",
    "phi_from_condition_number",
    "plateau_check_steps",
    "plateau_decision",
    "self_stabilising",
    "stability_fraction",
    "stability_limit",
]
