r"""Whether a run is *self-stabilising*: what the ``"hold"`` link reads besides the curvature.

A held learning rate is risky where the sharpness can grow past the optimizer's stability edge
and nothing pulls it back: plain SGD or heavy ball on an unnormalised network (the φ study's
``digits_cnn``, where every φ < 2 diverged at the cosine-tuned peak). Two kinds of run have such a
pull built in, and there the study's swept cells all wanted the rate held (BENCHMARKS.md, §2):

* an **adaptive optimizer** (``torch.optim.Adam``, ``AdamW``, ``RMSprop``, ``Adagrad`` and their
  subclasses): its per-coordinate preconditioner grows with the gradients it meets, so the
  preconditioned sharpness rides its limit instead of running past it (Cohen et al. 2022,
  "Adaptive gradient methods at the edge of stability");
* a model with a **normalisation layer** (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) trained
  by ``torch.optim.SGD`` (or a subclass) with **weight decay** on some param group: the weights
  before a normaliser are scale-invariant, their curvature falls as their norm grows, and weight
  decay settles that norm at an equilibrium instead of letting the effective rate run away (Li &
  Arora 2019, "An exponential learning rate schedule for deep learning"; Wan et al. 2021,
  "Spherical motion dynamics").

:func:`self_stabilising` says which, in words, or ``None``. The rule and its constant were
pre-registered (``benchmarks/results/prereg_hold_rule.md``) before the tasks it was tested on ran.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ADAPTIVE_OPTIMIZERS", "NORMALISERS", "self_stabilising"]

ADAPTIVE_OPTIMIZERS: tuple[type, ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)
"""The optimizers (and their subclasses) counted as adaptive: those whose stability limit
:func:`~uba_auto.phi.optimizer_stability` derives on the preconditioned curvature. Others (NAdam,
RAdam, Adamax, ...) are not classified and get the gated link's φ."""

NORMALISERS: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)
"""The normalisation layers that make the weights before them scale-invariant."""


def _decays(optimizer: Any) -> float:
    return max(float(group.get("weight_decay", 0.0) or 0.0) for group in optimizer.param_groups)


def self_stabilising(model: nn.Module | None, optimizer: Any) -> str | None:
    """Why the run of ``model`` under ``optimizer`` is self-stabilising (module docs), or ``None``.

    Args:
        model: the trained module (wrappers such as ``DistributedDataParallel`` are fine: their
            ``modules()`` include the wrapped model's); ``None`` when unknown, in which case only
            the optimizer is read.
        optimizer: the ``torch.optim.Optimizer`` that trains it, or ``None`` (unknown: ``None``).

    Returns:
        One line for the report, e.g. ``"AdamW is an adaptive optimizer"``, or ``None``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4))
        >>> self_stabilising(net, torch.optim.AdamW(net.parameters()))
        'AdamW is an adaptive optimizer (per-coordinate preconditioner)'
        >>> self_stabilising(net, torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=5e-4))
        'SGD with weight decay 0.0005 on a model with 1 normalisation layer (BatchNorm1d)'
        >>> self_stabilising(net, torch.optim.SGD(net.parameters(), lr=0.1)) is None
        True
    """
    if optimizer is None:
        return None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    name = type(optimizer).__name__
    if isinstance(optimizer, ADAPTIVE_OPTIMIZERS):
        return f"{name} is an adaptive optimizer (per-coordinate preconditioner)"
    if model is None or not isinstance(optimizer, torch.optim.SGD):
        return None  # the normaliser branch is derived for SGD-family updates only
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    decay = _decays(optimizer)
    if not decay > 0:
        return None
    norms = [type(m).__name__ for m in model.modules() if isinstance(m, NORMALISERS)]
    if not norms:
        return None
    layers = "layer" if len(norms) == 1 else "layers"
    return (
        f"{name} with weight decay {decay:g} on a model with {len(norms)} normalisation {layers} "
        f"({', '.join(sorted(set(norms)))})"
    )
