"""The hold link: which runs count as self-stabilising, its choice and guard, and auto_uba's use."""

from __future__ import annotations

import io
import math

import pytest
import torch
from _models import make_problem
from torch import nn

from uba_auto import auto_uba
from uba_auto.phi import (
    GATE_NOISE,
    HOLD_LINK_PHI,
    LINKS,
    LinkInputs,
    minibatch_condition_number,
    self_stabilising,
)

CHEAP = dict(
    num_batches=4, probe_fraction=1.0, density=False, trace=False, per_batch=False, progress=False
)


def _mlp(norm: nn.Module | None = None) -> nn.Module:
    layers = [nn.Linear(3, 5)] + ([norm] if norm is not None else []) + [nn.ReLU(), nn.Linear(5, 2)]
    return nn.Sequential(*layers)


# -- self_stabilising -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_adaptive_optimizers_are_self_stabilising(cls):
    model = _mlp()
    text = self_stabilising(model, cls(model.parameters(), lr=1e-3))
    assert text == f"{cls.__name__} is an adaptive optimizer (per-coordinate preconditioner)"


def test_adagrad_and_a_subclass_count_nadam_does_not():
    class MyAdamW(torch.optim.AdamW):
        pass

    params = list(_mlp().parameters())
    assert self_stabilising(None, torch.optim.Adagrad(params)).startswith("Adagrad is an adaptive")
    assert self_stabilising(None, MyAdamW(params)).startswith("MyAdamW is an adaptive")
    assert self_stabilising(_mlp(), torch.optim.NAdam(params)) is None  # not classified
    # nor through the normaliser branch, which is derived for SGD-family updates only
    normed = _mlp(nn.LayerNorm(5))
    for cls in (torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax):
        assert self_stabilising(normed, cls(normed.parameters(), weight_decay=1e-2)) is None


@pytest.mark.parametrize(
    "norm, expected",
    [
        (nn.BatchNorm1d(5), "BatchNorm1d"),
        (nn.LayerNorm(5), "LayerNorm"),
        (nn.GroupNorm(1, 5), "GroupNorm"),
    ],
)
def test_sgd_with_weight_decay_and_a_normaliser(norm, expected):
    model = _mlp(norm)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert self_stabilising(model, sgd) == (
        f"SGD with weight decay 0.0005 on a model with 1 normalisation layer ({expected})"
    )


def test_sgd_without_decay_or_without_normaliser_is_not():
    model = _mlp(nn.BatchNorm1d(5))
    assert self_stabilising(model, torch.optim.SGD(model.parameters(), lr=0.1)) is None
    plain = _mlp()
    decayed = torch.optim.SGD(plain.parameters(), lr=0.1, weight_decay=1e-3)
    assert self_stabilising(plain, decayed) is None
    # decay on one group only is enough; the largest group's decay is named
    groups = [
        {"params": list(model[0].parameters()), "weight_decay": 0.0},
        {"params": list(model[1].parameters()) + list(model[3].parameters()), "weight_decay": 0.01},
    ]
    text = self_stabilising(model, torch.optim.SGD(groups, lr=0.1))
    assert text is not None and "weight decay 0.01" in text
    # unknown model: the optimizer alone cannot tell
    assert (
        self_stabilising(None, torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3))
        is None
    )
    assert self_stabilising(model, None) is None


def test_self_stabilising_refuses_what_it_cannot_read():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        self_stabilising(_mlp(), "adam")
    opt = torch.optim.SGD(_mlp().parameters(), lr=0.1, weight_decay=1e-3)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        self_stabilising("model", opt)


# -- the link on plain numbers -------------------------------------------------------------------
def _inputs(noise: float | None, lam: float = 3.0) -> LinkInputs:
    return LinkInputs(lambda_max=lam, lambda_min_positive=0.1, curvature_noise=noise, num_batches=8)


HOLD, GATED = LINKS["hold"], LINKS["gated"]
ADAM = "AdamW is an adaptive optimizer (per-coordinate preconditioner)"


