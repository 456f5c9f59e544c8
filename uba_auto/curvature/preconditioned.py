r"""The preconditioned curvature operator :math:`D (A + W) D`, :math:`D = P^{-1/2}`, a composition.

:class:`PreconditionedOperator` wraps any curvature operator :math:`A` (``LocalOperator``,
``AllReducedOperator``, ``HessianOperator``, ``GGNOperator``) between two diagonal scalings, so the
solvers and the distributed wrapper work on it unchanged; its spectrum is that of
:math:`P^{-1}(A + W)`. It knows nothing of optimizers: :class:`Preconditioner` carries the
diagonal, and :mod:`~uba_auto.curvature.precondition` reads it from an optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from uba_auto.linear_operator import SymmetricOperator

__all__ = ["PreconditionedOperator", "Preconditioner"]


@dataclass(frozen=True, eq=False)
class Preconditioner:
    r"""The diagonal :math:`P` an adaptive optimizer divides its update by, in an operator's layout.

    Built by :func:`~uba_auto.curvature.precondition.optimizer_preconditioner`; compared by
    identity (it holds tensors).

    Attributes:
        diagonal: :math:`P`, flat (the operator's ``size``, ``dtype``, ``device``), all > 0.
        optimizer: the optimizer's class name, e.g. ``"AdamW"``.
        source: ``"state"`` (read from ``optimizer.state``) or ``"estimate"`` (no state yet).
        step: the optimizer's step counter (largest over the parameters), ``None`` for an estimate.
        description: one line for the report, e.g. "diag(√v̂ + ε) from the AdamW state at step 12".
        coupled_weight_decay: :math:`w` per coordinate (the optimizer sees :math:`A + \mathrm{diag}
            (w)`), or ``None`` where there is none (AdamW's decay is decoupled).
    """

    diagonal: Tensor
    optimizer: str
    source: str
    step: int | None
    description: str
    coupled_weight_decay: Tensor | None


_FORWARDED = frozenset(
    "param_names param_shapes num_batches batch_sizes global_batch_sizes batch_losses batch_set "
    "batches model loss mode engine cache_graph cached_batches micro_batches micro_batch_note "
    "coefficients".split()
)


class PreconditionedOperator(SymmetricOperator):
    r""":math:`D (A + W) D`, :math:`D = P^{-1/2}`: the curvature an adaptive optimizer sees.

    .. math::

        \tilde A v = d \odot \big(A (d \odot v) + w \odot d \odot v\big), \qquad d = P^{-1/2},

    :math:`A` the wrapped operator (``LocalOperator``, ``AllReducedOperator``, ``HessianOperator``
    or ``GGNOperator``), :math:`w` the coupled weight decay (0 where ``None``). Its eigenvalues are
    those of :math:`P^{-1}(A + W)`. A product is one product of ``base`` (a collective under a
    process group, as the base's); :attr:`num_matvecs` counts this operator's own.

    Args:
        base: the curvature operator, in the layout of ``preconditioner``.
        preconditioner: from :func:`optimizer_preconditioner` for this ``base``.

    Attributes:
        base, preconditioner: as given; ``name``: ``"PreconditionedOperator(<base's name>)"``.
        size, dtype, device, param_names, param_shapes, num_batches, batch_sizes,
        global_batch_sizes, batch_losses, batch_set (and the other build attributes): the base's.

    Raises:
        TypeError: for arguments of the wrong type.
        ValueError: if the diagonal (or the decay) is not in the base's layout, or not all > 0.

    Example:
        >>> import torch
        >>> from uba_auto.linear_operator import DenseOperator
        >>> base = DenseOperator(torch.diag(torch.tensor([4.0, 8.0], dtype=torch.float64)))
        >>> p = torch.tensor([4.0, 16.0], dtype=torch.float64)
        >>> op = PreconditionedOperator(base, Preconditioner(p, "Adam", "state", 1, "", None))
        >>> op.to_dense().diagonal().tolist()  # P⁻¹A
        [1.0, 0.5]
    """

    def __init__(self, base: SymmetricOperator, preconditioner: Preconditioner) -> None:
        super().__init__()
        if not isinstance(base, SymmetricOperator):
            raise TypeError(f"base must be a SymmetricOperator, got {type(base).__name__}")
        if not isinstance(preconditioner, Preconditioner):
            raise TypeError(
                f"preconditioner must be a Preconditioner, got {type(preconditioner).__name__}; "
                "use uba_auto.curvature.optimizer_preconditioner(optimizer, model, base)"
            )
        layout = ((base.size,), base.dtype, base.device)
        diagonal, decay = preconditioner.diagonal, preconditioner.coupled_weight_decay
        for label, t in (("diagonal", diagonal), ("coupled_weight_decay", decay)):
            if t is not None and (tuple(t.shape), t.dtype, t.device) != layout:
                raise ValueError(
                    f"preconditioner.{label} must have shape {layout[0]}, dtype {layout[1]} and "
                    f"device {layout[2]} (the base operator's), got {tuple(t.shape)}, {t.dtype}, "
                    f"{t.device}; build it for this operator: optimizer_preconditioner("
                    "optimizer, model, base)"
                )
        if not bool(((diagonal > 0) & diagonal.isfinite()).all()):
            raise ValueError(
                "preconditioner.diagonal must be finite and > 0 everywhere (its inverse square "
                "root scales the operator); build it with optimizer_preconditioner(...)"
            )
        self.base, self.preconditioner = base, preconditioner
        self.size, self.dtype, self.device = base.size, base.dtype, base.device
        self.name = f"PreconditionedOperator({getattr(base, 'name', type(base).__name__)})"
        self._scale, self._decay = diagonal.rsqrt(), decay

    def _matvec(self, v: Tensor) -> Tensor:
        u = self._scale * v
        out = self.base.matvec(u)
        if self._decay is not None:
            out = out + self._decay * u
        return self._scale * out

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this operator does not hold itself: the base's build attributes.
        base = self.__dict__.get("base")
        if name in _FORWARDED and base is not None:
            return getattr(base, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def batch_operator(self, i: int) -> PreconditionedOperator:
        """Batch ``i`` alone (``base.batch_operator(i)``), with the same :math:`P` (for the
        per-batch curvature)."""
        return PreconditionedOperator(self.base.batch_operator(i), self.preconditioner)

    def loss_value(self) -> Tensor:
        """The base's mean batch loss at the point."""
        return self.base.loss_value()

    def gradient(self) -> Tensor:
        """The base's gradient (of the loss: not preconditioned, without the weight decay)."""
        return self.base.gradient()

    def scaled_gradient(self) -> Tensor:
        r""":math:`d \odot \nabla\ell`, :math:`d = P^{-1/2}`: the gradient in the coordinates this
        operator acts on (those in which the optimizer's step is a plain gradient step), the
        probe's Lanczos start (:func:`~uba_auto.probe.steps.gradient_start`)."""
        return self._scale * self.base.gradient()

    def flatten(self, tensors: Mapping[str, Tensor | None] | Sequence[Tensor | None]) -> Tensor:
        """The base's ``flatten`` (per-parameter tensors -> flat vector)."""
        return self.base.flatten(tensors)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """The base's ``unflatten`` (flat vector -> ``name -> tensor`` views)."""
        return self.base.unflatten(vec)
