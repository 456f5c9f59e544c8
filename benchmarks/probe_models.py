"""The four models of the probe benchmark (BENCHMARKS.md §1), their batches and their training step.

Nothing is downloaded: images are scikit-learn's bundled digits, text is ``pydoc_data.topics``
(Python's own documentation, shipped with the interpreter). Every model is built at a seeded
random initialisation, float32.

=============  ========  ===========================================================================
name           params    model, batch
=============  ========  ===========================================================================
``mlp``        26 122    tanh MLP 64-128-128-10 on digits, batch 256
``cnn``        9 930     two 3x3 convolutions + max-pool + linear head on digits (8x8), batch 256
``resnet``     2.8 M     half-width ResNet-18 (widths 32-64-128-256, BatchNorm, basic blocks) on
                         digits upsampled to 1x16x16, batch 64; BatchNorm on batch statistics
``transformer`` 0.87 M   4-layer GPT decoder, d 128, 4 heads, context 64, on bytes, batch 32
=============  ========  ===========================================================================

An extra model, not one of the four (:data:`EXTRA_MODELS`): ``lstm`` (149 k params), a byte-level
LM (Embedding(256, 64), ``nn.LSTM(64, 128)``, Linear(128, 256)), context 64, batch 32, for the
cost of a Hessian-vector product through a fused recurrent kernel (issue 13).

``python -c "import benchmarks.probe_models as m; m.summary()"`` prints the parameter counts.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

try:
    from benchmarks.transformer import TinyGPT
except ImportError:  # run from inside benchmarks/
    from transformer import TinyGPT  # type: ignore[no-redef]

__all__ = [
    "BATCH_SIZES",
    "EXTRA_MODELS",
    "MODELS",
    "batches",
    "loss_fn",
    "make_model",
    "resnet_stages",
    "summary",
    "train_step",
]

MODELS = ("mlp", "cnn", "resnet", "transformer")
EXTRA_MODELS = ("lstm",)
BATCH_SIZES = {"mlp": 256, "cnn": 256, "resnet": 64, "transformer": 32, "lstm": 32}
CONTEXT = 64


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_stages(
    in_channels: int, widths: tuple[int, ...], blocks_per_stage: int
) -> nn.Sequential:
    """The residual body of a ResNet: ``len(widths)`` stages of ``blocks_per_stage`` basic blocks,
    stride 2 at the start of every stage but the first, as one flat ``nn.Sequential``."""
    layers, cin = [], in_channels
    for i, cout in enumerate(widths):
        for j in range(blocks_per_stage):
            layers.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
            cin = cout
    return nn.Sequential(*layers)


class ResNet18(nn.Module):
    """ResNet-18 for small images (3x3 stem, no max-pool), ``width`` channels in the first stage."""

    def __init__(self, width: int = 32, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        widths = (width, 2 * width, 4 * width, 8 * width)
        self.layers = resnet_stages(width, widths, blocks_per_stage=2)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ByteLSTM(nn.Module):
    """A byte-level language model: embedding, one ``nn.LSTM`` layer, a linear read-out."""

    def __init__(self, vocab_size: int = 256, embed: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


def digits_cnn() -> nn.Module:
    """conv16-conv32-pool-linear on flat 64-pixel digits (9 930 weights): the ``cnn`` model here
    and the model of the φ study's ``digits_cnn`` task (``benchmarks/tasks.py``)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def make_model(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """The model ``name`` (of :data:`MODELS` or :data:`EXTRA_MODELS`) at its seeded
    initialisation, in train mode."""
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
        )
    elif name == "cnn":
        model = digits_cnn()
    elif name == "resnet":
        model = ResNet18(width=32)
    elif name == "transformer":
        model = TinyGPT(vocab_size=256, context=CONTEXT, d_model=128, num_layers=4, num_heads=4)
    elif name == "lstm":
        model = ByteLSTM()
    else:
        raise ValueError(f"model must be one of {MODELS + EXTRA_MODELS}, got {name!r}")
    return model.to(device)


def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy, over tokens for the language model's ``(batch, time, vocab)`` outputs."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


@functools.cache
def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    return x, torch.tensor(data.target, dtype=torch.int64)


@functools.cache
def _text_codes() -> Tensor:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def batches(name: str, count: int, device: torch.device | str = "cpu") -> list[tuple[Tensor, Any]]:
    """``count`` distinct training batches of model ``name`` (fixed: the same on every call)."""
    size = BATCH_SIZES[name]
    out = []
    if name in ("transformer", "lstm"):
        codes = _text_codes()
        gen = torch.Generator().manual_seed(1)
        starts = torch.randint(0, codes.numel() - CONTEXT - 1, (count, size), generator=gen)
        for row in starts:
            idx = row[:, None] + torch.arange(CONTEXT)
            out.append((codes[idx].to(device), codes[idx + 1].to(device)))
        return out
    x, y = _digits()
    gen = torch.Generator().manual_seed(1)
    for _ in range(count):  # each batch a random subset of the 1797 digits (seeded)
        idx = torch.randperm(x.shape[0], generator=gen)[:size]
        xb, yb = x[idx], y[idx]
        if name == "resnet":
            xb = F.interpolate(xb.view(-1, 1, 8, 8), size=16, mode="bilinear", align_corners=False)
        out.append((xb.to(device), yb.to(device)))
    return out


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> None:
    """One training step on ``batch``: zero the gradients, forward, backward, step."""
    optimizer.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()
    optimizer.step()


def summary() -> None:
    for name in MODELS + EXTRA_MODELS:
        model = make_model(name)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n} parameters, batch {BATCH_SIZES[name]}")


if __name__ == "__main__":
    summary()
