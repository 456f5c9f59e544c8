"""Guard the user's state around the curvature probe: flags, ``.grad``, RNG and global switches.

The probe promises to leave the caller's training exactly as it found it: parameters, buffers
(BatchNorm running statistics and ``num_batches_tracked``), ``.grad`` tensors, every submodule's
``training`` flag, ``requires_grad`` flags, the random number generators, the optimizer's state, and
the global switches it flips (attention backend, MHA fast path, cuDNN and oneDNN, grad mode).

:func:`preserve_state` is the cheap guard the probe wraps itself in: it restores flags, ``.grad``
references, RNG states and global switches on exit, and clones no parameter or buffer, because the
probe never writes them (it evaluates the model at copies through ``torch.func.functional_call``).
The bit-for-bit snapshots the tests compare against live in ``tests/_state_checks.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["cuda_rng_states", "global_flags", "preserve_state", "set_global_flags"]


def global_flags() -> dict[str, Any]:
    """Grad mode, the MHA fast path, the attention-backend and cuDNN/oneDNN switches, by name."""
    flags: dict[str, Any] = {"grad_enabled": torch.is_grad_enabled()}
    mha = getattr(torch.backends, "mha", None)
    if mha is not None:
        flags["mha_fastpath"] = mha.get_fastpath_enabled()
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled"):
        getter = getattr(torch.backends.cuda, name, None)
        if getter is not None:
            flags[name] = getter()
    getter = getattr(torch.backends.cuda, "cudnn_sdp_enabled", None)
    if getter is not None:
        flags["cudnn_sdp_enabled"] = getter()
    # Switched off around the forward pass of recurrent layers (modes.unfused_recurrent_kernels).
    flags["cudnn_enabled"] = torch.backends.cudnn.enabled
    flags["mkldnn_enabled"] = torch.backends.mkldnn.enabled
    return flags


def set_global_flags(flags: dict[str, Any]) -> None:
    """Set the switches :func:`global_flags` read."""
    torch.set_grad_enabled(flags["grad_enabled"])
    if "mha_fastpath" in flags:
        torch.backends.mha.set_fastpath_enabled(flags["mha_fastpath"])
    if "cudnn_enabled" in flags:
        torch.backends.cudnn.enabled = flags["cudnn_enabled"]
        torch.backends.mkldnn.enabled = flags["mkldnn_enabled"]
    for name, value in flags.items():
        if name.endswith("_sdp_enabled"):
            setter = getattr(torch.backends.cuda, "enable_" + name.removesuffix("_enabled"), None)
            if setter is not None:
                setter(value)


def cuda_rng_states() -> list[Tensor] | None:
    """Every CUDA generator's state, or ``None`` if CUDA was never initialised."""
    # Reading the CUDA generators would initialise CUDA on a machine that never used it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_rng_state_all()
    return None


@contextlib.contextmanager
def preserve_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> Iterator[None]:
    """Restore the user's flags, ``.grad`` references, RNG states and global switches on exit.

    Restores, also when the block raises: every submodule's ``training`` flag, every parameter's
    ``requires_grad`` and ``.grad`` (the very tensor object, or ``None``), the CPU and (if
    initialised) CUDA random number generators, grad mode, the MHA fast-path switch, the
    attention-backend and cuDNN/oneDNN switches, and the optimizer's per-group hyper-parameters.
    It clones no parameter, buffer or optimizer state tensor: the probe never writes them.

    Args:
        model: the user's model.
        optimizer: the user's optimizer, if any.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> with preserve_state(model):
        ...     _ = model.eval(), torch.rand(3)
        >>> model.training
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = cuda_rng_states()
    flags = global_flags()
    groups = (
        None
        if optimizer is None
        else [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    )
    try:
        yield
    finally:
        for m, training in modules:
            m.training = training
        for p, requires_grad, grad in params:
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        set_global_flags(flags)
        if optimizer is not None and groups is not None:
            for group, saved in zip(optimizer.param_groups, groups, strict=False):
                group.update(saved)
