"""auto_uba end to end on tiny models: scheduler, report, re-estimation, resume, bad input."""

from __future__ import annotations

import io
import itertools
import json
import math
import warnings
from dataclasses import replace

import pytest
import torch
from _models import make_problem
from _state_checks import assert_state_unchanged, snapshot_state
from torch import nn

from uba_auto import CurvatureReport, ModelLoss, auto_uba
from uba_auto.auto import HVP_COST_IN_GRADIENTS, AutoUBAScheduler
from uba_auto.phi import (
    EDGE_FRACTION,
    EDGE_PHI,
    FALLBACK_PHI,
    GATE_NOISE,
    SUGGESTED_SHARE,
    optimizer_stability,
)
from uba_auto.schedules import uba_lr


def mlp_setup(num_batches: int = 6, seed: int = 2):
    problem = make_problem("tanh_mlp", num_batches=num_batches, seed=seed)
    model = problem.model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return problem, model, opt


def train(model, opt, sched, batches, steps, record=None):
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if record is not None:
            record.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_three_argument_call_works_and_is_useful():
    problem, model, _ = mlp_setup()
    snap = snapshot_state(model)
    auto = auto_uba(model, problem.batches, 50)
    assert_state_unchanged(model, snap)
    assert auto.scheduler is None and 0.25 <= auto.phi <= 16
    report = auto.report
    # No optimizer: the plain-SGD suggestion, a share of the limit 2 over lambda_max.
    share = SUGGESTED_SHARE["hessian"]
    assert report.peak_lr == pytest.approx(share * 2 / report.estimate.lambda_max)
    assert "no optimizer" in report.peak_lr_source
    assert report.optimizer_sharpness is None and "sharpness the optimizer" not in str(report)
    assert "cross_entropy" in report.loss_guess and str(report).startswith("! loss guessed")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = auto.make_scheduler(opt)
    assert isinstance(sched, AutoUBAScheduler) and auto.scheduler is sched
    # The assumed peak is replaced by the optimizer's, in the report too.
    assert auto.report.peak_lr == 0.05 and "make_scheduler" in auto.report.peak_lr_source
    assert not any("re-estimations will be skipped" in w for w in report.warnings)
    used: list = []
    train(model, opt, sched, problem.batches, 50, record=used)
    assert used[-1] == 0.0  # lr_min on the last step of the budget
    expected = [uba_lr(t, 49, phi=auto.phi, lr_max=0.05) for t in range(50)]
    assert used == expected


def test_with_optimizer_warmup_and_lr_min():
    problem, model, opt = mlp_setup()
    auto = auto_uba(
        model, problem.batches, 40, optimizer=opt, loss_fn=problem.loss, warmup_steps=5, lr_min=1e-3
    )
    used: list = []
    train(model, opt, auto.scheduler, problem.batches, 40, record=used)
    assert used[0] == 0.0 and used[5] == 0.05 and used[-1] == 1e-3
    assert auto.report.peak_lr == 0.05 and "optimizer" in auto.report.peak_lr_source


