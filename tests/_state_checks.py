"""Bit-for-bit snapshots of everything of the user's that the curvature probe could touch (tests).

:func:`snapshot_state` clones all of it; :func:`assert_state_unchanged` compares the current state
with a snapshot bit for bit and lists the differences. The probe itself only uses the cheap guard
:func:`uba_auto._state.preserve_state`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from uba_auto._state import cuda_rng_states, global_flags

__all__ = ["StateSnapshot", "assert_state_unchanged", "snapshot_state"]


@dataclass(frozen=True)
class StateSnapshot:
    """Everything of the user's the probe could touch, cloned at one moment.

    Attributes:
        parameters: ``name -> clone`` of every parameter (``model.named_parameters()``).
        buffers: ``name -> clone`` of every buffer.
        grads: ``name -> clone of .grad`` or ``None`` where ``.grad`` is ``None``.
        grad_has_graph: ``name -> whether .grad carried an autograd graph`` (``requires_grad``).
        requires_grad: ``name -> requires_grad`` of every parameter.
        training: ``module name -> training flag`` of every submodule (``""`` is the root).
        cpu_rng_state: ``torch.get_rng_state()``.
        cuda_rng_states: ``torch.cuda.get_rng_state_all()`` if CUDA was initialised, else ``None``.
        optimizer_state: deep copy of ``optimizer.state_dict()``, or ``None`` without optimizer.
        global_flags: grad mode, MHA fast path, scaled-dot-product-attention backend and
            cuDNN/oneDNN switches.
    """

    parameters: dict[str, Tensor]
    buffers: dict[str, Tensor]
    grads: dict[str, Tensor | None]
    grad_has_graph: dict[str, bool]
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    cpu_rng_state: Tensor
    cuda_rng_states: list[Tensor] | None
    optimizer_state: dict[str, Any] | None
    global_flags: dict[str, Any]


def snapshot_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> StateSnapshot:
    """Clone everything of the user's the probe could touch.

    Costs a copy of the model (and of the optimizer state): meant for tests and audits; the probe
    itself uses :func:`uba_auto._state.preserve_state`.

    Args:
        model: the user's model.
        optimizer: the user's optimizer, if any.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> snap = snapshot_state(model)
        >>> sorted(snap.parameters), snap.grads["weight"], snap.training
        (['bias', 'weight'], None, {'': True})
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = dict(model.named_parameters())
    return StateSnapshot(
        parameters={n: p.detach().clone() for n, p in params.items()},
        buffers={n: b.detach().clone() for n, b in model.named_buffers()},
        grads={n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()},
        grad_has_graph={n: p.grad is not None and p.grad.requires_grad for n, p in params.items()},
        requires_grad={n: p.requires_grad for n, p in params.items()},
        training={n: m.training for n, m in model.named_modules()},
        cpu_rng_state=torch.get_rng_state(),
        cuda_rng_states=cuda_rng_states(),
        optimizer_state=None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
        global_flags=global_flags(),
    )


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape, device and bits (NaN equals the same NaN; -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(
        a.detach().reshape(-1).contiguous().view(torch.uint8),
        b.detach().reshape(-1).contiguous().view(torch.uint8),
    )


def _describe(t: Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}"


def _compare_tensor_dicts(
    kind: str, now: dict[str, Tensor | None], then: dict[str, Tensor | None], out: list[str]
) -> None:
    for name in sorted(set(now) | set(then)):
        if name not in then:
            out.append(f"{kind} {name!r} was added")
        elif name not in now:
            out.append(f"{kind} {name!r} was removed")
        else:
            a, b = now[name], then[name]
            if (a is None) != (b is None):
                out.append(
                    f"{kind} {name!r} was {'None' if b is None else 'a tensor'}, "
                    f"is now {'None' if a is None else 'a tensor'}"
                )
            elif a is not None and b is not None and not _bitwise_equal(a, b):
                if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
                    out.append(f"{kind} {name!r} changed from {_describe(b)} to {_describe(a)}")
                elif a.is_floating_point() or a.is_complex():
                    diff = (a.detach() - b).abs().max()
                    out.append(f"{kind} {name!r} changed (max abs difference {float(diff):.3g})")
                else:
                    out.append(f"{kind} {name!r} changed")


def _compare_flags(kind: str, now: dict[str, Any], then: dict[str, Any], out: list[str]) -> None:
    for name in sorted(set(now) | set(then)):
        if now.get(name, "<absent>") != then.get(name, "<absent>"):
            out.append(
                f"{kind} {name!r} was {then.get(name, '<absent>')}, is now "
                f"{now.get(name, '<absent>')}"
            )


def _compare_nested(path: str, a: Any, b: Any, out: list[str]) -> None:
    """Recursive comparison of optimizer state dicts (``a`` now, ``b`` snapshot)."""
    if isinstance(b, Tensor) or isinstance(a, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and _bitwise_equal(a, b)):
            out.append(f"optimizer state {path} changed")
    elif isinstance(b, dict) and isinstance(a, dict):
        for k in list(b) + [k for k in a if k not in b]:
            if k not in a or k not in b:
                out.append(f"optimizer state {path}[{k!r}] was {'added' if k in a else 'removed'}")
            else:
                _compare_nested(f"{path}[{k!r}]", a[k], b[k], out)
    elif isinstance(b, (list, tuple)) and isinstance(a, (list, tuple)):
        if len(a) != len(b):
            out.append(f"optimizer state {path} changed length from {len(b)} to {len(a)}")
        else:
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                _compare_nested(f"{path}[{i}]", x, y, out)
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    elif type(a) is not type(b) or a != b:
        out.append(f"optimizer state {path} was {b!r}, is now {a!r}")


def assert_state_unchanged(
    model: nn.Module,
    snapshot: StateSnapshot,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    max_reported: int = 10,
) -> None:
    """Check, bit for bit, that nothing recorded in ``snapshot`` has changed.

    Args:
        model: the model the snapshot was taken of.
        snapshot: from :func:`snapshot_state`.
        optimizer: the optimizer, if the snapshot recorded one.
        max_reported: how many differences the message lists.

    Raises:
        AssertionError: listing the first differences.
    """
    params = dict(model.named_parameters())
    diffs: list[str] = []
    _compare_tensor_dicts(
        "parameter", {n: p.detach() for n, p in params.items()}, dict(snapshot.parameters), diffs
    )
    _compare_tensor_dicts(
        "buffer", {n: b.detach() for n, b in model.named_buffers()}, dict(snapshot.buffers), diffs
    )
    _compare_tensor_dicts(
        ".grad of", {n: p.grad for n, p in params.items()}, dict(snapshot.grads), diffs
    )
    _compare_flags(
        "requires_grad of .grad of",
        {n: p.grad is not None and p.grad.requires_grad for n, p in params.items()},
        snapshot.grad_has_graph,
        diffs,
    )
    _compare_flags(
        "requires_grad of",
        {n: p.requires_grad for n, p in params.items()},
        snapshot.requires_grad,
        diffs,
    )
    _compare_flags(
        "training flag of module",
        {n: m.training for n, m in model.named_modules()},
        snapshot.training,
        diffs,
    )
    if not _bitwise_equal(torch.get_rng_state(), snapshot.cpu_rng_state):
        diffs.append("the CPU random number generator state changed (random numbers were drawn)")
    cuda_now = cuda_rng_states()
    if snapshot.cuda_rng_states is not None and (
        cuda_now is None
        or len(cuda_now) != len(snapshot.cuda_rng_states)
        or not all(
            _bitwise_equal(a, b) for a, b in zip(cuda_now, snapshot.cuda_rng_states, strict=True)
        )
    ):
        diffs.append("a CUDA random number generator state changed")
    if (optimizer is None) != (snapshot.optimizer_state is None):
        raise ValueError(
            "pass the optimizer to assert_state_unchanged if and only if it was passed to "
            f"snapshot_state (snapshot has optimizer state: {snapshot.optimizer_state is not None})"
        )
    if optimizer is not None:
        _compare_nested("", optimizer.state_dict(), snapshot.optimizer_state, diffs)
    _compare_flags("global switch", global_flags(), snapshot.global_flags, diffs)
    if diffs:
        shown = "\n  ".join(diffs[:max_reported])
        more = f"\n  ... and {len(diffs) - max_reported} more" if len(diffs) > max_reported else ""
        raise AssertionError(f"{len(diffs)} difference(s) from the snapshot:\n  {shown}{more}")
