"""The pure schedules against closed forms, PyTorch's own schedulers and PAPER.md's tan form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uba_auto import schedules as S
from uba_auto.schedules import (
    SCHEDULES,
    constant_lr,
    cosine_lr,
    get_schedule,
    linear_lr,
    onecycle_lr,
    rex_lr,
    step_lr,
    uba_factor,
    uba_lr,
    wsd_lr,
)

PHIS = [1e-3, 0.25, 0.5, 1.0, 2.0, 4.0, 16.0, 1e3]


def uba_u_form(t: float, T: int, phi: float, lr_max: float, lr_min: float) -> float:
    """PAPER.md's form: eta_min + (eta_max - eta_min) 2u / (2 phi + (2 - phi) u)."""
    u = 1.0 + math.cos(math.pi * t / T)
    return lr_min + (lr_max - lr_min) * 2.0 * u / (2.0 * phi + (2.0 - phi) * u)


class TestUBAClosedForm:
    @pytest.mark.parametrize("phi", PHIS)
    @pytest.mark.parametrize("t", [1, 10, 25, 50, 73, 99])
    def test_matches_paper_u_form(self, phi, t):
        got = uba_lr(t, 100, phi=phi, lr_max=0.3, lr_min=0.01)
        assert got == pytest.approx(uba_u_form(t, 100, phi, 0.3, 0.01), rel=1e-12)

    @pytest.mark.parametrize("phi", PHIS)
    def test_midpoint_fraction(self, phi):
        # PAPER.md: at s = 1/2 the remaining fraction is 2 / (2 + phi).
        assert uba_lr(500, 1000, phi=phi, lr_max=1.0) == pytest.approx(2 / (2 + phi), rel=1e-12)

    @pytest.mark.parametrize("phi", PHIS)
    @pytest.mark.parametrize("lr_max,lr_min", [(0.1, 0.0), (0.3, 0.1), (1.0, 1e-4), (0.7, 0.7)])
    def test_endpoints_exact(self, phi, lr_max, lr_min):
        assert uba_lr(0, 37, phi=phi, lr_max=lr_max, lr_min=lr_min) == lr_max
        assert uba_lr(37, 37, phi=phi, lr_max=lr_max, lr_min=lr_min) == lr_min
        # With warm-up, the peak is reached exactly at the end of the warm-up.
        kw = dict(phi=phi, lr_max=lr_max, lr_min=lr_min, warmup_steps=5, warmup_start_lr=0.0)
        assert uba_lr(5, 37, **kw) == lr_max
        assert uba_lr(37, 37, **kw) == lr_min

    @pytest.mark.parametrize("phi", PHIS)
    def test_holds_lr_min_past_total(self, phi):
        steps = np.arange(100, 400)
        out = uba_lr(steps, 100, phi=phi, lr_max=0.5, lr_min=0.02)
        assert np.all(out == 0.02)

    @pytest.mark.parametrize("phi", PHIS)
    @pytest.mark.parametrize("T", [1, 2, 7, 100, 10_000])
    def test_monotone_non_increasing_after_warmup(self, phi, T):
        W = T // 10 if T > 10 else 0
        lr = uba_lr(np.arange(W, T + 5), T, phi=phi, lr_max=1.0, lr_min=1e-3, warmup_steps=W)
        assert np.all(np.diff(lr) <= 0.0)

    def test_phi_two_is_cosine(self):
        t = np.arange(0, 1001)
        a = uba_lr(t, 1000, phi=2.0, lr_max=0.4, lr_min=0.004)
        b = cosine_lr(t, 1000, lr_max=0.4, lr_min=0.004)
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=0)

    def test_small_phi_stays_high_and_large_phi_decays_early(self):
        # PAPER.md: phi -> 0 is constant then a drop; phi -> inf an immediate drop.
        assert uba_lr(90, 100, phi=1e-2, lr_max=1.0) > 0.8
        assert uba_lr(10, 100, phi=1e3, lr_max=1.0) < 0.1
        # Order at any interior point: larger phi, lower rate.
        rates = [uba_lr(40, 100, phi=p, lr_max=1.0) for p in PHIS]
        assert rates == sorted(rates, reverse=True)

    def test_warmup_is_linear(self):
        kw = dict(phi=4.0, lr_max=1.0, warmup_steps=10, warmup_start_lr=0.1)
        got = uba_lr(np.arange(11), 100, **kw)
        np.testing.assert_allclose(got, np.linspace(0.1, 1.0, 11), rtol=1e-14)
        assert uba_lr(0, 100, **kw) == 0.1

    def test_factor_is_the_normalised_curve(self):
        s = np.linspace(0, 1, 51)
        np.testing.assert_allclose(
            uba_factor(s, 3.0), uba_lr(s * 50, 50, phi=3.0, lr_max=1.0), rtol=1e-14
        )
        assert uba_factor(0.0, 3.0) == 1.0 and uba_factor(1.0, 3.0) == 0.0
        assert uba_factor(7.0, 3.0) == 0.0  # progress past 1 is clipped