def test_report_text_json_and_plot(tmp_path):
    problem, model, opt = mlp_setup()
    auto = auto_uba(model, problem.batches, 100, optimizer=opt, loss_fn=problem.loss)
    text = str(auto.report)
    for needle in (
        "λ_max",
        "λ_min",
        "smallest positive",
        "trace",
        "κ used for φ",
        "φ chosen",
        "why",
        "probe cost",
        "HVPs",
        "curvature noise",
    ):
        assert needle in text, needle
    data = json.loads(auto.report.to_json())
    assert (
        data["phi"] == auto.phi
        and data["estimate"]["lambda_max"] == auto.report.estimate.lambda_max
    )
    assert data["history"][0]["status"] == "ok"
    pytest.importorskip("matplotlib")
    fig = auto.report.plot()
    assert len(fig.axes) == 2
    fig.savefig(tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_reestimation_keeps_lr_continuous_and_history():
    problem, model, opt = mlp_setup(num_batches=8)
    auto = auto_uba(
        model,
        problem.batches,
        600,
        optimizer=opt,
        loss_fn=problem.loss,
        num_batches=2,
        reestimate_every=200,
        probe_fraction=1.0,
        density=False,
        per_batch=False,
        trace=False,
    )
    used: list = []
    sched = auto.scheduler
    for t in range(600):
        x, y = problem.batches[t % 8]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        before = opt.param_groups[0]["lr"]
        sched.step()
        if sched.last_epoch in (200, 400):
            # The re-estimate happened inside step(): the rate just set is the plan's, unjumped.
            assert opt.param_groups[0]["lr"] == sched.lr_at(sched.last_epoch)[0]
            assert opt.param_groups[0]["lr"] <= before
    history = auto.report.history
    assert [r.step for r in history] == [0, 200, 400]
    assert all(r.status == "ok" and r.hvps > 0 for r in history)
    assert [c.step for c in sched.phi_history] == [200, 400]
    assert used[-1] == 0.0
    assert all(b <= a for a, b in itertools.pairwise(used))
    # Every probe's graph setup (1.5 gradients per batch, 3 probes of 2) and its HVPs.
    assert auto.probe_cost_fraction == pytest.approx(
        (sum(r.hvps for r in history) * HVP_COST_IN_GRADIENTS + 3 * 2 * 1.5) / 600
    )


def test_reestimation_is_skipped_beyond_the_probe_budget():
    problem, model, opt = mlp_setup()
    auto = auto_uba(
        model,
        problem.batches,
        30,
        optimizer=opt,
        loss_fn=problem.loss,
        reestimate_every=10,
        probe_fraction=0.02,
        density=False,
    )
    assert any("re-estimations will be skipped" in w for w in auto.report.warnings)
    train(model, opt, auto.scheduler, problem.batches, 30)
    assert [r.status for r in auto.report.history] == ["ok", "skipped", "skipped"]
    assert auto.scheduler.phi_history == []


def test_failed_reestimation_keeps_phi_and_training_goes_on():
    problem, model, opt = mlp_setup(num_batches=4)
    bad = [(x * float("nan"), y) for x, y in problem.batches]
    auto = auto_uba(
        model,
        problem.batches[:2] + bad,
        300,
        optimizer=opt,
        loss_fn=problem.loss,
        num_batches=2,
        reestimate_every=100,
        probe_fraction=1.0,
        density=False,
        per_batch=False,
        trace=False,
    )
    phi0 = auto.phi
    with pytest.warns(RuntimeWarning, match="re-estimation at step 100 failed, phi kept"):
        train(model, opt, auto.scheduler, problem.batches, 150)
    record = auto.report.history[1]
    assert record.status == "failed" and "not finite" in record.message
    assert auto.phi == phi0 and auto.scheduler.phi_history == []


def test_resume_is_bit_exact():
    def run(stop_at=None, state=None):
        problem, model, opt = mlp_setup(num_batches=8)
        auto = auto_uba(
            model,
            problem.batches,
            600,
            optimizer=opt,
            loss_fn=problem.loss,
            num_batches=2,
            reestimate_every=150,
            probe_fraction=1.0,
            density=False,
            per_batch=False,
            trace=False,
        )
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            auto.load_state_dict(state["auto"])
            start = state["step"]
        used: list = []
        for t in range(start, 600 if stop_at is None else stop_at):
            x, y = problem.batches[t % 8]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            auto.scheduler.step()
        buf = io.BytesIO()
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "auto": auto.state_dict(),
                "step": stop_at,
            },
            buf,
        )
        buf.seek(0)
        return used, auto, buf

    full, auto_full, _ = run()
    first, _, buf = run(stop_at=250)
    state = torch.load(buf, weights_only=True)
    rest, auto_resumed, _ = run(state=state)
    assert first + rest == full
    assert auto_resumed.scheduler.phi_history == auto_full.scheduler.phi_history
    assert [r.phi for r in auto_resumed.report.history] == [r.phi for r in auto_full.report.history]
    assert len(auto_full.scheduler.phi_history) == 3


