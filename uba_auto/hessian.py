r"""The Hessian and the generalized Gauss-Newton matrix of a model's loss, as symmetric operators.

Both operators act on the flat vector :math:`\theta \in \mathbb{R}^n` of the model's parameters that
require grad (in ``model.named_parameters()`` order) and describe the curvature of

.. math::

    L(\theta) = \frac{1}{B} \sum_{b=1}^{B} \ell_b(\theta),

the mean over the given batches of the per-batch loss, each batch weighted equally whatever its
size. Batch forms and the BatchNorm/dropout mode policy are those of :mod:`uba_auto._batches`.

The model is never mutated: it is evaluated at detached copies of its parameters and fresh copies
of its buffers through :func:`torch.func.functional_call`, derivatives are taken with
:func:`torch.autograd.grad` or :mod:`torch.func` (never ``.backward()``), so ``.grad``, running
statistics and ``training`` flags stay as they were. An operator describes the point at which it
was built: build a new one after the parameters change (it raises if it notices that they did).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from uba_auto._batches import (
    BatchSet,
    ModelLoss,
    check_batch_form,
    check_finite_losses,
    check_scalar_loss,
    collect_batches,
    evaluation_mode,
    loss_at,
    mode_overrides,
    move_batch,
    outputs_at,
    split_supervised,
)
from uba_auto._distributed import resolve_process_group, unwrap_model
from uba_auto.linear_operator import SymmetricOperator

__all__ = ["ENGINES", "GGNOperator", "HessianOperator", "UnsupportedDerivativeError"]

ENGINES = ("double-backward", "forward-over-reverse")
"""How second derivatives are taken; see :class:`HessianOperator`."""


class UnsupportedDerivativeError(RuntimeError):
    """An operation of the model lacks the derivative the curvature needs (double backward or jvp).

    The original PyTorch error is attached as ``__cause__``.
    """


# What PyTorch says when an op lacks a higher-order or forward-mode derivative, and how to name
# the culprit. Only errors raised while taking derivatives are translated, and only these:
# anything else (out of memory, shape errors) is re-raised as it is.
_DERIVATIVE_ERRORS: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (
        re.compile(r"derivative for '?([\w.:]+?)'? is not implemented"),
        "PyTorch implements no derivative for {0}, so the operation it differentiates has no "
        "double backward",
        "double backward",
    ),
    (
        re.compile(r"forward AD with '?([\w.:]+?)'? that does not support"),
        "{0} has no forward-mode derivative",
        "forward mode",
    ),
    (
        re.compile(r"(once_differentiable|differentiate twice)"),
        "a custom torch.autograd.Function in the model marks its backward @once_differentiable, "
        "so it cannot be differentiated twice",
        "double backward",
    ),
    (
        re.compile(r"(setup_context)"),
        "a custom torch.autograd.Function in the model does not support torch.func transforms "
        "(it needs a setup_context staticmethod)",
        "forward mode",
    ),
    (
        re.compile(r"(implement the jvp|jvp is not implemented|jvp function)"),
        "a custom torch.autograd.Function in the model has no jvp staticmethod (forward-mode "
        "derivative)",
        "forward mode",
    ),
)


def _unsupported_derivative(
    operator: str, engine: str, culprit: str, lacks: str, said: str | None
) -> UnsupportedDerivativeError:
    """The error for an operation that lacks a derivative the curvature needs.

    Args:
        operator: class name of the operator.
        engine: the engine that needed the derivative.
        culprit: a sentence naming the operation.
        lacks: ``"double backward"`` or ``"forward mode"``.
        said: PyTorch's own message, if there was one.
    """
    hints = []
    if "attention" in culprit.lower():
        hints.append(
            "the probe selects the math backend of torch.nn.functional."
            "scaled_dot_product_attention, so this fused kernel was called another way "
            "(directly, or by a library such as flash-attn/xformers): switch the model to "
            "PyTorch's 'sdpa' or 'eager' attention (Hugging Face: attn_implementation='eager')"
        )
    hints.append(
        "replace the operation by differentiable torch operations (for a custom "
        "autograd.Function: write its backward with differentiable torch ops and drop "
        "@once_differentiable, or give it setup_context and jvp staticmethods)"
    )
    if lacks == "double backward":
        hints.append(
            "or use engine='forward-over-reverse', which needs forward-mode derivatives instead "
            "of double backward"
        )
        if operator == "HessianOperator":
            hints.append(
                "or the Gauss-Newton matrix (GGNOperator, curvature='ggn' in the probe) with "
                "engine='forward-over-reverse', which needs only first derivatives of the model"
            )
    else:
        hints.append(
            "or use engine='double-backward' (the default), which needs double backward instead "
            "of forward-mode derivatives"
        )
    return UnsupportedDerivativeError(
        f"{operator}: the curvature of the loss could not be computed with engine={engine!r}: "
        f"{culprit}. Fixes: " + "; ".join(hints) + (f". (PyTorch said: {said})" if said else "")
    )


def _translate_derivative_error(
    err: BaseException, operator: str, engine: str
) -> UnsupportedDerivativeError | None:
    """The clear error for a PyTorch error about a missing derivative, else ``None``."""
    message = str(err)
    for pattern, template, lacks in _DERIVATIVE_ERRORS:
        match = pattern.search(message)
        if match is not None:
            first_line = message.strip().splitlines()[0]
            return _unsupported_derivative(
                operator, engine, template.format(match.group(1)), lacks, first_line
            )
    return None


def _floating_leaves(obj: Any) -> list[Tensor]:
    """The floating tensors of a batch (or of its targets), in a fixed traversal order.

    forward-over-reverse passes them to ``torch.func.jvp`` as primals with explicit zero tangents.
    Captured without a tangent, a target gets an efficient ZeroTensor tangent, which the
    forward-mode formula of ``mse_loss_backward`` (reduction="mean") writes into in place and
    fails with "ZeroTensors are immutable" (pytorch/pytorch#123996, open as of torch 2.13); a
    materialised zero costs little and gives the same product.
    """
    if isinstance(obj, Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _floating_leaves(item)]
    if isinstance(obj, Mapping):
        return [t for item in obj.values() for t in _floating_leaves(item)]
    return []


def _with_floating_leaves(obj: Any, leaves: Iterator[Tensor]) -> Any:
    """``obj`` with its floating tensors replaced, in :func:`_floating_leaves` order."""
    if isinstance(obj, Tensor):
        return next(leaves) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_with_floating_leaves(item, leaves) for item in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_with_floating_leaves(item, leaves) for item in obj)
    if isinstance(obj, Mapping):
        return {k: _with_floating_leaves(v, leaves) for k, v in obj.items()}
    return obj


def _select_parameters(model: nn.Module, params: Iterable[Any] | None) -> list[str]:
    """Names of the parameters to probe, in ``model.named_parameters()`` order."""
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            found = f"all {len(named)} are frozen" if named else "it has no parameters"
            raise ValueError(
                f"no parameter of the model requires grad ({found}), so there is no curvature to "
                "probe; unfreeze the ones to probe with p.requires_grad_(True), or name them "
                "with params=[...]"
            )
        return names
    if isinstance(params, (str, Tensor)) or isinstance(params, Mapping):
        raise TypeError(
            "params must be an iterable of parameter names or of the model's parameters, got "
            f"{type(params).__name__}; e.g. params=['fc.weight'] or params=model.fc.parameters()"
        )
    items = list(params)
    by_id = {id(p): n for n, p in named.items()}
    chosen = set()
    for item in items:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(
                    f"params names {item!r}, which is not a parameter of the model; valid names "
                    f"are those of model.named_parameters(), e.g. {list(named)[:5]}"
                )
            chosen.add(item)
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise ValueError(
                    f"params holds a tensor of shape {tuple(item.shape)} that is not a parameter "
                    "of the model; pass the model's own parameters or their names"
                )
            chosen.add(by_id[id(item)])
        else:
            raise TypeError(
                f"params must hold parameter names or parameters, got {type(item).__name__}"
            )
    if not chosen:
        raise ValueError("params is empty; pass at least one parameter, or params=None for all")
    return [n for n in named if n in chosen]


def _model_device(model: nn.Module) -> torch.device:
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    if len(devices) != 1:
        raise ValueError(
            "the model's parameters and buffers must be on one device, got "
            f"{sorted(map(str, devices))}; move the model with model.to(device)"
        )
    (device,) = devices
    if device.type == "meta":
        raise ValueError(
            "the model's parameters are on the meta device (not materialised); load or "
            "initialise them first"
        )
    return device


def _probe_dtype(trainable: Sequence[Tensor], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(
                f"dtype must be a floating torch.dtype such as torch.float64, or None for the "
                f"parameters' dtype; got {dtype!r}"
            )
        return dtype
    dtypes = {p.dtype for p in trainable}
    if len(dtypes) != 1:
        raise ValueError(
            f"the probed parameters have several dtypes {sorted(map(str, dtypes))}; pass "
            "dtype=torch.float32 (or float64) to probe them in one"
        )
    (found,) = dtypes
    if not found.is_floating_point:
        raise TypeError(f"the probed parameters must be floating point, got {found}")
    return found


def _refuse_synced_batchnorm(model: nn.Module, overrides: list[tuple[nn.Module, bool]]) -> None:
    """Raise if a SyncBatchNorm would synchronise its statistics during the probe.

    With a process group initialised, a training-mode SyncBatchNorm all-reduces inside its forward
    and backward (collectives the probe does not schedule) and has no double backward.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return  # it then normalises like BatchNorm
    flags = {id(m): flag for m, flag in overrides}
    synced = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.SyncBatchNorm) and flags.get(id(m), m.training)
    ]
    if synced:
        raise ValueError(
            f"the model has SyncBatchNorm layers in training mode ({synced[:3]}): they "
            "communicate across ranks inside the forward pass and cannot be differentiated "
            "twice, so the probe cannot use batch statistics. Probe with mode='eval' (running "
            "statistics), or probe a copy of the model whose SyncBatchNorm layers are "
            "BatchNorm again (each rank's own batch statistics)"
        )


