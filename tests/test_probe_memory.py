"""The probe's memory bounds: the capped graph cache and the compact Lanczos basis, against dense
float64 ground truth, the uncapped operator and the full-precision basis."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from _models import make_problem
from _reference import F64, _Reference, assert_close
from _spectra import spectrum_operator, well_separated
from _state_checks import assert_state_unchanged, snapshot_state

from uba_auto import probe_curvature
from uba_auto._krylov import LanczosBasis, compact_dtype
from uba_auto.curvature import GGNOperator, HessianOperator
from uba_auto.lanczos import lanczos
from uba_auto.linear_operator import DenseOperator
from uba_auto.probe.steps import projected_extremes


def _partial_cap(op_class, problem, **kw):
    """A cap (in training steps) under which some but not all batch graphs are kept."""
    for cap in (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0):
        op = op_class(problem.model, problem.batches, problem.loss, graph_memory=cap, **kw)
        if 0 < len(op.cached_batches) < op.num_batches:
            return cap, op
    raise AssertionError("no cap keeps part of the graphs")


@pytest.mark.parametrize("name", ["tanh_mlp", "cnn_batchnorm", "tiny_transformer"])
def test_a_partly_cached_hessian_is_the_dense_hessian(name):
    problem = make_problem(name, num_batches=6)
    _, op = _partial_cap(HessianOperator, problem, dtype=F64)
    # The kept graphs are a prefix: after the first refusal every batch is recomputed.
    assert op.cached_batches == tuple(range(len(op.cached_batches)))
    ref = _Reference(problem, problem.batches, "train-deterministic")
    assert_close(op.to_dense(), ref.hessian())
    assert_close(op.gradient(), ref.gradient())
    for i in (0, op.num_batches - 1):  # one kept, one recomputed
        alone = _Reference(problem, [problem.batches[i]], "train-deterministic")
        assert_close(op.batch_operator(i).to_dense(), alone.hessian())


def test_a_graph_is_kept_only_with_room_for_its_product():
    # A product through a kept graph (retain_graph) adds about the graph's size again, so a graph
    # is kept only when twice it fits, last batch or not: one batch alone is kept under exactly
    # the caps that keep it first of several (the warm start relies on it, probe/run.py).
    problem = make_problem("tanh_mlp", num_batches=4)
    args = (problem.model, problem.batches, problem.loss)
    keeps_alone, keeps_first = [], []
    for cap in np.geomspace(0.25, 64.0, 25):
        alone = HessianOperator(problem.model, problem.batches[:1], problem.loss, graph_memory=cap)
        keeps_alone.append(alone.cached_batches == (0,))
        keeps_first.append(HessianOperator(*args, graph_memory=cap).cached_batches[:1] == (0,))
    assert keeps_alone == keeps_first
    assert not keeps_alone[0] and keeps_alone[-1]


def test_a_partly_cached_ggn_is_the_dense_ggn():
    problem = make_problem("tanh_mlp", num_batches=6)
    _, op = _partial_cap(GGNOperator, problem, dtype=F64)
    assert_close(op.to_dense(), _Reference(problem, problem.batches, "train-deterministic").ggn())


@pytest.mark.parametrize("op_class", [HessianOperator, GGNOperator])
def test_caps_from_none_to_everything(op_class):
    problem = make_problem("tanh_mlp", num_batches=4)
    args = (problem.model, problem.batches, problem.loss)
    every = op_class(*args, dtype=F64)
    none = op_class(*args, dtype=F64, graph_memory=1e-6)
    assert every.cached_batches == (0, 1, 2, 3) and none.cached_batches == ()
    assert op_class(*args, dtype=F64, graph_memory=1e6).cached_batches == (0, 1, 2, 3)
    v = torch.randn(every.size, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert_close(none.matvec(v), every.matvec(v), rtol=1e-12)
    assert torch.equal(none.batch_losses, every.batch_losses)
    assert_close(none.gradient(), every.gradient(), rtol=1e-12)
    # Without a cache there is nothing to hold: cache_graph=False ignores the cap.
    assert op_class(*args, cache_graph=False, graph_memory=2.5).cached_batches == ()


def test_the_probe_caps_the_graphs_by_default_and_leaves_the_model_alone():
    problem = make_problem("cnn_batchnorm", num_batches=8)
    snap = snapshot_state(problem.model)
    rng = torch.get_rng_state()
    args = (problem.model, problem.batches, problem.loss)
    common = dict(num_batches=8, dtype=F64, per_batch=False, trace=False, progress=False)
    capped = probe_curvature(*args, hvp_budget=0, warm_start=False, **common)
    full = probe_curvature(
        *args, hvp_budget=0, graph_memory=None, compact_basis=False, warm_start=False, **common
    )
    # The warm start (the budgeted default) too: the cap changes what is recomputed, not a digit.
    warm = [probe_curvature(*args, hvp_budget=0, graph_memory=g, **common) for g in (2.5, None)]
    assert_state_unchanged(problem.model, snap)
    assert torch.equal(torch.get_rng_state(), rng)
    assert warm[0].hvps == warm[1].hvps and warm[0].hvps["start"] > 0
    assert warm[0].lambda_max == pytest.approx(warm[1].lambda_max, rel=1e-9)
    assert warm[0].curvature_noise == pytest.approx(warm[1].curvature_noise, rel=1e-6)
    # The decision path takes the same steps and lands on the same numbers.
    assert capped.decision_steps == full.decision_steps
    assert capped.num_hvps == full.num_hvps
    assert capped.lambda_max == pytest.approx(full.lambda_max, rel=1e-9)
    assert capped.lambda_min == pytest.approx(full.lambda_min, rel=1e-9, abs=1e-9)
    assert capped.curvature_noise == pytest.approx(full.curvature_noise, rel=1e-6)


def test_the_float32_decision_path_with_a_compact_basis_matches_dense_truth():
    problem = make_problem("tanh_mlp", num_batches=6)
    common = dict(num_batches=6, per_batch=False, trace=False, progress=False)
    est = {
        compact: probe_curvature(
            problem.model, problem.batches, problem.loss, compact_basis=compact, **common
        )
        for compact in (True, False)
    }
    truth = torch.linalg.eigvalsh(
        _Reference(problem, problem.batches, "train-deterministic").hessian()
    )
    for e in est.values():
        assert e.lambda_max == pytest.approx(float(truth[-1]), rel=1e-4)
        assert e.lambda_min == pytest.approx(float(truth[0]), rel=1e-3, abs=1e-4 * float(truth[-1]))
    assert est[True].curvature_noise == pytest.approx(est[False].curvature_noise, rel=1e-3)


def test_compact_dtype_halves_the_digits():
    assert compact_dtype(torch.float64) == torch.float32
    assert compact_dtype(torch.float32) == torch.float16
    assert compact_dtype(torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize(
    "dtype, storage, tol, vector_tol",
    [(torch.float64, torch.float32, 1e-10, 1e-6), (torch.float32, torch.float16, 1e-5, 2e-3)],
)
def test_a_compact_basis_keeps_the_ritz_values_at_working_precision(
    dtype, storage, tol, vector_tol
):
    eigenvalues = well_separated(300)
    op = spectrum_operator(eigenvalues, seed=3, dtype=dtype)
    kw = dict(max_iters=150, tol=tol, generator=torch.Generator().manual_seed(0))
    full = lanczos(op, **kw)
    compact = lanczos(op, basis_dtype=storage, **kw)
    lam = eigenvalues.to(F64)
    scale = float(lam.abs().max())
    for res in (full, compact):
        assert abs(res.lambda_max - float(lam.max())) <= 10 * tol * scale
        assert abs(res.lambda_min - float(lam.min())) <= 10 * tol * scale
    assert compact.num_iters == pytest.approx(full.num_iters, abs=5)
    # The Ritz vectors carry the storage's rounding, no more.
    a = op.to_dense().to(F64)
    y = compact.eigenvectors[:, -1].to(F64)
    residual = torch.linalg.vector_norm(a @ y - compact.lambda_max * y) / scale
    assert float(residual) <= vector_tol


def test_a_compact_basis_stores_its_older_rows_in_half_the_bytes_and_the_newest_two_in_full():
    n = 1000
    basis = LanczosBasis(n, 10, torch.float32, torch.device("cpu"), torch.float16)
    rows = torch.linalg.qr(torch.randn(n, 6, generator=torch.Generator().manual_seed(0)))[0].T
    for r in rows:
        basis.append(r.contiguous())
    # Rows 0-3 stored in float16 (one block of 4), the newest two only at full precision.
    assert [(t.dtype, t.shape[0]) for t in basis.blocks] == [(torch.float16, 4)]
    assert sorted(basis._recent) == [4, 5]
    assert torch.equal(basis.row(5), rows[5])  # the newest rows exactly
    h = basis.coefficients(rows[2])
    assert np.allclose(h.numpy(), np.eye(6)[2], atol=2e-3)


def test_the_compact_basis_products_are_those_of_its_decoded_rows():
    # Q w, w - Q^T h and Q^T C equal the same products with the rows decoded one by one
    # (row(j): the scaled float16 row, or the newest two at full precision), in float64.
    n, gen = 50, torch.Generator().manual_seed(1)
    basis = LanczosBasis(n, 10, torch.float32, torch.device("cpu"), torch.float16)
    for _ in range(7):  # two blocks of 4 rows, the second one part-filled
        basis.append(torch.randn(n, generator=gen) * 3)
    q = torch.stack([basis.row(j) for j in range(7)]).to(F64)
    w, h = torch.randn(n, generator=gen), torch.randn(7, generator=gen)
    c = torch.randn(7, 2, generator=gen)
    assert torch.allclose(basis.coefficients(w).to(F64), q @ w.to(F64), rtol=1e-5, atol=1e-5)
    assert torch.allclose(
        basis.subtract(w, h).to(F64), w.to(F64) - q.T @ h.to(F64), rtol=1e-5, atol=1e-5
    )
    assert torch.allclose(basis.combine(c, 5).to(F64), q[:5].T @ c[:5].to(F64), atol=1e-5)
    assert torch.equal(basis.row(6), basis._recent[6])  # the newest row is kept exactly


def test_the_compact_re_orthogonalisation_is_accurate_to_the_storage():
    # orthogonalize forms the stored rows' coefficients with one float16 product per block: they
    # carry float16's relative rounding (2^-11), no more, and the newest rows' are exact.
    n, gen = 3000, torch.Generator().manual_seed(2)
    basis = LanczosBasis(n, 12, torch.float32, torch.device("cpu"), torch.float16)
    for _ in range(9):
        basis.append(torch.randn(n, generator=gen))
    q = torch.stack([basis.row(j) for j in range(9)]).to(F64)
    w = torch.randn(n, generator=gen) * 1e3
    rest, h = basis.orthogonalize(w)
    exact = q @ w.to(F64)
    assert torch.allclose(h.to(F64), exact, rtol=2e-3, atol=1e-3 * float(exact.abs().max()))
    # The two newest, in float32: to its rounding of a dot product, relative to |q_j| |w|.
    scale = float(torch.linalg.vector_norm(q[7:], dim=1).max() * torch.linalg.vector_norm(w))
    assert torch.allclose(h[7:].to(F64), exact[7:], rtol=0, atol=1e-6 * scale)
    assert torch.allclose(rest.to(F64), w.to(F64) - q.T @ h.to(F64), rtol=1e-5, atol=1e-2)


def test_the_compact_coefficients_do_not_overflow_float16():
    # A vector along a stored row of a large basis: scaled by its largest entry alone, the float16
    # product would be about n / (max|q| sqrt(n))^2 ~ 9e4 > 65504 (inf); the norm bound keeps it in.
    n, gen = 2_000_000, torch.Generator().manual_seed(3)
    basis = LanczosBasis(n, 4, torch.float32, torch.device("cpu"), torch.float16)
    rows = torch.randn(3, n, generator=gen)
    rows /= torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    for r in rows:
        basis.append(r)
    w = 5.0 * rows[0] + 1e-3 * rows[1]
    _, h = basis.orthogonalize(w)
    assert torch.isfinite(h).all()
    assert h[0].item() == pytest.approx(5.0, rel=2e-3)


def test_memory_arguments_are_checked():
    problem = make_problem("tanh_mlp")
    args = (problem.model, problem.batches, problem.loss)
    with pytest.raises(ValueError, match="graph_memory must be a positive finite number"):
        HessianOperator(*args, graph_memory=-1.0)
    with pytest.raises(TypeError, match="graph_memory must be None"):
        probe_curvature(*args, graph_memory="2.5", progress=False)
    with pytest.raises(TypeError, match="compact_basis must be a bool"):
        probe_curvature(*args, compact_basis="yes", progress=False)
    op = DenseOperator(torch.eye(4))
    with pytest.raises(TypeError, match="basis_dtype must be None"):
        lanczos(op, basis_dtype=torch.int32)


def _vector_storages(n):
    """Storages of the live 1-D tensors of length ``n`` (``type()``, not ``isinstance``: the gc
    also lists dead weak proxies, on which ``isinstance`` raises)."""
    return {
        obj.untyped_storage().data_ptr()
        for obj in gc.get_objects()
        if issubclass(type(obj), torch.Tensor) and obj.dim() == 1 and obj.numel() == n
    }


class _Census(DenseOperator):
    """A dense operator that counts, in every product, the distinct storages of length-``n``
    vectors alive in the process (what a Lanczos run holds besides its compact rows) that were
    not alive before the run (``before``)."""

    def __init__(self, matrix, before):
        super().__init__(matrix)
        self.before, self.most = before, 0

    def _matvec(self, v):
        self.most = max(self.most, len(_vector_storages(self.size) - self.before))
        return super()._matvec(v)


def test_the_decision_run_holds_four_vectors_of_the_parameters_size():
    # Float32 with a compact basis, as auto_uba runs it: the two newest rows at full precision,
    # the start vector (its normalised copy: the caller's is let go), the running sum of the
    # batches' products, and nothing else at a product, however many steps the run takes. (Before
    # 2026-12-07 the caller's start, a copy of it in the basis and the last step's unnormalised
    # residual lived on as well.)
    gen = torch.Generator().manual_seed(0)
    n = 67
    q = torch.linalg.qr(torch.randn(n, n, generator=gen))[0]
    mats = [q @ torch.diag(torch.linspace(-1.0, 3.0 + b, n)) @ q.T for b in range(3)]
    gc.collect()
    before = _vector_storages(n)  # whatever earlier tests left behind
    ops = [_Census(m, before) for m in mats]
    found = projected_extremes(
        ops, [1 / 3] * 3, max_iters=12, tol=0.0, generator=gen, budget_steps=None,
        basis_dtype=torch.float16, v0=torch.randn(n, generator=gen),
    )  # fmt: skip
    assert found.decision.reached and all(op.num_matvecs == 12 for op in ops)  # 12 steps run
    assert max(op.most for op in ops) <= 4
