"""``run_probe``: the curvature probe as a composition of its steps, for a resolved communicator.

Collect the batches (and, under a process group, agree on them), build the operator, then run the
steps of :mod:`uba_auto.probe.steps` on it in a fixed order (extremes, per-batch curvature, trace,
density: they share one random generator, so the order is part of the result) and assemble a
:class:`~uba_auto.probe.CurvatureEstimate`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._batches import BatchSet, collect_batches
from .._distributed import Communicator, check_enabled
from .._krylov import compact_dtype
from .._loaders import check_reiterable
from .._state import preserve_state
from ..curvature import (
    PreconditionedOperator,
    build_operator,
    is_adaptive,
    optimizer_param_names,
    optimizer_preconditioner,
    unwrap_model,
    unwrap_notes,
)
from ..linear_operator import SymmetricOperator
from ..slq import SpectralDensity, slq_density
from ..trace import TraceEstimate, hutchpp_trace
from .bookkeeping import Ledger, Tracked, progress_bar
from .estimate import CurvatureEstimate, condition_number, negative_mass
from .pyhessian import pyhessian_estimate
from .settings import ProbeSettings, check_model
from .steps import (
    Extremes,
    PerBatchCurvature,
    extremes,
    gradient_start,
    per_batch_curvature,
    projected_extremes,
    spread,
    warm_start,
)

__all__ = ["run_probe"]

logger = logging.getLogger("uba_auto")


def run_probe(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: Any,
    settings: ProbeSettings,
    comm: Communicator | None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> CurvatureEstimate:
    """:func:`~uba_auto.probe.probe_curvature` with checked settings and a resolved process group.

    Args:
        model, loader, loss_fn, optimizer: as for :func:`~uba_auto.probe.probe_curvature`.
        settings: the probe's settings.
        comm: the communicator of the process group (from
            :func:`uba_auto._distributed.resolve_process_group`), or ``None`` in a single process.

    Raises:
        As :func:`~uba_auto.probe.probe_curvature`.
    """
    check_model(model)
    if comm is not None and settings.method == "pyhessian":
        raise ValueError(
            "method='pyhessian' runs PyHessian's single-process code and cannot probe the global "
            "batch of a process group; use method='lanczos' (or 'power'), or process_group=None "
            "to probe each rank's batches alone"
        )
    if optimizer is not None and settings.method == "pyhessian":
        raise ValueError(
            "method='pyhessian' measures the raw Hessian of every parameter and cannot take "
            "optimizer=; use method='lanczos' for the curvature the optimizer sees, or drop "
            "optimizer="
        )
    notes = list(unwrap_notes(model))
    model = unwrap_model(model)
    ledger = Ledger()
    with preserve_state(model), contextlib.ExitStack() as stack:
        batch_set = _collect(model, loader, settings, comm, stack, notes, _optimizer_tag(optimizer))
        num_found = batch_set.num_found
        max_iters = settings.lanczos_steps(num_found)
        if settings.method == "pyhessian":
            ledger.end_setup()
            return pyhessian_estimate(model, batch_set, loss_fn, settings, ledger, notes)

        op = build_operator(
            settings.curvature,
            model,
            batch_set,
            loss_fn,
            mode=settings.mode,
            engine=settings.engine,
            dtype=settings.dtype,
            params=None if optimizer is None else optimizer_param_names(model, optimizer),
            graph_memory=settings.graph_memory,
            micro_batches=settings.micro_batches,
            comm=comm,
        )
        preconditioner = None
        if optimizer is not None and is_adaptive(optimizer):
            error = None
            try:
                preconditioner = optimizer_preconditioner(
                    optimizer, model, op, grad_clip=settings.grad_clip
                )
            except Exception as err:
                if comm is None:
                    raise
                error = err
            if comm is not None:  # the same P on every rank, or the summed products mean nothing
                total = math.nan if error else float(preconditioner.diagonal.double().sum())
                comm.agree(
                    error,
                    "reading the optimizer's preconditioner",
                    equal={"sum of P": total},
                    hint="every rank must hold the same optimizer state (as DDP keeps it)",
                )
            op = PreconditionedOperator(op, preconditioner)
            if preconditioner.source == "estimate":
                notes.append(
                    f"the {preconditioner.optimizer} optimizer has no state yet: its "
                    "preconditioner was estimated from the probe batches (see "
                    "estimate.preconditioner)"
                )
        ledger.end_setup()
        tol = settings.tol_for(op.dtype)
        basis_dtype = compact_dtype(op.dtype) if settings.compact_basis else None
        gen = torch.Generator(device=op.device).manual_seed(settings.seed)
        solve = functools.partial(
            extremes,
            method=settings.method,
            max_iters=max_iters,
            tol=tol,
            generator=gen,
            basis_device=settings.basis_device,
            basis_dtype=basis_dtype,
        )
        total = settings.planned_hvps(num_found)
        rank = comm.rank if comm else 0
        budgeted = settings.hvp_budget is not None
        with progress_bar(settings.progress, total, f"probing {settings.curvature}", rank) as bar:
            top_curvature, decision = None, None
            if settings.method == "lanczos":
                batch_ops = [Tracked(op.batch_operator(i), bar, 1) for i in range(num_found)]
                starts = []  # the start vector, handed to the extremes without a name here
                if settings.start == "gradient":  # costs a gradient where batch 0 is recomputed
                    with ledger.part("start vector"):
                        starts.append(gradient_start(_start_gradient(op.batch_operator(0)), gen))
                if settings.warm_starts(num_found):
                    start = functools.partial(
                        warm_start,
                        tol=tol,
                        generator=gen,
                        basis_device=settings.basis_device,
                        basis_dtype=basis_dtype,
                    )
                    # Batch 0 of op: kept exactly when a one-batch operator would keep it
                    # (graph_memory's room for a product), else recomputed. The gradient start,
                    # if any, is taken from the list in the call, so that nothing keeps it after.
                    starts.append(
                        ledger.spend(
                            "start",
                            Tracked(op.batch_operator(0), bar, 1),
                            lambda o: start(o, v0=starts.pop() if starts else None),
                        )
                    )
                budget_steps, steps = None, max_iters
                if budgeted:  # the decision first, whatever the budget, then what it allows
                    budget_steps = max(0, settings.hvp_budget - ledger.num_hvps) // num_found
                    steps = min(max_iters, max(budget_steps, settings.decision_rule.max_steps))
                with ledger.part("extremes"):
                    found = projected_extremes(
                        batch_ops,
                        op.coefficients,
                        max_iters=steps,
                        tol=tol,
                        generator=gen,
                        basis_device=settings.basis_device,
                        budget_steps=budget_steps,
                        rule=settings.decision_rule,
                        basis_dtype=basis_dtype,
                        v0=starts.pop() if starts else None,
                    )
                ledger.hvps["extremes"] = sum(b.hvps for b in batch_ops)
                ext, top_curvature, decision = found.extremes, found.top_curvature, found.decision
            else:
                ext = ledger.spend("extremes", Tracked(op, bar, num_found), solve)
            notes += _convergence_notes(ext, settings, num_found, tol)
            if budgeted and decision is not None and not decision.reached:
                notes.append(
                    f"lambda_max and the curvature noise had not settled to the phi decision's "
                    f"precision after {decision.steps} Lanczos steps (top residual "
                    f"{decision.residual:.2g} relative; see uba_auto.probe.DecisionRule): phi "
                    "rests on an unsettled estimate"
                )

            per_batch = None
            if num_found > 1 and (top_curvature is None or settings.per_batch):
                with ledger.part("per_batch"):
                    per_batch = per_batch_curvature(
                        lambda i: Tracked(op.batch_operator(i), bar, 1),
                        num_found,
                        ext.top_vector,
                        solve if settings.per_batch else None,
                    )
                ledger.hvps["per_batch"] = per_batch.num_matvecs
                notes += [
                    f"the per-batch estimate of batch {i} did not converge"
                    for i in per_batch.unconverged
                ]
            elif num_found > 1:  # from the Lanczos projections, no product
                per_batch = PerBatchCurvature(top_curvature, (), (), (), 0)

            trace_est = None
            skipped = []
            if settings.fits("trace", settings.trace_matvecs * num_found, ledger.num_hvps):
                trace = functools.partial(
                    hutchpp_trace, num_matvecs=settings.trace_matvecs, generator=gen
                )
                trace_est = ledger.spend("trace", Tracked(op, bar, num_found), trace)
            elif settings.trace is None:
                skipped.append("trace")

            dens = None
            cost = settings.density_probes * settings.density_iters * num_found
            if settings.fits("density", cost, ledger.num_hvps):
                density = functools.partial(
                    slq_density,
                    num_probes=settings.density_probes,
                    num_iters=settings.density_iters,
                    generator=gen,
                    basis_device=settings.basis_device,
                )
                dens = ledger.spend("density", Tracked(op, bar, num_found), density)
            elif settings.density is None:
                skipped.append("density")
            if skipped:
                notes.append(
                    f"the probe's HVP budget ({settings.hvp_budget}) left no room for the "
                    f"{' and the '.join(skipped)}: not computed (pass "
                    f"{'=True, '.join(skipped)}=True to compute them anyway)"
                )
        batch_losses = tuple(float(v) for v in op.batch_losses)
        batch_sizes = tuple(op.global_batch_sizes)
        num_params, device, dtype = op.size, op.device, op.dtype

    if any(size is None for size in batch_sizes):
        whose = "some batch has" if comm is None else "some rank's batch has"
        parts = "" if comm is None else " and every rank's part of a global batch (1 / world_size)"
        notes.append(
            f"{whose} no leading dimension to count examples by: the batches were weighted "
            f"equally (1 / num_batches){parts}, which is the per-example mean only if the "
            "batches are the same size"
        )
    estimate = CurvatureEstimate(
        **_spectrum_fields(ext, per_batch, trace_est, dens, notes),
        batch_losses=batch_losses,
        num_hvps=ledger.num_hvps,
        hvps=ledger.hvps,
        wall_time_s=ledger.elapsed(),
        time_s=ledger.times,
        num_params=num_params,
        num_batches=num_found,
        batch_sizes=batch_sizes,
        method=settings.method,
        curvature=settings.curvature,
        engine=settings.engine,
        mode=settings.mode,
        tol=tol,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        warnings=tuple(notes),
        world_size=1 if comm is None else comm.world_size,
        optimizer=None if optimizer is None else type(optimizer).__name__,
        preconditioner=None if preconditioner is None else preconditioner.description,
        decision_steps=decision.steps if decision is not None and decision.reached else None,
        hvp_budget=settings.hvp_budget,
    )
    if comm is not None and check_enabled():
        _check_identical_across_ranks(comm, estimate)
    logger.info(
        "probe: lambda_max=%.6g lambda_min=%.6g, %d HVPs in %.3g s",
        estimate.lambda_max,
        estimate.lambda_min if estimate.lambda_min is not None else float("nan"),
        estimate.num_hvps,
        estimate.wall_time_s,
    )
    return estimate


def _start_gradient(op: SymmetricOperator) -> Tensor:
    """The loss gradient of ``op``'s batches in the coordinates ``op`` acts on (the
    preconditioned ones under an adaptive optimizer): the direction Lanczos starts from."""
    if isinstance(op, PreconditionedOperator):
        return op.scaled_gradient()
    return op.gradient()


def _collect(
    model: nn.Module,
    loader: Iterable[Any],
    settings: ProbeSettings,
    comm: Communicator | None,
    stack: contextlib.ExitStack,
    notes: list[str],
    optimizer_tag: int = 0,
) -> BatchSet:
    """The probe's batches on the model's device; under a process group, agreed by every rank
    (with the optimizer's ``optimizer_tag``, :func:`_optimizer_tag`).

    A one-shot iterator is refused (the batches taken would be lost to training); any other
    loader is left as it was found, its generators and the global RNG included
    (:func:`~uba_auto._batches.collect_batches`), so two probes in a row see the same batches.
    """
    error: Exception | None = None
    batch_set = BatchSet(batches=[])
    try:
        check_reiterable(loader, "probe_curvature")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "model has no parameter with requires_grad=True; there is no curvature to "
                "probe. Unfreeze the parameters you train"
            )
        device = params[0].device
        # An enclosing autocast would run the products in reduced precision while the solvers'
        # vectors keep the parameters' dtype: probe in the parameters' (or the asked) dtype.
        stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        batch_set = collect_batches(
            loader, settings.num_batches, device=device, dtype=settings.dtype
        )
    except Exception as err:
        if comm is None:
            raise
        error = err
    if comm is not None:
        batch_set = _agree_on_batches(comm, error, batch_set, settings, notes, optimizer_tag)
    if batch_set.shortfall_message:
        notes.append(batch_set.shortfall_message)
    return batch_set


def _agree_on_batches(
    comm: Communicator,
    error: Exception | None,
    batch_set: BatchSet,
    settings: ProbeSettings,
    notes: list[str],
    optimizer_tag: int = 0,
) -> BatchSet:
    """The collective start of a distributed probe: every rank learns of any rank's failure,
    checks that all use the same settings, and keeps as many batches as the shortest rank has."""
    table = comm.agree(
        error,
        "collecting the probe's batches",
        equal={
            "seed": settings.seed,
            "the probe's settings (fingerprint)": zlib.crc32(settings.fingerprint().encode()),
            "the optimizer (class, states)": optimizer_tag,
        },
        gather={"batches": batch_set.num_found},
        hint="pass the same probe arguments (seed, num_batches, max_hvps, method...) and the same "
        "optimizer (same class, same state) on every rank",
    )
    counts = [int(c) for c in table["batches"]]
    common = min(counts)
    if common != max(counts):
        notes.append(
            f"the ranks' loaders yielded different numbers of batches ({counts}, by rank): "
            f"every rank probed its first {common}"
        )
    if common == batch_set.num_found:
        return batch_set
    return BatchSet(
        batches=batch_set.batches[:common],
        batch_sizes=batch_set.batch_sizes[:common],
        num_requested=batch_set.num_requested,
    )


def _optimizer_tag(optimizer: torch.optim.Optimizer | None) -> int:
    """What every rank's optimizer must share for a collective probe: its class and how many
    parameters have state (0 without an optimizer)."""
    if optimizer is None:
        return 0
    return zlib.crc32(f"{type(optimizer).__name__}/{len(optimizer.state)}".encode())


def _convergence_notes(
    ext: Extremes, settings: ProbeSettings, num_found: int, tol: float
) -> list[str]:
    if settings.hvp_budget is not None:
        within = f"within the probe's HVP budget ({settings.hvp_budget})"
        fix = "raise the budget (auto_uba: probe_fraction)"
    else:
        within, fix = f"within max_hvps={settings.budget(num_found)}", "raise max_hvps"
    return [
        f"{key} did not converge {within} (residual {ext.residuals[key]:.3g}, tol {tol:g} "
        f"relative): {fix}"
        for key, ok in ext.converged.items()
        if not ok and key != "lambda_min_positive"
    ]


def _spectrum_fields(
    ext: Extremes,
    per_batch: PerBatchCurvature | None,
    trace_est: TraceEstimate | None,
    dens: SpectralDensity | None,
    notes: list[str],
) -> dict[str, Any]:
    """The estimate's spectral fields from the steps' results (and the spread warning)."""
    converged = dict(ext.converged)
    if trace_est is not None:
        converged["trace"] = bool(trace_est.std_error <= 0.1 * abs(trace_est.estimate))
    max_pb = per_batch.lambda_max if per_batch else ()
    min_pb = per_batch.lambda_min if per_batch else ()
    max_spread = spread(max_pb)
    if max_spread is not None:
        rel = max_spread / max(abs(float(np.mean(max_pb))), 1e-300)
        if rel > 0.25:
            notes.append(
                f"lambda_max varies by {100 * rel:.0f}% (std/mean) across batches: probe more "
                "batches (num_batches) for a steadier estimate"
            )
    return dict(
        lambda_max=ext.lambda_max,
        lambda_min=ext.lambda_min,
        lambda_min_positive=ext.lambda_min_positive,
        condition_number=condition_number(ext.lambda_max, ext.lambda_min_positive),
        residuals=ext.residuals,
        converged=converged,
        trace=None if trace_est is None else trace_est.estimate,
        trace_std_error=None if trace_est is None else trace_est.std_error,
        lambda_max_per_batch=max_pb,
        lambda_min_per_batch=min_pb,
        lambda_max_spread=max_spread,
        lambda_min_spread=spread(min_pb),
        top_curvature_per_batch=per_batch.top_curvature if per_batch else (),
        curvature_noise=per_batch.curvature_noise(ext.lambda_max) if per_batch else None,
        density=dens,
        negative_mass=None if dens is None else negative_mass(dens, ext.lambda_max),
    )


def _check_identical_across_ranks(comm: Communicator, estimate: CurvatureEstimate) -> None:
    """``UBA_AUTO_DISTRIBUTED_CHECK=1``: raise if any rank's results differ."""
    comm.check_identical(
        {
            "lambda_max": estimate.lambda_max,
            "lambda_min": estimate.lambda_min,
            "lambda_min_positive": estimate.lambda_min_positive,
            "trace": estimate.trace,
            "curvature_noise": estimate.curvature_noise,
            "num_hvps": estimate.num_hvps,
        },
        "probe_curvature",
    )
