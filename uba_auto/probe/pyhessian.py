"""The PyHessian reference backend (``method="pyhessian"``), run so that it cannot touch the
caller's state, and its adapter to :class:`~uba_auto.probe.CurvatureEstimate`.

PyHessian 0.1 (the PyPI release) calls ``model.eval()`` on the model it is given, leaves
``.grad`` filled with a graph (``backward(create_graph=True)``), draws its random vectors from the
global RNG, creates float32 vectors whatever the model's dtype, and its ``density()`` calls
``torch.eig``, which PyTorch removed. This module runs it anyway, on the same batches and under the
same mode policy as our own probe, by:

* handing it a deep copy of the model (the caller's parameters, buffers, ``.grad`` and flags are
  never reachable from PyHessian), wrapped so that its ``model.eval()`` is a no-op and the copy
  keeps the probe's mode policy (:func:`uba_auto.curvature.modes.evaluation_mode`);
* forking the RNG (CPU and CUDA) around the run and seeding it, so results are reproducible and
  the caller's RNG stream is unchanged;
* setting the default dtype to the model's for the duration, so PyHessian's ``torch.randn`` vectors
  match a float64 model;
* supplying, only for the duration of ``density()``, a working ``torch.eig`` (PyTorch's now only
  raises) built on :func:`scipy.linalg.eigh_tridiagonal` (PyHessian passes a symmetric tridiagonal);
* counting Hessian-vector products by wrapping PyHessian's product functions.

It is the reference the benchmarks compare against (they call :func:`run_pyhessian`), not the
default method; :func:`pyhessian_estimate` is what ``probe_curvature(method="pyhessian")`` runs.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

from .._batches import BatchSet
from ..curvature.modes import evaluation_mode
from ..slq import SpectralDensity
from .bookkeeping import Ledger
from .estimate import CurvatureEstimate, negative_mass
from .settings import ProbeSettings

__all__ = ["PyHessianResult", "pyhessian_estimate", "run_pyhessian"]

# Patching module attributes is process-global: one PyHessian run at a time.
_LOCK = threading.Lock()


@dataclass(frozen=True)
class PyHessianResult:
    """What a PyHessian run returned, with the work it cost.

    Attributes:
        eigenvalues: PyHessian's top eigenvalues (power iteration with deflation), largest first.
        eigen_hvps: single-batch Hessian-vector products spent on them.
        eigen_history: the Rayleigh quotient vᵀHv after each product of the first eigenvalue's
            power iteration (single-batch mode; empty in data-loader mode), i.e. PyHessian's
            estimate as a function of the products spent.
        trace: mean of PyHessian's Hutchinson samples (PyHessian returns the samples), or None.
        trace_samples: those samples.
        trace_hvps: products spent on the trace.
        density_nodes: per SLQ run, the Ritz values (PyHessian's density), or None.
        density_weights: per SLQ run, the quadrature weights.
        density_hvps: products spent on the density.
        wall_time_s: seconds per part: ``{"setup", "eigenvalues", "trace", "density"}``.
    """

    eigenvalues: list[float]
    eigen_hvps: int
    eigen_history: list[float]
    trace: float | None
    trace_samples: list[float]
    trace_hvps: int
    density_nodes: list[list[float]] | None
    density_weights: list[list[float]] | None
    density_hvps: int
    wall_time_s: dict[str, float]


class _KeepMode(nn.Module):
    """Wraps the model copy; ``train()``/``eval()`` are no-ops so the probe's mode policy holds."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, inputs: Any) -> Any:
        return self.inner(inputs)

    def train(self, mode: bool = True) -> _KeepMode:
        return self


def _eig_tridiagonal(matrix: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.eig`` as PyHessian uses it, for a symmetric tridiagonal: (n, 2) values, vectors."""
    t = matrix.detach().cpu().double().numpy()
    values, vectors = scipy.linalg.eigh_tridiagonal(np.diag(t).copy(), np.diag(t, 1).copy())
    pairs = np.stack([values, np.zeros_like(values)], axis=1)
    return (
        torch.from_numpy(pairs).to(matrix.device, matrix.dtype),
        torch.from_numpy(vectors).to(matrix.device, matrix.dtype),
    )


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    missing = object()
    old = getattr(module, name, missing)
    setattr(module, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(module, name)
        else:
            setattr(module, name, old)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def run_pyhessian(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    mode: str = "train-deterministic",
    dtype: torch.dtype | None = None,
    top_n: int = 1,
    max_iters: int = 100,
    tol: float = 1e-3,
    trace: bool = False,
    trace_max_iters: int = 100,
    trace_tol: float = 1e-3,
    density: bool = False,
    density_iters: int = 100,
    density_runs: int = 1,
    seed: int = 0,
) -> PyHessianResult:
    """Run PyHessian's ``eigenvalues()`` (and optionally ``trace()``, ``density()``).

    Args:
        model: the caller's model; only a deep copy is given to PyHessian.
        batches: ``(inputs, targets)`` pairs on the model's device. One batch uses PyHessian's
            single-batch mode (cached gradient graph), several its data-loader mode (PyHessian
            weights batches by their size, as ours does).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        mode: the probe's mode policy for BatchNorm and dropout.
        dtype: run in this dtype (the copy is cast; the batches must already be); default the
            model's.
        top_n, max_iters, tol: PyHessian's ``eigenvalues(maxIter, tol, top_n)``.
        trace, trace_max_iters, trace_tol: run ``trace(maxIter, tol)``.
        density, density_iters, density_runs: run ``density(iter, n_v)``.
        seed: seed of PyHessian's random vectors (the caller's RNG state is restored after).

    Raises:
        ImportError: if pyhessian is not installed.
        ValueError: if ``batches`` is empty or not ``(inputs, targets)`` pairs.
    """
    try:
        # importlib, not "import pyhessian.hessian as ph": the package re-exports the class
        # `hessian` under the module's name, so attribute lookup would give the class.
        ph = importlib.import_module("pyhessian.hessian")
    except ImportError as err:  # pragma: no cover - pyhessian is a runtime dependency
        raise ImportError(
            "method='pyhessian' needs the pyhessian package: pip install pyhessian"
        ) from err
    if not batches:
        raise ValueError("batches must hold at least one (inputs, targets) pair, got none")
    for i, b in enumerate(batches):
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise ValueError(
                f"method='pyhessian' needs (inputs, targets) batches and a loss_fn(outputs, "
                f"targets); batch {i} is a {type(b).__name__}. Use method='lanczos' for other forms"
            )

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True; nothing to probe")
    device, dtype = params[0].device, dtype or params[0].dtype
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    replica = copy.deepcopy(model).to(dtype)
    for p in replica.parameters():
        p.grad = None
    wrapped = _KeepMode(replica)
    cuda = device.type == "cuda"
    pairs = [(x, y) for x, y in batches]

    counter = {"n": 0}
    history: list[float] = []
    single_hvp = ph.hessian_vector_product

    def counting_hvp(grads: Any, params: Any, v: Any) -> Any:
        counter["n"] += 1
        hv = single_hvp(grads, params, v)
        if record["on"]:
            # PyHessian's v is unit-norm, so this is exactly the estimate it computes next.
            history.append(float(sum((h * u).sum() for h, u in zip(hv, v, strict=True))))
        return hv

    record = {"on": False}

    class _Counting(ph.hessian):
        def dataloader_hv_product(self, v: Any) -> Any:
            counter["n"] += len(pairs)
            return super().dataloader_hv_product(v)

    forked = [device] if cuda else []
    with (
        _LOCK,
        warnings.catch_warnings(),
        torch.random.fork_rng(devices=forked),
        _default_dtype(dtype),
        evaluation_mode(replica, mode),
        _patched(ph, "hessian_vector_product", counting_hvp),
    ):
        # PyHessian's own backward(create_graph=True) warns of the cycle we break below.
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        torch.manual_seed(seed)
        if len(pairs) == 1:
            comp = _Counting(wrapped, loss_fn, data=pairs[0], cuda=cuda)
        else:
            comp = _Counting(wrapped, loss_fn, dataloader=pairs, cuda=cuda)
        times["setup"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        counter["n"] = 0
        record["on"] = top_n == 1
        eigenvalues, _ = comp.eigenvalues(maxIter=max_iters, tol=tol, top_n=top_n)
        record["on"] = False
        eigen_hvps = counter["n"]
        times["eigenvalues"] = time.perf_counter() - t1

        trace_samples: list[float] = []
        trace_hvps = 0
        if trace:
            t1 = time.perf_counter()
            counter["n"] = 0
            trace_samples = [float(s) for s in comp.trace(maxIter=trace_max_iters, tol=trace_tol)]
            trace_hvps = counter["n"]
            times["trace"] = time.perf_counter() - t1

        nodes = weights = None
        density_hvps = 0
        if density:
            t1 = time.perf_counter()
            counter["n"] = 0
            # torch.eig still exists but only raises; PyHessian passes a symmetric tridiagonal.
            with _patched(torch, "eig", _eig_tridiagonal):
                raw_nodes, raw_weights = comp.density(iter=density_iters, n_v=density_runs)
            nodes = [[float(x) for x in row] for row in raw_nodes]
            weights = [[float(x) for x in row] for row in raw_weights]
            density_hvps = counter["n"]
            times["density"] = time.perf_counter() - t1
        # Break the parameter <-> graph cycle PyHessian's backward(create_graph=True) made.
        comp.gradsH = comp.params = None
        for p in replica.parameters():
            p.grad = None

    return PyHessianResult(
        eigenvalues=[float(e) for e in eigenvalues],
        eigen_hvps=eigen_hvps,
        eigen_history=history,
        trace=float(np.mean(trace_samples)) if trace_samples else None,
        trace_samples=trace_samples,
        trace_hvps=trace_hvps,
        density_nodes=nodes,
        density_weights=weights,
        density_hvps=density_hvps,
        wall_time_s=times,
    )


def pyhessian_estimate(
    model: nn.Module,
    batch_set: BatchSet,
    loss_fn: Any,
    settings: ProbeSettings,
    ledger: Ledger,
    notes: list[str],
) -> CurvatureEstimate:
    """``method="pyhessian"``: PyHessian's own algorithms on the probe's batches, as an estimate.

    Only the top eigenvalue (no ``lambda_min``, no per-batch values); ``notes`` gets a warning
    saying so. ``ledger`` holds the setup time already spent and receives the parts' times.

    Raises:
        ValueError: unless every batch is an ``(inputs, targets)`` pair and ``loss_fn`` is given.
    """
    if loss_fn is None or not all(
        isinstance(b, (tuple, list)) and len(b) == 2 for b in batch_set.batches
    ):
        raise ValueError(
            "method='pyhessian' needs (inputs, targets) batches and loss_fn(outputs, targets); "
            "use method='lanczos' for dict batches or ModelLoss"
        )
    num = batch_set.num_found
    # PyHessian's tolerance is on the relative change of the estimate between iterations.
    tol = 1e-3 if settings.tol is None else settings.tol
    max_iters = max(1, settings.budget(num) // num)
    res = run_pyhessian(
        model,
        batch_set.batches,
        loss_fn,
        mode=settings.mode,
        dtype=settings.dtype,
        max_iters=max_iters,
        tol=tol,
        trace=settings.trace,
        trace_max_iters=settings.trace_matvecs,
        density=settings.density,
        density_iters=settings.density_iters,
        density_runs=settings.density_probes,
        seed=settings.seed,
    )
    notes.append("method='pyhessian' computes the top eigenvalue only: lambda_min is not available")
    ledger.times.update({k: v for k, v in res.wall_time_s.items() if k != "setup"})
    ledger.hvps["extremes"] = res.eigen_hvps
    if settings.trace:
        ledger.hvps["trace"] = res.trace_hvps
    params = [p for p in model.parameters() if p.requires_grad]
    dens = None
    if settings.density and res.density_nodes is not None:
        ledger.hvps["density"] = res.density_hvps
        nodes = torch.tensor(res.density_nodes, dtype=torch.float64)
        dens = SpectralDensity(
            nodes=nodes,
            weights=torch.tensor(res.density_weights, dtype=torch.float64),
            num_matvecs=res.density_hvps,
            size=sum(p.numel() for p in params),
            num_nodes=torch.full((nodes.shape[0],), nodes.shape[1], dtype=torch.int64),
        )
    trace_se = None
    if len(res.trace_samples) > 1:
        trace_se = float(np.std(res.trace_samples, ddof=1) / math.sqrt(len(res.trace_samples)))
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
        negative_mass=None if dens is None else negative_mass(dens, res.eigenvalues[0]),
        num_hvps=ledger.num_hvps,
        hvps=ledger.hvps,
        wall_time_s=ledger.elapsed(),
        time_s=ledger.times,
        num_params=sum(p.numel() for p in params),
        num_batches=num,
        batch_sizes=tuple(batch_set.batch_sizes),
        method="pyhessian",
        curvature="hessian",
        engine="double-backward",
        mode=settings.mode,
        tol=tol,
        device=str(params[0].device),
        dtype=str(settings.dtype or params[0].dtype).replace("torch.", ""),
        warnings=tuple(notes),
    )
