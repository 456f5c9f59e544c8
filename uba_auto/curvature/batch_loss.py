"""How the curvature operators turn one batch into one scalar loss.

Batch forms
-----------
The operators accept three forms of batch, chosen by the batch's type and by the ``loss``
argument, so that one call never has two readings:

1. ``(inputs, targets)``: a tuple or list of length two (what a ``DataLoader`` over a
   ``TensorDataset`` yields). The loss is ``loss(model(inputs), targets)``, where ``loss`` is an
   ``nn.Module`` such as ``nn.CrossEntropyLoss()`` or a function such as
   ``torch.nn.functional.cross_entropy``. ``loss`` is required for this form.
2. A dict (any ``Mapping``, e.g. a Hugging Face ``BatchEncoding``): the model is called as
   ``model(**batch)`` and must return the loss itself, Hugging Face style: an object with a
   ``.loss`` attribute or a dict with key ``"loss"``. ``loss`` must be ``None`` for this form.
3. Anything else, or any of the above when the user wants full control: wrap a function
   ``fn(model, batch) -> scalar`` in :class:`ModelLoss` and pass it as ``loss``. The operator then
   calls ``fn`` with the model evaluated at the probe's parameters; ``fn`` calls ``model(...)`` as
   usual.

Every loss must be a scalar (use ``reduction="mean"``) and finite at the probe's point. With several
batches the probe's objective is the mean of the per-batch losses, each weighted by its batch's
number of examples (:mod:`~uba_auto.curvature.local`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "ModelLoss",
    "check_batch_form",
    "check_finite_losses",
    "check_scalar_loss",
    "loss_at",
    "outputs_at",
    "split_supervised",
]


class ModelLoss:
    """Mark a function ``fn(model, batch) -> scalar Tensor`` as the loss of a batch.

    Use it for batches that are neither ``(inputs, targets)`` pairs nor Hugging Face-style dicts, or
    whenever the loss needs more than ``loss(model(inputs), targets)``. The probe calls ``fn`` with
    the model evaluated at the probe's parameters (through :func:`torch.func.functional_call`), so
    ``fn`` simply calls ``model(...)``; it must not change the model's state.

    Args:
        fn: a callable taking ``(model, batch)`` and returning a scalar tensor.

    Example:
        >>> import torch
        >>> loss = ModelLoss(lambda model, batch: model(batch["x"]).pow(2).mean())
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> float(loss(model, {"x": torch.ones(3, 2)}).detach())
        4.0
    """

    def __init__(self, fn: Callable[[nn.Module, Any], Tensor]) -> None:
        if isinstance(fn, ModelLoss):
            fn = fn.fn
        if not callable(fn):
            raise TypeError(
                f"ModelLoss(fn): fn must be callable as fn(model, batch) -> scalar, "
                f"got {type(fn).__name__}"
            )
        self.fn = fn

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        return self.fn(model, batch)

    def __repr__(self) -> str:
        return f"ModelLoss({getattr(self.fn, '__name__', repr(self.fn))})"


class _ModelLossModule(nn.Module):
    """Holds the user's model as a child, so that functional_call can run ``fn(model, batch)``."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        # Not an attribute nn.Module would register: fn may itself be an nn.Module.
        object.__setattr__(self, "_fn", fn)

    def forward(self, batch: Any) -> Tensor:
        return self._fn(self.model, batch)


def check_batch_form(batch: Any, loss: Any, batch_index: int) -> None:
    """Raise if ``batch`` and ``loss`` do not make one of the three documented forms.

    Args:
        batch: one batch.
        loss: ``None``, a ``loss(outputs, targets)`` callable, or a :class:`ModelLoss`.
        batch_index: position of the batch, for the message.

    Raises:
        TypeError: if ``loss`` is not callable, or the batch has no supported form.
        ValueError: if a pair batch has no ``loss``, or a dict batch has a
            ``loss(outputs, targets)``.
    """
    if loss is not None and not callable(loss):
        raise TypeError(
            f"loss must be None, a callable loss(outputs, targets) or ModelLoss(fn), "
            f"got {type(loss).__name__}"
        )
    if isinstance(loss, ModelLoss):
        return
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise TypeError(
                f"batch {batch_index} is a {type(batch).__name__} of length {len(batch)}; a "
                "tuple/list batch must be (inputs, targets). For other layouts pass "
                "loss=ModelLoss(fn) with fn(model, batch) -> scalar"
            )
        if loss is None:
            raise ValueError(
                f"batch {batch_index} is an (inputs, targets) pair but loss is None; pass "
                "loss_fn, e.g. torch.nn.CrossEntropyLoss() or torch.nn.functional.mse_loss, so "
                "that the loss is loss_fn(model(inputs), targets)"
            )
        return
    if isinstance(batch, Mapping):
        if loss is not None:
            raise ValueError(
                f"batch {batch_index} is a dict, so the model is called as model(**batch) and "
                "must return its loss (output.loss or output['loss']); a loss(outputs, targets) "
                f"cannot be applied since a dict batch has no targets (got loss={loss!r}). Pass "
                "loss=None for Hugging Face-style models, or loss=ModelLoss(fn) with "
                "fn(model, batch) -> scalar"
            )
        return
    raise TypeError(
        f"batch {batch_index} is a {type(batch).__name__}; batches must be (inputs, targets) "
        "pairs or dicts for model(**batch), or pass loss=ModelLoss(fn) with "
        "fn(model, batch) -> scalar for any other batch"
    )


