"""What the demo needs from its surroundings: its optional packages and a device."""

from __future__ import annotations

import importlib

import torch

_DEPENDENCIES = (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))


def check_demo_dependencies(*, plot: bool = True) -> None:
    """Raise :class:`ImportError` naming what the demo needs and is not installed.

    Args:
        plot: also check matplotlib (the figure); scikit-learn (the data) is always needed.

    Raises:
        ImportError: if scikit-learn (or matplotlib) cannot be imported; the message gives the
            command that installs them.
    """
    missing = []
    for module, package in _DEPENDENCIES[: 2 if plot else 1]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(
            f"the demo needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install with: "
            'pip install "uba-auto[demo]"'
        )


def resolve_device(device: str | torch.device, name: str = "device") -> torch.device:
    """The device asked for: ``"auto"`` is CUDA when available, else the CPU.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a :class:`torch.device`.
        name: how the argument is called in error messages (``"--device"`` for the CLI).

    Raises:
        ValueError: for an unknown device, or CUDA asked for and not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{name} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name} {str(device)!r} asks for CUDA, but CUDA is not available here "
                "(torch.cuda.is_available() is False: no GPU, or a CPU-only PyTorch build); "
                "use 'cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name} {str(device)!r}: there are only {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev
