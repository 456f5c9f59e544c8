"""The schedulers' state-dict format: its version, the checks on loading, writing rates back, and
the once-per-run warning past the budget that the state records.

Shared by :class:`~uba_auto.scheduler.BudgetScheduler` and its subclasses. The state holds only
numbers, strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["STATE_VERSION", "PastBudgetWarning", "check_state", "warn_past_budget", "write_rates"]

STATE_VERSION = 1


class PastBudgetWarning(UserWarning):
    """An optimizer step used a rate past the scheduler's ``total_steps``, where the schedule
    holds its final rate (``lr_min``): the run is longer than the budget it was planned for.

    Given once per run; ``warnings.filterwarnings("ignore", category=PastBudgetWarning)``
    silences it where the extra steps at ``lr_min`` are intended.
    """


def warn_past_budget(
    name: str, total_steps: int, step_count: int, lr_mins: Sequence[float]
) -> None:
    """Warn that scheduler ``name``, stepped ``step_count`` times, went past ``total_steps``,
    pointing at the first caller outside uba-auto (the training loop or its framework)."""
    frame, level = sys._getframe(1), 2  # level 2: the caller of this function
    while frame is not None and frame.f_globals.get("__name__", "").startswith("uba_auto"):
        frame, level = frame.f_back, level + 1
    final = ", ".join(f"{lr:.4g}" for lr in lr_mins)
    warnings.warn(
        f"{name} stepped past its budget: it plans optimizer steps 0 to total_steps="
        f"{total_steps}, and step {step_count - 1} has been taken at the final rate held past "
        f"it (lr_min {final}). To train longer, build the scheduler with a larger total_steps "
        "(auto_uba: a larger budget) so the decay spans the whole run; else stop after "
        f"{total_steps + 1} optimizer steps. (Warned once per run.)",
        PastBudgetWarning,
        stacklevel=level,
    )


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
