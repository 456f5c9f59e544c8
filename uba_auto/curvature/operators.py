r"""The public curvature operators and :func:`build_operator`, their one constructor.

:class:`HessianOperator` and :class:`GGNOperator` resolve their ``process_group`` argument once,
here at the public boundary, build with :func:`build_operator` and forward everything to what it
built: a :class:`~uba_auto.curvature.local.LocalOperator` in a single process, an
:class:`~uba_auto.curvature.allreduce.AllReducedOperator` under a process group.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from uba_auto._batches import BatchSet, as_batch_set
from uba_auto._distributed import Communicator, resolve_process_group
from uba_auto.curvature.allreduce import AllReducedOperator, all_reduced
from uba_auto.curvature.batch_loss import ModelLoss, check_batch_form
from uba_auto.curvature.evaluation import ENGINES, Evaluation
from uba_auto.curvature.ggn import GGN_ENGINES
from uba_auto.curvature.graph_memory import check_graph_memory
from uba_auto.curvature.hessian import HESSIAN_ENGINES
from uba_auto.curvature.local import LocalOperator
from uba_auto.curvature.modes import ModePolicy
from uba_auto.curvature.params import ParameterPoint, unwrap_model
from uba_auto.linear_operator import SymmetricOperator

__all__ = ["CURVATURES", "GGNOperator", "HessianOperator", "build_operator"]

CURVATURES = ("hessian", "ggn")
"""The curvatures an operator can describe: the Hessian or the generalized Gauss-Newton matrix."""

_NAMES = {"hessian": "HessianOperator", "ggn": "GGNOperator"}
_ENGINES = {"hessian": HESSIAN_ENGINES, "ggn": GGN_ENGINES}


def build_operator(
    curvature: str,
    model: nn.Module,
    batches: Iterable[Any] | BatchSet,
    loss: Any,
    *,
    mode: str,
    engine: str,
    dtype: torch.dtype | None,
    params: Iterable[Any] | None = None,
    cache_graph: bool = True,
    graph_memory: float | None = None,
    micro_batches: bool = True,
    comm: Communicator | None,
) -> LocalOperator | AllReducedOperator:
    """The curvature operator of ``model``'s mean loss, for an already resolved process group.

    Arguments are those of :class:`HessianOperator`, with ``curvature`` (``"hessian"`` or
    ``"ggn"``) choosing the matrix and ``comm`` the resolved process group
    (:func:`~uba_auto._distributed.resolve_process_group`): ``None`` for this process's batches
    alone, else the curvature of the global batches, built collectively (every rank must call it).

    Returns:
        An operator with the attributes of :class:`HessianOperator`, and ``batch_operator(i)``.

    Raises:
        As :class:`HessianOperator`; ``ValueError`` for an unknown ``curvature``.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if curvature == "ggn" and isinstance(loss, ModelLoss):
        raise ValueError(
            "GGNOperator needs separable outputs and a loss_fn(outputs, targets): the "
            "Gauss-Newton matrix is Jᵀ H_ℓ J with J the Jacobian of the model's outputs, so "
            f"the loss must be a function of the outputs, got {loss!r}. Use (inputs, targets) "
            "batches with loss=loss_fn(outputs, targets), or the Hessian (HessianOperator)"
        )

    name = _NAMES[curvature]

    def build() -> LocalOperator:
        # This rank's part: no collective, every argument checked once, the engine chosen once.
        inner = unwrap_model(model)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if not isinstance(cache_graph, bool):
            raise TypeError(f"cache_graph must be a bool, got {type(cache_graph).__name__}")
        cap = check_graph_memory(graph_memory)
        if not isinstance(micro_batches, bool):
            raise TypeError(
                f"micro_batches must be a bool (True: recompute a batch's product in micro-"
                f"batches under graph_memory where its loss allows), got "
                f"{type(micro_batches).__name__}"
            )
        point = ParameterPoint(inner, params, dtype)
        policy = ModePolicy.of(inner, mode, device=point.device, operator=name)
        batch_set = as_batch_set(batches, device=point.device, dtype=point.cast)
        for i, batch in enumerate(batch_set.batches):
            check_batch_form(batch, loss, i)
        evaluation = Evaluation(
            name, engine, inner, batch_set, loss, point, policy, cap, micro_batches
        )
        curvature_of_batches = _ENGINES[curvature][engine, cache_graph](evaluation)
        return LocalOperator(evaluation, curvature_of_batches, cache_graph=cache_graph)

    if comm is None:
        return build()
    return all_reduced(build, comm, name)


