"""The preconditioned curvature P^{-1/2} (H + W) P^{-1/2} against dense float64 references.

Real torch.optim optimizers take real steps; P is rebuilt here from their state with torch's
formulas, the operator is compared with the dense matrix built from torch.func.hessian, and the P
read is checked bit for bit against the denominator of a real step. The optimizer and the model
are never changed (state_dict bit-identical, step counters included, no new state entries).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _models import Problem, cnn_batchnorm, linear_regression, tanh_mlp
from _reference import F64, _Reference, assert_close
from _state_checks import assert_state_unchanged, snapshot_state
from torch import Tensor

from uba_auto import lanczos
from uba_auto.curvature import (
    ADAPTIVE_OPTIMIZERS,
    GGNOperator,
    HessianOperator,
    PreconditionedOperator,
    Preconditioner,
    build_operator,
    estimate_preconditioner,
    is_adaptive,
    optimizer_param_names,
    optimizer_preconditioner,
    precondition,
    preconditioner_from_state,
)

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-coupled-decay": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.9), amsgrad=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(
        p, lr=0.1, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.1
    ),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, weight_decay=0.01),
    "rmsprop-centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True),
}
STEPS = 4


def _two_groups(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam with its own eps and beta2 in the first group (each parameter uses its group's)."""
    params = list(model.parameters())
    return torch.optim.Adam(
        [{"params": params[:2], "eps": 1e-3, "betas": (0.5, 0.7)}, {"params": params[2:]}],
        lr=1e-2,
        weight_decay=0.02,
    )


