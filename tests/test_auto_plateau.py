"""auto_uba(val_loader=...): the validation plateau rule decides φ inside auto_uba's scheduler."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import uba_auto
from uba_auto import PlateauCooldown, UBAScheduler, auto_uba
from uba_auto.phi import _plateau as P

MSE = nn.functional.mse_loss


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=gen)
    y = x.sum(1, keepdim=True)
    train = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    val = [(x[i : i + 16] + 0.1, y[i : i + 16]) for i in range(0, 64, 16)]
    return train, val


TRAIN, VAL = _data()


def _build(*, rule="auto", state=None, watch_state=None, **kwargs):
    """A linear model, SGD, auto_uba: with the rule inside (``rule="auto"``) or a
    PlateauCooldown put on its scheduler by hand (``rule="manual"``)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    inside = {"val_loader": VAL, "val_batches": 4} if rule == "auto" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe overspends its share of 200 steps
        auto = auto_uba(
            model, TRAIN, 200, optimizer=opt, loss_fn=MSE, resume_from=state, **inside, **kwargs
        )
    watch = auto.plateau
    if rule == "manual":
        watch = PlateauCooldown(
            auto.scheduler, model, VAL, MSE, num_batches=4, resume_from=watch_state
        )
    return model, opt, auto, watch


def _train(model, opt, auto, watch, start, stop, *, manual=False):
    rates = []
    for s in range(start, stop):
        xb, yb = TRAIN[s % 8]
        loss = MSE(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        auto.scheduler.step()
        if manual:
            watch.step()
        rates.append(auto.scheduler.get_last_lr()[0])
    return rates


def _strip(checks):  # everything but the wall time
    return [(c.step, c.status, c.loss, c.phi, c.reason) for c in checks]


@pytest.fixture(scope="module")
def uninterrupted():
    run = _build()
    rates = _train(*run, 0, 199)
    return run, rates


def test_the_rule_inside_auto_uba_is_the_rule_on_its_scheduler(uninterrupted):
    """Same rates and the same checks as a PlateauCooldown driven by hand on auto_uba's scheduler,
    and the switch is in the report's history."""
    (model, opt, auto, watch), rates = uninterrupted
    manual = _build(rule="manual")
    assert _train(*manual, 0, 199, manual=True) == rates
    assert _strip(watch.checks) == _strip(manual[3].checks)
    assert watch.switched_at is not None  # the loss flattens well before 80 % of the budget
    first, switch = auto.report.history
    assert first.phi == P.HOLD_PHI and first.message == "pre-training probe"
    assert (switch.step, switch.status, switch.phi) == (watch.switched_at, "ok", P.COOL_PHI)
    assert switch.message.startswith("validation plateau rule: ")
    assert auto.phi == P.COOL_PHI == auto.scheduler.phi


def test_the_report_says_the_validation_loss_decides_and_what_the_link_read(uninterrupted):
    (_, _, auto, _), _ = uninterrupted
    report = auto.report
    assert report.phi == P.HOLD_PHI and not report.clamped  # below phi_min: the rule's own phi
    assert report.phi_signal.startswith("the validation loss")
    assert "the gated link, which does not decide here, reads phi = " in report.reason
    text = str(report)
    assert "φ decided by" in text and "mid-run φ decisions" in text
    assert uba_auto.CurvatureReport.from_dict(report.to_dict()).phi_signal == report.phi_signal
    plain = auto_uba(nn.Linear(5, 1), TRAIN, 5000, loss_fn=MSE, num_batches=4)
    assert plain.report.phi_signal.startswith("the curvature noise sigma")


def test_a_run_saved_mid_hold_and_resumed_continues_rates_and_checks_exactly(uninterrupted):
    (_, _, full_auto, full_watch), whole = uninterrupted
    assert full_watch.switched_at > 30  # the save below falls inside the hold
    model, opt, auto, _ = first = _build()
    part = _train(*first, 0, 30)
    saved = (auto.state_dict(), model.state_dict(), opt.state_dict())
    model2, opt2, auto2, watch2 = again = _build(state=saved[0])
    model2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    assert auto2.scheduler.phi == P.HOLD_PHI and auto2.plateau.checks == auto.plateau.checks
    rest = _train(*again, 30, 199)
    assert part + rest == whole
    assert _strip(watch2.checks) == _strip(full_watch.checks)
    assert [r.to_row()[:5] for r in auto2.report.history] == [
        r.to_row()[:5] for r in full_auto.report.history
    ]


def test_load_state_dict_restores_the_checks():
    model, opt, auto, watch = run = _build()
    _train(*run, 0, 40)
    state = auto.state_dict()
    _, _, other, _ = _build()
    other.load_state_dict(state)
    assert _strip(other.plateau.checks) == _strip(watch.checks)
    assert other.scheduler.last_epoch == 40


def test_a_failing_check_keeps_phi_and_is_recorded(uninterrupted):
    model, opt, auto, watch = run = _build()
    auto.plateau.loss_fn = lambda out, target: 1 / 0
    with pytest.warns(RuntimeWarning, match="validation check at step .* failed, phi kept"):
        _train(*run, 0, 20)
    failed = [r for r in auto.report.history if r.status == "failed"]
    assert failed and all(r.phi == P.HOLD_PHI for r in failed)
    assert "ZeroDivisionError" in failed[0].message
    assert auto.scheduler.phi == P.HOLD_PHI


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_loader": TRAIN}, "val_loader is the training loader"),
        ({"val_loader": VAL, "reestimate_every": 50}, "val_loader and reestimate_every"),
        ({"val_loader": iter(VAL)}, "one-shot"),
        ({"val_loader": VAL, "val_batches": 0}, "val_batches"),
    ],
)
def test_bad_validation_arguments_are_refused_before_the_probe(kwargs, match):
    with pytest.raises(ValueError, match=match):
        auto_uba(nn.Linear(5, 1), TRAIN, 200, loss_fn=MSE, **kwargs)


