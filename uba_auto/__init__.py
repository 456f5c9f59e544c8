"""uba-auto: curvature-aware UBA learning-rate schedules for budgeted-iteration training.

The public API, in the order a user meets it:

* schedules as pure functions of the step: :func:`uba_lr` and the baselines in :data:`SCHEDULES`;
* PyTorch schedulers: :class:`UBAScheduler` (with :meth:`UBAScheduler.set_phi`) and
  :class:`BudgetScheduler` for any baseline;
* plotting: :func:`plot_schedules` (needs the ``plot`` extra);
* linear operators for the curvature solvers: :class:`SymmetricOperator`, :class:`DenseOperator`.
"""

from .linear_operator import DenseOperator, SymmetricOperator
from .plotting import plot_schedules
from .scheduler import BudgetScheduler, PhiChange, UBAScheduler
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

__version__ = "0.1.0"

__all__ = [
    "SCHEDULES",
    "BudgetScheduler",
    "DenseOperator",
    "PhiChange",
    "SymmetricOperator",
    "UBAScheduler",
    "__version__",
    "constant_lr",
    "cosine_lr",
    "get_schedule",
    "linear_lr",
    "onecycle_lr",
    "plot_schedules",
    "rex_lr",
    "step_lr",
    "uba_factor",
    "uba_lr",
    "wsd_lr",
]