class TestTanForm:
    @settings(max_examples=300, deadline=None)
    @given(
        phi=st.floats(min_value=1e-3, max_value=1e3),
        T=st.integers(min_value=1, max_value=100_000),
        s=st.floats(min_value=0.0, max_value=0.999),
    )
    def test_tan_form_agrees(self, phi, T, s):
        t = s * T
        tan2 = math.tan(math.pi * s / 2) ** 2
        expected = 0.01 + (0.5 - 0.01) / (1 + (phi / 2) * tan2)
        got = uba_lr(t, T, phi=phi, lr_max=0.5, lr_min=0.01)
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-15)

    @settings(max_examples=200, deadline=None)
    @given(
        phi=st.floats(min_value=1e-3, max_value=1e3),
        s=st.floats(min_value=0.0, max_value=0.99),
    )
    def test_u_form_agrees(self, phi, s):
        # Away from s = 1 the u-form of PAPER.md has no cancellation trouble.
        assert uba_factor(s, phi) == pytest.approx(
            uba_u_form(s, 1, phi, 1.0, 0.0), rel=1e-10, abs=1e-15
        )


class TestVectorised:
    @pytest.mark.parametrize("name", sorted(SCHEDULES))
    def test_numpy_and_torch_equal_scalar(self, name):
        fn = get_schedule(name)
        kw = dict(lr_max=0.3, lr_min=0.003, warmup_steps=7, warmup_start_lr=0.01)
        if name == "uba":
            kw["phi"] = 0.7
        steps = list(range(0, 130))
        scalar = np.array([fn(t, 120, **kw) for t in steps])
        as_np = fn(np.array(steps), 120, **kw)
        as_torch = fn(torch.tensor(steps), 120, **kw)
        assert isinstance(fn(3, 120, **kw), float)
        assert isinstance(as_np, np.ndarray) and as_np.dtype == np.float64
        assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float64
        np.testing.assert_array_equal(as_np, scalar)
        np.testing.assert_allclose(as_torch.numpy(), scalar, rtol=1e-15, atol=0)

    def test_array_shape_kept(self):
        steps = np.arange(12).reshape(3, 4)
        assert uba_lr(steps, 20, phi=1.0, lr_max=1.0).shape == (3, 4)


class TestAgainstTorchSchedulers:
    def _torch_rates(self, make, n, lr=0.4):
        p = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([p], lr=lr)
        sched = make(opt)
        rates = []
        for _ in range(n):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return np.array(rates)

    def test_cosine_equals_cosine_annealing_lr(self):
        T = 200
        ref = self._torch_rates(
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=T, eta_min=0.004), T + 1
        )
        ours = cosine_lr(np.arange(T + 1), T, lr_max=0.4, lr_min=0.004)
        uba2 = uba_lr(np.arange(T + 1), T, phi=2.0, lr_max=0.4, lr_min=0.004)
        # torch's recursive form accumulates rounding; both agree to ~1e-13 relative.
        np.testing.assert_allclose(ours, ref, rtol=1e-11, atol=1e-15)
        np.testing.assert_allclose(uba2, ref, rtol=1e-11, atol=1e-15)

    def test_linear_equals_linear_lr(self):
        T = 50
        ref = self._torch_rates(
            lambda o: torch.optim.lr_scheduler.LinearLR(
                o, start_factor=1.0, end_factor=0.0, total_iters=T
            ),
            T + 1,
        )
        np.testing.assert_allclose(
            linear_lr(np.arange(T + 1), T, lr_max=0.4), ref, rtol=1e-12, atol=1e-15
        )

    def test_step_equals_multistep_lr(self):
        T = 100
        ref = self._torch_rates(
            lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[50, 75], gamma=0.1),
            T + 1,
        )
        ours = step_lr(np.arange(T + 1), T, lr_max=0.4, milestones=(0.5, 0.75), gamma=0.1)
        np.testing.assert_allclose(ours, ref, rtol=1e-12)


