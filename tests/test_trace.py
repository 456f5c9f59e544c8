"""Hutchinson and Hutch++ trace estimators, against operators with known traces."""

from __future__ import annotations

import math

import pytest
import torch
from _spectra import indefinite, spectrum_operator

from uba_auto.linear_operator import DenseOperator
from uba_auto.trace import hutchinson_trace, hutchpp_trace


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fast_decay(n: int = 100) -> torch.Tensor:
    return 1.0 / torch.arange(1.0, n + 1.0, dtype=torch.float64) ** 2


class TestHutchinson:
    @pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
    def test_unbiased_over_seeds(self, distribution):
        lam = indefinite(60)
        op = spectrum_operator(lam)
        estimates = torch.tensor(
            [
                hutchinson_trace(
                    op, num_samples=10, generator=seeded(s), distribution=distribution
                ).estimate
                for s in range(300)
            ],
            dtype=torch.float64,
        )
        std_of_mean = estimates.std() / math.sqrt(estimates.numel())
        assert abs(estimates.mean() - lam.sum()) <= 4 * std_of_mean

    def test_std_error_matches_spread_over_seeds(self):
        op = spectrum_operator(indefinite(60))
        runs = [hutchinson_trace(op, num_samples=20, generator=seeded(s)) for s in range(200)]
        spread = torch.tensor([r.estimate for r in runs]).std()
        mean_reported = sum(r.std_error for r in runs) / len(runs)
        assert 0.75 < mean_reported / float(spread) < 1.33

    def test_rademacher_is_exact_on_diagonal(self):
        d = torch.tensor([1.0, -2.0, 5.0, 0.5], dtype=torch.float64)
        est = hutchinson_trace(DenseOperator(torch.diag(d)), num_samples=3)
        assert est.estimate == pytest.approx(4.5, abs=1e-12)
        assert est.std_error == pytest.approx(0.0, abs=1e-12)

    def test_samples_and_counts(self):
        op = spectrum_operator(indefinite(60))
        op.matvec(torch.ones(60, dtype=torch.float64))
        est = hutchinson_trace(op, num_samples=70)  # more than one block
        assert est.method == "hutchinson"
        assert est.num_matvecs == 70 == op.num_matvecs - 1
        assert est.samples.shape == (70,) and est.samples.dtype == torch.float64
        assert est.estimate == pytest.approx(float(est.samples.mean()), rel=1e-12)
        assert est.std_error == pytest.approx(float(est.samples.std()) / math.sqrt(70), rel=1e-12)

    def test_single_sample_has_nan_std_error(self):
        est = hutchinson_trace(spectrum_operator(indefinite(30)), num_samples=1)
        assert math.isnan(est.std_error) and math.isfinite(est.estimate)

    def test_reproducible_and_global_rng_untouched(self):
        op = spectrum_operator(indefinite(30))
        state = torch.get_rng_state()
        a = hutchinson_trace(op, num_samples=5, generator=seeded(1))
        b = hutchinson_trace(op, num_samples=5, generator=seeded(1))
        c = hutchinson_trace(op, num_samples=5)
        d = hutchinson_trace(op, num_samples=5)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(a.samples, b.samples) and torch.equal(c.samples, d.samples)

    def test_float32(self):
        lam = indefinite(60)
        est = hutchinson_trace(spectrum_operator(lam, dtype=torch.float32), num_samples=200)
        assert abs(est.estimate - float(lam.sum())) <= 5 * est.std_error


class TestHutchPlusPlus:
    @pytest.mark.parametrize("rank", [1, 5, 9])
    def test_exact_below_sketch_rank(self, rank):
        lam = torch.zeros(80, dtype=torch.float64)
        lam[:rank] = torch.linspace(-3.0, 7.0, rank, dtype=torch.float64)
        est = hutchpp_trace(spectrum_operator(lam), num_matvecs=30)
        assert est.estimate == pytest.approx(float(lam.sum()), abs=1e-10)
        assert est.low_rank_trace == pytest.approx(float(lam.sum()), abs=1e-10)
        assert est.samples.abs().max() <= 1e-10

    def test_sketch_larger_than_n_is_exact(self):
        lam = torch.linspace(-1.0, 2.0, 5, dtype=torch.float64)
        op = spectrum_operator(lam)
        est = hutchpp_trace(op, num_matvecs=30)
        assert est.estimate == pytest.approx(float(lam.sum()), abs=1e-12)
        assert est.num_matvecs == op.num_matvecs == 30

    @pytest.mark.parametrize("num_matvecs", [3, 10, 30, 31, 100])
    def test_budget_is_respected(self, num_matvecs):
        op = spectrum_operator(fast_decay())
        est = hutchpp_trace(op, num_matvecs=num_matvecs)
        assert est.method == "hutch++"
        assert est.num_matvecs == op.num_matvecs == num_matvecs
        assert est.samples.numel() == num_matvecs - 2 * (num_matvecs // 3)

    def test_lower_variance_than_hutchinson_on_fast_decay(self):
        lam = fast_decay()
        op = spectrum_operator(lam)
        exact = float(lam.sum())
        pp = torch.tensor(
            [hutchpp_trace(op, num_matvecs=30, generator=seeded(s)).estimate for s in range(100)]
        )
        hutch = torch.tensor(
            [hutchinson_trace(op, num_samples=30, generator=seeded(s)).estimate for s in range(100)]
        )
        mse_pp = ((pp - exact) ** 2).mean()
        mse_hutch = ((hutch - exact) ** 2).mean()
        assert mse_pp < mse_hutch / 100
        # Unbiased too: the mean is within a few standard errors of the exact trace.
        assert abs(pp.mean() - exact) <= 4 * pp.std() / 10

    def test_reproducible(self):
        op = spectrum_operator(fast_decay())
        a = hutchpp_trace(op, num_matvecs=12, generator=seeded(4))
        b = hutchpp_trace(op, num_matvecs=12, generator=seeded(4))
        assert a.estimate == b.estimate and torch.equal(a.samples, b.samples)


class TestValidation:
    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"num_samples": 0}, ValueError, "num_samples must be >= 1"),
            ({"num_samples": 2.0}, TypeError, "num_samples must be an int"),
            ({"distribution": "normal"}, ValueError, "distribution must be one of"),
            ({"generator": 1}, TypeError, "generator must be a torch.Generator"),
        ],
    )
    def test_hutchinson_bad_arguments(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            hutchinson_trace(spectrum_operator(fast_decay(10)), **kwargs)

    def test_hutchpp_budget_too_small(self):
        with pytest.raises(ValueError, match="num_matvecs must be >= 3, got 2.*hutchinson_trace"):
            hutchpp_trace(spectrum_operator(fast_decay(10)), num_matvecs=2)

    def test_op_must_be_an_operator(self):
        with pytest.raises(TypeError, match="op must be a uba_auto.SymmetricOperator"):
            hutchpp_trace(torch.eye(3))
