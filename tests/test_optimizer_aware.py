"""The probe, the report and auto_uba with the curvature the optimizer sees (issue 12).

Ground truth: the dense float64 Hessian (torch.func) preconditioned by P computed here from the
optimizer's state with torch's own formula; the optimizer's state_dict bit-identical after.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import tanh_mlp
from _reference import F64, _Reference
from _state_checks import assert_state_unchanged, snapshot_state
from torch import nn

from uba_auto import CurvatureReport, auto_uba, probe_curvature
from uba_auto.phi import SUGGESTED_SHARE, optimizer_stability

LOSS = nn.functional.cross_entropy


def _problem():
    problem = tanh_mlp(num_batches=4, seed=5)
    problem.model.double()
    problem.batches = [(x.double(), y) for x, y in problem.batches]
    return problem


def _steps(model, opt, batches, n):
    for i in range(n):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()


def _optimizer_state(opt):
    """The optimizer's state_dict, deep-copied (tensors and step counters)."""
    return copy.deepcopy(opt.state_dict())


def _assert_same_state(opt, saved):
    now = opt.state_dict()
    assert now["param_groups"] == saved["param_groups"]
    assert set(now["state"]) == set(saved["state"])
    for key, entry in saved["state"].items():
        for name, value in entry.items():
            other = now["state"][key][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other) and value.dtype == other.dtype, name
            else:
                assert value == other, name


def _adam_spectrum(problem, opt, batches):
    """Eigenvalues of D H D, D = P^-1/2 with P = sqrt(v / (1 - beta2^t)) + eps from the Adam
    state (named_parameters order), H the dense float64 Hessian of ``batches``."""
    group = opt.param_groups[0]
    parts = []
    for p in problem.model.parameters():
        st = opt.state[p]
        bc = 1 - group["betas"][1] ** int(st["step"])
        parts.append((st["exp_avg_sq"] / bc).sqrt().reshape(-1) + group["eps"])
    d = torch.cat(parts).to(F64).rsqrt()
    hessian = _Reference(problem, batches, "train-deterministic").hessian()
    return torch.linalg.eigvalsh(d[:, None] * hessian * d[None, :])


def test_probe_measures_adams_preconditioned_curvature_against_dense_ground_truth():
    problem = _problem()
    model = problem.model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    _steps(model, opt, problem.batches, 3)
    saved, snap = _optimizer_state(opt), snapshot_state(model)
    est = probe_curvature(
        model, problem.batches, LOSS, optimizer=opt, trace=False, per_batch=False, tol=1e-9
    )
    _assert_same_state(opt, saved)
    assert_state_unchanged(model, snap)
    expected = _adam_spectrum(problem, opt, problem.batches)
    assert est.lambda_max == pytest.approx(float(expected[-1]), rel=1e-7)
    assert est.lambda_min == pytest.approx(float(expected[0]), rel=1e-6, abs=1e-8)
    assert est.optimizer == "Adam" and "state at step 3" in est.preconditioner
    assert not any("no state yet" in w for w in est.warnings)


def test_sgd_gets_the_raw_curvature_of_the_parameters_it_trains():
    problem = _problem()
    model = problem.model
    first = model[0] if isinstance(model, nn.Sequential) else next(model.children())
    opt = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    est = probe_curvature(model, problem.batches, LOSS, optimizer=opt, trace=False)
    everything = probe_curvature(model, problem.batches, LOSS, trace=False)
    assert est.preconditioner is None and est.optimizer == "SGD"
    assert est.num_params == sum(p.numel() for p in first.parameters()) < everything.num_params


def test_before_the_first_step_the_estimate_is_used_and_said():
    problem = _problem()
    opt = torch.optim.AdamW(problem.model.parameters(), lr=1e-3)
    saved = _optimizer_state(opt)
    est = probe_curvature(problem.model, problem.batches, LOSS, optimizer=opt, trace=False)
    assert len(opt.state) == 0 and opt.state_dict() == saved  # still no state
    assert "estimated" in est.preconditioner
    assert any("no state yet" in w for w in est.warnings)
    # The new fields survive the JSON round trip.
    assert type(est).from_dict(est.to_dict()).preconditioner == est.preconditioner


def test_bad_optimizer_arguments_are_refused_before_anything_runs():
    problem = _problem()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        probe_curvature(problem.model, problem.batches, LOSS, optimizer="adam")
    opt = torch.optim.Adam(problem.model.parameters())
    with pytest.raises(ValueError, match="pyhessian"):
        probe_curvature(problem.model, problem.batches, LOSS, optimizer=opt, method="pyhessian")


