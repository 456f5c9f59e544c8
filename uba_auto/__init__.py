"""uba-auto: curvature-aware UBA learning-rate schedules for budgeted-iteration training.

The public API, in the order a user meets it:

* schedules as pure functions of the step: :func:`uba_lr` and the baselines in :data:`SCHEDULES`;
* PyTorch schedulers: :class:`UBAScheduler` (with :meth:`UBAScheduler.set_phi`) and
  :class:`BudgetScheduler` for any baseline, which warn once (:class:`PastBudgetWarning`) when
  stepped past their budget;
* plotting: :func:`plot_schedules` (needs the ``plot`` extra);
* the product in one call: :func:`auto_uba` returning an :class:`AutoUBA` (φ, the
  :class:`CurvatureReport`, the scheduler, re-estimation), with the κ→φ link
  :func:`phi_from_condition_number` and the optimizer's stability edge (:func:`stability_limit`,
  :func:`optimizer_stability` returning an :class:`OptimizerStability`, :func:`stability_fraction`);
* φ from a validation loss while training: :class:`PlateauCooldown` holds the rate while the
  validation loss improves and switches to a cosine at the first plateau or at 40 % of the budget
  (opt-in; BENCHMARKS.md §2 has where it wins and where it loses);
* inside ``transformers.Trainer`` or PyTorch Lightning, with exact checkpoint resume:
  :mod:`uba_auto.integrations` (not imported here; its callbacks need the ``integrations`` extra);
* curvature probing: :func:`probe_curvature` returning a :class:`CurvatureEstimate`; under
  ``torch.distributed`` it probes the global batch, identically on every rank, and raises
  :class:`DistributedProbeError` on every rank when one fails;
* the layers under it: operators (:class:`HessianOperator`, :class:`GGNOperator`,
  :class:`DenseOperator`, any :class:`SymmetricOperator`) and solvers that act on an operator
  (:func:`lanczos`, :func:`power_iteration`, :func:`hutchpp_trace`, :func:`hutchinson_trace`,
  :func:`slq_density`).
"""

from ._distributed import DistributedProbeError
from .auto import AutoUBA, AutoUBAScheduler, PlateauCheck, PlateauCooldown, auto_uba
from .curvature import GGNOperator, HessianOperator, ModelLoss, UnsupportedDerivativeError
from .lanczos import LanczosResult, lanczos
from .linear_operator import DenseOperator, SymmetricOperator
from .phi import (
    OptimizerStability,
    PhiChoice,
    choose_phi,
    optimizer_stability,
    phi_from_condition_number,
    stability_fraction,
    stability_limit,
)
from .plotting import plot_schedules
from .power_iteration import PowerIterationResult, power_iteration
from .probe import CurvatureEstimate, probe_curvature
from .report import CurvatureReport, ReestimationRecord
from .scheduler import BudgetScheduler, PastBudgetWarning, PhiChange, UBAScheduler
from .schedules import (
    SCHEDULES,
    constant_lr,
    cosine_lr,
    get_schedule,
    linear_lr,
    onecycle_lr,
    rex_lr,
    step_lr,
    uba_factor,
    uba_lr,
    wsd_lr,
)
from .slq import SpectralDensity, slq_density
from .trace import TraceEstimate, hutchinson_trace, hutchpp_trace

__version__ = "0.1.0"

__all__ = [
    "SCHEDULES",
    "AutoUBA",
    "AutoUBAScheduler",
    "BudgetScheduler",
    "CurvatureEstimate",
    "CurvatureReport",
    "DenseOperator",
    "DistributedProbeError",
    "GGNOperator",
    "HessianOperator",
    "LanczosResult",
    "ModelLoss",
    "OptimizerStability",
    "PastBudgetWarning",
    "PhiChange",
    "PhiChoice",
    "PlateauCheck",
    "PlateauCooldown",
    "PowerIterationResult",
    "ReestimationRecord",
    "SpectralDensity",
    "SymmetricOperator",
    "TraceEstimate",
    "UBAScheduler",
    "UnsupportedDerivativeError",
    "__version__",
    "auto_uba",
    "choose_phi",
    "constant_lr",
    "cosine_lr",
    "get_schedule",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "linear_lr",
    "onecycle_lr",
    "optimizer_stability",
    "phi_from_condition_number",
    "plot_schedules",
    "power_iteration",
    "probe_curvature",
    "rex_lr",
    "slq_density",
    "stability_fraction",
    "stability_limit",
    "step_lr",
    "uba_factor",
    "uba_lr",
    "wsd_lr",
]