def _train(problem: Problem, optimizer: torch.optim.Optimizer, steps: int = STEPS) -> None:
    """Real steps on the problem's batches, with a seeded forked RNG (dropout draws numbers)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for k in range(steps):
            x, y = problem.batches[k % len(problem.batches)]
            optimizer.zero_grad()
            problem.loss(problem.model(x), y).backward()
            optimizer.step()
        optimizer.zero_grad()


def _trained(
    factory: Callable[[Problem], Problem], name: str, *, dtype: torch.dtype = F64
) -> tuple[Problem, torch.optim.Optimizer]:
    problem = factory()
    problem.model.to(dtype)
    problem.batches = [(x.to(dtype), y) for x, y in problem.batches]
    opt = (
        _two_groups(problem.model)
        if name == "adam-groups"
        else OPTIMIZERS[name](problem.model.parameters())
    )
    _train(problem, opt)
    return problem, opt


def _group_of(opt: torch.optim.Optimizer, p: Tensor) -> dict[str, Any]:
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def _dense_preconditioner(
    opt: torch.optim.Optimizer, model: torch.nn.Module, names: list[str]
) -> tuple[Tensor, Tensor]:
    """P and the coupled decay w from the state, by the textbook formulas, in float64."""
    named = dict(model.named_parameters())
    parts, decays = [], []
    for n in names:
        p, state = named[n], opt.state[named[n]]
        group = _group_of(opt, p)
        if isinstance(opt, torch.optim.Adam):
            v = state["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"].to(F64)
            t = float(state["step"])
            part = torch.sqrt(v / (1 - group["betas"][1] ** t)) + group["eps"]
            coupled = not group["decoupled_weight_decay"]
        elif isinstance(opt, torch.optim.Adagrad):
            part, coupled = torch.sqrt(state["sum"].to(F64)) + group["eps"], True
        else:
            v = state["square_avg"].to(F64)
            if group["centered"]:
                v = v - state["grad_avg"].to(F64) ** 2
            part, coupled = torch.sqrt(v) + group["eps"], True
        parts.append(part.reshape(-1))
        decays.append(
            torch.full((p.numel(),), group["weight_decay"] if coupled else 0.0, dtype=F64)
        )
    return torch.cat(parts), torch.cat(decays)


def _similar(dense: Tensor, pre: Tensor, decay: Tensor) -> Tensor:
    d = pre.rsqrt()
    return d[:, None] * (dense + torch.diag(decay)) * d[None, :]


def _assert_similar(actual: Tensor, dense: Tensor, pre: Tensor, decay: Tensor) -> None:
    """``actual`` is D (dense + W) D, to 1e-10 of the largest entry of each: the scaling by
    d_i d_j also scales the error of the product, so entry (i, j) is allowed d_i d_j times it."""
    expected = _similar(dense, pre, decay)
    d = pre.rsqrt()
    unscaled = (actual - expected) / (d[:, None] * d[None, :])
    assert float(unscaled.abs().max()) <= 1e-10 * float((dense + torch.diag(decay)).abs().max())
    assert_close(actual, expected, rtol=1e-8)


def _probe(problem: Problem, opt: torch.optim.Optimizer, curvature: str = "hessian") -> Any:
    cls = HessianOperator if curvature == "hessian" else GGNOperator
    names = optimizer_param_names(problem.model, opt)
    return cls(problem.model, problem.batches, problem.loss, dtype=F64, params=names)


# ------------------------------------------------------------------------- dense ground truth
# Every optimizer's P with the Hessian; the GGN and the BatchNorm CNN with a few (the products are
# the base operator's, already tested in test_hessian.py; what varies here is P).
CASES = (
    [(tanh_mlp, name, "hessian") for name in [*OPTIMIZERS, "adam-groups"]]
    + [(tanh_mlp, name, "ggn") for name in ("adam-coupled-decay", "adamw", "rmsprop-centered")]
    + [(cnn_batchnorm, "adam-coupled-decay", curvature) for curvature in ("hessian", "ggn")]
)


@pytest.mark.parametrize(("factory", "name", "curvature"), CASES)
def test_preconditioned_operator_equals_the_dense_similar_matrix(
    factory: Callable[[], Problem], name: str, curvature: str
) -> None:
    problem, opt = _trained(factory, name)
    snapshot, num_states = snapshot_state(problem.model, opt), len(opt.state)
    op = _probe(problem, opt, curvature)
    pre = preconditioner_from_state(opt, problem.model, op)
    assert pre is not None and pre.source == "state" and pre.step == STEPS
    assert pre.optimizer == type(opt).__name__ and f"step {STEPS}" in pre.description
    expected_p, expected_w = _dense_preconditioner(opt, problem.model, op.param_names)
    assert_close(pre.diagonal, expected_p, rtol=1e-14)
    if expected_w.any():
        assert_close(pre.coupled_weight_decay, expected_w, rtol=0)
    else:
        assert pre.coupled_weight_decay is None  # AdamW's decay is decoupled

    prec = PreconditionedOperator(op, pre)
    dense = prec.to_dense()
    assert prec.num_matvecs == prec.size == op.size
    ref = _Reference(problem, problem.batches, "train-deterministic")
    curv = ref.hessian() if curvature == "hessian" else ref.ggn()
    _assert_similar(dense, curv, expected_p, expected_w)
    # Same spectrum as the non-symmetric P⁻¹(A + W), computed directly.
    direct = torch.linalg.eigvals((curv + torch.diag(expected_w)) / expected_p[:, None])
    assert float(direct.imag.abs().max()) < 1e-8 * float(direct.abs().max())
    assert_close(torch.linalg.eigvalsh(dense), torch.sort(direct.real).values, rtol=1e-9)
    assert_state_unchanged(problem.model, snapshot, opt)
    assert len(opt.state) == num_states


def test_solvers_and_a_local_operator_work_on_the_composition_unchanged() -> None:
    problem, opt = _trained(tanh_mlp, "adamw")
    names = optimizer_param_names(problem.model, opt)
    local = build_operator(
        "hessian",
        problem.model,
        problem.batches,
        problem.loss,
        mode="train-deterministic",
        engine="double-backward",
        dtype=F64,
        params=names,
        comm=None,
    )
    prec = PreconditionedOperator(local, optimizer_preconditioner(opt, problem.model, local))
    dense = prec.to_dense()
    assert_close(
        dense, PreconditionedOperator(_probe(problem, opt), prec.preconditioner).to_dense()
    )
    result = lanczos(prec, max_iters=prec.size, which="largest", tol=1e-12)
    torch.testing.assert_close(result.eigenvalues[-1], torch.linalg.eigvalsh(dense)[-1])
    assert prec.num_matvecs == prec.size + result.num_matvecs


@pytest.mark.parametrize("name", ["adam-coupled-decay", "rmsprop"])
def test_batch_operator_is_one_batch_with_the_same_preconditioner(name: str) -> None:
    problem, opt = _trained(tanh_mlp, name)
    op = _probe(problem, opt)
    prec = PreconditionedOperator(op, optimizer_preconditioner(opt, problem.model, op))
    pre, decay = prec.preconditioner.diagonal, prec.preconditioner.coupled_weight_decay
    for i, batch in enumerate(problem.batches):
        sub = prec.batch_operator(i)
        assert isinstance(sub, PreconditionedOperator) and sub.preconditioner is prec.preconditioner
        assert sub.num_batches == 1 and sub.batch_sizes == [len(batch[0])]
        ref = _Reference(problem, [batch], "train-deterministic")
        _assert_similar(sub.to_dense(), ref.hessian(), pre, decay)
        assert sub.num_matvecs == sub.size
        assert_close(sub.gradient(), ref.gradient())  # the base's gradient, not preconditioned
    assert prec.num_matvecs == 0


def test_forwarded_attributes_are_the_base_operators() -> None:
    problem, opt = _trained(tanh_mlp, "adam")
    op = _probe(problem, opt)
    prec = PreconditionedOperator(op, optimizer_preconditioner(opt, problem.model, op))
    for attr in (
        "size",
        "dtype",
        "device",
        "param_names",
        "param_shapes",
        "num_batches",
        "batch_sizes",
        "global_batch_sizes",
        "batch_set",
    ):
        assert getattr(prec, attr) == getattr(op, attr), attr
    assert torch.equal(prec.batch_losses, op.batch_losses)
    assert torch.equal(prec.loss_value(), op.loss_value())
    assert torch.equal(prec.gradient(), op.gradient())
    vec = torch.arange(op.size, dtype=F64)
    assert torch.equal(prec.flatten(prec.unflatten(vec)), vec)
    assert prec.name == "PreconditionedOperator(HessianOperator)"
    assert precondition.PreconditionedOperator is PreconditionedOperator  # the brief's module
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = prec.nope


# -------------------------------------------------------------- the P read is the step's divisor
def _replayed_update(
    opt: torch.optim.Optimizer, p: Tensor, old: Tensor, grad: Tensor, pre: Tensor
) -> Tensor:
    """The parameter after the step, recomputed with ``pre`` as the divisor (torch's operations)."""
    group, state = _group_of(opt, p), opt.state[p]
    lr, wd, t = group["lr"], group["weight_decay"], float(state["step"])
    if isinstance(opt, torch.optim.Adam):
        if group["decoupled_weight_decay"]:
            old = old.mul(1 - lr * wd)
        return old.addcdiv(state["exp_avg"], pre, value=-(lr / (1 - group["betas"][0] ** t)))
    grad = grad.add(old, alpha=wd)
    if isinstance(opt, torch.optim.Adagrad):
        return old.addcdiv(grad, pre, value=-(lr / (1 + (t - 1) * group["lr_decay"])))
    if group["momentum"] > 0:  # the buffer holds the directions: check it, then the parameter
        return old.add(state["momentum_buffer"], alpha=-lr)
    return old.addcdiv(grad, pre, value=-lr)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", [*OPTIMIZERS, "adam-groups"])
def test_the_preconditioner_is_bit_for_bit_what_the_step_divided_by(
    name: str, dtype: torch.dtype
) -> None:
    problem, opt = _trained(tanh_mlp, name, dtype=dtype)
    model, opt = copy.deepcopy((problem.model, opt))  # one more step, on a copy
    gen = torch.Generator().manual_seed(7)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {
        n: opt.state[p]["momentum_buffer"].clone()
        for n, p in model.named_parameters()
        if "momentum_buffer" in opt.state[p]
    }
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    op = HessianOperator(model, problem.batches, problem.loss)  # the model's dtype: P's own bits
    pre = preconditioner_from_state(opt, model, op)
    assert pre.step == STEPS + 1 and pre.diagonal.dtype == dtype
    for n, p_pre in op.unflatten(pre.diagonal).items():
        p = dict(model.named_parameters())[n]
        assert torch.equal(p.detach(), _replayed_update(opt, p, old[n], grads[n], p_pre)), n
        if n in buffers:
            grad = grads[n].add(old[n], alpha=_group_of(opt, p)["weight_decay"])
            momentum = _group_of(opt, p)["momentum"]
            replayed = buffers[n].mul(momentum).addcdiv(grad, p_pre)
            assert torch.equal(opt.state[p]["momentum_buffer"], replayed), n


# ------------------------------------------------------------------ before the first step
@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (tanh_mlp, "adam-coupled-decay"),
        (tanh_mlp, "adamw"),
        (tanh_mlp, "adagrad"),
        (tanh_mlp, "rmsprop-centered"),
        (tanh_mlp, "adam-groups"),
        (cnn_batchnorm, "adam"),
    ],
)
def test_the_estimate_before_the_first_step_is_the_mean_squared_batch_gradient(
    factory: Callable[[], Problem], name: str
) -> None:
    problem = factory()
    problem.model.double()
    problem.batches = [(x.double(), y) for x, y in problem.batches]
    opt = (
        _two_groups(problem.model)
        if name == "adam-groups"
        else OPTIMIZERS[name](problem.model.parameters())
    )
    snapshot, num_states = snapshot_state(problem.model, opt), len(opt.state)
    op = _probe(problem, opt)
    assert preconditioner_from_state(opt, problem.model, op) is None
    pre = optimizer_preconditioner(opt, problem.model, op)
    assert pre.source == "estimate" and pre.step is None and "estimated over 3" in pre.description

    named = dict(problem.model.named_parameters())
    theta = torch.cat([named[n].detach().reshape(-1) for n in op.param_names])
    groups = [_group_of(opt, named[n]) for n in op.param_names]

    def per_coordinate(key: str, default: float = 0.0) -> Tensor:
        return torch.cat(
            [
                torch.full((named[n].numel(),), float(g.get(key, default)), dtype=F64)
                for n, g in zip(op.param_names, groups, strict=True)
            ]
        )

    decay = per_coordinate("weight_decay")
    if isinstance(opt, torch.optim.AdamW):
        decay = torch.zeros_like(decay)
    grads = [
        _Reference(problem, [b], "train-deterministic").gradient() + decay * theta
        for b in problem.batches
    ]
    second = torch.stack(grads).pow(2).mean(0) + per_coordinate("initial_accumulator_value")
    assert_close(pre.diagonal, second.sqrt() + per_coordinate("eps"), rtol=1e-12)
    assert_close(estimate_preconditioner(opt, problem.model, op).diagonal, pre.diagonal, rtol=0)
    assert_state_unchanged(problem.model, snapshot, opt)
    assert len(opt.state) == num_states  # Adam: still 0; Adagrad creates its state up front
    assert len(opt.state) == (len(named) if isinstance(opt, torch.optim.Adagrad) else 0)


