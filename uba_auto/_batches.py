"""What users' loaders yield, how the probe turns one batch into one scalar loss, and in which mode.

Batch forms
-----------
The probe accepts three forms of batch, chosen by the batch's type and by the ``loss`` argument, so
that one call never has two readings:

1. ``(inputs, targets)``: a tuple or list of length two (what a ``DataLoader`` over a
   ``TensorDataset`` yields). The loss is ``loss(model(inputs), targets)``, where ``loss`` is an
   ``nn.Module`` such as ``nn.CrossEntropyLoss()`` or a function such as
   ``torch.nn.functional.cross_entropy``. ``loss`` is required for this form.
2. A dict (any ``Mapping``, e.g. a Hugging Face ``BatchEncoding``): the model is called as
   ``model(**batch)`` and must return the loss itself, Hugging Face style: an object with a
   ``.loss`` attribute or a dict with key ``"loss"``. ``loss`` must be ``None`` for this form.
3. Anything else, or any of the above when the user wants full control: wrap a function
   ``fn(model, batch) -> scalar`` in :class:`ModelLoss` and pass it as ``loss``. The probe then
   calls ``fn`` with the model evaluated at the probe's parameters; ``fn`` calls ``model(...)`` as
   usual.

Every loss must be a scalar (use ``reduction="mean"``) and finite at the probe's point. With several
batches the probe's objective is the mean of the per-batch losses, each batch weighted equally.

Mode policy for BatchNorm and dropout
-------------------------------------
The default, ``mode="train-deterministic"``, measures the loss as training sees it, without its
randomness: normalisation layers with running statistics (``BatchNorm*``, ``SyncBatchNorm``,
``InstanceNorm*``) behave as in training, normalising with the batch's own statistics, while every
source of dropout (``nn.Dropout*``, ``nn.AlphaDropout``, the attention dropout of
``nn.MultiheadAttention`` and the inter-layer dropout of ``nn.RNN``/``LSTM``/``GRU``) is off. The
running statistics and ``num_batches_tracked`` of the user's modules are never updated: the model is
evaluated through :func:`torch.func.functional_call` on fresh copies of its buffers, so the updates
that train-mode BatchNorm performs land in the copies.

``mode="eval"`` puts every module in eval mode (BatchNorm uses its running statistics, the loss of
inference). ``mode="as-is"`` leaves every module's ``training`` flag as the user set it.

The flags are changed only for the duration of each probe computation, by :func:`evaluation_mode`,
which restores each submodule's flag exactly (also on exceptions); the model's own state is never
written. Whatever the mode, the probe checks that its forward passes drew no random numbers (a
custom stochastic layer it does not know would make the loss, and so its curvature, random) and
raises if they did.

Attention
---------
PyTorch's fused scaled-dot-product-attention kernels (flash, memory-efficient, and the CPU flash
kernel) have no double backward, and the fast path of ``nn.TransformerEncoderLayer`` and
``nn.MultiheadAttention`` (``torch._transformer_encoder_layer_fwd``) has no forward-mode derivative.
:func:`evaluation_mode` therefore selects the math backend of
:func:`torch.nn.functional.scaled_dot_product_attention` and disables the fast path
(``torch.backends.mha.set_fastpath_enabled(False)``) while the probe runs, restoring both after.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "MODES",
    "BatchSet",
    "ModelLoss",
    "batch_size_of",
    "check_batch_form",
    "check_finite_losses",
    "check_scalar_loss",
    "collect_batches",
    "evaluation_mode",
    "loss_at",
    "mode_overrides",
    "move_batch",
    "outputs_at",
    "split_supervised",
]

MODES = ("train-deterministic", "eval", "as-is")
"""The mode policies :func:`evaluation_mode` implements; see the module docstring."""

# Private bases, public since PyTorch 1.x: every dropout layer derives from _DropoutNd and every
# normalisation layer with running statistics (BatchNorm*, SyncBatchNorm, InstanceNorm*) from
# _NormBase. Matching the bases also catches user subclasses of those layers.
_DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd,)
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase,)


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
    if isinstance(batch, Tensor):
        cast = dtype if dtype is not None and batch.is_floating_point() else None
        return batch.to(device=device, dtype=cast)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_batch(b, device, dtype) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(b, device, dtype) for b in batch)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    return batch


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    values: Iterable[Any] = ()
    if isinstance(obj, (tuple, list)):
        values = obj
    elif isinstance(obj, Mapping):
        values = obj.values()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


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
            iterated once.
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
    try:
        iterator: Iterator[Any] = iter(loader)
    except TypeError:
        raise TypeError(
            f"loader must be an iterable of batches (a DataLoader or a list), "
            f"got {type(loader).__name__}"
        ) from None
    device = torch.device(device)
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


def mode_overrides(model: nn.Module, mode: str) -> list[tuple[nn.Module, bool]]:
    """The ``(module, training flag)`` pairs that ``mode`` sets; modules not listed keep theirs.

    Args:
        model: the user's model.
        mode: one of :data:`MODES`.

    Raises:
        ValueError: if ``mode`` is unknown.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "as-is":
        return []
    if mode == "eval":
        return [(m, False) for m in model.modules()]
    overrides = []
    for m in model.modules():
        if isinstance(m, _NORM_TYPES):
            overrides.append((m, True))
        elif isinstance(m, (*_DROPOUT_TYPES, nn.MultiheadAttention)):
            # nn.MultiheadAttention applies its attention dropout when *it* is in training mode.
            overrides.append((m, False))
        elif isinstance(m, nn.RNNBase) and m.dropout > 0:
            overrides.append((m, False))
    return overrides


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """Math SDPA backend and no MHA fast path: the kernels that have every derivative."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the same switch under its old name
        kernel = torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )
    else:
        kernel = sdpa_kernel(SDPBackend.MATH)
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    with kernel:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            if mha is not None:
                mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def evaluation_mode(
    model: nn.Module, mode: str | list[tuple[nn.Module, bool]] = "train-deterministic"
) -> Iterator[None]:
    """Evaluate ``model`` under the probe's mode policy for the duration of the block.

    Sets the ``training`` flag of the modules the policy names (see the module docstring), selects
    the math attention backend, disables the MHA fast path and enables grad mode; on exit, also
    after an exception, every flag is restored to exactly its previous value.

    Args:
        model: the user's model.
        mode: one of :data:`MODES`, or a precomputed :func:`mode_overrides` list (cheaper when the
            same model is evaluated many times).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Dropout()).eval()
        >>> with evaluation_mode(model):
        ...     [m.training for m in model]
        [True, False]
        >>> [m.training for m in model]
        [False, False]
    """
    overrides = mode_overrides(model, mode) if isinstance(mode, str) else mode
    previous = [(m, m.training) for m, _ in overrides]
    try:
        for m, flag in overrides:
            # Set the attribute directly: Module.train() would recurse into children.
            m.training = flag
        with _math_attention(), torch.enable_grad():
            yield
    finally:
        for m, flag in reversed(previous):
            m.training = flag