def split_supervised(batch: Any) -> tuple[Any, Any]:
    """Return ``(inputs, targets)`` of a pair batch (checked by :func:`check_batch_form`)."""
    inputs, targets = batch
    return inputs, targets


def outputs_at(params_and_buffers: Mapping[str, Tensor], model: nn.Module, inputs: Any) -> Any:
    """The model's output on ``inputs`` at the given parameters and buffers.

    Pass every parameter and buffer: :func:`torch.func.functional_call` falls back to the module's
    own tensors for missing names, and a train-mode BatchNorm would then update the user's running
    statistics.
    """
    return functional_call(model, dict(params_and_buffers), (inputs,))


def _hf_loss(output: Any, batch_index: int) -> Tensor:
    loss = None
    if isinstance(output, Mapping) and "loss" in output:
        loss = output["loss"]
    elif hasattr(output, "loss"):
        loss = output.loss
    if not isinstance(loss, Tensor):
        got = "loss=None" if loss is None else f"a {type(output).__name__} without a loss"
        raise ValueError(
            f"batch {batch_index} is a dict, so the model is called as model(**batch) and must "
            f"return an object with .loss or a dict with key 'loss' (Hugging Face style); got "
            f"{got}. Put the labels in the batch (e.g. batch['labels']) so the model computes "
            "its loss, or pass loss=ModelLoss(fn) with fn(model, batch) -> scalar"
        )
    return loss


def loss_at(
    params_and_buffers: Mapping[str, Tensor],
    model: nn.Module,
    batch: Any,
    loss: Any = None,
    *,
    batch_index: int = 0,
) -> Tensor:
    """The scalar loss of one batch with the model evaluated at ``params_and_buffers``.

    A pure function of ``params_and_buffers``: the model is called through
    :func:`torch.func.functional_call`, so it works under ``torch.func`` transforms and never
    reads or writes the module's own tensors, provided every parameter and buffer is given. The
    batch form is chosen as described in the module docstring.

    Args:
        params_and_buffers: every parameter and buffer of ``model`` by name. Pass copies of the
            buffers: train-mode BatchNorm updates its running statistics in place.
        model: the module (its ``training`` flags decide BatchNorm/dropout behaviour).
        batch: one batch, on the model's device.
        loss: ``None`` (dict batches), ``loss(outputs, targets)`` (pair batches) or a
            :class:`ModelLoss`.
        batch_index: position of the batch, used in error messages.

    Returns:
        A 0-dim tensor.

    Raises:
        ValueError: if the loss is not a scalar tensor, or the batch form is incomplete.
        TypeError: if the batch has no supported form.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1)
        >>> p = {"weight": torch.ones(1, 1), "bias": torch.zeros(1)}
        >>> batch = (torch.tensor([[2.0]]), torch.tensor([[1.0]]))
        >>> float(loss_at(p, model, batch, torch.nn.functional.mse_loss))
        1.0
    """
    check_batch_form(batch, loss, batch_index)
    pb = dict(params_and_buffers)
    if isinstance(loss, ModelLoss):
        wrapper = _ModelLossModule(model, loss.fn)
        value = functional_call(wrapper, {f"model.{k}": v for k, v in pb.items()}, (batch,))
    elif isinstance(batch, Mapping):
        value = _hf_loss(functional_call(model, pb, (), dict(batch)), batch_index)
    else:
        inputs, targets = split_supervised(batch)
        value = loss(outputs_at(pb, model, inputs), targets)
    return check_scalar_loss(value, batch_index)


def check_scalar_loss(value: Any, batch_index: int) -> Tensor:
    """Return ``value`` if it is a 0-dim tensor, else raise naming the batch and the shape.

    Raises:
        ValueError: if ``value`` is not a tensor or not 0-dim.
    """
    if not isinstance(value, Tensor):
        raise ValueError(
            f"the loss of batch {batch_index} must be a scalar Tensor, got {type(value).__name__}"
        )
    if value.ndim != 0:
        raise ValueError(
            f"the loss of batch {batch_index} must be a scalar, got a tensor of shape "
            f"{tuple(value.shape)}; use reduction='mean' (e.g. nn.CrossEntropyLoss(reduction="
            "'mean')) or average it yourself"
        )
    return value


def check_finite_losses(losses: Tensor) -> None:
    """Raise naming the first batch whose loss is NaN or infinite.

    Args:
        losses: 1-D tensor of per-batch losses. Checked with one device synchronisation.

    Raises:
        ValueError: if any loss is not finite.
    """
    finite = torch.isfinite(losses)
    if bool(finite.all()):
        return
    bad = int((~finite).nonzero()[0, 0])
    raise ValueError(
        f"the loss of batch {bad} is not finite ({float(losses[bad])}); curvature is undefined "
        "there. Check that batch's data and the model's parameters for NaN/inf, or lower the "
        "learning rate if training diverged"
    )
