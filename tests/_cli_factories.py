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


def model_as_data() -> nn.Module:
    """A model's factory passed as --data by mistake."""
    return make_model()


def dataset_data() -> torch.utils.data.Dataset:
    gen = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(
        torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    )


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def soft_label_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, 4, generator=gen), torch.randn(16, 3, generator=gen).softmax(dim=-1))
        for _ in range(4)
    ]


class NoisyBatchNorm(nn.BatchNorm1d):
    """Batch normalisation that adds noise in training mode: random in the default mode, which
    keeps normalisation layers training; deterministic in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + 0.01 * torch.randn_like(out) if self.training else out


def make_noisy_batchnorm_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), NoisyBatchNorm(8), nn.Tanh(), nn.Linear(8, 3))
