"""Curvature probe benchmark: uba-auto against its peers, side by side, in one run.

    python benchmarks/probe_benchmark.py [--repeats 3] [--models mlp,cnn,resnet,transformer]
        [--device cpu|cuda] [--timing capped|trajectory] [--skip-memory] [--out PATH]

(``--help`` lists the rest: ``--skip-budget``, ``--default-repeats``, ``--max-products``, ...)

The peers are not dependencies of uba-auto; install them with the ``bench`` extra::

    pip install -e ".[bench]"

If pip then wants to replace your torch (``backpack-for-pytorch``, a dependency of curvlinops,
asks for torchvision, whose wheels pin a torch build), install them without dependencies and add
the pure-Python ones by hand::

    pip install --no-deps "curvlinops-for-pytorch>=3,<4" "hessian-eigenthings==1.0.0a5" \\
        "backpack-for-pytorch>=1.6" einops einconv unfoldNd linear_operator opt_einsum

Every library works on the same model (its own deep copy), the same batch, in float32, with
BatchNorm in **train mode on batch statistics** (ours: its default ``train-deterministic`` mode;
PyHessian: a wrapper that makes its ``model.eval()`` a no-op; hessian-eigenthings: the model in
train mode; curvlinops: ``torch.func.replace_all_batch_norm_modules_``, since a BatchNorm that
updates its running statistics cannot run inside torch.func transforms). The contenders:

* ``uba-auto``: :func:`uba_auto.probe_curvature` (one batch, extremes only) and, for the
  trajectory, :func:`uba_auto.lanczos` on a :class:`uba_auto.HessianOperator` (the same start
  vector: the probe's ``seed``);
* ``pyhessian``: PyHessian 0.1, ``hessian(...).eigenvalues()`` (power iteration);
* ``eigenthings-lanczos`` / ``eigenthings-power``: hessian-eigenthings 1.0.0a5, its
  ``HessianOperator`` with ``lanczos`` (``lanczos_tridiagonal`` for both ends) and
  ``power_iteration_one``;
* ``curvlinops-eigsh``: curvlinops 3.x, ``HessianLinearOperator(...).to_scipy()`` with
  ``scipy.sparse.linalg.eigsh`` (``which="LA"``, ``k=1``; ``"BE"``, ``k=2`` for both ends).

Measured per model, per repeat (a repeat = a different random start vector, ``seed = repeat``),
with the libraries interleaved within each repeat in alternating order; ratios are formed per
repeat and the median over the repeats is reported:

1. **To 1e-3.** Products and wall time until λ_max is within 1e-3 relative of the truth, and
   until both λ_max and λ_min are (each relative to its own magnitude). The truth is our
   float64 Lanczos on the same batch, to a residual of ``TRUTH_TOL`` relative to the spectral
   scale, started from the float32 Ritz vectors of both ends so that it needs few steps; its
   residuals bound its error (reported), and it is cached in
   ``benchmarks/results/probe_truth_cache.json`` by a digest of the weights and the batch.
   For the iterative methods a counting wrapper around each library's product records the
   estimate after every product (the Rayleigh quotient for power iteration; for Lanczos the
   extreme eigenvalues of the tridiagonal matrix, rebuilt from the vectors the wrapper sees).
   The *oracle count* is the first product after which the estimate stays within 1e-3; the run
   goes on past it to check (3 products for Lanczos, whose Ritz values are monotone; as many
   again for power iteration), to at most ``PLANS[model].max_products``. With timing
   ``capped`` (the default; on a CPU not for the resnet) the time is that of a second run capped
   at the oracle count, from the call to its return (setup included); with ``trajectory`` (the
   resnet's on a CPU: half the products) it is read off the recording run, from the call to the
   end of the oracle product, the recorder's own time subtracted. ``eigsh`` has no estimate
   per product: for it the loosest ``tol`` (1e-1 ... 0) that reaches 1e-3 is searched for a
   few ``ncv`` (its default, and the oracle count of our Lanczos +1 and +3), and the setting
   with the fewest products is timed (later repeats try the previous repeat's setting first).
   Power iteration finds the top end only: it has no both-ends entry; where |λ_min| > λ_max it
   converges to λ_min, so it is not run (its default stop still is).
2. **Default stop.** Relative error of λ_max (and λ_min where the call gives it) and the products
   of each library's own default call: ours ``probe_curvature`` defaults (``tol=1e-4``);
   ``eigenvalues()`` (``maxIter=100, tol=1e-3``); eigenthings ``lanczos(op)`` (``k=10,
   max_iter=20, which="LM"``) and ``power_iteration_one(op)`` (``max_iter=100, tol=1e-4``);
   ``eigsh`` at ``tol=0`` (machine precision), ``k=1, "LA"`` and ``k=2, "BE"``.
3. **One product in gradients**: median time of one product of each library's operator, over the
   median time of one gradient (forward + backward on the batch), and the product's relative
   difference from ours on the same vector (a check that every library multiplies by the same
   Hessian).
4. **Peak memory ÷ one training step** (``benchmarks/peak_memory.py``, each in a fresh process):
   our probe (one batch, extremes only), the ``auto_uba`` defaults (8 batches) and each peer's
   default top-eigenvalue solve (:func:`peer_solver`), over a first SGD-momentum step.
5. **auto_uba's share of a 5000-step budget**: wall time of ``auto_uba(model, batches(name, 8),
   5000, loss_fn=loss_fn, progress=False)`` over 5000 times the median wall time of one
   training step (SGD with momentum), and its HVPs by part.

Truth, ratios and raw values go to ``--out`` (JSON); the tables are printed as markdown, with
the minutes each model and part took.

Cost: on a 2-core CPU the MLP and the CNN take minutes a repeat, the transformer tens of minutes
(power iteration there runs its default 100 products for nothing: |λ_min| > λ_max), and the
resnet hours (a product costs 2.6-4.3 gradients of ~1.5-3 s each, and ``auto_uba``'s default
probe runs twice: for its memory and for its share); ``--models`` picks a subset.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import importlib
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

try:
    from benchmarks import peak_memory
    from benchmarks.probe_models import MODELS, batches, loss_fn, make_model, train_step
except ImportError:  # run as a script, or imported by peak_memory's child from benchmarks/
    import peak_memory  # type: ignore[no-redef]
    from probe_models import (  # type: ignore[no-redef]
        MODELS,
        batches,
        loss_fn,
        make_model,
        train_step,
    )

REL = 1e-3
TRUTH_TOL = 1e-10
BUDGET = 5000
# The longest recording run (products) per model; resnet's products cost seconds on a CPU.


# What each model's run does by default on a CPU. The resnet's products cost seconds there (tens
# in float64), so for it: time read off the recording runs, default-stop runs in the first
# repeat only, fewer float64 steps for the truth (the residual reached is reported: it bounds
# the truth's error). On a GPU every model gets the full plan (capped timing, every repeat).
# --timing, --default-repeats, --max-products, --truth-max-iters override.
@dataclass(frozen=True)
class Plan:
    max_products: int  # longest recording run, products
    truth_max_iters: int  # float64 Lanczos steps for the truth
    timing: str = "capped"  # "capped" or "trajectory"
    default_repeats: int | None = None  # default-stop runs in the first N repeats (None: all)


PLANS = {
    "mlp": Plan(300, 300),
    "cnn": Plan(300, 300),
    "transformer": Plan(200, 300),
    "resnet": Plan(120, 40, timing="trajectory", default_repeats=1),
}
EIGSH_TOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 0.0)
PEERS = ("pyhessian", "eigenthings-lanczos", "eigenthings-power", "curvlinops-eigsh")
OURS = "uba-auto"
OURS_GRADIENT = "uba-auto-gradient-start"
OURS_KEPT = "uba-auto-graph-kept"
VARIANTS = {"gradient-start": OURS_GRADIENT, "graph-kept": OURS_KEPT}
"""``--variants``: ours with ``probe_curvature(start="gradient")``, or with its one batch's graph
kept (``graph_memory=None``, no memory cap), side by side with the defaults; not peers."""
METHODS = (OURS, OURS_GRADIENT, OURS_KEPT, *PEERS)
TRUTH_CACHE = Path(__file__).resolve().parent / "results" / "probe_truth_cache.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(estimate: float | None, truth: float) -> float | None:
    return None if estimate is None else abs(estimate - truth) / abs(truth)


def first_within(estimates: list[float], truth: float) -> int | None:
    """1-based index of the product after which every estimate stays within ``REL`` of truth."""
    k = None
    for i in range(len(estimates) - 1, -1, -1):
        if abs(estimates[i] - truth) > REL * abs(truth):
            break
        k = i + 1
    return k


def _flat(x: Tensor | list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    if isinstance(x, Tensor):
        return x.reshape(-1)
    return torch.cat([t.reshape(-1) for t in x])


# --------------------------------------------------------------------------------------------
# Truth


def _digest(model: nn.Module, batch: Any) -> str:
    h = hashlib.sha1(torch.__version__.encode())
    for t in [*model.state_dict().values(), *batch]:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def truth(
    name: str, model: nn.Module, batch: Any, plan: Plan, *, fresh: bool = False
) -> dict[str, Any]:
    """λ_max, λ_min of the float32 benchmark operator, to float64 precision (cached)."""
    from uba_auto import HessianOperator, lanczos

    key = f"{name}:{_digest(model, batch)}"
    cache = json.loads(TRUTH_CACHE.read_text()) if TRUTH_CACHE.exists() else {}
    if key in cache and not fresh:
        return {**cache[key], "cached": True}
    t = time.perf_counter()
    # A float32 run gives the Ritz vectors of both ends; float64 Lanczos started from their sum
    # converges in a few steps, certified by its own residuals.
    warm = lanczos(HessianOperator(model, [batch], loss_fn), max_iters=plan.max_products, tol=1e-4)
    v0 = warm.eigenvectors.sum(dim=1).to(torch.float64)
    op = HessianOperator(model, [batch], loss_fn, dtype=torch.float64)
    res = lanczos(op, max_iters=plan.truth_max_iters, tol=TRUTH_TOL, v0=v0 / v0.norm())
    lam_min, lam_max = res.lambda_min, res.lambda_max
    # Some eigenvalue lies within the residual of each Ritz value: a bound on the truth's error.
    bounds = [float(res.residuals[0]) / abs(lam_min), float(res.residuals[-1]) / abs(lam_max)]
    out = {
        "lambda_max": lam_max,
        "lambda_min": lam_min,
        "relative_error_bound": {"lambda_min": bounds[0], "lambda_max": bounds[1]},
        "float32_warm_start_products": warm.num_matvecs,
        "float64_products": res.num_matvecs,
        "seconds": time.perf_counter() - t,
        "torch": torch.__version__,
    }
    if max(bounds) <= 1e-6:  # good enough to judge 1e-3: keep it
        cache[key] = out
        TRUTH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        TRUTH_CACHE.write_text(json.dumps(cache, indent=1))
    return {**out, "cached": False}


# --------------------------------------------------------------------------------------------
# Recording the estimate after every product


class _Enough(Exception):
    """Raised by the recorder inside a library's loop once the oracle count is settled."""


