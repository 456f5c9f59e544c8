"""The probe sized by a budget: the decision first, extras with what is left, loud overspend."""

import warnings

import pytest
import torch

from tests._models import make_problem
from uba_auto import auto_uba, probe_curvature
from uba_auto.auto._plan import hvp_budget, planned_reestimations, probe_cost
from uba_auto.phi import GATE_NOISE, choose_phi
from uba_auto.probe import DECISION_RULE, DecisionRule, rule_for_link

F64 = torch.float64


def test_the_rules_floor_is_the_gate_it_protects():
    assert DECISION_RULE.noise_floor == GATE_NOISE


@pytest.mark.parametrize("warm_start", [None, False])
@pytest.mark.parametrize("name", ["tanh_mlp", "cnn_batchnorm"])
def test_the_decision_at_its_precision_is_the_decision_at_full_precision(name, warm_start):
    problem = make_problem(name, num_batches=6)
    common = dict(num_batches=6, per_batch=False, trace=False, progress=False)
    full = probe_curvature(problem.model, problem.batches, problem.loss, tol=1e-10, **common)
    quick = probe_curvature(
        problem.model, problem.batches, problem.loss, hvp_budget=0, warm_start=warm_start,
        **common,
    )  # fmt: skip
    assert quick.decision_steps is not None and quick.decision_steps >= DECISION_RULE.min_steps
    # A budgeted probe warm-starts by default: single-batch products first, then the mean's.
    start = quick.hvps.get("start", 0)
    assert (start >= DECISION_RULE.min_steps) == (warm_start is None)
    assert quick.num_hvps == start + 6 * quick.decision_steps < full.num_hvps
    assert quick.lambda_max == pytest.approx(full.lambda_max, rel=0.05)
    assert quick.curvature_noise == pytest.approx(full.curvature_noise, rel=0.15)
    for link in ("gated", "gated-edge"):
        a = choose_phi(quick, peak_lr=0.1, budget=100, link=link, edge_fraction=0.5)
        b = choose_phi(full, peak_lr=0.1, budget=100, link=link, edge_fraction=0.5)
        assert a.phi == pytest.approx(b.phi, abs=0.1)


def test_extras_run_only_when_they_fit_or_are_asked_for():
    problem = make_problem("tanh_mlp", num_batches=2)
    args = (problem.model, problem.batches, problem.loss)
    common = dict(num_batches=2, per_batch=False, trace_matvecs=3, progress=False)
    tight = probe_curvature(*args, hvp_budget=0, trace=None, density=None, **common)
    assert tight.trace is None and tight.density is None
    assert any("left no room for the trace and the density" in w for w in tight.warnings)
    assert any("within the probe's HVP budget" in w for w in tight.warnings)  # lambda_min
    forced = probe_curvature(*args, hvp_budget=0, trace=True, density=None, **common)
    assert forced.trace is not None and forced.density is None
    roomy = probe_curvature(*args, hvp_budget=10_000, trace=None, density=None, **common)
    assert roomy.trace is not None and roomy.density is not None
    assert all(roomy.converged[k] for k in ("lambda_max", "lambda_min"))
    assert roomy.num_hvps <= 10_000


def test_a_budget_between_the_decision_and_convergence_is_respected():
    problem = make_problem("tanh_mlp", num_batches=3)
    common = dict(num_batches=3, per_batch=False, trace=None, progress=False, tol=1e-12)
    est = probe_curvature(problem.model, problem.batches, problem.loss, hvp_budget=33, **common)
    assert est.decision_steps is not None and 3 * est.decision_steps <= 33
    assert est.num_hvps <= 33 and est.hvps["extremes"] % 3 == 0


def test_plan_arithmetic():
    assert planned_reestimations(4999, 500) == 9 and planned_reestimations(100, None) == 0
    assert probe_cost(10, 4) == 10 * 3.5 + 4 * 1.5
    assert hvp_budget(100.0, 8) == 25 and hvp_budget(5.0, 8) == 0


def test_auto_uba_says_loudly_when_the_smallest_useful_probe_overspends():
    problem = make_problem("tanh_mlp", num_batches=4)
    with pytest.warns(RuntimeWarning, match=r"probing budget exceeded: the pre-training probe"):
        auto = auto_uba(problem.model, problem.batches, 200, loss_fn=problem.loss, num_batches=4)
    assert any(w.startswith("probing budget exceeded") for w in auto.report.warnings)
    est = auto.report.estimate
    assert est.hvp_budget == 0 and est.trace is None and est.density is None
    assert est.decision_steps is not None  # phi was still decided at its precision


def test_auto_uba_within_a_roomy_budget_stays_inside_its_share_and_is_silent():
    problem = make_problem("tanh_mlp", num_batches=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        auto = auto_uba(
            problem.model, problem.batches, 200_000, loss_fn=problem.loss, num_batches=4
        )
    est = auto.report.estimate
    assert probe_cost(est.num_hvps, 4) <= auto.probe_share == 0.02 * 200_000
    assert est.trace is not None and est.density is not None  # the extras fit
    assert not any("budget" in w for w in auto.report.warnings)


def test_the_gated_links_decide_without_waiting_on_a_noise_far_above_their_gate():
    # Logistic regression on 8 batches of 8: sigma ~0.43, far above the gate (0.05), where the
    # gated links give phi = 2 whatever sigma is. Their probe stops waiting for sigma to settle
    # (DecisionRule.noise_ceiling, 4 x the gate); the calibrated link, whose phi moves with sigma
    # there, keeps the default rule.
    problem = make_problem("logistic_regression", num_batches=8)
    runs = {}
    for link in ("gated", "gated-edge", "calibrated"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the overspend note
            runs[link] = auto_uba(
                problem.model, problem.batches, 200, loss_fn=problem.loss, num_batches=8,
                link=link, progress=False,
            )  # fmt: skip
    steps = {link: auto.report.estimate.decision_steps for link, auto in runs.items()}
    assert steps == {"gated": 2, "gated-edge": 2, "calibrated": 3}
    assert runs["gated"].report.estimate.curvature_noise >= 4 * GATE_NOISE
    assert runs["gated"].phi == 2.0
    # The same probe under the default rule decides where the calibrated link's did.
    plain = probe_curvature(
        problem.model, problem.batches, problem.loss, num_batches=8, hvp_budget=0,
        per_batch=False, trace=False, progress=False,
    )  # fmt: skip
    assert plain.decision_steps == 3
    tuned = probe_curvature(
        problem.model, problem.batches, problem.loss, num_batches=8, hvp_budget=0,
        per_batch=False, trace=False, progress=False, decision_rule=rule_for_link(GATE_NOISE),
    )  # fmt: skip
    assert tuned.decision_steps == 2 and tuned.num_hvps < plain.num_hvps


def test_bad_decision_rules_are_refused():
    problem = make_problem("logistic_regression")
    args = (problem.model, problem.batches, problem.loss)
    with pytest.raises(TypeError, match="decision_rule must be a uba_auto.probe.DecisionRule"):
        probe_curvature(*args, decision_rule={"rtol": 0.1}, progress=False)
    with pytest.raises(ValueError, match=r"min_steps \(5\) must be <= max_steps \(3\)"):
        DecisionRule(min_steps=5, max_steps=3)
    with pytest.raises(ValueError, match="noise_ceiling must be None"):
        DecisionRule(noise_ceiling=0.0)
    with pytest.raises(ValueError, match="rtol must be a number >= 0"):
        DecisionRule(rtol=float("nan"))
    assert rule_for_link(None) is DECISION_RULE
    assert rule_for_link(0.05).noise_ceiling == pytest.approx(4 * 0.05)