class TestBaselines:
    @pytest.mark.parametrize("name", sorted(SCHEDULES))
    def test_common_signature_and_peak(self, name):
        fn = get_schedule(name)
        extra = {"phi": 1.0} if name == "uba" else {}
        kw = dict(lr_max=0.2, lr_min=0.002, warmup_steps=10, warmup_start_lr=0.0, **extra)
        assert fn(10, 100, **kw) == 0.2
        lr = fn(np.arange(10, 200), 100, **kw)
        assert np.all(np.diff(lr) <= 0) and np.all(lr >= 0.002)

    @pytest.mark.parametrize("name", ["uba", "cosine", "linear", "wsd", "rex", "onecycle"])
    def test_annealing_schedules_end_at_lr_min(self, name):
        extra = {"phi": 5.0} if name == "uba" else {}
        assert get_schedule(name)(100, 100, lr_max=0.2, lr_min=0.002, **extra) == 0.002

    def test_constant(self):
        assert np.all(constant_lr(np.arange(0, 50), 30, lr_max=0.3) == 0.3)
        assert constant_lr(2, 30, lr_max=0.3, warmup_steps=4) == pytest.approx(0.15)

    def test_linear_values(self):
        assert linear_lr(30, 40, lr_max=1.0, lr_min=0.2, warmup_steps=20) == pytest.approx(0.6)

    def test_step_values(self):
        kw = dict(lr_max=1.0, lr_min=0.0, milestones=(0.25, 0.5), gamma=0.5)
        got = step_lr(np.array([0, 24, 25, 49, 50, 100, 150]), 100, **kw)
        np.testing.assert_allclose(got, [1, 1, 0.5, 0.5, 0.25, 0.25, 0.25])

    def test_wsd_values(self):
        kw = dict(lr_max=1.0, lr_min=0.0, warmup_steps=10, decay_fraction=0.5)
        # Decay phase steps 10..110; stable until s = 0.5 (step 60), then linear to 0 at 110.
        got = wsd_lr(np.array([10, 59, 60, 85, 110]), 110, **kw)
        np.testing.assert_allclose(got, [1, 1, 1, 0.5, 0])
        cos = wsd_lr(85, 110, decay_shape="cosine", **kw)
        sqrt = wsd_lr(85, 110, decay_shape="1-sqrt", **kw)
        assert cos == pytest.approx(0.5) and sqrt == pytest.approx(1 - math.sqrt(0.5))

    def test_rex_values(self):
        for s in [0.1, 0.3, 0.9]:
            t = round(s * 100)
            expected = (1 - t / 100) / (0.5 + 0.5 * (1 - t / 100))
            assert rex_lr(t, 100, lr_max=1.0) == pytest.approx(expected, rel=1e-12)
        assert rex_lr(40, 100, lr_max=1.0, beta=0.0) == pytest.approx(0.6)

    def test_onecycle_values(self):
        # Cosine rise from lr_max / 25 over 30 steps, then cosine down to lr_min at 100.
        assert onecycle_lr(15, 100, lr_max=1.0) == pytest.approx(0.04 + 0.96 * 0.5)
        assert onecycle_lr(65, 100, lr_max=1.0, lr_min=0.0) == pytest.approx(0.5)
        assert onecycle_lr(5, 20, lr_max=1.0, warmup_steps=10, warmup_start_lr=0.2) == (
            pytest.approx(0.6)
        )

    def test_unknown_name_lists_valid_ones(self):
        with pytest.raises(ValueError, match=r"unknown schedule 'cosin'.*'cosine'.*'uba'"):
            get_schedule("cosin")