def test_a_state_without_the_rule_does_not_resume_a_run_with_it():
    model, opt, auto, watch = run = _build(rule="manual")
    _train(*run, 0, 10, manual=True)
    with pytest.raises(ValueError, match="val_batches=None"):
        _build(state=auto.state_dict())


def test_a_curvature_reestimation_is_refused_while_the_rule_decides(uninterrupted):
    (_, _, auto, _), _ = uninterrupted
    with pytest.raises(ValueError, match="validation plateau rule"):
        auto.reestimate()


def test_a_state_saved_before_the_scheduler_resumes_and_starts_the_rule():
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        early = auto_uba(model, TRAIN, 200, loss_fn=MSE, val_loader=VAL, val_batches=4)
        state = early.state_dict()  # no optimizer yet: no scheduler, no checks
        later = auto_uba(
            model, TRAIN, 200, loss_fn=MSE, val_loader=VAL, val_batches=4, resume_from=state
        )
    sched = later.make_scheduler(torch.optim.SGD(model.parameters(), lr=0.05))
    assert sched.phi == P.HOLD_PHI and later.plateau.checks == []


def _sized(budget, **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    val = [(x + 0.1, y) for x, y in TRAIN]  # 8 validation batches to draw from
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = auto_uba(model, TRAIN, budget, optimizer=opt, loss_fn=MSE, val_loader=val, **kwargs)
    over = [str(w.message) for w in caught if "validation checks over budget" in str(w.message)]
    return auto, over


@pytest.mark.parametrize(
    ("budget", "batches", "over"),
    [(5000, 8, False), (1867, 8, False), (1866, 8, True), (934, 4, False), (200, 1, True)],
)
def test_the_checks_cost_is_reported_and_said_loudly_when_over_its_share(budget, batches, over):
    # 14 checks (every 2.5 % from 5 % to before 40 %) of b batches at a third of a gradient each,
    # against 2 % of the budget.
    assert len(P.cooldown_check_steps(budget - 1)) == 14
    assert (14 * batches / 3 > 0.02 * budget) == over
    auto, loud = _sized(budget, val_batches=batches)
    assert len(auto.plateau._batches) == batches
    cost = 14 * batches / 3
    assert (
        f"14 checks of {batches} validation batch{'es' if batches > 1 else ''}, about {cost:.0f} "
        f"gradient-equivalents, {100 * cost / budget:.1f}% of the budget"
    ) in auto.report.phi_signal
    assert bool(loud) == over
    assert over == any("validation checks over budget" in w for w in auto.report.warnings)
    if over:
        assert f"can cost {cost:.0f} gradient-equivalents" in loud[0]
        fit = max(1, min(8, int(0.02 * budget * 3 / 14)))  # 7 at 1866 steps
        fits = "even at one validation batch per check" if batches == 1 else f"(it fits {fit} "
        assert fits in loud[0]


def test_the_default_is_eight_batches_and_a_larger_share_silences_the_note():
    auto, loud = _sized(1500)
    assert len(auto.plateau._batches) == 8 and loud  # 37.3 > 30 gradient-equivalents
    assert "(it fits 6 batches per check)" in loud[0]
    auto, loud = _sized(1500, probe_fraction=0.05)
    assert len(auto.plateau._batches) == 8 and not loud


def test_a_run_resumes_only_with_its_val_batches():
    auto, _ = _sized(2067, val_batches=4)
    state = auto.state_dict()
    again, _ = _sized(2067, resume_from=state, val_batches=4)
    assert len(again.plateau._batches) == 4
    with pytest.raises(ValueError, match="val_batches"):
        _sized(2067, resume_from=state)


def _train_feeding_losses(model, opt, auto, stop, losses_of):
    """The loop of :func:`_train` that measures the validation losses itself when a check is
    due and passes them to the scheduler; returns the rates and the steps it measured at."""
    rates, measured = [], []
    for s in range(stop):
        xb, yb = TRAIN[s % 8]
        loss = MSE(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if auto.validation_due:
            measured.append(auto.scheduler.last_epoch + 1)
            auto.scheduler.step(val_losses=losses_of(model))
        else:
            auto.scheduler.step()
        rates.append(auto.scheduler.get_last_lr()[0])
    return rates, measured


@torch.no_grad()
def _own_losses(model):
    model.eval()
    out = [MSE(model(x), y) for x, y in VAL]  # one-element tensors, as a loop has them
    model.train()
    return out


def test_losses_the_loop_measures_drive_the_same_checks_without_a_forward_of_its_own(
    uninterrupted, monkeypatch
):
    (_, _, full_auto, full_watch), whole = uninterrupted
    model, opt, auto, watch = _build()
    monkeypatch.setattr(watch, "_losses", lambda: 1 / 0)  # a check of its own would fail
    rates, measured = _train_feeding_losses(model, opt, auto, 199, _own_losses)
    assert rates == whole
    assert _strip(watch.checks) == _strip(full_watch.checks)
    # Due exactly at the checks that measure (the cool-down at 40 % measures nothing).
    assert measured == [c.step for c in full_watch.checks if not math.isnan(c.loss)]
    assert not auto.validation_due  # switched: no check left
    assert [r.to_row()[:5] for r in auto.report.history] == [
        r.to_row()[:5] for r in full_auto.report.history
    ]


def test_the_losses_given_are_the_ones_judged():
    """A validation loss that never improves cools at the first check that can judge it."""
    model, opt, auto, watch = _build()
    _train_feeding_losses(model, opt, auto, 199, lambda m: [1.0, 1.0, 1.0, 1.0])
    first_judged = watch.check_steps[P.WINDOW]
    assert watch.switched_at == first_judged
    assert [c.loss for c in watch.checks] == [1.0] * len(watch.checks)


def test_a_loss_that_keeps_improving_cools_at_40_percent_with_no_check_there():
    model, opt, auto, watch = _build()
    falling = iter(range(10_000))
    rates, measured = _train_feeding_losses(
        model, opt, auto, 199, lambda m: [10.0 - 0.2 * next(falling)] * 4
    )
    total = auto.scheduler.total_steps
    assert watch.switched_at == P.cooldown_step(total) == round(0.4 * total)
    last = watch.checks[-1]
    assert (last.step, last.status, last.phi) == (watch.switched_at, "cooled", P.COOL_PHI)
    assert math.isnan(last.loss) and "no plateau by 40 %" in last.reason
    assert measured == watch.check_steps and max(measured) < watch.switched_at
    assert [c.step for c in auto.scheduler.phi_history] == [0, watch.switched_at]


def test_bad_val_losses_are_refused_with_the_fix():
    model, opt, auto, _ = _build()
    with pytest.raises(ValueError, match="val_losses is empty"):
        auto.scheduler.step(val_losses=[])
    with pytest.raises(ValueError, match="sequence of per-batch validation losses"):
        auto.scheduler.step(val_losses=3.0)
    assert auto.scheduler.last_epoch == 0  # refused before the step
    plain = _build(rule="none")[2]
    assert not plain.validation_due
    with pytest.raises(ValueError, match="without val_loader"):
        plain.scheduler.step(val_losses=[1.0])


def test_a_warm_up_longer_than_40_percent_cools_at_its_end_with_the_cosine_from_the_peak():
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = UBAScheduler(opt, total_steps=199, phi=2.0, warmup_steps=120)
    watch = PlateauCooldown(sched, model, VAL, MSE, num_batches=2)
    assert watch.cooldown_step == 120 and all(s < 120 for s in watch.check_steps)
    ref_opt = torch.optim.SGD(nn.Linear(5, 1).parameters(), lr=0.05)
    ref = UBAScheduler(ref_opt, total_steps=199, phi=2.0, warmup_steps=120)  # cosine after it
    for _ in range(199):
        opt.step()
        sched.step()
        watch.step(losses=[10.0 - 0.01 * sched.last_epoch] * 2 if watch.due else None)
        ref_opt.step()
        ref.step()
        assert sched.get_last_lr() == pytest.approx(ref.get_last_lr(), rel=1e-12)
    assert watch.switched_at == 120 and "no plateau by 40 %" in watch.checks[-1].reason