class _CurvatureOperator(SymmetricOperator):
    """Setup shared by the Hessian and GGN operators: parameters, batches, mode, bookkeeping."""

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any] | BatchSet,
        loss: Any,
        *,
        mode: str,
        engine: str,
        dtype: torch.dtype | None,
        params: Iterable[Any] | None,
        cache_graph: bool,
        process_group: Any,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._comm = resolve_process_group(process_group)
        # This rank's coefficient of each local batch in the global mean, w_{r,b} / B (see
        # uba_auto._distributed); None in a single process, where the mean is taken at the end.
        self._coefficients: list[float] | None = None
        if self._comm is None:
            self._setup(model, batches, loss, mode, engine, dtype, params, cache_graph)
            self._set_batch_losses(self._build())
            self.global_batch_sizes = list(self.batch_sizes)
            return
        name = type(self).__name__
        error: BaseException | None = None
        try:
            self._setup(model, batches, loss, mode, engine, dtype, params, cache_graph)
            if self.device.type == "cuda":
                self._comm.device = self.device  # NCCL bookkeeping next to the model
            local_losses = self._build()
            self._set_batch_losses(local_losses)
        except Exception as err:
            error = err
        self._comm.agree(
            error,
            f"building {name}",
            equal={
                "the number of probe batches": getattr(self, "num_batches", math.nan),
                "the number of probed parameters": getattr(self, "size", math.nan),
            },
            hint="every rank must probe the same model with the same number of batches",
        )
        shares, self.global_batch_sizes = self._comm.batch_shares(self.batch_sizes)
        self._coefficients = [w / self.num_batches for w in shares]
        weights = torch.tensor(shares, dtype=self.dtype, device=self.device)
        # The loss of global batch b: the example-weighted mean of every rank's loss on it.
        self.batch_losses = self._comm.all_reduce_sum(self.batch_losses * weights)

    def _setup(
        self,
        model: nn.Module,
        batches: Iterable[Any] | BatchSet,
        loss: Any,
        mode: str,
        engine: str,
        dtype: torch.dtype | None,
        params: Iterable[Any] | None,
        cache_graph: bool,
    ) -> None:
        """This rank's part of the construction: parameters, batches, copies (no collective)."""
        model = unwrap_model(model)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if not isinstance(cache_graph, bool):
            raise TypeError(f"cache_graph must be a bool, got {type(cache_graph).__name__}")
        self._overrides = mode_overrides(model, mode)
        _refuse_synced_batchnorm(model, self._overrides)
        names = _select_parameters(model, params)
        named = dict(model.named_parameters())
        self.device = _model_device(model)
        self.dtype = _probe_dtype([named[n] for n in names], dtype)
        # An explicit dtype casts every floating tensor the model sees; otherwise nothing is cast.
        cast = dtype

        self.model = model
        self.loss = loss
        self.mode = mode
        self.engine = engine
        self.cache_graph = cache_graph
        self.param_names: list[str] = names
        self.param_shapes: list[torch.Size] = [named[n].shape for n in names]
        self._numels = [named[n].numel() for n in names]
        self.size = sum(self._numels)

        if isinstance(batches, BatchSet):
            if not batches.batches:
                raise ValueError("loader yielded no batches: the BatchSet given is empty")
            self.batch_set = BatchSet(
                batches=[move_batch(b, self.device, cast) for b in batches.batches],
                batch_sizes=list(batches.batch_sizes),
                num_requested=batches.num_requested,
            )
        else:
            self.batch_set = collect_batches(batches, None, device=self.device, dtype=cast)
        self.batches = self.batch_set.batches
        self.num_batches = len(self.batches)
        self.batch_sizes = list(self.batch_set.batch_sizes)
        for i, batch in enumerate(self.batches):
            check_batch_form(batch, loss, i)

        def copy_of(t: Tensor) -> Tensor:
            # detach() shares storage (no copy) when no cast is asked for: the probe never writes
            # these tensors, and sharing lets _check_unchanged see the user's in-place updates.
            t = t.detach()
            return t.to(cast) if cast is not None and t.is_floating_point() else t

        # _primals: the point, without autograd history (for torch.func); _leaves: the same tensors
        # as autograd leaves of the operator's own graphs, never the user's parameters.
        self._primals = {n: copy_of(named[n]) for n in names}
        self._leaves = {n: t.detach().requires_grad_() for n, t in self._primals.items()}
        self._frozen = {n: copy_of(p) for n, p in named.items() if n not in self._primals}
        self._buffers = {n: copy_of(b) for n, b in model.named_buffers()}
        self._watched = [(t, t._version) for t in (*model.parameters(), *model.buffers())]
        self.batch_losses: Tensor = torch.empty(0, dtype=self.dtype, device=self.device)
        self._gradient: Tensor | None = None
        self._graphs_checked: set[int] = set()

    # ----------------------------------------------------------------------------- helpers
    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat vector of length :attr:`size` into ``name -> tensor`` views."""
        if not isinstance(vec, Tensor) or vec.shape != (self.size,):
            got = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
            raise ValueError(f"vec must be a 1-D tensor of length {self.size}, got {got}")
        chunks = vec.split(self._numels)
        return {
            n: c.view(s)
            for n, c, s in zip(self.param_names, chunks, self.param_shapes, strict=True)
        }

    def flatten(self, tensors: Mapping[str, Tensor | None] | Sequence[Tensor | None]) -> Tensor:
        """Concatenate per-parameter tensors (by name, or in :attr:`param_names` order).

        ``None`` entries (parameters that do not affect the loss) count as zeros.
        """
        if isinstance(tensors, Mapping):
            tensors = [tensors.get(n) for n in self.param_names]
        if len(tensors) != len(self.param_names):
            raise ValueError(
                f"expected {len(self.param_names)} tensors (one per probed parameter), "
                f"got {len(tensors)}"
            )
        return torch.cat(
            [
                torch.zeros(k, dtype=self.dtype, device=self.device)
                if t is None
                else t.reshape(-1).to(self.dtype)
                for t, k in zip(tensors, self._numels, strict=True)
            ]
        )

    def loss_value(self) -> Tensor:
        """The mean over batches of the batch losses at the probe's point (0-dim, no graph)."""
        return self.batch_losses.mean()

    def gradient(self) -> Tensor:
        """The flat gradient of the mean batch loss at the probe's point (no graph attached).

        Under a process group it is the gradient of the global-batch loss (all-reduced), so every
        rank must call it.
        """
        if self._gradient is None:
            if self._comm is None:
                self._gradient = self._local_gradient()
            else:
                like = torch.zeros(self.size, dtype=self.dtype, device=self.device)
                self._gradient = self._comm.sum_of_parts(
                    self._local_gradient, like, f"computing the gradient ({type(self).__name__})"
                )
        return self._gradient

    def _local_gradient(self) -> Tensor:
        """This rank's part of :meth:`gradient` (all of it in a single process)."""
        self._check_unchanged()
        total = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        leaves = list(self._leaves.values())
        with self._computing():
            for i in range(self.num_batches):
                loss = self._batch_loss(i, self._leaves)
                if loss.requires_grad:
                    total += self._scaled(
                        self.flatten(torch.autograd.grad(loss, leaves, allow_unused=True)), i
                    )
        return self._mean(total)

    def _build(self) -> list[Tensor]:
        """Per-batch losses of this rank's batches (and any cached graphs): the subclass's part."""
        raise NotImplementedError

    def _local_product(self, v: Tensor) -> Tensor:
        """This rank's weighted part of ``A v`` (all of it in a single process)."""
        raise NotImplementedError

    def _matvec(self, v: Tensor) -> Tensor:
        if self._comm is None:
            return self._local_product(v)
        return self._comm.sum_of_parts(
            lambda: self._local_product(v), v, f"computing a {type(self).__name__} product"
        )

    def _scaled(self, x: Tensor, index: int) -> Tensor:
        """``x`` times batch ``index``'s coefficient in the global mean (as is in one process)."""
        return x if self._coefficients is None else x * self._coefficients[index]

    def _mean(self, total: Tensor) -> Tensor:
        """The local sum over batches turned into this rank's part of the mean."""
        return total / self.num_batches if self._coefficients is None else total

    def _point(self, trainable: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # Fresh buffer copies for every evaluation: train-mode BatchNorm updates them in place, and
        # torch.func refuses in-place writes to tensors captured from outside a transform.
        return {
            **trainable,
            **self._frozen,
            **{n: b.clone() for n, b in self._buffers.items()},
        }

    def _batch_loss(self, index: int, trainable: Mapping[str, Tensor]) -> Tensor:
        return loss_at(
            self._point(trainable), self.model, self.batches[index], self.loss, batch_index=index
        )

    def _set_batch_losses(self, losses: list[Tensor]) -> None:
        stacked = torch.stack([loss.detach().to(self.dtype) for loss in losses])
        check_finite_losses(stacked)
        self.batch_losses = stacked

    def _check_unchanged(self) -> None:
        if any(t._version != version for t, version in self._watched):
            raise RuntimeError(
                f"{type(self).__name__}: the model's parameters or buffers were modified in place "
                "(e.g. by an optimizer step) after this operator was built, so it no longer "
                "describes the model; build a new operator at the new point"
            )

    def _check_twice_differentiable(self, grad: Tensor, index: int) -> None:
        """Raise if the graph of a first derivative holds a @once_differentiable Function.

        Such a Function's backward output hangs on an ``Error`` node whose inputs are fresh
        leaves, not the parameters, so ``torch.autograd.grad(..., inputs=params)`` prunes it and
        silently drops that part of the second derivative (only ``.backward()`` would raise).
        Checked once per batch: the graph's structure does not change between products.
        """
        if index in self._graphs_checked or grad.grad_fn is None:
            return
        self._graphs_checked.add(index)
        seen, stack, error, functions = set(), [grad.grad_fn], False, set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            name = type(node).__name__
            error = error or name in ("Error", "DelayedError")
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                functions.add(name.removesuffix("Backward"))
            stack.extend(next_node for next_node, _ in node.next_functions)
        if error:
            culprit = (
                "a custom torch.autograd.Function in the model marks its backward "
                "@once_differentiable, so it cannot be differentiated twice (PyTorch would "
                "silently drop its part of the curvature); custom Functions in the graph of "
                f"batch {index}: {', '.join(sorted(functions)) or 'unknown'}"
            )
            raise _unsupported_derivative(
                type(self).__name__, self.engine, culprit, "double backward", None
            )

    def _rng_states(self) -> list[Tensor]:
        states = [torch.get_rng_state()]
        if self.device.type == "cuda":
            states.append(torch.cuda.get_rng_state(self.device))
        return states

    @contextlib.contextmanager
    def _computing(self, *, derivatives: bool = False, check_rng: bool = False) -> Iterator[None]:
        """Run a computation under the mode policy; translate missing-derivative errors.

        Args:
            derivatives: translate errors about missing higher-order/forward-mode derivatives.
            check_rng: raise if the block drew random numbers (restoring the generators first).
        """
        before = self._rng_states() if check_rng else None
        try:
            with evaluation_mode(self.model, self._overrides):
                yield
        except UnsupportedDerivativeError:
            raise
        except RuntimeError as err:
            translated = (
                _translate_derivative_error(err, type(self).__name__, self.engine)
                if derivatives
                else None
            )
            if translated is not None:
                raise translated from err
            raise
        if before is not None:
            after = self._rng_states()
            if not all(torch.equal(a, b) for a, b in zip(after, before, strict=True)):
                torch.set_rng_state(before[0])
                if len(before) > 1:
                    torch.cuda.set_rng_state(before[1], self.device)
                raise ValueError(
                    f"{type(self).__name__}: the model's forward pass drew random numbers in "
                    f"mode={self.mode!r}, so its loss (and curvature) is random. "
                    + (
                        "Switch off the random layers (put them in eval mode) or use the default "
                        "mode='train-deterministic', which turns dropout off"
                        if self.mode == "as-is"
                        else "A random layer the probe does not recognise (a custom dropout, "
                        "stochastic depth, noise injection) is active: put it in eval mode "
                        "before probing, or use mode='eval'"
                    )
                )


class HessianOperator(_CurvatureOperator):
    r"""The Hessian of the mean batch loss as a symmetric operator on the flat parameter vector.

    .. math::

        H = \nabla^2_\theta \, \frac{1}{B} \sum_{b=1}^{B} \ell_b(\theta), \qquad
        Hv = \frac{1}{B} \sum_{b=1}^{B} \nabla_\theta \big(\nabla_\theta \ell_b(\theta)^\top v\big).

    The vector is the concatenation of the flattened parameters that require grad (or those named
    by ``params``), in ``model.named_parameters()`` order: see :attr:`param_names`,
    :attr:`param_shapes` and :meth:`unflatten`. Every batch's loss is weighted equally.

    Mode policy (``mode``): by default, ``"train-deterministic"``, the loss is the one training
    sees, without randomness: BatchNorm (and InstanceNorm) normalise with batch statistics, as in
    training, while their running statistics and ``num_batches_tracked`` stay untouched; dropout,
    attention dropout and RNN dropout are off. ``"eval"`` puts every module in eval mode (BatchNorm
    uses running statistics); ``"as-is"`` keeps every module's flag. Flags are set only while the
    operator computes and restored exactly after; a forward pass that draws random numbers anyway
    raises ``ValueError``. Attention runs on the math kernel of scaled-dot-product attention, the
    only one with every derivative, and the fused fast path of ``nn.TransformerEncoderLayer`` is
    disabled while the operator computes.

    Engines:
        ``"double-backward"`` (default): per batch, the gradient is computed once with
        ``create_graph=True`` and its graph kept, so a product is one backward pass through
        that graph, :math:`Hv = \nabla_\theta (g^\top v)`, with no forward pass. The cached graphs
        hold the tensors saved by a forward and a backward pass, for every batch;
        ``cache_graph=False`` recomputes the forward and the gradient for every product instead
        (memory for one batch at a time, a forward and a backward more per product).
        ``"forward-over-reverse"``: ``torch.func.jvp(torch.func.grad(loss), (θ,), (v,))``, no cached
        graph (each product is one forward and a forward-mode-over-reverse pass per batch).

    Args:
        model: the model; never modified.
        batches: an iterable of batches (all of it is used) or a
            :class:`~uba_auto._batches.BatchSet`. Batches are moved to the model's device.
        loss: ``loss(outputs, targets)`` for ``(inputs, targets)`` batches, ``None`` for dict
            batches of Hugging Face-style models, or ``ModelLoss(fn)`` with ``fn(model, batch)``.
        mode: ``"train-deterministic"``, ``"eval"`` or ``"as-is"`` (see above).
        engine: ``"double-backward"`` or ``"forward-over-reverse"``.
        dtype: probe in this floating dtype (e.g. ``torch.float64``) by casting copies of the
            parameters, buffers and floating batch tensors; ``None`` keeps the model's dtype.
        params: parameter names or parameters to probe; ``None`` for all with ``requires_grad``.
        cache_graph: keep each batch's gradient graph (``engine="double-backward"`` only).
        process_group: ``"auto"`` (default): when ``torch.distributed`` is initialised with more
            than one rank, the operator is the curvature of the loss on the global batch: global
            batch :math:`b` is the union of every rank's batch :math:`b`, each rank's part
            weighted by its number of examples, and every product (and :meth:`gradient`) is
            all-reduced, so it is a collective that every rank must call in the same order (see
            :mod:`uba_auto._distributed`). ``None``/``False``: this process's batches alone. Or a
            ``torch.distributed.ProcessGroup``. A ``DistributedDataParallel`` (or
            ``DataParallel``) model is probed through its inner module; FSDP is refused.

    Attributes:
        size, dtype, device: of the flat vectors (``dtype`` is the probe's dtype).
        param_names, param_shapes: the probed parameters.
        num_batches, batch_sizes: the batches used (``batch_sizes``: this rank's).
        global_batch_sizes: the sizes of the global batches, summed over ranks (``None`` where
            unknown); ``batch_sizes`` in a single process.
        batch_losses: the loss of each (global) batch at the probe's point, a 1-D tensor.
        num_matvecs: products computed so far.

    Raises:
        ValueError: for an empty loader, a missing or misplaced ``loss``, a non-scalar or
            non-finite batch loss (the message names the batch), no parameter to probe, or a
            random forward pass.
        TypeError: for arguments of the wrong type, or a fully sharded (FSDP) model.
        UnsupportedDerivativeError: at construction or from :meth:`matvec`, if an operation of
            the model lacks the derivative the engine needs (double backward or forward mode).
        DistributedProbeError: under a process group, on every rank, when any rank failed
            (:class:`~uba_auto._distributed.DistributedProbeError`, naming the ranks and errors).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1)
        >>> op = HessianOperator(model, [(x, y)], torch.nn.functional.mse_loss, dtype=torch.float64)
        >>> op.to_dense()  # 2 XᵀX / N
        tensor([[1., 0.],
                [0., 4.]], dtype=torch.float64)
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any] | BatchSet,
        loss: Any = None,
        *,
        mode: str = "train-deterministic",
        engine: str = "double-backward",
        dtype: torch.dtype | None = None,
        params: Iterable[Any] | None = None,
        cache_graph: bool = True,
        process_group: Any = "auto",
    ) -> None:
        self._graph_grads: list[Tensor] | None = None
        super().__init__(
            model,
            batches,
            loss,
            mode=mode,
            engine=engine,
            dtype=dtype,
            params=params,
            cache_graph=cache_graph,
            process_group=process_group,
        )

    def _build(self) -> list[Tensor]:
        caching = self.engine == "double-backward" and self.cache_graph
        leaves = list(self._leaves.values())
        losses, grads = [], []
        with self._computing(derivatives=True, check_rng=True):
            for i in range(self.num_batches):
                if caching:
                    loss_i = self._batch_loss(i, self._leaves)
                    grads.append(self._differentiable_grad(loss_i, leaves, i))
                else:
                    with torch.no_grad():
                        loss_i = self._batch_loss(i, self._primals)
                losses.append(loss_i)
        if caching:
            self._graph_grads = grads
        return losses

    def _differentiable_grad(self, loss: Tensor, leaves: list[Tensor], index: int) -> Tensor:
        """Flat gradient of ``loss`` that keeps its graph (the first half of every product)."""
        if not loss.requires_grad:
            return torch.zeros(self.size, dtype=self.dtype, device=self.device)
        grad = self.flatten(torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True))
        self._check_twice_differentiable(grad, index)
        return grad

    def _local_gradient(self) -> Tensor:
        if self._graph_grads is None:
            return super()._local_gradient()
        if self._coefficients is None:
            return torch.stack([g.detach() for g in self._graph_grads]).mean(0)
        return sum(self._scaled(g.detach(), i) for i, g in enumerate(self._graph_grads))

    def _local_product(self, v: Tensor) -> Tensor:
        self._check_unchanged()
        leaves = list(self._leaves.values())
        with self._computing(derivatives=True):
            if self.engine == "forward-over-reverse":
                total = self._forward_over_reverse(v)
            elif self._graph_grads is not None:
                # One backward through all cached gradient graphs: Σ_b ∇(g_bᵀ v).
                live = [i for i, g in enumerate(self._graph_grads) if g.requires_grad]
                if not live:
                    return torch.zeros_like(v)
                total = self.flatten(
                    torch.autograd.grad(
                        [self._graph_grads[i] for i in live],
                        leaves,
                        [self._scaled(v, i) for i in live],
                        retain_graph=True,
                        allow_unused=True,
                    )
                )
            else:
                total = torch.zeros_like(v)
                for i in range(self.num_batches):
                    g = self._differentiable_grad(self._batch_loss(i, self._leaves), leaves, i)
                    if g.requires_grad:
                        total += self._scaled(
                            self.flatten(torch.autograd.grad(g, leaves, v, allow_unused=True)), i
                        )
        return self._mean(total)

    def _forward_over_reverse(self, v: Tensor) -> Tensor:
        tangents = self.unflatten(v)
        total = torch.zeros_like(v)
        for i in range(self.num_batches):
            batch = self.batches[i]
            # The data's floating tensors (targets of a pair) enter as primals with zero tangents,
            # see _floating_leaves.
            if isinstance(batch, (tuple, list)) and not isinstance(self.loss, ModelLoss):
                data = _floating_leaves(batch[1])

                def rebuild(leaves: list[Tensor], batch: Any = batch) -> Any:
                    return (batch[0], _with_floating_leaves(batch[1], iter(leaves)))
            else:
                data = _floating_leaves(batch)

                def rebuild(leaves: list[Tensor], batch: Any = batch) -> Any:
                    return _with_floating_leaves(batch, iter(leaves))

            def batch_loss(
                trainable: dict[str, Tensor],
                leaves: list[Tensor],
                i: int = i,
                rebuild: Any = rebuild,
            ) -> Tensor:
                return loss_at(
                    self._point(trainable), self.model, rebuild(leaves), self.loss, batch_index=i
                )

            _, hv = torch.func.jvp(
                torch.func.grad(batch_loss),
                (self._primals, data),
                (tangents, [torch.zeros_like(t) for t in data]),
            )
            total += self._scaled(self.flatten(hv), i)
        return total


class GGNOperator(_CurvatureOperator):
    r"""The generalized Gauss-Newton matrix of the mean batch loss, as a symmetric operator.

    For batch :math:`b` with model outputs :math:`z_b = f(\theta, x_b)`, output Jacobian
    :math:`J_b = \partial z_b / \partial \theta` and loss :math:`\ell(z_b, y_b)`,

    .. math::

        G = \frac{1}{B} \sum_{b=1}^{B} J_b^\top \, \nabla^2_{z} \ell(z_b, y_b) \, J_b .

    It drops the second-derivative-of-the-network term of the Hessian, so it is positive
    semi-definite whenever the loss is convex in the outputs (MSE, cross-entropy, BCE), and equals
    the Hessian when the outputs are linear in the parameters (e.g. linear regression).
    Each product computes :math:`J v`, applies the Hessian of the loss with respect to the
    outputs, and pulls the result back with :math:`J^\top`.

    It needs the loss to be a separate function of the outputs: ``(inputs, targets)`` batches with
    ``loss(outputs, targets)`` and a model whose output is a tensor. Dict batches (Hugging Face
    models that compute their own loss) and ``ModelLoss`` raise ``ValueError``.

    Engines: ``"double-backward"`` (default) computes :math:`Jv` by the double-vjp trick on a
    cached graph of the outputs (no forward pass per product when ``cache_graph=True``);
    ``"forward-over-reverse"`` computes :math:`Jv` with ``torch.func.jvp`` and :math:`J^\top u`
    with ``torch.func.vjp``, recomputing per product, and needs only first-order forward- and
    reverse-mode derivatives of the model.

    Arguments, attributes and the mode policy are those of :class:`HessianOperator`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1)
        >>> op = GGNOperator(model, [(x, y)], torch.nn.functional.mse_loss, dtype=torch.float64)
        >>> op.to_dense()  # equals the Hessian for a linear model with MSE
        tensor([[1., 0.],
                [0., 4.]], dtype=torch.float64)
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any] | BatchSet,
        loss: Any = None,
        *,
        mode: str = "train-deterministic",
        engine: str = "double-backward",
        dtype: torch.dtype | None = None,
        params: Iterable[Any] | None = None,
        cache_graph: bool = True,
        process_group: Any = "auto",
    ) -> None:
        if isinstance(loss, ModelLoss):
            raise ValueError(
                "GGNOperator needs separable outputs and a loss_fn(outputs, targets): the "
                "Gauss-Newton matrix is Jᵀ H_ℓ J with J the Jacobian of the model's outputs, so "
                f"the loss must be a function of the outputs, got {loss!r}. Use (inputs, targets) "
                "batches with loss=loss_fn(outputs, targets), or the Hessian (HessianOperator)"
            )
        super().__init__(
            model,
            batches,
            loss,
            mode=mode,
            engine=engine,
            dtype=dtype,
            params=params,
            cache_graph=cache_graph,
            process_group=process_group,
        )

    def _build(self) -> list[Tensor]:
        self._cache: list[tuple[Any, ...]] | None = None
        for i, batch in enumerate(self.batches):
            if isinstance(batch, Mapping):
                raise ValueError(
                    f"GGNOperator needs separable outputs and a loss_fn(outputs, targets), but "
                    f"batch {i} is a dict, so the model (Hugging Face style) computes its own "
                    "loss and its outputs cannot be separated from it. Pass (inputs, targets) "
                    "batches with loss=loss_fn(outputs, targets), or use the Hessian "
                    "(HessianOperator)"
                )
        caching = self.engine == "double-backward" and self.cache_graph
        losses, cache = [], []
        with self._computing(derivatives=True, check_rng=True):
            for i in range(self.num_batches):
                if caching:
                    entry = self._linearise(i)
                    cache.append(entry)
                    losses.append(entry[-1])
                else:
                    inputs, targets = split_supervised(self.batches[i])
                    with torch.no_grad():
                        z = self._outputs(i, self._primals, inputs)
                        losses.append(self._output_loss(i, z, targets))
        if caching:
            self._cache = cache
        return losses

    def _outputs(self, index: int, trainable: Mapping[str, Tensor], inputs: Any) -> Tensor:
        z = outputs_at(self._point(trainable), self.model, inputs)
        if not isinstance(z, Tensor):
            raise ValueError(
                f"GGNOperator needs the model's output to be a Tensor, got {type(z).__name__} for "
                f"batch {index}; wrap the model so that forward returns the tensor loss_fn "
                "receives, or use HessianOperator"
            )
        return z

    def _output_loss(self, index: int, z: Tensor, targets: Any) -> Tensor:
        return check_scalar_loss(self.loss(z, targets), index)

    def _linearise(self, index: int) -> tuple[Any, ...]:
        """Graphs for one batch: outputs z(θ), ∇_z ℓ (with graph) and Jᵀu linear in a dummy u."""
        inputs, targets = split_supervised(self.batches[index])
        leaves = list(self._leaves.values())
        z = self._outputs(index, self._leaves, inputs)
        z_detached = z.detach().requires_grad_()
        loss = self._output_loss(index, z_detached, targets)
        (grad_z,) = torch.autograd.grad(loss, z_detached, create_graph=True)
        if not z.requires_grad:
            return (z, z_detached, grad_z, None, None, loss)
        # Jᵀu is linear in u, so differentiating it with respect to u along v gives J v: the
        # double-vjp trick, which reuses this graph instead of a forward-mode pass per product.
        dummy = torch.zeros_like(z, requires_grad=True)
        jt_dummy = self.flatten(
            torch.autograd.grad(z, leaves, dummy, create_graph=True, allow_unused=True)
        )
        self._check_twice_differentiable(jt_dummy, index)
        return (z, z_detached, grad_z, dummy, jt_dummy, loss)

    def _apply(self, entry: tuple[Any, ...], v: Tensor, retain: bool) -> Tensor | None:
        """Jᵀ H_ℓ J v for one batch's cached graphs; ``None`` where it is zero."""
        z, z_detached, grad_z, dummy, jt_dummy, _ = entry
        if dummy is None or not jt_dummy.requires_grad or not grad_z.requires_grad:
            return None  # outputs independent of θ, or a loss linear in the outputs
        (jv,) = torch.autograd.grad(jt_dummy, dummy, v, retain_graph=True)
        (hjv,) = torch.autograd.grad(grad_z, z_detached, jv, retain_graph=retain)
        leaves = list(self._leaves.values())
        return self.flatten(
            torch.autograd.grad(z, leaves, hjv, retain_graph=retain, allow_unused=True)
        )

    def _local_product(self, v: Tensor) -> Tensor:
        self._check_unchanged()
        total = torch.zeros_like(v)
        with self._computing(derivatives=True):
            for i in range(self.num_batches):
                if self.engine == "forward-over-reverse":
                    part = self._forward_mode_product(i, v)
                elif self._cache is not None:
                    part = self._apply(self._cache[i], v, retain=True)
                else:
                    part = self._apply(self._linearise(i), v, retain=False)
                if part is not None:
                    total += self._scaled(part, i)
        return self._mean(total)

    def _forward_mode_product(self, index: int, v: Tensor) -> Tensor:
        inputs, targets = split_supervised(self.batches[index])

        def outputs(trainable: dict[str, Tensor]) -> Tensor:
            return self._outputs(index, trainable, inputs)

        data = _floating_leaves(targets)

        def output_loss(z: Tensor, leaves: list[Tensor]) -> Tensor:
            return self._output_loss(index, z, _with_floating_leaves(targets, iter(leaves)))

        z, jv = torch.func.jvp(outputs, (self._primals,), (self.unflatten(v),))
        _, hjv = torch.func.jvp(
            torch.func.grad(output_loss),
            (z.detach(), data),
            (jv, [torch.zeros_like(t) for t in data]),
        )
        _, pullback = torch.func.vjp(outputs, self._primals)
        (jt_hjv,) = pullback(hjv)
        return self.flatten(jt_hjv)