def test_suggested_peak_lr_is_explicit():
    problem, model, opt = mlp_setup()
    auto = auto_uba(
        model, problem.batches, 30, optimizer=opt, loss_fn=problem.loss, peak_lr="suggest"
    )
    limit = optimizer_stability(opt).limit  # the suggestion set the rate; the limit is rate-free
    lr = SUGGESTED_SHARE["hessian"] * limit / auto.report.estimate.lambda_max
    assert auto.suggested_lr == pytest.approx(lr)
    assert auto.report.stability_share == pytest.approx(SUGGESTED_SHARE["hessian"])
    assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    assert any("peak_lr='suggest' set" in w for w in auto.report.warnings)


def test_no_positive_curvature_falls_back_loudly():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(16, 3)
    batches = [(x[:8],), (x[8:],)]
    concave = ModelLoss(lambda m, b: -(m(b[0]) ** 2).mean())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = auto_uba(
            model, batches, 60, optimizer=opt, loss_fn=concave, density=False, probe_fraction=1.0
        )  # 60 steps: room for the warm start's single-batch products and the decision's
    assert auto.phi == FALLBACK_PHI
    assert any("fell back" in w for w in auto.report.warnings)
    assert "fallback" in str(auto.report)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"budget": 10, "warmup_steps": 9}, ValueError, "budget must be > warmup_steps \\+ 1"),
        ({"budget": 1}, ValueError, "budget must be >= 2"),
        ({"budget": 10, "link": "fancy"}, ValueError, "link must be one of"),
        ({"budget": 10, "peak_lr": "max"}, ValueError, "peak_lr must be a number, 'suggest'"),
        ({"budget": 10, "peak_lr": -1.0}, ValueError, "peak_lr must be finite and > 0"),
        ({"budget": 10, "probe_fraction": 2.0}, ValueError, "probe_fraction must lie in"),
        ({"budget": 10, "optimizer": "sgd"}, TypeError, "optimizer must be a torch.optim"),
        ({"budget": 10, "reestimate_every": 0}, ValueError, "reestimate_every must be >= 1"),
        ({"budget": 10, "phi_min": 4.0, "phi_max": 1.0}, ValueError, "phi_min must be <="),
    ],
)
def test_bad_input(kwargs, exc, match):
    problem, model, _ = mlp_setup()
    snap = snapshot_state(model)
    budget = kwargs.pop("budget")
    with pytest.raises(exc, match=match):
        auto_uba(model, problem.batches, budget, **kwargs)
    assert_state_unchanged(model, snap)


def test_empty_loader():
    _, model, _ = mlp_setup()
    with pytest.raises(ValueError, match="loader yielded no batches"):
        auto_uba(model, [], 10)
    with pytest.raises(ValueError, match="no batches"):
        auto_uba(model, [], 10, loss_fn=nn.functional.cross_entropy)


def test_short_loader_is_not_duplicated_and_is_recorded():
    problem, model, _ = mlp_setup(num_batches=3)
    auto = auto_uba(model, problem.batches, 50, loss_fn=problem.loss, num_batches=8)
    est = auto.report.estimate
    assert est.num_batches == 3 and len(est.batch_losses) == 3
    assert any("yielded only 3" in w for w in auto.report.warnings)