# ---------------------------------------------------------------------------- bad input
def test_a_frozen_parameter_is_left_out_of_h_and_p_consistently() -> None:
    problem = tanh_mlp()
    problem.model.double()
    problem.batches = [(x.double(), y) for x, y in problem.batches]
    opt = torch.optim.Adam(problem.model.parameters(), lr=1e-2)  # holds the frozen bias too
    _train(problem, opt, steps=2)
    frozen = problem.model[0].bias.requires_grad_(False)  # frozen with a state of 2 steps
    _train(problem, opt, steps=3)
    names = optimizer_param_names(problem.model, opt)
    assert names == ["0.weight", "2.weight", "2.bias"]
    op = _probe(problem, opt)
    pre = preconditioner_from_state(opt, problem.model, op)
    assert float(opt.state[frozen]["step"]) == 2 and pre.step == 5
    assert (
        pre.diagonal.shape
        == (op.size,)
        == (sum(p.numel() for p in problem.model.parameters()) - 6,)
    )
    expected_p, expected_w = _dense_preconditioner(opt, problem.model, names)
    ref = _Reference(problem, problem.batches, "train-deterministic")  # requires_grad params
    _assert_similar(
        PreconditionedOperator(op, pre).to_dense(), ref.hessian(), expected_p, expected_w
    )


