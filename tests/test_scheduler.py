"""UBAScheduler / BudgetScheduler: torch conventions, resume, set_phi, several param groups."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

from uba_auto.scheduler import BudgetScheduler, PhiChange, UBAScheduler
from uba_auto.schedules import SCHEDULES, cosine_lr, uba_factor, uba_lr

# Many of these tests step past total_steps on purpose (the rate must hold); the warning that
# gives is tested in test_defaults.py.
pytestmark = pytest.mark.filterwarnings("ignore::uba_auto.scheduler.PastBudgetWarning")


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def two_group_sgd(model: torch.nn.Module, lr0: float = 0.1, lr1: float = 0.02):
    return torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": lr0},
            {"params": model[2].parameters(), "lr": lr1},
        ],
        momentum=0.9,
    )


def train_steps(model, opt, sched, n, data_seed=123, record=None):
    """Run n optimizer steps; record the lr each optimizer step actually used."""
    g = torch.Generator().manual_seed(data_seed)
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        y = torch.randn(16, 1, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if record is not None:
            record.append([grp["lr"] for grp in opt.param_groups])
        opt.step()
        sched.step()


def rates_used(sched, opt, n):
    out = []
    for _ in range(n):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


class TestTorchConventions:
    def test_sequence_equals_pure_function(self):
        model = make_model()
        opt = two_group_sgd(model)
        sched = UBAScheduler(opt, 50, phi=0.5, lr_min=1e-4, warmup_steps=5)
        used = np.array(rates_used(sched, opt, 60))
        for i, peak in enumerate([0.1, 0.02]):
            expected = uba_lr(np.arange(60), 50, phi=0.5, lr_max=peak, lr_min=1e-4, warmup_steps=5)
            np.testing.assert_array_equal(used[:, i], expected)

    def test_get_last_lr_is_the_rate_in_the_optimizer(self):
        opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.3)
        sched = UBAScheduler(opt, 10, phi=3.0)
        for _ in range(12):
            assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
            opt.step()
            sched.step()

    def test_phi_two_equals_cosine_annealing_lr_step_by_step(self):
        T = 300
        p1, p2 = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        opt_a = torch.optim.SGD([p1], lr=0.25)
        opt_b = torch.optim.SGD([p2], lr=0.25)
        ours = UBAScheduler(opt_a, T, phi=2.0, lr_min=1e-3)
        ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=T, eta_min=1e-3)
        for _ in range(T + 1):
            a, b = opt_a.param_groups[0]["lr"], opt_b.param_groups[0]["lr"]
            assert a == pytest.approx(b, rel=1e-11, abs=1e-15)
            for o, s in ((opt_a, ours), (opt_b, ref)):
                o.step()
                s.step()

    def test_first_optimizer_step_uses_warmup_rate(self):
        p = torch.nn.Parameter(torch.tensor([1.0]))
        opt = torch.optim.SGD([p], lr=1.0)
        UBAScheduler(opt, 100, phi=1.0, warmup_steps=10, warmup_start_lr=0.05)
        assert opt.param_groups[0]["lr"] == 0.05
        p.grad = torch.tensor([2.0])
        opt.step()  # the first update: 1 - 0.05 * 2
        assert p.item() == pytest.approx(0.9)

    def test_past_total_steps_holds_lr_min(self):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sched = UBAScheduler(opt, 20, phi=8.0, lr_min=0.003)
        used = rates_used(sched, opt, 200)
        assert all(r == [0.003] for r in used[20:])
        assert sched.lr_at(10_000) == [0.003]

    def test_several_groups_and_lr_min_ratio(self):
        model = make_model()
        opt = two_group_sgd(model, 0.1, 0.02)
        sched = UBAScheduler(opt, 40, phi=4.0, lr_min_ratio=0.1)
        assert sched.lr_mins == [pytest.approx(0.01), pytest.approx(0.002)]
        used = np.array(rates_used(sched, opt, 41))
        assert used[0].tolist() == [0.1, 0.02]
        assert used[-1].tolist() == pytest.approx([0.01, 0.002])
        # The two groups follow the same normalised curve.
        np.testing.assert_allclose(
            (used[:, 0] - 0.01) / 0.09, (used[:, 1] - 0.002) / 0.018, rtol=1e-12, atol=1e-12
        )

    def test_per_group_lr_min(self):
        opt = two_group_sgd(make_model(), 0.1, 0.02)
        sched = UBAScheduler(opt, 10, phi=1.0, lr_min=[0.05, 0.0])
        assert sched.lr_at(10) == [0.05, 0.0]

    def test_tensor_lr_stays_a_tensor(self):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.Adam([p], lr=torch.tensor(0.01))
        sched = UBAScheduler(opt, 10, phi=2.0)
        for _ in range(5):
            p.grad = torch.ones(3)
            opt.step()
            sched.step()
        lr = opt.param_groups[0]["lr"]
        assert isinstance(lr, torch.Tensor)
        assert float(lr) == pytest.approx(uba_lr(5, 10, phi=2.0, lr_max=0.01), rel=1e-6)

    def test_no_warnings_in_normal_use(self):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sched = UBAScheduler(opt, 5, phi=1.0)
            rates_used(sched, opt, 6)  # the whole plan: steps 0..5 (past it, PastBudgetWarning)
            sched.get_last_lr()
            sched.get_lr()

    @pytest.mark.parametrize("name", sorted(set(SCHEDULES) - {"uba"}))
    def test_budget_scheduler_for_every_baseline(self, name):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
        sched = BudgetScheduler(opt, 30, schedule=name, lr_min=0.002, warmup_steps=3)
        used = np.array(rates_used(sched, opt, 35))[:, 0]
        expected = SCHEDULES[name](np.arange(35), 30, lr_max=0.2, lr_min=0.002, warmup_steps=3)
        np.testing.assert_array_equal(used, expected)

    def test_budget_scheduler_schedule_kwargs(self):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = BudgetScheduler(opt, 100, schedule="step", milestones=(0.1,), gamma=0.5)
        assert sched.lr_at(10) == [0.5]


def save(obj) -> dict:
    """Round-trip a state dict through torch.save / torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class TestResume:
    T = 60

    def _fresh(self, **kw):
        model = make_model()
        opt = two_group_sgd(model)
        return model, opt, kw

    def _uninterrupted(self, n_before, phi_changes=()):
        model = make_model()
        opt = two_group_sgd(model)
        sched = UBAScheduler(opt, self.T, phi=0.5, lr_min=1e-4, warmup_steps=5)
        used: list = []
        g_steps = 0
        for at, phi in phi_changes:
            train_steps(model, opt, sched, at - g_steps, data_seed=at, record=used)
            sched.set_phi(phi)
            g_steps = at
        train_steps(model, opt, sched, n_before - g_steps, data_seed=n_before, record=used)
        return model, opt, sched, used

    @pytest.mark.parametrize("order", ["optimizer-first", "scheduler-first"])
    @pytest.mark.parametrize("n_before", [3, 20])
    def test_remaining_sequence_bit_identical(self, order, n_before):
        model_a, opt_a, sched_a, _ = self._uninterrupted(n_before)
        ckpt = save(
            {
                "model": model_a.state_dict(),
                "optimizer": opt_a.state_dict(),
                "scheduler": sched_a.state_dict(),
            }
        )
        # Continue the original run.
        rest_a: list = []
        train_steps(model_a, opt_a, sched_a, 50, data_seed=7, record=rest_a)

        # Restore into fresh objects, in either order.
        model_b = make_model(seed=99)
        model_b.load_state_dict(ckpt["model"])
        opt_b = two_group_sgd(model_b, lr0=0.5, lr1=0.5)  # wrong lrs on purpose: state wins
        if order == "optimizer-first":
            opt_b.load_state_dict(ckpt["optimizer"])
            sched_b = UBAScheduler(opt_b, self.T, phi=0.5, lr_min=1e-4, warmup_steps=5)
        else:
            sched_b = UBAScheduler(opt_b, self.T, phi=0.5, lr_min=1e-4, warmup_steps=5)
            opt_b.load_state_dict(ckpt["optimizer"])
        sched_b.load_state_dict(ckpt["scheduler"])
        rest_b: list = []
        train_steps(model_b, opt_b, sched_b, 50, data_seed=7, record=rest_b)

        assert rest_a == rest_b
        for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
            assert torch.equal(pa, pb)
        assert sched_a.state_dict() == sched_b.state_dict()

    def test_constructing_after_optimizer_resume_keeps_peak(self):
        _, opt_a, sched_a, _ = self._uninterrupted(30)
        state = save(opt_a.state_dict())
        opt_b = two_group_sgd(make_model())
        opt_b.load_state_dict(state)  # groups now hold a decayed lr and initial_lr = peak
        sched_b = UBAScheduler(opt_b, self.T, phi=0.5, lr_min=1e-4, warmup_steps=5)
        assert sched_b.peak_lrs == [0.1, 0.02]
        assert sched_b.base_lrs == [0.1, 0.02]

    def test_phi_history_survives_resume(self):
        changes = [(15, 4.0), (30, 1.0)]
        model_a, opt_a, sched_a, _ = self._uninterrupted(40, phi_changes=changes)
        ckpt = save({"opt": opt_a.state_dict(), "sched": sched_a.state_dict()})
        opt_b = two_group_sgd(make_model())
        opt_b.load_state_dict(ckpt["opt"])
        sched_b = UBAScheduler(opt_b, self.T, phi=0.5, lr_min=1e-4, warmup_steps=5)
        sched_b.load_state_dict(ckpt["sched"])
        assert sched_b.phi_history == sched_a.phi_history
        assert sched_b.phi_history == [PhiChange(15, 0.5, 4.0), PhiChange(30, 4.0, 1.0)]
        assert sched_b.phi == 1.0
        assert rates_used(sched_a, opt_a, 30) == rates_used(sched_b, opt_b, 30)

    def test_load_rejects_foreign_state(self):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        cos = BudgetScheduler(opt, 10, schedule="cosine")
        uba = UBAScheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), 10, phi=1)
        with pytest.raises(ValueError, match="saved by a BudgetScheduler.*construct a Budget"):
            uba.load_state_dict(cos.state_dict())
        two = UBAScheduler(two_group_sgd(make_model()), 10, phi=1.0)
        with pytest.raises(
            ValueError, match="state_dict has 2 param groups but the optimizer has 1"
        ):
            uba.load_state_dict(two.state_dict())
        with pytest.raises(ValueError, match="state_dict must come from"):
            uba.load_state_dict({"last_epoch": 3})
        torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        with pytest.raises(ValueError, match="state_dict must come from"):
            uba.load_state_dict(torch_sched.state_dict())