def test_shuffling_loader_does_not_move_the_global_rng():
    from torch.utils.data import DataLoader, TensorDataset

    problem, model, opt = mlp_setup()
    xs = torch.cat([b[0] for b in problem.batches])
    ys = torch.cat([b[1] for b in problem.batches])
    loader = DataLoader(TensorDataset(xs, ys), batch_size=8, shuffle=True)
    rng = torch.get_rng_state()
    auto = auto_uba(model, loader, 200, optimizer=opt, density=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert auto.report.estimate.num_batches == 6


def test_suggest_failure_leaves_the_optimizer_as_it_was():
    problem, model, opt = mlp_setup()
    opt.param_groups[0]["lr"] = 50.0
    before = dict(opt.param_groups[0])
    with pytest.raises(ValueError, match="lr_min must be <= the peak rate"):
        auto_uba(
            model,
            problem.batches,
            30,
            optimizer=opt,
            loss_fn=problem.loss,
            peak_lr="suggest",
            lr_min=10.0,
            density=False,
        )
    assert opt.param_groups[0]["lr"] == before["lr"] and "initial_lr" not in opt.param_groups[0]


def test_final_rate_arguments_fail_before_probing():
    problem, model, opt = mlp_setup()
    for kwargs, match in (
        ({"lr_min": 1.0}, "lr_min must be <= the peak rate"),
        ({"lr_min_ratio": 2.0}, "lr_min_ratio must lie in"),
        ({"lr_min": 0.0, "lr_min_ratio": 0.1}, "either lr_min or lr_min_ratio"),
    ):
        with pytest.raises(ValueError, match=match):
            auto_uba(model, problem.batches, 30, optimizer=opt, loss_fn=problem.loss, **kwargs)
    assert "initial_lr" not in opt.param_groups[0]


def test_persistent_worker_loader_is_refused_for_reestimation():
    from torch.utils.data import DataLoader, TensorDataset

    problem, model, _ = mlp_setup()
    xs = torch.cat([b[0] for b in problem.batches])
    ys = torch.cat([b[1] for b in problem.batches])
    loader = DataLoader(TensorDataset(xs, ys), batch_size=8, num_workers=1, persistent_workers=True)
    with pytest.raises(ValueError, match="persistent_workers=True"):
        auto_uba(model, loader, 100, loss_fn=problem.loss, reestimate_every=10)


def test_chebyshev_link_with_a_small_learning_rate_does_not_crash():
    problem, model, _ = mlp_setup()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    auto = auto_uba(
        model,
        problem.batches,
        100,
        optimizer=opt,
        loss_fn=problem.loss,
        link="chebyshev",
        density=False,
    )
    assert auto.report.kappa == 1.0
    assert any("curvature band is empty" in w for w in auto.report.warnings)


def test_numpy_peak_lr_and_strict_json():
    import numpy as np

    problem, model, _ = mlp_setup()
    auto = auto_uba(
        model,
        problem.batches,
        50,
        loss_fn=problem.loss,
        peak_lr=np.float32(0.5),
        trace_matvecs=3,
        density=False,
    )
    assert auto.report.peak_lr == 0.5 and auto.report.peak_lr_source == "given as peak_lr"
    text = auto.report.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite {c} in JSON"))


def test_chebyshev_phi_is_chosen_again_for_the_optimizer_given_later():
    problem, model, _ = mlp_setup()
    auto = auto_uba(model, problem.batches, 50, link="chebyshev", phi_max=1e9, density=False)
    assumed = auto.phi
    auto.make_scheduler(torch.optim.SGD(model.parameters(), lr=1e-4))
    # The budget band's floor 1/(eta T) moves with eta, so chebyshev's phi = 2 kappa does too.
    again = auto_uba(
        model,
        problem.batches,
        50,
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-4),
        link="chebyshev",
        phi_max=1e9,
        density=False,
    )
    assert auto.phi == again.phi != assumed
    assert auto.report.history[0].phi == auto.phi == auto.scheduler.phi


def test_first_reestimation_budget_leaves_out_the_density():
    problem, model, opt = mlp_setup(num_batches=8)
    auto = auto_uba(
        model,
        problem.batches,
        600,
        optimizer=opt,
        loss_fn=problem.loss,
        num_batches=2,
        reestimate_every=200,
        per_batch=False,
        trace=False,
        density=True,  # asked for: computed whatever the plan leaves
    )
    est = auto.report.estimate
    assert est.hvps["density"] > 0
    # Exactly enough budget for the initial probe plus one re-estimation without density.
    expected = est.num_hvps - est.hvps["density"]
    assert auto._expected_reestimation_hvps() == expected
    setup = 2 * 2 * 1.5  # 1.5 gradients per batch, 2 batches per probe
    auto.probe_fraction = ((est.num_hvps + expected) * HVP_COST_IN_GRADIENTS + setup) / 600 + 1e-12
    train(model, opt, auto.scheduler, problem.batches, 201)
    assert [r.status for r in auto.report.history] == ["ok", "ok"]