def test_an_operator_over_parameters_the_optimizer_does_not_train_is_refused() -> None:
    problem, _ = _trained(tanh_mlp, "adam")
    opt = torch.optim.Adam(problem.model[2].parameters())
    op = HessianOperator(problem.model, problem.batches, problem.loss, dtype=F64)
    with pytest.raises(
        ValueError,
        match=r"'0.weight', which the optimizer does not train.*"
        r"optimizer_param_names",
    ):
        optimizer_preconditioner(opt, problem.model, op)
    assert optimizer_param_names(problem.model, opt) == ["2.weight", "2.bias"]
    wrapped = torch.nn.DataParallel(problem.model)  # names of the inner module, as the operators'
    assert optimizer_param_names(wrapped, opt) == ["2.weight", "2.bias"]


def test_a_parameter_of_the_optimizer_not_in_the_model_is_refused() -> None:
    problem = tanh_mlp()
    stray = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([{"params": problem.model.parameters()}, {"params": [stray]}])
    with pytest.raises(
        ValueError,
        match=r"param_groups\[1\] holds a tensor of shape \(3,\).*"
        r"model.parameters\(\)",
    ):
        optimizer_param_names(problem.model, opt)
    problem.model.requires_grad_(False)
    with pytest.raises(ValueError, match="trains no parameter of the model that requires grad"):
        optimizer_param_names(problem.model, torch.optim.Adam(problem.model.parameters()))


