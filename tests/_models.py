"""Small seeded problems (model, loss, batches) shared by the test files.

Every factory returns a :class:`Problem` built from its own ``torch.Generator``, so calling it does
not touch the global random state and two calls give identical problems. Models are float32 (as
users' are); tests probe them in float64 with ``dtype=torch.float64``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PROBLEMS",
    "SEPARABLE",
    "HFStyleModel",
    "Problem",
    "cnn_batchnorm",
    "hf_style",
    "linear_regression",
    "logistic_regression",
    "make_problem",
    "tanh_mlp",
    "tiny_lstm",
    "tiny_transformer",
]


@dataclass
class Problem:
    """A model, its loss and its batches.

    Attributes:
        name: the factory's name.
        model: the module (float32, train mode unless stated).
        loss: what the probe's ``loss`` argument takes: ``loss(outputs, targets)`` for pair batches,
            ``None`` for dict batches.
        batches: list of batches.
        separable: whether the loss is a function of the model's outputs (GGN applies).
    """

    name: str
    model: nn.Module
    loss: Callable[..., Tensor] | None
    batches: list[Any]
    separable: bool = True


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _init_(model: nn.Module, gen: torch.Generator, scale: float = 0.5) -> nn.Module:
    """Seeded initialisation that leaves the global RNG alone; BatchNorm buffers get non-trivial
    running statistics so that train- and eval-mode curvature differ."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("norm" in name or name.endswith("bn.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(1.0 + 0.2 * torch.rand(m.running_var.shape, generator=gen))
                m.num_batches_tracked.fill_(7)
    return model


def linear_regression(
    num_batches: int = 3, batch_size: int = 8, seed: int = 0, in_features: int = 4
) -> Problem:
    """Linear model (in_features -> 2) with MSE: its Hessian equals its GGN, ``2 XᵀX / (N·2)``."""
    gen = _generator(seed)
    model = _init_(nn.Linear(in_features, 2), gen)
    batches = [
        (
            torch.randn(batch_size, in_features, generator=gen),
            torch.randn(batch_size, 2, generator=gen),
        )
        for _ in range(num_batches)
    ]
    return Problem("linear_regression", model, nn.MSELoss(), batches)


def logistic_regression(num_batches: int = 3, batch_size: int = 8, seed: int = 1) -> Problem:
    """Linear model (4 -> 1) with binary cross-entropy on logits (float targets)."""
    gen = _generator(seed)
    model = _init_(nn.Linear(4, 1), gen)
    batches = [
        (
            torch.randn(batch_size, 4, generator=gen),
            torch.randint(0, 2, (batch_size, 1), generator=gen).float(),
        )
        for _ in range(num_batches)
    ]
    return Problem("logistic_regression", model, nn.BCEWithLogitsLoss(), batches)


def tanh_mlp(num_batches: int = 3, batch_size: int = 8, seed: int = 2) -> Problem:
    """Two-layer tanh MLP (4 -> 6 -> 3) with ``F.cross_entropy`` (a plain function as loss)."""
    gen = _generator(seed)
    model = _init_(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), gen)
    batches = [
        (
            torch.randn(batch_size, 4, generator=gen),
            torch.randint(0, 3, (batch_size,), generator=gen),
        )
        for _ in range(num_batches)
    ]
    return Problem("tanh_mlp", model, F.cross_entropy, batches)


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.3)
        self.pool = nn.AvgPool2d(3)
        self.fc = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.drop(h.flatten(1)))


def cnn_batchnorm(num_batches: int = 3, batch_size: int = 6, seed: int = 3) -> Problem:
    """Conv -> BatchNorm2d -> ReLU -> pool -> dropout -> linear on 1x8x8 inputs, cross-entropy."""
    gen = _generator(seed)
    model = _init_(_SmallCNN(), gen)
    batches = [
        (
            torch.randn(batch_size, 1, 8, 8, generator=gen),
            torch.randint(0, 3, (batch_size,), generator=gen),
        )
        for _ in range(num_batches)
    ]
    return Problem("cnn_batchnorm", model, nn.CrossEntropyLoss(), batches)


