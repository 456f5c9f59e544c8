"""HessianOperator and GGNOperator against dense float64 references, state safety, errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _models import PROBLEMS, SEPARABLE, Problem, make_problem
from _reference import F64, _Reference, assert_close
from _state_checks import assert_state_unchanged, snapshot_state
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import uba_auto._batches as batches_module
from uba_auto._batches import BatchSet
from uba_auto.curvature import GGNOperator, HessianOperator, ModelLoss, UnsupportedDerivativeError
from uba_auto.curvature import operators as curvature_operators
from uba_auto.curvature import params as curvature_params

# (engine, cache_graph): the three ways the operators compute a product.
CONFIGS = [
    ("double-backward", True),
    ("double-backward", False),
    ("forward-over-reverse", False),
]


def _problem(name: str, num_batches: int) -> Problem:
    return make_problem(name, num_batches=num_batches)


# ----------------------------------------------------------------------------- dense equality
@pytest.mark.parametrize("num_batches", [1, 3])
@pytest.mark.parametrize(("engine", "cache_graph"), CONFIGS)
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_hessian_equals_dense_reference(
    name: str, engine: str, cache_graph: bool, num_batches: int
) -> None:
    problem = _problem(name, num_batches)
    snapshot = snapshot_state(problem.model)
    op = HessianOperator(
        problem.model,
        problem.batches,
        problem.loss,
        engine=engine,
        cache_graph=cache_graph,
        dtype=F64,
    )
    ref = _Reference(problem, problem.batches, "train-deterministic")
    dense = op.to_dense()
    assert op.num_matvecs == op.size == ref.flat0.numel()
    assert_close(dense, ref.hessian())
    assert_close(op.gradient(), ref.gradient())
    torch.testing.assert_close(op.loss_value(), ref.mean_loss(ref.flat0), rtol=1e-12, atol=0)
    assert op.num_batches == num_batches and len(op.batch_sizes) == num_batches
    assert_state_unchanged(problem.model, snapshot)


@pytest.mark.parametrize(("engine", "cache_graph"), CONFIGS)
def test_float32_lstm_runs_on_kernels_with_every_derivative(engine: str, cache_graph: bool) -> None:
    # In float32 on the CPU, nn.LSTM would run oneDNN's fused kernel, which has no forward-mode
    # derivative (forward-over-reverse raised) and a slow double backward: the operators run it
    # on PyTorch's own kernels, the same function up to float32 rounding.
    problem = _problem("tiny_lstm", 2)
    seen: list[bool] = []
    handle = problem.model.lstm.register_forward_hook(
        lambda *_: seen.append(torch.backends.mkldnn.enabled)
    )
    try:
        op = HessianOperator(
            problem.model, problem.batches, problem.loss, engine=engine, cache_graph=cache_graph
        )
        dense = op.to_dense()
    finally:
        handle.remove()
    assert op.dtype == torch.float32 and seen and not any(seen)
    assert torch.backends.mkldnn.enabled and torch.backends.cudnn.enabled
    assert not problem.model.lstm._forward_pre_hooks and not problem.model.lstm._forward_hooks
    ref = _Reference(problem, problem.batches, "train-deterministic")
    assert_close(dense.double(), ref.hessian(), rtol=1e-5)


@pytest.mark.parametrize("num_batches", [1, 3])
@pytest.mark.parametrize(("engine", "cache_graph"), CONFIGS)
@pytest.mark.parametrize("name", SEPARABLE)
def test_ggn_equals_dense_reference_and_is_psd(
    name: str, engine: str, cache_graph: bool, num_batches: int
) -> None:
    problem = _problem(name, num_batches)
    snapshot = snapshot_state(problem.model)
    op = GGNOperator(
        problem.model,
        problem.batches,
        problem.loss,
        engine=engine,
        cache_graph=cache_graph,
        dtype=F64,
    )
    dense = op.to_dense()
    assert_close(dense, _Reference(problem, problem.batches, "train-deterministic").ggn())
    eigenvalues = torch.linalg.eigvalsh(dense)
    assert eigenvalues.min() >= -1e-10 * eigenvalues.abs().max()
    assert_state_unchanged(problem.model, snapshot)


@pytest.mark.parametrize(("engine", "cache_graph"), CONFIGS)
def test_ggn_equals_hessian_for_linear_regression(engine: str, cache_graph: bool) -> None:
    problem = make_problem("linear_regression")
    kwargs = {"engine": engine, "cache_graph": cache_graph, "dtype": F64}
    ggn = GGNOperator(problem.model, problem.batches, problem.loss, **kwargs).to_dense()
    hessian = HessianOperator(problem.model, problem.batches, problem.loss, **kwargs).to_dense()
    assert_close(ggn, hessian, rtol=1e-13)
    # MSE over N samples and 2 outputs: H = kron(I_2, 2 X̃ᵀX̃ / (2N)) per batch, averaged.
    x_tilde = [
        torch.cat([x.to(F64), torch.ones(len(x), 1, dtype=F64)], 1) for x, _ in problem.batches
    ]
    block = sum(xt.T @ xt / len(xt) for xt in x_tilde) / len(x_tilde)
    # named_parameters order is weight (2x4, row-major: output-major), then bias (2).
    w_idx = [[o * 4 + i for i in range(4)] + [8 + o] for o in range(2)]
    for o in range(2):
        idx = torch.tensor(w_idx[o])
        assert_close(hessian[idx][:, idx], block, rtol=1e-13)


# ------------------------------------------------------------------------------- mode policy
@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator])
def test_default_mode_uses_batch_statistics_and_no_dropout(operator: type) -> None:
    problem = make_problem("cnn_batchnorm")
    ref = _Reference(problem, problem.batches, "train-deterministic")
    expected = ref.hessian() if operator is HessianOperator else ref.ggn()
    # The same answer whatever the user's flags: train, eval, or mixed.
    for flags in ("train", "eval", "mixed"):
        model = problem.model
        model.train(flags == "train")
        if flags == "mixed":
            model.bn.eval()
            model.drop.train()
        before = {n: m.training for n, m in model.named_modules()}
        snapshot = snapshot_state(model)
        op = operator(model, problem.batches, problem.loss, dtype=F64)
        assert_close(op.to_dense(), expected)
        assert {n: m.training for n, m in model.named_modules()} == before
        assert_state_unchanged(model, snapshot)


@pytest.mark.parametrize(
    ("name", "engine"),
    [
        ("cnn_batchnorm", "double-backward"),
        ("cnn_batchnorm", "forward-over-reverse"),
        ("hf_style", "forward-over-reverse"),
        ("tiny_transformer", "double-backward"),  # forward-over-reverse: the fast-path test
    ],
)
def test_eval_mode_uses_running_statistics(name: str, engine: str) -> None:
    problem = make_problem(name)
    snapshot = snapshot_state(problem.model)
    op = HessianOperator(
        problem.model, problem.batches, problem.loss, mode="eval", engine=engine, dtype=F64
    )
    expected = _Reference(problem, problem.batches, "eval").hessian()
    assert_close(op.to_dense(), expected)
    assert_state_unchanged(problem.model, snapshot)
    if name == "cnn_batchnorm":  # running statistics differ from batch statistics
        default = HessianOperator(problem.model, problem.batches, problem.loss, dtype=F64)
        assert not torch.allclose(default.to_dense(), expected)


def test_as_is_mode_keeps_flags_of_a_deterministic_model() -> None:
    problem = make_problem("cnn_batchnorm")
    problem.model.eval()
    op = HessianOperator(problem.model, problem.batches, problem.loss, mode="as-is", dtype=F64)
    assert_close(op.to_dense(), _Reference(problem, problem.batches, "eval").hessian())


@pytest.mark.parametrize("mode", ["eval", "train-deterministic"])
def test_transformer_in_eval_mode_skips_the_fast_path(mode: str) -> None:
    # An eval-mode TransformerEncoderLayer whose inputs do not require grad takes the fused fast
    # path, which has no forward-mode derivative (torch.func.jvp fails on it); the probe avoids it.
    problem = make_problem("tiny_transformer", num_batches=1)
    problem.model.eval()
    reference = _Reference(problem, problem.batches, mode)
    kwargs = {"mode": mode, "engine": "forward-over-reverse", "dtype": F64}
    hessian = HessianOperator(problem.model, problem.batches, problem.loss, **kwargs)
    assert_close(hessian.to_dense(), reference.hessian())
    ggn = GGNOperator(problem.model, problem.batches, problem.loss, **kwargs)
    assert_close(ggn.to_dense(), reference.ggn())
    assert torch.backends.mha.get_fastpath_enabled()  # the global switch is restored


# ------------------------------------------------------------------------- one batch's operator
@pytest.mark.parametrize(("engine", "cache_graph"), CONFIGS)
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("name", ["tanh_mlp", "cnn_batchnorm"])
def test_batch_operator_is_the_curvature_of_that_batch_alone(
    name: str, curvature: str, engine: str, cache_graph: bool
) -> None:
    problem = make_problem(name, num_batches=3)
    operator = HessianOperator if curvature == "hessian" else GGNOperator
    config = {"engine": engine, "cache_graph": cache_graph, "dtype": F64}
    op = operator(problem.model, problem.batches, problem.loss, **config)
    for i, batch in enumerate(problem.batches):
        ref = _Reference(problem, [batch], "train-deterministic")
        sub = op.batch_operator(i)
        assert sub.num_matvecs == 0 and sub.num_batches == 1
        assert_close(sub.to_dense(), ref.hessian() if curvature == "hessian" else ref.ggn())
        assert sub.num_matvecs == sub.size == op.size  # its own count
        assert_close(sub.gradient(), ref.gradient())
        torch.testing.assert_close(sub.batch_losses, op.batch_losses[i : i + 1], rtol=0, atol=0)
        assert sub.batch_sizes == [op.batch_sizes[i]] and sub.batches[0] is op.batches[i]
        assert sub.batch_operator(0).to_dense().equal(sub.to_dense())
    assert op.num_matvecs == 0  # the views counted their own products
    with pytest.raises(IndexError, match=r"range\(3\)"):
        op.batch_operator(3)


class _ForwardCounter:
    """Counts the forward passes of a model (functional_call runs its hooks)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1