@dataclass
class Trajectory:
    """Estimates after each product and the time (from the call) at which each product ended."""

    kind: str
    est_max: list[float] = field(default_factory=list)
    est_min: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def oracle(self, lam_max: float, lam_min: float, both: bool) -> int | None:
        k = first_within(self.est_max, lam_max)
        if not both or k is None:
            return k
        k_min = first_within(self.est_min, lam_min) if self.est_min else None
        return None if k_min is None else max(k, k_min)

    def time_at(self, k: int | None) -> float | None:
        return None if k is None else self.times[k - 1]


class Recorder:
    """Called with ``(v, Av)`` after each product; builds the estimate, stops the run when done.

    For ``kind="lanczos"`` the vectors are the unit Lanczos vectors :math:`q_j`, so
    :math:`\\alpha_j = q_j^\\top A q_j` and :math:`\\beta_{j-1} = q_j^\\top A q_{j-1}` rebuild the
    tridiagonal matrix whose extreme eigenvalues are the library's estimates after ``j`` products.
    For ``kind="power"`` the estimate is the Rayleigh quotient of ``v``.
    """

    def __init__(
        self, kind: str, lam_max: float, lam_min: float, cap: int, device: torch.device
    ) -> None:
        self.traj = Trajectory(kind)
        self.lam_max, self.lam_min, self.cap, self.device = lam_max, lam_min, cap, device
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.prev_av: Tensor | None = None
        self.overhead = 0.0
        self.t0 = 0.0

    def start(self) -> None:
        sync(self.device)
        self.t0 = time.perf_counter()

    def observe(self, v: Any, av: Any) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.traj.times.append(now - self.t0 - self.overhead)
        with torch.no_grad():
            v, av = _flat(v).double(), _flat(av).double()
            if self.traj.kind == "lanczos":
                self.alpha.append(float(v @ av))
                if self.prev_av is not None:
                    self.beta.append(float(v @ self.prev_av))
                self.prev_av = av.clone()
                theta = scipy.linalg.eigh_tridiagonal(
                    np.array(self.alpha), np.array(self.beta), eigvals_only=True
                )
                self.traj.est_max.append(float(theta[-1]))
                self.traj.est_min.append(float(theta[0]))
            else:
                self.traj.est_max.append(float(v @ av) / float(v @ v))
        self.overhead += time.perf_counter() - now
        if self._settled():
            raise _Enough

    def _settled(self) -> bool:
        n = len(self.traj.est_max)
        if n >= self.cap:
            return True
        both = self.traj.kind == "lanczos"
        k = self.traj.oracle(self.lam_max, self.lam_min, both)
        if k is None:
            return False
        hold = 3 if both else max(10, k)
        return n - k >= hold