def test_a_state_of_the_wrong_shape_is_refused_naming_the_parameter() -> None:
    problem, opt = _trained(tanh_mlp, "adam")
    state = copy.deepcopy(opt.state_dict())
    state["state"][2]["exp_avg_sq"] = torch.ones(7, dtype=F64)  # "2.weight" is (3, 6)
    opt.load_state_dict(state)
    snapshot = snapshot_state(problem.model, opt)
    op = _probe(problem, opt)
    with pytest.raises(ValueError, match=r"'exp_avg_sq' of parameter '2.weight' has shape \(7,\)"):
        preconditioner_from_state(opt, problem.model, op)
    assert_state_unchanged(problem.model, snapshot, opt)


def test_a_state_without_the_tensor_its_settings_need_is_refused() -> None:
    problem, opt = _trained(tanh_mlp, "adam")
    amsgrad = torch.optim.Adam(problem.model.parameters(), amsgrad=True)
    amsgrad.load_state_dict(
        {**opt.state_dict(), "param_groups": amsgrad.state_dict()["param_groups"]}
    )
    with pytest.raises(ValueError, match="has no tensor 'max_exp_avg_sq'"):
        preconditioner_from_state(amsgrad, problem.model, _probe(problem, amsgrad))


def test_eps_zero_with_zero_second_moments_is_refused_with_the_fix() -> None:
    problem = linear_regression()
    problem.model.double()
    # Input feature 0 is always 0: the gradient of weight[:, 0] is exactly 0 on every batch.
    problem.batches = [
        (x.double().index_fill(1, torch.tensor([0]), 0.0), y.double()) for x, y in problem.batches
    ]
    opt = torch.optim.Adam(problem.model.parameters(), eps=0.0)
    op = _probe(problem, opt)
    with pytest.raises(
        ValueError,
        match=r"'weight' has 2 of 8 entries equal to 0.*eps=0.0.*"
        r"eps > 0",
    ):
        optimizer_preconditioner(opt, problem.model, op)  # the estimate
    with torch.no_grad():  # a state that torch itself could not step from (0 / 0)
        for p in problem.model.parameters():
            opt.state[p].update(
                step=torch.tensor(3.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)
            )
    with pytest.raises(ValueError, match=r"'weight' has 8 of 8 entries equal to 0"):
        preconditioner_from_state(opt, problem.model, op)
    opt.state[problem.model.bias]["exp_avg_sq"] = torch.full((2,), float("nan"), dtype=F64)
    opt.state[problem.model.weight]["exp_avg_sq"] += 1.0
    with pytest.raises(ValueError, match=r"'bias' has 2 non-finite entries"):
        preconditioner_from_state(opt, problem.model, op)


