r"""The Hessian-vector product of each batch's loss, one closure per engine.

.. math::

    H_b v = \nabla_\theta \big(\nabla_\theta \ell_b(\theta)^\top v\big).

Engines (:data:`HESSIAN_ENGINES`; an operator picks one, once):

* ``double-backward`` with a cached graph: per batch, the gradient is computed once with
  ``create_graph=True`` and its graph kept, so a product is one backward pass through every
  batch's graph at once, with no forward pass. Under a ``graph_memory`` cap only the graphs that
  fit are kept (:mod:`~uba_auto.curvature.graph_memory`); the other batches are recomputed in
  every product, as without a cache, and where the loss allows it in micro-batches, one part's
  graph at a time (:mod:`~uba_auto.curvature.micro_batches`).
* ``double-backward`` without a cache: the forward and the gradient are recomputed for every
  product (memory for one batch at a time).
* ``forward-over-reverse``: ``torch.func.jvp(torch.func.grad(loss), (θ,), (v,))`` per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from uba_auto._batches import floating_leaves, with_floating_leaves
from uba_auto.curvature.batch_loss import ModelLoss, loss_at
from uba_auto.curvature.errors import derivative_errors
from uba_auto.curvature.evaluation import BatchCurvature, Engine, Evaluation, Terms
from uba_auto.curvature.graph_memory import GraphCache
from uba_auto.curvature.micro_batches import (
    MicroBatchPlan,
    gradients_agree,
    losses_agree,
    micro_batch_parts,
    split_batch,
)

__all__ = ["HESSIAN_ENGINES"]


def _cached(ev: Evaluation) -> BatchCurvature:
    point = ev.point
    leaves = list(point.leaves.values())
    cache = ev.graph_cache()
    losses: list[Tensor] = []
    grads: list[Tensor | None] = []  # None: recomputed in every product
    refused: tuple[int, Tensor] | None = None  # the first batch refused, and its gradient
    with ev.computing(derivatives=True, check_rng=True):
        for i in range(len(ev.batches)):
            if not cache.open:
                with torch.no_grad():
                    losses.append(ev.batch_loss(i, point.primals))
                grads.append(None)
                continue
            loss = ev.batch_loss(i, point.leaves)
            grad = ev.differentiable_grad(loss, i)
            losses.append(loss.detach())
            kept = cache.admit(i, [loss], [grad])
            grads.append(grad if kept else None)
            if not kept and ev.micro_batches:
                refused = (i, grad.detach())
            # A refused graph goes with its last reference, here.
            del loss, grad
    plan = _micro_batch_plan(ev, cache, losses, refused) if refused else MicroBatchPlan()
    recompute = _recomputed(ev, plan)

    def product(v: Tensor, terms: Terms) -> Tensor:
        point.check_unchanged(ev.operator)
        live = [(i, c) for i, c in terms if grads[i] is not None and grads[i].requires_grad]
        others = [(i, c) for i, c in terms if grads[i] is None]
        if not live:
            return recompute(v, others) if others else torch.zeros_like(v)
        # A backward pass only: no forward runs, so there is no mode policy to apply (training
        # flags and kernel choices act on forward passes, and were applied when the graphs were
        # built). Entering it cost 0.05-0.2 ms per product, 0.1-0.4 gradients on the benchmark
        # MLP's one-batch product (benchmarks/product_overhead.py).
        with derivative_errors(ev.operator, ev.engine):
            # One backward through the selected cached gradient graphs: Σ_b ∇(g_bᵀ c_b v).
            hv = torch.autograd.grad(
                [grads[i] for i, _ in live],
                leaves,
                [v if c == 1.0 else v * c for _, c in live],
                retain_graph=True,
                allow_unused=True,
            )
        total = point.flatten(hv)
        return total + recompute(v, others) if others else total

    def gradient(terms: Terms) -> Tensor:
        kept = [(i, c) for i, c in terms if grads[i] is not None]
        others = [(i, c) for i, c in terms if grads[i] is None]
        total = sum((grads[i].detach() * c for i, c in kept), point.zeros())
        return total + ev.gradient(others) if others else total

    return BatchCurvature(
        ev.stacked_losses(losses),
        product,
        gradient,
        tuple(cache.kept),
        plan.parts,
        plan.note,
    )


def _micro_batch_plan(
    ev: Evaluation, cache: GraphCache, losses: list[Tensor], refused: tuple[int, Tensor]
) -> MicroBatchPlan:
    """Which recomputed batches are split, checked at the point (see
    :mod:`~uba_auto.curvature.micro_batches`)."""
    first, whole_grad = refused
    cap = (cache.graph_memory or 0.0) * (cache.step_bytes or 0)
    parts = micro_batch_parts(cache.graph_bytes[first], cap)
    if parts < 2:
        return MicroBatchPlan()
    point = ev.point
    eps = torch.finfo(point.dtype).eps
    leaves = list(point.leaves.values())
    pieces: dict[int, list[tuple[Any, float]]] = {}
    refusals: list[str] = []
    with ev.computing(derivatives=True):
        for i in range(first, len(ev.batches)):
            split = split_batch(ev.batches[i], parts)
            if split is None:
                refusals.append(f"batch {i} has no leading dimension shared by its tensors")
                continue
            with torch.no_grad():
                part_losses = [(ev.batch_loss(i, point.primals, b), w) for b, w in split]
            off = losses_agree(losses[i], part_losses, eps)
            if off is not None:
                refusals.append(
                    f"batch {i}'s loss is not the mean of its parts' (off by {off:.1e})"
                )
                continue
            pieces[i] = split
        if first in pieces:
            mean = point.zeros()
            for b, w in pieces[first]:
                loss = ev.batch_loss(first, point.leaves, b)
                if loss.requires_grad:
                    grad = torch.autograd.grad(loss, leaves, allow_unused=True)
                    mean.add_(point.flatten(grad), alpha=w)
            off = gradients_agree(whole_grad, mean, eps)
            if off is not None:
                refusals = [
                    f"batch {first}'s gradient is not the mean of its parts' (off by {off:.1e})"
                ]
                pieces = {}
    note = None
    if refusals:
        note = (
            f"recomputed products left whole where {parts} micro-batches would have held less "
            f"memory: {'; '.join(refusals[:3])}{' ...' if len(refusals) > 3 else ''}. A loss "
            "that couples a batch's examples (BatchNorm on batch statistics, in-batch negatives, "
            "a mean over unequal token counts) cannot be split"
        )
    return MicroBatchPlan(pieces, note)


def _recomputed(
    ev: Evaluation, plan: MicroBatchPlan | None = None
) -> Callable[[Tensor, Terms], Tensor]:
    """The product of batches without a cached graph: forward and gradient rebuilt every time,
    one micro-batch at a time for the batches ``plan`` splits."""
    point = ev.point
    leaves = list(point.leaves.values())
    pieces = {} if plan is None else plan.pieces

    def product(v: Tensor, terms: Terms) -> Tensor:
        point.check_unchanged(ev.operator)
        # The sum is allocated after the first graph is freed, not beside it (where the peak is).
        total: Tensor | None = None
        with ev.computing(derivatives=True):
            for i, c in terms:
                for batch, w in pieces.get(i, ((None, 1.0),)):
                    g = ev.differentiable_grad(ev.batch_loss(i, point.leaves, batch), i)
                    if not g.requires_grad:
                        continue
                    hv = torch.autograd.grad(g, leaves, v, allow_unused=True)
                    del g  # the graph is freed before the sum grows
                    part = point.flatten(hv)
                    del hv
                    scale = c * w
                    total = part.mul_(scale) if total is None else total.add_(part, alpha=scale)
        return torch.zeros_like(v) if total is None else total

    return product


def _uncached(ev: Evaluation) -> BatchCurvature:
    return BatchCurvature(ev.losses_without_graph(), _recomputed(ev), ev.gradient)


def _forward_over_reverse(ev: Evaluation) -> BatchCurvature:
    point = ev.point

    def batch_hvp(i: int, tangents: dict[str, Tensor]) -> Tensor:
        batch = ev.batches[i]
        # The data's floating tensors (targets of a pair) enter as primals with zero tangents,
        # see floating_leaves.
        if isinstance(batch, (tuple, list)) and not isinstance(ev.loss, ModelLoss):
            data = floating_leaves(batch[1])

            def rebuild(leaves: list[Tensor]) -> Any:
                return (batch[0], with_floating_leaves(batch[1], iter(leaves)))
        else:
            data = floating_leaves(batch)

            def rebuild(leaves: list[Tensor]) -> Any:
                return with_floating_leaves(batch, iter(leaves))

        def batch_loss(trainable: dict[str, Tensor], leaves: list[Tensor]) -> Tensor:
            return loss_at(
                point.with_buffers(trainable), ev.model, rebuild(leaves), ev.loss, batch_index=i
            )

        _, hv = torch.func.jvp(
            torch.func.grad(batch_loss),
            (point.primals, data),
            (tangents, [torch.zeros_like(t) for t in data]),
        )
        return point.flatten(hv)

    def product(v: Tensor, terms: Terms) -> Tensor:
        point.check_unchanged(ev.operator)
        tangents = point.unflatten(v)
        total = torch.zeros_like(v)
        with ev.computing(derivatives=True):
            for i, c in terms:
                total += c * batch_hvp(i, tangents)
        return total

    return BatchCurvature(ev.losses_without_graph(), product, ev.gradient)


HESSIAN_ENGINES: dict[tuple[str, bool], Engine] = {
    ("double-backward", True): _cached,
    ("double-backward", False): _uncached,
    ("forward-over-reverse", True): _forward_over_reverse,  # caches nothing either way
    ("forward-over-reverse", False): _forward_over_reverse,
}
"""The Hessian engine of each ``(engine, cache_graph)``."""
