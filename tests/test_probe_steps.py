"""The probe's pieces: ProbeSettings, the typed steps (against dense float64 spectra), bookkeeping,
and run_probe as the composition probe_curvature calls."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
from _models import make_problem

from uba_auto.lanczos import lanczos
from uba_auto.linear_operator import DenseOperator
from uba_auto.probe import DECISION_RULE, ProbeSettings, probe_curvature, run_probe
from uba_auto.probe.bookkeeping import Ledger, Tracked, progress_bar
from uba_auto.probe.projected import DecisionMonitor
from uba_auto.probe.steps import (
    WARM_START_RULE,
    extremes,
    per_batch_curvature,
    projected_extremes,
    smallest_positive,
    warm_start,
)

F64 = torch.float64


def spectrum_matrix(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ with a seeded random orthogonal Q."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    mat = q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.T
    return (mat + mat.T) / 2


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- ProbeSettings
def test_settings_fields_and_defaults_are_probe_curvatures_keywords():
    params = inspect.signature(probe_curvature).parameters
    keywords = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    keywords.pop("process_group")  # resolved to a communicator, passed beside the settings
    keywords.pop("optimizer")  # an object with state, passed beside the settings too
    fields = {f.name: f.default for f in dataclasses.fields(ProbeSettings)}
    assert fields == keywords


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_batches": 0}, ValueError, "num_batches must be >= 1, got 0"),
        ({"num_batches": 2.0}, TypeError, "num_batches must be an int"),
        ({"method": "arnoldi"}, ValueError, "method must be one of"),
        ({"curvature": "fisher"}, ValueError, "curvature must be one of"),
        ({"engine": "jvp"}, ValueError, "engine must be one of"),
        ({"mode": "train"}, ValueError, "mode must be one of"),
        ({"trace_matvecs": 2}, ValueError, "trace_matvecs must be >= 3"),
        ({"density_probes": 0}, ValueError, "density_probes must be >= 1"),
        ({"density_iters": 1}, ValueError, "density_iters must be >= 2"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"max_hvps": 0}, ValueError, "max_hvps must be >= 1"),
        ({"tol": -1.0}, ValueError, "tol must be finite and > 0"),
        ({"method": "pyhessian", "curvature": "ggn"}, ValueError, "computes the Hessian only"),
        ({"warm_start": "yes"}, TypeError, "warm_start must be True, False or None"),
    ],
)
def test_settings_refuse_what_probe_curvature_refuses(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ProbeSettings(**kwargs)
    problem = make_problem("logistic_regression")
    with pytest.raises(exc, match=match):
        probe_curvature(problem.model, problem.batches, problem.loss, **kwargs)


def test_settings_are_frozen_checked_values():
    settings = ProbeSettings(tol=1, seed=2)
    assert settings.tol == 1.0 and isinstance(settings.tol, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="num_batches must be >= 1"):
        dataclasses.replace(settings, num_batches=0)


def test_settings_budget_steps_and_tolerance():
    assert ProbeSettings().budget(3) == 300 and ProbeSettings(max_hvps=50).budget(3) == 50
    assert ProbeSettings(max_hvps=50).lanczos_steps(3) == 16
    with pytest.raises(ValueError, match="max_hvps=5 is too small for 3 batch"):
        ProbeSettings(max_hvps=5).lanczos_steps(3)
    assert ProbeSettings().tol_for(F64) == 1e-6 and ProbeSettings().tol_for(torch.float32) == 1e-4
    assert ProbeSettings(tol=1e-3).tol_for(F64) == 1e-3
    # extremes + per-batch extremes + one product per batch + trace
    assert ProbeSettings(max_hvps=60, trace_matvecs=9).planned_hvps(3) == 60 * 2 + 3 + 27


# ------------------------------------------------------------------------------------ extremes
EIGS = [-2.0, -0.5, 1e-18, 0.03, 0.2, 1.0, 4.0]


def test_lanczos_extremes_match_dense_spectrum():
    op = DenseOperator(spectrum_matrix(EIGS))
    ext = extremes(op, method="lanczos", max_iters=20, tol=1e-10, generator=gen())
    assert ext.lambda_max == pytest.approx(4.0, rel=1e-10)
    assert ext.lambda_min == pytest.approx(-2.0, rel=1e-10)
    # The invariant space is reached: the smallest positive eigenvalue, not the rounding-zero one.
    assert ext.lambda_min_positive == pytest.approx(0.03, rel=1e-8)
    assert ext.converged == {"lambda_max": True, "lambda_min": True, "lambda_min_positive": True}
    assert ext.num_matvecs == op.num_matvecs
    assert float(ext.top_vector @ op.matrix @ ext.top_vector) == pytest.approx(4.0, rel=1e-10)


def test_smallest_positive_residual_is_the_ritz_pairs_residual():
    eigs = torch.linspace(-1.0, 3.0, 60, dtype=F64).tolist()
    mat = spectrum_matrix(eigs, seed=1)
    m = 10
    ext = extremes(DenseOperator(mat), method="lanczos", max_iters=m, tol=1e-300, generator=gen(4))
    # Every Ritz pair of the same Krylov space (same start vector), with its vector.
    ref = lanczos(
        DenseOperator(mat), max_iters=m, tol=1e-300, generator=gen(4), which="smallest", k=m
    )
    i = int(torch.nonzero(ref.eigenvalues > 0)[0])
    theta, y = float(ref.eigenvalues[i]), ref.eigenvectors[:, i]
    assert ext.lambda_min_positive == pytest.approx(theta, rel=1e-12)
    dense_residual = float(torch.linalg.vector_norm(mat @ y - theta * y))
    assert ext.residuals["lambda_min_positive"] == pytest.approx(dense_residual, abs=1e-10)
    # Interior and unconverged after 10 steps, and reported so.
    assert ext.converged["lambda_min_positive"] is False
    assert ext.ends_converged == (ext.converged["lambda_max"] and ext.converged["lambda_min"])


def test_smallest_positive_without_positive_values():
    theta = torch.tensor([-3.0, -1.0, 1e-16], dtype=F64)
    assert smallest_positive(theta, torch.zeros(3, dtype=F64)) is None


def test_power_extremes_match_dense_spectrum():
    op = DenseOperator(spectrum_matrix([-1.0, 0.1, 0.2, 0.3, 5.0]))
    ext = extremes(op, method="power", max_iters=2000, tol=1e-12, generator=gen())
    assert ext.lambda_max == pytest.approx(5.0, rel=1e-8)
    assert ext.lambda_min == pytest.approx(-1.0, rel=1e-6)
    assert ext.lambda_min_positive is None  # power iteration sees only the two ends
    assert set(ext.residuals) == set(ext.converged) == {"lambda_max", "lambda_min"}
    assert ext.num_matvecs == op.num_matvecs


# ---------------------------------------------------------------------------- per-batch step
def test_per_batch_curvature_against_dense_batches():
    mats = [spectrum_matrix([0.5, 1.0, s], seed=s) for s in (2, 3, 6)]
    v = torch.linalg.eigh(sum(mats) / 3).eigenvectors[:, -1]
    built: list[int] = []

    def batch_operator(i: int) -> DenseOperator:
        built.append(i)
        return DenseOperator(mats[i])

    def solve(op):
        return extremes(op, method="lanczos", max_iters=3, tol=1e-10, generator=gen())

    pb = per_batch_curvature(batch_operator, 3, v, solve)
    assert built == [0, 1, 2]
    assert pb.top_curvature == pytest.approx([float(v @ m @ v) for m in mats], rel=1e-12)
    assert pb.lambda_max == pytest.approx([2.0, 3.0, 6.0], rel=1e-10)
    assert pb.lambda_min == pytest.approx([0.5, 0.5, 0.5], rel=1e-10)
    assert pb.unconverged == ()
    assert pb.num_matvecs == 3 * (1 + 3)
    expected_noise = torch.tensor(pb.top_curvature, dtype=F64).std().item() / 4.0
    assert pb.curvature_noise(4.0) == pytest.approx(expected_noise)
    assert pb.curvature_noise(-1.0) is None


def test_per_batch_curvature_reports_unconverged_batches():
    mats = [spectrum_matrix(torch.linspace(-1, 1, 40).tolist(), seed=s) for s in (0, 1)]
    v = torch.ones(40, dtype=F64) / 40**0.5

    def solve(op):
        return extremes(op, method="lanczos", max_iters=2, tol=1e-12, generator=gen())

    pb = per_batch_curvature(lambda i: DenseOperator(mats[i]), 2, v, solve)
    assert pb.unconverged == (0, 1)
    one = per_batch_curvature(lambda i: DenseOperator(mats[i]), 2, v)
    assert one.lambda_max == () and one.num_matvecs == 2


# ------------------------------------------------------------------------------- bookkeeping
class _Bar:
    def __init__(self) -> None:
        self.updates: list[int] = []

    def update(self, n: int) -> None:
        self.updates.append(n)


def test_tracked_counts_hvps_and_advances_the_bar():
    bar = _Bar()
    inner = DenseOperator(torch.eye(3, dtype=F64))
    tracked = Tracked(inner, bar, hvps_per_product=4)
    for _ in range(3):
        tracked.matvec(torch.ones(3, dtype=F64))
    assert tracked.hvps == 12 and inner.num_matvecs == 3 and bar.updates == [4, 4, 4]
    assert Tracked(inner, None, 1).matvec(torch.ones(3, dtype=F64)).tolist() == [1.0, 1.0, 1.0]


def test_ledger_and_silent_progress_bar():
    ledger = Ledger()
    with ledger.part("trace"):
        ledger.hvps["trace"] = 5
    ledger.hvps["extremes"] = 7
    assert ledger.num_hvps == 12 and set(ledger.times) == {"trace"}
    assert ledger.elapsed() >= ledger.times["trace"] >= 0
    tracked = Tracked(DenseOperator(torch.eye(2, dtype=F64)), None, 3)
    out = ledger.spend("density", tracked, lambda op: op.matvec(torch.ones(2, dtype=F64)))
    assert out.tolist() == [1.0, 1.0] and ledger.hvps["density"] == 3 and "density" in ledger.times
    with progress_bar(False, 10, "probing") as bar:
        assert bar is None


# ------------------------------------------------------------------------------- composition
def test_run_probe_is_what_probe_curvature_runs():
    problem = make_problem("tanh_mlp")
    kw = dict(num_batches=2, dtype=F64, density=True, density_iters=10, density_probes=2)
    direct = run_probe(problem.model, problem.batches, problem.loss, ProbeSettings(**kw), None)
    public = probe_curvature(problem.model, problem.batches, problem.loss, **kw)
    a, b = direct.to_dict(), public.to_dict()
    for d in (a, b):
        d.pop("wall_time_s"), d.pop("time_s")
    assert a == b
    assert list(direct.hvps) == ["extremes", "per_batch", "trace", "density"]


def test_run_probe_checks_its_model():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        run_probe([], [], None, ProbeSettings(), None)


# ---------------------------------------------------------------------------------- warm start
def _batches_sharing_eigenvectors(
    num_batches: int, n: int = 200, seed: int = 0
) -> list[torch.Tensor]:
    """Q diag(lambda + noise_b) Q^T: batches that agree on their eigenvectors, not their values."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0]
    base = torch.linspace(-1.0, 8.0, n, dtype=F64)
    base[-1], base[-2], base[-3] = 10.0, 9.0, 8.5  # a clustered top, as in the trajectories
    out = []
    for _ in range(num_batches):
        lam = base * (1 + 0.02 * torch.randn(n, generator=gen, dtype=F64))
        out.append(q @ torch.diag(lam) @ q.T)
    return out


