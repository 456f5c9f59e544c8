"""The mode policy of the curvature operators: train/eval flags, attention kernels, randomness.

The default: the loss training sees, without its randomness
-----------------------------------------------------------
``mode="train-deterministic"`` puts every module in eval mode except the normalisation layers that
normalise with batch statistics in training, which stay in training mode. Eval mode switches off
everything random that a layer gates on ``self.training``, whatever its type: ``nn.Dropout*``,
``nn.RReLU``'s random slopes, the attention dropout of ``nn.MultiheadAttention`` and of Hugging Face
attention (``dropout=p if self.training else 0.0``), stochastic depth (timm's ``DropPath``,
torchvision's ``StochasticDepth``, Hugging Face's ``drop_path``), layer drop, SpecAugment masking,
the inter-layer dropout of ``nn.RNN``/``LSTM``/``GRU``, the jitter of MoE routers. The normalisation
layers keep training's batch statistics; their running statistics and ``num_batches_tracked`` are
never updated: the model is evaluated through :func:`torch.func.functional_call` on fresh copies of
its buffers, so the updates that train-mode BatchNorm performs land in the copies.

Kept in training mode, because their eval mode computes another function:

* subclasses of torch's ``_NormBase``: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, the
  ``LazyBatchNorm`` and ``InstanceNorm`` layers, and user subclasses (timm's ``BatchNormAct2d``);
* any other module holding a ``running_mean`` or ``running_var`` buffer of its own (timm's
  ``EvoNorm2dB*``, hand-written BatchNorms): those names are the convention for statistics that
  training estimates and eval mode uses instead of the batch's. A module that holds them but never
  branches on ``self.training`` (``FrozenBatchNorm2d``) computes the same in both modes;
* a normalisation layer frozen on purpose is respected: one in eval mode inside a model in training
  mode (fine-tuning with frozen BatchNorm, mmdetection's ``norm_eval``) stays in eval mode, because
  training sees its running statistics. In a model in eval mode every one of them is switched to
  training mode;
* ``nn.RNN``/``LSTM``/``GRU`` without dropout: the same function in both modes, and the only mode in
  which cuDNN differentiates them (the probe itself runs them without cuDNN, see Recurrent layers).

Other differences between the modes, and why eval mode is right for them: Hugging Face gradient
checkpointing runs only in training mode and recomputes the same function (and its reentrant
variant cannot be differentiated twice); ``nn.TransformerEncoderLayer``'s fused fast path and the
nested-tensor conversion of ``nn.TransformerEncoder`` are off (see Attention). Spectral
normalisation skips its power-iteration step in eval mode: the weight is normalised by the current
estimate of its norm, which is what training sees up to one refinement of that estimate. Modules
whose training forward returns something else (torchvision's Inception auxiliary logits, detection
models that return losses in training, MoE layers with an eval-only token capacity) are measured
as eval mode computes them: set the flags yourself and use ``mode="as-is"``.

``mode="eval"`` puts every module in eval mode (BatchNorm uses its running statistics: the loss of
inference). ``mode="as-is"`` leaves every module's ``training`` flag as the user set it. The flags
are changed only for the duration of each computation, by :func:`evaluation_mode`, which restores
each submodule's flag exactly (also on exceptions); the model's own state is never written. A
training-mode ``SyncBatchNorm`` under an initialised process group is refused: it communicates
inside the forward pass.

Random layers the policy cannot switch off
------------------------------------------
Whatever the mode, :meth:`ModePolicy.applied` can check that the forward passes drew no random
numbers from the global generators (CPU, and the model's CUDA device): a layer that draws even in
eval mode (noise injection that ignores ``self.training``, a VAE's sampling) would make the loss,
and so its curvature, random. If they did, the generators are restored and the forward passes are
replayed once with hooks that compare the generators' states around each module's forward
(installed for that replay only and removed after it), so the ``ValueError`` names the modules that
drew (qualified name, class and flag) and the fix: make the layer draw only when ``self.training``;
or fix its draws with a ``ModelLoss`` whose function seeds inside ``torch.random.fork_rng()`` (every
evaluation then sees the same draws, and the global generators are left alone); or, for a layer
the policy keeps in training mode, put it in eval mode yourself and probe with ``mode="as-is"``.

Attention
---------
PyTorch's fused scaled-dot-product-attention kernels (flash, memory-efficient, and the CPU flash
kernel) have no double backward, and the fast path of ``nn.TransformerEncoderLayer`` and
``nn.MultiheadAttention`` (``torch._transformer_encoder_layer_fwd``) has no forward-mode derivative.
:func:`evaluation_mode` therefore selects the math backend of
:func:`torch.nn.functional.scaled_dot_product_attention` and disables the fast path
(``torch.backends.mha.set_fastpath_enabled(False)``) while the operators compute, restoring both
after.

Recurrent layers
----------------
Two fused recurrent kernels lack derivatives the operators need: cuDNN's (every
``nn.RNN``/``LSTM``/``GRU`` on a GPU) has no double backward ("Double backwards is not supported
for CuDNN RNNs"), oneDNN's (``nn.LSTM`` in float32 on the CPU) no forward-mode derivative, and is
differentiated twice through a backward pass that autograd unrolls into a dozen small operations
per time step, around the fused backward it still runs: a product on a byte-level LSTM
(``benchmarks/lstm_hvp_cost.py``) cost 4.9 training steps with the cached graph.
:func:`evaluation_mode` therefore runs the forward pass of every ``nn.RNNBase`` module on
PyTorch's own kernels, the same function up to rounding, with cuDNN and oneDNN switched off for
that module's forward pass only (:func:`unfused_recurrent_kernels`: hooks installed for the block
and removed after it), so that the other layers keep their kernels. That product then costs 3.4
training steps, and ``engine="forward-over-reverse"`` works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "MODES",
    "ModePolicy",
    "evaluation_mode",
    "math_attention",
    "mode_overrides",
    "recurrent_modules",
    "refuse_synced_batchnorm",
    "unfused_recurrent_kernels",
]

MODES = ("train-deterministic", "eval", "as-is")
"""The mode policies :func:`evaluation_mode` implements; see the module docstring."""

# A private base, public since PyTorch 1.x: every normalisation layer with running statistics
# (BatchNorm*, SyncBatchNorm, LazyBatchNorm*, InstanceNorm*) derives from _NormBase, and so do
# user subclasses of those layers.
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase,)
_STATISTICS_BUFFERS = frozenset({"running_mean", "running_var"})
_SHOWN = 5  # modules named in the random-draw message


def _uses_batch_statistics(module: nn.Module) -> bool:
    """A normalisation layer: batch statistics in training, running statistics in eval."""
    if isinstance(module, _NORM_TYPES):
        return True
    return any(name in _STATISTICS_BUFFERS for name, _ in module.named_buffers(recurse=False))


def mode_overrides(model: nn.Module, mode: str) -> list[tuple[nn.Module, bool]]:
    """The ``(module, training flag)`` pairs that ``mode`` sets; modules not listed keep theirs.

    Args:
        model: the user's model.
        mode: one of :data:`MODES`.

    Raises:
        ValueError: if ``mode`` is unknown.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).eval()
        >>> [flag for _, flag in mode_overrides(model, "train-deterministic")]
        [False, False, True]
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "as-is":
        return []
    if mode == "eval":
        return [(m, False) for m in model.modules()]
    overrides = []
    for m in model.modules():
        if _uses_batch_statistics(m):
            # In eval mode inside a model in training mode, it was frozen on purpose.
            overrides.append((m, m.training or not model.training))
        else:
            overrides.append((m, isinstance(m, nn.RNNBase) and m.dropout == 0))
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


