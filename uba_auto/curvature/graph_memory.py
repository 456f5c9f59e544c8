r"""Which batches' gradient graphs an operator keeps: every one, or as many as fit a memory cap.

A cached double-backward graph holds what one batch's forward pass saves for backward and what its
gradient (taken with ``create_graph=True``) saves for the second backward: measured on the
benchmark models (``benchmarks/probe_models.py``), 1.3-2.0 times what a training step adds to
memory, per batch. Holding every batch's graph makes products cheap (a backward pass, no forward)
but multiplies that by the number of batches; recomputing a batch's graph in every product costs a
forward and a backward more and holds one graph at a time.

:class:`GraphCache` decides, batch by batch, which graphs to keep under a cap of
``graph_memory`` times :math:`T`, an estimate of one training step's working memory,

.. math::

    T = F_0 + 2P,

with :math:`F_0` the bytes the first batch's forward pass saves for backward (its activations)
and :math:`P` the bytes of the probed parameters (a training step adds their gradient and at least
one optimizer buffer). A batch's graph is kept when what a product then holds at once stays within
the cap: the kept graphs, plus room for one product's working memory, taken as large as the
largest graph measured. That room is the graph a recomputed product builds, and it is needed when
every graph is kept too: a backward pass through a kept graph (``retain_graph=True``, so nothing is
freed as it goes) adds 0.7-1.3 times the graph's size on the benchmark models, where a recomputed
product peaks at 1.2-2.2 times its graph (``python benchmarks/peak_memory.py MODEL hvp:kept`` and
``hvp:double-backward``; one batch's kept graph and its product peaked at 3.3-3.4 training steps
on the ResNet and the transformer, the recomputed product at 2.3-2.4). So a batch's graph is kept
only when twice it fits, whether or not it is the last. Batches are taken in order; after the
first one refused, the others are built without a graph and recomputed in every product.

Sizes are read from the graphs themselves (:func:`saved_bytes`: the tensors their nodes saved for
backward), on any device, without hooks and without running anything; tensors that exist anyway
(the parameters, the buffers, the batches) are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor
from torch.utils import _pytree

__all__ = ["GraphCache", "check_graph_memory", "saved_bytes"]


def _storages(tensors: Iterable[Any]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, Tensor)}


def saved_bytes(roots: Iterable[Tensor], exclude: set[int], seen: dict[int, int]) -> int:
    """Bytes of the distinct storages saved by the graph behind ``roots``, skipping ``exclude``.

    ``seen`` (storage -> bytes) is updated, so that graphs measured one after the other with the
    same ``seen`` count a storage they share once; returns the bytes added by these ``roots``.
    """
    before = sum(seen.values())
    stack = [r.grad_fn for r in roots if isinstance(r, Tensor) and r.grad_fn is not None]
    visited: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # a saved tensor already freed (a graph run without retain)
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, Tensor):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in exclude:
                        seen[storage.data_ptr()] = storage.nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(seen.values()) - before


class GraphCache:
    """The keep-or-recompute decision of :mod:`uba_auto.curvature.graph_memory` for one operator.

    Args:
        graph_memory: the cap, in estimated training steps (:math:`T`); ``None``: keep every
            graph (and measure nothing).
        resident: tensors that exist whatever the operator does (parameters, buffers, batches):
            not counted in a graph's size.
        param_bytes: :math:`P`.

    Attributes:
        kept: indices of the batches whose graphs are kept, in order.
        graph_bytes: measured size of each graph built (by batch index).
        step_bytes: the training-step estimate :math:`T` (``None`` before the first batch, or
            when nothing is measured).
    """

    def __init__(
        self,
        graph_memory: float | None,
        resident: Iterable[Any],
        param_bytes: int,
    ) -> None:
        self.graph_memory = graph_memory
        self.param_bytes = param_bytes
        self.kept: list[int] = []
        self.graph_bytes: dict[int, int] = {}
        self.step_bytes: int | None = None
        self._open = True
        self._resident = _storages(_pytree.tree_leaves(list(resident))) if graph_memory else set()

    @property
    def open(self) -> bool:
        """Whether the next batch is built with a graph (no batch refused so far)."""
        return self._open

    def admit(self, index: int, forward: Sequence[Tensor], rest: Sequence[Tensor]) -> bool:
        """Measure batch ``index``'s graph and decide whether it is kept; after a refusal
        :attr:`open` is ``False``.

        Args:
            index: the batch.
            forward: the forward pass's results (e.g. the loss): their graph is :math:`F`.
            rest: the rest of what is kept (e.g. the ``create_graph`` gradient).
        """
        if self.graph_memory is None:
            self.kept.append(index)
            return True
        seen: dict[int, int] = {}
        size = saved_bytes(forward, self._resident, seen)
        forward_bytes = size
        size += saved_bytes(rest, self._resident, seen)
        self.graph_bytes[index] = size
        if self.step_bytes is None:
            self.step_bytes = forward_bytes + 2 * self.param_bytes
        cap = self.graph_memory * self.step_bytes
        held = sum(self.graph_bytes[i] for i in self.kept) + size
        # Room for one product's working memory (see the module's docstring).
        if held + max(self.graph_bytes.values()) <= cap:
            self.kept.append(index)
            return True
        self._open = False
        return False


def check_graph_memory(graph_memory: Any) -> float | None:
    """``graph_memory`` checked: ``None`` or a positive finite number (returned as a float)."""
    if graph_memory is None:
        return None
    if isinstance(graph_memory, bool) or not isinstance(graph_memory, (int, float)):
        raise TypeError(
            "graph_memory must be None (keep every batch's graph) or a positive number (a cap "
            f"in training steps, e.g. 2.5), got {type(graph_memory).__name__}"
        )
    if not (math.isfinite(graph_memory) and graph_memory > 0):
        raise ValueError(
            f"graph_memory must be a positive finite number (a cap in training steps, e.g. 2.5) "
            f"or None (keep every batch's graph), got {graph_memory!r}"
        )
    return float(graph_memory)