# --------------------------------------------------------------------------------------------
# The contenders


@dataclass(frozen=True)
class Solve:
    """One timed solve: estimates, products, seconds (setup included)."""

    lambda_max: float
    lambda_min: float | None
    products: int
    seconds: float
    note: str = ""


class _FlatCrossEntropy(nn.CrossEntropyLoss):
    """``loss_fn`` as the ``nn.Module`` with ``.reduction`` that curvlinops needs."""

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return super().forward(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


class _KeepTrainMode(nn.Module):
    """PyHessian calls ``model.eval()``; this wrapper ignores it (BatchNorm on batch stats)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, inputs: Tensor) -> Tensor:
        return self.inner(inputs)

    def train(self, mode: bool = True) -> _KeepTrainMode:
        return self


class Contender:
    """One library's solver on one model and batch; each works on its own copy of the model."""

    name = ""
    kind = "lanczos"  # how its estimate evolves: "lanczos", "power", or "eigsh" (no trajectory)
    both_ends = True

    def __init__(self, model: nn.Module, batch: Any, device: torch.device) -> None:
        self.model = copy.deepcopy(model).train()
        self.batch = batch
        self.device = device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.size = sum(p.numel() for p in self.params)

    def _timed(self, fn: Callable[[], tuple[float, float | None, int]], note: str = "") -> Solve:
        sync(self.device)
        t = time.perf_counter()
        lam_max, lam_min, products = fn()
        sync(self.device)
        return Solve(lam_max, lam_min, products, time.perf_counter() - t, note)

    def trajectory(self, seed: int, rec: Recorder) -> Trajectory:
        raise NotImplementedError

    def capped(self, seed: int, count: int, both: bool) -> Solve:
        raise NotImplementedError

    def default(self, seed: int) -> Solve:
        raise NotImplementedError

    def product(self) -> tuple[Callable[[], Any], Callable[[Any], Tensor]]:
        """A zero-arg call doing one product on a fixed vector, and how to flatten its result."""
        raise NotImplementedError

    def fixed_vector(self) -> Tensor:
        gen = torch.Generator().manual_seed(1234)
        return torch.randn(self.size, generator=gen).to(self.device)


class Ours(Contender):
    name = OURS
    start = "random"
    options: ClassVar[dict[str, Any]] = {}  # more probe_curvature keywords (the variants)

    def __init__(self, model: nn.Module, batch: Any, device: torch.device) -> None:
        super().__init__(model, batch, device)
        self.model = model  # the probe never modifies the model: no copy, as a user runs it

    def _probe(self, seed: int, **kwargs: Any) -> tuple[float, float | None, int]:
        from uba_auto import probe_curvature

        est = probe_curvature(
            self.model,
            [self.batch],
            loss_fn,
            num_batches=1,
            per_batch=False,
            trace=False,
            seed=seed,
            progress=False,
            start=self.start,
            **self.options,
            **kwargs,
        )
        return est.lambda_max, est.lambda_min, est.num_hvps

    def trajectory(self, seed: int, rec: Recorder) -> Trajectory:
        from uba_auto import HessianOperator, SymmetricOperator, lanczos

        class Observed(SymmetricOperator):
            def __init__(self, inner: SymmetricOperator) -> None:
                super().__init__()
                self.inner = inner
                self.size, self.dtype, self.device = inner.size, inner.dtype, inner.device

            def _matvec(self, v: Tensor) -> Tensor:
                av = self.inner.matvec(v)
                rec.observe(v, av)
                return av

        from uba_auto.probe.steps import gradient_start

        rec.start()
        from uba_auto.probe.settings import DEFAULT_GRAPH_MEMORY

        # The probe's memory policy (timing "trajectory" times this run: it must be the probe's).
        memory = self.options.get("graph_memory", DEFAULT_GRAPH_MEMORY)
        inner = HessianOperator(self.model, [self.batch], loss_fn, graph_memory=memory)
        op = Observed(inner)
        gen = torch.Generator(device=op.device).manual_seed(seed)
        # The start probe_curvature(start=self.start) draws: the same generator, the same order.
        v0 = gradient_start(inner.gradient(), gen) if self.start == "gradient" else None
        with contextlib.suppress(_Enough):
            lanczos(op, max_iters=rec.cap, tol=1e-12, generator=gen, v0=v0)
        return rec.traj

    def capped(self, seed: int, count: int, both: bool) -> Solve:
        # tol far below float32 rounding: the run stops at max_hvps, the oracle count.
        return self._timed(lambda: self._probe(seed, max_hvps=max(count, 2), tol=1e-12))

    def default(self, seed: int) -> Solve:
        return self._timed(lambda: self._probe(seed))

    def product(self) -> tuple[Callable[[], Any], Callable[[Any], Tensor]]:
        from uba_auto import HessianOperator

        op = HessianOperator(self.model, [self.batch], loss_fn)
        v = self.fixed_vector()
        return (lambda: op.matvec(v)), _flat


class OursGradient(Ours):
    """Ours started from the gradient (``--gradient-start``), side by side with the default."""

    name = OURS_GRADIENT
    start = "gradient"


class OursKept(Ours):
    """Ours with its batch's graph kept (``--variants graph-kept``): what the memory cap costs."""

    name = OURS_KEPT
    options: ClassVar[dict[str, Any]] = {"graph_memory": None}


class PyHessian(Contender):
    name = "pyhessian"
    kind = "power"
    both_ends = False

    def __init__(self, model: nn.Module, batch: Any, device: torch.device) -> None:
        super().__init__(model, batch, device)
        # importlib: the package re-exports the class `hessian` under the module's name.
        self.ph = importlib.import_module("pyhessian.hessian")
        self.wrapped = _KeepTrainMode(self.model)

    @contextlib.contextmanager
    def _hessian(self, observe: Callable[[Any, Any], None] | None = None) -> Iterator[Any]:
        ph, counter = self.ph, [0]
        plain = ph.hessian_vector_product

        def counting(grads: Any, params: Any, v: Any) -> Any:
            counter[0] += 1
            hv = plain(grads, params, v)
            if observe is not None:
                observe(v, hv)
            return hv

        ph.hessian_vector_product = counting
        try:
            with self._quiet():
                comp = ph.hessian(
                    self.wrapped, loss_fn, data=self.batch, cuda=self.device.type == "cuda"
                )
            comp.counter = counter
            yield comp
        finally:
            ph.hessian_vector_product = plain
            for p in self.params:  # PyHessian leaves .grad holding its graph
                p.grad = None

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        with warnings.catch_warnings():
            # PyHessian's own backward(create_graph=True); we break the cycle after each run.
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph")
            yield

    def _eigenvalue(self, seed: int, **kwargs: Any) -> tuple[float, float | None, int]:
        with self._hessian() as comp:
            torch.manual_seed(seed)  # PyHessian draws its start from the global RNG
            values, _ = comp.eigenvalues(**kwargs)
            return float(values[0]), None, comp.counter[0]

    def trajectory(self, seed: int, rec: Recorder) -> Trajectory:
        rec.start()
        with self._hessian(rec.observe) as comp, contextlib.suppress(_Enough):
            torch.manual_seed(seed)
            comp.eigenvalues(maxIter=rec.cap, tol=0.0)
        return rec.traj

    def capped(self, seed: int, count: int, both: bool) -> Solve:
        # tol=0: PyHessian's relative-change test never passes, it runs maxIter products.
        return self._timed(lambda: self._eigenvalue(seed, maxIter=count, tol=0.0))

    def default(self, seed: int) -> Solve:
        return self._timed(lambda: self._eigenvalue(seed))

    def product(self) -> tuple[Callable[[], Any], Callable[[Any], Tensor]]:
        with self._quiet():
            comp = self.ph.hessian(
                self.wrapped, loss_fn, data=self.batch, cuda=self.device.type == "cuda"
            )
        v = list(self.fixed_vector().split([p.numel() for p in self.params]))
        v = [t.view_as(p) for t, p in zip(v, self.params, strict=True)]

        def product() -> Any:
            return self.ph.hessian_vector_product(comp.gradsH, comp.params, v)

        return product, _flat


class _Eigenthings(Contender):
    def __init__(self, model: nn.Module, batch: Any, device: torch.device) -> None:
        super().__init__(model, batch, device)
        self.he = importlib.import_module("hessian_eigenthings")

    def _operator(self, observe: Callable[[Any, Any], None] | None = None) -> Any:
        he = self.he
        inner = he.HessianOperator(self.model, [self.batch], he.supervised_loss(loss_fn))
        counter = [0]

        def matvec(v: Tensor) -> Tensor:
            counter[0] += 1
            av = inner.matvec(v)
            if observe is not None:
                observe(v, av)
            return av

        op = he.LambdaOperator(matvec, inner.size, inner.device, inner.dtype)
        op.counter = counter
        return op

    def _v0(self, seed: int, op: Any) -> Tensor:
        # What eigenthings' lanczos(seed=) and power_iteration_one(seed=) draw.
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(op.size, dtype=op.dtype, generator=gen).to(op.device)

    def product(self) -> tuple[Callable[[], Any], Callable[[Any], Tensor]]:
        op = self._operator()
        v = self.fixed_vector()
        return (lambda: op.matvec(v)), _flat


class EigenthingsLanczos(_Eigenthings):
    name = "eigenthings-lanczos"

    def trajectory(self, seed: int, rec: Recorder) -> Trajectory:
        rec.start()
        op = self._operator(rec.observe)
        with contextlib.suppress(_Enough):
            # Full re-orthogonalisation, as its default gives every run of <= 50 steps.
            self.he.lanczos(op, k=1, max_iter=rec.cap, which="LA", seed=seed, reorthogonalize=True)
        return rec.traj

    def capped(self, seed: int, count: int, both: bool) -> Solve:
        def run() -> tuple[float, float | None, int]:
            op = self._operator()
            if not both:
                res = self.he.lanczos(
                    op, k=1, max_iter=count, which="LA", seed=seed, reorthogonalize=True
                )
                return float(res.eigenvalues[0]), None, op.counter[0]
            # Both ends from one Krylov space: its Lanczos kernel, then the tridiagonal's ends.
            td = self.he.lanczos_tridiagonal(op, self._v0(seed, op), count, reorthogonalize=True)
            m = td.alphas.shape[0]
            theta = scipy.linalg.eigh_tridiagonal(
                td.alphas.double().cpu().numpy(),
                td.betas[: m - 1].double().cpu().numpy(),
                eigvals_only=True,
            )
            return float(theta[-1]), float(theta[0]), op.counter[0]

        return self._timed(run)

    def default(self, seed: int) -> Solve:
        def run() -> tuple[float, float | None, int]:
            op = self._operator()
            res = self.he.lanczos(op, seed=seed)  # k=10, max_iter=20, which="LM"
            return float(res.eigenvalues.max()), None, op.counter[0]

        return self._timed(run, "k=10, max_iter=20, LM")


class EigenthingsPower(_Eigenthings):
    name = "eigenthings-power"
    kind = "power"
    both_ends = False

    def trajectory(self, seed: int, rec: Recorder) -> Trajectory:
        rec.start()
        op = self._operator(rec.observe)
        with contextlib.suppress(_Enough):
            self.he.power_iteration_one(op, max_iter=rec.cap, tol=0.0, seed=seed)
        return rec.traj

    def _run(self, seed: int, **kwargs: Any) -> tuple[float, float | None, int]:
        op = self._operator()
        lam, *_ = self.he.power_iteration_one(op, seed=seed, **kwargs)
        return float(lam), None, op.counter[0]

    def capped(self, seed: int, count: int, both: bool) -> Solve:
        return self._timed(lambda: self._run(seed, max_iter=count, tol=0.0))

    def default(self, seed: int) -> Solve:
        return self._timed(lambda: self._run(seed), "max_iter=100, tol=1e-4")


class CurvlinopsEigsh(Contender):
    name = "curvlinops-eigsh"
    kind = "eigsh"

    def __init__(self, model: nn.Module, batch: Any, device: torch.device) -> None:
        super().__init__(model, batch, device)
        # BatchNorm on batch statistics without running-statistics updates: torch.func's way.
        torch.func.replace_all_batch_norm_modules_(self.model)
        self.curvlinops = importlib.import_module("curvlinops")
        from scipy.sparse.linalg import eigsh

        self.eigsh = eigsh
        self.config: dict[bool, tuple[int | None, float]] = {}

    def _operator(self) -> Any:
        from scipy.sparse.linalg import LinearOperator

        hessian = self.curvlinops.HessianLinearOperator(
            self.model, _FlatCrossEntropy(), self.params, [self.batch], check_deterministic=False
        )
        inner = hessian.to_scipy()
        counter = [0]

        def matvec(x: np.ndarray) -> np.ndarray:
            counter[0] += 1
            return inner.matvec(x)

        op = LinearOperator(inner.shape, matvec=matvec, dtype=inner.dtype)
        return op, counter

    def run(self, seed: int, both: bool, ncv: int | None, tol: float) -> Solve:
        def solve() -> tuple[float, float | None, int]:
            op, counter = self._operator()
            v0 = np.random.default_rng(seed).standard_normal(self.size)
            k, which = (2, "BE") if both else (1, "LA")
            w = self.eigsh(op, k=k, which=which, tol=tol, ncv=ncv, v0=v0, return_eigenvectors=False)
            return float(w.max()), float(w.min()) if both else None, counter[0]

        return self._timed(solve, f"ncv={ncv or 'default'}, tol={tol:g}")

    def search(
        self, seed: int, both: bool, truth_: dict[str, Any], hint: int | None
    ) -> tuple[Solve | None, list[dict[str, Any]]]:
        """The fewest-products (ncv, tol) reaching 1e-3; the previous repeat's choice first."""
        tried: list[dict[str, Any]] = []

        def ok(s: Solve) -> bool:
            good = rel_err(s.lambda_max, truth_["lambda_max"]) <= REL
            if both:
                good = good and rel_err(s.lambda_min, truth_["lambda_min"]) <= REL
            return good

        def attempt(ncv: int | None, tol: float) -> Solve:
            s = self.run(seed, both, ncv, tol)
            tried.append({"ncv": ncv, "tol": tol, "products": s.products, "reached": ok(s)})
            return s

        if both in self.config:
            s = attempt(*self.config[both])
            if ok(s):
                return s, tried
        k = 2 if both else 1
        ncvs: list[int | None] = [None]
        if hint:
            ncvs += sorted({max(2 * k + 1, n) for n in (hint + 1, hint + 3)})
        best: Solve | None = None
        for ncv in ncvs:
            if ncv is not None and (ncv >= self.size or (best and ncv >= best.products)):
                continue  # its first pass alone takes ncv products: it cannot do better
            for tol in EIGSH_TOLS:
                s = attempt(ncv, tol)
                if ok(s):
                    if best is None or s.products < best.products:
                        best, self.config[both] = s, (ncv, tol)
                    break
                if best is not None and s.products >= best.products:
                    break  # tighter tolerances only add products
        return best, tried

    def default(self, seed: int) -> Solve:
        return self.run(seed, both=False, ncv=None, tol=0.0)

    def default_both(self, seed: int) -> Solve:
        return self.run(seed, both=True, ncv=None, tol=0.0)

    def product(self) -> tuple[Callable[[], Any], Callable[[Any], Tensor]]:
        op, _ = self._operator()
        x = self.fixed_vector().double().cpu().numpy()
        return (lambda: op.matvec(x)), (lambda y: torch.from_numpy(np.asarray(y)).reshape(-1))


CONTENDERS: dict[str, type[Contender]] = {
    c.name: c
    for c in (
        Ours,
        OursGradient,
        OursKept,
        PyHessian,
        EigenthingsLanczos,
        EigenthingsPower,
        CurvlinopsEigsh,
    )
}


def peer_solver(name: str, model: nn.Module, batch: Any) -> Callable[[], Any]:
    """A zero-arg call running peer ``name``'s default top-eigenvalue solve (for peak_memory)."""
    if name not in PEERS:
        raise ValueError(f"peer must be one of {PEERS}, got {name!r}")
    device = next(model.parameters()).device
    contender = CONTENDERS[name](model, batch, device)
    return lambda: contender.default(seed=0)


# --------------------------------------------------------------------------------------------
# The measurements


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def to_tolerance(
    name: str,
    contenders: dict[str, Contender],
    truth_: dict[str, Any],
    repeats: int,
    plan: Plan,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Measurements 1 and 2: products and time to 1e-3, accuracy at the default stop."""
    lam_max, lam_min = truth_["lambda_max"], truth_["lambda_min"]
    capped = plan.timing == "capped"
    raw: list[dict[str, Any]] = []
    for r in range(repeats):
        order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
        defaults = plan.default_repeats is None or r < plan.default_repeats
        rep: dict[str, Any] = {m: {} for m in contenders}
        # Phase 1, the recording runs (the timed ones with timing "trajectory").
        for m in order:
            c = contenders[m]
            if c.kind == "eigsh":
                continue
            if c.kind == "power" and abs(lam_min) >= abs(lam_max):
                # Power iteration converges to the end of largest magnitude, here λ_min: its
                # estimate never settles near λ_max (no run needed to know it).
                rep[m]["max"] = {"products": None, "seconds": None, "recorded": 0, "never": True}
                continue
            rec = Recorder(c.kind, lam_max, lam_min, plan.max_products, c.device)
            traj = c.trajectory(r, rec)
            for target, both in (("max", False), ("both", True)):
                if both and not c.both_ends:
                    continue
                k = traj.oracle(lam_max, lam_min, both)
                rep[m][target] = {
                    "products": k,
                    "seconds": None if capped else traj.time_at(k),
                    "recorded": len(traj.est_max),
                }
            log(f"  {name} r{r} {m}: oracle {rep[m].get('max')} / {rep[m].get('both')}")
        hints = {t: rep[OURS][t]["products"] for t in ("max", "both")} if OURS in rep else {}
        # Phase 2, the timed runs.
        for m in order:
            c = contenders[m]
            if isinstance(c, CurvlinopsEigsh):
                for target, both in (("max", False), ("both", True)):
                    s, tried = c.search(r, both, truth_, hints.get(target))
                    if s is not None and capped:
                        s = c.run(r, both, *c.config[both])
                    rep[m][target] = {
                        "products": None if s is None else s.products,
                        "seconds": None if s is None else s.seconds,
                        "setting": None if s is None else s.note,
                        "search": tried,
                    }
                if defaults:
                    rep[m]["default"] = _default_row(c.default(r), lam_max, lam_min)
                    rep[m]["default_both"] = _default_row(c.default_both(r), lam_max, lam_min)
            else:
                for target in ("max", "both") if capped else ():
                    entry = rep[m].get(target)
                    if entry is None or entry["products"] is None:
                        continue
                    s = c.capped(r, entry["products"], both=target == "both")
                    errs = [rel_err(s.lambda_max, lam_max)]
                    if target == "both":
                        errs.append(rel_err(s.lambda_min, lam_min))
                    entry.update(
                        seconds=s.seconds,
                        capped_products=s.products,
                        reached=all(e is not None and e <= REL for e in errs),
                    )
                if defaults:
                    rep[m]["default"] = _default_row(c.default(r), lam_max, lam_min)
            log(f"  {name} r{r} {m}: {json.dumps(rep[m], default=str)[:400]}")
        raw.append(rep)
    return {"raw": raw, "summary": _summarise(raw, list(contenders))}


def _default_row(s: Solve, lam_max: float, lam_min: float) -> dict[str, Any]:
    return {
        "products": s.products,
        "seconds": s.seconds,
        "err_max": rel_err(s.lambda_max, lam_max),
        "err_min": rel_err(s.lambda_min, lam_min),
        "lambda_max": s.lambda_max,
        "lambda_min": s.lambda_min,
        "note": s.note,
    }


def _summarise(raw: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Medians per method, and per-repeat ratios ours ÷ method (and ÷ the best peer)."""
    out: dict[str, Any] = {}
    for m in methods:
        row: dict[str, Any] = {}
        for target in ("max", "both"):
            entries = [rep[m].get(target) for rep in raw]
            if all(e is None for e in entries):
                continue
            row[target] = {
                "products": _median([e and e["products"] for e in entries]),
                "seconds": _median([e and e["seconds"] for e in entries]),
                "reached": sum(1 for e in entries if e and e["products"] is not None),
                "never": any(e and e.get("never") for e in entries),
                "ratio_products": _median(
                    [
                        _ratio(rep[OURS][target]["products"], e and e["products"])
                        for rep, e in zip(raw, entries, strict=True)
                    ]
                ),
                "ratio_seconds": _median(
                    [
                        _ratio(rep[OURS][target]["seconds"], e and e["seconds"])
                        for rep, e in zip(raw, entries, strict=True)
                    ]
                ),
            }
        for key in ("default", "default_both"):
            entries = [rep[m][key] for rep in raw if key in rep[m]]
            if not entries:
                continue
            row[key] = {
                k: _median([e[k] for e in entries])
                for k in ("products", "seconds", "err_max", "err_min")
            }
            row[key]["note"] = entries[0]["note"]
        out[m] = row
    for ours in (OURS, *VARIANTS.values()):
        if ours not in methods:
            continue
        prefix = "" if ours == OURS else ours.removeprefix("uba-auto-").replace("-", "_") + "_"
        for target in ("max", "both"):
            per_repeat = []
            for rep in raw:
                peer_times = [
                    rep[m][target]["seconds"]
                    for m in methods
                    if m in PEERS and rep[m].get(target) and rep[m][target]["seconds"] is not None
                ]
                mine = rep[ours].get(target) or {}
                per_repeat.append(_ratio(mine.get("seconds"), min(peer_times, default=None)))
            out[f"{prefix}ratio_seconds_vs_best_peer_{target}"] = _median(per_repeat)
    return out


def _time_calls(fn: Callable[[], Any], device: torch.device, seconds: float = 2.0) -> float:
    """Median seconds of ``fn()``: a warm-up call, then at least 3 calls, about ``seconds``."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t
    reps = max(3, min(20, int(seconds / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def product_cost(
    model: nn.Module, batch: Any, contenders: dict[str, Contender], device: torch.device
) -> dict[str, Any]:
    """Measurement 3: one product of each library, in gradients, and its agreement with ours."""
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), params)

    t_grad = _time_calls(gradient, device)
    out: dict[str, Any] = {"gradient_s": t_grad, "in_gradients": {}, "rel_diff_vs_ours": {}}
    reference = None
    for m, c in contenders.items():
        fn, flat = c.product()
        out["in_gradients"][m] = _time_calls(fn, device) / t_grad
        result = flat(fn()).double().cpu()
        if reference is None:
            reference = result
        out["rel_diff_vs_ours"][m] = float((result - reference).norm() / reference.norm())
    return out


def memory(name: str, device: torch.device, repeats: int) -> dict[str, Any]:
    """Measurement 4: peak memory of each solve over one training step, fresh processes."""
    whats = {
        "train_step": ("train_step", {}),
        OURS: ("probe", {"num_batches": 1, "per_batch": False, "trace": False}),
        "auto_uba": ("auto", {}),
        **{p: (f"peer:{p}", {}) for p in PEERS},
    }
    peak = {
        label: peak_memory.measure(name, what, device=str(device), repeats=repeats, kwargs=kw)
        for label, (what, kw) in whats.items()
    }
    step = max(peak["train_step"], 1)
    return {"bytes": peak, "ratio": {k: v / step for k, v in peak.items() if k != "train_step"}}


def budget_share(name: str, model: nn.Module, device: torch.device) -> dict[str, Any]:
    """Measurement 5: the auto_uba default probe's wall time over 5000 training steps."""
    from uba_auto import auto_uba

    data = batches(name, 8, device)
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=1e-3, momentum=0.9)
    t_step = _time_calls(lambda: train_step(trained, opt, data[0]), device, seconds=5.0)
    sync(device)
    t = time.perf_counter()
    auto = auto_uba(model, data, BUDGET, loss_fn=loss_fn, progress=False)
    sync(device)
    t_auto = time.perf_counter() - t
    est = auto.report.estimate
    return {
        "train_step_s": t_step,
        "auto_uba_s": t_auto,
        "share": t_auto / (BUDGET * t_step),
        "hvps": dict(est.hvps),
        "num_hvps": est.num_hvps,
        "phi": float(auto.phi),
    }


# --------------------------------------------------------------------------------------------
# Tables


def fmt_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(x: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def print_tables(results: dict[str, Any]) -> None:
    print(
        f"\n# probe benchmark ({results['device']}, torch {results['torch']}, "
        f"{results['machine']}, median of {results['repeats']}, timing: {results['timing']})\n"
    )
    print(f"BatchNorm: {results['batchnorm']}\n")
    models = results["models"]
    print("## 1. to 1e-3 of the truth: products, wall time, ours ÷ theirs (median of per-repeat)\n")
    rows = []
    for name, res in models.items():
        summ = res["tolerance"]["summary"]
        for m in METHODS:
            row = summ.get(m)
            if row is None:
                continue
            cells = [name, m]
            for target in ("max", "both"):
                e = row.get(target)
                if e is None:
                    cells += ["n/a (top only)", "", ""]
                    continue
                products = _f(e["products"], ".0f")
                if e["never"]:
                    products = "never (converges to λ_min: abs(λ_min) > λ_max)"
                elif e["reached"] < results["repeats"]:
                    products += f" ({e['reached']}/{results['repeats']} reached)"
                cells += [
                    products,
                    _f(e["seconds"], ".3g", " s"),
                    "" if m == OURS else _f(e["ratio_seconds"], ".2f", "x"),
                ]
            rows.append(cells)
        rows.append(
            [
                name,
                "**ours ÷ best peer**",
                "",
                "",
                _f(summ["ratio_seconds_vs_best_peer_max"], ".2f", "x"),
                "",
                "",
                _f(summ["ratio_seconds_vs_best_peer_both"], ".2f", "x"),
            ]
        )
        for variant in VARIANTS.values():
            prefix = variant.removeprefix("uba-auto-").replace("-", "_") + "_"
            if f"{prefix}ratio_seconds_vs_best_peer_max" not in summ:
                continue
            rows.append(
                [
                    name,
                    f"**{variant} ÷ best peer**",
                    "",
                    "",
                    _f(summ[f"{prefix}ratio_seconds_vs_best_peer_max"], ".2f", "x"),
                    "",
                    "",
                    _f(summ[f"{prefix}ratio_seconds_vs_best_peer_both"], ".2f", "x"),
                ]
            )
    print(
        fmt_table(
            [
                "model",
                "method",
                "λ_max: products",
                "λ_max: time",
                "ours ÷ this",
                "both ends: products",
                "both ends: time",
                "ours ÷ this",
            ],
            rows,
        )
    )
    print("\n## 2. at each library's default stop: products, relative error, time\n")
    rows = []
    for name, res in models.items():
        t = res["truth"]
        bd = t.get("relative_error_bound", {"?": math.nan})
        for m in METHODS:
            row = res["tolerance"]["summary"].get(m, {})
            for key in ("default", "default_both"):
                d = row.get(key)
                if d is None:
                    continue
                label = m + (" (BE)" if key == "default_both" else "")
                rows.append(
                    [
                        name,
                        label,
                        d["note"] or "",
                        _f(d["products"], ".0f"),
                        _f(d["err_max"], ".1e"),
                        _f(d["err_min"], ".1e"),
                        _f(d["seconds"], ".3g", " s"),
                    ]
                )
        rows.append(
            [
                name,
                "truth",
                f"float64 Lanczos, error <= {max(bd.values()):.0e}",
                "",
                f"λ_max {t['lambda_max']:.6g}",
                f"λ_min {t['lambda_min']:.6g}",
                "",
            ]
        )
    print(
        fmt_table(
            ["model", "method", "setting", "products", "λ_max rel. err", "λ_min rel. err", "time"],
            rows,
        )
    )
    print("\n## 3. one product in gradients (forward + backward); rel. difference from ours\n")
    names = list(models)
    rows = []
    for m in METHODS:
        cells = [m]
        for name in names:
            p = models[name].get("product")
            if not p or m not in p["in_gradients"]:
                cells.append("")
                continue
            cells.append(f"{p['in_gradients'][m]:.2f} ({p['rel_diff_vs_ours'][m]:.0e})")
        rows.append(cells)
    rows.append(
        ["(one gradient)"]
        + [_f(models[n].get("product", {}).get("gradient_s"), ".3g", " s") for n in names]
    )
    print(fmt_table(["method", *names], rows))
    if any(models[n].get("memory") for n in names):
        print("\n## 4. peak memory ÷ one training step (fresh process each)\n")
        labels = [OURS, "auto_uba", *PEERS]
        rows = [
            [label] + [_f(models[n]["memory"]["ratio"].get(label), ".2f", "x") for n in names]
            for label in labels
        ]
        rows.append(
            ["(training step)"]
            + [f"{models[n]['memory']['bytes']['train_step'] / 2**20:.1f} MiB" for n in names]
        )
        print(fmt_table(["solve", *names], rows))
    print(f"\n## 5. auto_uba defaults: share of a {BUDGET}-step budget\n")
    rows = []
    for name in names:
        b = models[name].get("budget")
        if not b:
            continue
        parts = " + ".join(f"{v} {k}" for k, v in b["hvps"].items())
        rows.append(
            [
                name,
                f"{b['share']:.1%}",
                f"{b['auto_uba_s']:.3g} s",
                f"{b['train_step_s'] * 1e3:.3g} ms",
                f"{parts} = {b['num_hvps']}",
            ]
        )
    print(fmt_table(["model", "share", "auto_uba", "one training step", "HVPs by part"], rows))


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--timing",
        choices=("capped", "trajectory"),
        help="time to 1e-3 from a run capped at the oracle count, or read off the recording "
        "run; default per model (PLANS: trajectory for the resnet)",
    )
    parser.add_argument(
        "--default-repeats", type=int, help="default-stop runs in the first N repeats only"
    )
    parser.add_argument("--max-products", type=int, help="longest recording run (all models)")
    parser.add_argument("--truth-max-iters", type=int, help="float64 truth steps (all models)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=sorted(VARIANTS),
        default=[],
        help="also run ours with start='gradient' and/or graph_memory=None (not peers)",
    )
    parser.add_argument("--skip-budget", action="store_true", help="skip measurement 5")
    parser.add_argument("--memory-repeats", type=int, default=1)
    parser.add_argument("--fresh-truth", action="store_true", help="ignore the truth cache")
    parser.add_argument("--out", default="benchmarks/results/probe_benchmark.json")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {MODELS}")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "device": str(device)
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "repeats": args.repeats,
        "timing": args.timing or "per model",
        "dtype": "float32",
        "batchnorm": "train mode, batch statistics, for every library (running statistics "
        "untouched by ours; curvlinops on torch.func.replace_all_batch_norm_modules_)",
        "versions": _versions(),
        "models": {},
    }
    for name in names:
        t_model = time.perf_counter()
        model = make_model(name, device)
        batch = batches(name, 1, device)[0]
        plan = _plan(name, args)
        res: dict[str, Any] = {
            "num_params": sum(p.numel() for p in model.parameters()),
            "plan": asdict(plan),
        }
        clock = _Clock()
        with clock("truth"):
            res["truth"] = truth(name, model, batch, plan, fresh=args.fresh_truth)
        log(f"{name}: truth {res['truth']}")
        wanted = {VARIANTS[v] for v in args.variants}
        chosen = [m for m in METHODS if m not in VARIANTS.values() or m in wanted]
        contenders = {m: CONTENDERS[m](model, batch, device) for m in chosen}
        with clock("tolerance"):
            res["tolerance"] = to_tolerance(name, contenders, res["truth"], args.repeats, plan, log)
        with clock("product"):
            res["product"] = product_cost(model, batch, contenders, device)
        log(f"{name}: product {res['product']}")
        del contenders
        if not args.skip_memory:
            with clock("memory"):
                res["memory"] = memory(name, device, args.memory_repeats)
            log(f"{name}: memory {res['memory']['ratio']}")
        if not args.skip_budget:
            with clock("budget"):
                res["budget"] = budget_share(name, model, device)
            log(f"{name}: budget {res['budget']}")
        res["seconds"] = time.perf_counter() - t_model
        res["part_seconds"] = clock.parts
        results["models"][name] = res
    results["seconds"] = time.perf_counter() - started
    print_tables(results)
    for name, res in results["models"].items():
        parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in res["part_seconds"].items())
        print(f"\n{name}: {res['seconds'] / 60:.1f} min ({parts})", end="")
    print(f"\n{len(names)} model(s) in {results['seconds'] / 60:.1f} min")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=_json_default))
    print(f"wrote {out}")


class _Clock:
    """``with clock("part"):`` adds the part's wall time to ``clock.parts``."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.parts[part] = time.perf_counter() - t


def _plan(name: str, args: argparse.Namespace) -> Plan:
    plan = PLANS[name]
    if args.device != "cpu":  # the economies are for a CPU's seconds-long products
        plan = Plan(plan.max_products, max(plan.truth_max_iters, 300))
    changes = {
        "timing": args.timing,
        "default_repeats": args.default_repeats,
        "max_products": args.max_products,
        "truth_max_iters": args.truth_max_iters,
    }
    return dataclasses.replace(plan, **{k: v for k, v in changes.items() if v is not None})


def _json_default(x: Any) -> Any:
    if isinstance(x, Solve):
        return asdict(x)
    return float(x) if isinstance(x, (np.floating, np.integer)) else str(x)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("uba-auto", "PyHessian", "curvlinops-for-pytorch", "hessian-eigenthings", "scipy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


if __name__ == "__main__":
    main()