class TestSetPhi:
    T, W = 1000, 50

    def _sched(self, phi=1.0, lr_min=1e-3):
        opt = two_group_sgd(make_model(), 0.1, 0.02)
        return opt, UBAScheduler(opt, self.T, phi=phi, lr_min=lr_min, warmup_steps=self.W)

    @pytest.mark.parametrize("old,new", [(1.0, 8.0), (8.0, 0.25), (0.5, 0.5), (2.0, 1e-2)])
    @pytest.mark.parametrize("t0", [51, 300, 700, 999])
    def test_continuity_and_endpoint(self, old, new, t0):
        opt, sched = self._sched(phi=old)
        before = rates_used(sched, opt, t0)
        lr_t0 = [g["lr"] for g in opt.param_groups]
        change = sched.set_phi(new)
        assert change == PhiChange(t0, old, new)
        assert [g["lr"] for g in opt.param_groups] == lr_t0  # the current rate is not touched
        after = rates_used(sched, opt, self.T - t0 + 10)
        assert after[0] == lr_t0
        seq = np.array(before + after)
        # Still reaches lr_min at total_steps exactly, and holds it.
        assert seq[self.T].tolist() == [1e-3, 1e-3]
        assert np.all(seq[self.T :] == 1e-3)
        # No jump: the step right after the change is as small as the curves' own steps.
        old_curve = uba_lr(
            np.arange(self.T + 1), self.T, phi=old, lr_max=0.1, lr_min=1e-3, warmup_steps=self.W
        )
        max_step = np.max(np.abs(np.diff(old_curve)))
        new_curve = uba_lr(
            np.arange(self.T + 1), self.T, phi=new, lr_max=0.1, lr_min=1e-3, warmup_steps=self.W
        )
        max_step = max(max_step, np.max(np.abs(np.diff(new_curve))))
        assert abs(seq[t0 + 1, 0] - seq[t0, 0]) <= 1.5 * max_step
        assert np.all(np.diff(seq[self.W :, 0]) <= 0)

    def test_remainder_is_the_new_curve_entered_at_the_same_level(self):
        opt, sched = self._sched(phi=1.0)
        rates_used(sched, opt, 400)
        sched.set_phi(6.0)
        s0 = (400 - self.W) / (self.T - self.W)
        s_entry = 2 / math.pi * math.atan(math.sqrt(1.0 / 6.0) * math.tan(math.pi * s0 / 2))
        assert uba_factor(s_entry, 6.0) == pytest.approx(uba_factor(s0, 1.0), rel=1e-12)
        for t in [401, 555, 800, 999]:
            s = s_entry + (1 - s_entry) * (t - 400) / (self.T - 400)
            f = uba_factor(s, 6.0)
            assert sched.lr_at(t)[0] == pytest.approx(0.1 * f + 1e-3 * (1 - f), rel=1e-12)
        assert sched.lr_at(400)[0] == uba_lr(
            400, self.T, phi=1.0, lr_max=0.1, lr_min=1e-3, warmup_steps=self.W
        )

    @pytest.mark.parametrize("t0", [0, 10, 50])
    def test_during_warmup_equals_building_with_new_phi(self, t0):
        opt, sched = self._sched(phi=1.0)
        rates_used(sched, opt, t0)
        sched.set_phi(5.0)
        fresh_opt, fresh = self._sched(phi=5.0)
        assert [sched.lr_at(t) for t in range(self.T + 2)] == [
            fresh.lr_at(t) for t in range(self.T + 2)
        ]
        assert sched.phi_history == [PhiChange(t0, 1.0, 5.0)]

    def test_several_changes_and_same_step_change(self):
        opt, sched = self._sched(phi=1.0)
        rates_used(sched, opt, 300)
        sched.set_phi(100.0)
        sched.set_phi(3.0)  # replaces the change made at the same step
        opt2, ref = self._sched(phi=1.0)
        rates_used(ref, opt2, 300)
        ref.set_phi(3.0)
        assert [sched.lr_at(t) for t in range(290, 1001)] == [
            ref.lr_at(t) for t in range(290, 1001)
        ]
        rates_used(sched, opt, 300)
        sched.set_phi(0.3)
        assert [c.new_phi for c in sched.phi_history] == [100.0, 3.0, 0.3]
        seq = rates_used(sched, opt, 500)
        assert seq[400 - 1] == [1e-3, 1e-3] or seq[400] == [1e-3, 1e-3]
        assert np.all(np.diff(np.array(seq)[:, 0]) <= 0)

    def test_after_budget_is_recorded_and_holds_lr_min(self):
        opt, sched = self._sched(phi=1.0)
        rates_used(sched, opt, self.T + 3)
        change = sched.set_phi(9.0)
        assert change.step == self.T + 3
        assert rates_used(sched, opt, 3) == [[1e-3, 1e-3]] * 3

    @pytest.mark.parametrize("phi", [0.0, -2.0, float("nan"), float("inf")])
    def test_bad_phi(self, phi):
        _, sched = self._sched()
        with pytest.raises(ValueError, match="phi must be finite and > 0"):
            sched.set_phi(phi)
        assert sched.phi_history == []


