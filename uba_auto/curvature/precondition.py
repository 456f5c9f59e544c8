r"""The curvature an adaptive optimizer sees: :math:`P^{-1/2} (A + W) P^{-1/2}`, with its :math:`P`.

An adaptive optimizer divides its update coordinate-wise by a positive diagonal :math:`P`, so near
a point its dynamics are those of gradient descent on :math:`P^{-1}A` (Cohen et al. 2022,
"Adaptive gradient methods at the edge of stability"). The operator probed is the symmetric
matrix with the same spectrum,

.. math::

    \tilde A = D (A + W) D, \qquad D = P^{-1/2}, \qquad
    \operatorname{spec}(\tilde A) = \operatorname{spec}\big(P^{-1}(A + W)\big),

:math:`A` the Hessian or the GGN, :math:`W = \operatorname{diag}(w)` the coupled weight decay (the
optimizer adds :math:`w\theta` to the gradient: Adam's, Adagrad's and RMSprop's ``weight_decay``;
AdamW's decay is decoupled, :math:`W = 0`). The operator,
:class:`~uba_auto.curvature.preconditioned.PreconditionedOperator`, is a composition defined in
:mod:`~uba_auto.curvature.preconditioned` (exported here too); this module reads :math:`P` from
the optimizer, never writing its state:

* Adam/AdamW: :math:`P = \sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon`, :math:`v_t` the ``exp_avg_sq``
  (``max_exp_avg_sq`` with ``amsgrad``), :math:`t` the ``step``.
* Adagrad: :math:`P = \sqrt{s_t} + \epsilon`, :math:`s_t` the ``sum``.
* RMSprop: :math:`P = \sqrt{v_t} + \epsilon` (``square_avg``); ``centered``:
  :math:`\sqrt{v_t - \bar g_t^2} + \epsilon` (``grad_avg``).

Each with the :math:`\epsilon` and :math:`\beta_2` of the parameter's own param group, by torch's
operations in the state's dtype (those of ``_single_tensor_adam`` and its siblings): bit for bit
what step :math:`t` divided by, for the default (for-loop and foreach) implementations; to
rounding for ``fused=True`` and ``capturable=True``, whose kernels order the operations their way.
Step :math:`t+1` divides by it after one more moving-average update (the frozen-preconditioner
picture). Before the first step there is no state, and
:func:`estimate_preconditioner` estimates :math:`P` from the probe batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Adagrad, Adam, AdamW, Optimizer, RMSprop

from uba_auto.curvature.params import unwrap_model
from uba_auto.curvature.preconditioned import PreconditionedOperator, Preconditioner

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "PreconditionedOperator",
    "Preconditioner",
    "estimate_preconditioner",
    "is_adaptive",
    "optimizer_param_names",
    "optimizer_preconditioner",
    "preconditioner_from_state",
]

ADAPTIVE_OPTIMIZERS: tuple[type, ...] = (Adam, AdamW, Adagrad, RMSprop)
"""The optimizers (and their subclasses) whose update divides by a diagonal read here."""


def is_adaptive(optimizer: Any) -> bool:
    """Whether ``optimizer`` is one of :data:`ADAPTIVE_OPTIMIZERS` (or a subclass).

    Example:
        >>> p = [torch.zeros(1)]
        >>> is_adaptive(torch.optim.AdamW(p)), is_adaptive(torch.optim.SGD(p, lr=0.1))
        (True, False)
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    return isinstance(optimizer, ADAPTIVE_OPTIMIZERS)


def _kind(optimizer: Any) -> str:
    if is_adaptive(optimizer):  # AdamW is a subclass of Adam
        kinds = ((Adam, "adam"), (Adagrad, "adagrad"), (RMSprop, "rmsprop"))
        return next(k for c, k in kinds if isinstance(optimizer, c))
    raise TypeError(
        f"optimizer must be one of {[c.__name__ for c in ADAPTIVE_OPTIMIZERS]} to read a "
        f"preconditioner from it, got {type(optimizer).__name__}; for SGD the dynamics are those "
        "of the raw curvature (P = I): probe the operator itself (check is_adaptive first)"
    )