def test_partial_state_is_refused() -> None:
    problem = tanh_mlp()
    opt = torch.optim.Adam(problem.model.parameters())
    for p in problem.model[2].parameters():  # a step in which only the last layer has a gradient
        p.grad = torch.ones_like(p)
    opt.step()
    op = HessianOperator(problem.model, problem.batches, problem.loss, dtype=F64)
    with pytest.raises(
        ValueError, match=r"2 probed parameters have no optimizer state.*'0.weight'"
    ):
        preconditioner_from_state(opt, problem.model, op)


def test_non_adaptive_optimizers_and_mismatched_preconditioners_are_refused() -> None:
    problem, opt = _trained(tanh_mlp, "adam")
    sgd = torch.optim.SGD(problem.model.parameters(), lr=0.1)
    assert is_adaptive(opt) and not is_adaptive(sgd)
    assert all(is_adaptive(cls(problem.model.parameters())) for cls in ADAPTIVE_OPTIMIZERS)
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer, got str"):
        is_adaptive("adam")
    op = _probe(problem, opt)
    with pytest.raises(TypeError, match="got SGD.*P = I"):
        optimizer_preconditioner(sgd, problem.model, op)
    pre = optimizer_preconditioner(opt, problem.model, op)
    fresh = tanh_mlp()  # float32, the same layout
    op32 = HessianOperator(fresh.model, fresh.batches, fresh.loss)
    with pytest.raises(ValueError, match="preconditioner.diagonal must have shape.*float32"):
        PreconditionedOperator(op32, pre)
    bad = Preconditioner(-pre.diagonal, "Adam", "state", 1, "", None)
    with pytest.raises(ValueError, match="finite and > 0"):
        PreconditionedOperator(op, bad)
    with pytest.raises(TypeError, match="preconditioner must be a Preconditioner"):
        PreconditionedOperator(op, pre.diagonal)
    with pytest.raises(TypeError, match="base must be a SymmetricOperator"):
        PreconditionedOperator(pre.diagonal, pre)


def test_the_gradient_start_is_in_the_preconditioned_coordinates() -> None:
    """Under Adam the probe's Lanczos starts from d ⊙ g (d = P^{-1/2}, g batch 0's gradient): two
    of its steps are dense Lanczos' on D H D from gradient_start(d ⊙ g)."""
    from uba_auto import probe_curvature
    from uba_auto.linear_operator import DenseOperator
    from uba_auto.probe.steps import gradient_start

    problem, opt = _trained(tanh_mlp, "adam")
    op = _probe(problem, opt)
    prec = PreconditionedOperator(op, optimizer_preconditioner(opt, problem.model, op))
    d = prec.preconditioner.diagonal.rsqrt()
    g0 = _Reference(problem, problem.batches[:1], "train-deterministic").gradient()
    assert_close(prec.batch_operator(0).scaled_gradient(), d * g0)
    gen = torch.Generator().manual_seed(5)
    dense = lanczos(DenseOperator(prec.to_dense()), max_iters=2, tol=1e-300,
                    v0=gradient_start(d * g0, gen))  # fmt: skip
    est = probe_curvature(
        problem.model, problem.batches, problem.loss, num_batches=len(problem.batches),
        optimizer=opt, max_hvps=2 * len(problem.batches), per_batch=False, trace=False,
        dtype=F64, seed=5, start="gradient",
    )  # fmt: skip
    assert est.lambda_max == pytest.approx(dense.lambda_max, rel=1e-10)
    assert est.lambda_min == pytest.approx(dense.lambda_min, rel=1e-10)