class TestBadInput:
    def test_not_an_optimizer(self):
        with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
            UBAScheduler([torch.zeros(1)], 10, phi=1.0)

    def test_group_without_lr(self):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        del opt.param_groups[0]["lr"]
        with pytest.raises(ValueError, match=r"param_groups\[0\] has no 'lr'"):
            UBAScheduler(opt, 10, phi=1.0)

    def test_group_with_non_numeric_lr(self):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        opt.param_groups[0]["lr"] = None
        with pytest.raises(TypeError, match=r"param_groups\[0\]\['lr'\] must be a number"):
            UBAScheduler(opt, 10, phi=1.0)

    @pytest.mark.parametrize("phi", [0, -1.0, float("nan"), float("inf")])
    def test_phi(self, phi):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        with pytest.raises(ValueError, match="phi must be finite and > 0"):
            UBAScheduler(opt, 10, phi=phi)
        assert opt.param_groups[0]["lr"] == 0.1 and "initial_lr" not in opt.param_groups[0]

    def test_total_le_warmup(self):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        with pytest.raises(ValueError, match="total_steps must be > warmup_steps, got total_steps"):
            UBAScheduler(opt, 10, phi=1.0, warmup_steps=10)

    def test_lr_min_above_a_groups_peak(self):
        opt = two_group_sgd(make_model(), 0.1, 0.02)
        with pytest.raises(ValueError, match=r"param group 1: lr_min must be <= lr_max"):
            UBAScheduler(opt, 10, phi=1.0, lr_min=0.05)
        assert [g["lr"] for g in opt.param_groups] == [0.1, 0.02]

    def test_lr_min_and_ratio_together(self):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        with pytest.raises(ValueError, match="either lr_min or lr_min_ratio"):
            UBAScheduler(opt, 10, phi=1.0, lr_min=0.0, lr_min_ratio=0.1)
        with pytest.raises(ValueError, match=r"lr_min_ratio must lie in \[0, 1\]"):
            UBAScheduler(opt, 10, phi=1.0, lr_min_ratio=2.0)
        with pytest.raises(ValueError, match="lr_min must be finite and >= 0"):
            UBAScheduler(opt, 10, phi=1.0, lr_min=-1e-3)

    def test_per_group_list_length(self):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        with pytest.raises(ValueError, match=r"one value per param group \(1\), got 2"):
            UBAScheduler(opt, 10, phi=1.0, lr_min=[0.0, 0.0])

    def test_unknown_schedule(self):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        with pytest.raises(ValueError, match="unknown schedule 'cosine_annealing'"):
            BudgetScheduler(opt, 10, schedule="cosine_annealing")

    def test_bad_schedule_kwarg_is_caught_at_construction(self):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        with pytest.raises(ValueError, match="decay_shape must be one of"):
            BudgetScheduler(opt, 10, schedule="wsd", decay_shape="exp")

    def test_lr_at_negative_step(self):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sched = UBAScheduler(opt, 10, phi=1.0)
        with pytest.raises(ValueError, match="step must be >= 0"):
            sched.lr_at(-1)


