"""Stability limits against the real torch.optim classes on a quadratic 0.5 xᵀHx (dense SPD H).

For each optimizer the rate is set so that η·λ is 0.97× and 1.03× the limit, λ the top eigenvalue
of the curvature the optimizer sees (H + w for SGD; P^-1/2 (H + w I) P^-1/2 for the adaptive
ones, with P computed here from torch's formula and the state loaded through load_state_dict). The
second moments are frozen by a β₂ (alpha) of 1 - 1e-12, or Adagrad's huge sums, and a huge step
count, so that the test checks the frozen-preconditioner limit: just below it the iterate decays,
just above it blows up.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import uba_auto
from uba_auto import phi as P
from uba_auto.phi import OptimizerStability, optimizer_stability, stability_limit

N = 6
DTYPE = torch.float64
STEPS = 3000
FROZEN = 1 - 1e-12  # β₂ / alpha: the second moments move by ~1e-12 of themselves per step


def _hessian(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=DTYPE))
    return q @ torch.diag(torch.linspace(1.0, 4.0, N, dtype=DTYPE)) @ q.T


def _spread(seed: int, low: float, high: float) -> torch.Tensor:
    """Per-coordinate values 10**U(low, high): a preconditioner that varies across coordinates."""
    gen = torch.Generator().manual_seed(seed)
    return 10.0 ** (low + (high - low) * torch.rand(N, generator=gen, dtype=DTYPE))


def _growth(optimizer: torch.optim.Optimizer, x: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖x‖/‖x₀‖ after STEPS steps of ``optimizer`` on 0.5 xᵀHx, or as soon as it passes 1e4."""
    start = float(x.detach().norm())
    ratio = 1.0
    for _ in range(STEPS):
        x.grad = hessian @ x.detach()
        optimizer.step()
        ratio = float(x.detach().norm()) / start
        if ratio > 1e4:
            break
    return ratio


def _load(optimizer: torch.optim.Optimizer, state: dict) -> None:
    saved = optimizer.state_dict()
    saved["state"] = {0: state}
    optimizer.load_state_dict(saved)


# Each case builds its optimizer on x at rate lr, loads a chosen state, and returns
# (optimizer, P, w): P the diagonal the update divides by (torch's formula on that state; ones for
# SGD) and w the coupled weight decay inside the preconditioned curvature (SGD's is not inside H:
# it is the weight_decay that OptimizerStability says to add to λ).


def _sgd(**settings):
    def build(x, lr, seed):
        opt = torch.optim.SGD([x], lr=lr, **settings)
        return opt, torch.ones(N, dtype=DTYPE), 0.0  # SGD's decay: OptimizerStability.weight_decay

    return build


def _adam(cls=torch.optim.Adam, amsgrad=False, **settings):
    def build(x, lr, seed):
        opt = cls([x], lr=lr, betas=(0.9, FROZEN), eps=1e-8, amsgrad=amsgrad, **settings)
        v = _spread(seed, 0.0, 2.0)
        state = {"step": torch.tensor(1e15), "exp_avg": torch.zeros(N, dtype=DTYPE)}
        state["exp_avg_sq"] = v
        if amsgrad:  # the running maximum, above the average, is what the update divides by
            v = 3.0 * v
            state["max_exp_avg_sq"] = v
        _load(opt, state)
        correction = 1 - FROZEN ** float(opt.state[x]["step"])  # = 1 at this step count
        decoupled = cls is torch.optim.AdamW or settings.get("decoupled_weight_decay", False)
        coupled = 0.0 if decoupled else settings.get("weight_decay", 0.0)
        return opt, (v / correction).sqrt() + 1e-8, coupled

    return build


def _adagrad(**settings):
    def build(x, lr, seed):
        opt = torch.optim.Adagrad([x], lr=lr, eps=1e-10, **settings)
        total = _spread(seed, 13.0, 15.0)  # huge: the squared gradients barely add to it
        _load(opt, {"step": torch.tensor(1e9), "sum": total})  # float32 1e9 + 1 == 1e9: s stays
        return opt, total.sqrt() + 1e-10, settings.get("weight_decay", 0.0)

    return build


