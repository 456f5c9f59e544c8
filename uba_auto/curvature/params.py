"""The parameters an operator differentiates: which, on which device, in which dtype, where.

The model is never mutated: an operator evaluates it at a :class:`ParameterPoint`, detached
copies of the probed parameters (autograd leaves of the operator's own graphs) with the frozen
parameters and fresh copies of the buffers, through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ParameterPoint",
    "device_of",
    "model_device",
    "probe_dtype",
    "select_parameters",
    "unwrap_model",
    "unwrap_notes",
]

_FSDP_FIX = (
    "The probe needs every parameter whole on every rank, and FSDP shards them. Probe an "
    "unsharded model instead: call auto_uba/probe_curvature on the model before wrapping it with "
    "FSDP (the pre-training probe), or build a plain copy on each rank from the full state dict "
    "(torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options="
    "StateDictOptions(full_state_dict=True))) and probe that copy. DistributedDataParallel "
    "is supported"
)


def _refuse_sharded(model: nn.Module) -> None:
    """Raise for FSDP (1 and 2) and DTensor-sharded models; cheap when FSDP was never imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        kinds = tuple(
            k
            for k in (
                getattr(fsdp, "FullyShardedDataParallel", None),
                getattr(fsdp, "FSDPModule", None),
            )
            if isinstance(k, type)
        )
        found = next((m for m in model.modules() if kinds and isinstance(m, kinds)), None)
        if found is not None:
            raise TypeError(
                f"model holds a fully sharded module ({type(found).__name__}): FSDP is not "
                f"supported by the curvature probe. {_FSDP_FIX}"
            )
    tensor_mod = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(tensor_mod, "DTensor", None) if tensor_mod is not None else None
    if isinstance(dtensor, type):
        sharded = next((n for n, p in model.named_parameters() if isinstance(p, dtensor)), None)
        if sharded is not None:
            raise TypeError(
                f"parameter {sharded!r} is a DTensor (sharded by FSDP2/fully_shard or tensor "
                f"parallelism): sharded parameters are not supported by the curvature probe. "
                f"{_FSDP_FIX}"
            )


def _compiled_module_type() -> type | None:
    """``torch.compile``'s wrapper class, ``None`` while dynamo was never imported (then no model
    can be compiled, and importing it here would cost a second)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    kind = getattr(eval_frame, "OptimizedModule", None)
    return kind if isinstance(kind, type) else None


def _unwrapped(model: nn.Module) -> tuple[nn.Module, bool]:
    """The innermost module, and whether a ``torch.compile`` wrapper was removed on the way."""
    compiled = _compiled_module_type()
    wrappers: tuple[type, ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    removed_compiled = False
    while True:
        if compiled is not None and isinstance(model, compiled):
            model, removed_compiled = model._orig_mod, True
        elif isinstance(model, wrappers):
            model = model.module
        else:
            return model, removed_compiled


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module to probe: the inner module of ``DistributedDataParallel``/``DataParallel`` and
    the original module of ``torch.compile(model)`` (``model._orig_mod``), in any nesting.

    The probe evaluates the inner module through ``torch.func.functional_call`` and never runs
    the wrapper's forward, so DDP's gradient-synchronisation hooks never fire and its state (the
    reducer, buffers, ``require_forward_param_sync``) is left alone. A compiled model is the
    same function of the same parameters as its original module, but its graphs have no double
    backward (torch raises "aot_autograd does not currently support double backward" after
    compiling): probing the original compiles nothing and gives the same curvature
    (:func:`unwrap_notes` says so for the result). Fully sharded models are refused with a
    ``TypeError`` that says what to do.

    Example:
        >>> import torch
        >>> inner = torch.nn.Linear(2, 1)
        >>> unwrap_model(torch.nn.DataParallel(inner)) is inner
        True
    """
    _refuse_sharded(model)
    return _unwrapped(model)[0]


def unwrap_notes(model: nn.Module) -> tuple[str, ...]:
    """What :func:`unwrap_model` did that a result should say: a note when it probes the
    original module of a ``torch.compile``'d model, else nothing.

    Example:
        >>> unwrap_notes(torch.nn.Linear(2, 1))
        ()
    """
    if not _unwrapped(model)[1]:
        return ()
    return (
        "model is torch.compile'd: the probe evaluated its original module (model._orig_mod: "
        "the same parameters, the same function) without compiling anything, because compiled "
        "graphs have no double backward",
    )


def select_parameters(model: nn.Module, params: Iterable[Any] | None) -> list[str]:
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


def model_device(model: nn.Module) -> torch.device:
    """The one device of the model's parameters and buffers (not the meta device)."""
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