def test_warm_start_is_the_top_eigenvector_of_its_batch():
    mats = _batches_sharing_eigenvectors(1)
    v = warm_start(DenseOperator(mats[0]), tol=1e-12, generator=torch.Generator().manual_seed(0))
    evals = torch.linalg.eigvalsh(mats[0])
    # At the decision's precision, not to convergence: a unit Ritz vector whose residual meets
    # the rule's rtol (relative to the spectral scale, here its own Ritz value) at its Ritz value.
    theta = float(v @ mats[0] @ v)
    assert float(v.norm()) == pytest.approx(1.0, rel=1e-12)
    assert 0 < theta <= float(evals[-1])
    assert float((mats[0] @ v - theta * v).norm()) <= DECISION_RULE.rtol * theta


def test_a_warm_start_decides_in_fewer_mean_steps_and_converges_to_the_same_mean():
    mats = _batches_sharing_eigenvectors(6)
    ops = [DenseOperator(m) for m in mats]
    weights = [1 / 6] * 6
    mean = sum(mats) / 6
    truth = torch.linalg.eigh(mean)
    top = truth.eigenvectors[:, -1]
    per_batch = torch.tensor([float(top @ m @ top) for m in mats], dtype=F64)
    gen = torch.Generator().manual_seed(1)
    v0 = warm_start(ops[0], tol=1e-12, generator=gen)
    runs = {}
    for key, start in (("cold", None), ("warm", v0)):
        for budget_steps, tag in ((0, "decision"), (None, "converged")):
            runs[key, tag] = projected_extremes(
                ops, weights, max_iters=200, tol=1e-10, budget_steps=budget_steps,
                generator=torch.Generator().manual_seed(2), v0=start,
            )  # fmt: skip
    assert runs["warm", "decision"].decision.steps < runs["cold", "decision"].decision.steps
    for key in ("cold", "warm"):  # where the run ends does not depend on the start
        found = runs[key, "converged"]
        assert found.extremes.lambda_max == pytest.approx(float(truth.eigenvalues[-1]), rel=1e-9)
        assert found.extremes.lambda_min == pytest.approx(float(truth.eigenvalues[0]), rel=1e-9)
        assert found.top_curvature == pytest.approx(per_batch.tolist(), rel=1e-7)


