"""The batches the probe uses: taken from the user's loader once and moved to the model's device.

Which forms a batch may take, and how one batch becomes one scalar loss, is
:mod:`uba_auto.curvature.batch_loss`'s; the mode policy (BatchNorm, dropout) is
:mod:`uba_auto.curvature.modes`'.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._loaders import loader_untouched

__all__ = [
    "BatchSet",
    "as_batch_set",
    "batch_size_of",
    "collect_batches",
    "floating_leaves",
    "map_tensors",
    "move_batch",
    "tensor_leaves",
    "with_floating_leaves",
]


@dataclass(frozen=True)
class BatchSet:
    """The batches the probe uses, already on the model's device.

    Attributes:
        batches: the batches, tensors moved (and floating tensors optionally cast).
        batch_sizes: leading dimension of each batch's first tensor, ``None`` where it has none.
        num_requested: the ``num_batches`` asked for, ``None`` for "all the loader yields".
    """

    batches: list[Any]
    batch_sizes: list[int | None] = field(default_factory=list)
    num_requested: int | None = None

    @property
    def num_found(self) -> int:
        """How many batches the loader actually yielded (at most :attr:`num_requested`)."""
        return len(self.batches)

    @property
    def is_short(self) -> bool:
        """Whether the loader ran out before :attr:`num_requested` batches."""
        return self.num_requested is not None and self.num_found < self.num_requested

    @property
    def shortfall_message(self) -> str | None:
        """A sentence for a result's warnings when the loader ran short, else ``None``."""
        if not self.is_short:
            return None
        return (
            f"num_batches={self.num_requested} was requested but the loader yielded only "
            f"{self.num_found}; the curvature was measured on those {self.num_found}"
        )


def tensor_leaves(obj: Any) -> Iterator[Tensor]:
    """The tensors of a nested structure of tuples, lists and mappings, depth first, in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensor_leaves(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from tensor_leaves(item)


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``obj`` with every tensor replaced by ``fn(tensor)``, in :func:`tensor_leaves` order.

    Tuples (also named tuples) and lists are rebuilt with their type, mappings as a ``dict``;
    other objects are returned as they are.
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(item, fn) for item in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(item, fn) for item in obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Return ``batch`` with every tensor moved to ``device``, recursively.

    Tuples (also named tuples), lists and mappings are rebuilt (a mapping becomes a ``dict``); other
    objects are returned as they are.

    Args:
        batch: a tensor, or a nested structure of tuples, lists and mappings holding tensors.
        device: target device.
        dtype: if given, floating-point tensors are cast to it (integer and boolean tensors, such as
            class labels and masks, keep theirs). ``None`` keeps every dtype.

    Example:
        >>> import torch
        >>> batch = (torch.zeros(2), torch.tensor([1, 0]))
        >>> b = move_batch(batch, torch.device("cpu"), torch.float64)
        >>> b[0].dtype, b[1].dtype
        (torch.float64, torch.int64)
    """

    def move(t: Tensor) -> Tensor:
        cast = dtype if dtype is not None and t.is_floating_point() else None
        return t.to(device=device, dtype=cast)

    return map_tensors(batch, move)


def _first_tensor(obj: Any) -> Tensor | None:
    return next(tensor_leaves(obj), None)


def batch_size_of(batch: Any) -> int | None:
    """Leading dimension of the batch's first tensor (the inputs for a pair), else ``None``."""
    t = _first_tensor(batch)
    if t is None or t.ndim == 0:
        return None
    return int(t.shape[0])