def test_a_loaders_own_generator_is_not_advanced_by_probing():
    problem = make_problem("tanh_mlp", num_batches=1, batch_size=64)
    x, y = problem.batches[0]
    data = torch.utils.data.TensorDataset(x, y)

    def first_epoch(loader):
        return [b[1].tolist() for b in loader]

    gen = torch.Generator().manual_seed(3)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=gen)
    reference = first_epoch(
        torch.utils.data.DataLoader(
            data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)
        )
    )
    state = gen.get_state()
    auto = auto_uba(problem.model, loader, 50, num_batches=2, density=False, trace=False)
    assert torch.equal(gen.get_state(), state)
    assert first_epoch(loader) == reference
    # A sampler with its own generator too.
    sgen = torch.Generator().manual_seed(4)
    sampler = torch.utils.data.RandomSampler(data, generator=sgen)
    state = sgen.get_state()
    auto = auto_uba(
        problem.model,
        torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler),
        50,
        num_batches=2,
        density=False,
        trace=False,
    )
    assert torch.equal(sgen.get_state(), state) and auto.report.estimate.num_batches == 2


def test_reestimation_records_its_probes_warnings_and_they_survive_resume():
    problem, model, opt = mlp_setup(num_batches=8)
    settings = dict(
        loss_fn=problem.loss,
        num_batches=2,
        reestimate_every=300,
        probe_fraction=1.0,
        density=False,
        trace=False,
        per_batch=False,
    )
    auto = auto_uba(model, problem.batches, 600, optimizer=opt, **settings)
    auto.probe_kwargs["max_hvps"] = 4  # starve the re-estimation: it cannot converge
    train(model, opt, auto.scheduler, problem.batches, 301)
    record = auto.report.history[1]
    assert record.status == "ok" and any("converge" in w for w in record.warnings)
    assert f"! step 300: {record.warnings[0]}" in str(auto.report)
    state = torch.load(_saved(auto.state_dict()), weights_only=True)
    fresh = auto_uba(
        model,
        problem.batches,
        600,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        resume_from=state,
        **settings,
    )
    assert fresh.report.history[1] == record


def test_make_scheduler_twice_is_refused():
    problem, model, opt = mlp_setup()
    auto = auto_uba(model, problem.batches, 50, optimizer=opt, density=False)
    with pytest.raises(ValueError, match="make_scheduler was already called"):
        auto.make_scheduler(opt)


def test_resuming_with_other_settings_is_refused_and_names_them():
    problem, model, opt = mlp_setup()
    auto = auto_uba(model, problem.batches, 100, optimizer=opt, density=False, warmup_steps=5)
    state = auto.state_dict()
    with pytest.raises(ValueError, match=r"budget=100 \(now 500\), warmup_steps=5 \(now 0\)"):
        auto_uba(model, problem.batches, 500, optimizer=opt, density=False, resume_from=state)
    with pytest.raises(ValueError, match="it has no 'history'"):
        auto.load_state_dict({k: v for k, v in state.items() if k != "history"})


def test_resuming_a_state_saved_before_make_scheduler_keeps_the_assumed_peak_open():
    problem, model, _ = mlp_setup()
    kw = dict(link="chebyshev", phi_max=1e9, density=False)
    auto = auto_uba(model, problem.batches, 50, **kw)
    clamp_free = auto_uba(
        model, problem.batches, 50, optimizer=torch.optim.SGD(model.parameters(), lr=1e-4), **kw
    )
    resumed = auto_uba(model, problem.batches, 50, resume_from=auto.state_dict(), **kw)
    resumed.make_scheduler(torch.optim.SGD(model.parameters(), lr=1e-4))
    assert resumed.phi == clamp_free.phi and resumed.report.peak_lr == 1e-4