def device_of(model: Any) -> torch.device | None:
    """The device of ``model``'s first parameter (or buffer), for :func:`resolve_process_group`.

    Never raises (``None`` for no tensors, or not a module): at the public boundary of a
    collective a rank must not fail alone before the first agreement, which checks the model.

    Example:
        >>> device_of(torch.nn.Linear(1, 1))
        device(type='cpu')
    """
    for attribute in ("parameters", "buffers"):
        try:  # a wrapper may fail even to list its tensors (FSDP): the probe refuses it later
            first = next(iter(getattr(model, attribute)()), None)
        except Exception:
            return None
        if isinstance(first, Tensor):
            return first.device
    return None


def probe_dtype(trainable: Sequence[Tensor], dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` if given (checked), else the one floating dtype of the probed parameters."""
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


class ParameterPoint:
    """The point at which an operator is built, and the flat layout of its vectors.

    Args:
        model: the unwrapped model.
        params: parameter names or parameters to probe; ``None`` for all with ``requires_grad``.
        dtype: probe in this floating dtype by casting copies of the parameters and buffers;
            ``None`` keeps the model's dtype and copies nothing.

    Attributes:
        names, shapes: the probed parameters, in ``model.named_parameters()`` order.
        size, dtype, device: of the flat vectors.
        primals: the probed parameters without autograd history (for :mod:`torch.func`).
        leaves: the same tensors as autograd leaves of the operator's own graphs, never the user's
            parameters.
        cast: the dtype every floating tensor the model sees is cast to, ``None`` for none.
    """

    def __init__(
        self, model: nn.Module, params: Iterable[Any] | None, dtype: torch.dtype | None
    ) -> None:
        names = select_parameters(model, params)
        named = dict(model.named_parameters())
        self.device = model_device(model)
        self.dtype = probe_dtype([named[n] for n in names], dtype)
        # An explicit dtype casts every floating tensor the model sees; otherwise nothing is cast.
        self.cast = dtype
        self.names = names
        self.shapes: list[torch.Size] = [named[n].shape for n in names]
        self.numels = [named[n].numel() for n in names]
        self.size = sum(self.numels)

        def copy_of(t: Tensor) -> Tensor:
            # detach() shares storage (no copy) when no cast is asked for: the operators never
            # write these tensors, and sharing lets check_unchanged see the user's updates.
            t = t.detach()
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        self.primals = {n: copy_of(named[n]) for n in names}
        self.leaves = {n: t.detach().requires_grad_() for n, t in self.primals.items()}
        self._frozen = {n: copy_of(p) for n, p in named.items() if n not in self.primals}
        self._buffers = {n: copy_of(b) for n, b in model.named_buffers()}
        self._watched = [(t, t._version) for t in (*model.parameters(), *model.buffers())]

    def with_buffers(self, trainable: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``trainable`` completed by the frozen parameters and fresh copies of the buffers.

        Fresh copies for every evaluation: train-mode BatchNorm updates them in place, and
        torch.func refuses in-place writes to tensors captured from outside a transform.
        """
        return {**trainable, **self._frozen, **{n: b.clone() for n, b in self._buffers.items()}}

    def check_unchanged(self, operator: str) -> None:
        """Raise if the model's parameters or buffers were modified in place since the build."""
        if any(t._version != version for t, version in self._watched):
            raise RuntimeError(
                f"{operator}: the model's parameters or buffers were modified in place "
                "(e.g. by an optimizer step) after this operator was built, so it no longer "
                "describes the model; build a new operator at the new point"
            )

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat vector of length :attr:`size` into ``name -> tensor`` views."""
        if not isinstance(vec, Tensor) or vec.shape != (self.size,):
            got = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
            raise ValueError(f"vec must be a 1-D tensor of length {self.size}, got {got}")
        chunks = vec.split(self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def flatten(self, tensors: Mapping[str, Tensor | None] | Sequence[Tensor | None]) -> Tensor:
        """Concatenate per-parameter tensors (by name, or in :attr:`names` order).

        ``None`` entries (parameters that do not affect the loss) count as zeros.
        """
        if isinstance(tensors, Mapping):
            tensors = [tensors.get(n) for n in self.names]
        if len(tensors) != len(self.names):
            raise ValueError(
                f"expected {len(self.names)} tensors (one per probed parameter), got {len(tensors)}"
            )
        return torch.cat(
            [
                torch.zeros(k, dtype=self.dtype, device=self.device)
                if t is None
                else t.reshape(-1).to(self.dtype)
                for t, k in zip(tensors, self.numels, strict=True)
            ]
        )

    def zeros(self) -> Tensor:
        """A flat zero vector."""
        return torch.zeros(self.size, dtype=self.dtype, device=self.device)