def optimizer_param_names(model: nn.Module, optimizer: Any) -> list[str]:
    """Names of the parameters ``optimizer`` trains that require grad, in the operators' order.

    The order is ``model.named_parameters()``'s (of the inner module of a DDP wrapper), the layout
    of the operators' flat vector: pass the result as ``params=`` to the operator, so that
    :math:`A` and :math:`P` leave out the same frozen parameters.

    Raises:
        TypeError: for an ``optimizer`` that is not a ``torch.optim.Optimizer``.
        ValueError: if a param group holds a tensor that is not a parameter of ``model``, or if
            none is left.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> _ = model[0].bias.requires_grad_(False)
        >>> optimizer_param_names(model, torch.optim.Adam(model.parameters()))
        ['0.weight', '1.weight', '1.bias']
    """
    is_adaptive(optimizer)  # checks the type
    named = list(_inner(model).named_parameters())
    known, trained = {id(p) for _, p in named}, set()
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in known:
                raise ValueError(
                    f"optimizer.param_groups[{i}] holds a tensor of shape {tuple(p.shape)} that "
                    "is not a parameter of the model, so its curvature cannot be probed; pass "
                    "the model the optimizer trains, or build the optimizer from model.parameters()"
                )
            trained.add(id(p))
    names = [n for n, p in named if id(p) in trained and p.requires_grad]
    if not names:
        raise ValueError(
            "the optimizer trains no parameter of the model that requires grad, so there is no "
            "curvature it sees; unfreeze them with p.requires_grad_(True)"
        )
    return names


class _Probed(NamedTuple):
    """One probed parameter, with the param group the optimizer holds it in."""

    name: str
    param: Tensor
    group: Mapping[str, Any]
    index: int


