"""AutoUBA's explicit state: maybe_reestimate, the state dict's round trip, failed transitions."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from _models import make_problem

from uba_auto import auto_uba
from uba_auto.auto._state import AutoSettings, AutoState, PeakRate

CHEAP = dict(num_batches=2, probe_fraction=1.0, density=False, trace=False, per_batch=False)


def setup(num_batches: int = 8):
    problem = make_problem("tanh_mlp", num_batches=num_batches, seed=2)
    return problem, problem.model


def sgd(model, lr: float = 0.05):
    return torch.optim.SGD(model.parameters(), lr=lr)


def through_torch_save(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def advance(auto, steps: int) -> None:
    """``steps`` training steps without gradients (the optimizer leaves the weights as they are)."""
    for _ in range(steps):
        auto.scheduler.optimizer.step()
        auto.scheduler.step()


def state_without(state: dict, *keys: str) -> dict:
    return {k: v for k, v in state.items() if k not in keys}


# -- maybe_reestimate ------------------------------------------------------------------------------
def test_maybe_reestimate_runs_exactly_on_the_plan():
    problem, model = setup()
    kw = dict(loss_fn=problem.loss, **CHEAP)
    auto = auto_uba(model, problem.batches, 300, reestimate_every=100, **kw)
    # total_steps = 299: not at step 0, nor at or after total_steps - 1 = 298, nor off the grid.
    for step in (0, 1, 99, 150, 298, 299, 300, 400):
        assert auto.maybe_reestimate(step) is None, step
    assert len(auto.report.history) == 1
    record = auto.maybe_reestimate(100)
    assert record is not None and record.step == 100 and record.status == "ok"
    assert auto.report.history[-1] == record and auto.phi == record.phi
    never = auto_uba(model, problem.batches, 300, **kw)
    assert never.maybe_reestimate(100) is None
    with pytest.raises(ValueError, match="step must be >= 0"):
        auto.maybe_reestimate(-1)


def test_the_scheduler_delegates_every_step_to_maybe_reestimate(monkeypatch):
    problem, model = setup()
    opt = sgd(model)
    kw = dict(loss_fn=problem.loss, reestimate_every=5, **CHEAP)
    auto = auto_uba(model, problem.batches, 300, optimizer=opt, **kw)
    # Due at step 100, but the scheduler is at step 0: refused rather than re-shaping elsewhere.
    with pytest.raises(ValueError, match=r"step must be the scheduler's step \(0\), got 100"):
        auto.maybe_reestimate(100)
    seen: list[int] = []
    monkeypatch.setattr(auto, "maybe_reestimate", lambda step: seen.append(step))
    advance(auto, 12)
    assert seen == list(range(1, 13))


def test_maybe_reestimate_through_the_scheduler_equals_reestimate():
    problem, model = setup()
    # max_hvps: probes of a fixed size (the plan's shares depend on reestimate_every, unset below)
    kw = dict(loss_fn=problem.loss, reestimate_every=50, max_hvps=100, **CHEAP)
    driven = auto_uba(model, problem.batches, 200, optimizer=sgd(model), **kw)
    by_hand = auto_uba(model, problem.batches, 200, optimizer=sgd(model), **kw)
    by_hand.reestimate_every = None  # the plan says never: re-estimate by hand at the same steps
    for step in range(1, 120):
        advance(driven, 1)
        advance(by_hand, 1)
        if step % 50 == 0:
            by_hand.reestimate()
    strip = [dataclasses.replace(r, seconds=0.0) for r in driven.report.history]
    assert strip == [dataclasses.replace(r, seconds=0.0) for r in by_hand.report.history]
    assert driven.scheduler.phi_history == by_hand.scheduler.phi_history


# -- the state and its dict ------------------------------------------------------------------------
def test_the_state_dict_round_trips_and_stores_the_history_once():
    problem, model = setup()
    kw = dict(loss_fn=problem.loss, reestimate_every=50, **CHEAP)
    opt = sgd(model)
    auto = auto_uba(model, problem.batches, 200, optimizer=opt, **kw)
    advance(auto, 101)
    saved = through_torch_save(auto.state_dict())
    assert "history" not in saved["report"] and len(saved["history"]) == 3
    settings = auto._settings
    state = AutoState.from_dict(saved, settings)
    assert isinstance(state.peak, PeakRate) and state.peak.value == 0.05
    assert state.to_dict(settings, scheduler=None, batches_drawn=saved["batches_drawn"]) == saved
    resumed = auto_uba(model, problem.batches, 200, optimizer=sgd(model), resume_from=saved, **kw)
    assert resumed.state_dict() == saved
    assert resumed.report.history == auto.report.history
    # Resumed without an optimizer, the saved scheduler is kept until make_scheduler.
    pending = auto_uba(model, problem.batches, 200, resume_from=saved, **kw)
    assert pending.state_dict() == saved


def test_a_state_dict_whose_report_holds_a_copy_of_the_history_still_loads():
    problem, model = setup()
    kw = dict(loss_fn=problem.loss, reestimate_every=50, **CHEAP)
    auto = auto_uba(model, problem.batches, 200, optimizer=sgd(model), **kw)
    advance(auto, 51)
    new = auto.state_dict()
    old = {**new, "report": auto.report.to_dict()}  # the format before the history was kept once
    assert len(old["report"]["history"]) == 2
    resumed = auto_uba(model, problem.batches, 200, optimizer=sgd(model), resume_from=old, **kw)
    assert resumed.state_dict() == new


def test_settings_are_checked_when_assigned():
    problem, model = setup()
    auto = auto_uba(model, problem.batches, 50, loss_fn=problem.loss, **CHEAP)
    auto.probe_fraction = 0.5
    assert auto.probe_fraction == 0.5 and auto.state_dict()["settings"]["probe_fraction"] == 0.5
    with pytest.raises(ValueError, match="probe_fraction must lie in"):
        auto.probe_fraction = 2.0
    assert auto.probe_fraction == 0.5
    assert isinstance(auto._settings, AutoSettings) and auto._settings.total_steps == 49


# -- a failed transition leaves the AutoUBA as it was ----------------------------------------------
def test_a_failing_make_scheduler_leaves_the_auto_uba_as_it_was():
    problem, model = setup()
    kw = dict(loss_fn=problem.loss, reestimate_every=50, **CHEAP)
    auto = auto_uba(model, problem.batches, 200, optimizer=sgd(model), **kw)
    advance(auto, 60)
    saved = through_torch_save(auto.state_dict())
    resumed = auto_uba(model, problem.batches, 200, resume_from=saved, **kw)
    report, state = resumed.report, resumed.state_dict()
    params = list(model.parameters())
    two_groups = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.05)
    # Fails after the scheduler was built, while loading the saved schedule into it.
    with pytest.raises(ValueError, match="param groups"):
        resumed.make_scheduler(two_groups)
    assert resumed.scheduler is None and resumed.report is report
    assert resumed.state_dict() == state
    # A retry with the right optimizer continues the saved schedule.
    sched = resumed.make_scheduler(sgd(model))
    assert sched.last_epoch == 60 and sched.phi == auto.scheduler.phi


def test_a_reestimation_that_raises_commits_nothing(monkeypatch):
    problem, model = setup()
    kw = dict(loss_fn=problem.loss, reestimate_every=50, **CHEAP)
    auto = auto_uba(model, problem.batches, 200, optimizer=sgd(model), **kw)
    advance(auto, 49)
    before = auto.state_dict()

    def broken_group(*args, **kwargs):
        raise RuntimeError("[third_party/gloo] Connection closed by peer")

    with monkeypatch.context() as m:
        m.setattr("uba_auto.auto._autouba.run_probe", broken_group)
        with pytest.raises(RuntimeError, match="Connection closed"):
            advance(auto, 1)  # step 50: due; the process group is broken
    after = auto.state_dict()
    # The batches it drew are spent (a loader cannot be rewound); nothing else moved.
    assert after["batches_drawn"] == before["batches_drawn"] + 2
    assert state_without(after, "batches_drawn", "scheduler") == state_without(
        before, "batches_drawn", "scheduler"
    )
    assert auto.scheduler.phi_history == []

    def refuse(phi):
        raise ValueError("refused")

    auto.scheduler.set_phi = refuse  # fails after a successful probe: nothing is committed
    before = auto.state_dict()
    with pytest.raises(ValueError, match="refused"):
        auto.reestimate()
    after = auto.state_dict()
    assert after["probe_hvps"] == before["probe_hvps"] and after["history"] == before["history"]


def test_a_failed_probe_only_appends_its_record(monkeypatch):
    problem, model = setup()
    kw = dict(loss_fn=problem.loss, reestimate_every=50, **CHEAP)
    auto = auto_uba(model, problem.batches, 200, optimizer=sgd(model), **kw)
    before = auto.state_dict()

    def failing(*args, **kwargs):
        raise ValueError("no curvature today")

    monkeypatch.setattr("uba_auto.auto._autouba.run_probe", failing)
    with pytest.warns(RuntimeWarning, match="re-estimation at step 0 failed, phi kept"):
        record = auto.reestimate()
    assert record.status == "failed" and record.hvps == 0 and "no curvature today" in record.message
    after = auto.state_dict()
    assert after["history"] == [*before["history"], record.to_row()]
    keep = ("history", "batches_drawn")
    assert state_without(after, *keep) == state_without(before, *keep)


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (dict(max_hvp=40), TypeError, r"unexpected keyword argument\(s\) \['max_hvp'\].*max_hvps"),
        (dict(trace_matvecs=2), ValueError, "trace_matvecs"),
    ],
)
def test_probe_keywords_are_checked_before_any_probe(monkeypatch, extra, error, match):
    problem, model = setup()

    def no_probe(*args, **kwargs):
        raise AssertionError("probed before the keywords were checked")

    monkeypatch.setattr("uba_auto.auto._autouba.run_probe", no_probe)
    loader = iter(problem.batches)  # a one-shot iterator: a check after drawing would lose batches
    with pytest.raises(error, match=match):
        auto_uba(model, loader, 200, loss_fn=problem.loss, **{**CHEAP, **extra})
    assert len(list(loader)) == len(problem.batches)  # nothing drawn


def test_a_failed_load_state_dict_leaves_the_object_and_its_scheduler_as_they_were():
    from uba_auto.report import ReestimationRecord

    problem = make_problem("tanh_mlp", num_batches=6, seed=2)
    model = problem.model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kw = dict(loss_fn=problem.loss, num_batches=2, density=False, trace=False)
    kw.update(reestimate_every=10, probe_fraction=1.0, max_hvps=8)
    auto = auto_uba(model, problem.batches, 100, optimizer=opt, **kw)
    for _ in range(15):
        opt.step()
        auto.scheduler.step()  # one re-estimation at step 10
    saved = auto.state_dict()
    # A state whose history disagrees with its scheduler (phi of the last record changed).
    bad = dict(saved, history=[list(row) for row in saved["history"]])
    last = ReestimationRecord.from_row(bad["history"][-1])
    bad["history"][-1] = dataclasses.replace(last, phi=last.phi * 3 + 1).to_row()
    for _ in range(5):
        opt.step()
        auto.scheduler.step()
    before_sched, before_drawn = auto.scheduler.state_dict(), auto.batches_drawn
    before_report = auto.report
    with pytest.raises(ValueError, match="inconsistent"):
        auto.load_state_dict(bad)
    assert auto.scheduler.state_dict() == before_sched
    assert auto.batches_drawn == before_drawn and auto.report is before_report
    auto.load_state_dict(saved)  # the good state still loads
    assert auto.scheduler.last_epoch == 15