def test_repr_mentions_phi_and_step():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = UBAScheduler(opt, 10, phi=1.5)
    assert "phi=1.5" in repr(sched) and "step=0" in repr(sched)
    assert cosine_lr(0, 10, lr_max=0.1) == sched.lr_at(0)[0]


# ------------------------------------------------------------------ set_phi(restart=True)
def _two_group_uba(phi: float = 1 / 32):
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [a], "lr": 0.5}, {"params": [b], "lr": 0.2}], lr=0.5)
    sched = UBAScheduler(opt, total_steps=100, phi=phi, warmup_steps=10, lr_min=[0.01, 0.002])
    return opt, sched


def _rates(opt, sched, upto, at=None, **kwargs):
    out = []
    for t in range(upto):
        if t == at:
            sched.set_phi(2.0, **kwargs)
        out.append(sched.get_last_lr())
        opt.step()
        sched.step()
    return out


def test_a_restart_is_a_fresh_cosine_from_the_current_rate_in_every_group():
    opt, sched = _two_group_uba()
    rates = _rates(opt, sched, 101, at=40, restart=True)
    t0, total = 40, 100
    for group, (peak, low) in enumerate([(0.5, 0.01), (0.2, 0.002)]):
        s0 = (t0 - 10) / (total - 10)
        now = low + (peak - low) / (1 + (1 / 64) * math.tan(math.pi * s0 / 2) ** 2)
        assert rates[t0][group] == pytest.approx(now, rel=1e-12)  # no jump
        for t in range(t0, total + 1):
            u = (t - t0) / (total - t0)
            expected = low + (now - low) * math.cos(math.pi * u / 2) ** 2  # f_2 is cos^2
            assert rates[t][group] == pytest.approx(expected, rel=1e-12, abs=1e-15), (group, t)
    # The plain re-entry is a different curve: it decays faster after a hold.
    opt2, plain = _two_group_uba()
    reentered = _rates(opt2, plain, 101, at=40)
    assert reentered[70][0] < rates[70][0] * 0.95
    assert sched.phi_history == [PhiChange(40, 1 / 32, 2.0)]


