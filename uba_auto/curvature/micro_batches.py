r"""A recomputed product in micro-batches: the same product, a fraction of its memory.

Under a ``graph_memory`` cap (:mod:`~uba_auto.curvature.graph_memory`) a batch whose gradient
graph is not kept is rebuilt in every product: a forward pass, a ``create_graph`` backward and
the second backward, over the whole batch at once. That one graph is what sets the probe's peak
memory on activation-heavy models (2.3-2.4 training steps for one product on the benchmark
transformer and ResNet, ``python benchmarks/peak_memory.py MODEL hvp:double-backward``). When a
batch's loss is the example-weighted mean of the losses of its parts,

.. math::

    \ell_b(\theta) = \sum_c \frac{n_c}{n_b}\, \ell_{b,c}(\theta)
    \quad\Longrightarrow\quad
    H_b v = \sum_c \frac{n_c}{n_b}\, \nabla_\theta\big(\nabla_\theta \ell_{b,c}^\top v\big),

so the product can be rebuilt one micro-batch :math:`c` at a time, holding one micro-batch's
graph: the memory of the product shrinks with the number of parts, the arithmetic stays the same.

Whether a loss is such a mean is a property of the model and the loss together, not of the loss
function alone: BatchNorm on batch statistics, in-batch negatives (contrastive losses), a mean
over the tokens of padded sequences when the parts hold unequal numbers of tokens, a loss
normalised by something of the whole batch, all make a batch's loss more than the mean of its
parts. So it is checked at the probe's point before any product is computed, and a batch is split
only where the check passes:

* every split batch: the example-weighted mean of its parts' losses equals its loss (relative
  difference at most :data:`LOSS_RTOL` machine epsilons);
* the first batch recomputed (whose gradient the operator has just taken): the example-weighted
  mean of its parts' gradients equals its gradient (relative difference in norm at most
  :data:`GRADIENT_RTOL` times the square root of machine epsilon). A coupling that a value hides
  (parts whose losses happen to agree) shows in the gradient.

A check that fails leaves that batch whole (the gradient check: every batch) and the operator
says why (``micro_batch_note``). What the check costs: one forward pass per split batch without a
graph, and one gradient of the first one's parts: about a product, once.

How many parts: the fewest, :math:`k = \lceil 2 S / (\text{graph\_memory}\cdot T) \rceil`, with
:math:`S` the first recomputed batch's measured graph and :math:`T` the training-step estimate:
the room-for-one-product rule of :class:`~uba_auto.curvature.graph_memory.GraphCache` applied to
one micro-batch's graph; a graph under :data:`MIN_SPLIT_BYTES` is left whole. At most one
example per part. A batch splits along the leading dimension
of its tensors, which must all have the same one (tensors without a dimension, or with a leading
1 that broadcasts beside them, are shared by every part); anything else is left whole.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from uba_auto._batches import map_tensors, tensor_leaves

__all__ = [
    "GRADIENT_RTOL",
    "LOSS_RTOL",
    "MIN_SPLIT_BYTES",
    "MicroBatchPlan",
    "gradients_agree",
    "losses_agree",
    "micro_batch_parts",
    "split_batch",
]

LOSS_RTOL = 256
"""A split batch's loss must equal the weighted mean of its parts' to this many machine epsilons
(relative): summing in another order moves a float32 mean of 10^4-10^5 terms by a few."""

MIN_SPLIT_BYTES = 4 * 2**20
"""A graph under 4 MiB is never split: there each part's fixed cost (a forward and two backward
calls) outweighs what the split saves. Measured side by side (``python benchmarks/warm_start.py
share --compare micro``, 2-core CPU, 2026-12-07), the default probe's wall time split ÷ whole:
the MLP (a 0.7 MiB graph per batch) 1.19-1.32, the CNN (7.5 MiB) 0.72-0.90, the transformer
(161 MiB) 0.91-0.96."""

GRADIENT_RTOL = 8
"""The first split batch's gradient must equal the weighted mean of its parts' to this many square
roots of machine epsilon (relative, in norm): 2.8e-3 in float32, 1.2e-7 in float64. The
per-example gradients of a mean nearly cancel near a minimum, so the rounding of their sum, relative
to the mean, grows there; a coupling between examples moves the gradient by far more."""


def split_batch(batch: Any, parts: int) -> list[tuple[Any, float]] | None:
    """``batch`` split into ``parts`` consecutive micro-batches along its leading dimension.

    Every tensor whose leading dimension is the examples' is sliced (views, nothing copied);
    0-dim tensors, tensors with a leading dimension of 1 beside others with more (they
    broadcast) and other objects are shared by every part; tuples (named ones too), lists and
    mappings are rebuilt (a mapping as a ``dict``). Parts differ in size by at most one example.

    Args:
        batch: a tensor or a nested structure of tuples, lists and mappings holding tensors.
        parts: how many micro-batches; at most the batch's number of examples is made.

    Returns:
        ``(micro-batch, n_c / n)`` pairs in order, or ``None`` when the batch cannot be split:
        ``parts < 2``, no tensor with a dimension, tensors whose leading dimensions differ other
        than by a broadcast 1 (which one is the examples' cannot be told), or fewer than two
        examples.

    Example:
        >>> import torch
        >>> parts = split_batch((torch.arange(5.0), torch.tensor([0, 1, 0, 1, 1])), 2)
        >>> [(x.tolist(), y.tolist(), w) for (x, y), w in parts]
        [([0.0, 1.0, 2.0], [0, 1, 0], 0.6), ([3.0, 4.0], [1, 1], 0.4)]
    """
    if isinstance(parts, bool) or not isinstance(parts, int):
        raise TypeError(f"parts must be an int, got {type(parts).__name__}")
    sizes = {int(t.shape[0]) for t in tensor_leaves(batch) if t.ndim > 0}
    if len(sizes) > 1:
        sizes.discard(1)  # a leading 1 beside n examples broadcasts (a per-batch scale)
    if parts < 2 or len(sizes) != 1:
        return None
    (n,) = sizes
    parts = min(parts, n)
    if parts < 2:
        return None
    # Near-equal parts, the larger ones first.
    bounds = [0, *(math.ceil(j * n / parts) for j in range(1, parts)), n]

    def sliced(a: int, b: int) -> Any:
        return map_tensors(batch, lambda t: t[a:b] if t.ndim > 0 and t.shape[0] == n else t)

    return [(sliced(a, b), (b - a) / n) for a, b in itertools.pairwise(bounds)]


def micro_batch_parts(graph_bytes: int, cap_bytes: float) -> int:
    """The fewest parts whose graph, twice over, fits the cap: ``ceil(2 S / cap)``, at least 1;
    1 for a graph under :data:`MIN_SPLIT_BYTES`.

    Args:
        graph_bytes: :math:`S`, the bytes of one whole batch's gradient graph.
        cap_bytes: ``graph_memory`` times the training-step estimate, in bytes.

    Example:
        >>> MiB = 2**20
        >>> micro_batch_parts(161 * MiB, 207.0 * MiB), micro_batch_parts(50 * MiB, 207.0 * MiB)
        (2, 1)
        >>> micro_batch_parts(MiB, 0.1 * MiB)  # too small to be worth a slower product
        1
    """
    if cap_bytes <= 0 or graph_bytes <= 0 or graph_bytes < MIN_SPLIT_BYTES:
        return 1
    return max(1, math.ceil(2 * graph_bytes / cap_bytes))


def losses_agree(whole: Tensor, parts: Sequence[tuple[Tensor, float]], eps: float) -> float | None:
    """``None`` when ``whole`` equals the weighted mean of ``parts`` (see :data:`LOSS_RTOL`), else
    the relative difference."""
    mean = sum(float(loss) * w for loss, w in parts)
    scale = abs(float(whole)) + sum(abs(float(loss)) * w for loss, w in parts)
    diff = abs(mean - float(whole))
    return None if diff <= LOSS_RTOL * eps * scale else diff / max(scale / 2, 1e-300)


def gradients_agree(whole: Tensor, mean: Tensor, eps: float) -> float | None:
    """``None`` when ``mean`` equals ``whole`` (see :data:`GRADIENT_RTOL`), else the relative
    difference in norm."""
    norm = float(torch.linalg.vector_norm(whole))
    diff = float(torch.linalg.vector_norm(mean - whole))
    if diff <= GRADIENT_RTOL * math.sqrt(eps) * norm:
        return None
    return diff / norm if norm > 0 else math.inf


@dataclass(frozen=True)
class MicroBatchPlan:
    """Which recomputed batches run in micro-batches, and why the others do not.

    Attributes:
        pieces: batch index -> ``(micro-batch, weight)`` pairs, for the split batches only.
        note: why batches that would have been split were not (``None`` when none was refused).
    """

    pieces: Mapping[int, Sequence[tuple[Any, float]]] = field(default_factory=dict)
    note: str | None = None

    @property
    def parts(self) -> dict[int, int]:
        """Batch index -> number of micro-batches, for the split batches."""
        return {i: len(p) for i, p in self.pieces.items()}
