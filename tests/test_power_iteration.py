"""Power iteration (the PyHessian baseline), against operators with known spectra."""

from __future__ import annotations

import pytest
import torch
from _spectra import eigenvector_basis, indefinite, spectrum_operator, well_separated

from uba_auto.lanczos import lanczos
from uba_auto.linear_operator import DenseOperator
from uba_auto.power_iteration import power_iteration


def gap_ratio_spectrum(ratio: float, n: int = 200) -> torch.Tensor:
    """λ1 = 1, λ2 = ratio, the rest spread in [-0.5, 0.9 ratio]."""
    lam = torch.linspace(-0.5, 0.9 * ratio, n, dtype=torch.float64)
    lam[-2], lam[-1] = ratio, 1.0
    return lam


class TestConvergence:
    def test_dominant_positive_eigenvalue(self):
        op = spectrum_operator(well_separated())
        result = power_iteration(op, tol=1e-12, max_iters=500)
        assert result.converged
        assert result.eigenvalue == pytest.approx(10.0, rel=1e-10)
        assert result.residual < 1e-4

    def test_dominant_negative_eigenvalue_keeps_its_sign(self):
        lam = indefinite()  # λ_min = -50 dominates λ_max = 10
        result = power_iteration(spectrum_operator(lam), tol=1e-12, max_iters=500)
        assert result.converged
        assert result.eigenvalue == pytest.approx(-50.0, rel=1e-8)

    def test_eigenvector_aligns_with_the_dominant_one(self):
        lam = well_separated()
        u = eigenvector_basis(lam.numel(), seed=0)
        result = power_iteration(spectrum_operator(lam, seed=0), tol=1e-12, max_iters=500)
        assert torch.dot(result.eigenvector, u[:, -1]).abs() == pytest.approx(1.0, abs=1e-6)
        assert torch.linalg.vector_norm(result.eigenvector) == pytest.approx(1.0, abs=1e-12)

    def test_reported_residual_is_direct(self):
        op = spectrum_operator(gap_ratio_spectrum(0.9))
        result = power_iteration(op, max_iters=7, tol=1e-12)
        v = result.eigenvector
        direct = torch.linalg.vector_norm(op.matrix @ v - result.eigenvalue * v)
        assert float(direct) == pytest.approx(result.residual, rel=1e-10)

    def test_tiny_max_iters_is_not_converged(self):
        result = power_iteration(spectrum_operator(gap_ratio_spectrum(0.99)), max_iters=3)
        assert not result.converged
        assert result.num_iters == 3

    def test_stops_with_pyhessian_relative_change(self):
        result = power_iteration(spectrum_operator(gap_ratio_spectrum(0.5)), tol=1e-3)
        h = result.history
        assert result.converged
        assert abs(h[-1] - h[-2]) / (abs(h[-2]) + 1e-6) < 1e-3
        assert result.num_iters % 5 == 0  # checked every check_every=5 iterations

    def test_check_every_one_stops_at_first_small_change(self):
        result = power_iteration(
            spectrum_operator(gap_ratio_spectrum(0.5)), tol=1e-3, check_every=1
        )
        h = result.history
        change = (h[1:] - h[:-1]).abs() / (h[:-1].abs() + 1e-6)
        assert int(torch.nonzero(change < 1e-3)[0]) + 2 == result.num_iters

    def test_zero_operator_gives_no_nan(self):
        result = power_iteration(DenseOperator(torch.zeros(4, 4, dtype=torch.float64)))
        assert result.eigenvalue == 0.0 and result.converged
        assert torch.isfinite(result.eigenvector).all()

    def test_float32(self):
        op = spectrum_operator(well_separated(), dtype=torch.float32)
        result = power_iteration(op, tol=1e-6, max_iters=300)
        assert result.eigenvector.dtype == torch.float32
        assert result.eigenvalue == pytest.approx(10.0, rel=1e-5)


class TestAgainstLanczos:
    def test_lanczos_needs_far_fewer_products_on_a_small_gap(self):
        # Gap ratio 0.99: power iteration gains a factor 0.99**2 per product in the Rayleigh
        # quotient, Lanczos a factor governed by sqrt(gap / spread).
        op = spectrum_operator(gap_ratio_spectrum(0.99))
        power = power_iteration(op, max_iters=3000, tol=1e-300)
        rel_err = (power.history - 1.0).abs()
        reached = torch.nonzero(rel_err <= 1e-6)
        assert reached.numel() > 0
        power_mv = int(reached[0]) + 1
        result = lanczos(op, which="largest", tol=1e-8)
        assert result.all_converged
        assert abs(result.lambda_max - 1.0) <= 1e-6
        assert result.num_matvecs < power_mv / 2


class TestBookkeeping:
    def test_counts_history_and_reproducibility(self):
        op = spectrum_operator(well_separated())
        a = power_iteration(op, generator=torch.Generator().manual_seed(3))
        assert a.num_matvecs == op.num_matvecs == a.num_iters
        assert a.history.shape == (a.num_iters,) and a.history.dtype == torch.float64
        assert a.history[-1] == a.eigenvalue
        b = power_iteration(op, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a.history, b.history)

    def test_global_rng_untouched(self):
        state = torch.get_rng_state()
        power_iteration(spectrum_operator(well_separated()), max_iters=10)
        assert torch.equal(torch.get_rng_state(), state)

    def test_v0_is_used(self):
        lam = well_separated()
        u = eigenvector_basis(lam.numel(), seed=0)
        # Starting on a non-dominant eigenvector, power iteration stays there.
        result = power_iteration(spectrum_operator(lam, seed=0), v0=u[:, 3], max_iters=10)
        assert result.history[0] == pytest.approx(float(lam[3]), abs=1e-12)


class TestValidation:
    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"max_iters": 0}, ValueError, "max_iters must be >= 1"),
            ({"tol": -1.0}, ValueError, "tol must be finite and > 0"),
            ({"tol": None}, TypeError, "tol must be a real number"),
            ({"v0": torch.zeros(10, dtype=torch.float64)}, ValueError, "nonzero"),
            ({"generator": "seed"}, TypeError, "generator must be a torch.Generator"),
            ({"check_every": 0}, ValueError, "check_every must be >= 1"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match):
        op = spectrum_operator(well_separated(10))
        with pytest.raises(error, match=match):
            power_iteration(op, **kwargs)

    def test_op_must_be_an_operator(self):
        with pytest.raises(TypeError, match="op must be a uba_auto.SymmetricOperator"):
            power_iteration(torch.eye(3))
