"""The loss ``auto_uba`` takes when none is given: guessed from the first batch, or refused."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["default_loss"]


def default_loss(batch: Any) -> tuple[Any, str]:
    """The loss for a three-argument call, from the form of the first batch, and the guess the
    report prints as its first line (``""`` when the model returns its own loss).

    Integer targets are read as class indices (cross-entropy), floating-point ones as
    regression targets (MSE), and both guesses are printed, since either can be wrong. Floating
    targets whose rows are probabilities (two or more columns, non-negative, each row summing to
    1: soft labels, label smoothing, one-hot floats) are refused: MSE on logits would measure
    another loss than the cross-entropy they are usually trained with, and regression targets can
    look the same, so only the caller can tell.

    Raises:
        ValueError: for batches that are neither dicts nor ``(inputs, targets)`` pairs, and for
            targets that are rows of probabilities (pass ``loss_fn``).
    """
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return None, ""  # Hugging Face style: the model returns its own .loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        targets = batch[1]
        shape = tuple(targets.shape)
        if targets.is_floating_point():
            if _probability_rows(targets):
                raise ValueError(
                    f"loss_fn is required: the targets of the first batch (float, shape {shape}) "
                    "are rows of probabilities (non-negative, each row summing to 1), soft labels "
                    "for cross-entropy or regression targets for MSE, and the curvature of the "
                    "two differs; pass loss_fn=torch.nn.functional.cross_entropy (soft labels, "
                    "one-hot) or loss_fn=torch.nn.functional.mse_loss (regression)"
                )
            return nn.functional.mse_loss, (
                f"loss guessed: mse_loss, as loss_fn was not given and the targets are "
                f"floating-point (shape {shape}); pass loss_fn if your loss is another"
            )
        return nn.functional.cross_entropy, (
            f"loss guessed: cross_entropy (integer targets of shape {shape}, read as class "
            "indices), as loss_fn was not given; pass loss_fn if your loss is another"
        )
    raise ValueError(
        "loss_fn is required for batches that are neither (inputs, targets) pairs nor dicts; "
        "pass loss_fn=uba_auto.ModelLoss(fn) with fn(model, batch) -> scalar loss"
    )


def _probability_rows(targets: torch.Tensor) -> bool:
    """Whether ``targets`` has two or more columns and every row is a probability vector."""
    if targets.ndim < 2 or targets.shape[-1] < 2 or targets.numel() == 0:
        return False
    rows = targets.detach().to("cpu", torch.float64)  # once per run; MPS has no float64
    if not bool(torch.isfinite(rows).all()) or float(rows.min()) < 0:
        return False
    # Rounding of the targets' own dtype (a float16 softmax) must not hide a probability row.
    tol = min(0.05, max(1e-4, 8 * torch.finfo(targets.dtype).eps * targets.shape[-1]))
    return bool(((rows.sum(dim=-1) - 1).abs() <= tol).all())
