"""Lanczos with full re-orthogonalisation, against operators Q diag(λ) Qᵀ with known spectra."""

from __future__ import annotations

import pytest
import torch
from _spectra import (
    clustered,
    eigenvector_basis,
    indefinite,
    low_rank,
    near_degenerate_top,
    spectrum_operator,
    well_separated,
)

from uba_auto.lanczos import LanczosResult, lanczos
from uba_auto.linear_operator import DenseOperator

SPECTRA = {
    "well_separated": well_separated,
    "clustered": clustered,
    "indefinite": indefinite,
    "near_degenerate_top": near_degenerate_top,
    "low_rank": low_rank,
    "n_below_max_iters": lambda: torch.linspace(-1.0, 2.0, 20, dtype=torch.float64),
}


def direct_residuals(op: DenseOperator, result: LanczosResult) -> torch.Tensor:
    y = result.eigenvectors
    theta = result.eigenvalues.to(y.dtype)
    return torch.linalg.vector_norm(op.matrix @ y - y * theta, dim=0).double()


def distance_to_spectrum(values: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return (values[:, None] - lam[None, :]).abs().min(dim=1).values


class TestAccuracy:
    @pytest.mark.parametrize("name", list(SPECTRA))
    def test_extremes_match_known_spectrum(self, name):
        lam = SPECTRA[name]()
        op = spectrum_operator(lam, seed=1)
        result = lanczos(op)
        scale = lam.abs().max()
        assert result.all_converged
        assert abs(result.lambda_max - lam.max()) <= 1e-8 * scale
        assert abs(result.lambda_min - lam.min()) <= 1e-8 * scale

    @pytest.mark.parametrize("name", list(SPECTRA))
    def test_ritz_values_lie_inside_the_spectrum(self, name):
        lam = SPECTRA[name]()
        result = lanczos(spectrum_operator(lam, seed=2), max_iters=60)
        slack = 1e-12 * lam.abs().max()
        assert result.ritz_values.min() >= lam.min() - slack
        assert result.ritz_values.max() <= lam.max() + slack
        assert torch.all(result.ritz_values[1:] >= result.ritz_values[:-1])

    @pytest.mark.parametrize("k", [1, 3])
    @pytest.mark.parametrize("which", ["largest", "smallest", "both"])
    def test_k_eigenvalues_at_requested_ends(self, which, k):
        lam = well_separated()
        result = lanczos(spectrum_operator(lam), which=which, k=k)
        expected = []
        if which in ("smallest", "both"):
            expected.append(lam[:k])
        if which in ("largest", "both"):
            expected.append(lam[-k:])
        expected = torch.cat(expected)
        assert result.eigenvalues.shape == expected.shape
        torch.testing.assert_close(result.eigenvalues, expected, rtol=0, atol=1e-8 * 10.0)
        assert (result.lambda_max is None) == (which == "smallest")
        assert (result.lambda_min is None) == (which == "largest")

    def test_float32(self):
        lam = well_separated()
        op = spectrum_operator(lam, dtype=torch.float32)
        result = lanczos(op, tol=1e-5)
        assert result.eigenvectors.dtype == torch.float32
        assert result.eigenvalues.dtype == torch.float64
        assert result.all_converged
        assert abs(result.lambda_max - 10.0) <= 1e-5 * 10.0
        assert abs(result.lambda_min + 1.0) <= 1e-5 * 10.0
        torch.testing.assert_close(
            direct_residuals(op, result), result.residuals, rtol=0, atol=1e-5
        )


class TestNoGhosts:
    @pytest.mark.parametrize("name", ["well_separated", "indefinite", "clustered"])
    def test_each_simple_eigenvalue_found_at_most_once(self, name):
        # Run far past convergence of the extremes (k=65 interior pairs cannot converge in 130
        # steps) so that, without full re-orthogonalisation, they would be duplicated.
        lam = SPECTRA[name]()
        result = lanczos(spectrum_operator(lam, seed=3), max_iters=130, k=65)
        assert result.num_iters == 130
        ritz = result.ritz_values
        gaps = torch.cat([lam[1:] - lam[:-1], torch.tensor([torch.inf], dtype=lam.dtype)])
        gaps = torch.minimum(gaps, torch.cat([gaps.new_tensor([torch.inf]), gaps[:-1]]))
        simple = gaps > 1e-6
        counts = ((ritz[None, :] - lam[simple][:, None]).abs() <= 1e-8).sum(dim=1)
        assert counts.max() <= 1
        # The extremes are surely converged after 130 steps: exactly one copy each.
        assert counts[0] == 1 and counts[-1] == 1

    def test_basis_stays_orthonormal(self):
        lam = clustered()
        op = spectrum_operator(lam)
        result = lanczos(op, which="largest", k=5, max_iters=100, tol=1e-30)
        y = result.eigenvectors
        torch.testing.assert_close(y.T @ y, torch.eye(5, dtype=y.dtype), rtol=0, atol=1e-10)


class TestResiduals:
    @pytest.mark.parametrize("max_iters", [6, 25, 100])
    @pytest.mark.parametrize("name", ["well_separated", "indefinite", "near_degenerate_top"])
    def test_reported_residual_equals_direct_residual(self, name, max_iters):
        lam = SPECTRA[name]()
        op = spectrum_operator(lam)
        result = lanczos(op, max_iters=max_iters, k=3)
        direct = direct_residuals(op, result)
        scale = float(lam.abs().max())
        torch.testing.assert_close(direct, result.residuals, rtol=1e-6, atol=1e-12 * scale)

    @pytest.mark.parametrize("max_iters", [2, 4, 8])
    def test_converged_flags_are_honest(self, max_iters):
        lam = well_separated()
        result = lanczos(spectrum_operator(lam), max_iters=max_iters)
        assert not result.all_converged
        assert not result.converged.any()
        assert result.num_iters == max_iters
        # Whatever the flags say, the residual bounds the distance to the spectrum.
        err = distance_to_spectrum(result.eigenvalues, lam)
        assert torch.all(err <= result.residuals * (1 + 1e-8) + 1e-12)

    def test_converged_means_residual_below_relative_tol(self):
        lam = indefinite()
        result = lanczos(spectrum_operator(lam), tol=1e-6)
        assert result.all_converged
        assert torch.all(result.residuals <= 1e-6 * result.ritz_values.abs().max())


def dense_ritz_pairs(op: DenseOperator, v0: torch.Tensor, m: int):
    """Rayleigh-Ritz on K_m(A, v0) from a QR of the Krylov matrix, independent of the solver."""
    cols = [v0 / torch.linalg.vector_norm(v0)]
    for _ in range(m - 1):
        w = op.matrix @ cols[-1]
        cols.append(w / torch.linalg.vector_norm(w))
    q, _ = torch.linalg.qr(torch.stack(cols, dim=1))
    theta, s = torch.linalg.eigh(q.T @ op.matrix @ q)
    y = q @ s
    return theta, torch.linalg.vector_norm(op.matrix @ y - y * theta, dim=0)


class TestRitzResiduals:
    """``ritz_residuals``: the residual of every Ritz value, so no caller solves T_m again."""

    @pytest.mark.parametrize("m", [4, 6, 8])
    @pytest.mark.parametrize("name", ["well_separated", "indefinite"])
    def test_every_ritz_residual_matches_dense_rayleigh_ritz(self, name, m):
        lam = SPECTRA[name]()
        op = spectrum_operator(lam, seed=4)
        v0 = torch.randn(op.size, generator=torch.Generator().manual_seed(5), dtype=lam.dtype)
        result = lanczos(op, max_iters=m, tol=1e-30, v0=v0)
        theta, residual = dense_ritz_pairs(op, v0, m)
        scale = float(lam.abs().max())
        assert result.num_iters == m
        torch.testing.assert_close(result.ritz_values, theta, rtol=0, atol=1e-9 * scale)
        torch.testing.assert_close(result.ritz_residuals, residual, rtol=1e-6, atol=1e-9 * scale)

    @pytest.mark.parametrize("max_iters", [10, 40])
    @pytest.mark.parametrize("name", ["well_separated", "clustered", "low_rank"])
    def test_every_ritz_residual_equals_direct_residual(self, name, max_iters):
        # k = max_iters asks for every Ritz pair, so the eigenvectors cover all of ritz_values.
        lam = SPECTRA[name]()
        op = spectrum_operator(lam, seed=6)
        result = lanczos(op, max_iters=max_iters, which="largest", k=max_iters, tol=1e-30)
        assert torch.equal(result.eigenvalues, result.ritz_values)
        direct = direct_residuals(op, result)
        scale = float(lam.abs().max())
        torch.testing.assert_close(result.ritz_residuals, direct, rtol=1e-6, atol=1e-12 * scale)

    @pytest.mark.parametrize("which", ["largest", "smallest", "both"])
    def test_residuals_are_ritz_residuals_of_the_requested_values(self, which):
        result = lanczos(spectrum_operator(well_separated()), which=which, k=3, max_iters=40)
        rr, k = result.ritz_residuals, 3
        low = [rr[:k]] if which != "largest" else []
        high = [rr[-k:]] if which != "smallest" else []
        assert torch.equal(result.residuals, torch.cat(low + high))

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_float64_cpu_one_per_ritz_value(self, dtype):
        result = lanczos(spectrum_operator(indefinite(), dtype=dtype), tol=1e-5, max_iters=30)
        rr = result.ritz_residuals
        assert rr.dtype == torch.float64 and rr.device.type == "cpu"
        assert rr.shape == result.ritz_values.shape == (result.num_iters,)
        assert torch.all(rr >= 0)

    def test_smallest_positive_ritz_value_and_its_residual(self):
        # What the probe reads: the residual bounds the distance of that Ritz value to the spectrum.
        lam = indefinite()
        op = spectrum_operator(lam, seed=7)
        result = lanczos(op, max_iters=40, tol=1e-30)
        i = int(torch.nonzero(result.ritz_values > 0)[0])
        theta, residual = result.ritz_values[i : i + 1], result.ritz_residuals[i : i + 1]
        assert bool(distance_to_spectrum(theta, lam) <= residual * (1 + 1e-8) + 1e-12)


class TestBreakdown:
    def test_low_rank_stops_early_with_exact_values(self):
        lam = low_rank()
        op = spectrum_operator(lam)
        result = lanczos(op, which="both", k=2)
        # Krylov space: the three eigenvectors plus the start's null-space component (4-D in
        # exact arithmetic); the run stops at the first check after that.
        assert result.num_iters <= 5
        assert result.all_converged
        assert result.num_matvecs == op.num_matvecs
        ritz = result.ritz_values
        for value in (-2.0, 1.0, 5.0):
            assert int(((ritz - value).abs() <= 1e-12).sum()) == 1
        nonzero = ((ritz[:, None] - lam.new_tensor([-2.0, 1.0, 5.0])).abs() <= 1e-12).any(dim=1)
        assert ritz[~nonzero].abs().max() <= 1e-12

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    @pytest.mark.parametrize("rotated", [False, True])
    def test_few_distinct_eigenvalues_break_down(self, dtype, rotated):
        # Three distinct eigenvalues: the Krylov space is 3-D whatever n is.
        lam = torch.tensor([-1.0] * 10 + [2.0] * 30 + [5.0] * 10, dtype=torch.float64)
        if rotated:
            op = spectrum_operator(lam, dtype=dtype)
        else:
            op = DenseOperator(torch.diag(lam).to(dtype))
        tol = 1e-5 if dtype == torch.float32 else 1e-8
        result = lanczos(op, tol=tol)
        assert result.breakdown and result.num_iters == 3 and result.all_converged
        atol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(result.ritz_values, lam.unique(), rtol=0, atol=atol * 5.0)
        # The products after the breakdown, up to the next periodic check, are counted honestly.
        assert result.num_matvecs == op.num_matvecs == 5

    def test_max_iters_capped_at_n(self):
        lam = SPECTRA["n_below_max_iters"]()
        op = spectrum_operator(lam)
        result = lanczos(op, max_iters=100, tol=1e-30)
        assert result.num_iters <= 20
        assert op.num_matvecs <= 20
        torch.testing.assert_close(result.ritz_values, lam, rtol=0, atol=1e-12)

    @pytest.mark.parametrize("n", [1, 2])
    def test_tiny_n(self, n):
        lam = torch.arange(1.0, n + 1.0, dtype=torch.float64) * 3.0
        result = lanczos(spectrum_operator(lam))
        assert result.lambda_max == pytest.approx(float(lam.max()), abs=1e-12)
        assert result.lambda_min == pytest.approx(float(lam.min()), abs=1e-12)
        assert result.num_iters == n
        assert result.eigenvalues.numel() == n  # the two ends overlap
        assert result.all_converged

    def test_zero_operator(self):
        op = DenseOperator(torch.zeros(5, 5, dtype=torch.float64))
        result = lanczos(op)
        assert result.breakdown and result.all_converged
        assert result.lambda_max == 0.0 and result.lambda_min == 0.0
        assert torch.isfinite(result.eigenvectors).all()

    def test_v0_in_invariant_subspace(self):
        # Starting in the span of two eigenvectors, the Krylov space is 2-D and exact.
        lam = well_separated()
        u = eigenvector_basis(lam.numel(), seed=0)
        v0 = u[:, 10] + 2.0 * u[:, -1]
        result = lanczos(spectrum_operator(lam, seed=0), v0=v0)
        assert result.breakdown and result.num_iters == 2
        torch.testing.assert_close(
            result.ritz_values, torch.stack([lam[10], lam[-1]]), rtol=0, atol=1e-12
        )


class TestBookkeeping:
    def test_num_matvecs_matches_operator_counter(self):
        op = spectrum_operator(indefinite())
        op.matvec(torch.ones(op.size, dtype=op.dtype))  # earlier work is not attributed
        result = lanczos(op)
        assert result.num_matvecs == op.num_matvecs - 1
        assert result.num_iters <= result.num_matvecs
        assert result.alpha.shape == result.beta.shape == (result.num_iters,)
        assert result.ritz_values.shape == (result.num_iters,)

    def test_reproducible_with_same_seed(self):
        op = spectrum_operator(clustered())
        a = lanczos(op, generator=torch.Generator().manual_seed(7), max_iters=20)
        b = lanczos(op, generator=torch.Generator().manual_seed(7), max_iters=20)
        c = lanczos(op, generator=torch.Generator().manual_seed(8), max_iters=20)
        assert torch.equal(a.alpha, b.alpha) and torch.equal(a.beta, b.beta)
        assert not torch.equal(a.alpha, c.alpha)

    def test_default_generator_is_deterministic_and_leaves_global_rng_alone(self):
        op = spectrum_operator(clustered())
        state = torch.get_rng_state()
        a = lanczos(op, max_iters=10)
        assert torch.equal(torch.get_rng_state(), state)
        b = lanczos(op, max_iters=10)
        assert torch.equal(a.alpha, b.alpha)

    def test_v0_is_used(self):
        lam = well_separated()
        u = eigenvector_basis(lam.numel(), seed=0)
        result = lanczos(spectrum_operator(lam, seed=0), v0=u[:, -1] * 3.0, which="largest")
        assert result.num_iters == 1 and result.breakdown
        assert result.lambda_max == pytest.approx(10.0, abs=1e-12)
        cosine = torch.dot(result.eigenvectors[:, 0], u[:, -1]).abs()
        assert cosine == pytest.approx(1.0, abs=1e-12)

    def test_basis_on_another_device_gives_same_result(self):
        op = spectrum_operator(indefinite())
        a = lanczos(op, max_iters=30)
        b = lanczos(op, max_iters=30, basis_device="cpu")
        torch.testing.assert_close(a.alpha, b.alpha)
        assert b.eigenvectors.device == op.device

    def test_check_every_only_changes_when_it_stops(self):
        op = spectrum_operator(well_separated())
        every = lanczos(op, check_every=1)
        sparse = lanczos(op, check_every=7)
        assert every.num_iters <= sparse.num_iters < every.num_iters + 7
        torch.testing.assert_close(every.alpha, sparse.alpha[: every.num_iters])


class TestValidation:
    @pytest.fixture
    def op(self):
        return spectrum_operator(well_separated(20))

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"max_iters": 0}, ValueError, "max_iters must be >= 1, got 0"),
            ({"max_iters": 2.5}, TypeError, "max_iters must be an int"),
            ({"max_iters": True}, TypeError, "max_iters must be an int"),
            ({"tol": 0.0}, ValueError, "tol must be finite and > 0"),
            ({"tol": float("nan")}, ValueError, "tol must be finite and > 0"),
            ({"tol": "1e-8"}, TypeError, "tol must be a real number"),
            ({"which": "top"}, ValueError, "which must be one of"),
            ({"k": 0}, ValueError, "k must be >= 1"),
            ({"k": 3, "max_iters": 5}, ValueError, r"max_iters=5 is too small for k=3.*>= 6"),
            ({"k": 6, "max_iters": 5, "which": "largest"}, ValueError, "too small for k=6"),
            ({"v0": torch.zeros(20, dtype=torch.float64)}, ValueError, "finite and nonzero"),
            ({"v0": torch.ones(19, dtype=torch.float64)}, ValueError, r"shape \(20,\)"),
            ({"v0": torch.ones(20)}, ValueError, "v0 must be torch.float64"),
            ({"v0": [1.0] * 20}, TypeError, "v0 must be a torch.Tensor"),
            ({"generator": 0}, TypeError, "generator must be a torch.Generator"),
            ({"basis_device": "nodevice"}, ValueError, "basis_device must be"),
            ({"check_every": 0}, ValueError, "check_every must be >= 1"),
        ],
    )
    def test_bad_arguments(self, op, kwargs, error, match):
        with pytest.raises(error, match=match):
            lanczos(op, **kwargs)

    def test_op_must_be_an_operator(self):
        with pytest.raises(TypeError, match="op must be a uba_auto.SymmetricOperator"):
            lanczos(torch.eye(3))

    def test_non_finite_operator_is_reported(self):
        op = DenseOperator(
            torch.full((4, 4), float("nan"), dtype=torch.float64), check_symmetric=False
        )
        with pytest.raises(ValueError, match="non-finite values at Lanczos step 1"):
            lanczos(op)
