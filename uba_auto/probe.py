r"""``probe_curvature``: the curvature the optimiser will see, from a few minibatches.

The probe builds a curvature operator (:class:`~uba_auto.hessian.HessianOperator` or
:class:`~uba_auto.hessian.GGNOperator`) over ``num_batches`` minibatches of the user's loader and
runs solvers on it (:func:`~uba_auto.lanczos.lanczos` for both ends of the spectrum from one Krylov
space, :func:`~uba_auto.trace.hutchpp_trace`, :func:`~uba_auto.slq.slq_density`). It runs on the
model's device, in the model's dtype unless told otherwise, and leaves every piece of user state as
it found it: parameters, buffers, ``.grad``, ``training`` and ``requires_grad`` flags, RNG streams.

Cost is counted in **single-batch Hessian-vector products** (HVPs): one product with the operator
over ``B`` batches costs ``B`` of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._batches import MODES, BatchSet, collect_batches
from ._distributed import (
    Communicator,
    check_enabled,
    resolve_process_group,
    unwrap_model,
)
from ._pyhessian_backend import run_pyhessian
from ._serialize import json_safe
from ._state import preserve_state
from ._validation import check_int, check_positive_finite
from .hessian import ENGINES, GGNOperator, HessianOperator
from .lanczos import _ritz_residuals, _tridiagonal_eigh, lanczos
from .linear_operator import SymmetricOperator
from .power_iteration import power_iteration
from .slq import SpectralDensity, slq_density
from .trace import hutchpp_trace

__all__ = ["METHODS", "CurvatureEstimate", "probe_curvature"]

logger = logging.getLogger("uba_auto")

METHODS = ("lanczos", "power", "pyhessian")
CURVATURES = ("hessian", "ggn")


@dataclass(frozen=True)
class CurvatureEstimate:
    r"""What :func:`probe_curvature` measured, with what it cost and how far to trust it.

    All eigenvalues are those of the curvature (Hessian or GGN) of the **mean** of the per-batch
    losses over the probed batches, at the model's current parameters.

    Attributes:
        lambda_max: the largest eigenvalue.
        lambda_min: the smallest eigenvalue (negative for an indefinite Hessian); ``None`` for
            ``method="pyhessian"``, which only computes the top of the spectrum.
        lambda_min_positive: the smallest positive Ritz value of the final Krylov space, an
            estimate of the smallest positive eigenvalue *the solver could resolve*; ``None`` if
            there is none. It is an interior eigenvalue and usually not converged: see
            ``converged["lambda_min_positive"]``.
        condition_number: ``lambda_max / lambda_min_positive`` (``inf`` when no positive
            eigenvalue below ``lambda_max`` was found). Near zero, the spectrum of a network is
            dense, so this ratio is large and depends on the solver's resolution: it is reported,
            not recommended as the input of the φ mapping.
        residuals: :math:`\|A y - \theta y\|` of each Ritz pair reported (keys ``"lambda_max"``,
            ``"lambda_min"``, ``"lambda_min_positive"``; for ``method="power"`` the power
            iteration's residuals).
        converged: whether each quantity met its tolerance (same keys, plus ``"trace"`` when
            computed: ``True`` when the standard error is below 10 % of ``|trace|``).
        trace: Hutch++ estimate of the trace (``None`` if not asked for).
        trace_std_error: its standard error.
        lambda_max_per_batch, lambda_min_per_batch: the same eigenvalues for each batch alone
            (empty with one batch or ``per_batch=False``).
        lambda_max_spread, lambda_min_spread: sample standard deviation of the per-batch values
            (``None`` without them).
        top_curvature_per_batch: :math:`v^\top H_b v` for each batch :math:`b`, with :math:`v`
            the top eigenvector of the mean operator: the curvature each minibatch shows along
            the sharpest direction (their mean is ``lambda_max``). One HVP per batch.
        curvature_noise: their sample standard deviation divided by ``lambda_max``: how much the
            sharpness a single SGD step sees fluctuates from batch to batch (``None`` with one
            batch, or for ``method="pyhessian"``). 0 means full-batch-like curvature.
        batch_losses: loss of each probed batch at the current parameters.
        density: the spectral density by stochastic Lanczos quadrature, or ``None``.
        negative_mass: the fraction of the spectrum below :math:`-10^{-3}\lambda_{\max}`
            estimated from ``density`` (:data:`NEGATIVE_MASS_THRESHOLD`): the near-zero cluster
            of a network's spectrum straddles 0 and would otherwise count as half negative.
        num_hvps: single-batch Hessian-vector products spent in total.
        hvps: the same, by part (``"extremes"``, ``"per_batch"``, ``"trace"``, ``"density"``).
        wall_time_s: seconds in total; ``time_s`` by part (``"setup"`` included).
        num_params, num_batches, batch_sizes: what was probed.
        method, curvature, engine, mode, tol: the settings used.
        device, dtype: where and in which precision it ran.
        warnings: anything the caller should know (short loader, no convergence...).
        world_size: the number of ranks whose batches make up each (global) batch; 1 in a single
            process. Under a process group, ``batch_sizes`` and ``batch_losses`` are those of the
            global batches and every value above is identical on every rank.
    """

    lambda_max: float
    lambda_min: float | None
    lambda_min_positive: float | None
    condition_number: float
    residuals: dict[str, float]
    converged: dict[str, bool]
    trace: float | None
    trace_std_error: float | None
    lambda_max_per_batch: tuple[float, ...]
    lambda_min_per_batch: tuple[float, ...]
    lambda_max_spread: float | None
    lambda_min_spread: float | None
    top_curvature_per_batch: tuple[float, ...]
    curvature_noise: float | None
    batch_losses: tuple[float, ...]
    density: SpectralDensity | None
    negative_mass: float | None
    num_hvps: int
    hvps: dict[str, int]
    wall_time_s: float
    time_s: dict[str, float]
    num_params: int
    num_batches: int
    batch_sizes: tuple[int | None, ...]
    method: str
    curvature: str
    engine: str
    mode: str
    tol: float
    device: str
    dtype: str
    warnings: tuple[str, ...] = field(default=())
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the density as its nodes and weights; inf and NaN as None)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.density is not None:
            out["density"] = {
                "nodes": self.density.nodes.tolist(),
                "weights": self.density.weights.tolist(),
                "size": self.density.size,
                "num_matvecs": self.density.num_matvecs,
                "num_nodes": self.density.num_nodes.tolist(),
            }
        for key in (
            "lambda_max_per_batch",
            "lambda_min_per_batch",
            "top_curvature_per_batch",
            "batch_losses",
        ):
            out[key] = list(out[key])
        out["batch_sizes"] = list(self.batch_sizes)
        out["warnings"] = list(self.warnings)
        return json_safe(out)

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CurvatureEstimate:
        """Rebuild an estimate from :meth:`to_dict` (or its JSON): ``from_dict(e.to_dict())``
        has the same :meth:`to_dict` as ``e``. ``None`` stands for an infinite condition number.

        Raises:
            ValueError: if ``data`` lacks a field (it names the first missing one).
        """
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(
                f"data is not a CurvatureEstimate.to_dict(): it has no {missing[0]!r} field"
            )
        kw = {n: data[n] for n in names if n in data}
        for key in (
            "lambda_max_per_batch",
            "lambda_min_per_batch",
            "top_curvature_per_batch",
            "batch_losses",
            "batch_sizes",
            "warnings",
        ):
            if key in kw:
                kw[key] = tuple(kw[key])
        if kw["condition_number"] is None:
            kw["condition_number"] = math.inf
        if kw["density"] is not None:
            d = kw["density"]
            nodes = torch.tensor(d["nodes"], dtype=torch.float64)
            num_nodes = d.get("num_nodes") or [nodes.shape[1]] * nodes.shape[0]
            kw["density"] = SpectralDensity(
                nodes=nodes,
                weights=torch.tensor(d["weights"], dtype=torch.float64),
                num_matvecs=d["num_matvecs"],
                size=d["size"],
                num_nodes=torch.tensor(num_nodes, dtype=torch.int64),
            )
        return cls(**kw)

    def __str__(self) -> str:
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.6g}"

        lines = [
            f"CurvatureEstimate ({self.curvature}, {self.method}, {self.num_batches} batch(es), "
            + (f"each over {self.world_size} ranks, " if self.world_size > 1 else "")
            + f"{self.num_params} params, {self.device}/{self.dtype})",
            f"  lambda_max          {fmt(self.lambda_max)}"
            + (
                f"  ± {self.lambda_max_spread:.3g} across batches" if self.lambda_max_spread else ""
            ),
            f"  lambda_min          {fmt(self.lambda_min)}"
            + (
                f"  ± {self.lambda_min_spread:.3g} across batches" if self.lambda_min_spread else ""
            ),
            f"  smallest positive   {fmt(self.lambda_min_positive)}",
            f"  curvature noise     {fmt(self.curvature_noise)}",
            f"  lambda_max / that   {fmt(self.condition_number)}",
            f"  trace               {fmt(self.trace)}"
            + (
                f"  ± {self.trace_std_error:.3g}"
                if self.trace_std_error is not None and math.isfinite(self.trace_std_error)
                else ""
            ),
        ]
        if self.negative_mass is not None:
            lines.append(f"  negative mass       {self.negative_mass:.3g}")
        lines.append(f"  cost                {self.num_hvps} HVPs, {self.wall_time_s:.3g} s")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


class _Progress(SymmetricOperator):
    """Forwards products to ``inner`` and advances a progress bar by the HVPs each one costs."""

    def __init__(self, inner: SymmetricOperator, bar: Any, hvps_per_product: int) -> None:
        super().__init__()
        self.inner, self.bar, self.step = inner, bar, hvps_per_product
        self.size, self.dtype, self.device = inner.size, inner.dtype, inner.device

    def _matvec(self, v: Tensor) -> Tensor:
        out = self.inner.matvec(v)
        if self.bar is not None:
            self.bar.update(self.step)
        return out


class _Shifted(SymmetricOperator):
    """``A - shift * I``: power iteration on it finds the end of the spectrum far from ``shift``."""

    def __init__(self, inner: SymmetricOperator, shift: float) -> None:
        super().__init__()
        self.inner, self.shift = inner, shift
        self.size, self.dtype, self.device = inner.size, inner.dtype, inner.device

    def _matvec(self, v: Tensor) -> Tensor:
        return self.inner.matvec(v) - self.shift * v


def _default_tol(dtype: torch.dtype) -> float:
    # Residuals cannot fall much below the rounding of one product: ~1e-7 relative in float32.
    return 1e-6 if dtype == torch.float64 else 1e-4


def _smallest_positive(result: Any) -> tuple[float | None, float | None]:
    """The smallest positive Ritz value of a Lanczos run and its residual."""
    theta, s = _tridiagonal_eigh(result.alpha.numpy(), result.beta.numpy())
    scale = np.abs(theta).max() if theta.size else 0.0
    # Ritz values within rounding of zero are not "positive curvature".
    positive = np.flatnonzero(theta > 1e3 * np.finfo(np.float64).eps * scale)
    if positive.size == 0:
        return None, None
    i = int(positive[0])
    return float(theta[i]), float(_ritz_residuals(float(result.beta[-1]), s[:, [i]])[0])


def _spread(values: list[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _make_bar(progress: bool | None, total: int, desc: str, rank: int = 0) -> Any:
    # By default one bar per job: on rank 0 (all ranks of a torchrun job share the terminal).
    show = progress if progress is not None else (sys.stderr.isatty() and rank == 0)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="hvp", leave=False)


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
    trace: bool = True,
    trace_matvecs: int = 30,
    density: bool = False,
    density_probes: int = 4,
    density_iters: int = 40,
    seed: int = 0,
    progress: bool | None = None,
    basis_device: torch.device | str | None = None,
    process_group: Any = "auto",
) -> CurvatureEstimate:
    r"""Estimate the extreme eigenvalues, trace and (optionally) spectral density of the curvature.

    The operator is the Hessian (or GGN) of :math:`\frac1B\sum_b \ell_b(\theta)`, the mean loss over
    the first ``num_batches`` batches of ``loader``, at the model's current parameters. Lanczos with
    full re-orthogonalisation gives :math:`\lambda_{\max}` and :math:`\lambda_{\min}` from one
    Krylov space; a Ritz pair counts as converged when its residual
    :math:`\|Ay - \theta y\| \le \mathrm{tol}\cdot\max|\theta|`. With ``per_batch=True`` and more
    than one batch, the same is done on each batch alone to give the spread of the curvature across
    minibatches.

    Args:
        model: the model, on its device; never modified.
        loader: an iterable of batches (a ``DataLoader``, a list...). Batch forms: ``(inputs,
            targets)`` with ``loss_fn(outputs, targets)``; dicts with a model returning ``.loss``
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
        engine: ``"double-backward"`` (cached gradient graph) or ``"forward-over-reverse"``.
        mode: BatchNorm/dropout policy, ``"train-deterministic"`` (default: batch statistics,
            dropout off, running statistics untouched), ``"eval"`` or ``"as-is"``.
        dtype: probe in this dtype (e.g. ``torch.float64``); default the model's.
        per_batch: also probe each batch alone, for the spread across minibatches.
        trace: estimate the trace with Hutch++ using ``trace_matvecs`` operator products.
        trace_matvecs: operator products for the trace (each costs ``num_batches`` HVPs).
        density: estimate the spectral density by SLQ (``density_probes`` runs of
            ``density_iters`` Lanczos steps) and the negative-eigenvalue mass.
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

    Returns:
        A :class:`CurvatureEstimate`.

    Raises:
        ValueError: empty loader, non-finite or non-scalar loss (naming the batch), no parameter
            requiring grad, a budget too small for an estimate, unknown option values.
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    num_batches = check_int("num_batches", num_batches, minimum=1)
    for name, value, allowed in (
        ("method", method, METHODS),
        ("curvature", curvature, CURVATURES),
        ("engine", engine, ENGINES),
        ("mode", mode, MODES),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    trace_matvecs = check_int("trace_matvecs", trace_matvecs, minimum=3)
    density_probes = check_int("density_probes", density_probes, minimum=1)
    density_iters = check_int("density_iters", density_iters, minimum=2)
    seed = check_int("seed", seed, minimum=0)
    if max_hvps is not None:
        check_int("max_hvps", max_hvps, minimum=1)
    if tol is not None:
        tol = check_positive_finite("tol", tol)
    if method == "pyhessian" and curvature != "hessian":
        raise ValueError("method='pyhessian' computes the Hessian only; use curvature='hessian'")
    comm = resolve_process_group(process_group)
    if comm is not None and method == "pyhessian":
        raise ValueError(
            "method='pyhessian' runs PyHessian's single-process code and cannot probe the global "
            "batch of a process group; use method='lanczos' (or 'power'), or process_group=None "
            "to probe each rank's batches alone"
        )
    model = unwrap_model(model)

    start = time.perf_counter()
    times: dict[str, float] = {}
    hvps: dict[str, int] = {}
    notes: list[str] = []

    with preserve_state(model), contextlib.ExitStack() as stack:
        error: Exception | None = None
        batch_set = BatchSet(batches=[])
        try:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError(
                    "model has no parameter with requires_grad=True; there is no curvature to "
                    "probe. Unfreeze the parameters you train"
                )
            device = params[0].device
            # An enclosing autocast would run the products in reduced precision while the
            # solvers' vectors keep the parameters' dtype: probe in the parameters' (or the
            # asked) dtype.
            stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
            batch_set = collect_batches(loader, num_batches, device=device, dtype=dtype)
        except Exception as err:
            if comm is None:
                raise
            error = err
        if comm is not None:
            settings = (num_batches, max_hvps, tol, method, curvature, engine, mode, str(dtype))
            settings += (per_batch, trace, trace_matvecs, density, density_probes, density_iters)
            batch_set = _agree_on_batches(comm, error, batch_set, seed, repr(settings), notes)
        if batch_set.shortfall_message:
            notes.append(batch_set.shortfall_message)
        num_found = batch_set.num_found
        budget = 100 * num_found if max_hvps is None else max_hvps
        max_iters = budget // num_found
        if max_iters < 2:
            raise ValueError(
                f"max_hvps={budget} is too small for {num_found} batch(es): one Lanczos step "
                f"costs {num_found} HVPs and an estimate needs at least 2 steps; use "
                f"max_hvps >= {2 * num_found} (a few hundred is typical)"
            )

        operator_cls = HessianOperator if curvature == "hessian" else GGNOperator
        op_kwargs = dict(mode=mode, engine=engine, dtype=dtype, process_group=comm or False)

        if method == "pyhessian":
            times["setup"] = time.perf_counter() - start
            return _probe_with_pyhessian(
                model,
                batch_set,
                loss_fn,
                budget,
                tol,
                mode,
                dtype,
                trace,
                trace_matvecs,
                density,
                density_iters,
                density_probes,
                seed,
                notes,
                start,
                times,
            )

        op = operator_cls(model, batch_set, loss_fn, **op_kwargs)
        times["setup"] = time.perf_counter() - start
        tol = _default_tol(op.dtype) if tol is None else tol
        gen = torch.Generator(device=op.device).manual_seed(seed)

        per_batch_runs = per_batch and num_found > 1
        total = budget * (2 if per_batch_runs else 1) + (num_found if num_found > 1 else 0)
        total += (trace_matvecs if trace else 0) * num_found
        total += (density_probes * density_iters if density else 0) * num_found
        bar = _make_bar(progress, total, f"probing {curvature}", comm.rank if comm else 0)
        try:
            t = time.perf_counter()
            tracked = _Progress(op, bar, num_found)
            extremes = _extremes(tracked, method, max_iters, tol, gen, basis_device)
            hvps["extremes"] = tracked.num_matvecs * num_found
            times["extremes"] = time.perf_counter() - t
            for key, ok in extremes["converged"].items():
                if not ok and key != "lambda_min_positive":
                    notes.append(
                        f"{key} did not converge within max_hvps={budget} (residual "
                        f"{extremes['residuals'][key]:.3g}, tol {tol:g} relative): raise max_hvps"
                    )

            max_pb: list[float] = []
            min_pb: list[float] = []
            top_pb: list[float] = []
            if num_found > 1:
                t = time.perf_counter()
                hvps["per_batch"] = 0
                top = extremes["top_vector"]
                for i, batch in enumerate(batch_set.batches):
                    sub = _Progress(operator_cls(model, [batch], loss_fn, **op_kwargs), bar, 1)
                    # The curvature batch i shows along the sharpest direction: one product.
                    top_pb.append(float(top @ sub.matvec(top)))
                    if per_batch_runs:
                        res = _extremes(sub, method, max_iters, tol, gen, basis_device)
                        max_pb.append(res["lambda_max"])
                        min_pb.append(res["lambda_min"])
                        if not all(
                            ok for k, ok in res["converged"].items() if k != "lambda_min_positive"
                        ):
                            notes.append(f"the per-batch estimate of batch {i} did not converge")
                    hvps["per_batch"] += sub.num_matvecs
                    del sub  # one batch's graph at a time
                times["per_batch"] = time.perf_counter() - t

            trace_est = None
            if trace:
                t = time.perf_counter()
                tracked = _Progress(op, bar, num_found)
                trace_est = hutchpp_trace(tracked, num_matvecs=trace_matvecs, generator=gen)
                hvps["trace"] = tracked.num_matvecs * num_found
                times["trace"] = time.perf_counter() - t

            dens = None
            if density:
                t = time.perf_counter()
                tracked = _Progress(op, bar, num_found)
                dens = slq_density(
                    tracked,
                    num_probes=density_probes,
                    num_iters=density_iters,
                    generator=gen,
                    basis_device=basis_device,
                )
                hvps["density"] = tracked.num_matvecs * num_found
                times["density"] = time.perf_counter() - t
        finally:
            if bar is not None:
                bar.close()
        batch_losses = tuple(float(v) for v in op.batch_losses)
        batch_sizes = tuple(op.global_batch_sizes)

    if comm is not None and any(size is None for size in batch_sizes):
        notes.append(
            "some rank's batch has no leading dimension to count examples by: every rank's part "
            "of a global batch was weighted equally (1 / world_size), which is the global-batch "
            "mean only if the ranks' batches are the same size"
        )
    converged = dict(extremes["converged"])
    if trace_est is not None:
        converged["trace"] = bool(trace_est.std_error <= 0.1 * abs(trace_est.estimate))
    if len(max_pb) > 1:
        rel = _spread(max_pb) / max(abs(float(np.mean(max_pb))), 1e-300)
        if rel > 0.25:
            notes.append(
                f"lambda_max varies by {100 * rel:.0f}% (std/mean) across batches: probe more "
                "batches (num_batches) for a steadier estimate"
            )
    wall = time.perf_counter() - start
    estimate = CurvatureEstimate(
        lambda_max=extremes["lambda_max"],
        lambda_min=extremes["lambda_min"],
        lambda_min_positive=extremes["lambda_min_positive"],
        condition_number=_condition(extremes["lambda_max"], extremes["lambda_min_positive"]),
        residuals=extremes["residuals"],
        converged=converged,
        trace=None if trace_est is None else trace_est.estimate,
        trace_std_error=None if trace_est is None else trace_est.std_error,
        lambda_max_per_batch=tuple(max_pb),
        lambda_min_per_batch=tuple(min_pb),
        lambda_max_spread=_spread(max_pb),
        lambda_min_spread=_spread(min_pb),
        top_curvature_per_batch=tuple(top_pb),
        curvature_noise=(
            _spread(top_pb) / extremes["lambda_max"]
            if len(top_pb) > 1 and extremes["lambda_max"] > 0
            else None
        ),
        batch_losses=batch_losses,
        density=dens,
        negative_mass=None if dens is None else _negative_mass(dens, extremes["lambda_max"]),
        num_hvps=sum(hvps.values()),
        hvps=hvps,
        wall_time_s=wall,
        time_s=times,
        num_params=op.size,
        num_batches=num_found,
        batch_sizes=batch_sizes,
        method=method,
        curvature=curvature,
        engine=engine,
        mode=mode,
        tol=tol,
        device=str(op.device),
        dtype=str(op.dtype).replace("torch.", ""),
        warnings=tuple(notes),
        world_size=1 if comm is None else comm.world_size,
    )
    if comm is not None and check_enabled():
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
    logger.info(
        "probe: lambda_max=%.6g lambda_min=%.6g, %d HVPs in %.3g s",
        estimate.lambda_max,
        estimate.lambda_min if estimate.lambda_min is not None else float("nan"),
        estimate.num_hvps,
        wall,
    )
    return estimate


def _agree_on_batches(
    comm: Communicator,
    error: Exception | None,
    batch_set: BatchSet,
    seed: int,
    settings: str,
    notes: list[str],
) -> BatchSet:
    """The collective start of a distributed probe: every rank learns of any rank's failure,
    checks that all use the same settings, and keeps as many batches as the shortest rank has."""
    table = comm.agree(
        error,
        "collecting the probe's batches",
        equal={"seed": seed, "the probe's settings (fingerprint)": zlib.crc32(settings.encode())},
        gather={"batches": batch_set.num_found},
        hint="pass the same probe arguments (seed, num_batches, max_hvps, method...) on every rank",
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


NEGATIVE_MASS_THRESHOLD = 1e-3
"""Eigenvalues below ``-NEGATIVE_MASS_THRESHOLD * |lambda_max|`` count as negative curvature."""


def _negative_mass(density: SpectralDensity, lambda_max: float) -> float:
    return density.negative_mass(threshold=NEGATIVE_MASS_THRESHOLD * abs(lambda_max))


def _condition(lambda_max: float, lambda_min_positive: float | None) -> float:
    if lambda_min_positive is None or lambda_max <= 0:
        return math.inf
    return lambda_max / lambda_min_positive


def _extremes(
    op: SymmetricOperator,
    method: str,
    max_iters: int,
    tol: float,
    gen: torch.Generator,
    basis_device: torch.device | str | None,
) -> dict[str, Any]:
    """Both ends of the spectrum of ``op`` by Lanczos, or by power iteration (plain + shifted)."""
    if method == "lanczos":
        res = lanczos(
            op, max_iters=max_iters, tol=tol, generator=gen, which="both", basis_device=basis_device
        )
        pos, pos_res = _smallest_positive(res)
        scale = float(res.ritz_values.abs().max())
        residuals = {
            "lambda_max": float(res.residuals[-1]),
            "lambda_min": float(res.residuals[0]),
        }
        converged = {
            "lambda_max": bool(res.converged[-1]),
            "lambda_min": bool(res.converged[0]),
        }
        if pos is not None:
            residuals["lambda_min_positive"] = pos_res
            converged["lambda_min_positive"] = bool(pos_res <= tol * scale)
        return {
            "lambda_max": res.lambda_max,
            "lambda_min": res.lambda_min,
            "lambda_min_positive": pos,
            "residuals": residuals,
            "converged": converged,
            "top_vector": res.eigenvectors[:, -1],
        }
    # Power iteration: half the budget for the dominant eigenvalue, half for the far end.
    half = max(1, max_iters // 2)
    dominant = power_iteration(op, max_iters=half, tol=tol, generator=gen)
    far = power_iteration(_Shifted(op, dominant.eigenvalue), max_iters=half, tol=tol, generator=gen)
    other = far.eigenvalue + dominant.eigenvalue
    hi, lo = (dominant, far) if dominant.eigenvalue >= other else (far, dominant)
    top = max(dominant.eigenvalue, other)
    bottom = min(dominant.eigenvalue, other)
    return {
        "lambda_max": top,
        "lambda_min": bottom,
        "lambda_min_positive": bottom if bottom > 0 else None,
        "residuals": {"lambda_max": hi.residual, "lambda_min": lo.residual},
        "converged": {"lambda_max": hi.converged, "lambda_min": lo.converged},
        "top_vector": hi.eigenvector,
    }


def _probe_with_pyhessian(
    model: nn.Module,
    batch_set: Any,
    loss_fn: Any,
    budget: int,
    tol: float | None,
    mode: str,
    dtype: torch.dtype | None,
    trace: bool,
    trace_matvecs: int,
    density: bool,
    density_iters: int,
    density_probes: int,
    seed: int,
    notes: list[str],
    start: float,
    times: dict[str, float],
) -> CurvatureEstimate:
    """``method="pyhessian"``: PyHessian's own algorithms on the same batches (see the backend)."""
    if loss_fn is None or not all(
        isinstance(b, (tuple, list)) and len(b) == 2 for b in batch_set.batches
    ):
        raise ValueError(
            "method='pyhessian' needs (inputs, targets) batches and loss_fn(outputs, targets); "
            "use method='lanczos' for dict batches or ModelLoss"
        )
    num = batch_set.num_found
    # PyHessian's tolerance is on the relative change of the estimate between iterations.
    ph_tol = 1e-3 if tol is None else tol
    max_iters = max(1, budget // num)
    res = run_pyhessian(
        model,
        batch_set.batches,
        loss_fn,
        mode=mode,
        dtype=dtype,
        max_iters=max_iters,
        tol=ph_tol,
        trace=trace,
        trace_max_iters=trace_matvecs,
        density=density,
        density_iters=density_iters,
        density_runs=density_probes,
        seed=seed,
    )
    notes.append("method='pyhessian' computes the top eigenvalue only: lambda_min is not available")
    times.update({k: v for k, v in res.wall_time_s.items() if k != "setup"})
    hvps = {"extremes": res.eigen_hvps}
    if trace:
        hvps["trace"] = res.trace_hvps
    dens = None
    if density and res.density_nodes is not None:
        hvps["density"] = res.density_hvps
        nodes = torch.tensor(res.density_nodes, dtype=torch.float64)
        weights = torch.tensor(res.density_weights, dtype=torch.float64)
        dens = SpectralDensity(
            nodes=nodes,
            weights=weights,
            num_matvecs=res.density_hvps,
            size=sum(p.numel() for p in model.parameters() if p.requires_grad),
            num_nodes=torch.full((nodes.shape[0],), nodes.shape[1], dtype=torch.int64),
        )
    trace_se = None
    if len(res.trace_samples) > 1:
        trace_se = float(np.std(res.trace_samples, ddof=1) / math.sqrt(len(res.trace_samples)))
    params = [p for p in model.parameters() if p.requires_grad]
    return CurvatureEstimate(
        lambda_max=res.eigenvalues[0],
        lambda_min=None,
        lambda_min_positive=None,
        condition_number=math.inf,
        residuals={},
        # PyHessian stops early only when its relative-change test passes.
        converged={"lambda_max": res.eigen_hvps < max_iters * num},
        trace=res.trace,
        trace_std_error=trace_se,
        lambda_max_per_batch=(),
        lambda_min_per_batch=(),
        lambda_max_spread=None,
        lambda_min_spread=None,
        top_curvature_per_batch=(),
        curvature_noise=None,
        batch_losses=(),
        density=dens,
        negative_mass=None if dens is None else _negative_mass(dens, res.eigenvalues[0]),
        num_hvps=sum(hvps.values()),
        hvps=hvps,
        wall_time_s=time.perf_counter() - start,
        time_s=times,
        num_params=sum(p.numel() for p in params),
        num_batches=num,
        batch_sizes=tuple(batch_set.batch_sizes),
        method="pyhessian",
        curvature="hessian",
        engine="double-backward",
        mode=mode,
        tol=ph_tol,
        device=str(params[0].device),
        dtype=str(dtype or params[0].dtype).replace("torch.", ""),
        warnings=tuple(notes),
    )
