"""The shape rule of benchmarks/shape_rule.py (pre-registered in
benchmarks/results/prereg_shape_rule.md): its check steps, its decisions on prescribed validation
losses, and a run whose guard never fires switching at 40 % (the restarted cosine itself is checked
against the closed form in test_trend_rule.py)."""

from __future__ import annotations

import math

import pytest

from benchmarks import shape_rule as SR
from benchmarks.tasks import get_task
from uba_auto.phi import _plateau as P


@pytest.mark.parametrize(("total", "warmup"), [(199, 0), (399, 20), (1199, 60)])
def test_checks_are_the_plateau_rules_up_to_the_switch(total, warmup):
    steps = SR.check_steps(total, warmup)
    assert steps == [s for s in P.plateau_check_steps(total, warmup) if s < round(0.4 * total)]
    assert SR.switch_step(total) == round(0.4 * total) and steps[-1] < SR.switch_step(total)
    assert len(steps) < len(P.plateau_check_steps(total, warmup)) / 2 + 1


def test_a_falling_loss_cools_at_the_switch_step_and_a_plateau_cools_at_its_check():
    total = 199
    steps = SR.check_steps(total)
    rule = SR.ShapeRule(total)
    for k, step in enumerate(steps):
        action, _ = rule.check(step, [1.0 - 0.03 * k, 1.2 - 0.03 * k])
        assert action is None
        assert rule.due(step) == (None, "")
    action, why = rule.due(SR.switch_step(total))
    assert action == "cool" and "no plateau by 40 %" in why
    assert rule.due(SR.switch_step(total) + 1) == (None, "")  # once
    flat = SR.ShapeRule(total)
    actions = [flat.check(step, [1.0, 1.2])[0] for step in steps[: P.WINDOW + 1]]
    assert actions == [None] * P.WINDOW + ["cool"]
    assert flat.check(steps[P.WINDOW + 1], [1.0, 1.2])[0] is None  # nothing after the cool-down
    assert flat.due(SR.switch_step(total)) == (None, "")


def test_a_run_without_a_plateau_is_the_hold_then_a_cosine_from_40_percent(monkeypatch):
    from benchmarks import plateau_rule as R

    monkeypatch.setattr(P, "MIN_GAIN", -math.inf)  # the guard never fires
    monkeypatch.setattr(P, "MAX_RISE", math.inf)
    task = get_task("diabetes_mlp")
    budget, peak = 200, task.base_lr[200]
    run = R.run_one(task, None, budget, 0, peak, 8, rule="shape")
    total = budget - 1
    assert run["switched_at"] == SR.switch_step(total) == 80
    assert run["held_fraction"] == pytest.approx(80 / budget)
    assert "no plateau by 40 %" in run["reason"]
    assert run["num_val_evals"] == len(SR.check_steps(total, task.warmup_steps(budget)))
    assert math.isfinite(run["final_test_loss"])


def test_the_fifth_set_is_new_and_builds():
    from test_trend_rule import _check_new_test_set

    from benchmarks.tasks import (
        SHAPE_TEST_TASK_NAMES,
        TREND30_TEST_TASK_NAMES,
        TREND_TEST_TASK_NAMES,
    )

    assert SHAPE_TEST_TASK_NAMES == ("tcn_docs_adamw", "ae_digits_adam", "mf_nesterov_sgd")
    _check_new_test_set(SHAPE_TEST_TASK_NAMES, TREND_TEST_TASK_NAMES, TREND30_TEST_TASK_NAMES)
    ae = get_task("ae_digits_adam")
    assert ae.y_train is ae.x_train and float(ae.x_train.max()) <= 1.0  # it reconstructs


def test_the_conv_lm_is_causal():
    import torch

    from benchmarks.tasks import CausalConvLM

    torch.manual_seed(0)
    model = CausalConvLM(20, 8, (1, 2, 4))
    x = torch.randint(0, 20, (2, 16))
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 20
    out, out_changed = model(x), model(changed)
    assert torch.equal(out[:, :10], out_changed[:, :10])  # positions before 10 see nothing after
    assert not torch.allclose(out[:, 10:], out_changed[:, 10:])


def test_the_factorisation_predicts_dot_plus_biases():
    import torch

    from benchmarks.tasks import MatrixFactorisation

    torch.manual_seed(0)
    model = MatrixFactorisation(5, 4, 3)
    x = torch.tensor([[0, 1], [4, 3]])
    expected = (model.user.weight[x[:, 0]] * model.item.weight[x[:, 1]]).sum(-1) + model.mu
    torch.testing.assert_close(model(x), expected)  # the biases start at 0