def test_rechoosing_phi_replaces_the_clamp_warning():
    problem, model, _ = mlp_setup()
    auto = auto_uba(model, problem.batches, 50, link="chebyshev", density=False, max_hvps=600)
    assert auto.report.clamped and any("clamp" in w for w in auto.report.warnings)
    auto.make_scheduler(torch.optim.SGD(model.parameters(), lr=1e-4))
    assert not auto.report.clamped
    assert not any("clamp" in w for w in auto.report.warnings)


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_report_round_trips_through_from_dict_and_json():
    problem, model, opt = mlp_setup()
    report = auto_uba(
        model, problem.batches, 100, optimizer=opt, loss_fn=problem.loss, max_hvps=600, density=True
    ).report
    assert report.estimate.density is not None
    back = CurvatureReport.from_dict(json.loads(report.to_json()))
    assert back.to_dict() == report.to_dict() and str(back) == str(report)
    assert torch.equal(back.estimate.density.num_nodes, report.estimate.density.num_nodes)
    with pytest.raises(ValueError, match="no 'phi'"):
        CurvatureReport.from_dict({k: v for k, v in report.to_dict().items() if k != "phi"})


def _shuffled_loader(problem, seed):
    x = torch.cat([b[0] for b in problem.batches])
    y = torch.cat([b[1] for b in problem.batches])
    gen = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=gen)


@pytest.mark.parametrize("optimizer_at_resume", [True, False])
def test_resume_from_skips_the_probe_and_continues_bit_exactly(monkeypatch, optimizer_at_resume):
    settings = dict(
        num_batches=2,
        reestimate_every=100,
        probe_fraction=1.0,
        density=False,
        per_batch=False,
        trace=False,
    )

    def run(steps, state=None):
        problem, model, opt = mlp_setup(num_batches=8)
        loader = _shuffled_loader(problem, seed=11)
        if state is None:
            auto = auto_uba(model, loader, 400, optimizer=opt, **settings)
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            with monkeypatch.context() as m:  # resuming must not probe
                m.setattr("uba_auto.auto._autouba.run_probe", None)
                auto = auto_uba(
                    model,
                    loader,
                    400,
                    optimizer=opt if optimizer_at_resume else None,
                    resume_from=state["auto"],
                    **settings,
                )
            if not optimizer_at_resume:
                auto.make_scheduler(opt)
        used = []
        for t in range(auto.scheduler.last_epoch, steps):
            x, y = problem.batches[t % 8]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            auto.scheduler.step()
        saved = {"model": model.state_dict(), "opt": opt.state_dict(), "auto": auto.state_dict()}
        return used, auto, torch.load(_saved(saved), weights_only=True)

    full, auto_full, _ = run(400)
    first, auto_first, state = run(150)
    rest, auto_resumed, _ = run(400, state)
    assert len(first) == 150 and first + rest == full

    def timeless(auto):
        return [replace(r, seconds=0.0) for r in auto.report.history]

    assert timeless(auto_resumed) == timeless(auto_full)
    assert [r.status for r in auto_full.report.history] == ["ok", "ok", "ok", "ok"]
    assert auto_resumed.report.estimate.to_dict() == auto_first.report.estimate.to_dict()
    assert auto_resumed.probe_hvps == auto_full.probe_hvps


def test_resume_from_a_foreign_state_is_refused():
    problem, model, _ = mlp_setup()
    with pytest.raises(ValueError, match="state must come from AutoUBA.state_dict"):
        auto_uba(model, problem.batches, 50, resume_from={"version": 99})


def test_report_says_when_the_trace_has_no_error_bar():
    problem, model, _ = mlp_setup()
    auto = auto_uba(model, problem.batches, 50, trace_matvecs=3, density=False, trace=True)
    assert math.isnan(auto.report.estimate.trace_std_error)
    assert "no error bar" in str(auto.report) and "nan" not in str(auto.report)


# -- the gated-edge link: the optimizer's stability edge -------------------------------------------
def _edge_auto(model, problem, optimizer, **kw):
    kw = {"link": "gated-edge", "density": False, **kw}
    return auto_uba(model, problem.batches, 50, optimizer=optimizer, loss_fn=problem.loss, **kw)


