"""The κ→φ links: closed-form values, monotonicity, clamps, fallbacks."""

from __future__ import annotations

import ast
import dataclasses
import math
import pathlib
import types

import numpy as np
import pytest
import torch
from _models import make_problem

from uba_auto import phi as P
from uba_auto.probe import probe_curvature


def test_chebyshev_link_is_two_kappa():
    for kappa in [1.0, 1.5, 3.0, 7.9]:
        assert P.phi_from_condition_number(kappa, link="chebyshev") == 2 * kappa
    assert P.phi_from_condition_number(100.0, link="chebyshev") == P.PHI_MAX


def test_calibrated_link_closed_form_and_anchor():
    assert P.phi_from_condition_number(P.KAPPA_COSINE, link="calibrated") == pytest.approx(2.0)
    for kappa in [1.05, 1.2, 1.4]:
        expected = 2 * ((kappa - 1) / (P.KAPPA_COSINE - 1)) ** P.SENSITIVITY
        got = P.phi_from_condition_number(kappa, link="calibrated", phi_min=1e-9, phi_max=1e9)
        assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("link", ["gated", "gated-edge"])
def test_noise_gate_cosine_above_the_gate_and_linear_below(link):
    gate = P.minibatch_condition_number(P.GATE_NOISE)
    for sigma in [P.GATE_NOISE, 0.067, 0.2, 0.5, 0.99]:
        assert P.phi_from_condition_number(P.minibatch_condition_number(sigma), link=link) == 2.0
    for kappa in [1.02, 1.05, 1.09]:
        expected = 2 * (kappa - 1) / (gate - 1)
        got = P.phi_from_condition_number(kappa, link=link, phi_min=1e-9)
        assert got == pytest.approx(expected, rel=1e-12)
    assert P.phi_from_condition_number(1.0, link=link) == P.PHI_MIN  # full batch
    assert P.phi_from_condition_number(math.inf, link=link) == 2.0


def test_gated_is_the_default_and_gated_edge_caps_phi_far_below_the_edge():
    assert next(iter(P.LINKS)) == "gated"  # LINKS is a mapping now, the default first
    noisy = P.minibatch_condition_number(0.2)
    below, at = P.EDGE_FRACTION * 0.99, P.EDGE_FRACTION

    def edge(kappa, fraction):
        return P.phi_from_condition_number(kappa, link="gated-edge", edge_fraction=fraction)

    assert edge(noisy, below) == P.EDGE_PHI == 1.0
    assert edge(noisy, 0.0) == 1.0
    assert edge(noisy, at) == 2.0
    assert edge(noisy, 5.0) == 2.0
    assert edge(noisy, None) == 2.0  # unknown: the gated link
    # The cap only lowers φ: the noise gate's smaller φ stands.
    assert edge(1.0, below) == P.PHI_MIN
    # Other links, the default among them, ignore the edge.
    for link in ("gated", "calibrated", "chebyshev"):
        k = 1.3
        assert P.phi_from_condition_number(k, link=link, edge_fraction=below) == (
            P.phi_from_condition_number(k, link=link)
        )
    with pytest.raises(ValueError, match="edge_fraction must be a number >= 0"):
        edge(noisy, -0.1)