@pytest.mark.parametrize(("engine", "cache_graph"), CONFIGS)
@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator])
def test_batch_operator_builds_nothing_new(
    operator: type, engine: str, cache_graph: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    problem = make_problem("tanh_mlp", num_batches=3)
    counter = _ForwardCounter(problem.model)
    op = operator(
        problem.model, problem.batches, problem.loss, engine=engine, cache_graph=cache_graph
    )
    built = counter.calls
    assert built == 3  # one forward pass per batch, at construction

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("batch_operator must reuse the operator's batches and point")

    # Neither batches collected or moved, nor parameters copied, nor a graph built.
    monkeypatch.setattr(curvature_params.ParameterPoint, "__init__", refuse)
    monkeypatch.setattr(curvature_operators, "as_batch_set", refuse)
    monkeypatch.setattr(batches_module, "collect_batches", refuse)
    monkeypatch.setattr(batches_module, "move_batch", refuse)
    subs = [op.batch_operator(i) for i in range(op.num_batches)]
    assert counter.calls == built
    v = torch.ones(op.size)
    total = sum(sub.matvec(v) for sub in subs) / len(subs)
    torch.testing.assert_close(total, op.matvec(v), rtol=1e-5, atol=1e-6)
    # A cached graph makes a product a backward pass only, for a batch's view too.
    cached = engine == "double-backward" and cache_graph
    assert (counter.calls == built) == cached


# ------------------------------------------------------------------------- state is untouched
def _prepare_state(model: nn.Module, problem: Problem, flags: str) -> torch.optim.Optimizer:
    """Freeze a parameter, fill optimizer state and some .grad tensors, set the flags."""
    params = list(model.named_parameters())
    params[-1][1].requires_grad_(False)  # a frozen parameter: excluded from the operator
    optimizer = torch.optim.Adam([p for _, p in params if p.requires_grad], lr=1e-3)
    model.train()
    batch = problem.batches[0]
    if isinstance(batch, dict):
        loss = model(**batch).loss if not model.return_dict else model(**batch)["loss"]
    else:
        loss = problem.loss(model(batch[0]), batch[1])
    loss.backward()
    optimizer.step()
    params[0][1].grad = None  # one parameter with .grad None, the others hold a tensor
    if flags == "eval":
        model.eval()
    elif flags == "mixed":
        for i, m in enumerate(model.modules()):
            m.training = i % 2 == 0
    return optimizer


@pytest.mark.parametrize("flags", ["train", "eval", "mixed"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_operators_leave_user_state_bit_for_bit_unchanged(name: str, flags: str) -> None:
    problem = make_problem(name)
    model = problem.model
    optimizer = _prepare_state(model, problem, flags)
    frozen = next(n for n, p in model.named_parameters() if not p.requires_grad)
    snapshot = snapshot_state(model, optimizer)
    operators: list[Callable[..., Any]] = [HessianOperator]
    if problem.separable:
        operators.append(GGNOperator)
    generator = torch.Generator().manual_seed(0)
    for operator in operators:
        for engine, cache_graph in CONFIGS:
            op = operator(
                model, problem.batches, problem.loss, engine=engine, cache_graph=cache_graph
            )
            assert frozen not in op.param_names
            assert op.size == sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert op.dtype == torch.float32
            for _ in range(5):
                op.matvec(torch.randn(op.size, generator=generator))
            op.gradient()
            op.loss_value()
    # Includes torch.get_rng_state(): dropout was off, so no random numbers were drawn.
    assert_state_unchanged(model, snapshot, optimizer)


def test_operators_do_not_consume_rng_in_train_mode_with_dropout() -> None:
    problem = make_problem("cnn_batchnorm")
    state = torch.get_rng_state()
    op = HessianOperator(problem.model, problem.batches, problem.loss)
    op.matvec(torch.ones(op.size))
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------- interfaces
def test_param_subset_is_a_block_of_the_full_hessian() -> None:
    problem = make_problem("tanh_mlp")
    full = HessianOperator(problem.model, problem.batches, problem.loss, dtype=F64)
    sub = HessianOperator(
        problem.model, problem.batches, problem.loss, dtype=F64, params=["2.weight", "0.bias"]
    )
    assert sub.param_names == ["0.bias", "2.weight"]  # model order, not the order given
    numels = [problem.model.get_parameter(n).numel() for n in full.param_names]
    offsets = dict(
        zip(full.param_names, torch.tensor([0, *numels]).cumsum(0).tolist(), strict=False)
    )
    idx = torch.cat(
        [
            torch.arange(offsets[n], offsets[n] + problem.model.get_parameter(n).numel())
            for n in sub.param_names
        ]
    )
    assert_close(sub.to_dense(), full.to_dense()[idx][:, idx])
    by_object = HessianOperator(
        problem.model, problem.batches, problem.loss, params=[problem.model[0].bias]
    )
    assert by_object.param_names == ["0.bias"]


def test_flatten_unflatten_round_trip_and_attributes() -> None:
    problem = make_problem("cnn_batchnorm", num_batches=2, batch_size=5)
    op = HessianOperator(problem.model, problem.batches, problem.loss)
    vec = torch.arange(op.size, dtype=torch.float32)
    parts = op.unflatten(vec)
    assert list(parts) == op.param_names
    assert [p.shape for p in parts.values()] == op.param_shapes
    assert torch.equal(op.flatten(parts), vec)
    assert op.batch_sizes == [5, 5] and op.num_batches == 2
    assert op.batch_losses.shape == (2,)
    assert op.device == torch.device("cpu")
    with pytest.raises(ValueError, match="length"):
        op.unflatten(vec[:-1])


def test_model_loss_matches_the_pair_form() -> None:
    problem = make_problem("tanh_mlp")

    def loss(model: nn.Module, batch: Any) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    expected = HessianOperator(problem.model, problem.batches, problem.loss, dtype=F64).to_dense()
    for engine in ("double-backward", "forward-over-reverse"):
        op = HessianOperator(
            problem.model, problem.batches, ModelLoss(loss), engine=engine, dtype=F64
        )
        assert_close(op.to_dense(), expected)


def test_hf_model_returning_a_dict() -> None:
    problem = make_problem("hf_style", return_dict=True)
    op = HessianOperator(problem.model, problem.batches, None, dtype=F64)
    assert_close(
        op.to_dense(), _Reference(problem, problem.batches, "train-deterministic").hessian()
    )


def test_batch_set_input_keeps_its_record() -> None:
    problem = make_problem("linear_regression")
    batch_set = BatchSet(problem.batches[:2], [8, 8], num_requested=5)
    op = HessianOperator(problem.model, batch_set, problem.loss)
    assert op.batch_set.is_short and op.num_batches == 2


def test_operator_refuses_a_changed_model() -> None:
    problem = make_problem("linear_regression")
    op = HessianOperator(problem.model, problem.batches, problem.loss)
    with torch.no_grad():
        problem.model.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        op.matvec(torch.ones(op.size))


def test_grad_mode_off_outside_does_not_matter() -> None:
    problem = make_problem("tanh_mlp")
    expected = HessianOperator(problem.model, problem.batches, problem.loss, dtype=F64).to_dense()
    with torch.no_grad():
        op = HessianOperator(problem.model, problem.batches, problem.loss, dtype=F64)
        assert_close(op.to_dense(), expected)


# -------------------------------------------------------------------------------------- errors
class _CubeOnce(torch.autograd.Function):
    """x³ with a first derivative only: its backward is @once_differentiable."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class _OnceModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_CubeOnce.apply(self.fc1(x)))


def _error_cases() -> dict[str, tuple[Callable[[], Any], type[Exception], str]]:
    mlp = make_problem("tanh_mlp")
    hf = make_problem("hf_style")
    nan_batches = [(x.clone(), y) for x, y in mlp.batches]
    nan_batches[2][0][0, 0] = float("nan")
    return {
        "empty loader": (
            lambda: HessianOperator(mlp.model, [], mlp.loss),
            ValueError,
            "loader yielded no batches",
        ),
        "pair without loss": (
            lambda: HessianOperator(mlp.model, mlp.batches, None),
            ValueError,
            "pass loss_fn",
        ),
        "non-scalar loss": (
            lambda: HessianOperator(mlp.model, mlp.batches, nn.CrossEntropyLoss(reduction="none")),
            ValueError,
            r"batch 0 must be a scalar, got a tensor of shape \(8,\).*reduction='mean'",
        ),
        "non-finite loss": (
            lambda: HessianOperator(mlp.model, nan_batches, mlp.loss),
            ValueError,
            r"loss of batch 2 is not finite",
        ),
        "GGN of HF model": (
            lambda: GGNOperator(hf.model, hf.batches, None),
            ValueError,
            "separable outputs and a loss_fn",
        ),
        "GGN with ModelLoss": (
            lambda: GGNOperator(mlp.model, mlp.batches, ModelLoss(lambda m, b: m(b[0]).sum())),
            ValueError,
            "separable outputs and a loss_fn",
        ),
        "dict batch with loss_fn": (
            lambda: HessianOperator(hf.model, hf.batches, F.cross_entropy),
            ValueError,
            "dict batch has no targets",
        ),
        "bad mode": (
            lambda: HessianOperator(mlp.model, mlp.batches, mlp.loss, mode="train"),
            ValueError,
            "mode must be one of",
        ),
        "bad engine": (
            lambda: HessianOperator(mlp.model, mlp.batches, mlp.loss, engine="fd"),
            ValueError,
            "engine must be one of",
        ),
        "bad dtype": (
            lambda: HessianOperator(mlp.model, mlp.batches, mlp.loss, dtype=torch.int64),
            TypeError,
            "dtype must be a floating torch.dtype",
        ),
        "unknown param name": (
            lambda: HessianOperator(mlp.model, mlp.batches, mlp.loss, params=["nope"]),
            ValueError,
            "'nope', which is not a parameter",
        ),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_errors_are_clear_and_leave_state_unchanged(case: str) -> None:
    build, error, match = _error_cases()[case]
    models = [make_problem("tanh_mlp").model, make_problem("hf_style").model]
    # The factories are seeded, so these snapshots describe the models the closures use.
    snapshots = [snapshot_state(m) for m in models]
    with pytest.raises(error, match=match):
        build()
    for model, snapshot in zip(models, snapshots, strict=True):
        assert_state_unchanged(model, snapshot)


def test_no_parameter_requires_grad() -> None:
    problem = make_problem("tanh_mlp")
    problem.model.requires_grad_(False)
    snapshot = snapshot_state(problem.model)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        HessianOperator(problem.model, problem.batches, problem.loss)
    assert_state_unchanged(problem.model, snapshot)


def test_random_forward_in_as_is_mode_is_refused() -> None:
    problem = make_problem("cnn_batchnorm")  # train mode: its dropout is active
    snapshot = snapshot_state(problem.model)
    with pytest.raises(ValueError, match="drew random numbers in mode='as-is'"):
        HessianOperator(problem.model, problem.batches, problem.loss, mode="as-is")
    assert_state_unchanged(problem.model, snapshot)  # RNG state restored too


@pytest.mark.parametrize(
    ("operator", "engine", "cache_graph", "match"),
    [
        (HessianOperator, "double-backward", True, "once_differentiable.*_CubeOnce"),
        (HessianOperator, "double-backward", False, "once_differentiable.*_CubeOnce"),
        (HessianOperator, "forward-over-reverse", False, "no jvp staticmethod"),
        (GGNOperator, "double-backward", True, "once_differentiable.*_CubeOnce"),
        (GGNOperator, "double-backward", False, "once_differentiable.*_CubeOnce"),
        (GGNOperator, "forward-over-reverse", False, "no jvp staticmethod"),
    ],
)
def test_once_differentiable_function_gives_a_clear_error(
    operator: type, engine: str, cache_graph: bool, match: str
) -> None:
    # torch.autograd.grad(..., inputs=params) prunes the Error node that @once_differentiable
    # leaves in the graph, so without the operator's check the result would silently be wrong.
    torch.manual_seed(0)
    model = _OnceModel()
    batches = [(torch.randn(5, 3), torch.randn(5, 2))]
    snapshot = snapshot_state(model)
    with pytest.raises(UnsupportedDerivativeError, match=match) as info:
        op = operator(model, batches, F.mse_loss, engine=engine, cache_graph=cache_graph)
        op.matvec(torch.ones(op.size))
    assert "Fixes:" in str(info.value)
    if engine == "forward-over-reverse":  # translated from PyTorch's own error
        assert isinstance(info.value.__cause__, RuntimeError)
    assert_state_unchanged(model, snapshot)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class _FusedAttentionModel(nn.Module):
    """Calls the fused CPU attention kernel directly, bypassing the probe's backend choice."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, 1, 4).permute(2, 0, 3, 1, 4)
        out = _FLASH_CPU(q, k, v)[0]
        return self.head(out.mean(dim=(1, 2)))


@pytest.mark.skipif(_FLASH_CPU is None, reason="this torch build has no fused CPU attention op")
@pytest.mark.parametrize(
    ("engine", "match"),
    [
        ("double-backward", r"no derivative for .*flash_attention.*backward.*math backend"),
        ("forward-over-reverse", r"flash_attention.* has no forward-mode derivative"),
    ],
)
def test_op_without_second_derivative_is_named(engine: str, match: str) -> None:
    torch.manual_seed(0)
    model = _FusedAttentionModel()
    batches = [(torch.randn(3, 5, 4), torch.randn(3, 2))]
    snapshot = snapshot_state(model)
    with pytest.raises(UnsupportedDerivativeError, match=match) as info:
        op = HessianOperator(model, batches, F.mse_loss, engine=engine)
        op.matvec(torch.ones(op.size))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert_state_unchanged(model, snapshot)
