"""The schedulers' state-dict format: its version, the checks on loading, writing rates back.

Shared by :class:`~uba_auto.scheduler.BudgetScheduler` and its subclasses. The state holds only
numbers, strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["STATE_VERSION", "check_state", "write_rates"]

STATE_VERSION = 1


def check_state(state_dict: Any, class_name: str, num_groups: int) -> None:
    """Refuse a state that does not come from a ``class_name`` over ``num_groups`` param groups,
    or that a newer uba-auto wrote."""
    if not isinstance(state_dict, dict) or "version" not in state_dict:
        raise ValueError(
            "state_dict must come from BudgetScheduler/UBAScheduler.state_dict(); "
            f"got {type(state_dict).__name__} without a 'version' key"
        )
    if state_dict["version"] > STATE_VERSION:
        raise ValueError(
            f"state_dict version {state_dict['version']} is newer than this uba-auto "
            f"understands ({STATE_VERSION}); upgrade uba-auto"
        )
    if state_dict["class"] != class_name:
        raise ValueError(
            f"state_dict was saved by a {state_dict['class']}, cannot load it into a "
            f"{class_name}; construct a {state_dict['class']} instead"
        )
    if len(state_dict["peak_lrs"]) != num_groups:
        raise ValueError(
            f"state_dict has {len(state_dict['peak_lrs'])} param groups but the optimizer "
            f"has {num_groups}; restore into an optimizer built the same way"
        )


def write_rates(optimizer: Optimizer, rates: Sequence[float]) -> None:
    """Set each param group's ``lr``, in place where it is a tensor (it stays a tensor)."""
    for group, lr in zip(optimizer.param_groups, rates, strict=True):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