def _rmsprop(centered=False, **settings):
    def build(x, lr, seed):
        opt = torch.optim.RMSprop([x], lr=lr, alpha=FROZEN, eps=1e-8, centered=centered, **settings)
        square_avg = _spread(seed, 0.0, 2.0)
        state = {"step": torch.tensor(1e6), "square_avg": square_avg}
        if settings.get("momentum", 0.0):
            state["momentum_buffer"] = torch.zeros(N, dtype=DTYPE)
        variance = square_avg
        if centered:
            sign = torch.where(torch.arange(N) % 2 == 0, 1.0, -1.0).to(DTYPE)
            state["grad_avg"] = 0.7 * square_avg.sqrt() * sign
            variance = square_avg - state["grad_avg"] ** 2
        _load(opt, state)
        return opt, variance.sqrt() + 1e-8, settings.get("weight_decay", 0.0)

    return build


CASES = {
    "sgd": (_sgd(), 2.0),
    "sgd-weight-decay": (_sgd(weight_decay=0.5), 2.0),
    "sgd-heavy-ball": (_sgd(momentum=0.9), 3.8),
    "sgd-dampening": (_sgd(momentum=0.5, dampening=0.5), 6.0),
    "sgd-nesterov": (_sgd(momentum=0.9, nesterov=True), 3.8 / 2.8),
    "adam": (_adam(), 38.0),
    "adam-coupled-decay": (_adam(weight_decay=0.3), 38.0),
    "adam-amsgrad": (_adam(amsgrad=True), 38.0),
    "adamw": (_adam(torch.optim.AdamW, weight_decay=1 / 57), None),  # (2 - ηw) depends on η
    "adagrad": (_adagrad(lr_decay=1e-8), 22.0),  # 2 (1 + 1e9 * 1e-8)
    "adagrad-weight-decay": (_adagrad(weight_decay=1e-6), 2.0),
    "rmsprop": (_rmsprop(), 2.0),
    "rmsprop-momentum": (_rmsprop(momentum=0.6), 3.2),
    "rmsprop-centered": (_rmsprop(centered=True, momentum=0.3), 2.6),
}


def _top_curvature(preconditioner: torch.Tensor, coupled: float, hessian: torch.Tensor) -> float:
    scale = preconditioner.rsqrt()
    curvature = scale[:, None] * (hessian + coupled * torch.eye(N, dtype=DTYPE)) * scale[None, :]
    return float(torch.linalg.eigvalsh(curvature)[-1])


def _at_fraction(build, fraction: float, seed: int):
    """The optimizer at the rate with η·λ = fraction × its limit (a fixed point: AdamW's limit
    depends on η), its iterate, the stability it reports and λ."""
    x = torch.nn.Parameter(torch.ones(N, dtype=DTYPE))
    hessian = _hessian(seed)
    _, preconditioner, coupled = build(x, 1.0, seed)
    lam = _top_curvature(preconditioner, coupled, hessian)
    lr = 1.0 / lam
    for _ in range(100):
        opt, _, _ = build(x, lr, seed)
        stability = optimizer_stability(opt)
        lr = fraction * stability.limit / (lam + stability.weight_decay)
    opt, _, _ = build(x, lr, seed)
    stability = optimizer_stability(opt)
    assert lr * (lam + stability.weight_decay) == pytest.approx(fraction * stability.limit, 1e-12)
    return opt, x, hessian, stability


@pytest.mark.parametrize("case", CASES)
def test_limit_decays_below_and_blows_up_above_with_the_real_optimizer(case):
    build, expected = CASES[case]
    seed = sorted(CASES).index(case)
    opt, x, hessian, stability = _at_fraction(build, 0.97, seed)
    if expected is not None:
        assert stability.limit == pytest.approx(expected, rel=1e-12)
    assert stability.curvature == ("hessian" if case.startswith("sgd") else "preconditioned")
    assert _growth(opt, x, hessian) < 1e-3
    opt, x, hessian, _ = _at_fraction(build, 1.03, seed)
    assert _growth(opt, x, hessian) > 1e3


def test_adamw_decoupled_decay_lowers_the_limit_and_the_plain_38_diverges():
    build = CASES["adamw"][0]
    opt, x, hessian, stability = _at_fraction(build, 0.97, seed=3)
    lr, w = stability.peak_lr, 1 / 57
    assert stability.limit == pytest.approx(19 * (2 - lr * w), rel=1e-12)
    assert 0.2 < lr * w < 0.6  # the (2 - ηw) factor is far from 2 here
    assert stability.weight_decay == 0.0 and "decoupled w=0.0175" in stability.formula

    # The rate that Adam's 38 calls 3 % below the edge diverges under AdamW's decay.
    x = torch.nn.Parameter(torch.ones(N, dtype=DTYPE))
    _, preconditioner, _ = build(x, 1.0, 3)
    naive_lr = 0.97 * 38.0 / _top_curvature(preconditioner, 0.0, hessian)
    opt, _, _ = build(x, naive_lr, 3)
    assert optimizer_stability(opt).limit < 0.97 * 38.0 / 1.05  # 38 overstates the edge by > 5 %
    assert _growth(opt, x, hessian) > 1e3


def test_result_fields_group_and_peak_rate():
    params = [torch.zeros(2), torch.zeros(3)]
    opt = torch.optim.SGD(
        [{"params": params[:1], "momentum": 0.0}, {"params": params[1:], "lr": 0.3}],
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    opt.step()
    scheduler.step()  # lr halves, initial_lr is the peak
    stability = optimizer_stability(opt)
    assert isinstance(stability, OptimizerStability)
    assert (stability.group, stability.peak_lr, stability.limit) == (1, 0.3, pytest.approx(3.8))
    assert (stability.optimizer, stability.curvature, stability.weight_decay) == (
        "SGD",
        "hessian",
        1e-3,
    )
    assert "2(1+b)/(1-d) = 3.8" in stability.formula
    with pytest.raises(AttributeError):
        stability.limit = 1.0  # frozen

    adam = torch.optim.Adam(
        params, lr=torch.tensor(0.01), betas=(torch.tensor(0.8), torch.tensor(0.99))
    )
    stability = optimizer_stability(adam)
    # float32 tensors
    assert stability.limit == pytest.approx(2 * 1.8 / 0.2, rel=1e-6)
    assert stability.peak_lr == pytest.approx(0.01, rel=1e-6)
    assert "P = sqrt(v_hat)+eps frozen, bias correction of m ignored" in stability.formula
    coupled = optimizer_stability(torch.optim.Adam(params, weight_decay=0.1))
    assert coupled.limit == pytest.approx(38.0) and "(H + 0.1 I)" in coupled.formula
    # Adam's own decoupled flag is AdamW's rule.
    flag = torch.optim.Adam(params, lr=0.5, weight_decay=1.0, decoupled_weight_decay=True)
    assert optimizer_stability(flag).limit == pytest.approx(19 * 1.5)


def test_adagrad_reads_the_step_count_and_never_changes_the_state():
    x = torch.nn.Parameter(torch.ones(3, dtype=DTYPE))
    opt = torch.optim.Adagrad([x], lr=0.1, lr_decay=0.5)
    assert optimizer_stability(opt).limit == 2.0  # before the first step: s = 0
    for _ in range(4):
        x.grad = x.detach().clone()
        opt.step()
    before = copy.deepcopy(opt.state_dict())
    stability = optimizer_stability(opt)
    assert stability.limit == 2.0 * (1 + 4 * 0.5) and "s=4 steps taken" in stability.formula
    after = opt.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for key, value in before["state"][0].items():
        assert (
            torch.equal(value, after["state"][0][key])
            and value.dtype == after["state"][0][key].dtype
        )
    opt.state.clear()  # a defaultdict: reading it must not add entries
    assert optimizer_stability(opt).limit == 2.0 and len(opt.state) == 0


class Prodigy(torch.optim.Optimizer):
    """An optimizer outside torch.optim (stands in for Prodigy, schedule-free, LAMB)."""

    def __init__(self, params, lr=1.0):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        return None


REFUSED = [
    lambda p: torch.optim.NAdam(p),
    lambda p: torch.optim.RAdam(p),
    lambda p: torch.optim.Adamax(p),
    lambda p: torch.optim.Adadelta(p),
    lambda p: torch.optim.ASGD(p),
    lambda p: torch.optim.Rprop(p),
    lambda p: torch.optim.LBFGS(p),
    lambda p: torch.optim.SparseAdam(p),
    lambda p: Prodigy(p),
]


@pytest.mark.parametrize("make", REFUSED)
def test_refuses_optimizers_without_a_derived_limit(make):
    opt = make([torch.nn.Parameter(torch.zeros(2))])
    name = f"{type(opt).__module__}.{type(opt).__qualname__}"
    with pytest.raises(ValueError, match="no stability limit is derived for") as info:
        optimizer_stability(opt)
    message = str(info.value)
    assert name in message
    assert "SGD, Adam, AdamW, Adagrad and RMSprop" in message
    assert "probe_curvature" in message and "'gated-edge' link falls back" in message
    with pytest.raises(ValueError, match="no stability limit"):
        stability_limit(opt)


def test_refuses_non_optimizers_and_settings_outside_the_derivation():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got Linear"):
        optimizer_stability(torch.nn.Linear(2, 2))
    nesterov = torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)
    nesterov.param_groups[0]["dampening"] = 0.1  # torch checks this only at construction
    with pytest.raises(ValueError, match=r"param_groups\[0\] has nesterov=True with dampening"):
        optimizer_stability(nesterov)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['maximize'\] is True"):
        optimizer_stability(torch.optim.Adam(p, maximize=True))
    with pytest.raises(ValueError, match=r"lr \* weight_decay = 2.0 >= 2"):
        optimizer_stability(torch.optim.AdamW(p, lr=1.0, weight_decay=2.0))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['momentum'\] must lie in \[0, 1\)"):
        optimizer_stability(torch.optim.SGD(p, lr=0.1, momentum=1.0))
    with pytest.raises(TypeError, match="reads dampening and nesterov from the optimizer"):
        stability_limit(torch.optim.SGD(p, lr=0.1), 0.5)


