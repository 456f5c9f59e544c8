"""Layers and models of the mode-policy tests: stochastic depth, noise, hand-written norms, GPT-2.

Written here, in the style of the libraries they stand for, so that the tests need neither timm
nor torchvision. Every factory is seeded with its own ``torch.Generator`` (the global RNG is left
alone) and returns float32 modules in training mode, as users' are during training.
"""

from __future__ import annotations

from typing import Any

import torch
from _models import Problem
from torch import Tensor, nn

__all__ = [
    "DropPath",
    "FlakyNoise",
    "GaussianNoise",
    "MixBlock",
    "NoisyNet",
    "ResidualDropPathNet",
    "RunningStatsNorm1d",
    "drop_path",
    "droppath_problem",
    "gpt2_batches",
    "tiny_gpt2",
]


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """timm's ``drop_path``: drop whole examples' residual branches, rescale the kept ones."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    return x * random_tensor.div_(keep_prob)


class DropPath(nn.Module):
    """timm's ``DropPath``: stochastic depth that reads ``self.training`` (not a Dropout type)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, drop_prob: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.drop_path = DropPath(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(torch.relu(self.bn(self.conv(x))))


class ResidualDropPathNet(nn.Module):
    """conv -> BatchNorm2d -> ReLU -> DropPath, plus the skip, then a linear head (141 params)."""

    def __init__(self, channels: int = 2, size: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.block = _ResidualBlock(channels, drop_prob=0.2)
        self.head = nn.Linear(channels * size * size, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(x).flatten(1))


def _seeded_(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Parameters from ``gen``; norm layers get running statistics unlike any batch's."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if getattr(m, "running_var", None) is not None:
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model


def droppath_problem(num_batches: int = 2, batch_size: int = 6, seed: int = 11) -> Problem:
    """:class:`ResidualDropPathNet` on 2x4x4 inputs, 3 classes, cross-entropy."""
    gen = torch.Generator().manual_seed(seed)
    model = _seeded_(ResidualDropPathNet(), gen).train()
    batches = [
        (
            torch.randn(batch_size, 2, 4, 4, generator=gen),
            torch.randint(0, 3, (batch_size,), generator=gen),
        )
        for _ in range(num_batches)
    ]
    return Problem("droppath", model, nn.CrossEntropyLoss(), batches)


class GaussianNoise(nn.Module):
    """Noise injection that ignores ``self.training``: random in every mode."""

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        return x + self.sigma * torch.randn_like(x)


class FlakyNoise(GaussianNoise):
    """Draws like :class:`GaussianNoise`, and fails from its second call on (a failing replay)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("flaky")
        return super().forward(x)


class _NoisyBlock(nn.Module):
    def __init__(self, noise: nn.Module) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.noise = noise

    def forward(self, x: Tensor) -> Tensor:
        return self.noise(torch.tanh(self.linear(x)))


class NoisyNet(nn.Module):
    """Linear -> two tanh blocks -> linear head; ``blocks.{noisy}.noise`` is ``noise``."""

    def __init__(self, noise: nn.Module, noisy: int = 1) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.blocks = nn.ModuleList(
            [_NoisyBlock(noise if i == noisy else nn.Identity()) for i in range(2)]
        )
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class MixBlock(nn.Module):
    """Draws in its own forward, between its children's calls (shake-shake style, every mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        a = self.left(x)
        w = torch.rand(())
        return w * a + (1 - w) * self.right(x)


class RunningStatsNorm1d(nn.Module):
    """A hand-written BatchNorm1d that is no ``_NormBase``: batch statistics in training (running
    statistics updated), running statistics in eval."""

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(x.var(0), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def tiny_gpt2(dropout: float, attn_implementation: str = "eager", seed: int = 0) -> Any:
    """A random-init ``transformers.GPT2LMHeadModel`` (2 layers, width 32, vocabulary 50), in
    training mode, with every dropout probability ``dropout``; the same weights for every
    ``dropout`` and ``attn_implementation`` of one ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        attn_pdrop=dropout,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():  # HF initialises from the global generator
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.train()


def gpt2_batches(num_batches: int = 2, batch_size: int = 3, length: int = 8) -> list[dict]:
    """Dict batches with ``input_ids`` and ``labels`` (the model computes its own loss)."""
    gen = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(num_batches):
        ids = torch.randint(0, 50, (batch_size, length), generator=gen)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches
