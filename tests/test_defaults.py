"""Defaults that could change what is measured, and the words that go with them: the loss guessed
from the targets, the warning past the budget, the negative-curvature warning of a coarse
density."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import replace

import pytest
import torch
from _models import make_problem
from _spectra import eigenvector_basis, spectrum_operator
from torch import nn

from uba_auto import (
    BudgetScheduler,
    CurvatureReport,
    PastBudgetWarning,
    UBAScheduler,
    auto_uba,
    probe_curvature,
    slq_density,
)
from uba_auto.auto._choice import default_loss, negative_curvature_note
from uba_auto.linear_operator import DenseOperator
from uba_auto.probe.estimate import negative_mass

F64 = torch.float64


# ------------------------------------------------------------------------------- the loss guess
def _pairs(targets: list[torch.Tensor], in_features: int = 4) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(t.shape[0], in_features, generator=gen), t) for t in targets]


def _soft_labels(rows: int = 8, classes: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, classes, generator=gen).softmax(dim=-1)


def test_integer_targets_guess_cross_entropy_and_say_so():
    loss, guess = default_loss((torch.randn(8, 4), torch.randint(0, 3, (8,))))
    assert loss is nn.functional.cross_entropy
    assert guess.startswith("loss guessed: cross_entropy (integer targets of shape (8,)")
    assert "pass loss_fn" in guess


@pytest.mark.parametrize(
    "targets",
    [
        torch.randn(8, 3),  # regression
        torch.rand(8, 3),  # non-negative, but the rows do not sum to 1
        torch.ones(8, 1),  # one column: not a distribution over classes
        torch.rand(8),  # one value per example
    ],
)
def test_float_targets_guess_mse_and_say_so(targets):
    loss, guess = default_loss((torch.randn(8, 4), targets))
    assert loss is nn.functional.mse_loss
    assert guess.startswith("loss guessed: mse_loss") and f"shape {tuple(targets.shape)}" in guess


@pytest.mark.parametrize(
    "targets",
    [
        _soft_labels(),
        nn.functional.one_hot(torch.arange(8) % 3, 3).float(),  # one-hot floats
        0.9 * nn.functional.one_hot(torch.arange(8) % 4, 4).float() + 0.1 / 4,  # smoothing
        _soft_labels().half(),  # rounded rows still count
        _soft_labels(rows=12).reshape(3, 4, 3),  # a sequence of distributions
    ],
)
def test_probability_rows_are_refused(targets):
    with pytest.raises(ValueError, match="loss_fn is required: the targets of the first batch"):
        default_loss((torch.randn(targets.shape[0], 4), targets))


def test_dict_batches_need_no_guess():
    assert default_loss({"input_ids": torch.zeros(2, 3, dtype=torch.long)}) == (None, "")


def test_auto_uba_refuses_soft_labels_before_probing_and_takes_the_loss_given():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    batches = _pairs([_soft_labels(seed=s) for s in range(3)])
    with pytest.raises(ValueError, match=r"rows of probabilities .*cross_entropy"):
        auto_uba(model, batches, 50, num_batches=3, density=False)
    auto = auto_uba(
        model, batches, 50, loss_fn=nn.functional.cross_entropy, num_batches=3, density=False
    )
    assert auto.report.loss_guess == ""
    assert str(auto.report).splitlines()[0].startswith("uba-auto curvature report")


@pytest.mark.parametrize(
    "targets,guess",
    [
        ([torch.randint(0, 3, (8,)) for _ in range(3)], "cross_entropy"),
        ([torch.randn(8, 3) for _ in range(3)], "mse_loss"),
    ],
)
def test_the_guess_is_the_first_line_of_the_report(targets, guess):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    report = auto_uba(model, _pairs(targets), 50, num_batches=3, density=False).report
    first, second = str(report).splitlines()[:2]
    assert first == f"! {report.loss_guess}" and first.startswith(f"! loss guessed: {guess}")
    assert second.startswith("uba-auto curvature report")
    assert report.loss_guess not in report.warnings  # said once, on top
    again = CurvatureReport.from_dict(report.to_dict())
    assert again.loss_guess == report.loss_guess and str(again) == str(report)


# --------------------------------------------------------------------------- past the budget
def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


SCHEDULERS = {
    "uba": lambda opt, total: UBAScheduler(opt, total, phi=1.5, lr_min=0.01),
    "cosine": lambda opt, total: BudgetScheduler(opt, total, schedule="cosine", lr_min=0.01),
}


def _steps(opt: torch.optim.Optimizer, sched: BudgetScheduler, count: int) -> list[str]:
    """``count`` optimizer and scheduler steps; the past-budget warnings they raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(count):
            opt.step()
            sched.step()
    found = [w for w in caught if issubclass(w.category, PastBudgetWarning)]
    assert all(w.filename == __file__ for w in found), [w.filename for w in found]
    return [str(w.message) for w in found]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_warns_exactly_once_past_the_budget(name):
    opt = _optimizer()
    sched = SCHEDULERS[name](opt, 10)
    # Steps 0..10 are the whole plan (the last at lr_min): silent, also at its very last step.
    assert _steps(opt, sched, 11) == []
    assert sched.last_epoch == 11
    (message,) = _steps(opt, sched, 1)  # step 11 was taken at the held rate
    assert f"{type(sched).__name__} stepped past its budget" in message
    assert "total_steps=10" in message and "step 11 has been taken" in message
    assert "larger total_steps" in message and "stop after 11 optimizer steps" in message
    assert _steps(opt, sched, 25) == []  # once
    assert sched.get_last_lr() == pytest.approx([0.01])  # the final rate holds