def recurrent_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    """The ``nn.RNNBase`` modules of ``model`` (``nn.RNN``, ``LSTM``, ``GRU`` and subclasses)."""
    return tuple(m for m in model.modules() if isinstance(m, nn.RNNBase))


@contextlib.contextmanager
def unfused_recurrent_kernels(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run the forward pass of each of ``modules`` with cuDNN and oneDNN off (PyTorch's kernels).

    A forward pre-hook switches ``torch.backends.cudnn.enabled`` and
    ``torch.backends.mkldnn.enabled`` off and a forward hook (also called when the forward
    raises) restores them, so the other layers of the model keep their kernels; the hooks are
    removed on exit. See the module docstring, Recurrent layers.

    Example:
        >>> import torch
        >>> lstm = torch.nn.LSTM(2, 3)
        >>> seen = []
        >>> _ = lstm.register_forward_hook(lambda *a: seen.append(torch.backends.mkldnn.enabled))
        >>> with unfused_recurrent_kernels([lstm]):
        ...     _ = lstm(torch.zeros(4, 1, 2))
        >>> seen, torch.backends.mkldnn.enabled, len(lstm._forward_pre_hooks)
        ([False], True, 0)
    """
    if not modules:
        yield
        return
    saved: list[tuple[bool, bool]] = []

    def switch_off(module: nn.Module, args: Any) -> None:
        saved.append((torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled))
        torch.backends.cudnn.enabled = False
        torch.backends.mkldnn.enabled = False

    def restore(module: nn.Module, args: Any, output: Any) -> None:
        if saved:  # empty when a pre-hook before ours raised
            torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled = saved.pop()

    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(switch_off))
            handles.append(m.register_forward_hook(restore, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def evaluation_mode(
    model: nn.Module,
    mode: str | list[tuple[nn.Module, bool]] = "train-deterministic",
    recurrent: Sequence[nn.Module] | None = None,
) -> Iterator[None]:
    """Evaluate ``model`` under the probe's mode policy for the duration of the block.

    Sets the ``training`` flag of the modules the policy names (see the module docstring), selects
    the math attention backend, disables the MHA fast path, runs the recurrent layers on
    PyTorch's own kernels (:func:`unfused_recurrent_kernels`) and enables grad mode; on exit, also
    after an exception, every flag is restored to exactly its previous value.

    Args:
        model: the user's model.
        mode: one of :data:`MODES`, or a precomputed :func:`mode_overrides` list (cheaper when the
            same model is evaluated many times).
        recurrent: the model's :func:`recurrent_modules`, if precomputed.

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
    if recurrent is None:
        recurrent = recurrent_modules(model)
    previous = [(m, m.training) for m, _ in overrides]
    try:
        for m, flag in overrides:
            # Set the attribute directly: Module.train() would recurse into children.
            m.training = flag
        with math_attention(), unfused_recurrent_kernels(recurrent), torch.enable_grad():
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


def _same(states: list[Tensor], others: list[Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(states, others, strict=True))


class _DrawLog:
    """Forward hooks that attribute each change of the generators to the module whose own code
    made it: the draws between a module's entry, its children's calls and its exit are its own.
    Frame 0 stands for the code outside every module (the loss function)."""

    def __init__(self, model: nn.Module, states: Callable[[], list[Tensor]]) -> None:
        self.names = {id(m): name for name, m in model.named_modules()}
        self.states = states
        self.frames: list[list[Any]] = [[None, states()]]
        self.drawn: dict[str, tuple[str, bool]] = {}  # name -> (class, training flag)
        self.outside = False

    def _settle(self) -> list[Tensor]:
        now = self.states()
        module, last = self.frames[-1]
        if _same(now, last):
            return now
        if module is None:
            self.outside = True
        else:
            self.drawn.setdefault(self.names[id(module)], (type(module).__name__, module.training))
        return now

    def pre(self, module: nn.Module, args: Any) -> None:
        self.frames.append([module, self._settle()])

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        now = self._settle()
        if len(self.frames) > 1:
            self.frames.pop()
        self.frames[-1][1] = now

    @classmethod
    def of(
        cls, model: nn.Module, replay: Callable[[], object], states: Callable[[], list[Tensor]]
    ) -> _DrawLog:
        """Run ``replay()`` with the hooks on every module; they are removed after it."""
        log, handles = cls(model, states), []
        try:
            for m in model.modules():
                handles += [m.register_forward_pre_hook(log.pre)]
                handles += [m.register_forward_hook(log.post, always_call=True)]
            replay()
        finally:
            for handle in handles:
                handle.remove()
        log.frames = log.frames[:1]
        log._settle()
        return log


def _label(name: str) -> str:
    return repr(name) if name else "the model itself"


def _random_message(operator: str, mode: str, log: _DrawLog | None) -> str:
    head = (
        f"{operator}: the model's forward pass drew random numbers in mode={mode!r}, so its "
        "loss (and curvature) is random"
    )
    seeded = (
        "fix the draws for the probe with loss=ModelLoss(fn), fn(model, batch) computing the "
        "loss under torch.random.fork_rng() after torch.manual_seed(0): every evaluation then "
        "sees the same draws and the global generators are left alone"
    )
    if log is None or not (log.drawn or log.outside):
        return (
            f"{head}; a replay of the forward passes could not tell which module drew them (a "
            "backward pass may draw, or the replay failed). Fixes: switch off the random layers "
            f"(a layer should draw only when self.training), or {seeded}"
        )
    drawn = list(log.drawn.items())
    shown = [
        f"{_label(n)} ({cls}, {'training' if t else 'eval'} mode)" for n, (cls, t) in drawn[:_SHOWN]
    ]
    if len(drawn) > _SHOWN:
        shown.append(f"{len(drawn) - _SHOWN} more")
    if log.outside:
        shown.append("code outside the model's modules (the loss function)")
    fixes = []
    eval_mode = [n for n, (_, t) in drawn if not t]
    training = [n for n, (_, t) in drawn if t]
    if eval_mode:
        fixes.append(
            f"{_label(eval_mode[0])} draws in eval mode, so no mode switches it off: make it draw "
            "only when self.training (the default mode then switches it off)"
        )
    if training and mode == "as-is":
        fixes.append(
            f"put {training[0]!r} in eval mode before probing "
            f"(model.get_submodule({training[0]!r}).eval()), or use the default "
            "mode='train-deterministic', which puts every module but the normalisation layers "
            "in eval mode"
        )
    elif training:
        fixes.append(
            f"the mode keeps {training[0]!r} in training mode (a normalisation layer, or a "
            "module with running_mean/running_var buffers): set every flag yourself (e.g. "
            "model.eval(), then .train() on the normalisation layers that should use batch "
            f"statistics, leaving {training[0]!r} in eval mode) and probe with mode='as-is'"
        )
    if log.outside:
        fixes.append("make the loss function deterministic")
    fixes.append(seeded)
    return f"{head}. Drawn by {', '.join(shown)}. Fixes: " + "; or ".join(fixes)


@dataclass(frozen=True, eq=False)
class ModePolicy:
    """The mode policy of one operator: which flags to set, and where its random generators are.

    Build it with :meth:`of`. Attributes:
        model: the (unwrapped) model.
        mode: one of :data:`MODES`.
        overrides: the ``(module, training flag)`` pairs that ``mode`` sets.
        device: the model's device (its CUDA generator is checked too).
        operator: the operator's class name, for the messages.
        recurrent: the model's :func:`recurrent_modules`.
    """

    model: nn.Module
    mode: str
    overrides: list[tuple[nn.Module, bool]]
    device: torch.device
    operator: str
    recurrent: tuple[nn.Module, ...] = ()

    @classmethod
    def of(cls, model: nn.Module, mode: str, *, device: torch.device, operator: str) -> ModePolicy:
        """The policy of ``mode``; raises for an unknown mode or a synced BatchNorm."""
        overrides = mode_overrides(model, mode)
        refuse_synced_batchnorm(model, overrides)
        return cls(model, mode, overrides, device, operator, recurrent_modules(model))

    def _rng_states(self) -> list[Tensor]:
        states = [torch.get_rng_state()]
        if self.device.type == "cuda":
            states.append(torch.cuda.get_rng_state(self.device))
        return states

    def _set_rng_states(self, states: list[Tensor]) -> None:
        torch.set_rng_state(states[0])
        if len(states) > 1:
            torch.cuda.set_rng_state(states[1], self.device)

    def _diagnose(self, replay: Callable[[], object], before: list[Tensor]) -> _DrawLog | None:
        """Replay under the policy with hooks; ``None`` if the replay fails."""
        try:
            with evaluation_mode(self.model, self.overrides, self.recurrent):
                return _DrawLog.of(self.model, replay, self._rng_states)
        except Exception:  # the diagnosis only improves the message; never mask the error
            return None
        finally:
            self._set_rng_states(before)

    @contextlib.contextmanager
    def applied(
        self, *, check_rng: bool = False, replay: Callable[[], object] | None = None
    ) -> Iterator[None]:
        """Run the block under the policy (:func:`evaluation_mode`).

        Args:
            check_rng: raise ``ValueError`` if the block drew random numbers (the generators are
                restored first); the generators are also restored when the block raises.
            replay: re-runs the block's forward passes (e.g. every batch's loss without a graph);
                called once, with hooks, when the block drew random numbers, so that the message
                names the modules that drew them.
        """
        before = self._rng_states() if check_rng else None
        try:
            with evaluation_mode(self.model, self.overrides, self.recurrent):
                yield
        except BaseException:
            if before is not None:  # a failed block leaves the generators as it found them too
                self._set_rng_states(before)
            raise
        if before is None or _same(self._rng_states(), before):
            return
        self._set_rng_states(before)
        log = None if replay is None else self._diagnose(replay, before)
        raise ValueError(_random_message(self.operator, self.mode, log))