class _TinyTransformer(nn.Module):
    def __init__(self, d_model: int = 4) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model, nhead=2, dim_feedforward=6, dropout=0.2, batch_first=True
        )
        self.head = nn.Linear(d_model, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def tiny_transformer(num_batches: int = 3, batch_size: int = 4, seed: int = 4) -> Problem:
    """One ``nn.TransformerEncoderLayer`` (d_model 4, 2 heads, dropout 0.2) + head, MSE."""
    gen = _generator(seed)
    model = _init_(_TinyTransformer(), gen)
    batches = [
        (
            torch.randn(batch_size, 3, 4, generator=gen),
            torch.randn(batch_size, 2, generator=gen),
        )
        for _ in range(num_batches)
    ]
    return Problem("tiny_transformer", model, F.mse_loss, batches)


class _TinyLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0].mean(dim=1))


def tiny_lstm(num_batches: int = 3, batch_size: int = 4, seed: int = 6) -> Problem:
    """``nn.LSTM(2, 3)`` over 5 time steps, mean over time, linear head, cross-entropy.

    In float32 on the CPU its forward pass would run oneDNN's fused LSTM kernel (no forward-mode
    derivative), on a GPU cuDNN's (no double backward): the probe runs it on PyTorch's own.
    """
    gen = _generator(seed)
    model = _init_(_TinyLSTM(), gen)
    batches = [
        (
            torch.randn(batch_size, 5, 2, generator=gen),
            torch.randint(0, 2, (batch_size,), generator=gen),
        )
        for _ in range(num_batches)
    ]
    return Problem("tiny_lstm", model, nn.CrossEntropyLoss(), batches)


class HFStyleModel(nn.Module):
    """Hugging Face style: ``forward(**batch)`` returns an object with ``.loss`` (and ``.logits``).

    Args:
        return_dict: return a plain ``dict`` with key ``"loss"`` instead of an attribute object.
    """

    def __init__(self, return_dict: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 4)
        self.dropout = nn.Dropout(0.25)
        self.classifier = nn.Linear(4, 3)
        self.return_dict = return_dict

    def forward(
        self, features: Tensor, labels: Tensor | None = None, scale: Tensor | None = None
    ) -> Any:
        h = torch.tanh(self.embed(features))
        if scale is not None:
            h = h * scale
        logits = self.classifier(self.dropout(h))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        if self.return_dict:
            return {"loss": loss, "logits": logits}
        return SimpleNamespace(loss=loss, logits=logits)


def hf_style(
    num_batches: int = 3, batch_size: int = 8, seed: int = 5, return_dict: bool = False
) -> Problem:
    """A dict-batch model computing its own cross-entropy loss (``loss=None`` for the probe)."""
    gen = _generator(seed)
    model = _init_(HFStyleModel(return_dict=return_dict), gen)
    batches = [
        {
            "features": torch.randn(batch_size, 5, generator=gen),
            "labels": torch.randint(0, 3, (batch_size,), generator=gen),
            "scale": torch.rand(1, generator=gen) + 0.5,
        }
        for _ in range(num_batches)
    ]
    return Problem("hf_style", model, None, batches, separable=False)


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "linear_regression": linear_regression,
    "logistic_regression": logistic_regression,
    "tanh_mlp": tanh_mlp,
    "cnn_batchnorm": cnn_batchnorm,
    "tiny_transformer": tiny_transformer,
    "tiny_lstm": tiny_lstm,
    "hf_style": hf_style,
}
"""Every factory by name."""

SEPARABLE = [name for name in PROBLEMS if name != "hf_style"]
"""Names of the problems whose loss is ``loss(outputs, targets)`` (GGN applies)."""


def make_problem(name: str, **kwargs: Any) -> Problem:
    """Build the problem ``name`` (a key of :data:`PROBLEMS`)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose from {sorted(PROBLEMS)}")
    return PROBLEMS[name](**kwargs)