def _inner(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return unwrap_model(model)


def _probed(optimizer: Any, model: nn.Module, op: Any) -> list[_Probed]:
    """``op``'s parameters, each with its param group; raises where the layouts disagree."""
    named = dict(_inner(model).named_parameters())
    groups = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    out = []
    for name, shape in zip(op.param_names, op.param_shapes, strict=True):
        param = named.get(name)
        if param is None or param.shape != shape:
            raise ValueError(
                f"op probes a parameter {name!r} of shape {tuple(shape)} that the model does not "
                "have; build the operator on this model"
            )
        if id(param) not in groups:
            raise ValueError(
                f"op probes parameter {name!r}, which the optimizer does not train, so it has no "
                "preconditioner; build the operator with params=optimizer_param_names(model, "
                "optimizer)"
            )
        out.append(
            _Probed(name, param, optimizer.param_groups[groups[id(param)]], groups[id(param)])
        )
    return out


def _state_tensor(entry: _Probed, state: Mapping[str, Any], key: str) -> Tensor:
    value = state.get(key)
    if not isinstance(value, Tensor):
        raise ValueError(
            f"the optimizer state of parameter {entry.name!r} has no tensor {key!r} (keys: "
            f"{sorted(state)}), which the settings of param_groups[{entry.index}] need; load a "
            "state saved by an optimizer with the same settings, or start from a fresh one"
        )
    if value.shape != entry.param.shape:
        raise ValueError(
            f"the optimizer state {key!r} of parameter {entry.name!r} has shape "
            f"{tuple(value.shape)}, but the parameter has shape {tuple(entry.param.shape)}: the "
            "state belongs to another model; load the state saved with this model, or start from "
            "a fresh optimizer"
        )
    return value


def _denominator(kind: str, entry: _Probed, state: Mapping[str, Any]) -> Tensor:
    """The denominator of the step that produced ``state``, by torch's operations, on copies."""
    group, eps = entry.group, float(entry.group["eps"])
    if kind == "adam":
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        second = _state_tensor(entry, state, key)
        beta2, step = float(group["betas"][1]), float(state["step"])
        # As _single_tensor_adam: sqrt(v) / sqrt(1 - beta2**step) + eps, the step a Python float.
        return (second.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    if kind == "adagrad":
        return _state_tensor(entry, state, "sum").sqrt().add_(eps)
    square_avg = _state_tensor(entry, state, "square_avg")
    if group.get("centered", False):
        grad_avg = _state_tensor(entry, state, "grad_avg")
        return square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_().add_(eps)
    return square_avg.sqrt().add_(eps)


def _symbol(kind: str, group: Mapping[str, Any]) -> str:
    if kind == "adam":
        return "diag(√max v̂ + ε)" if group.get("amsgrad", False) else "diag(√v̂ + ε)"
    if kind == "adagrad":
        return "diag(√Σg² + ε)"
    return "diag(√(v − ḡ²) + ε)" if group.get("centered", False) else "diag(√v + ε)"


def _checked(entry: _Probed, part: Tensor, what: str) -> Tensor:
    """``part``, one parameter's :math:`P`, if finite and > 0 everywhere (it is inverted)."""
    if nonfinite := int((~torch.isfinite(part)).sum()):
        raise ValueError(
            f"P = {what} of parameter {entry.name!r} has {nonfinite} non-finite entries: the "
            "optimizer state holds NaN or inf (the run diverged, or a centered RMSprop's v − ḡ² "
            "went negative); restart from a finite state"
        )
    if zeros := int((part <= 0).sum()):
        raise ValueError(
            f"P = {what} of parameter {entry.name!r} has {zeros} of {part.numel()} entries equal "
            f"to 0 (zero second moments, and param_groups[{entry.index}] has "
            f"eps={entry.group['eps']}), so P⁻¹ is undefined; construct the optimizer with "
            "eps > 0 (e.g. eps=1e-8), or leave the parameter out of the probe (params=[...])"
        )
    return part


def _coupled_decay(kind: str, probed: Sequence[_Probed], op: Any) -> Tensor | None:
    """:math:`w`: each group's ``weight_decay`` where it is added to the gradient (op's dtype)."""
    decays = [
        0.0 if kind == "adam" and e.group.get("decoupled_weight_decay") else e.group["weight_decay"]
        for e in probed
    ]
    if not any(decays):
        return None
    numels = torch.tensor([e.param.numel() for e in probed], device=op.device)
    # From the Python floats, in the operator's dtype (a float32 copy would round 0.1).
    return torch.tensor(decays, dtype=op.dtype, device=op.device).repeat_interleave(numels)


def preconditioner_from_state(optimizer: Any, model: nn.Module, op: Any) -> Preconditioner | None:
    """:math:`P` read from ``optimizer.state`` (never written), in ``op``'s layout.

    Per parameter, with its param group's hyper-parameters (formulas in the module docstring).
    ``op`` is a curvature operator of ``model`` built with ``params=optimizer_param_names(model,
    optimizer)`` (read: ``param_names``, ``param_shapes``, ``size``, ``dtype``, ``device``).

    Returns:
        The :class:`Preconditioner` (``source="state"``), or ``None`` when no probed parameter has
        state (before the first step; Adagrad's state from its construction, ``step`` 0, is none).

    Raises:
        TypeError: for an optimizer that is not adaptive, or a model that is not a module.
        ValueError: if ``op`` probes a parameter the optimizer does not train; if some probed
            parameters have state and others not; if a state tensor is missing or not of its
            parameter's shape; if an entry of :math:`P` is 0 (``eps=0``) or not finite.
    """
    kind, probed = _kind(optimizer), _probed(optimizer, model, op)
    states = [optimizer.state.get(e.param) for e in probed]  # .get: state is a defaultdict
    for entry, state in zip(probed, states, strict=True):
        if state and "step" not in state:
            raise ValueError(
                f"the optimizer state of parameter {entry.name!r} has no 'step' (keys: "
                f"{sorted(state)}); load a state saved by this optimizer, or start a fresh one"
            )
    has = [bool(s) and float(s["step"]) > 0 for s in states]
    if not any(has):
        return None
    if not all(has):
        without = [e.name for e, h in zip(probed, has, strict=True) if not h]
        raise ValueError(
            f"{len(without)} probed parameters have no optimizer state (e.g. {without[:3]}) while "
            f"{sum(has)} have: they never received a gradient in a step, so their P is undefined; "
            "probe only the parameters with state (params=[...]), or take a step in which every "
            "probed parameter gets a gradient"
        )
    parts = [
        _checked(
            e, _denominator(kind, e, s).to(op.device, op.dtype), _symbol(kind, e.group)
        ).reshape(-1)
        for e, s in zip(probed, states, strict=True)
    ]
    step, name = int(max(float(s["step"]) for s in states)), type(optimizer).__name__
    symbols = " / ".join(dict.fromkeys(_symbol(kind, e.group) for e in probed))
    description = f"{symbols} from the {name} state at step {step}"
    decay = _coupled_decay(kind, probed, op)
    return Preconditioner(torch.cat(parts), name, "state", step, description, decay)


def estimate_preconditioner(
    optimizer: Any, model: nn.Module, op: Any, *, grad_clip: float | None = None
) -> Preconditioner:
    r""":math:`P` estimated over ``op``'s batches, for an optimizer that has taken no step.

    .. math::

        v = \frac1B \sum_{b=1}^{B} (g_b + w\theta)^2, \qquad P = \sqrt{s_0 + v} + \epsilon,

    :math:`g_b` the gradient of batch :math:`b` alone (``op.batch_operator(b).gradient()``; under a
    process group the global batch's, the same on every rank), scaled by
    :math:`\min(1, c/\lVert g_b\rVert)` when the training loop clips the gradient norm to
    ``grad_clip`` :math:`= c` (``torch.nn.utils.clip_grad_norm_``, the Hugging Face Trainer's
    ``max_grad_norm``): the optimizer's moments are of the clipped gradients, so without it the
    estimate is too large by the clipping factor (about 5x on ``gpt_adamw`` at initialisation,
    BENCHMARKS.md §3). :math:`w` is the coupled weight decay,
    :math:`\epsilon` each group's, :math:`s_0` Adagrad's ``initial_accumulator_value`` (else 0).

    * Adam/AdamW: the bias-corrected :math:`\hat v_t` is a normalised moving average of
      :math:`g^2`, so :math:`E[\hat v_t] = E[g^2]` at every step, the first included
      (:math:`\hat v_1 = g_1^2`).
    * RMSprop has no bias correction, :math:`E[v_t] = (1-\alpha^t) E[g^2]`: the estimate is the
      stationary value (:math:`t \gg 1/(1-\alpha)`); early steps divide by less (step 1 by
      :math:`\sqrt{1-\alpha}\,|g_1|`) and see more curvature. ``centered`` subtracts
      :math:`\bar g^2`; the estimate does not, so its curvature is a lower bound there.
    * Adagrad's sum grows, :math:`E[s_t] = s_0 + t\,E[g^2]`: the estimate is the first step's
      denominator; at step :math:`t` the curvature it sees is about :math:`1/\sqrt t` of it.

    :math:`E[\sqrt{\cdot}] \ne \sqrt{E[\cdot]}`, and the probe batches stand for the training
    batches: an estimate, said in ``source="estimate"``.

    Raises:
        As :func:`preconditioner_from_state`; ``ValueError`` for an entry of :math:`P` that is 0 (a
        coordinate whose gradient is 0 on every batch, with ``eps=0``).
    """
    kind, probed = _kind(optimizer), _probed(optimizer, model, op)
    decay = _coupled_decay(kind, probed, op)
    square = torch.zeros(op.size, dtype=op.dtype, device=op.device)
    if decay is not None:  # θ at the operator's point, for the decay added to every gradient
        decay_term = decay * torch.cat([e.param.detach().reshape(-1) for e in probed]).to(square)
    for b in range(op.num_batches):
        grad = op.batch_operator(b).gradient()
        if grad_clip is not None:  # as clip_grad_norm_ does, before the optimizer adds any decay
            grad = grad * min(1.0, grad_clip / (float(grad.norm()) + 1e-6))
        grad = grad if decay is None else grad + decay_term
        square = square + grad * grad
    chunks = (square / op.num_batches).split([e.param.numel() for e in probed])
    s0 = [float(e.group.get("initial_accumulator_value", 0.0)) for e in probed]
    g2 = "(g_b + wθ)²" if decay is not None else "g_b²"
    mean = f"√(s₀ + mean_b {g2}) + ε" if any(s0) else f"√(mean_b {g2}) + ε"
    parts = [
        _checked(e, (v + s).sqrt() + float(e.group["eps"]), mean)
        for e, v, s in zip(probed, chunks, s0, strict=True)
    ]
    name = type(optimizer).__name__
    clipped = "" if grad_clip is None else f", gradients clipped to norm {grad_clip:g}"
    description = (
        f"diag({mean}) estimated over {op.num_batches} probe batches{clipped} ({name} has no "
        "state before its first step)"
    )
    return Preconditioner(torch.cat(parts), name, "estimate", None, description, decay)


def optimizer_preconditioner(
    optimizer: Any, model: nn.Module, op: Any, *, grad_clip: float | None = None
) -> Preconditioner:
    """:func:`preconditioner_from_state` if the optimizer has state, else the estimate (with the
    training loop's gradient clipping ``grad_clip``, see :func:`estimate_preconditioner`).

    Example:
        >>> from uba_auto.curvature import HessianOperator
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1)
        >>> op = HessianOperator(model, [(x, y)], torch.nn.functional.mse_loss, dtype=torch.float64)
        >>> pre = optimizer_preconditioner(torch.optim.Adam(model.parameters()), model, op)
        >>> pre.source, pre.diagonal.tolist()  # |g| + ε from the one batch, g = (1, 4)
        ('estimate', [1.00000001, 4.00000001])
        >>> PreconditionedOperator(op, pre).to_dense().diagonal().round(decimals=6).tolist()
        [1.0, 1.0]
    """
    found = preconditioner_from_state(optimizer, model, op)
    if found is not None:
        return found
    return estimate_preconditioner(optimizer, model, op, grad_clip=grad_clip)
