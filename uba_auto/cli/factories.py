"""What ``uba-auto report`` imports from the user: the model and data factories, and the loss.

A factory is named ``PKG.MODULE:NAME`` and imported as ``python -m`` would (the current folder
first); whatever goes wrong in the user's code is reported in one line, not as our traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["LOSSES", "call_factory", "import_object", "make_data", "make_model", "resolve_loss"]

LOSSES = {
    "cross_entropy": "cross_entropy",
    "nll": "nll_loss",
    "mse": "mse_loss",
    "l1": "l1_loss",
    "smooth_l1": "smooth_l1_loss",
    "huber": "huber_loss",
    "bce": "binary_cross_entropy",
    "bce_with_logits": "binary_cross_entropy_with_logits",
}
"""``--loss`` names and the :mod:`torch.nn.functional` losses they stand for."""


def import_object(spec: str, flag: str) -> Any:
    """The object ``module:attr`` names, imported as ``python -m`` would (current folder first)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(
            f"{flag} must have the form PKG.MODULE:NAME (e.g. mypackage.models:make_model), "
            f"got {spec!r}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"{flag} {spec}: cannot import module {module_name!r} ({type(err).__name__}: {err}); "
            "run uba-auto from the folder that contains it or add that folder to PYTHONPATH"
        ) from None
    except Exception as err:  # the module's own code failed while importing
        raise ImportError(
            f"{flag} {spec}: importing module {module_name!r} raised {type(err).__name__}: {err}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{flag} {spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def call_factory(spec: str, flag: str) -> Any:
    """What the function ``spec`` names returns when called with no arguments."""
    factory = import_object(spec, flag)
    if not callable(factory):
        raise TypeError(
            f"{flag} {spec} must name a function (factory) called with no arguments, got a "
            f"{type(factory).__name__}"
        )
    try:
        return factory()
    except Exception as err:  # the user's code: report it, not our traceback
        raise ValueError(f"{flag} factory {spec} raised {type(err).__name__}: {err}") from None


def make_model(spec: str, flag: str = "--model") -> Any:
    """The :class:`torch.nn.Module` the factory ``spec`` returns."""
    from torch import nn

    model = call_factory(spec, flag)
    if isinstance(model, nn.Module):
        return model
    what = f"{flag} factory {spec} must return the model, a torch.nn.Module, got {_kind(model)}"
    if isinstance(model, (tuple, list)) and any(isinstance(m, nn.Module) for m in model):
        raise TypeError(f"{what} holding a Module: return the model alone")
    if _is_data(model):
        raise TypeError(
            f"{what}, which looks like data: pass that factory as --data, and as {flag} a "
            "function that returns your nn.Module"
        )
    raise TypeError(what)


def make_data(spec: str, flag: str = "--data") -> Iterable[Any]:
    """The iterable of batches the factory ``spec`` returns (a tensor or a dict is not one)."""
    from torch import nn
    from torch.utils.data import Dataset

    data = call_factory(spec, flag)
    if isinstance(data, nn.Module):
        raise TypeError(
            f"{flag} factory {spec} returned a model ({_kind(data)}, a torch.nn.Module), not "
            "data: --data must name a function that returns the batches to probe (a DataLoader "
            "or a list of (inputs, targets) pairs, or of dicts for a model that computes its own "
            "loss); the model's factory goes to --model"
        )
    if isinstance(data, Dataset) and not _is_data(data):  # map-style: examples, not batches
        raise TypeError(
            f"{flag} factory {spec} returned a dataset ({_kind(data)}), not batches: return "
            "torch.utils.data.DataLoader(dataset, batch_size=...) instead"
        )
    if not _is_data(data):
        raise TypeError(
            f"{flag} factory {spec} must return an iterable of batches (a DataLoader or a "
            f"list of (inputs, targets) pairs), got {_kind(data)}"
        )
    return data


def _is_data(obj: Any) -> bool:
    """Whether ``obj`` can be a loader: iterable, and not a tensor, a mapping or a string."""
    from torch import Tensor

    return isinstance(obj, Iterable) and not isinstance(obj, (Tensor, Mapping, str, bytes))


def _kind(obj: Any) -> str:
    """The type of ``obj`` by name, with its module for types outside the builtins."""
    cls = type(obj)
    module = cls.__module__
    return cls.__name__ if module == "builtins" else f"{cls.__name__} ({module})"


def resolve_loss(name: str) -> Any:
    """``None`` for ``auto``, a :mod:`torch.nn.functional` loss for a known name, or the callable
    that ``PKG.MODULE:FN`` names."""
    if name == "auto":
        return None
    if name in LOSSES:
        from torch.nn import functional

        return getattr(functional, LOSSES[name])
    if ":" not in name:
        raise ValueError(
            f"--loss must be one of {', '.join(['auto', *LOSSES])} or PKG.MODULE:FN, got {name!r}"
        )
    fn = import_object(name, "--loss")
    if not callable(fn):
        raise TypeError(
            f"--loss {name} must name a callable loss(outputs, targets), got a {type(fn).__name__}"
        )
    return fn
