"""Errors about missing derivatives, translated into what failed and how to fix it.

Only errors raised while taking derivatives are translated, and only those that say an operation
lacks a higher-order or forward-mode derivative: anything else (out of memory, shape errors) is
re-raised as it is. A ``@once_differentiable`` Function, which PyTorch would silently skip, is
found by walking the graph of a first derivative (:func:`check_twice_differentiable`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "UnsupportedDerivativeError",
    "check_twice_differentiable",
    "derivative_errors",
    "translate_derivative_error",
    "unsupported_derivative",
]


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
        re.compile(r"(aot_autograd) does not currently support double backward"),
        "a torch.compile'd part of the model (compiled through {0}) has no double backward",
        "double backward",
    ),
    (
        re.compile(r"(implement the jvp|jvp is not implemented|jvp function)"),
        "a custom torch.autograd.Function in the model has no jvp staticmethod (forward-mode "
        "derivative)",
        "forward mode",
    ),
)


def unsupported_derivative(
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
    if "torch.compile" in culprit:
        hints.append(
            "probe the uncompiled module: a model passed as torch.compile(model) is unwrapped "
            "automatically, but a compiled submodule is not; probe before compiling it, or "
            "assign its original module (compiled._orig_mod) back for the probe"
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


def translate_derivative_error(
    err: BaseException, operator: str, engine: str
) -> UnsupportedDerivativeError | None:
    """The clear error for a PyTorch error about a missing derivative, else ``None``."""
    message = str(err)
    for pattern, template, lacks in _DERIVATIVE_ERRORS:
        match = pattern.search(message)
        if match is not None:
            first_line = message.strip().splitlines()[0]
            return unsupported_derivative(
                operator, engine, template.format(match.group(1)), lacks, first_line
            )
    return None


@contextlib.contextmanager
def derivative_errors(operator: str, engine: str) -> Iterator[None]:
    """Re-raise a PyTorch error about a missing derivative as :class:`UnsupportedDerivativeError`.

    The original error is attached as ``__cause__``; every other error passes unchanged.
    """
    try:
        yield
    except UnsupportedDerivativeError:
        raise
    except RuntimeError as err:
        translated = translate_derivative_error(err, operator, engine)
        if translated is None:
            raise
        raise translated from err


def check_twice_differentiable(grad: Tensor, index: int, *, operator: str, engine: str) -> None:
    """Raise if the graph of a first derivative holds a @once_differentiable Function.

    Such a Function's backward output hangs on an ``Error`` node whose inputs are fresh
    leaves, not the parameters, so ``torch.autograd.grad(..., inputs=params)`` prunes it and
    silently drops that part of the second derivative (only ``.backward()`` would raise).

    Args:
        grad: a first derivative computed with ``create_graph=True``.
        index: the batch it belongs to, for the message.
        operator, engine: the operator's class name and engine, for the message.
    """
    if grad.grad_fn is None:
        return
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
        raise unsupported_derivative(operator, engine, culprit, "double backward", None)