class TestBadInput:
    @pytest.mark.parametrize("phi", [0.0, -1.0, float("nan"), float("inf"), -float("inf")])
    def test_phi(self, phi):
        with pytest.raises(ValueError, match=r"phi must be finite and > 0, got"):
            uba_lr(1, 10, phi=phi, lr_max=0.1)

    def test_phi_type(self):
        with pytest.raises(TypeError, match="phi must be a real number"):
            uba_lr(1, 10, phi="2", lr_max=0.1)

    @pytest.mark.parametrize("T,W", [(10, 10), (10, 11), (0, 0)])
    def test_total_le_warmup(self, T, W):
        with pytest.raises(ValueError, match=r"total_steps must be (> warmup_steps|>= 1)"):
            uba_lr(1, T, phi=1.0, lr_max=0.1, warmup_steps=W)

    @pytest.mark.parametrize("step", [-1, -0.5, np.array([0, 3, -2]), torch.tensor([-4, 1])])
    def test_negative_step(self, step):
        with pytest.raises(ValueError, match=r"step must be >= 0, got -"):
            uba_lr(step, 10, phi=1.0, lr_max=0.1)

    @pytest.mark.parametrize("step", [float("nan"), np.array([1.0, np.nan])])
    def test_nan_step(self, step):
        with pytest.raises(ValueError, match="step must not contain NaN"):
            cosine_lr(step, 10, lr_max=0.1)

    @pytest.mark.parametrize("step", ["3", None, True, [1, 2]])
    def test_step_type(self, step):
        with pytest.raises(TypeError, match="step must be an int, a float, a numpy array"):
            cosine_lr(step, 10, lr_max=0.1)

    def test_lr_min_above_lr_max(self):
        with pytest.raises(ValueError, match=r"lr_min must be <= lr_max, got lr_min=0.2 > lr_max"):
            uba_lr(1, 10, phi=1.0, lr_max=0.1, lr_min=0.2)

    @pytest.mark.parametrize("name,value", [("lr_min", -0.1), ("warmup_start_lr", -1.0)])
    def test_negative_rates(self, name, value):
        with pytest.raises(ValueError, match=rf"{name} must be finite and >= 0, got -"):
            uba_lr(1, 10, phi=1.0, lr_max=0.1, **{name: value})

    @pytest.mark.parametrize("lr_max", [0.0, -0.1, float("nan")])
    def test_lr_max(self, lr_max):
        with pytest.raises(ValueError, match="lr_max must be finite and > 0"):
            uba_lr(1, 10, phi=1.0, lr_max=lr_max)

    def test_warmup_start_above_peak(self):
        with pytest.raises(ValueError, match=r"warmup_start_lr must lie in \[0, lr_max"):
            uba_lr(1, 10, phi=1.0, lr_max=0.1, warmup_steps=2, warmup_start_lr=0.5)

    def test_total_steps_type(self):
        with pytest.raises(TypeError, match="total_steps must be an int"):
            uba_lr(1, 10.0, phi=1.0, lr_max=0.1)

    def test_step_schedule_arguments(self):
        with pytest.raises(ValueError, match="milestones must be strictly increasing"):
            step_lr(1, 10, lr_max=0.1, milestones=(0.5, 0.5))
        with pytest.raises(ValueError, match=r"milestones\[0\] must lie in \(0, 1\)"):
            step_lr(1, 10, lr_max=0.1, milestones=(30,))
        with pytest.raises(ValueError, match=r"gamma must lie in \(0, 1\]"):
            step_lr(1, 10, lr_max=0.1, gamma=0.0)

    def test_wsd_and_rex_and_onecycle_arguments(self):
        with pytest.raises(ValueError, match="decay_shape must be one of"):
            wsd_lr(1, 10, lr_max=0.1, decay_shape="exp")
        with pytest.raises(ValueError, match=r"decay_fraction must lie in \(0, 1\]"):
            wsd_lr(1, 10, lr_max=0.1, decay_fraction=0.0)
        with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\)"):
            rex_lr(1, 10, lr_max=0.1, beta=1.0)
        with pytest.raises(ValueError, match="div_factor must be >= 1"):
            onecycle_lr(1, 10, lr_max=0.1, div_factor=0.5)


def test_module_all_is_importable():
    for name in S.__all__:
        assert hasattr(S, name)
