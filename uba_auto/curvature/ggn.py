r"""The generalized Gauss-Newton product of each batch's loss, one closure per engine.

For batch :math:`b` with outputs :math:`z_b = f(\theta, x_b)` and output Jacobian :math:`J_b`,

.. math::

    G_b v = J_b^\top \, \nabla^2_{z} \ell(z_b, y_b) \, J_b v .

Engines (:data:`GGN_ENGINES`; an operator picks one, once):

* ``double-backward`` with a cached graph: per batch, the graphs of :math:`z(\theta)`, of
  :math:`\nabla_z \ell` and of :math:`J^\top u` (linear in a dummy :math:`u`) are kept, and
  :math:`J v` is the derivative of :math:`J^\top u` with respect to :math:`u` along :math:`v` (the
  double-vjp trick): no forward pass per product. Under a ``graph_memory`` cap only the graphs
  that fit are kept (:mod:`~uba_auto.curvature.graph_memory`); the others are rebuilt in every
  product, as without a cache.
* ``double-backward`` without a cache: the same graphs rebuilt for every product.
* ``forward-over-reverse``: :math:`Jv` by ``torch.func.jvp``, :math:`J^\top u` by
  ``torch.func.vjp``; only first-order derivatives of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from uba_auto._batches import floating_leaves, with_floating_leaves
from uba_auto.curvature.batch_loss import check_scalar_loss, outputs_at, split_supervised
from uba_auto.curvature.evaluation import BatchCurvature, Engine, Evaluation, Terms

__all__ = ["GGN_ENGINES"]


class _Linearisation(NamedTuple):
    """One batch's graphs: outputs z(θ), ∇_z ℓ (with graph) and Jᵀu linear in a dummy u."""

    z: Tensor
    z_detached: Tensor
    grad_z: Tensor
    dummy: Tensor | None
    jt_dummy: Tensor | None
    loss: Tensor


def _refuse_dict_batches(ev: Evaluation) -> None:
    for i, batch in enumerate(ev.batches):
        if isinstance(batch, Mapping):
            raise ValueError(
                f"GGNOperator needs separable outputs and a loss_fn(outputs, targets), but "
                f"batch {i} is a dict, so the model (Hugging Face style) computes its own "
                "loss and its outputs cannot be separated from it. Pass (inputs, targets) "
                "batches with loss=loss_fn(outputs, targets), or use the Hessian "
                "(HessianOperator)"
            )


def _outputs(ev: Evaluation, index: int, trainable: Mapping[str, Tensor], inputs: Any) -> Tensor:
    z = outputs_at(ev.point.with_buffers(trainable), ev.model, inputs)
    if not isinstance(z, Tensor):
        raise ValueError(
            f"GGNOperator needs the model's output to be a Tensor, got {type(z).__name__} for "
            f"batch {index}; wrap the model so that forward returns the tensor loss_fn "
            "receives, or use HessianOperator"
        )
    return z


def _output_loss(ev: Evaluation, index: int, z: Tensor, targets: Any) -> Tensor:
    return check_scalar_loss(ev.loss(z, targets), index)


def _linearise(ev: Evaluation, index: int) -> _Linearisation:
    inputs, targets = split_supervised(ev.batches[index])
    leaves = list(ev.point.leaves.values())
    z = _outputs(ev, index, ev.point.leaves, inputs)
    z_detached = z.detach().requires_grad_()
    loss = _output_loss(ev, index, z_detached, targets)
    (grad_z,) = torch.autograd.grad(loss, z_detached, create_graph=True)
    if not z.requires_grad:
        return _Linearisation(z, z_detached, grad_z, None, None, loss)
    # Jᵀu is linear in u, so differentiating it with respect to u along v gives J v: the
    # double-vjp trick, which reuses this graph instead of a forward-mode pass per product.
    dummy = torch.zeros_like(z, requires_grad=True)
    jt_dummy = ev.point.flatten(
        torch.autograd.grad(z, leaves, dummy, create_graph=True, allow_unused=True)
    )
    ev.check_graph(jt_dummy, index)
    return _Linearisation(z, z_detached, grad_z, dummy, jt_dummy, loss)


