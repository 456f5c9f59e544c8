"""Stochastic Lanczos quadrature, against operators with known spectra."""

from __future__ import annotations

import math

import pytest
import torch
from _spectra import low_rank, spectrum_operator

from uba_auto.linear_operator import DenseOperator
from uba_auto.slq import SpectralDensity, slq_density


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def thirty_percent_negative(n: int = 200) -> torch.Tensor:
    """60 of 200 eigenvalues in [-1, -0.1], the rest in [0.1, 2]."""
    neg = torch.linspace(-1.0, -0.1, int(0.3 * n), dtype=torch.float64)
    pos = torch.linspace(0.1, 2.0, n - neg.numel(), dtype=torch.float64)
    return torch.cat([neg, pos])


@pytest.fixture(scope="module")
def lam():
    return thirty_percent_negative()


@pytest.fixture(scope="module")
def density(lam):
    return slq_density(spectrum_operator(lam), num_probes=30, num_iters=30, generator=seeded(0))


class TestQuadratureRules:
    def test_shapes_and_weights(self, density):
        assert density.nodes.shape == density.weights.shape == (30, 30)
        assert density.nodes.dtype == density.weights.dtype == torch.float64
        assert torch.all(density.weights >= 0)
        torch.testing.assert_close(
            density.weights.sum(dim=1), torch.ones(30, dtype=torch.float64), rtol=0, atol=1e-12
        )
        assert torch.equal(density.num_nodes, torch.full((30,), 30))

    def test_nodes_inside_spectrum(self, density, lam):
        assert density.nodes.min() >= lam.min() - 1e-12
        assert density.nodes.max() <= lam.max() + 1e-12
        # Each probe's extreme nodes approach the extreme eigenvalues (the spectrum is evenly
        # spaced, the hardest case for Lanczos, so 30 steps resolve them only roughly).
        assert density.nodes[:, 0].sub(lam.min()).abs().max() < 0.05
        assert density.nodes[:, -1].sub(lam.max()).abs().max() < 0.05

    def test_num_matvecs(self, lam):
        op = spectrum_operator(lam)
        sd = slq_density(op, num_probes=3, num_iters=7)
        assert sd.num_matvecs == op.num_matvecs == 21
        assert sd.size == lam.numel()

    def test_reproducible_and_global_rng_untouched(self, lam):
        op = spectrum_operator(lam)
        state = torch.get_rng_state()
        a = slq_density(op, num_probes=2, num_iters=5)
        b = slq_density(op, num_probes=2, num_iters=5)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)

    def test_breakdown_pads_and_gives_exact_weights(self):
        # Three distinct eigenvalues with multiplicities 10, 30, 10 on the diagonal: each probe's
        # Krylov space is 3-D and, for sign vectors, the Gauss rule is the exact distribution.
        lam = torch.tensor([-1.0] * 10 + [2.0] * 30 + [5.0] * 10, dtype=torch.float64)
        op = DenseOperator(torch.diag(lam))
        sd = slq_density(op, num_probes=3, num_iters=20)
        assert torch.equal(sd.num_nodes, torch.full((3,), 3))
        assert sd.nodes.shape == (3, 20)
        expected = torch.tensor([[-1.0, 2.0, 5.0]] * 3, dtype=torch.float64)
        torch.testing.assert_close(sd.nodes[:, :3], expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(
            sd.weights[:, :3], torch.tensor([[0.2, 0.6, 0.2]] * 3, dtype=torch.float64)
        )
        # Padding: weight zero, nodes copies of the largest real node.
        assert torch.all(sd.weights[:, 3:] == 0)
        assert torch.all(sd.nodes[:, 3:] == sd.nodes[:, 2:3])
        # The run stopped at the first periodic check after the breakdown.
        assert sd.num_matvecs == op.num_matvecs == 3 * 5
        assert sd.negative_mass() == pytest.approx(0.2, abs=1e-12)
        assert sd.quantile(0.5) == pytest.approx(2.0, abs=1e-12)

    def test_low_rank(self):
        lam = low_rank()
        sd = slq_density(spectrum_operator(lam), num_probes=20, num_iters=20)
        assert sd.nodes.min() >= -2.0 - 1e-12 and sd.nodes.max() <= 5.0 + 1e-12
        torch.testing.assert_close(
            sd.weights.sum(dim=1), torch.ones(20, dtype=torch.float64), rtol=0, atol=1e-12
        )
        # 47 of 50 eigenvalues are zero; 1 of 50 is negative.
        assert sd.negative_mass(threshold=1e-8) == pytest.approx(1 / 50, abs=0.05)
        assert sd.quantile(0.5) == pytest.approx(0.0, abs=1e-10)
        assert sd.trace_estimate == pytest.approx(4.0, abs=4 * sd.trace_std_error)

    def test_num_iters_capped_at_n(self):
        lam = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
        sd = slq_density(spectrum_operator(lam), num_probes=2, num_iters=50)
        assert sd.nodes.shape == (2, 8)
        torch.testing.assert_close(sd.nodes, lam.expand(2, 8), rtol=0, atol=1e-10)


class TestMoments:
    def test_trace_estimate_unbiased(self, density, lam):
        assert abs(density.trace_estimate - float(lam.sum())) <= 4 * density.trace_std_error

    def test_first_moment_is_hutchinson_exactly(self):
        # On a diagonal matrix z^T D z / n = tr(D) / n for every sign vector z.
        d = torch.tensor([-1.0, 0.5, 2.0, 3.0, 4.0], dtype=torch.float64)
        sd = slq_density(DenseOperator(torch.diag(d)), num_probes=3, num_iters=3)
        assert sd.trace_estimate == pytest.approx(float(d.sum()), abs=1e-12)

    def test_second_moment_matches_frobenius_norm(self, density, lam):
        # Gauss quadrature is exact for θ², so n E[Σ w θ²] = tr(A²).
        per_probe = lam.numel() * (density.weights * density.nodes**2).sum(dim=1)
        std_of_mean = per_probe.std() / math.sqrt(per_probe.numel())
        assert abs(per_probe.mean() - (lam**2).sum()) <= 4 * std_of_mean

    def test_trace_unbiased_over_seeds(self, lam):
        op = spectrum_operator(lam)
        estimates = torch.tensor(
            [
                slq_density(op, num_probes=1, num_iters=3, generator=seeded(s)).trace_estimate
                for s in range(100)
            ]
        )
        assert abs(estimates.mean() - lam.sum()) <= 4 * estimates.std() / 10


class TestSpectralQueries:
    def test_negative_mass(self, density):
        assert density.negative_mass() == pytest.approx(0.3, abs=0.05)
        assert density.negative_mass(threshold=0.05) == pytest.approx(0.3, abs=0.05)
        assert density.negative_mass(threshold=5.0) == 0.0

    def test_density_integrates_to_one(self, density):
        grid = torch.linspace(-2.0, 3.0, 4001, dtype=torch.float64)
        for sigma in (None, 0.05):
            values = density.density(grid, sigma=sigma)
            assert values.shape == grid.shape and torch.all(values >= 0)
            assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-3)

    def test_density_mass_on_negative_side(self, density):
        grid = torch.linspace(-2.0, 0.0, 2001, dtype=torch.float64)
        mass = float(torch.trapezoid(density.density(grid, sigma=0.02), grid))
        assert mass == pytest.approx(0.3, abs=0.05)

    def test_default_sigma(self, density):
        spread = float(density.nodes.max() - density.nodes.min())
        assert density.default_sigma() == pytest.approx(0.01 * spread)

    def test_quantiles(self, density, lam):
        assert density.quantile(0.0) == float(density.nodes.min())
        assert density.quantile(1.0) == float(density.nodes.max())
        assert density.quantile(0.0) == pytest.approx(float(lam.min()), abs=1e-3)
        assert density.quantile(1.0) == pytest.approx(float(lam.max()), abs=1e-3)
        assert density.quantile(0.5) == pytest.approx(float(lam.median()), abs=0.15)
        assert density.quantile(0.25) <= density.quantile(0.5) <= density.quantile(0.75)
        # The 30% point sits in the gap between the negative and positive parts.
        assert density.quantile(0.2) < 0 < density.quantile(0.4)

    def test_point_mass(self):
        sd = SpectralDensity(
            nodes=torch.tensor([[2.0, 2.0]], dtype=torch.float64),
            weights=torch.tensor([[1.0, 0.0]], dtype=torch.float64),
            num_matvecs=0,
            size=3,
            num_nodes=torch.tensor([1]),
        )
        assert sd.default_sigma() == pytest.approx(0.02)
        assert sd.quantile(0.5) == 2.0
        assert sd.trace_estimate == pytest.approx(6.0)
        assert math.isnan(sd.trace_std_error)


class TestValidation:
    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"num_probes": 0}, ValueError, "num_probes must be >= 1"),
            ({"num_iters": 0}, ValueError, "num_iters must be >= 1"),
            ({"num_iters": 1.5}, TypeError, "num_iters must be an int"),
            ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
            ({"basis_device": 3.5}, ValueError, "basis_device must be"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            slq_density(spectrum_operator(low_rank(10)), **kwargs)

    def test_bad_query_arguments(self, density):
        with pytest.raises(ValueError, match="q must lie in"):
            density.quantile(1.5)
        with pytest.raises(TypeError, match="q must be a real number"):
            density.quantile("median")
        with pytest.raises(ValueError, match="threshold must be finite and >= 0"):
            density.negative_mass(threshold=-0.1)
        with pytest.raises(ValueError, match="sigma must be finite and > 0"):
            density.density(torch.zeros(3, dtype=torch.float64), sigma=0.0)
        with pytest.raises(ValueError, match="grid must be a 1-D floating-point tensor"):
            density.density(torch.zeros(3, 3))