def test_a_restarted_schedule_resumes_bit_for_bit_and_old_states_still_load():
    opt, sched = _two_group_uba()
    _rates(opt, sched, 60, at=40, restart=True)
    state = sched.state_dict()
    assert state["segments"][-1][3] != 1.0  # the level is saved
    opt2, again = _two_group_uba()
    again.load_state_dict(state)
    opt2.param_groups[0]["lr"], opt2.param_groups[1]["lr"] = sched.get_last_lr()
    assert _rates(opt2, again, 41) == _rates(opt, sched, 41)
    # A state saved before restarts existed (three fields per segment) loads as level 1.
    old = {**state, "segments": [seg[:3] for seg in state["segments"][:1]]}
    opt3, older = _two_group_uba()
    older.load_state_dict(old)
    assert older._segments[0].level == 1.0


def test_a_plain_change_after_a_restart_and_a_restart_with_a_flat_first_group_stay_continuous():
    def run(lr_min, peaks, changes):
        params = [torch.zeros(1, requires_grad=True) for _ in peaks]
        opt = torch.optim.SGD(
            [{"params": [p], "lr": lr} for p, lr in zip(params, peaks, strict=True)], lr=1.0
        )
        sched = UBAScheduler(opt, total_steps=100, phi=2.0, lr_min=lr_min)
        out = []
        for t in range(101):
            if t in changes:
                sched.set_phi(2.0, restart=changes[t])
            out.append(sched.get_last_lr())
            opt.step()
            sched.step()
        return out

    # A plain set_phi with the same φ after a restart changes nothing.
    restarted = run([0.0], [1.0], {60: True})
    again = run([0.0], [1.0], {60: True, 70: False})
    assert [r[0] for r in again] == pytest.approx([r[0] for r in restarted], rel=1e-12)
    # Group 0 with peak == lr_min: group 1 still restarts from its own current rate.
    rates = run([0.5, 0.0], [0.5, 1.0], {60: True})
    plain = run([0.5, 0.0], [0.5, 1.0], {})
    assert rates[60][1] == plain[60][1] and rates[61][1] < rates[60][1]
    assert all(r[0] == 0.5 for r in rates)