def test_auto_uba_reports_adamws_sharpness_and_share_and_resumes_them():
    problem = _problem()
    model = problem.model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    auto = auto_uba(model, problem.batches, 100, optimizer=opt, num_batches=4, density=False)
    report = auto.report
    stability = optimizer_stability(opt)
    assert report.stability_limit == pytest.approx(stability.limit)
    assert report.stability_limit == pytest.approx(19 * (2 - 3e-3 * 0.1))
    assert report.optimizer_sharpness == report.estimate.lambda_max
    assert report.stability_share == pytest.approx(
        3e-3 * report.estimate.lambda_max / stability.limit
    )
    text = str(report)
    for row in ("curvature measured", "sharpness the optimizer sees", "its stability limit"):
        assert row in text
    assert CurvatureReport.from_dict(report.to_dict()).stability_share == report.stability_share
    resumed = auto_uba(
        model, problem.batches, 100, num_batches=4, density=False, resume_from=auto.state_dict()
    )
    assert resumed.report.stability_share == report.stability_share


def _sgd_auto(problem, lr, **kw):
    opt = torch.optim.SGD(problem.model.parameters(), lr=lr)
    return auto_uba(problem.model, problem.batches, 100, optimizer=opt, density=False, **kw)


def _limit_warning(auto):
    return [w for w in auto.report.warnings if "stability limit at initialisation" in w]


def test_a_peak_beyond_the_limit_is_warned_with_what_to_do():
    problem = _problem()
    auto = _sgd_auto(problem, 50.0)
    assert auto.report.stability_share > 1
    (warning,) = _limit_warning(auto)
    assert "use a warm-up" in warning and "lower the peak" in warning
    (warning,) = _limit_warning(_sgd_auto(problem, 50.0, warmup_steps=10))
    assert "warm-up of 10 steps" in warning and "lengthen the warm-up" in warning
    assert not _limit_warning(_sgd_auto(problem, 1e-3))


def test_an_adaptive_optimizer_met_only_at_make_scheduler_gets_no_stability_rows():
    problem = _problem()
    kw = dict(loss_fn=LOSS, density=False)
    auto = auto_uba(problem.model, problem.batches, 50, **kw)  # raw curvature: what SGD sees
    auto.make_scheduler(torch.optim.Adam(problem.model.parameters(), lr=1e-3))
    assert auto.report.optimizer_sharpness is None and auto.report.stability_share is None
    sgd = auto_uba(problem.model, problem.batches, 50, **kw)
    sgd.make_scheduler(torch.optim.SGD(problem.model.parameters(), lr=0.01, momentum=0.9))
    assert sgd.report.stability_limit == pytest.approx(3.8)
    assert sgd.report.stability_share == pytest.approx(0.01 * sgd.report.estimate.lambda_max / 3.8)


def test_suggest_with_adam_sets_the_share_of_its_limit():
    problem = _problem()
    opt = torch.optim.Adam(problem.model.parameters(), lr=1.0)
    saved_groups = copy.deepcopy(opt.param_groups[0]["betas"])
    auto = auto_uba(
        problem.model,
        problem.batches,
        50,
        optimizer=opt,
        peak_lr="suggest",
        warmup_steps=5,
        density=False,
    )
    lam = auto.report.estimate.lambda_max
    expected = SUGGESTED_SHARE["preconditioned"] * 38.0 / lam
    assert auto.suggested_lr == pytest.approx(expected)
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(expected)
    assert opt.param_groups[0]["betas"] == saved_groups
    assert auto.report.stability_share == pytest.approx(SUGGESTED_SHARE["preconditioned"])
    # The suggestion needs a warm-up, and the report says what it does.
    assert any("the warm-up of 5 steps" in w for w in auto.report.warnings)


def _capture_probes(auto):
    """Keep every estimate ``auto`` makes from now on (a test seam on this instance only)."""
    seen, probe = [], auto._probe

    def recording(*args, **kwargs):
        seen.append(probe(*args, **kwargs))
        return seen[-1]

    auto._probe = recording
    return seen


def test_reestimation_reads_the_live_optimizer_state():
    problem = _problem()
    model = problem.model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    kw = dict(num_batches=2, probe_fraction=1.0, density=False, trace=False, loss_fn=LOSS)
    auto = auto_uba(model, problem.batches, 20000, optimizer=opt, max_hvps=240, tol=1e-10, **kw)
    assert any("no state yet" in w for w in auto.report.warnings)
    seen = _capture_probes(auto)
    _steps(model, opt, problem.batches, 5)
    for _ in range(5):
        auto.scheduler.step()
    saved = _optimizer_state(opt)
    record = auto.reestimate()
    assert record.status == "ok"
    assert not any("no state yet" in w for w in record.warnings)
    _assert_same_state(opt, saved)
    (est,) = seen
    assert "state at step 5" in est.preconditioner
    # The re-estimation drew the next two batches of the loader (cycling).
    batches = problem.batches[2:4]
    expected = float(_adam_spectrum(problem, opt, batches)[-1])
    assert est.lambda_max == pytest.approx(expected, rel=1e-7)