def test_the_mean_decides_at_two_steps_from_a_start_on_its_top_eigenvector():
    # Batches equal up to a scale share their eigenvectors exactly, so a start on the top one
    # meets the residual test at once; the settled test needs sigma at two steps, so the decision
    # is at step 2 (DecisionRule.min_steps).
    n = 40
    gen = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0]
    lam = torch.linspace(0.1, 1.0, n, dtype=F64)
    lam[-1] = 3.0
    scales = torch.tensor([0.9, 1.0, 1.1, 1.2], dtype=F64)
    ops = [DenseOperator(float(c) * (q @ torch.diag(lam) @ q.T)) for c in scales]
    weights = [0.25] * 4
    v0 = warm_start(ops[0], tol=1e-12, generator=torch.Generator().manual_seed(5))
    found = projected_extremes(
        ops, weights, max_iters=50, tol=1e-10, budget_steps=0,
        generator=torch.Generator().manual_seed(6), v0=v0,
    )  # fmt: skip
    assert DECISION_RULE.min_steps == 2 and WARM_START_RULE.min_steps == 3
    assert found.decision.reached and found.decision.steps == DECISION_RULE.min_steps
    mean_top = 3.0 * float(scales.mean())
    # A Ritz value at the rule's precision: below the truth, by at most about r^2 / gap.
    assert mean_top * (1 - 1e-3) <= found.extremes.lambda_max <= mean_top * (1 + 1e-12)
    # Along any vector y each batch shows c_b y'Ay, so sigma is std(c) / mean(c) exactly.
    sigma = float(scales.std() / scales.mean())
    assert found.decision.curvature_noise == pytest.approx(sigma, rel=1e-6)


