"""The mode policy of the curvature operators: BatchNorm, dropout, attention kernels, randomness.

BatchNorm and dropout
---------------------
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

The flags are changed only for the duration of each computation, by :func:`evaluation_mode`,
which restores each submodule's flag exactly (also on exceptions); the model's own state is never
written. Whatever the mode, :meth:`ModePolicy.applied` can check that the forward passes drew no
random numbers (a custom stochastic layer the policy does not know would make the loss, and so its
curvature, random) and raises if they did. A training-mode ``SyncBatchNorm`` under an initialised
process group is refused: it communicates inside the forward pass.

Attention
---------
PyTorch's fused scaled-dot-product-attention kernels (flash, memory-efficient, and the CPU flash
kernel) have no double backward, and the fast path of ``nn.TransformerEncoderLayer`` and
``nn.MultiheadAttention`` (``torch._transformer_encoder_layer_fwd``) has no forward-mode derivative.
:func:`evaluation_mode` therefore selects the math backend of
:func:`torch.nn.functional.scaled_dot_product_attention` and disables the fast path
(``torch.backends.mha.set_fastpath_enabled(False)``) while the operators compute, restoring both
after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "MODES",
    "ModePolicy",
    "evaluation_mode",
    "math_attention",
    "mode_overrides",
    "refuse_synced_batchnorm",
]

MODES = ("train-deterministic", "eval", "as-is")
"""The mode policies :func:`evaluation_mode` implements; see the module docstring."""

# Private bases, public since PyTorch 1.x: every dropout layer derives from _DropoutNd and every
# normalisation layer with running statistics (BatchNorm*, SyncBatchNorm, InstanceNorm*) from
# _NormBase. Matching the bases also catches user subclasses of those layers.
_DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd,)
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase,)


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
def math_attention() -> Iterator[None]:
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
        with math_attention(), torch.enable_grad():
            yield
    finally:
        for m, flag in reversed(previous):
            m.training = flag


def refuse_synced_batchnorm(model: nn.Module, overrides: list[tuple[nn.Module, bool]]) -> None:
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


@dataclass(frozen=True, eq=False)
class ModePolicy:
    """The mode policy of one operator: which flags to set, and where its random generators are.

    Build it with :meth:`of`. Attributes:
        model: the (unwrapped) model.
        mode: one of :data:`MODES`.
        overrides: the ``(module, training flag)`` pairs that ``mode`` sets.
        device: the model's device (its CUDA generator is checked too).
        operator: the operator's class name, for the messages.
    """

    model: nn.Module
    mode: str
    overrides: list[tuple[nn.Module, bool]]
    device: torch.device
    operator: str

    @classmethod
    def of(cls, model: nn.Module, mode: str, *, device: torch.device, operator: str) -> ModePolicy:
        """The policy of ``mode``; raises for an unknown mode or a synced BatchNorm."""
        overrides = mode_overrides(model, mode)
        refuse_synced_batchnorm(model, overrides)
        return cls(model, mode, overrides, device, operator)

    def _rng_states(self) -> list[Tensor]:
        states = [torch.get_rng_state()]
        if self.device.type == "cuda":
            states.append(torch.cuda.get_rng_state(self.device))
        return states

    @contextlib.contextmanager
    def applied(self, *, check_rng: bool = False) -> Iterator[None]:
        """Run the block under the policy (:func:`evaluation_mode`).

        Args:
            check_rng: raise ``ValueError`` if the block drew random numbers (the generators are
                restored first).
        """
        before = self._rng_states() if check_rng else None
        with evaluation_mode(self.model, self.overrides):
            yield
        if before is None:
            return
        after = self._rng_states()
        if all(torch.equal(a, b) for a, b in zip(after, before, strict=True)):
            return
        torch.set_rng_state(before[0])
        if len(before) > 1:
            torch.cuda.set_rng_state(before[1], self.device)
        raise ValueError(
            f"{self.operator}: the model's forward pass drew random numbers in "
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
