"""The φ study's tools: WSD with a chosen cool-down in ``benchmarks/train.py`` and the sweep's
``--extend`` mode (new schedules added to a stored sweep at its tuned peaks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/

from benchmarks import phi_sweep
from benchmarks.tasks import get_task
from benchmarks.train import RunResult, ScheduleSpec, train


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_wsd_spec_cools_down_over_its_fraction_of_the_run(fraction):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = ScheduleSpec("wsd", decay_fraction=fraction).factory(101)(opt)
    rates = []
    for _ in range(101):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    total = 100  # total_steps = budget - 1
    start = total - fraction * total
    for t, lr in enumerate(rates):
        expected = 1.0 if t <= start else (total - t) / (total - start)
        assert lr == pytest.approx(expected, abs=1e-12), t


def test_wsd_spec_labels_and_refuses_the_fraction_elsewhere():
    assert ScheduleSpec("wsd").label == "wsd"
    assert ScheduleSpec("wsd", decay_fraction=0.1).label == "wsd10"
    with pytest.raises(ValueError, match="decay_fraction"):
        ScheduleSpec("cosine", decay_fraction=0.1)
    task = get_task("lstsq_illcond")
    run = train(task, ScheduleSpec("wsd", decay_fraction=0.1), 20, seed=0, peak_lr=1.0)
    assert run.label == "wsd10" and run.decay_fraction == 0.1
    assert RunResult(**{**run.__dict__, "decay_fraction": None}).label == "wsd"


def _stored_cell(task, budget, peak, seeds, specs):
    runs = {
        s.label: [train(task, s, budget, seed, peak).to_dict() for seed in seeds] for s in specs
    }
    schedules = {k: phi_sweep._summarise_runs(v) for k, v in runs.items()}
    return {
        "task": task.name,
        "budget": budget,
        "peak_lr": peak,
        "runs": runs,
        "schedules": schedules,
    }


def test_extend_adds_only_the_missing_schedules_and_rechooses_the_best_phi(monkeypatch):
    task = get_task("lstsq_illcond")
    budget, peak, seeds = 30, 1.0, [0, 1]
    monkeypatch.setattr(phi_sweep, "PHIS", (0.5, 1.0, 2.0))
    monkeypatch.setattr(phi_sweep, "BASELINES", ("cosine", "wsd10"))
    stored = [ScheduleSpec("cosine"), ScheduleSpec("uba", 1.0), ScheduleSpec("uba", 2.0)]
    old = {"cells": [_stored_cell(task, budget, peak, seeds, stored)]}
    (cell,) = phi_sweep._extend(old, None, seeds, workers=1)
    assert cell["extended_with"] == ["phi=0.5", "wsd10"]
    assert cell["runs"]["phi=1"] == old["cells"][0]["runs"]["phi=1"]  # stored runs kept
    for label, spec in (
        ("phi=0.5", ScheduleSpec("uba", 0.5)),
        ("wsd10", ScheduleSpec("wsd", decay_fraction=0.1)),
    ):
        fresh = [train(task, spec, budget, s, peak).final_heldout_loss for s in seeds]
        assert cell["schedules"][label]["heldout_loss_per_seed"] == pytest.approx(fresh)
    means = {p: cell["schedules"][f"phi={p:g}"]["heldout_loss_mean"] for p in (0.5, 1.0, 2.0)}
    assert cell["best_phi"] == min(means, key=means.get)
    cos = cell["schedules"]["cosine"]["heldout_loss_mean"]
    assert cell["cosine_gap_to_best_phi_pct"] == pytest.approx(
        100 * (cos - min(means.values())) / min(means.values())
    )


@pytest.mark.parametrize("budget", [200, 2000])
def test_default_link_keeps_cosine_where_small_phi_diverges(budget):
    """``digits_cnn`` at its cosine-tuned peak (0.08, momentum 0.9) sits where φ < 2 diverged in
    the sweep (BENCHMARKS.md §2): the default link must not pick φ < 2 there."""
    import itertools

    import uba_auto

    task = get_task("digits_cnn")
    model = task.make_model(0)
    batches = list(itertools.islice(task.batches(0), 8))
    opt = task.make_optimizer(model, 0.08)
    auto = uba_auto.auto_uba(model, batches, budget, loss_fn=task.loss_fn, optimizer=opt)
    assert auto.phi >= 2.0, auto.report.reason