def test_the_warm_start_takes_at_least_its_own_three_steps():
    # Nearly rank one: the Krylov space of two steps holds the top eigenvector to the rule's
    # residual already, so only the start's own floor keeps it going to step 3.
    lam = torch.cat([torch.tensor([3.0], dtype=F64), torch.linspace(0.01, 0.02, 19, dtype=F64)])
    counted = Tracked(DenseOperator(spectrum_matrix(lam.tolist())), None, 1)
    two = projected_extremes(
        [DenseOperator(spectrum_matrix(lam.tolist()))], [1.0], max_iters=20, tol=1e-12,
        budget_steps=0, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert two.decision.steps == DECISION_RULE.min_steps == 2
    warm_start(counted, tol=1e-12, generator=torch.Generator().manual_seed(0))
    assert counted.hvps == WARM_START_RULE.min_steps == 3


def test_a_top_direction_the_first_batch_lacks_is_still_found_at_convergence():
    # The case the warm start is slow on (BENCHMARKS.md section 1): the mean's top direction lives
    # in another batch. The start vector then carries little of it; the answer is unchanged.
    n = 30
    gen = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0]
    lam = torch.linspace(0.1, 1.0, n, dtype=F64)
    first = q @ torch.diag(lam) @ q.T
    lam_other = lam.clone()
    lam_other[0] = 40.0  # huge where the first batch is flattest
    other = q @ torch.diag(lam_other) @ q.T
    ops, weights = [DenseOperator(first), DenseOperator(other)], [0.5, 0.5]
    v0 = warm_start(ops[0], tol=1e-12, generator=torch.Generator().manual_seed(4))
    found = projected_extremes(
        ops, weights, max_iters=n, tol=1e-10, generator=torch.Generator(), v0=v0
    )
    truth = float(torch.linalg.eigvalsh((first + other) / 2)[-1])
    assert found.extremes.lambda_max == pytest.approx(truth, rel=1e-9)