@pytest.mark.parametrize("noise", [0.0, 0.02, GATE_NOISE, 0.3])
def test_not_self_stabilising_is_the_gated_link(noise):
    kw = dict(peak_lr=0.1, budget=100, edge_fraction=0.5)
    gated, hold = GATED(_inputs(noise), **kw), HOLD(_inputs(noise), **kw)
    assert hold.phi == gated.phi and hold.kappa == gated.kappa and hold.held_by is None
    assert hold.reason.startswith("hold link: not a self-stabilising run")
    expected = 2.0 * min(
        1.0, (minibatch_condition_number(noise) - 1) / (minibatch_condition_number(GATE_NOISE) - 1)
    )
    assert hold.phi == pytest.approx(max(expected, 0.25), rel=1e-12)


@pytest.mark.parametrize("noise", [0.0, 0.3, None])
def test_self_stabilising_holds_whatever_sigma(noise):
    inputs = _inputs(noise) if noise is not None else LinkInputs(3.0, None, None, 1)
    choice = HOLD(inputs, peak_lr=0.1, budget=100, stabiliser=ADAM)
    assert choice.phi == HOLD_LINK_PHI == 0.25 and not choice.clamped
    assert choice.held_by == ADAM and choice.link == "hold"
    assert choice.reason.startswith(f"hold link: {ADAM}: a self-stabilising run")
    # sigma's notes are about a phi not used; the unchecked edge guard is said
    assert [w for w in choice.warnings if "edge guard" not in w] == []


def test_hold_is_clamped_and_says_so():
    choice = HOLD(_inputs(0.3), peak_lr=0.1, budget=100, phi_min=0.5, stabiliser=ADAM)
    assert choice.phi == 0.5 and choice.clamped and choice.phi_unclamped == 0.25
    assert any("clamped to 0.5" in w for w in choice.warnings)


def test_edge_guard_applies_without_a_warm_up_only():
    at_edge = dict(peak_lr=0.1, budget=100, edge_fraction=1.2, stabiliser=ADAM)
    guarded = HOLD(_inputs(0.3), **at_edge)
    assert guarded.phi == GATED(_inputs(0.3), peak_lr=0.1, budget=100).phi == 2.0
    assert guarded.held_by is None and "1.2 of the optimizer's stability limit" in guarded.reason
    assert HOLD(_inputs(0.3), warmup_steps=10, **at_edge).phi == 0.25
    below = HOLD(_inputs(0.3), peak_lr=0.1, budget=100, edge_fraction=0.99, stabiliser=ADAM)
    assert below.phi == 0.25 and below.edge_fraction == 0.99
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        HOLD(_inputs(0.3), warmup_steps=-1, **at_edge)


@pytest.mark.parametrize("link", ["hold", "gated", "gated-edge", "calibrated"])
def test_every_link_checks_the_new_arguments(link):
    kw = dict(peak_lr=0.1, budget=100)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        LINKS[link](_inputs(0.3), warmup_steps=-1, **kw)
    with pytest.raises(TypeError, match="warmup_steps must be an int"):
        LINKS[link](_inputs(0.3), warmup_steps=2.5, **kw)
    with pytest.raises(TypeError, match="stabiliser must be a str or None"):
        LINKS[link](_inputs(0.3), stabiliser=5, **kw)
    # the other links ignore a stabiliser: the same choice with or without one
    if link != "hold":
        assert LINKS[link](_inputs(0.3), stabiliser=ADAM, **kw) == LINKS[link](_inputs(0.3), **kw)


def test_an_unknown_edge_without_a_warm_up_holds_and_says_the_guard_was_not_checked():
    choice = HOLD(_inputs(0.3), peak_lr=0.1, budget=100, stabiliser=ADAM)
    assert choice.phi == 0.25
    assert any("edge guard could not be checked" in w for w in choice.warnings)
    warm = HOLD(_inputs(0.3), peak_lr=0.1, budget=100, stabiliser=ADAM, warmup_steps=5)
    assert not any("edge guard" in w for w in warm.warnings)


def test_no_positive_curvature_keeps_the_fallback_note():
    choice = HOLD(_inputs(0.1, lam=-1.0), peak_lr=0.1, budget=100, stabiliser=ADAM)
    assert choice.phi == 0.25 and choice.kappa is None
    assert any("no positive curvature" in w for w in choice.warnings)
    plain = HOLD(_inputs(0.1, lam=-1.0), peak_lr=0.1, budget=100)
    assert plain.phi == 2.0


# -- auto_uba ------------------------------------------------------------------------------------
def _problem():
    problem = make_problem("tanh_mlp", num_batches=8, seed=3)
    return problem, problem.model