def test_subclasses_are_accepted_under_their_own_name():
    class MyAdamW(torch.optim.AdamW):
        pass

    stability = optimizer_stability(MyAdamW([torch.zeros(1)], lr=0.1, weight_decay=0.0))
    assert stability.optimizer == "MyAdamW" and stability.limit == pytest.approx(38.0)


def test_numeric_form_and_public_names_unchanged():
    assert uba_auto.stability_limit is P.stability_limit is stability_limit
    assert uba_auto.stability_fraction is P.stability_fraction
    assert uba_auto.optimizer_stability is optimizer_stability
    assert {"OptimizerStability", "optimizer_stability"} <= set(uba_auto.__all__)
    assert stability_limit() == 2.0
    assert stability_limit(momentum=0.9) == pytest.approx(3.8, rel=1e-15)
    assert stability_limit(0.5, dampening=0.5) == pytest.approx(6.0)
    assert stability_limit(0.0, 0.5, nesterov=True) == 2.0  # torch ignores both without momentum
    assert stability_limit(momentum=0.9, nesterov=True) == pytest.approx(3.8 / 2.8)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\) or a torch"):
        stability_limit("adam")
    opt = torch.optim.RMSprop([torch.zeros(1)], momentum=0.9)
    assert stability_limit(opt) == optimizer_stability(opt).limit == pytest.approx(3.8)
    assert P.stability_fraction(2.0, 0.1, 3.8, weight_decay=0.2) == pytest.approx(0.22 / 3.8)
    assert math.isclose(stability_limit(torch.optim.SGD([torch.zeros(1)], lr=1.0)), 2.0)
