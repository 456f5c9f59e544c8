r"""The curvature probe: the curvature the optimiser will see, from a few minibatches.

:func:`probe_curvature` builds a curvature operator (:class:`~uba_auto.curvature.HessianOperator` or
:class:`~uba_auto.curvature.GGNOperator`) over ``num_batches`` minibatches of the user's loader and
runs solvers on it (:func:`~uba_auto.lanczos.lanczos` for both ends of the spectrum from one Krylov
space, :func:`~uba_auto.trace.hutchpp_trace`, :func:`~uba_auto.slq.slq_density`). It runs on the
model's device, in the model's dtype unless told otherwise, and leaves every piece of user state as
it found it: parameters, buffers, ``.grad``, ``training`` and ``requires_grad`` flags, RNG streams.

Cost is counted in **single-batch Hessian-vector products** (HVPs): one product with the operator
over ``B`` batches costs ``B`` of them.

Modules: :mod:`~uba_auto.probe.api` (``probe_curvature``: checks, resolves the process group once),
:mod:`~uba_auto.probe.settings` (``ProbeSettings``, checked once), :mod:`~uba_auto.probe.run`
(``run_probe``: the composition), :mod:`~uba_auto.probe.steps` (extremes, per-batch curvature),
:mod:`~uba_auto.probe.bookkeeping` (HVPs, seconds, progress bar),
:mod:`~uba_auto.probe.estimate` (``CurvatureEstimate``), :mod:`~uba_auto.probe.pyhessian` (the
PyHessian reference backend, ``method="pyhessian"``).
"""

from .api import probe_curvature
from .estimate import NEGATIVE_MASS_THRESHOLD, CurvatureEstimate
from .projected import DECISION_RULE, DecisionRule, rule_for_link
from .run import run_probe
from .settings import METHODS, ProbeSettings

__all__ = [
    "DECISION_RULE",
    "METHODS",
    "NEGATIVE_MASS_THRESHOLD",
    "CurvatureEstimate",
    "DecisionRule",
    "ProbeSettings",
    "probe_curvature",
    "rule_for_link",
    "run_probe",
]
