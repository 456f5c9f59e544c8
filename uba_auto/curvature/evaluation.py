r"""What every engine closes over, and what it builds: per-batch curvature as pure functions.

An engine turns an :class:`Evaluation` (this process's batches, the loss, the point, the mode
policy) into a :class:`BatchCurvature`: the batch losses at the point and two functions of
``terms``, a sequence of ``(batch index, coefficient)`` pairs,

.. math::

    \mathrm{product}(v, \mathrm{terms}) = \sum_{(b, c)} c \, A_b v, \qquad
    \mathrm{gradient}(\mathrm{terms}) = \sum_{(b, c)} c \, \nabla_\theta \ell_b,

with :math:`A_b` the curvature (Hessian or GGN) of batch :math:`b`'s loss. Operators choose the
terms: every batch with weight :math:`1/B` for the mean, one batch with weight 1 for
``batch_operator(i)``, each rank's share of the global batch under a process group. An engine is
chosen once, when the operator is built; it keeps whatever graphs it caches in its closures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from uba_auto._batches import BatchSet
from uba_auto.curvature.batch_loss import check_finite_losses, loss_at
from uba_auto.curvature.errors import check_twice_differentiable, derivative_errors
from uba_auto.curvature.graph_memory import GraphCache
from uba_auto.curvature.modes import ModePolicy
from uba_auto.curvature.params import ParameterPoint

__all__ = [
    "ENGINES",
    "BatchCurvature",
    "Engine",
    "Evaluation",
    "Terms",
]

ENGINES = ("double-backward", "forward-over-reverse")
"""How second derivatives are taken; see :class:`~uba_auto.curvature.HessianOperator`."""

Terms = Sequence[tuple[int, float]]
"""``(batch index, coefficient)`` pairs: which batch curvatures a product sums, and how weighted."""


@dataclass(frozen=True, eq=False)
class Evaluation:
    """This process's batches, the loss, the point and the mode policy: what engines close over.

    Attributes:
        operator: the operator's class name, for the messages.
        engine: one of :data:`ENGINES`, for the messages.
        model: the unwrapped model.
        batch_set: the batches, on the model's device (floating tensors cast to the probe dtype
            when one was asked for).
        loss: ``None``, ``loss(outputs, targets)`` or a ``ModelLoss``.
        point: the parameters at which the operator is built.
        policy: the mode policy.
        graph_memory: the cap on cached gradient graphs, in estimated training steps
            (:mod:`~uba_auto.curvature.graph_memory`); ``None``: every batch's graph is kept.
        micro_batches: under that cap, recompute a batch's product in micro-batches where its
            loss is the mean of theirs (:mod:`~uba_auto.curvature.micro_batches`).
    """

    operator: str
    engine: str
    model: nn.Module
    batch_set: BatchSet
    loss: Any
    point: ParameterPoint
    policy: ModePolicy
    graph_memory: float | None = None
    micro_batches: bool = True
    # Batches whose gradient graph was checked for @once_differentiable Functions: the graph's
    # structure does not change between products, so once per batch is enough.
    _checked: set[int] = field(default_factory=set, init=False, repr=False)

    @property
    def batches(self) -> list[Any]:
        return self.batch_set.batches

    def graph_cache(self) -> GraphCache:
        """A fresh keep-or-recompute decision for this evaluation's batch graphs."""
        point = self.point
        resident = [*point.with_buffers(point.leaves).values(), *self.batches]
        param_bytes = point.size * point.dtype.itemsize
        return GraphCache(self.graph_memory, resident, param_bytes)

    def batch_loss(self, index: int, trainable: Mapping[str, Tensor], batch: Any = None) -> Tensor:
        """Batch ``index``'s scalar loss with the probed parameters set to ``trainable``; with
        ``batch``, that batch's loss instead (a micro-batch of batch ``index``)."""
        return loss_at(
            self.point.with_buffers(trainable),
            self.model,
            self.batches[index] if batch is None else batch,
            self.loss,
            batch_index=index,
        )

    @contextlib.contextmanager
    def computing(self, *, derivatives: bool = False, check_rng: bool = False) -> Iterator[None]:
        """Run a computation under the mode policy.

        Args:
            derivatives: translate errors about missing higher-order/forward-mode derivatives.
            check_rng: raise if the block drew random numbers (restoring the generators first),
                naming the modules that drew them (a replay of the batch losses, with hooks).
        """
        translating = (
            derivative_errors(self.operator, self.engine)
            if derivatives
            else contextlib.nullcontext()
        )
        replay = self._replay_losses if check_rng else None
        with translating, self.policy.applied(check_rng=check_rng, replay=replay):
            yield

    def _replay_losses(self) -> None:
        # What the RNG check replays to name the layers that drew: every batch's forward and loss.
        with torch.no_grad():
            for i in range(len(self.batches)):
                self.batch_loss(i, self.point.primals)

    def stacked_losses(self, losses: Sequence[Tensor]) -> Tensor:
        """The batch losses as one detached 1-D tensor, checked finite."""
        stacked = torch.stack([loss.detach().to(self.point.dtype) for loss in losses])
        check_finite_losses(stacked)
        return stacked

    def losses_without_graph(self) -> Tensor:
        """The batch losses at the point, for engines that cache no graph (random draws refused)."""
        with self.computing(derivatives=True, check_rng=True), torch.no_grad():
            losses = [self.batch_loss(i, self.point.primals) for i in range(len(self.batches))]
        return self.stacked_losses(losses)

    def differentiable_grad(self, loss: Tensor, index: int) -> Tensor:
        """Flat gradient of ``loss`` that keeps its graph (the first half of a Hessian product)."""
        if not loss.requires_grad:
            return self.point.zeros()
        leaves = list(self.point.leaves.values())
        grad = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        flat = self.point.flatten(grad)
        self.check_graph(flat, index)
        return flat

    def check_graph(self, grad: Tensor, index: int) -> None:
        """Refuse a @once_differentiable Function in batch ``index``'s graph (checked once)."""
        if index not in self._checked:
            check_twice_differentiable(grad, index, operator=self.operator, engine=self.engine)
            self._checked.add(index)

    def gradient(self, terms: Terms) -> Tensor:
        """:math:`\\sum c \\nabla \\ell_b`, a backward pass per batch (engines without a cache)."""
        self.point.check_unchanged(self.operator)
        leaves = list(self.point.leaves.values())
        total = self.point.zeros()
        with self.computing():
            for i, coefficient in terms:
                loss = self.batch_loss(i, self.point.leaves)
                if loss.requires_grad:
                    grad = torch.autograd.grad(loss, leaves, allow_unused=True)
                    total += coefficient * self.point.flatten(grad)
        return total


@dataclass(frozen=True)
class BatchCurvature:
    """What an engine builds (see the module docstring).

    Attributes:
        batch_losses: every batch's loss at the point, a detached 1-D tensor.
        product: ``(v, terms) -> Σ c A_b v``.
        gradient: ``terms -> Σ c ∇ℓ_b`` (no graph attached).
        cached: the batches whose graphs the engine keeps (the others are recomputed in every
            product, or need no graph).
        parts: recomputed batches whose product runs in micro-batches -> how many.
        micro_batch_note: why recomputed batches that would have been split were not.
    """

    batch_losses: Tensor
    product: Callable[[Tensor, Terms], Tensor]
    gradient: Callable[[Terms], Tensor]
    cached: tuple[int, ...] = ()
    parts: Mapping[int, int] = field(default_factory=dict)
    micro_batch_note: str | None = None


Engine = Callable[[Evaluation], BatchCurvature]
"""An engine: builds the per-batch curvature of an evaluation (caching what it needs)."""