def test_one_curvature_for_the_whole_phi_history():
    problem = _problem()
    kw = dict(num_batches=2, probe_fraction=1.0, density=False, trace=False, loss_fn=LOSS)
    auto = auto_uba(problem.model, problem.batches, 5000, max_hvps=20, **kw)  # no optimizer
    opt = torch.optim.Adam(problem.model.parameters(), lr=1e-3)
    auto.make_scheduler(opt)
    seen = _capture_probes(auto)
    _steps(problem.model, opt, problem.batches, 3)
    for _ in range(3):
        auto.scheduler.step()
    assert auto.reestimate().status == "ok"
    # The pre-training probe measured the raw curvature: so do the re-estimations.
    assert auto.report.estimate.preconditioner is None
    assert seen[0].preconditioner is None and seen[0].optimizer is None


def test_suggest_with_adamw_solves_for_its_rate_dependent_limit():
    problem = _problem()
    model = problem.model
    for warmup, share in ((10, SUGGESTED_SHARE["preconditioned"]), (0, 1.0)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        auto = auto_uba(
            model,
            problem.batches,
            100,
            optimizer=opt,
            peak_lr="suggest",
            warmup_steps=warmup,
            density=False,
            trace=False,
        )
        lr = opt.param_groups[0]["initial_lr"]  # the peak (the warm-up starts lower)
        report = auto.report
        assert lr == pytest.approx(auto.suggested_lr, rel=1e-12) and lr * 0.1 < 2
        limit = optimizer_stability(opt).limit  # at the rate just set
        assert report.stability_limit == pytest.approx(limit)
        assert report.stability_share == pytest.approx(share, rel=1e-9)
        assert lr * report.optimizer_sharpness == pytest.approx(share * limit, rel=1e-9)


def test_suggest_is_refused_for_an_optimizer_without_a_limit_before_probing():
    problem = _problem()
    snap = snapshot_state(problem.model)
    opt = torch.optim.NAdam(problem.model.parameters(), lr=1e-3)
    calls = []

    def loader():
        calls.append(1)
        return iter(problem.batches)

    class Loader:
        __iter__ = staticmethod(loader)

    with pytest.raises(ValueError, match="none for this NAdam.*Pass peak_lr as a number"):
        auto_uba(problem.model, Loader(), 100, optimizer=opt, peak_lr="suggest")
    assert not calls and opt.param_groups[0]["lr"] == 1e-3
    assert_state_unchanged(problem.model, snap)


def test_the_estimate_clips_each_batch_gradient_as_the_training_loop_will():
    problem = _problem()
    model = problem.model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8)
    clip = 0.05
    est = probe_curvature(
        model, problem.batches, LOSS, optimizer=opt, grad_clip=clip, trace=False, tol=1e-9
    )
    assert "clipped to norm 0.05" in est.preconditioner
    reference = _Reference(problem, problem.batches, "train-deterministic")
    squares = []
    for batch in problem.batches:
        g = torch.func.grad(lambda flat, b=batch: reference.batch_loss(flat, b))(reference.flat0)
        assert float(g.norm()) > clip  # the clipping is active on every batch
        squares.append((g * min(1.0, clip / (float(g.norm()) + 1e-6))) ** 2)
    d = (torch.stack(squares).mean(0).sqrt() + 1e-8).rsqrt()
    hessian = reference.hessian()
    expected = torch.linalg.eigvalsh(d[:, None] * hessian * d[None, :])
    assert est.lambda_max == pytest.approx(float(expected[-1]), rel=1e-6)
    unclipped = probe_curvature(model, problem.batches, LOSS, optimizer=opt, trace=False)
    assert unclipped.lambda_max < est.lambda_max  # clipped moments divide by less
    with pytest.raises(ValueError, match="grad_clip"):
        probe_curvature(model, problem.batches, LOSS, optimizer=opt, grad_clip=0.0)


def test_a_peak_at_which_adamws_decay_alone_diverges_is_refused_before_probing():
    problem = _problem()
    opt = torch.optim.AdamW(problem.model.parameters(), lr=1e-3, weight_decay=0.1)
    stability = optimizer_stability(opt)
    assert stability.limit_at(19.0) == pytest.approx(19 * (2 - 1.9))
    with pytest.raises(ValueError, match="decoupled decay .* alone diverges"):
        stability.limit_at(30.0)
    drawn = []

    class Loader:
        def __iter__(self):
            drawn.append(1)
            return iter(problem.batches)

    with pytest.raises(ValueError, match="lr \\* weight_decay = 3 >= 2"):
        auto_uba(problem.model, Loader(), 100, optimizer=opt, peak_lr=30.0, density=False)
    assert not drawn  # refused before the probe drew a batch
