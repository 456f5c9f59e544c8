"""What the schedulers and ``auto_uba`` read from a ``torch.optim.Optimizer``'s param groups."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer

from ._validation import check_nonnegative_finite, check_positive_finite

__all__ = ["SGDSettings", "group_peaks", "per_group", "sgd_settings"]


def group_peaks(optimizer: Any) -> list[float]:
    """Each param group's peak rate: ``initial_lr`` once a scheduler has run, else ``lr``.

    Checked (a real optimizer, a positive finite number in every group), so that the schedulers
    fail before torch's base class touches the groups, and ``auto_uba`` before it probes.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [], "lr": 0.5}], lr=0.1)
        >>> group_peaks(opt)
        [0.1, 0.5]
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    peaks = []
    for i, group in enumerate(optimizer.param_groups):
        if "lr" not in group and "initial_lr" not in group:
            raise ValueError(
                f"optimizer.param_groups[{i}] has no 'lr'; construct the optimizer with a "
                "learning rate (e.g. torch.optim.SGD(params, lr=0.1)) before scheduling it"
            )
        peak = group.get("initial_lr", group.get("lr"))
        if isinstance(peak, torch.Tensor):
            peak = float(peak)
        if isinstance(peak, bool) or not isinstance(peak, numbers.Real):
            raise TypeError(
                f"optimizer.param_groups[{i}]['lr'] must be a number, got {peak!r}; the "
                "scheduler needs each group's peak learning rate"
            )
        peaks.append(check_positive_finite(f"optimizer.param_groups[{i}]['lr']", peak))
    return peaks


class SGDSettings(NamedTuple):
    """The settings of a ``torch.optim.SGD`` param group that its stability limit depends on."""

    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float


def sgd_settings(optimizer: Any) -> SGDSettings | None:
    """The :class:`SGDSettings` of ``optimizer``'s param group with the largest peak rate (the
    first such group), or ``None`` unless ``optimizer`` is a ``torch.optim.SGD``.

    Example:
        >>> import torch
        >>> p = [torch.zeros(1)]
        >>> sgd_settings(torch.optim.SGD(p, lr=0.1, momentum=0.9))
        SGDSettings(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)
        >>> sgd_settings(torch.optim.Adam(p, lr=0.1)) is None
        True
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    peaks = group_peaks(optimizer)
    group = optimizer.param_groups[peaks.index(max(peaks))]
    return SGDSettings(
        float(group.get("momentum", 0.0)),
        float(group.get("dampening", 0.0)),
        bool(group.get("nesterov", False)),
        float(group.get("weight_decay", 0.0)),
    )


def per_group(name: str, value: Any, num_groups: int) -> list[float] | None:
    """Broadcast a float (or check a per-group sequence) to one value per param group."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != num_groups:
            raise ValueError(
                f"{name} must be a float or a sequence with one value per param group "
                f"({num_groups}), got {len(value)} values"
            )
        return [check_nonnegative_finite(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [check_nonnegative_finite(name, value)] * num_groups
