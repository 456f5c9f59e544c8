"""The trend rule of benchmarks/trend_rule.py (pre-registered in
benchmarks/results/prereg_trend_rule.md): its restarted schedule against the closed form, its
decisions on prescribed validation losses, its test tasks, and a run that never holds being the
cosine run bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

import uba_auto
from benchmarks import trend_rule as TR
from benchmarks.tasks import (
    HELDOUT_REPRESENTATIVE_TASK_NAMES,
    HOLD_TEST_TASK_NAMES,
    HOLDOUT_TASK_NAMES,
    REPRESENTATIVE_TASK_NAMES,
    TASK_NAMES,
    TREND30_TEST_TASK_NAMES,
    TREND_TEST_TASK_NAMES,
    DigitsMixer,
    get_task,
)


def _uba_fraction(s: float, phi: float) -> float:
    return 1.0 / (1.0 + (phi / 2.0) * math.tan(math.pi * s / 2.0) ** 2)


def _scheduler(total: int, warmup: int, peak: float = 0.5, lr_min: float = 0.01):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    return opt, uba_auto.UBAScheduler(
        opt, total_steps=total, phi=2.0, warmup_steps=warmup, lr_min=lr_min
    )


def test_restart_is_per_param_group():
    # Two groups with their own peak and lr_min: each restarts from its own current rate.
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [a], "lr": 0.5}, {"params": [b], "lr": 0.1}])
    total, t0, lows = 120, 50, [0.02, 0.001]
    sched = uba_auto.UBAScheduler(opt, total_steps=total, phi=2.0, warmup_steps=6, lr_min=lows)
    for _ in range(t0):
        opt.step()
        sched.step()
    now = sched.get_last_lr()
    TR.restart(sched, 1 / 32)
    for t in (t0 + 1, 90, total):
        s = (t - t0) / (total - t0)
        for g in range(2):
            expected = lows[g] + (now[g] - lows[g]) * _uba_fraction(s, 1 / 32)
            assert sched.lr_at(t)[g] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("phi", [1 / 32, 2.0, 16.0])
def test_restart_follows_a_fresh_uba_curve_from_the_current_rate(phi):
    total, warmup, t0, low = 200, 10, 83, 0.01
    opt, sched = _scheduler(total, warmup, lr_min=low)
    for _ in range(t0):
        opt.step()
        sched.step()
    now = sched.get_last_lr()[0]
    before = [sched.lr_at(t)[0] for t in range(t0 + 1)]
    TR.restart(sched, phi)
    assert [sched.lr_at(t)[0] for t in range(t0 + 1)] == before  # the past and t0 untouched
    for t in range(t0 + 1, total + 5):
        s = min(1.0, (t - t0) / (total - t0))
        expected = low + (now - low) * _uba_fraction(s, phi)
        assert sched.lr_at(t)[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert sched.lr_at(total)[0] == pytest.approx(low, rel=1e-12)
    # ...and the stepping scheduler gives the same rates.
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(sched.lr_at(t0 + 1)[0], rel=1e-15)


def _steps(total: int) -> list[int]:
    from uba_auto.phi._plateau import plateau_check_steps

    return plateau_check_steps(total)


def _run(total: int, loss_at) -> list[tuple[int, str | None]]:
    rule, actions = TR.TrendRule(total), []
    for step in _steps(total):
        action, _ = rule.check(step, [loss_at(step / total)])
        actions.append((step, action))
        if action in ("cool", "stop"):
            break
    return actions


def test_a_run_still_falling_fast_at_40_percent_holds_there():
    # loss = exp(-f): a relative gain of 1 - exp(-0.1) = 9.5 % per tenth of the budget.
    actions = _run(399, lambda f: math.exp(-f))
    holds = [step for step, a in actions if a == "hold"]
    assert holds == [160]  # the first check at 40 % of 399 steps (nominal 159.6)
    assert all(a is None for step, a in actions if step > 160)  # still falling: no cool-down


def test_a_run_that_slowed_down_stays_on_cosine_and_stops_after_the_window():
    # 1 % per tenth: below HOLD_GAIN.
    assert TR.HOLD_GAIN > 0.01
    actions = _run(399, lambda f: math.exp(-0.1 * f))
    assert "hold" not in [a for _, a in actions]
    last_step, last = actions[-1]
    assert last == "stop" and last_step / 399 > TR.DECISION_TO


def test_no_hold_when_the_loss_is_recovering_from_a_spike():
    # Falls fast (9.5 % per tenth), but an earlier check (at 20 %) was lower than the decision
    # checks, by less than the plateau test's 25 % spike: only guard (c) refuses the hold.
    def loss(f):
        return 0.6 if abs(f - 0.2) < 0.01 else math.exp(-f)

    from uba_auto.phi._plateau import MAX_RISE

    assert math.exp(-0.45) < (1 + MAX_RISE) * 0.6

    assert "hold" not in [a for _, a in _run(399, loss)]


def test_a_held_run_cools_down_at_its_plateau():
    # Falls fast to 45 %, then flat: the plateau test fires once its window (4 checks, 10 %)
    # starts at 45 %, at the check of 55 %.
    actions = _run(399, lambda f: math.exp(-min(f, 0.45)))
    kinds = [(s, a) for s, a in actions if a is not None]
    assert kinds[0] == (160, "hold")
    assert kinds[1] == (round(0.55 * 399), "cool")


def test_a_non_finite_loss_never_holds():
    actions = _run(399, lambda f: math.nan if f > 0.3 else math.exp(-f))
    assert "hold" not in [a for _, a in actions]


def _check_new_test_set(names, *earlier_sets):
    """``names`` is in none of the registries before it, and every task builds and gives a
    finite loss on its first batch."""
    seen = set().union(
        TASK_NAMES,
        HOLDOUT_TASK_NAMES,
        REPRESENTATIVE_TASK_NAMES,
        HELDOUT_REPRESENTATIVE_TASK_NAMES,
        HOLD_TEST_TASK_NAMES,
        *earlier_sets,
    )
    assert not seen & set(names)
    for name in names:
        task = get_task(name)
        x, y = next(task.batches(0))
        assert torch.isfinite(task.loss_fn(task.make_model(0)(x), y)), name


def test_trend_test_tasks_are_new_and_build():
    assert TREND_TEST_TASK_NAMES == ("gpt_code_adamw", "cnn_bn_noisy_sgd", "mixer_adamw")
    _check_new_test_set(TREND_TEST_TASK_NAMES)


def test_the_fourth_set_is_new_and_builds():
    assert TREND30_TEST_TASK_NAMES == ("gru_docs_adamw", "seq_transformer_adamw", "resmlp_bn_sgd")
    _check_new_test_set(TREND30_TEST_TASK_NAMES, TREND_TEST_TASK_NAMES)
    # The sequence labels: the most frequent of tokens 0-3, except the 10 % drawn at random.
    task = get_task("seq_transformer_adamw")
    x, y = task.x_train, task.y_train
    counts = torch.stack([(x == k).sum(dim=1) for k in range(4)], dim=1)
    agree = (counts.argmax(dim=1) == y).float().mean().item()
    assert 0.9 < agree < 0.95  # 10 % random labels, a quarter of which land on the right class


def test_mixer_patches_are_the_images_2x2_blocks():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 8)
    b = x.shape[0]
    patches = x.reshape(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
    expected = x.unfold(2, 2, 2).unfold(3, 2, 2).reshape(b, 16, 4)  # row-major blocks
    assert torch.equal(patches, expected)
    assert DigitsMixer()(x).shape == (3, 10)


def test_a_trend_run_that_never_holds_is_the_cosine_run_bit_for_bit(monkeypatch):
    from benchmarks import plateau_rule as R
    from benchmarks.train import ScheduleSpec

    monkeypatch.setattr(TR, "HOLD_GAIN", math.inf)
    task = get_task("diabetes_mlp")
    peak = task.base_lr[200]
    rule = R.run_one(task, None, 200, 0, peak, 8, rule="trend")
    cosine = R.run_one(task, ScheduleSpec("uba", 2.0), 200, 0, peak, 8)
    assert rule["switched_at"] is None and rule["held_fraction"] == 0.0
    assert rule["final_heldout_loss"] == cosine["final_heldout_loss"]
    assert rule["final_test_loss"] == cosine["final_test_loss"]


def test_the_plateau_rule_runs_as_stored_through_the_two_rule_harness():
    # benchmarks/plateau_rule.py now drives two rules; its plateau runs must be those stored in
    # benchmarks/results/plateau_calibration.json (diabetes_mlp/200, seed 0: switch at step 40).
    import json
    from pathlib import Path

    from benchmarks import plateau_rule as R

    stored = json.loads(
        (Path(R.__file__).parent / "results" / "plateau_calibration.json").read_text()
    )
    cell = next(c for c in stored["cells"] if (c["task"], c["budget"]) == ("diabetes_mlp", 200))
    run = next(r for r in cell["rule_runs"] if r["seed"] == 0)
    task = get_task("diabetes_mlp")
    mine = R.run_one(task, None, 200, 0, cell["peak_lr"], stored["val_batches"], rule="plateau")
    assert mine["label"] == "plateau" and mine["switched_at"] == run["switched_at"] == 40
    assert mine["final_heldout_loss"] == run["final_heldout_loss"]
    assert mine["held_fraction"] == 40 / 200


def test_first_check_drops_the_early_checks_and_what_they_cost(monkeypatch):
    from benchmarks import plateau_rule as R
    from uba_auto.phi._plateau import plateau_check_steps

    task = get_task("gpt_code_adamw")
    full = TR.check_steps(299, task.warmup_steps(300))
    assert full == plateau_check_steps(299, task.warmup_steps(300))  # None: the pre-registered
    steps_full = R.equal_cost_steps(task, 300, 8, "trend")
    assert steps_full == R.equal_cost_steps(task, 300, 8)  # the plateau rule's arithmetic
    monkeypatch.setattr(TR, "FIRST_CHECK", 0.3)
    late = TR.check_steps(299, task.warmup_steps(300))
    assert late == [s for s in full if s >= 89] and late[0] / 299 >= 0.3 - 0.5 / 299
    steps_late = R.equal_cost_steps(task, 300, 8, "trend")
    assert steps_late > steps_full  # fewer checks charged, more training steps
    # Exactly the most steps whose training plus every check still fits in the budget.
    (xv, _), _ = R.validation_set(task, 8)
    assert steps_late + R._check_cost(task, steps_late, xv.shape[0], "trend") <= 300
    assert steps_late + 1 + R._check_cost(task, steps_late + 1, xv.shape[0], "trend") > 300