def collect_batches(
    loader: Iterable[Any],
    num_batches: int | None = None,
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> BatchSet:
    """Take the first ``num_batches`` batches of ``loader`` and move them to ``device``.

    Args:
        loader: any iterable of batches: a ``DataLoader``, a list of batches, a generator. It is
            iterated once, under :func:`~uba_auto._loaders.loader_untouched`: its generators
            and the global CPU generator are as they were afterwards, so the next pass over a
            ``DataLoader`` yields the same batches in the same order. A one-shot iterator loses
            the batches taken; callers that take only the first ones refuse it first
            (:func:`~uba_auto._loaders.check_reiterable`).
        num_batches: how many batches to take; ``None`` takes all (never with an infinite loader).
            If the loader yields fewer, all of them are kept and the shortfall is recorded in the
            result (:attr:`BatchSet.is_short`) for the caller to report.
        device: the model's device.
        dtype: cast floating-point tensors to this dtype (used for float64 probes); ``None`` keeps
            each tensor's dtype.

    Returns:
        A :class:`BatchSet`.

    Raises:
        TypeError: if ``loader`` is a tensor, a mapping or not iterable.
        ValueError: if ``loader`` looks like a single ``(inputs, targets)`` batch, if
            ``num_batches`` is not a positive integer, or if the loader yields no batches.

    Example:
        >>> import torch
        >>> data = [(torch.zeros(4, 2), torch.zeros(4)) for _ in range(2)]
        >>> bs = collect_batches(data, 3, device="cpu")
        >>> bs.num_found, bs.is_short, bs.batch_sizes
        (2, True, [4, 4])
    """
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(
            f"num_batches must be a positive int or None (all batches), got {num_batches!r}"
        )
    if isinstance(loader, Tensor):
        raise TypeError(
            "loader must be an iterable of batches, got a Tensor (iterating it yields its rows); "
            "pass [(inputs, targets)] for a single batch"
        )
    if isinstance(loader, Mapping):
        raise TypeError(
            "loader must be an iterable of batches, got a mapping (iterating it yields its keys); "
            "pass [batch] for a single dict batch"
        )
    if isinstance(loader, tuple) and loader and all(isinstance(b, Tensor) for b in loader):
        raise ValueError(
            f"loader is a tuple of {len(loader)} tensors, which looks like a single "
            "(inputs, targets) batch rather than an iterable of batches; wrap it in a list: "
            "[(inputs, targets)]"
        )
    device = torch.device(device)
    # iter() is inside: iter(DataLoader) is what draws the shuffling seed.
    with loader_untouched(loader):
        try:
            iterator: Iterator[Any] = iter(loader)
        except TypeError:
            raise TypeError(
                f"loader must be an iterable of batches (a DataLoader or a list), "
                f"got {type(loader).__name__}"
            ) from None
        batches = [move_batch(b, device, dtype) for b in itertools.islice(iterator, num_batches)]
    if not batches:
        raise ValueError(
            "loader yielded no batches; check that the dataset is not empty and that the loader "
            "was not already exhausted (a generator can be iterated only once)"
        )
    return BatchSet(
        batches=batches,
        batch_sizes=[batch_size_of(b) for b in batches],
        num_requested=num_batches,
    )


def as_batch_set(
    batches: Iterable[Any] | BatchSet, *, device: torch.device, dtype: torch.dtype | None = None
) -> BatchSet:
    """Every batch of ``batches`` on ``device``: a :class:`BatchSet` keeps its record, any other
    iterable is collected whole (:func:`collect_batches`).

    Raises:
        ValueError: for an empty :class:`BatchSet` or loader.
    """
    if not isinstance(batches, BatchSet):
        return collect_batches(batches, None, device=device, dtype=dtype)
    if not batches.batches:
        raise ValueError("loader yielded no batches: the BatchSet given is empty")
    return BatchSet(
        batches=[move_batch(b, device, dtype) for b in batches.batches],
        batch_sizes=list(batches.batch_sizes),
        num_requested=batches.num_requested,
    )


def floating_leaves(obj: Any) -> list[Tensor]:
    """The floating tensors of a batch (or of its targets), in a fixed traversal order.

    The forward-over-reverse engines pass them to ``torch.func.jvp`` as primals with explicit
    zero tangents. Captured without a tangent, a target gets an efficient ZeroTensor tangent,
    which the forward-mode formula of ``mse_loss_backward`` (reduction="mean") writes into in
    place and fails with "ZeroTensors are immutable" (pytorch/pytorch#123996, open as of torch
    2.13); a materialised zero costs little and gives the same product.
    """
    return [t for t in tensor_leaves(obj) if t.is_floating_point()]


def with_floating_leaves(obj: Any, leaves: Iterator[Tensor]) -> Any:
    """``obj`` with its floating tensors replaced, in :func:`floating_leaves` order."""
    return map_tensors(obj, lambda t: next(leaves) if t.is_floating_point() else t)
