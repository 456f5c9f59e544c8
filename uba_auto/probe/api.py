"""``probe_curvature``: the public entry of the curvature probe (checks, then :func:`run_probe`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._distributed import resolve_process_group
from ..curvature import device_of
from .estimate import CurvatureEstimate
from .projected import DECISION_RULE, DecisionRule
from .run import run_probe
from .settings import DEFAULT_GRAPH_MEMORY, ProbeSettings, check_model

__all__ = ["probe_curvature"]


def probe_curvature(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: Any = None,
    *,
    num_batches: int = 4,
    max_hvps: int | None = None,
    tol: float | None = None,
    method: str = "lanczos",
    curvature: str = "hessian",
    engine: str = "double-backward",
    mode: str = "train-deterministic",
    dtype: torch.dtype | None = None,
    per_batch: bool = True,
    trace: bool | None = True,
    trace_matvecs: int = 30,
    density: bool | None = False,
    density_probes: int = 4,
    density_iters: int = 40,
    seed: int = 0,
    progress: bool | None = None,
    basis_device: torch.device | str | None = None,
    process_group: Any = "auto",
    optimizer: torch.optim.Optimizer | None = None,
    grad_clip: float | None = None,
    hvp_budget: int | None = None,
    graph_memory: float | None = DEFAULT_GRAPH_MEMORY,
    micro_batches: bool = True,
    compact_basis: bool = True,
    warm_start: bool | None = None,
    decision_rule: DecisionRule = DECISION_RULE,
    start: str = "random",
) -> CurvatureEstimate:
    r"""Estimate the extreme eigenvalues, trace and (optionally) spectral density of the curvature.

    The operator is the Hessian (or GGN) of :math:`\sum_b c_b \ell_b(\theta)` with
    :math:`c_b = n_b / \sum_{b'} n_{b'}` (:math:`n_b` examples in batch :math:`b`): with per-batch
    mean losses, the mean loss over the examples of the first ``num_batches`` batches of
    ``loader``, at the model's current parameters (batches without a leading dimension to count
    examples by are weighted equally, noted in ``warnings``). Lanczos with
    full re-orthogonalisation gives :math:`\lambda_{\max}` and :math:`\lambda_{\min}` from one
    Krylov space; a Ritz pair counts as converged when its residual
    :math:`\|Ay - \theta y\| \le \mathrm{tol}\cdot\max|\theta|`. With ``per_batch=True`` and more
    than one batch, the same is done on each batch alone to give the spread of the curvature across
    minibatches.

    Args:
        model: the model, on its device; never modified. A ``torch.compile``'d model is probed
            through its original module (``model._orig_mod``: the same parameters and function;
            nothing is compiled, as compiled graphs have no double backward), noted in
            ``warnings``.
        loader: a re-iterable of batches (a ``DataLoader``, a list...); it is left as it was
            found: a ``DataLoader``'s generators (its own, its sampler's) and the global RNG are
            restored, so the next training epoch sees the same order, and two probes in a row
            the same batches. A one-shot iterator (a generator, ``iter(dataloader)``: anything
            with ``iter(loader) is loader``) is refused with ``ValueError``, because the batches
            taken would be lost to the training loop that iterates it next; pass a list of
            batches or the ``DataLoader`` itself. Batch forms: ``(inputs, targets)`` with
            ``loss_fn(outputs, targets)``; dicts with a model returning ``.loss``
            (``loss_fn=None``); anything with ``loss_fn=ModelLoss(fn)``, ``fn(model, batch)``.
        loss_fn: see ``loader``.
        num_batches: how many batches to probe; a shorter loader uses what it has (recorded in
            ``warnings``).
        max_hvps: budget of single-batch HVPs for the extreme eigenvalues on all batches (each
            per-batch run gets ``max_hvps / num_batches``). Default ``100 * num_batches``.
        tol: relative residual tolerance; default ``1e-6`` in float64, ``1e-4`` otherwise.
        method: ``"lanczos"`` (default), ``"power"`` (power iteration for the dominant eigenvalue,
            then on the shifted operator for the other end), or ``"pyhessian"`` (the PyHessian
            package's power iteration, trace and density, run on a copy of the model; tuple
            batches only; no :math:`\lambda_{\min}`). ``"pyhessian"`` is the reference of the
            benchmarks.
        curvature: ``"hessian"`` or ``"ggn"`` (generalised Gauss-Newton, positive semi-definite for
            convex losses, so its condition number is always defined).
        engine: ``"double-backward"`` (cached gradient graph, the cheapest product on every
            benchmark model) or ``"forward-over-reverse"`` (no cached graph, 1.7-3.6x the time);
            see :class:`~uba_auto.curvature.HessianOperator`.
        mode: train/eval policy, ``"train-deterministic"`` (default: every module in eval mode
            but the normalisation layers, which use batch statistics with running statistics
            untouched), ``"eval"`` or ``"as-is"``; see :class:`~uba_auto.curvature.HessianOperator`.
        dtype: probe in this dtype (e.g. ``torch.float64``); default the model's.
        per_batch: also probe each batch alone, for the spread across minibatches.
        trace: estimate the trace with Hutch++ using ``trace_matvecs`` operator products
            (``None``: only if it fits ``hvp_budget``).
        trace_matvecs: operator products for the trace (each costs ``num_batches`` HVPs).
        density: estimate the spectral density by SLQ (``density_probes`` runs of
            ``density_iters`` Lanczos steps) and the negative-eigenvalue mass (``None``: only if
            it fits ``hvp_budget``).
        density_probes, density_iters: SLQ settings.
        seed: seed of every random vector the probe draws (from private generators: the global
            RNG streams are neither used nor advanced).
        progress: show a progress bar (tqdm); ``None`` shows one when stderr is a terminal.
        basis_device: where Lanczos keeps its basis (``max_hvps / num_batches`` vectors of the
            model's size), e.g. ``"cpu"`` to spare accelerator memory; default the model's device.
        process_group: ``"auto"`` (default): when ``torch.distributed`` is initialised with more
            than one rank, probe the loss on the **global batch**: each rank takes
            ``num_batches`` batches of its own loader (e.g. with a ``DistributedSampler``), global
            batch :math:`b` is the union of every rank's batch :math:`b` (what one DDP step
            sees), each rank's part weighted by its number of examples; every Hessian-vector
            product is all-reduced and the solvers use the same seed, so the estimate is identical
            on every rank. It is a collective: call it at the same point, with the same
            arguments, on every rank. ``None``/``False``: probe this process's batches alone. Or a
            ``torch.distributed.ProcessGroup``. A ``DistributedDataParallel`` model is probed
            through its inner module (DDP's hooks never fire, its state is untouched); FSDP is
            refused. Details: :mod:`uba_auto._distributed`.
        optimizer: the optimizer that will train the model, to measure the curvature *it* sees.
            Only the parameters it trains (and that require grad) are probed. For an adaptive
            optimizer (``torch.optim.Adam``, ``AdamW``, ``Adagrad``, ``RMSprop``) every spectral
            quantity of the estimate is that of the preconditioned curvature
            :math:`P^{-1/2} A P^{-1/2}` (the spectrum of :math:`P^{-1}A`), :math:`P` the diagonal
            its update divides by (for Adam :math:`\sqrt{\hat v} + \epsilon`), read from its
            state, or estimated from the probe batches' squared gradients before its first step
            (:mod:`uba_auto.curvature.precondition`); its coupled weight decay is part of
            :math:`A`. For SGD the curvature is the raw one. ``estimate.optimizer`` and
            ``estimate.preconditioner`` say which. The optimizer and its state are never changed.
            Compare ``estimate.lambda_max`` with :func:`~uba_auto.phi.stability_limit` of the
            optimizer divided by its learning rate.
        grad_clip: the gradient-norm clipping of your training loop (``clip_grad_norm_``'s
            ``max_norm``, the Hugging Face Trainer's ``max_grad_norm``), if any: the estimate of
            an adaptive optimizer's preconditioner before its first step clips each probe batch's
            gradient the same way, as the optimizer will only ever see clipped gradients. Unused
            once the optimizer has state, and without an adaptive optimizer.
        hvp_budget: the single-batch HVPs the probe should spend in all (``None``: no budget,
            every part runs as set; ``auto_uba`` sets it from ``probe_fraction``). With
            ``method="lanczos"`` the extremes first run until λ_max and the curvature noise have
            settled to the precision the φ decision needs
            (:class:`~uba_auto.probe.DecisionRule`; ``estimate.decision_steps``), even past the
            budget (said in the warnings); then on, while both ends miss ``tol``, only as long as
            the next step fits; then the trace and the density if set to ``None`` and their
            products fit what is left (said in the warnings when they do not).
        graph_memory: the cap on the batches' cached gradient graphs, in estimated training
            steps (engine ``"double-backward"``): a batch's graph is kept while the graphs held
            at once, with room for one product's working memory, stay within ``graph_memory``
            times one training step's estimated working memory, else that batch is recomputed
            in every product (a forward and a backward more per product, one graph at a time;
            :mod:`uba_auto.curvature.graph_memory`). Default 2.5: on the benchmark models (MLP,
            CNN, small transformer, ResNet-18) no graph fits, at any number of batches, and
            every product is recomputed. ``None``: keep every graph (the fastest products,
            memory growing with ``num_batches``).
        micro_batches: rebuild a recomputed batch's product in the fewest micro-batches whose
            graph fits ``graph_memory`` (twice over), one at a time, where the batch's loss is
            the example-weighted mean of its parts' (checked at the point; BatchNorm on batch
            statistics, in-batch negatives or a mean over unequal token counts fail the check
            and stay whole): the same product, a fraction of its memory
            (:mod:`uba_auto.curvature.micro_batches`). ``False``: batches whole.
        compact_basis: store the Lanczos bases of the extremes and of the per-batch runs
            (``method="lanczos"``; the density's short runs keep theirs) in half
            the working precision (float16 for float32, float32 for float64), with the two
            newest vectors also at full precision: the tridiagonal, so the Ritz values, keep the
            working precision, the re-orthogonalisation against older vectors and the per-batch
            projections see the storage's rounding (:class:`~uba_auto._krylov.LanczosBasis`).
            About half the basis' memory. ``False``: the basis in the working dtype.
        warm_start: start the Lanczos run on the mean of the batches (``method="lanczos"``, more
            than one batch) from the top Ritz vector of the first batch alone, found at the φ
            decision's precision (:func:`~uba_auto.probe.steps.warm_start`; its products are
            the first batch's, on its kept graph when ``graph_memory`` keeps it, counted in
            ``hvps["start"]``). The results are those of the mean either way; the start only
            changes how many of its steps (each one product per batch) the decision takes.
            ``None`` (default): on for a budgeted probe (``hvp_budget``, as ``auto_uba`` plans
            it), off otherwise. Turn it off when one batch may miss the top direction
            (curvature concentrated in a few examples: the decision can then stop before the
            run on the mean has found it, BENCHMARKS.md §1).
        decision_rule: when a budgeted Lanczos probe (``hvp_budget``) knows enough for the φ
            decision (:class:`~uba_auto.probe.DecisionRule`; default
            :data:`~uba_auto.probe.DECISION_RULE`). ``auto_uba`` passes the rule of its link
            (:func:`~uba_auto.probe.rule_for_link`). It stops the run on the mean of the
            batches; the warm start on the first batch keeps its own stop
            (:data:`~uba_auto.probe.steps.WARM_START_RULE`).
        start: where the Lanczos run starts (``method="lanczos"``; with ``warm_start``, the
            first batch's run). ``"random"`` (default): a Gaussian vector drawn from ``seed``.
            ``"gradient"``: the first batch's loss gradient (in the preconditioned coordinates
            under an adaptive ``optimizer``) plus a tenth of a random unit vector
            (:func:`~uba_auto.probe.steps.gradient_start`; one gradient of that batch, free where
            its graph is kept). A network's gradient lies mostly along the top of its spectrum;
            on the four benchmark models both ends reached 1e-3 in 18-42 % fewer products from
            it (median counts). But at the default ``tol`` the products moved by 0.84-1.44x over
            the φ study's runs (more on the convex and small models), and a budgeted φ decision
            saved 4 % over 40 runs but not on the benchmark models (BENCHMARKS.md §1, "The
            gradient start"). So it is opt-in: for both ends of a deep network to high
            precision.

    Returns:
        A :class:`CurvatureEstimate`.

    Raises:
        ValueError: empty or one-shot loader, non-finite or non-scalar loss (naming the batch), no
            parameter requiring grad, a budget too small for an estimate, unknown option values.
        TypeError: arguments of the wrong type.
        UnsupportedDerivativeError: an operation of the model lacks a double backward (or a
            forward-mode derivative for ``engine="forward-over-reverse"``).
        DistributedProbeError: under a process group, raised on every rank when the probe failed
            on any rank (naming the ranks and their errors), instead of leaving the others
            waiting; also when ``UBA_AUTO_DISTRIBUTED_CHECK=1`` finds results that differ across
            ranks.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1)
        >>> est = probe_curvature(model, [(x, y)], torch.nn.functional.mse_loss,
        ...                       dtype=torch.float64, trace=False)
        >>> round(est.lambda_max, 8), round(est.lambda_min, 8)  # eigenvalues of 2 XᵀX / N
        (4.0, 1.0)
    """
    check_model(model)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    settings = ProbeSettings(
        num_batches=num_batches,
        max_hvps=max_hvps,
        tol=tol,
        method=method,
        curvature=curvature,
        engine=engine,
        mode=mode,
        dtype=dtype,
        per_batch=per_batch,
        trace=trace,
        trace_matvecs=trace_matvecs,
        density=density,
        density_probes=density_probes,
        density_iters=density_iters,
        seed=seed,
        progress=progress,
        basis_device=basis_device,
        grad_clip=grad_clip,
        hvp_budget=hvp_budget,
        graph_memory=graph_memory,
        micro_batches=micro_batches,
        compact_basis=compact_basis,
        warm_start=warm_start,
        decision_rule=decision_rule,
        start=start,
    )
    comm = resolve_process_group(process_group, device=device_of(model))
    return run_probe(model, loader, loss_fn, settings, comm, optimizer=optimizer)