@pytest.mark.parametrize(
    "momentum,dampening,nesterov,expected",
    [
        (0.0, 0.0, False, 2.0),
        (0.9, 0.0, False, 3.8),
        (0.5, 0.5, False, 6.0),
        (0.0, 0.5, False, 2.0),  # torch ignores dampening without momentum
        (0.9, 0.0, True, 3.8 / 2.8),
        (0.5, 0.0, True, 1.5),
    ],
)
def test_stability_limit_closed_form_and_real_sgd(momentum, dampening, nesterov, expected):
    limit = P.stability_limit(momentum, dampening, nesterov)
    assert limit == pytest.approx(expected, rel=1e-12)

    # Ground truth: torch.optim.SGD on f(x) = λ x² / 2 decays just below the limit and blows up
    # just above it.
    def final(lr_times_lambda: float) -> float:
        lam = 3.0
        x = torch.ones(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD(
            [x],
            lr=lr_times_lambda / lam,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
        )
        for _ in range(3000):
            opt.zero_grad()
            (0.5 * lam * x**2).sum().backward()
            opt.step()
        return abs(float(x.detach()))

    assert final(0.98 * limit) < 1e-3
    assert final(1.02 * limit) > 1e3


def test_stability_fraction_and_bad_input():
    assert P.stability_fraction(2.0, 0.1, 3.8) == pytest.approx(0.2 / 3.8, rel=1e-15)
    assert P.stability_fraction(2.0, 0.1, 2.0, weight_decay=0.5) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        P.stability_fraction(2.0, 0.1, 2.0, weight_decay=-1.0)
    with pytest.raises(ValueError, match="momentum must be a number in"):
        P.stability_limit(1.0)
    with pytest.raises(ValueError, match="dampening must be a number in"):
        P.stability_limit(0.9, -0.1)
    with pytest.raises(ValueError, match="nesterov momentum requires dampening=0"):
        P.stability_limit(0.9, 0.1, nesterov=True)
    with pytest.raises(ValueError, match="lambda_max must be finite and > 0"):
        P.stability_fraction(0.0, 0.1, 2.0)
    with pytest.raises(ValueError, match="peak_lr must be finite and > 0"):
        P.stability_fraction(1.0, -0.1, 2.0)


@pytest.mark.parametrize("link", P.LINKS)
def test_monotone_non_decreasing_in_kappa(link):
    kappas = np.concatenate([[1.0], np.geomspace(1.001, 1e4, 300), [math.inf]])
    phis = [P.phi_from_condition_number(float(k), link=link) for k in kappas]
    assert np.all(np.diff(phis) >= 0)
    assert min(phis) >= P.PHI_MIN and max(phis) <= P.PHI_MAX


def test_clamp_range_is_respected_and_reported():
    assert P.phi_from_condition_number(1.0, link="calibrated") == P.PHI_MIN
    assert P.phi_from_condition_number(math.inf, link="calibrated") == P.PHI_MAX
    assert P.phi_from_condition_number(1.0, phi_min=0.5) == 0.5
    assert P.phi_from_condition_number(1.5, phi_max=1.0) == 1.0
    assert P.phi_from_condition_number(50.0, link="chebyshev", phi_max=8.0) == 8.0


def test_minibatch_and_budget_condition_numbers():
    assert P.minibatch_condition_number(0.0) == 1.0
    assert P.minibatch_condition_number(0.5) == pytest.approx(3.0)
    assert P.minibatch_condition_number(1.0) == math.inf
    assert P.budget_condition_number(2.0, 0.5, 0.1, 1000) == pytest.approx(4.0)  # floor = 0.5
    assert P.budget_condition_number(2.0, None, 0.1, 1000) == pytest.approx(200.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kappa": 0.5}, "kappa must be a condition number >= 1"),
        ({"kappa": float("nan")}, "kappa must be a condition number >= 1"),
        ({"kappa": 2.0, "link": "magic"}, "link must be one of"),
        ({"kappa": 2.0, "phi_min": 4.0, "phi_max": 2.0}, "phi_min must be <= phi_max"),
        ({"kappa": 2.0, "phi_min": 0.0}, "phi_min must be finite and > 0"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.phi_from_condition_number(**kwargs)
    with pytest.raises(ValueError, match="curvature_noise must be a number >= 0"):
        P.minibatch_condition_number(-0.1)


@pytest.fixture(scope="module")
def estimate():
    problem = make_problem("tanh_mlp")
    return probe_curvature(
        problem.model, problem.batches, problem.loss, num_batches=3, per_batch=False, trace=False
    )


def test_choose_phi_uses_the_curvature_noise(estimate):
    choice = P.choose_phi(estimate, peak_lr=0.1, budget=1000)
    kappa = P.minibatch_condition_number(estimate.curvature_noise)
    assert choice.kappa == pytest.approx(kappa)
    assert choice.phi == P.phi_from_condition_number(kappa)
    assert "gated" in choice.reason and choice.link == "gated"
    assert choice.edge_fraction is None and "edge" not in choice.reason
    no_optimizer = P.choose_phi(estimate, peak_lr=0.1, budget=1000, link="gated-edge")
    assert no_optimizer.phi == choice.phi and "edge gate off" in no_optimizer.reason
    assert any("only 3 batch" in w for w in choice.warnings)
    calibrated = P.choose_phi(estimate, peak_lr=0.1, budget=1000, link="calibrated")
    assert calibrated.phi == P.phi_from_condition_number(kappa, link="calibrated")
    assert "calibrated" in calibrated.reason and calibrated.kappa == choice.kappa


def test_choose_phi_edge_gate(estimate):
    lam = estimate.lambda_max
    far = P.stability_fraction(lam, 0.01, P.stability_limit())
    assert far < P.EDGE_FRACTION
    kw = dict(budget=1000, link="gated-edge")
    choice = P.choose_phi(estimate, peak_lr=0.01, edge_fraction=far, **kw)
    assert choice.phi == P.EDGE_PHI and choice.edge_fraction == far
    assert "far below the edge" in choice.reason and f"{far:.3g}" in choice.reason
    near = P.choose_phi(estimate, peak_lr=1.0, edge_fraction=0.5, **kw)
    assert near.phi == 2.0 and "no edge cap" in near.reason
    quiet = dataclasses.replace(estimate, curvature_noise=0.0)  # the noise gate gives 0.25
    below = P.choose_phi(quiet, peak_lr=0.01, edge_fraction=far, **kw)
    assert below.phi == P.PHI_MIN and "above that phi already" in below.reason
    gated = P.choose_phi(estimate, peak_lr=0.01, budget=1000, edge_fraction=far)
    assert gated.phi == 2.0 and gated.edge_fraction is None and "edge" not in gated.reason


def test_choose_phi_chebyshev_hits_the_clamp_and_says_so(estimate):
    choice = P.choose_phi(estimate, peak_lr=0.1, budget=1000, link="chebyshev")
    assert choice.kappa > 8 and choice.phi == P.PHI_MAX and choice.clamped
    assert any("clamped" in w for w in choice.warnings)


def test_choose_phi_falls_back_without_positive_curvature(estimate):
    flat = dataclasses.replace(estimate, lambda_max=-0.3)
    choice = P.choose_phi(flat, peak_lr=0.1, budget=100)
    assert choice.phi == P.FALLBACK_PHI and choice.kappa is None
    assert any("fell back" in w for w in choice.warnings)


def test_choose_phi_one_batch_is_treated_as_full_batch(estimate):
    one = dataclasses.replace(estimate, curvature_noise=None, num_batches=1)
    choice = P.choose_phi(one, peak_lr=0.1, budget=100)
    assert choice.kappa == 1.0 and choice.phi == P.PHI_MIN
    assert any("not measurable" in w for w in choice.warnings)


# The registry: links are pure functions of plain numbers, adapted from an estimate in one place.


def test_links_registry_names_and_immutability():
    assert list(P.LINKS) == ["gated", "gated-edge", "hold", "calibrated", "chebyshev"]
    assert all(isinstance(link, P.Link) and link.name == name for name, link in P.LINKS.items())
    with pytest.raises(TypeError):
        P.LINKS["mine"] = P.LINKS["gated"]  # type: ignore[index]


def test_check_link_returns_the_name_or_names_the_allowed_ones():
    for name in P.LINKS:
        assert P.check_link(name) == name
    for bad in ["magic", "Gated", "", None, 3]:
        with pytest.raises(ValueError, match="link must be one of") as info:
            P.check_link(bad)
        assert all(repr(name) in str(info.value) for name in P.LINKS)
        assert repr(bad) in str(info.value)


NUMBERS = [
    P.LinkInputs(lambda_max=2.0, lambda_min_positive=1e-3, curvature_noise=0.2, num_batches=8),
    P.LinkInputs(lambda_max=2.0, lambda_min_positive=None, curvature_noise=0.01, num_batches=8),
    P.LinkInputs(lambda_max=0.5, lambda_min_positive=0.1, curvature_noise=None, num_batches=1),
    P.LinkInputs(lambda_max=3.0, lambda_min_positive=None, curvature_noise=None, num_batches=4),
    P.LinkInputs(lambda_max=-1.0, lambda_min_positive=None, curvature_noise=0.3, num_batches=2),
]


@pytest.mark.parametrize("inputs", NUMBERS)
@pytest.mark.parametrize("name", list(P.LINKS))
def test_each_link_is_a_pure_function_of_numbers(name, inputs):
    kw = dict(peak_lr=0.1, budget=500, phi_min=0.25, phi_max=16.0, edge_fraction=0.01)
    first = P.LINKS[name](inputs, **kw)
    # Equal numbers in fresh objects give an equal choice; repeating the call changes nothing.
    again = P.LINKS[name](dataclasses.replace(inputs), **dict(kw))
    assert first == again == P.LINKS[name](inputs, **kw)
    assert first.link == name


def test_link_values_in_closed_form():
    gate = P.minibatch_condition_number(P.GATE_NOISE)
    quiet = NUMBERS[1]  # sigma = 0.01, below the gate
    kappa = P.minibatch_condition_number(0.01)
    choice = P.LINKS["gated"](quiet, peak_lr=None, budget=100)
    assert choice.kappa == kappa and choice.phi == pytest.approx(2 * (kappa - 1) / (gate - 1))
    edge = P.LINKS["gated-edge"](NUMBERS[0], peak_lr=None, budget=100, edge_fraction=0.01)
    assert edge.phi == P.EDGE_PHI and edge.edge_fraction == 0.01
    cheb = P.LINKS["chebyshev"](NUMBERS[0], peak_lr=0.1, budget=500, phi_max=1e9)
    assert cheb.kappa == pytest.approx(2.0 / 0.02) and cheb.phi == pytest.approx(2 * 2.0 / 0.02)
    # The curve alone is phi_from_condition_number before the clamp.
    for name, link in P.LINKS.items():
        raw, clamped = link.phi(1.3, 0.25, 16.0, None)
        assert clamped == P.phi_from_condition_number(1.3, link=name)
        assert clamped == min(max(raw, 0.25), 16.0)


def test_link_inputs_reads_any_object_with_the_fields():
    fake = types.SimpleNamespace(
        lambda_max=2.0, lambda_min_positive=None, curvature_noise=0.2, num_batches=8, method="m"
    )
    assert P.link_inputs(fake) == P.LinkInputs(2.0, None, 0.2, 8, "m")


@pytest.mark.parametrize("name", list(P.LINKS))
@pytest.mark.parametrize("edge_fraction", [None, 0.01, 0.5])
def test_choose_phi_is_the_registered_link_applied_to_the_adapter(estimate, name, edge_fraction):
    kw = dict(peak_lr=0.1, budget=1000, phi_min=0.25, phi_max=16.0, edge_fraction=edge_fraction)
    expected = P.LINKS[name](P.link_inputs(estimate), **kw)
    assert P.choose_phi(estimate, link=name, **kw) == expected
    assert P.link_inputs(estimate) == P.LinkInputs(
        estimate.lambda_max,
        estimate.lambda_min_positive,
        estimate.curvature_noise,
        estimate.num_batches,
        estimate.method,
    )


def test_phi_does_not_import_the_probe_at_run_time():
    # The links are functions of numbers: only annotations (under TYPE_CHECKING) name the probe.
    for path in pathlib.Path(P.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        guarded = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
            for node in ast.walk(block)
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in guarded:
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not any("probe" in n for n in names), (path.name, ast.dump(node))
