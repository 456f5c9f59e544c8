r"""The curvature of the global batches of a process group: the only rank-aware operator.

Global batch :math:`b` is the union of the :math:`b`-th batch of every rank, i.e. what one
``DistributedDataParallel`` step sees, and its loss is the example-weighted mean of the ranks'
losses:

.. math::

    \ell_b = \sum_r w_{r,b}\, \ell_{r,b}, \qquad
    w_{r,b} = \frac{n_{r,b}}{N_b}, \qquad
    Av = \sum_b c_b \sum_r w_{r,b} A_{r,b} v, \qquad c_b = \frac{N_b}{\sum_{b'} N_{b'}},

with :math:`n_{r,b}` the number of examples of rank :math:`r`'s batch :math:`b` and
:math:`N_b = \sum_r n_{r,b}` those of global batch :math:`b`, so that every example of every rank
weighs the same, as in a single process
(:func:`~uba_auto.curvature.local.batch_weights`); equal weights :math:`1/R` and :math:`1/B`
when some batch's size is unknown. :class:`AllReducedOperator` gives its rank's
:class:`~uba_auto.curvature.local.LocalOperator` the coefficients :math:`c_b w_{r,b}` and sums
every product and the gradient over the ranks; building it is an agreement step of
:class:`~uba_auto._distributed.Communicator` (every rank learns whether any failed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor

from uba_auto._batches import BatchSet
from uba_auto._distributed import Communicator
from uba_auto.curvature.local import LocalOperator, batch_weights
from uba_auto.linear_operator import SymmetricOperator

__all__ = ["AllReducedOperator", "GlobalBatches", "all_reduced", "batch_shares"]

_HINT = "every rank must probe the same model with the same number of batches"


def _agree_on_build(
    comm: Communicator, name: str, local: LocalOperator | None, error: BaseException | None
) -> None:
    """The build's agreement step: the same call on every rank, whether its build failed or not."""
    comm.agree(
        error,
        f"building {name}",
        equal={
            "the number of probe batches": math.nan if local is None else local.num_batches,
            "the number of probed parameters": math.nan if local is None else local.size,
        },
        hint=_HINT,
    )


def batch_shares(
    comm: Communicator, sizes: Sequence[int | None]
) -> tuple[list[float], list[int | None]]:
    """This rank's share :math:`w_{r,b}` of each global batch, and the global batch sizes.

    Every rank must hold the same number of batches (checked by the build's agreement). Shares
    are by number of examples; equal (``1 / world_size``) if any rank's size of any batch is
    unknown or a global batch is empty. A collective.
    """
    local = torch.tensor([-1.0 if s is None else float(s) for s in sizes], dtype=torch.float64)
    table = comm.all_gather(local)
    if bool((table < 0).any()):
        return [1.0 / comm.world_size] * len(sizes), [None] * len(sizes)
    totals = table.sum(0)
    shares = [
        float(table[comm.rank, b] / totals[b]) if totals[b] > 0 else 1.0 / comm.world_size
        for b in range(len(sizes))
    ]
    return shares, [int(t) for t in totals]


@dataclass(frozen=True)
class GlobalBatches:
    """What the ranks agreed on about the global batches.

    Attributes:
        shares: this rank's share :math:`w_{r,b}` of each global batch.
        sizes: each global batch's number of examples (``None`` where unknown).
        losses: each global batch's loss at the point, a 1-D tensor (the same on every rank).
    """

    shares: tuple[float, ...]
    sizes: tuple[int | None, ...]
    losses: Tensor

    def batch(self, i: int) -> GlobalBatches:
        return GlobalBatches(self.shares[i : i + 1], self.sizes[i : i + 1], self.losses[i : i + 1])