def test_the_warm_start_setting():
    assert ProbeSettings(hvp_budget=10).warm_starts(8) and not ProbeSettings().warm_starts(8)
    assert ProbeSettings(warm_start=True).warm_starts(2)
    assert not ProbeSettings(hvp_budget=10, warm_start=False).warm_starts(8)
    assert not ProbeSettings(hvp_budget=10).warm_starts(1)  # one batch: nothing to start
    assert not ProbeSettings(hvp_budget=10, method="power", warm_start=True).warm_starts(8)


class _CurvatureSequence:
    """Stands in for BatchProjections: the per-batch curvatures at each step, in order."""

    def __init__(self, steps: list[list[float]]) -> None:
        self.steps = [np.array(c) for c in steps]

    def curvatures(self, s, theta):
        return self.steps.pop(0)


@pytest.mark.parametrize(
    ("curvatures", "ceiling", "decided_at"),
    [
        # sigma 0.5 -> 0.81 -> 0.92: far above a ceiling of 0.2, but moving by more than 10 %
        ([[0.5, 1.0, 1.5], [0.2, 1.0, 1.8], [0.1, 1.0, 1.94], [0.1, 1.0, 1.94]], 0.2, 2),
        ([[0.5, 1.0, 1.5], [0.2, 1.0, 1.8], [0.1, 1.0, 1.94], [0.1, 1.0, 1.94]], None, 4),
        # sigma 0.1 -> 0.5 -> 0.5: the ceiling does not fire at step 2 (0.1 is under it)
        ([[0.9, 1.0, 1.1], [0.5, 1.0, 1.5], [0.5, 1.0, 1.5]], 0.2, 3),
    ],
)
def test_a_noise_above_the_ceiling_at_two_steps_counts_as_settled(curvatures, ceiling, decided_at):
    rule = dataclasses.replace(DECISION_RULE, noise_ceiling=ceiling)
    monitor = DecisionMonitor(_CurvatureSequence(curvatures), rule)
    for m in range(1, len(curvatures) + 1):
        theta = np.ones(m)  # top Ritz value 1 (the mean of each row's curvatures)
        if monitor.update(theta, np.eye(m), beta_m=0.0):  # residual 0: only sigma can hold it
            break
    assert monitor.point.reached and monitor.point.steps == decided_at


# ------------------------------------------------------------------------------ gradient start
def test_gradient_start_is_the_unit_gradient_plus_a_tenth_of_the_random_start():
    from uba_auto._krylov import gaussian_unit_vector
    from uba_auto.probe.steps import START_MIX, gradient_start

    g = torch.tensor([3.0, -4.0, 0.0, 0.0], dtype=F64)
    r = gaussian_unit_vector(DenseOperator(torch.eye(4, dtype=F64)), gen(7))
    v = gradient_start(g, gen(7))
    expected = g / 5 + START_MIX * r
    torch.testing.assert_close(v, expected / expected.norm(), rtol=1e-15, atol=0)
    assert START_MIX == 0.1
    assert gradient_start(g, gen(7), mix=0.0).tolist() == [0.6, -0.8, 0.0, 0.0]
    # A gradient with nothing to follow: the random start alone.
    for bad in (torch.zeros(4, dtype=F64), torch.tensor([1.0, float("nan"), 0, 0], dtype=F64)):
        torch.testing.assert_close(gradient_start(bad, gen(7)), r, rtol=0, atol=0)
    # The generator is drawn from as for a random start: the next draw is the same.
    a, b = gen(3), gen(3)
    gradient_start(g, a)
    gaussian_unit_vector(DenseOperator(torch.eye(4, dtype=F64)), b)
    assert torch.equal(torch.randn(5, generator=a), torch.randn(5, generator=b))


