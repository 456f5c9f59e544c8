"""The demo's data and model: the digits, their split, the augmented minibatch stream, the CNN."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .environment import check_demo_dependencies
from .settings import DATA_SEED, NUM_TRAIN

__all__ = ["batch_stream", "load_data", "make_demo_model", "shift_images"]


def make_demo_model() -> nn.Module:
    """The demo's CNN for ``(N, 1, 8, 8)`` images: conv32-conv64-pool-fc128-fc10 (≈150k weights).

    Example:
        >>> make_demo_model()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def shift_images(images: Tensor, shifts: Tensor) -> Tensor:
    """Shift each image by at most one pixel per axis, filling with zeros.

    Args:
        images: ``(N, C, H, W)``.
        shifts: ``(2, N)`` integers in {0, 1, 2}: the row and column offsets plus one (1 keeps
            the image in place; 0 moves its content down/right, 2 up/left).

    Returns:
        The shifted images, same shape.

    Example:
        >>> img = torch.arange(9.0).view(1, 1, 3, 3)
        >>> shift_images(img, torch.tensor([[0], [1]]))[0, 0]
        tensor([[0., 0., 0.],
                [0., 1., 2.],
                [3., 4., 5.]])
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1))
    dev = images.device
    rows = torch.arange(h, device=dev)[None, :] + shifts[0].to(dev)[:, None]
    cols = torch.arange(w, device=dev)[None, :] + shifts[1].to(dev)[:, None]
    return padded[
        torch.arange(n, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def load_data(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and held-out images ``(N, 1, 8, 8)`` in [0, 1] and labels, on ``device``.

    The split depends on :data:`~uba_auto.demo.DATA_SEED` only: :data:`~uba_auto.demo.NUM_TRAIN`
    train images, the rest held out.

    Raises:
        ImportError: if scikit-learn (which ships the digits) is not installed.
    """
    check_demo_dependencies(plot=False)
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(DATA_SEED))
    train, held = order[:NUM_TRAIN], order[NUM_TRAIN:]
    return x[train].to(device), y[train].to(device), x[held].to(device), y[held].to(device)


def batch_stream(
    x: Tensor, y: Tensor, batch_size: int, seed: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless reshuffled epochs of shifted train images, ``batch_size`` each.

    The order and the shifts depend on ``seed`` only (a private generator), so every schedule sees
    the same minibatches in the same order, whatever the global RNG does.
    """
    gen = torch.Generator().manual_seed(1_000_003 * seed + 17)
    n = x.shape[0]
    while True:
        order = torch.randperm(n, generator=gen)
        # Drop the last incomplete batch: every step has the same batch size.
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size].to(x.device)
            shifts = torch.randint(0, 3, (2, batch_size), generator=gen)
            yield shift_images(x[idx], shifts), y[idx]