def test_auto_uba_holds_for_adamw_and_reports_why():
    problem, model = _problem()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    auto = auto_uba(
        model, problem.batches, 400, optimizer=opt, loss_fn=problem.loss, link="hold",
        warmup_steps=20, **CHEAP,
    )  # fmt: skip
    assert auto.phi == 0.25 and auto.scheduler.phi == 0.25
    assert "self-stabilising" in auto.report.phi_signal
    assert auto.report.reason.startswith("hold link: AdamW is an adaptive optimizer")
    assert "hold link" in str(auto.report)


def test_auto_uba_plain_sgd_equals_the_gated_link():
    problem, model = _problem()
    kw = dict(loss_fn=problem.loss, **CHEAP)
    runs = {
        link: auto_uba(
            model,
            problem.batches,
            400,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            link=link,
            **kw,
        )
        for link in ("hold", "gated")
    }
    hold, gated = runs["hold"], runs["gated"]
    assert hold.phi == gated.phi and hold.report.kappa == gated.report.kappa
    assert hold.report.estimate.curvature_noise == gated.report.estimate.curvature_noise


def test_an_optimizer_met_only_at_make_scheduler_decides():
    problem, model = _problem()
    auto = auto_uba(model, problem.batches, 400, loss_fn=problem.loss, link="hold", **CHEAP)
    before = auto.phi
    assert auto.report.reason.startswith("hold link: not a self-stabilising run")
    sched = auto.make_scheduler(torch.optim.RMSprop(model.parameters(), lr=1e-3))
    assert before != 0.25 and auto.phi == 0.25 and sched.phi == 0.25
    assert auto.report.history[0].phi == 0.25


def test_the_reason_to_hold_survives_a_state_dict_round_trip():
    problem, model = _problem()
    kw = dict(loss_fn=problem.loss, link="hold", reestimate_every=100, **CHEAP)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    auto = auto_uba(model, problem.batches, 400, optimizer=opt, **kw)
    for _ in range(120):
        opt.step()
        auto.scheduler.step()  # re-estimates on its plan
    done = [r.phi for r in auto.report.history if r.status == "ok"]
    assert len(done) >= 2 and set(done) == {0.25}
    buf = io.BytesIO()
    torch.save(auto.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["stabiliser"].startswith("Adam is an adaptive optimizer")
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    resumed = auto_uba(model, problem.batches, 400, optimizer=opt2, resume_from=saved, **kw)
    assert resumed.phi == 0.25 and resumed._state.stabiliser == saved["stabiliser"]
    assert math.isclose(resumed.scheduler.get_last_lr()[0], auto.scheduler.get_last_lr()[0])


def test_a_run_at_its_edge_without_norms_never_holds():
    """The digits_cnn case: heavy-ball SGD, no normaliser, the peak at the stability edge."""
    problem = make_problem("tanh_mlp", num_batches=8, seed=3)
    model = problem.model
    opt = torch.optim.SGD(model.parameters(), lr=3.0, momentum=0.9)
    kw = dict(optimizer=opt, loss_fn=problem.loss, link="hold", **CHEAP)
    auto = auto_uba(model, problem.batches, 400, **kw)
    assert auto._state.stabiliser is None
    assert auto.report.estimate.curvature_noise >= GATE_NOISE and auto.phi == 2.0


def test_auto_uba_guards_a_run_at_its_edge_without_a_warm_up():
    """Adam at a peak far past its stability limit and no warm-up: the hold link gives the gated
    phi when the optimizer is given to auto_uba (its limit known), and holds with a warning when
    it is met only at make_scheduler (the preconditioned curvature was not measured)."""
    problem, model = _problem()
    kw = dict(loss_fn=problem.loss, link="hold", **CHEAP)
    given = auto_uba(
        model, problem.batches, 400, optimizer=torch.optim.Adam(model.parameters(), lr=10.0), **kw
    )
    assert given.report.edge_fraction >= 1 and given.phi == 2.0
    assert "stability limit (>= 1): a held rate is unsafe" in given.report.reason
    late = auto_uba(model, problem.batches, 400, **kw)
    late.make_scheduler(torch.optim.Adam(model.parameters(), lr=10.0))
    assert late.phi == 0.25 and late.report.edge_fraction is None
    assert any("edge guard could not be checked" in w for w in late.report.warnings)
    assert "could not be checked" in late.report.phi_signal