@pytest.mark.parametrize("num_batches", [1, 3])
def test_probe_starts_lanczos_on_the_first_batchs_gradient(num_batches):
    """Two Lanczos steps of the probe are those of dense Lanczos on the mean's float64 Hessian from
    gradient_start(batch 0's dense gradient): the start is exactly that vector."""
    from _reference import _Reference

    from uba_auto.probe.steps import gradient_start

    problem = make_problem("tanh_mlp")
    batches = problem.batches[:num_batches]
    hessian = _Reference(problem, batches, "train-deterministic").hessian()
    g0 = _Reference(problem, batches[:1], "train-deterministic").gradient()
    v0 = gradient_start(g0, gen(11))
    dense = lanczos(DenseOperator(hessian), max_iters=2, tol=1e-300, v0=v0)
    kwargs = dict(num_batches=num_batches, per_batch=False, trace=False, dtype=F64, seed=11)
    est = probe_curvature(
        problem.model, batches, problem.loss, max_hvps=2 * num_batches, start="gradient", **kwargs
    )
    assert est.num_hvps == 2 * num_batches
    assert est.lambda_max == pytest.approx(dense.lambda_max, rel=1e-10)
    assert est.lambda_min == pytest.approx(dense.lambda_min, rel=1e-10)
    # Run to convergence, either start gives the dense spectrum's ends.
    eigs = torch.linalg.eigvalsh(hessian)
    for start in ("gradient", "random"):
        full = probe_curvature(problem.model, batches, problem.loss, start=start, **kwargs)
        assert full.lambda_max == pytest.approx(float(eigs[-1]), rel=1e-8)
        assert full.lambda_min == pytest.approx(float(eigs[0]), rel=1e-6, abs=1e-9)


def test_the_gradient_start_changes_no_random_draw_after_it():
    """The trace's Hutch++ vectors come from the same generator after the start: the estimate is
    bit-identical whichever start the extremes took; the model's state is left as it was."""
    from _state_checks import assert_state_unchanged, snapshot_state

    problem = make_problem("tanh_mlp")
    snapshot = snapshot_state(problem.model)
    kwargs = dict(num_batches=3, per_batch=False, dtype=F64, seed=4)
    a = probe_curvature(problem.model, problem.batches, problem.loss, start="random", **kwargs)
    b = probe_curvature(problem.model, problem.batches, problem.loss, start="gradient", **kwargs)
    assert a.trace == b.trace and a.trace is not None
    assert_state_unchanged(problem.model, snapshot)


def test_a_budgeted_probe_warm_starts_from_the_gradient_and_still_finds_the_mean():
    """The warm start (the first batch's run) starts from gradient_start(batch 0's gradient): its
    products are those of warm_start on batch 0's dense float64 Hessian from that vector; the
    generator is not drawn from again (the trace after it is bit-identical to the random start's);
    the mean's run still ends at the dense spectrum's top."""
    from _reference import _Reference

    from uba_auto.probe.steps import gradient_start

    problem = make_problem("tanh_mlp")
    ref = _Reference(problem, problem.batches, "train-deterministic")
    eigs = torch.linalg.eigvalsh(ref.hessian())
    first = _Reference(problem, problem.batches[:1], "train-deterministic")
    op0 = DenseOperator(first.hessian())
    generator = gen(2)
    v0 = gradient_start(first.gradient(), generator)
    warm_start(op0, tol=1e-6, generator=generator, v0=v0)  # the probe's float64 tol
    kwargs = dict(num_batches=3, per_batch=False, dtype=F64, seed=2, hvp_budget=300)
    est = probe_curvature(problem.model, problem.batches, problem.loss, start="gradient", **kwargs)
    assert est.hvps["start"] == op0.num_matvecs >= WARM_START_RULE.min_steps
    assert est.lambda_max == pytest.approx(float(eigs[-1]), rel=1e-6)
    rnd = probe_curvature(problem.model, problem.batches, problem.loss, start="random", **kwargs)
    assert est.trace == rnd.trace and est.trace is not None


def test_start_must_be_gradient_or_random():
    with pytest.raises(ValueError, match=r"start must be one of \('gradient', 'random'\)"):
        ProbeSettings(start="grad")
    with pytest.raises(ValueError, match="start='gradient' starts a Lanczos run"):
        ProbeSettings(start="gradient", method="power")
    problem = make_problem("logistic_regression")
    with pytest.raises(ValueError, match="start must be one of"):
        probe_curvature(problem.model, problem.batches, problem.loss, start=None)