def _apply(ev: Evaluation, entry: _Linearisation, v: Tensor, retain: bool) -> Tensor | None:
    """Jᵀ H_ℓ J v for one batch's graphs; ``None`` where it is zero."""
    z, z_detached, grad_z, dummy, jt_dummy, _ = entry
    if dummy is None or jt_dummy is None or not jt_dummy.requires_grad:
        return None  # outputs independent of θ
    if not grad_z.requires_grad:
        return None  # a loss linear in the outputs
    (jv,) = torch.autograd.grad(jt_dummy, dummy, v, retain_graph=True)
    (hjv,) = torch.autograd.grad(grad_z, z_detached, jv, retain_graph=retain)
    leaves = list(ev.point.leaves.values())
    return ev.point.flatten(
        torch.autograd.grad(z, leaves, hjv, retain_graph=retain, allow_unused=True)
    )


def _summed(
    ev: Evaluation, part: Callable[[int, Tensor], Tensor | None]
) -> Callable[[Tensor, Terms], Tensor]:
    """The product ``v, terms -> Σ c part(i, v)`` of per-batch parts (``None`` is zero)."""

    def product(v: Tensor, terms: Terms) -> Tensor:
        ev.point.check_unchanged(ev.operator)
        total = torch.zeros_like(v)
        with ev.computing(derivatives=True):
            for i, c in terms:
                part_i = part(i, v)
                if part_i is not None:
                    total += part_i * c
        return total

    return product


def _losses_without_graph(ev: Evaluation) -> Tensor:
    losses = []
    with ev.computing(derivatives=True, check_rng=True), torch.no_grad():
        for i, batch in enumerate(ev.batches):
            inputs, targets = split_supervised(batch)
            losses.append(_output_loss(ev, i, _outputs(ev, i, ev.point.primals, inputs), targets))
    return ev.stacked_losses(losses)


def _cached(ev: Evaluation) -> BatchCurvature:
    _refuse_dict_batches(ev)
    graphs = ev.graph_cache()
    cache: list[_Linearisation | None] = []  # None: rebuilt in every product
    losses = []
    with ev.computing(derivatives=True, check_rng=True):
        for i, batch in enumerate(ev.batches):
            if not graphs.open:
                inputs, targets = split_supervised(batch)
                with torch.no_grad():
                    z = _outputs(ev, i, ev.point.primals, inputs)
                    losses.append(_output_loss(ev, i, z, targets))
                cache.append(None)
                continue
            entry = _linearise(ev, i)
            losses.append(entry.loss.detach())
            kept = graphs.admit(i, [entry.z], [entry.grad_z, entry.jt_dummy])
            cache.append(entry if kept else None)
            del entry  # a refused graph goes with its last reference, here

    def part(i: int, v: Tensor) -> Tensor | None:
        entry = cache[i]
        if entry is None:
            return _apply(ev, _linearise(ev, i), v, retain=False)
        return _apply(ev, entry, v, retain=True)

    product = _summed(ev, part)
    return BatchCurvature(ev.stacked_losses(losses), product, ev.gradient, tuple(graphs.kept))


def _uncached(ev: Evaluation) -> BatchCurvature:
    _refuse_dict_batches(ev)
    product = _summed(ev, lambda i, v: _apply(ev, _linearise(ev, i), v, retain=False))
    return BatchCurvature(_losses_without_graph(ev), product, ev.gradient)


def _forward_over_reverse(ev: Evaluation) -> BatchCurvature:
    _refuse_dict_batches(ev)
    point = ev.point

    def part(index: int, v: Tensor) -> Tensor:
        inputs, targets = split_supervised(ev.batches[index])

        def outputs(trainable: dict[str, Tensor]) -> Tensor:
            return _outputs(ev, index, trainable, inputs)

        data = floating_leaves(targets)

        def output_loss(z: Tensor, leaves: list[Tensor]) -> Tensor:
            return _output_loss(ev, index, z, with_floating_leaves(targets, iter(leaves)))

        z, jv = torch.func.jvp(outputs, (point.primals,), (point.unflatten(v),))
        _, hjv = torch.func.jvp(
            torch.func.grad(output_loss),
            (z.detach(), data),
            (jv, [torch.zeros_like(t) for t in data]),
        )
        _, pullback = torch.func.vjp(outputs, point.primals)
        (jt_hjv,) = pullback(hjv)
        return point.flatten(jt_hjv)

    return BatchCurvature(_losses_without_graph(ev), _summed(ev, part), ev.gradient)


GGN_ENGINES: dict[tuple[str, bool], Engine] = {
    ("double-backward", True): _cached,
    ("double-backward", False): _uncached,
    ("forward-over-reverse", True): _forward_over_reverse,  # caches nothing either way
    ("forward-over-reverse", False): _forward_over_reverse,
}
"""The GGN engine of each ``(engine, cache_graph)``."""