class AllReducedOperator(SymmetricOperator):
    r"""The curvature of the global batches: each rank's local part, summed over the ranks.

    Every product and :meth:`gradient` is a collective that every rank must call in the same
    order; a rank whose part fails makes every rank raise
    :class:`~uba_auto._distributed.DistributedProbeError`.

    Args:
        local_op: this rank's operator (its own coefficients are replaced by the global ones).
        comm: the process group. Not modified: the operator keeps a copy that knows the model's
            device.
        batches: ``None`` to agree with the other ranks (a collective: the build's agreement, the
            batch sizes, the batch losses). Given, ``local_op`` already carries its global
            coefficients and nothing is communicated (how :meth:`batch_operator` makes views).

    Attributes:
        Those of :class:`~uba_auto.curvature.local.LocalOperator`, with ``batch_losses`` and
        ``global_batch_sizes`` of the global batches (``batch_sizes`` stays this rank's), and
        ``local`` (this rank's weighted part) and ``comm``.
    """

    def __init__(
        self, local_op: LocalOperator, comm: Communicator, *, batches: GlobalBatches | None = None
    ) -> None:
        super().__init__()
        comm = comm.with_device(local_op.device)
        if batches is None:
            _agree_on_build(comm, local_op.name, local_op, None)
            shares, sizes = batch_shares(comm, local_op.batch_sizes)
            weights = torch.tensor(shares, dtype=local_op.dtype, device=local_op.device)
            # The loss of global batch b: the example-weighted mean of every rank's loss on it.
            losses = comm.all_reduce_sum(local_op.batch_losses * weights)
            batches = GlobalBatches(tuple(shares), tuple(sizes), losses)
            local_op = local_op.reweighted(
                [w * c for w, c in zip(shares, batch_weights(sizes), strict=True)]
            )
        self.local, self.comm, self._global = local_op, comm, batches
        self.name = local_op.name
        self.size, self.dtype, self.device = local_op.size, local_op.dtype, local_op.device
        self.param_names, self.param_shapes = local_op.param_names, local_op.param_shapes
        self.model, self.loss, self.mode = local_op.model, local_op.loss, local_op.mode
        self.engine, self.cache_graph = local_op.engine, local_op.cache_graph
        self.cached_batches = local_op.cached_batches
        self.micro_batches = local_op.micro_batches
        self.micro_batch_note = local_op.micro_batch_note
        self.batch_set: BatchSet = local_op.batch_set
        self.batches, self.num_batches = local_op.batches, local_op.num_batches
        self.batch_sizes = local_op.batch_sizes
        self.global_batch_sizes = list(batches.sizes)
        self.batch_losses = batches.losses
        self._gradient: Tensor | None = None

    def _matvec(self, v: Tensor) -> Tensor:
        return self.comm.sum_of_parts(
            lambda: self.local.matvec(v), v, f"computing a {self.name} product"
        )

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat vector of length :attr:`size` into ``name -> tensor`` views."""
        return self.local.unflatten(vec)

    def flatten(self, tensors: Mapping[str, Tensor | None] | Sequence[Tensor | None]) -> Tensor:
        """Concatenate per-parameter tensors (``None`` counts as zeros)."""
        return self.local.flatten(tensors)

    def loss_value(self) -> Tensor:
        """:math:`\\sum_b c_b \\ell_b` over the global batches at the probe's point (0-dim): the
        mean over all their examples (the mean of the batch losses where a size is unknown)."""
        weights = self.batch_losses.new_tensor(batch_weights(self._global.sizes))
        return (weights * self.batch_losses).sum()

    def gradient(self) -> Tensor:
        """The gradient of the global-batch loss (all-reduced once, then kept): a collective."""
        if self._gradient is None:
            like = torch.zeros(self.size, dtype=self.dtype, device=self.device)
            self._gradient = self.comm.sum_of_parts(
                self.local.gradient, like, f"computing the gradient ({self.name})"
            )
        return self._gradient

    @property
    def coefficients(self) -> tuple[float, ...]:
        r""":math:`c_b` of the global batches (by number of examples): this operator is
        :math:`\sum_b c_b` ``batch_operator(b)``."""
        return tuple(batch_weights(self._global.sizes))

    def batch_operator(self, i: int) -> AllReducedOperator:
        """The curvature of global batch ``i`` alone, sharing the cached graphs (no collective)."""
        local = self.local.batch_operator(i).reweighted([self._global.shares[i]])
        return AllReducedOperator(local, self.comm, batches=self._global.batch(i))


def all_reduced(
    build: Callable[[], LocalOperator], comm: Communicator, name: str
) -> AllReducedOperator:
    """Build this rank's operator and agree with the others; the failure of any rank raises on all.

    Args:
        build: builds this rank's operator (no collective).
        comm: the process group.
        name: the operator's class name, for the messages.

    Raises:
        DistributedProbeError: on every rank, when any rank's build failed.
    """
    try:
        local = build()
    except Exception as err:
        _report_failed_build(comm, name, err)
    return AllReducedOperator(local, comm)


def _report_failed_build(comm: Communicator, name: str, error: BaseException) -> NoReturn:
    _agree_on_build(comm, name, None, error)
    raise AssertionError("agree() raises when a rank reports an error")  # pragma: no cover