@pytest.mark.parametrize(
    "make_opt,limit",
    [
        (lambda p: torch.optim.SGD(p, lr=0.01), 2.0),
        (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), 3.8),
        (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True), 3.8 / 2.8),
    ],
)
def test_gated_edge_reads_the_sgd_stability_limit(make_opt, limit):
    problem, model, _ = mlp_setup()
    auto = _edge_auto(model, problem, make_opt(model.parameters()))
    report = auto.report
    assert report.estimate.curvature_noise >= GATE_NOISE  # the noise gate alone says cosine
    assert report.edge_fraction == pytest.approx(0.01 * report.estimate.lambda_max / limit)
    assert report.edge_fraction < EDGE_FRACTION
    assert auto.phi == auto.scheduler.phi == report.history[0].phi == EDGE_PHI
    assert "far below the edge" in report.reason
    assert "share of stability limit" in str(report)
    assert CurvatureReport.from_dict(report.to_dict()).edge_fraction == report.edge_fraction
    # A peak near the edge (or the plain gated link) keeps cosine.
    near = _edge_auto(model, problem, torch.optim.SGD(model.parameters(), lr=0.5))
    assert near.report.edge_fraction >= EDGE_FRACTION and near.phi == 2.0
    default = auto_uba(model, problem.batches, 50, optimizer=make_opt(model.parameters()))
    assert default.phi == 2.0 and default.report.edge_fraction is None  # the gated link


def test_gated_edge_reads_adams_limit_on_the_preconditioned_curvature():
    problem, model, _ = mlp_setup()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    auto = _edge_auto(model, problem, opt)
    report = auto.report
    assert report.estimate.optimizer == "Adam" and report.estimate.preconditioner is not None
    assert report.stability_limit == pytest.approx(38.0)
    assert report.optimizer_sharpness == report.estimate.lambda_max  # no coupled decay
    assert report.edge_fraction == pytest.approx(1e-4 * report.estimate.lambda_max / 38.0)
    assert report.stability_share == report.edge_fraction
    assert auto.phi == EDGE_PHI and "far below the edge" in report.reason
    text = str(report)
    assert "P^-1/2 A P^-1/2" in text and "share of stability limit" in text
    # An optimizer without a derived limit keeps the edge gate off, and says so.
    nadam = _edge_auto(model, problem, torch.optim.NAdam(model.parameters(), lr=1e-4))
    assert nadam.report.edge_fraction is None and nadam.phi == 2.0
    assert "edge gate off" in nadam.report.reason
    assert "share of stability limit" not in str(nadam.report)


def test_gated_edge_applies_when_the_sgd_optimizer_comes_at_make_scheduler():
    problem, model, _ = mlp_setup()
    kw = dict(loss_fn=problem.loss, density=False, link="gated-edge")
    auto = auto_uba(model, problem.batches, 50, **kw)
    assert auto.report.edge_fraction is None and auto.phi == 2.0
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    auto.make_scheduler(opt)
    direct = _edge_auto(model, problem, torch.optim.SGD(model.parameters(), lr=0.01))
    assert auto.report.edge_fraction == direct.report.edge_fraction
    assert auto.phi == auto.scheduler.phi == auto.report.history[0].phi == EDGE_PHI
    # With a peak_lr given up front, the edge uses it once the optimizer tells the momentum.
    given = auto_uba(model, problem.batches, 50, peak_lr=1.0, **kw)
    given.make_scheduler(torch.optim.SGD(model.parameters(), lr=0.01))
    assert given.report.edge_fraction == pytest.approx(given.report.estimate.lambda_max / 2.0)
    assert given.phi == 2.0


