r"""The curvature of this process's batches: a weighted sum of per-batch curvatures.

.. math::

    A = \sum_b c_b A_b , \qquad
    c_b = \frac{n_b}{\sum_{b'} n_{b'}} \quad \text{(the default)},

with :math:`n_b` the number of examples of batch :math:`b` (the leading dimension of its first
tensor, :attr:`~uba_auto._batches.BatchSet.batch_sizes`). When each batch's loss is the mean over
its examples (``reduction="mean"``), :math:`\sum_b c_b \ell_b` is then the mean over all the
examples, as if the batches were one: batches of 8, 64 and 2 examples give the curvature of
those 74 examples, not a mean in which the 2 examples weigh as much as the 64. When some batch's
size is unknown (no leading dimension), every batch gets :math:`c_b = 1/B`, which is the same
when the batches are of one size; the probe says so in its warnings. Other weights: 1 for the
operator of one batch (:meth:`LocalOperator.batch_operator`), or a rank's share of each global
batch (set by :class:`~uba_auto.curvature.allreduce.AllReducedOperator`). Views with other
weights share the engine's closures and cached graphs: nothing is collected, copied or rebuilt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from uba_auto._batches import BatchSet
from uba_auto.curvature.evaluation import BatchCurvature, Evaluation
from uba_auto.linear_operator import SymmetricOperator

__all__ = ["LocalOperator", "batch_weights"]


def batch_weights(sizes: Sequence[int | None]) -> list[float]:
    """The default coefficients :math:`c_b = n_b / \\sum n` of batches of ``sizes`` examples;
    :math:`1/B` each when a size is unknown (``None``) or all are zero.

    Example:
        >>> batch_weights([8, 64, 2]) == [8 / 74, 64 / 74, 2 / 74]
        True
        >>> batch_weights([4, None])
        [0.5, 0.5]
    """
    total = sum(size or 0 for size in sizes)
    if total <= 0 or any(size is None for size in sizes):
        return [1.0 / len(sizes)] * len(sizes)
    return [size / total for size in sizes]


class LocalOperator(SymmetricOperator):
    """:math:`\\sum_b c_b A_b` over this process's batches (see the module docstring).

    Built by :func:`~uba_auto.curvature.build_operator`; other weights by :meth:`batch_operator`
    and :meth:`reweighted`.

    Attributes:
        name: the public class name (``"HessianOperator"`` or ``"GGNOperator"``), for messages.
        size, dtype, device: of the flat vectors.
        param_names, param_shapes: the probed parameters.
        model, loss, mode, engine, cache_graph: as built.
        cached_batches: the batches (indices into this operator's batches) whose gradient graphs
            the engine keeps; the others are recomputed in every product.
        micro_batches: per batch, the number of micro-batches its recomputed product runs in (1:
            whole; see :mod:`~uba_auto.curvature.micro_batches`).
        micro_batch_note: why recomputed batches that would have been split were not, or
            ``None``.
        batch_set, batches, num_batches, batch_sizes: the batches this operator sums.
        global_batch_sizes: ``batch_sizes`` (no process group here).
        batch_losses: each batch's loss at the point, a 1-D tensor.
        coefficients: :math:`c_b` of each of those batches (by default by number of examples:
            :func:`batch_weights`).
    """

    def __init__(
        self,
        evaluation: Evaluation,
        curvature: BatchCurvature,
        *,
        cache_graph: bool,
        weights: Mapping[int, float] | None = None,
    ) -> None:
        super().__init__()
        ev = self._evaluation = evaluation
        self._curvature = curvature
        self.cache_graph = cache_graph
        count = len(ev.batches)
        if weights is None:
            weights = dict(enumerate(batch_weights(ev.batch_set.batch_sizes)))
        weights = dict(weights)
        self._terms = tuple(weights.items())
        self.coefficients = tuple(weights.values())
        indices = list(weights)

        self.name, self.model, self.loss, self.engine = ev.operator, ev.model, ev.loss, ev.engine
        self.mode = ev.policy.mode
        point = ev.point
        self.size, self.dtype, self.device = point.size, point.dtype, point.device
        self.param_names, self.param_shapes = point.names, point.shapes
        if indices == list(range(count)):
            self.batch_set, self.batch_losses = ev.batch_set, curvature.batch_losses
        else:
            self.batch_set = BatchSet(
                batches=[ev.batches[i] for i in indices],
                batch_sizes=[ev.batch_set.batch_sizes[i] for i in indices],
            )
            self.batch_losses = curvature.batch_losses[indices]
        self.batches = self.batch_set.batches
        self.num_batches = len(indices)
        self.batch_sizes = list(self.batch_set.batch_sizes)
        self.global_batch_sizes = list(self.batch_sizes)
        self._indices = indices
        self.cached_batches = tuple(k for k, i in enumerate(indices) if i in set(curvature.cached))
        self.micro_batches = tuple(curvature.parts.get(i, 1) for i in indices)
        self.micro_batch_note = curvature.micro_batch_note
        self._gradient: Tensor | None = None

    def _matvec(self, v: Tensor) -> Tensor:
        return self._curvature.product(v, self._terms)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat vector of length :attr:`size` into ``name -> tensor`` views."""
        return self._evaluation.point.unflatten(vec)

    def flatten(self, tensors: Mapping[str, Tensor | None] | Sequence[Tensor | None]) -> Tensor:
        """Concatenate per-parameter tensors (``None`` counts as zeros)."""
        return self._evaluation.point.flatten(tensors)

    def loss_value(self) -> Tensor:
        """:math:`\\sum_b c_b \\ell_b` at the probe's point (0-dim, no graph): by default the
        example-weighted mean of the batch losses, the loss whose curvature this is."""
        weights = self.batch_losses.new_tensor(self.coefficients)
        return (weights * self.batch_losses).sum()

    def gradient(self) -> Tensor:
        """:math:`\\sum_b c_b \\nabla \\ell_b` at the point (no graph attached; computed once)."""
        if self._gradient is None:
            self._gradient = self._curvature.gradient(self._terms)
        return self._gradient

    def reweighted(self, coefficients: Sequence[float]) -> LocalOperator:
        """The same batches with other coefficients (one per batch), sharing every graph."""
        if len(coefficients) != self.num_batches:
            raise ValueError(
                f"coefficients must hold one value per batch ({self.num_batches}), "
                f"got {len(coefficients)}"
            )
        return LocalOperator(
            self._evaluation,
            self._curvature,
            cache_graph=self.cache_graph,
            weights=dict(zip(self._indices, coefficients, strict=True)),
        )

    def batch_operator(self, i: int) -> LocalOperator:
        """The curvature of batch ``i`` alone (weight 1), sharing its cached graph.

        Raises:
            IndexError: if ``i`` is not in ``range(num_batches)``.
        """
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_batches:
            raise IndexError(
                f"batch_operator(i) needs an int in range({self.num_batches}), got {i!r}"
            )
        return LocalOperator(
            self._evaluation,
            self._curvature,
            cache_graph=self.cache_graph,
            weights={self._indices[i]: 1.0},
        )
