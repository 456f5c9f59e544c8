"""The schedulers' plans are composed schedules: the re-shaped UBA plan in closed form, every
schedule per param group, and state dicts written by earlier versions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uba_auto.scheduler import BudgetScheduler, UBAScheduler
from uba_auto.schedules import SCHEDULES, decay_schedule, make_schedule, uba_lr, uba_reentry

T, W = 200, 20


def two_groups(lr0: float = 0.1, lr1: float = 0.02) -> torch.optim.Optimizer:
    params = [torch.zeros(1, requires_grad=True) for _ in range(2)]
    return torch.optim.SGD([{"params": [params[0]], "lr": lr0}, {"params": [params[1]], "lr": lr1}])


def run(opt: torch.optim.Optimizer, sched, n: int) -> None:
    for _ in range(n):
        opt.step()
        sched.step()


class TestReshapedPlan:
    @pytest.mark.parametrize("old,new", [(1.0, 8.0), (6.0, 0.3), (2.0, 2.0)])
    @pytest.mark.parametrize("t0", [W + 1, 90, T - 1])
    def test_is_a_fresh_uba_segment_from_the_change(self, old, new, t0):
        opt = two_groups()
        lr_mins = [1e-3, 0.0]
        sched = UBAScheduler(opt, T, phi=old, lr_min=lr_mins, warmup_steps=W)
        run(opt, sched, t0)
        sched.set_phi(new)
        s_old = (t0 - W) / (T - W)
        entry = uba_reentry(s_old, old, new)
        for group, (peak, low) in enumerate(zip([0.1, 0.02], lr_mins, strict=True)):
            segment = decay_schedule("uba", T - t0, phi=new, lr_max=peak, lr_min=low, entry=entry)
            before = uba_lr(np.arange(t0 + 1), T, phi=old, lr_max=peak, lr_min=low, warmup_steps=W)
            plan = np.array([sched.lr_at(t)[group] for t in range(T + 10)])
            # Up to the change: the original curve, bit for bit; after it: the new segment.
            np.testing.assert_array_equal(plan[: t0 + 1], before)
            np.testing.assert_array_equal(plan[t0 + 1 :], segment(np.arange(1, T + 10 - t0)))
            # The segment in closed form (dense float64, tan form), entered at the same rate.
            k = np.arange(0, T - t0 + 1)
            s = entry + (1 - entry) * k / (T - t0)
            with np.errstate(over="ignore"):
                f = np.where(s >= 1, 0.0, 1 / (1 + new / 2 * np.tan(np.pi * s / 2) ** 2))
            closed = low + (peak - low) * f
            np.testing.assert_allclose(plan[t0 : T + 1], closed, rtol=1e-11, atol=1e-16)
            assert plan[T] == low

    def test_several_changes_chain_segments(self):
        opt = two_groups()
        sched = UBAScheduler(opt, T, phi=1.0, lr_min=1e-3, warmup_steps=W)
        run(opt, sched, 60)
        sched.set_phi(4.0)
        run(opt, sched, 40)
        sched.set_phi(0.5)
        first = uba_reentry((60 - W) / (T - W), 1.0, 4.0)
        progress = first + (1 - first) * (100 - 60) / (T - 60)
        second = uba_reentry(progress, 4.0, 0.5)
        seg = decay_schedule("uba", T - 100, phi=0.5, lr_max=0.1, lr_min=1e-3, entry=second)
        assert [sched.lr_at(t)[0] for t in range(101, T + 3)] == [
            seg(t - 100) for t in range(101, T + 3)
        ]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_budget_scheduler_plans_are_the_schedules_per_group(name):
    own = {"uba": {"phi": 0.7}, "step": {"milestones": (0.3,), "gamma": 0.5}}.get(name, {})
    opt = two_groups(0.2, 0.05)
    sched = BudgetScheduler(
        opt,
        40,
        schedule=name,
        lr_min=[0.002, 0.001],
        warmup_steps=4,
        warmup_start_lr=[0.01, 0.0],
        **own,
    )
    for group, (peak, low, start) in enumerate([(0.2, 0.002, 0.01), (0.05, 0.001, 0.0)]):
        schedule = make_schedule(
            name, 40, lr_max=peak, lr_min=low, warmup_steps=4, warmup_start_lr=start, **own
        )
        got = [sched.lr_at(t)[group] for t in range(45)]
        assert got == [schedule(t) for t in range(45)]
        assert got == [
            SCHEDULES[name](
                t, 40, lr_max=peak, lr_min=low, warmup_steps=4, warmup_start_lr=start, **own
            )
            for t in range(45)
        ]


# State dicts written by uba-auto before the schedules were composed (version 1), with the rates
# that version gave at these steps.
OLD_UBA_STATE = {
    "version": 1, "class": "UBAScheduler", "schedule": "uba", "schedule_kwargs": {},
    "total_steps": 100, "warmup_steps": 10, "peak_lrs": [0.1, 0.02], "lr_mins": [0.001, 0.0],
    "warmup_start_lrs": [0.01, 0.0], "base_lrs": [0.1, 0.02], "last_epoch": 60,
    "_step_count": 61, "_last_lr": [0.03993180833092482, 0.007865011784025216], "phi": 1.5,
    "segments": [[10, 0.5, 0.0], [30, 4.0, 0.08147433487328515], [55, 1.5, 0.5639448684606995]],
    "phi_history": [[30, 0.5, 4.0], [55, 4.0, 1.5]],
}  # fmt: skip
OLD_UBA_RATES = {
    0: [0.01, 0.0], 5: [0.055, 0.01], 10: [0.1, 0.02],
    30: [0.09682636653977628, 0.01935886192722753],
    31: [0.09575344018651301, 0.019142109128588485],
    55: [0.04761185671729229, 0.009416536710564097],
    56: [0.04607754570927398, 0.00910657489076242],
    70: [0.02510153548173837, 0.004868997067017852],
    99: [0.0010305776696983417, 6.177307009765993e-06], 100: [0.001, 0.0], 120: [0.001, 0.0],
}  # fmt: skip
OLD_WSD_STATE = {
    "version": 1, "class": "BudgetScheduler", "schedule": "wsd",
    "schedule_kwargs": {"decay_fraction": 0.4, "decay_shape": "1-sqrt"}, "total_steps": 50,
    "warmup_steps": 5, "peak_lrs": [0.3], "lr_mins": [0.03], "warmup_start_lrs": None,
    "base_lrs": [0.3], "last_epoch": 20, "_step_count": 21, "_last_lr": [0.3],
}  # fmt: skip
OLD_WSD_RATES = {
    0: [0.0], 3: [0.18], 5: [0.3], 20: [0.3], 40: [0.11999999999999998],
    45: [0.0705441218883247], 50: [0.03], 60: [0.03],
}  # fmt: skip


def test_loads_an_earlier_uba_state_with_the_same_rates():
    opt = two_groups(0.5, 0.5)
    sched = UBAScheduler(opt, 100, phi=0.5, lr_min=[1e-3, 0.0], warmup_steps=10)
    sched.load_state_dict(OLD_UBA_STATE)
    assert {t: sched.lr_at(t) for t in OLD_UBA_RATES} == OLD_UBA_RATES
    assert [g["lr"] for g in opt.param_groups] == sched.lr_at(60)
    assert sched.phi == 1.5 and [c.step for c in sched.phi_history] == [30, 55]
    # ... and writes the same format back, plus the flag an older reader ignores
    assert sched.state_dict() == {**OLD_UBA_STATE, "past_budget_warned": False}
    assert math.isclose(sched.get_last_lr()[0], 0.03993180833092482)


def test_loads_an_earlier_budget_state_with_the_same_rates():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    sched = BudgetScheduler(opt, 50, schedule="cosine")
    sched.load_state_dict(OLD_WSD_STATE)
    assert {t: sched.lr_at(t) for t in OLD_WSD_RATES} == OLD_WSD_RATES
    assert sched.state_dict() == {**OLD_WSD_STATE, "past_budget_warned": False}