class _PublicOperator(SymmetricOperator):
    """Resolves ``process_group`` once, builds, and forwards every attribute to what it built.

    The constructor of :class:`HessianOperator` and :class:`GGNOperator` (their signature).
    """

    _curvature = ""

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
        graph_memory: float | None = None,
        micro_batches: bool = True,
        process_group: Any = "auto",
    ) -> None:
        super().__init__()
        self._op = build_operator(
            self._curvature,
            model,
            batches,
            loss,
            mode=mode,
            engine=engine,
            dtype=dtype,
            params=params,
            cache_graph=cache_graph,
            graph_memory=graph_memory,
            micro_batches=micro_batches,
            comm=resolve_process_group(process_group),
        )

    def _matvec(self, v: Tensor) -> Tensor:
        return self._op.matvec(v)

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this wrapper does not hold itself (everything but num_matvecs).
        if name == "_op":
            raise AttributeError(name)
        return getattr(self._op, name)


class HessianOperator(_PublicOperator):
    r"""The Hessian of the mean loss over the examples, as a symmetric operator on the flat
    parameter vector.

    .. math::

        H = \nabla^2_\theta \sum_{b=1}^{B} c_b \ell_b(\theta), \qquad
        Hv = \sum_{b=1}^{B} c_b \nabla_\theta \big(\nabla_\theta \ell_b(\theta)^\top v\big), \qquad
        c_b = \frac{n_b}{\sum_{b'} n_{b'}}.

    The vector is the concatenation of the flattened parameters that require grad (or those named
    by ``params``), in ``model.named_parameters()`` order: see :attr:`param_names`,
    :attr:`param_shapes` and :meth:`unflatten`. Each batch's loss is weighted by its number of
    examples :math:`n_b` (the leading dimension of its first tensor, :attr:`batch_sizes`): with
    per-batch mean losses (``reduction="mean"``) the operator is that of all the examples as one
    batch, whatever the batch sizes. Where a batch has no leading dimension, every batch weighs
    :math:`1/B` (the same for equal sizes; the probe notes it in its warnings).

    Mode policy (``mode``): by default, ``"train-deterministic"``, the loss is the one training
    sees, without randomness: every module is in eval mode, which switches off whatever is random
    behind ``self.training`` (dropout, Hugging Face attention dropout, timm's ``DropPath``, layer
    drop), except the normalisation layers (BatchNorm, InstanceNorm with running statistics, other
    modules with ``running_mean``/``running_var`` buffers), which normalise with batch statistics,
    as in training, while their running statistics and ``num_batches_tracked`` stay untouched (one
    frozen in eval mode inside a training-mode model stays frozen). ``"eval"`` puts every module in
    eval mode (BatchNorm uses running statistics); ``"as-is"`` keeps every module's flag. Flags are
    set only while the operator computes and restored exactly after; a forward pass that draws
    random numbers anyway raises ``ValueError`` naming the modules that drew them and the fix (see
    :mod:`uba_auto.curvature.modes`). Attention runs on the math kernel of scaled-dot-product
    attention, the only one with every derivative, the fused fast path of
    ``nn.TransformerEncoderLayer`` is disabled and recurrent layers run without cuDNN and oneDNN
    while the operator computes.

    Engines:
        ``"double-backward"`` (default): per batch, the gradient is computed once with
        ``create_graph=True`` and its graph kept, so a product is one backward pass through
        that graph, :math:`Hv = \nabla_\theta (g^\top v)`, with no forward pass. The cached graphs
        hold the tensors saved by a forward and a backward pass, for every batch;
        ``cache_graph=False`` recomputes the forward and the gradient for every product instead
        (memory for one batch at a time, a forward and a backward more per product).
        ``"forward-over-reverse"``: ``torch.func.jvp(torch.func.grad(loss), (θ,), (v,))``, no cached
        graph (each product is one forward and a forward-mode-over-reverse pass per batch).
        One product measured on the CPU (``benchmarks/probe_models.py``, one batch, one thread,
        CPU time in training steps of forward + backward + SGD step, cached / no cache /
        forward-over-reverse): MLP 1.1 / 2.0 / 4.0, CNN 1.5 / 2.7 / 2.8, GPT 2.2 / 3.2 / 3.8,
        ResNet-18 2.6 / 3.8 / 4.3, LSTM 3.4 / 5.2 / 6.0: the default is the cheapest on every
        one, so no engine is chosen by timing.
        Recurrent layers (``nn.RNN``/``LSTM``/``GRU``) run on PyTorch's own kernels while the
        operator computes, without cuDNN and oneDNN, whose fused kernels lack derivatives or
        differentiate slowly (see :mod:`uba_auto.curvature.modes`); training keeps them, so an
        LSTM's product costs more training steps than other models' (its unfused training step
        alone costs 1.5 fused ones).

    Args:
        model: the model; never modified.
        batches: an iterable of batches (all of it is used) or a
            :class:`~uba_auto._batches.BatchSet`. Batches are moved to the model's device. A
            ``DataLoader`` is left as it was (its generators and the global RNG are restored, so
            the next pass over it sees the same order). A one-shot iterator (a generator,
            ``iter(dataloader)``) is accepted, unlike in :func:`~uba_auto.probe_curvature`: the
            operator takes every batch it yields, so none is lost, but it is consumed to its end
            and nothing is left for a training loop (and an endless one never ends): pass a list
            to keep using the batches.
        loss: ``loss(outputs, targets)`` for ``(inputs, targets)`` batches, ``None`` for dict
            batches of Hugging Face-style models, or ``ModelLoss(fn)`` with ``fn(model, batch)``.
        mode: ``"train-deterministic"``, ``"eval"`` or ``"as-is"`` (see above).
        engine: ``"double-backward"`` or ``"forward-over-reverse"``.
        dtype: probe in this floating dtype (e.g. ``torch.float64``) by casting copies of the
            parameters, buffers and floating batch tensors; ``None`` keeps the model's dtype.
        params: parameter names or parameters to probe; ``None`` for all with ``requires_grad``.
        cache_graph: keep each batch's gradient graph (``engine="double-backward"`` only).
        graph_memory: with ``cache_graph=True``, a cap on the graphs held at once, in estimated
            training steps: batches are taken in order and a graph is kept while the kept graphs,
            plus room for one product's working memory (the largest graph), stay within
            ``graph_memory`` times the bytes the first batch's forward saves for backward plus
            twice the parameters' bytes; the other batches are recomputed in every product (see
            :mod:`uba_auto.curvature.graph_memory`, and :attr:`cached_batches`). ``None``
            (default): every graph is kept. :func:`~uba_auto.probe_curvature` caps at 2.5.
        micro_batches: under a ``graph_memory`` cap, rebuild the product of a batch whose
            graph is not kept in the fewest micro-batches whose graph fits the cap (twice over),
            one at a time, where the batch's loss is the example-weighted mean of its parts'
            (checked at the point: the losses of every split batch and the first one's
            gradient; BatchNorm on batch statistics, in-batch negatives or a mean over unequal
            token counts fail it and stay whole; so does a graph under 4 MiB, where splitting
            costs more time than it saves memory). The same product, a fraction of its memory
            (:mod:`uba_auto.curvature.micro_batches`; :attr:`micro_batches`,
            :attr:`micro_batch_note`). ``False``: every batch whole.
        process_group: ``"auto"`` (default): when ``torch.distributed`` is initialised with more
            than one rank, the operator is the curvature of the loss on the global batch: global
            batch :math:`b` is the union of every rank's batch :math:`b`, each rank's part
            weighted by its number of examples, and every product (and :meth:`gradient`) is
            all-reduced, so it is a collective that every rank must call in the same order (see
            :mod:`uba_auto.curvature.allreduce`). ``None``/``False``: this process's batches
            alone. Or a ``torch.distributed.ProcessGroup``. It is resolved once, here. A
            ``DistributedDataParallel`` (or ``DataParallel``) model is probed through its inner
            module, a ``torch.compile``'d one through its original module (``_orig_mod``: the
            same function, and nothing is compiled); FSDP is refused.

    Attributes:
        size, dtype, device: of the flat vectors (``dtype`` is the probe's dtype).
        param_names, param_shapes: the probed parameters.
        num_batches, batch_sizes: the batches used (``batch_sizes``: this rank's).
        global_batch_sizes: the sizes of the global batches, summed over ranks (``None`` where
            unknown); ``batch_sizes`` in a single process.
        batch_losses: the loss of each (global) batch at the probe's point, a 1-D tensor.
        batch_set: the batches, as a :class:`~uba_auto._batches.BatchSet`.
        cached_batches: the batches whose gradient graphs are kept (this rank's); the others
            are recomputed in every product.
        micro_batches: per batch, the number of micro-batches its recomputed product runs in
            (1: whole).
        micro_batch_note: why recomputed batches that would have been split were not, or
            ``None``.
        num_matvecs: products computed so far.

    Methods: :meth:`matvec`, ``gradient()`` and ``loss_value()`` (of :math:`\sum_b c_b \ell_b`, no
    graph), ``flatten``/``unflatten`` (flat vector <-> ``name -> tensor``), and
    ``batch_operator(i)``: the operator of batch ``i`` alone (under a process group, global batch
    ``i``), which reuses this operator's batches, point and cached graphs and counts its own
    products.

    Raises:
        ValueError: for an empty loader, a missing or misplaced ``loss``, a non-scalar or
            non-finite batch loss (the message names the batch), no parameter to probe, or a
            random forward pass (the message names the modules that drew).
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

    _curvature = "hessian"


class GGNOperator(_PublicOperator):
    r"""The generalized Gauss-Newton matrix of the mean batch loss, as a symmetric operator.

    For batch :math:`b` with model outputs :math:`z_b = f(\theta, x_b)`, output Jacobian
    :math:`J_b = \partial z_b / \partial \theta` and loss :math:`\ell(z_b, y_b)`,

    .. math::

        G = \sum_{b=1}^{B} c_b \, J_b^\top \, \nabla^2_{z} \ell(z_b, y_b) \, J_b ,

    with the weights :math:`c_b` of :class:`HessianOperator` (by number of examples).

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

    _curvature = "ggn"
