"""Factories for the tests of ``uba-auto report``: tiny models and loaders, and broken ones."""

from __future__ import annotations

import torch
from torch import nn

NOT_CALLABLE = 3


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(4)
    ]


def make_loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(
        torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    )
    return torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)


def make_regression_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, 4, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(4)
    ]


def half_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.nn.functional.mse_loss(outputs, targets)


def broken_factory() -> nn.Module:
    raise RuntimeError("out of coffee")


def not_a_model() -> list[int]:
    return [1, 2, 3]


def not_a_loader() -> int:
    return 7


def tensor_data() -> torch.Tensor:
    return torch.zeros(4, 4)


def empty_data() -> list:
    return []


def wrong_shape_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(16, 5), torch.randint(0, 3, (16,)))]


def key_error_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A loss with a bug of the user's: the report must say so in one line."""
    raise KeyError("label")
