r"""The Hessian and the generalized Gauss-Newton matrix of a model's loss, as symmetric operators.

Both operators act on the flat vector :math:`\theta \in \mathbb{R}^n` of the model's parameters that
require grad (in ``model.named_parameters()`` order) and describe the curvature of

.. math::

    L(\theta) = \sum_{b=1}^{B} c_b \, \ell_b(\theta), \qquad c_b = \frac{n_b}{\sum_{b'} n_{b'}},

the per-batch losses weighted by the batches' numbers of examples :math:`n_b`: with per-batch
mean losses, the mean loss over all the examples (:mod:`~uba_auto.curvature.local`). The model
is never mutated: it is evaluated at detached copies of its parameters and fresh copies of its
buffers through :func:`torch.func.functional_call`, derivatives are taken with
:func:`torch.autograd.grad` or :mod:`torch.func` (never ``.backward()``), so ``.grad``, running
statistics and ``training`` flags stay as they were. An operator describes the point at which it
was built: build a new one after the parameters change (it raises if it notices that they did).

The pieces, one concern each:

* :mod:`~uba_auto.curvature.batch_loss`: batch forms, one batch's scalar loss (``ModelLoss``).
* :mod:`~uba_auto.curvature.modes`: the mode policy (BatchNorm, dropout, attention, randomness).
* :mod:`~uba_auto.curvature.errors`: missing derivatives as :class:`UnsupportedDerivativeError`.
* :mod:`~uba_auto.curvature.params`: parameter selection, device, dtype, the point.
* :mod:`~uba_auto.curvature.evaluation`, :mod:`~uba_auto.curvature.hessian`,
  :mod:`~uba_auto.curvature.ggn`: per-batch products, one pure closure per engine.
* :mod:`~uba_auto.curvature.local`: this process's operator, a weighted sum over its batches.
* :mod:`~uba_auto.curvature.allreduce`: the global batches of a process group.
* :mod:`~uba_auto.curvature.operators`: :func:`build_operator`, :class:`HessianOperator`,
  :class:`GGNOperator`.
* :mod:`~uba_auto.curvature.preconditioned`: :class:`PreconditionedOperator`,
  :math:`P^{-1/2} H P^{-1/2}` around any of them; :mod:`~uba_auto.curvature.precondition`: its
  :math:`P`, read from an adaptive optimizer's state or estimated before its first step.
"""

from uba_auto.curvature.allreduce import AllReducedOperator
from uba_auto.curvature.batch_loss import ModelLoss
from uba_auto.curvature.errors import UnsupportedDerivativeError
from uba_auto.curvature.evaluation import ENGINES
from uba_auto.curvature.local import LocalOperator
from uba_auto.curvature.modes import MODES
from uba_auto.curvature.operators import CURVATURES, GGNOperator, HessianOperator, build_operator
from uba_auto.curvature.params import device_of, unwrap_model, unwrap_notes
from uba_auto.curvature.precondition import (
    ADAPTIVE_OPTIMIZERS,
    PreconditionedOperator,
    Preconditioner,
    estimate_preconditioner,
    is_adaptive,
    optimizer_param_names,
    optimizer_preconditioner,
    preconditioner_from_state,
)

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "CURVATURES",
    "ENGINES",
    "MODES",
    "AllReducedOperator",
    "GGNOperator",
    "HessianOperator",
    "LocalOperator",
    "ModelLoss",
    "PreconditionedOperator",
    "Preconditioner",
    "UnsupportedDerivativeError",
    "build_operator",
    "device_of",
    "estimate_preconditioner",
    "is_adaptive",
    "optimizer_param_names",
    "optimizer_preconditioner",
    "preconditioner_from_state",
    "unwrap_model",
    "unwrap_notes",
]