def test_reestimation_keeps_the_initial_edge_and_resume_restores_it():
    problem, model, opt = mlp_setup(num_batches=8)
    opt.param_groups[0]["lr"] = 0.01
    kw = dict(num_batches=2, probe_fraction=1.0, density=False, per_batch=False, trace=False)
    kw["link"] = "gated-edge"
    auto = auto_uba(model, problem.batches, 400, optimizer=opt, loss_fn=problem.loss, **kw)
    edge = auto.report.edge_fraction
    train(model, opt, auto.scheduler, problem.batches, 100)
    record = auto.reestimate()
    assert record.status == "ok" and record.phi == EDGE_PHI == auto.scheduler.phi
    assert f"{edge:.3g} of the optimizer's stability limit at init" in record.message
    state = auto.state_dict()
    assert state["edge_fraction"] == edge
    resumed = auto_uba(model, problem.batches, 400, resume_from=state, loss_fn=problem.loss, **kw)
    assert resumed.report.edge_fraction == edge
    # An optimizer met only at resume does not re-choose the saved run's phi.
    resumed.make_scheduler(torch.optim.SGD(model.parameters(), lr=0.5))
    assert resumed.phi == EDGE_PHI and resumed.report.edge_fraction == edge


def test_sgd_settings_outside_the_edge_analysis_do_not_break_any_link():
    problem, model, _ = mlp_setup()
    for opt in (
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=1.0),
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, dampening=1.0),
    ):
        assert auto_uba(model, problem.batches, 50, optimizer=opt, density=False).phi == 2.0
        edge = _edge_auto(model, problem, opt)
        assert edge.report.edge_fraction is None and "edge gate off" in edge.report.reason


def test_gated_edge_counts_weight_decay_as_curvature():
    problem, model, _ = mlp_setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=0.5)
    auto = _edge_auto(model, problem, opt)
    report = auto.report
    assert report.edge_fraction == pytest.approx(0.01 * (report.estimate.lambda_max + 0.5) / 2)
    assert auto.state_dict()["stability"] == [2.0, 0.5]  # (limit, weight decay), for a resume


def test_failed_make_scheduler_leaves_the_choice_as_it_was():
    problem, model, _ = mlp_setup()
    kw = dict(loss_fn=problem.loss, density=False, link="gated-edge", peak_lr=0.01, lr_min=0.02)
    auto = auto_uba(model, problem.batches, 50, **kw)
    before = auto.report
    with pytest.raises(ValueError, match="lr_min"):
        auto.make_scheduler(torch.optim.SGD(model.parameters(), lr=0.01))
    assert auto.report is before and auto.scheduler is None and auto._stability is None
    # A retry with another optimizer reads that optimizer's limit.
    auto.make_scheduler(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    assert auto.report.edge_fraction == pytest.approx(0.01 * auto.report.estimate.lambda_max / 3.8)


def test_reestimation_before_make_scheduler_is_the_phi_the_scheduler_starts_from():
    problem, model, _ = mlp_setup(num_batches=8)
    # Chebyshev's phi = 2 kappa moves with the batches probed, so a re-estimate changes it.
    kw = dict(num_batches=2, probe_fraction=1.0, density=False, link="chebyshev", phi_max=1e9)
    auto = auto_uba(model, problem.batches, 1000, loss_fn=problem.loss, peak_lr=0.01, **kw)
    record = auto.reestimate()
    assert record.status == "ok" and record.phi != auto.report.phi and auto.phi == record.phi
    sched = auto.make_scheduler(torch.optim.SGD(model.parameters(), lr=0.01))
    assert sched.phi == auto.phi == auto.report.history[-1].phi == record.phi
    state = auto.state_dict()
    resumed = auto_uba(
        model,
        problem.batches,
        1000,
        loss_fn=problem.loss,
        peak_lr=0.01,
        **kw,
        resume_from=state,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
    )
    assert resumed.phi == record.phi


def test_a_choice_that_fails_after_the_probe_leaves_a_suggested_optimizer_as_it_was(monkeypatch):
    problem, model, opt = mlp_setup()
    before = [dict(g) for g in opt.param_groups]

    def failing_choice(*args, **kwargs):
        raise RuntimeError("the choice failed")

    monkeypatch.setattr("uba_auto.auto._autouba.choose", failing_choice)
    with pytest.raises(RuntimeError, match="the choice failed"):
        auto_uba(model, problem.batches, 30, optimizer=opt, loss_fn=problem.loss, peak_lr="suggest")
    assert [dict(g) for g in opt.param_groups] == before  # the suggestion was never written
