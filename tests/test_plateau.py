"""The plateau rule (uba_auto.phi's plateau_*) and its driver PlateauCooldown."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import uba_auto
from uba_auto import PlateauCooldown, UBAScheduler, uba_lr
from uba_auto.phi import _plateau as P
from uba_auto.phi import plateau_check_steps, plateau_decision

# -- the pure rule ---------------------------------------------------------------------------------


def test_check_steps_span_the_budget_every_2_5_percent():
    steps = plateau_check_steps(1000)
    assert steps[0] == 50 and steps[-1] == 800
    assert all(b - a == 25 for a, b in itertools.pairwise(steps))


def test_check_steps_start_one_spacing_after_the_warmup():
    assert plateau_check_steps(1000, warmup_steps=100)[0] == 125
    assert plateau_check_steps(1000, warmup_steps=10)[0] == 50


def test_check_steps_empty_when_the_budget_cannot_hold_the_window():
    assert plateau_check_steps(3) == []  # the rounded checks collapse to fewer than WINDOW + 1
    assert len(plateau_check_steps(40)) > P.WINDOW


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_check_steps_refuse_bad_budgets(bad):
    with pytest.raises(ValueError, match="total_steps"):
        plateau_check_steps(bad)


def test_decision_holds_while_the_loss_falls_by_more_than_min_gain():
    rows = [[1.0 * 0.97**k, 2.0 * 0.97**k] for k in range(P.WINDOW + 1)]
    d = plateau_decision(rows)
    assert not d.plateaued
    assert d.relative_gain == pytest.approx(1 - 0.97**P.WINDOW)


def test_decision_cools_down_below_min_gain_with_the_exact_gain():
    rows = [[1.0, 3.0]] * P.WINDOW + [[0.995, 2.985]]
    d = plateau_decision(rows)
    assert d.plateaued
    assert d.gain == pytest.approx(0.01)
    assert d.relative_gain == pytest.approx(0.01 / 2.0)
    assert d.standard_error == pytest.approx(0.005)  # gains 0.005 and 0.015
    assert "improved by 0.50 %" in d.reason
    worse = plateau_decision([[1.0]] * P.WINDOW + [[1.02]])
    assert worse.plateaued and "got worse by 2.00 %" in worse.reason


def test_decision_cools_down_on_a_spike_before_the_window_is_full():
    d = plateau_decision([[1.0], [0.8], [0.8 * (1 + P.MAX_RISE) * 1.01]])
    assert d.plateaued and "rose" in d.reason
    assert not plateau_decision([[1.0], [0.8], [0.8 * (1 + P.MAX_RISE) * 0.99]]).plateaued


def test_decision_cools_down_on_a_non_finite_loss():
    assert plateau_decision([[1.0], [float("nan")]]).plateaued
    assert plateau_decision([[1.0, math.inf]]).plateaued


def test_decision_refuses_mismatched_checks():
    with pytest.raises(ValueError, match="same validation batches"):
        plateau_decision([[1.0, 2.0], [1.0]])
    with pytest.raises(ValueError, match="at least one"):
        plateau_decision([])


# -- PlateauCooldown -------------------------------------------------------------------------------


def _setup(total_steps=199, warmup=0, lr=0.1, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = UBAScheduler(opt, total_steps=total_steps, phi=2.0, warmup_steps=warmup)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=gen)
    y = x.sum(1, keepdim=True)
    val = torch.utils.data.DataLoader(
        list(zip(x, y, strict=True)), batch_size=16, shuffle=True, generator=gen
    )
    return model, opt, sched, val


def test_cooldown_holds_phi_then_switches_to_cosine_without_a_jump():
    model, opt, sched, val = _setup()
    watch = PlateauCooldown(sched, model, val, nn.functional.mse_loss, num_batches=4)
    assert sched.phi == P.HOLD_PHI and watch.initial_phi == 2.0
    decisions = []
    for _ in range(199):
        opt.step()  # no gradients: nothing moves, the validation loss is flat
        sched.step()
        check = watch.step()
        if check is not None:
            decisions.append(check)
    first_full = watch.check_steps[P.WINDOW]
    assert watch.switched_at == first_full
    assert [c.status for c in decisions] == ["hold"] * P.WINDOW + ["cooled"]
    assert sched.phi == P.COOL_PHI
    assert len(watch.checks) == P.WINDOW + 1


def test_cooldown_rates_follow_the_held_schedule_until_the_switch():
    model, opt, sched, val = _setup(lr=0.1)
    watch = PlateauCooldown(sched, model, val, nn.functional.mse_loss, num_batches=4)
    first = watch.check_steps[0]
    for step in range(1, first + 1):
        opt.step()
        sched.step()
        want = float(uba_lr(step, 199, phi=P.HOLD_PHI, lr_max=0.1))
        assert sched.get_last_lr()[0] == pytest.approx(want, rel=1e-12)
    before = sched.get_last_lr()[0]
    watch.switched_at = None
    sched.set_phi(P.COOL_PHI)  # what the rule does at a plateau: no jump at the switch
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] <= before
    assert sched.get_last_lr()[0] == pytest.approx(before, rel=0.01)


def test_a_check_leaves_the_model_rng_and_loader_bit_identical():
    model, opt, sched, val = _setup()
    watch = PlateauCooldown(sched, model, val, nn.functional.mse_loss, num_batches=4)
    x = torch.randn(16, 4)
    model(x).sum().backward()
    model.train()
    model[1].eval()  # a user's frozen norm layer stays frozen
    params = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    loader_state = val.generator.get_state()
    sched.last_epoch = watch.check_steps[0]  # jump to a check step
    check = watch.step()
    assert check is not None and check.status == "hold"
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(val.generator.get_state(), loader_state)


def test_the_loss_is_measured_in_eval_mode_on_the_same_batches():
    model, opt, sched, val = _setup()
    watch = PlateauCooldown(sched, model, val, nn.functional.mse_loss, num_batches=2)
    model.eval()
    with torch.no_grad():
        want = [float(nn.functional.mse_loss(model(xb), yb)) for xb, yb in watch._batches]
    model.train()
    assert watch._losses() == want
    assert watch._losses() == want  # the same batches every time


def test_a_failing_check_keeps_phi_records_why_and_warns():
    model, opt, sched, val = _setup()

    def broken(outputs, targets):
        raise RuntimeError("no loss today")

    watch = PlateauCooldown(sched, model, val, broken, num_batches=2)
    sched.last_epoch = watch.check_steps[0]
    with pytest.warns(RuntimeWarning, match="phi kept: RuntimeError: no loss today"):
        check = watch.step()
    assert check.status == "failed" and math.isnan(check.loss)
    assert sched.phi == P.HOLD_PHI and watch.switched_at is None


def test_state_dict_round_trip_continues_the_same_decisions():
    model, opt, sched, val = _setup()
    watch = PlateauCooldown(sched, model, val, nn.functional.mse_loss, num_batches=2)
    for step in watch.check_steps[:3]:
        sched.last_epoch = step
        watch.step()
    saved = watch.state_dict()
    model2, opt2, sched2, val2 = _setup()
    again = PlateauCooldown(sched2, model2, val2, nn.functional.mse_loss, num_batches=2)
    again.load_state_dict(saved)
    assert again.checks == watch.checks and again._history == watch._history
    with pytest.raises(ValueError, match="missing"):
        again.load_state_dict({"history": []})


def test_bad_arguments_are_refused_with_the_fix():
    model, opt, sched, val = _setup()
    with pytest.raises(TypeError, match="UBAScheduler"):
        PlateauCooldown(torch.optim.lr_scheduler.StepLR(opt, 10), model, val)
    opt.step()
    sched.step()
    with pytest.raises(ValueError, match="before training"):
        PlateauCooldown(sched, model, val)
    model, opt, sched, val = _setup()
    with pytest.raises(ValueError):
        PlateauCooldown(sched, model, iter(list(val)))
    with pytest.raises(TypeError, match="num_batches"):
        PlateauCooldown(sched, model, val, num_batches=1.5)


def test_default_loss_for_pair_batches_is_mse_for_float_targets():
    model, opt, sched, val = _setup()
    watch = PlateauCooldown(sched, model, val, num_batches=2)
    assert watch.loss_fn is nn.functional.mse_loss or "mse" in repr(watch.loss_fn).lower()


def test_training_with_the_rule_cools_down_once_and_keeps_learning():
    """A real run: linear regression with label noise; the hold is left at a plateau."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 1, generator=gen)
    x = torch.randn(512, 5, generator=gen)
    y = x @ w + 0.5 * torch.randn(512, 1, generator=gen)
    xv = torch.randn(256, 5, generator=gen)
    yv = xv @ w + 0.5 * torch.randn(256, 1, generator=gen)
    val = [(xv[i : i + 32], yv[i : i + 32]) for i in range(0, 256, 32)]
    model = nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = UBAScheduler(opt, total_steps=399, phi=2.0)
    watch = PlateauCooldown(sched, model, val, nn.functional.mse_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(400):
            i = (step * 32) % 512
            loss = nn.functional.mse_loss(model(x[i : i + 32]), y[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            watch.step()
    assert watch.switched_at is not None  # the loss reaches its noise floor well before 80 %
    assert [c.status for c in watch.checks].count("cooled") == 1
    assert watch.checks[-1].loss < 0.5  # noise variance 0.25, from ~5 at init
    assert [c.step for c in sched.phi_history][-1] == watch.switched_at
    assert uba_auto.PlateauCheck is type(watch.checks[0])


def test_resume_with_auto_uba_continues_rates_and_checks_exactly():
    """PlateauCooldown on auto_uba's scheduler: a run saved after the switch and resumed
    (auto_uba(resume_from=...), PlateauCooldown(resume_from=...)) has the same rates and
    checks as the uninterrupted run."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=gen)
    y = x.sum(1, keepdim=True)
    train = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    val = [(x[i : i + 16] + 0.1, y[i : i + 16]) for i in range(0, 64, 16)]
    mse = nn.functional.mse_loss

    def build(auto_state=None, watch_state=None):
        torch.manual_seed(0)
        model = nn.Linear(5, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auto = uba_auto.auto_uba(
                model, train, 200, optimizer=opt, loss_fn=mse, resume_from=auto_state
            )
        watch = PlateauCooldown(auto.scheduler, model, val, mse, resume_from=watch_state)
        return model, opt, auto, watch

    def steps(model, opt, auto, watch, start, stop):
        rates = []
        for s in range(start, stop):
            xb, yb = train[s % 8]
            loss = mse(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            auto.scheduler.step()
            watch.step()
            rates.append(auto.scheduler.get_last_lr()[0])
        return rates

    full = build()
    whole = steps(*full, 0, 199)
    first = build()
    part = steps(*first, 0, 120)
    model, opt, auto, watch = first
    saved = (auto.state_dict(), watch.state_dict(), model.state_dict(), opt.state_dict())
    again = build(saved[0], saved[1])
    again[0].load_state_dict(saved[2])
    again[1].load_state_dict(saved[3])
    rest = steps(*again, 120, 199)
    assert full[3].switched_at is not None and full[3].switched_at < 120
    assert part + rest == whole

    def strip(checks):  # everything but the wall time
        return [(c.step, c.status, c.loss, c.phi, c.reason) for c in checks]

    assert strip(again[3].checks) == strip(full[3].checks)


def test_the_example_runs_and_cools_down_once():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "plateau_cooldown.py"
    spec = importlib.util.spec_from_file_location("plateau_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    auto = module.main(budget=300)
    watch = auto.plateau
    assert watch.checks and [c.status for c in watch.checks].count("cooled") <= 1
    assert all(c.status != "failed" for c in watch.checks)
    assert [r.step for r in auto.report.history[1:]] == [s for s in [watch.switched_at] if s]


def test_losses_given_by_the_loop_are_judged_like_measured_ones():
    model, opt, sched, val = _setup()
    watch = PlateauCooldown(sched, model, val, nn.functional.mse_loss, num_batches=2)
    sched.last_epoch = 1
    assert not watch.due and watch.step([1.0, 1.0]) is None  # not a check step: ignored
    given = [[1.0, 2.0]] * P.WINDOW + [[0.999, 1.999]]
    for step, row in zip(watch.check_steps, given, strict=False):
        sched.last_epoch = step
        assert watch.due
        check = watch.step(row)
    assert check.status == "cooled" and watch.switched_at == watch.check_steps[P.WINDOW]
    assert not watch.due
    model2, _, sched2, val2 = _setup()
    other = PlateauCooldown(sched2, model2, val2, nn.functional.mse_loss, num_batches=2)
    sched2.last_epoch = other.check_steps[0]
    other.step([1.0, 2.0])
    sched2.last_epoch = other.check_steps[1]
    with pytest.warns(RuntimeWarning, match="same validation batches"):
        bad = other.step([1.0])  # a different number of batches: recorded, phi kept
    assert bad.status == "failed" and sched2.phi == P.HOLD_PHI