def test_auto_uba_scheduler_is_silent_over_its_budget_and_warns_after():
    problem = make_problem("tanh_mlp")
    opt = torch.optim.SGD(problem.model.parameters(), lr=0.05)
    auto = auto_uba(problem.model, problem.batches, 30, optimizer=opt, density=False)
    assert _steps(opt, auto.scheduler, 30) == []  # budget = 30 optimizer steps
    (message,) = _steps(opt, auto.scheduler, 1)
    assert "AutoUBAScheduler stepped past its budget" in message and "auto_uba" in message


def _saved(state: dict) -> dict:
    """``state`` through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_resumed_run_warns_as_the_uninterrupted_one(name):
    make = SCHEDULERS[name]
    opt = _optimizer()
    sched = make(opt, 10)
    _steps(opt, sched, 11)
    before = _saved(sched.state_dict())  # saved within the budget: not warned yet
    assert before["past_budget_warned"] is False
    assert len(_steps(opt, sched, 3)) == 1
    after = _saved(sched.state_dict())  # saved after the warning
    assert after["past_budget_warned"] is True

    resumed_before = make(opt := _optimizer(), 10)
    resumed_before.load_state_dict(before)
    assert len(_steps(opt, resumed_before, 3)) == 1  # crosses after the resume: warns
    resumed_after = make(opt := _optimizer(), 10)
    resumed_after.load_state_dict(after)
    assert _steps(opt, resumed_after, 3) == []  # this run was told already

    legacy = dict(after)
    del legacy["past_budget_warned"]  # a state saved before the warning existed
    resumed_legacy = make(opt := _optimizer(), 10)
    resumed_legacy.load_state_dict(legacy)
    assert len(_steps(opt, resumed_legacy, 2)) == 1


# ------------------------------------------------------------------- negative-curvature warning
def _exact_mass_below(eigenvalues: torch.Tensor, seed: int, num_probes: int, x: float) -> float:
    """The mass below ``x`` of each probe's spectral measure ``mu_v`` (``slq_density``'s
    normalised Rademacher probes, drawn from the same seed), averaged over the probes."""
    n = eigenvalues.numel()
    gen = torch.Generator().manual_seed(seed)
    q = eigenvector_basis(n)
    masses = []
    for _ in range(num_probes):
        v = (torch.randint(0, 2, (n,), generator=gen, dtype=F64) * 2 - 1) / math.sqrt(n)
        masses.append(float(((q.T @ v) ** 2 * (eigenvalues < x)).sum()))
    return sum(masses) / num_probes


@pytest.mark.parametrize("num_iters", [4, 12, 24])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cdf_bounds_hold_for_each_probes_measure(num_iters, seed):
    # Chebyshev-Markov-Stieltjes, against the exact measure the quadrature approximates.
    gen = torch.Generator().manual_seed(10 + seed)
    lam = torch.cat([torch.randn(150, generator=gen, dtype=F64), torch.tensor([6.0, 9.0])])
    lam = lam.sort().values
    density = slq_density(
        spectrum_operator(lam),
        num_probes=3,
        num_iters=num_iters,
        generator=torch.Generator().manual_seed(seed),
    )
    for x in torch.linspace(-3.0, 10.0, 27).tolist():
        lower, upper = density.cdf_bounds(x)
        exact = _exact_mass_below(lam, seed, 3, x)
        assert lower - 1e-9 <= exact <= upper + 1e-9, (x, lower, exact, upper)
        assert lower - 1e-9 <= density.negative_mass(max(-x, 0.0)) or x > 0


def test_an_exact_rule_counts_all_its_negative_mass():
    # Three distinct eigenvalues: the Lanczos run breaks down, its rule is the measure itself.
    lam = torch.tensor([-1.0] * 10 + [2.0] * 30 + [5.0] * 10, dtype=F64)
    density = slq_density(DenseOperator(torch.diag(lam)), num_probes=3, num_iters=20)
    assert negative_mass(density, lambda_max=5.0) == pytest.approx(0.2, abs=1e-12)


def _estimate_with(lam: torch.Tensor, density) -> object:
    """A real estimate, its spectrum replaced by ``lam``'s (what the report's warning reads)."""
    problem = make_problem("tanh_mlp")
    est = probe_curvature(
        problem.model, problem.batches, problem.loss, per_batch=False, trace=False
    )
    lambda_max = float(lam.max())
    return replace(
        est,
        lambda_max=lambda_max,
        lambda_min=float(lam.min()),
        density=density,
        negative_mass=negative_mass(density, lambda_max),
    )


def near_zero_bulk() -> torch.Tensor:
    """The spectrum of a network at initialisation, as a GPT-2 report met it: 420 of 600
    eigenvalues in a bulk straddling 0 within the cut-off (``|λ| <= 0.04 < 1e-3 λ_max``), 18
    negative ones (3 %) from -0.05 to -2, a positive tail to 5 and outliers to ``λ_max = 42``."""
    bulk = 0.04 * torch.linspace(-1.0, 1.0, 420, dtype=F64)
    negative = -torch.logspace(math.log10(0.05), math.log10(2.0), 18, dtype=F64)
    tail = torch.logspace(math.log10(0.05), math.log10(5.0), 156, dtype=F64)
    outliers = torch.tensor([5.0, 8.0, 12.0, 20.0, 30.0, 42.0], dtype=F64)
    return torch.cat([bulk, negative, tail, outliers]).sort().values


def test_a_coarse_density_of_a_near_zero_bulk_warns_no_more():
    lam = near_zero_bulk()
    cutoff = 1e-3 * 42.0
    assert float((lam < -cutoff).double().mean()) == pytest.approx(0.03)
    op = spectrum_operator(lam)
    # auto_uba's coarse density (2 probes x 24 Lanczos steps); this seed reproduces the report:
    # a node of the bulk lands under the cut-off with its whole weight.
    coarse = slq_density(op, num_probes=2, num_iters=24, generator=torch.Generator().manual_seed(9))
    assert coarse.negative_mass(threshold=cutoff) > 0.3  # what the old count warned of
    est = _estimate_with(lam, coarse)
    assert est.negative_mass < 0.03  # resolved: at most the truth
    assert negative_curvature_note(est) is None
    for seed in range(9):  # nor for other probes
        other = slq_density(
            op, num_probes=2, num_iters=24, generator=torch.Generator().manual_seed(seed)
        )
        assert negative_mass(other, 42.0) < 0.03


def test_negative_curvature_beyond_the_resolution_is_still_warned_of():
    # 30 % of the eigenvalues spread over [-5, -1], far below the cut-off and the node spacing.
    n = 600
    negative = torch.linspace(-5.0, -1.0, 180, dtype=F64)
    bulk = 0.04 * torch.linspace(-1.0, 1.0, 300, dtype=F64)
    positive = torch.linspace(0.05, 42.0, n - 480, dtype=F64)
    lam = torch.cat([negative, bulk, positive]).sort().values
    op = spectrum_operator(lam)
    for seed in range(4):
        coarse = slq_density(
            op, num_probes=2, num_iters=24, generator=torch.Generator().manual_seed(seed)
        )
        est = _estimate_with(lam, coarse)
        assert 0.2 < est.negative_mass <= 0.3 + 0.05  # a lower bound, less one node's weight
        note = negative_curvature_note(est)
        assert note is not None and "% of the spectrum is negative curvature" in note
