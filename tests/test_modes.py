"""The mode policy (uba_auto.curvature.modes) on real architectures, against dense references.

The default mode must measure the loss training sees without its randomness: every module in eval
mode but the normalisation layers (batch statistics, running statistics untouched). Checked on a
Hugging Face GPT-2 (attention dropout), a timm-style DropPath block with BatchNorm (dense float64
ground truth), hand-written norms; random layers no mode switches off are named in the error.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _blocks import (
    DropPath,
    FlakyNoise,
    GaussianNoise,
    MixBlock,
    NoisyNet,
    RunningStatsNorm1d,
    droppath_problem,
    gpt2_batches,
    tiny_gpt2,
)
from _models import Problem
from _reference import F64, _Reference, assert_close
from _state_checks import assert_state_unchanged, snapshot_state
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import spectral_norm

from uba_auto.curvature import GGNOperator, HessianOperator, ModelLoss
from uba_auto.curvature.modes import evaluation_mode, mode_overrides


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def _no_hooks_left(model: nn.Module) -> bool:
    return not any(
        m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_always_called
        for m in model.modules()
    )


# ------------------------------------------------------------------------------ which flags
class _BatchNormAct1d(nn.BatchNorm1d):
    """A user subclass of a torch norm layer (timm's BatchNormAct2d style)."""


class _Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(2)
        self.sync = nn.SyncBatchNorm(2)
        self.inorm_tracked = nn.InstanceNorm1d(2, track_running_stats=True)
        self.inorm = nn.InstanceNorm1d(2)
        self.lazy = nn.LazyBatchNorm1d()
        self.sub = _BatchNormAct1d(2)
        self.custom = RunningStatsNorm1d(2)
        self.drop = nn.Dropout(0.1)
        self.drop_path = DropPath(0.2)
        self.rrelu = nn.RReLU()
        self.attn = nn.MultiheadAttention(4, 2, dropout=0.5)
        self.encoder = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.1)
        self.rnn = nn.GRU(4, 4, num_layers=2, dropout=0.5)
        self.rnn_plain = nn.GRU(4, 4)
        self.sn = spectral_norm(nn.Linear(2, 2))
        self.seq = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


_NORMS = ("bn", "sync", "inorm_tracked", "inorm", "lazy", "sub", "custom", "seq.1")


@pytest.mark.parametrize("initial", ["train", "eval"])
def test_default_mode_is_eval_but_normalisation_layers(initial: str) -> None:
    model = _Zoo().train(initial == "train")
    before = _flags(model)
    with evaluation_mode(model):
        inside = _flags(model)
    assert _flags(model) == before
    in_training = {n for n, flag in inside.items() if flag}
    # RNNs without dropout: the same function in both modes (and the only one in which cuDNN,
    # which the probe does not use for them, differentiates them).
    assert in_training == {*_NORMS, "rnn_plain"}


def test_a_frozen_normalisation_layer_stays_frozen_in_a_training_model() -> None:
    model = _Zoo().train()
    model.bn.eval()
    model.custom.eval()
    overrides = {id(m): flag for m, flag in mode_overrides(model, "train-deterministic")}
    assert not overrides[id(model.bn)] and not overrides[id(model.custom)]
    assert overrides[id(model.sub)] and overrides[id(model.seq[1])]
    model.eval()  # a model in eval mode: training would put every norm in training mode
    overrides = {id(m): flag for m, flag in mode_overrides(model, "train-deterministic")}
    assert all(overrides[id(model.get_submodule(n))] for n in _NORMS)


def test_flags_restored_exactly_after_an_exception() -> None:
    model = _Zoo()
    pattern = random.Random(0)
    for m in model.modules():
        m.training = pattern.random() < 0.5
    before, rng = _flags(model), torch.get_rng_state()
    with pytest.raises(KeyError), evaluation_mode(model):
        raise KeyError("boom")
    assert _flags(model) == before
    assert torch.equal(torch.get_rng_state(), rng)


# ------------------------------------------------------------------------- recurrent kernels
class _Failing(nn.LSTM):
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise KeyError("boom")


class _ConvThenLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 1)
        self.lstm = nn.LSTM(2, 3, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.lstm(self.conv(x).transpose(1, 2))[0]


@pytest.mark.parametrize("mode", ["train-deterministic", "eval", "as-is"])
def test_recurrent_layers_alone_run_without_fused_kernels(mode: str) -> None:
    model = _ConvThenLSTM()
    seen: dict[str, tuple[bool, bool]] = {}

    def record(name: str) -> Any:
        def hook(*_: Any) -> None:
            seen[name] = (torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled)

        return hook

    handles = [getattr(model, n).register_forward_hook(record(n)) for n in ("conv", "lstm")]
    with evaluation_mode(model, mode):
        model(torch.randn(2, 2, 4))
    for handle in handles:
        handle.remove()
    assert seen == {"conv": (True, True), "lstm": (False, False)}
    assert torch.backends.mkldnn.enabled and torch.backends.cudnn.enabled
    assert _no_hooks_left(model)


def test_kernel_switches_restored_when_a_recurrent_forward_raises() -> None:
    model = nn.Sequential(_Failing(2, 3))
    with pytest.raises(KeyError), evaluation_mode(model):
        model(torch.randn(4, 1, 2))
    assert torch.backends.mkldnn.enabled and torch.backends.cudnn.enabled
    assert _no_hooks_left(model)


# ----------------------------------------------------------------------- (a) Hugging Face GPT-2
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_gpt2_with_dropout_equals_gpt2_without(attn_implementation: str) -> None:
    pytest.importorskip("transformers")
    model = tiny_gpt2(0.1, attn_implementation)
    dropout_free = tiny_gpt2(0.0, attn_implementation)  # same seed: same weights
    for (n, p), (_, q) in zip(
        model.state_dict().items(), dropout_free.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), n
    batches = gpt2_batches()
    snapshot = snapshot_state(model)
    op = HessianOperator(model, batches, None, dtype=F64)
    # Training mode without dropout is the function training sees; "as-is" refuses any draw.
    ref = HessianOperator(dropout_free, batches, None, mode="as-is", dtype=F64)
    gen = torch.Generator().manual_seed(0)
    vs = [torch.randn(op.size, generator=gen, dtype=F64) for _ in range(2)]
    assert_close(op.batch_losses, ref.batch_losses, rtol=1e-12)
    assert_close(op.gradient(), ref.gradient(), rtol=1e-12)
    for v in vs:
        assert_close(op.matvec(v), ref.matvec(v), rtol=1e-10)
    assert_state_unchanged(model, snapshot)
    assert model.training and all(m.training for m in model.modules())


def test_gpt2_gradient_checkpointing_is_off_and_the_same_function() -> None:
    pytest.importorskip("transformers")
    model = tiny_gpt2(0.1)
    # Renamed in transformers 5; checkpointing runs only in training mode.
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    batches = gpt2_batches()
    op = HessianOperator(model, batches, None, dtype=F64)
    ref = HessianOperator(tiny_gpt2(0.0), batches, None, mode="as-is", dtype=F64)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert_close(op.matvec(v), ref.matvec(v), rtol=1e-10)


# ------------------------------------------------------------------ (b) timm-style DropPath
def _droppath_free(problem: Problem) -> Problem:
    """The same network with DropPath replaced by the identity, in training mode."""
    net = copy.deepcopy(problem.model).train()
    net.block.drop_path = nn.Identity()
    return Problem("droppath-free", net, problem.loss, problem.batches)


def _train_mode_hessian(problem: Problem) -> Tensor:
    """Dense float64 Hessian of the mean loss by functional_call on the training-mode network.

    torch.autograd.functional.hessian: torch.func.hessian is wrong through the native
    training-mode batch_norm in torch 2.13 (see _reference.py); _Reference checks the formula.
    """
    net = copy.deepcopy(problem.model).to(F64).train()
    named = dict(net.named_parameters())
    shapes = [p.shape for p in named.values()]
    buffers = dict(net.named_buffers())

    def mean_loss(flat: Tensor) -> Tensor:
        chunks = flat.split([s.numel() for s in shapes])
        pb = {n: c.view(s) for n, c, s in zip(named, chunks, shapes, strict=True)}
        pb.update({n: b.clone() for n, b in buffers.items()})
        losses = [
            problem.loss(functional_call(net, pb, (x.to(F64),)), y) for x, y in problem.batches
        ]
        return torch.stack(losses).mean()

    flat0 = torch.cat([p.detach().reshape(-1) for p in named.values()])
    return torch.autograd.functional.hessian(mean_loss, flat0)


def test_droppath_block_default_mode_against_dense_ground_truth() -> None:
    problem = droppath_problem()
    model = problem.model
    snapshot = snapshot_state(model)
    dense = HessianOperator(model, problem.batches, problem.loss, dtype=F64).to_dense()
    dense_eval = HessianOperator(
        model, problem.batches, problem.loss, mode="eval", dtype=F64
    ).to_dense()
    assert_state_unchanged(model, snapshot)
    free = _droppath_free(problem)
    assert_close(dense, _Reference(free, free.batches, "train-deterministic").hessian())
    assert_close(dense, _train_mode_hessian(free))
    # mode="eval" measures another function: running statistics.
    assert_close(dense_eval, _Reference(problem, problem.batches, "eval").hessian())
    lam, lam_eval = torch.linalg.eigvalsh(dense)[-1], torch.linalg.eigvalsh(dense_eval)[-1]
    assert abs(lam - lam_eval) > 0.1 * abs(lam)


def test_droppath_block_default_mode_ignores_the_users_flags() -> None:
    problem = droppath_problem()
    model, batches, loss = problem.model, problem.batches, problem.loss
    train = HessianOperator(model.train(), batches, loss, dtype=F64).to_dense()
    evaluated = HessianOperator(model.eval(), batches, loss, dtype=F64).to_dense()
    assert torch.equal(train, evaluated)
    model.train()
    model.block.bn.eval()  # frozen on purpose: training sees its running statistics
    frozen = HessianOperator(model, batches, loss, dtype=F64).to_dense()
    assert_close(frozen, _Reference(problem, batches, "eval").hessian())


def test_droppath_in_as_is_mode_is_named() -> None:
    problem = droppath_problem()
    snapshot = snapshot_state(problem.model)
    with pytest.raises(ValueError, match=r"drew random numbers in mode='as-is'") as info:
        HessianOperator(problem.model, problem.batches, problem.loss, mode="as-is")
    message = str(info.value)
    assert "'block.drop_path' (DropPath, training mode)" in message
    assert "model.get_submodule('block.drop_path').eval()" in message
    assert "'block'" not in message and "'block.bn'" not in message
    assert_state_unchanged(problem.model, snapshot)
    assert _no_hooks_left(problem.model)


def test_hand_written_norm_with_running_buffers_uses_batch_statistics() -> None:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
    batches = [(x, y)]

    def net(norm: nn.Module) -> nn.Module:
        torch.manual_seed(0)
        # In eval mode (as after validation): the default mode switches the norm to training.
        return nn.Sequential(
            nn.Linear(3, 4), norm, nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2)
        ).eval()

    custom, torch_bn = net(RunningStatsNorm1d(4)), net(nn.BatchNorm1d(4))
    with torch.no_grad():
        for m in (custom[1], torch_bn[1]):
            m.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
            m.running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8]))
    snapshot = snapshot_state(custom)
    for mode in ("train-deterministic", "eval"):
        ours = HessianOperator(custom, batches, F.mse_loss, mode=mode, dtype=F64).to_dense()
        theirs = HessianOperator(torch_bn, batches, F.mse_loss, mode=mode, dtype=F64).to_dense()
        assert_close(ours, theirs)
    assert_state_unchanged(custom, snapshot)  # running statistics untouched


# ------------------------------------------------------- (c) random layers no mode switches off
OPERATORS = [
    (HessianOperator, "double-backward", True),
    (HessianOperator, "double-backward", False),
    (HessianOperator, "forward-over-reverse", True),
    (GGNOperator, "double-backward", True),
    (GGNOperator, "forward-over-reverse", True),
]


def _regression(seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 3, generator=gen), torch.randn(5, 1, generator=gen))]


@pytest.mark.parametrize(("operator", "engine", "cache_graph"), OPERATORS)
def test_a_layer_that_draws_in_eval_mode_is_named(
    operator: type, engine: str, cache_graph: bool
) -> None:
    torch.manual_seed(0)
    model = NoisyNet(GaussianNoise())
    snapshot = snapshot_state(model)
    with pytest.raises(ValueError, match="drew random numbers in mode='train-deterministic'") as e:
        operator(model, _regression(), F.mse_loss, engine=engine, cache_graph=cache_graph)
    message = str(e.value)
    assert "Drawn by 'blocks.1.noise' (GaussianNoise, eval mode)." in message
    assert "'blocks.1'" not in message and "the loss function" not in message
    assert "self.training" in message and "ModelLoss" in message
    assert_state_unchanged(model, snapshot)  # flags of every submodule, parameters, RNG
    assert _no_hooks_left(model)


def test_draws_between_a_modules_children_are_its_own() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), MixBlock(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"Drawn by '1' \(MixBlock, eval mode\)\.") as e:
        HessianOperator(model, _regression(), F.mse_loss)
    assert "'1.left'" not in str(e.value) and "'1.right'" not in str(e.value)


def test_draws_of_the_loss_function_are_named() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)

    def noisy_mse(outputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(outputs + torch.randn_like(outputs), targets)

    with pytest.raises(ValueError, match=r"Drawn by code outside the model's modules"):
        HessianOperator(model, _regression(), noisy_mse)


class _NoisyNorm(RunningStatsNorm1d):
    """A norm the default mode keeps in training mode, which draws in training mode."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out + 0.1 * torch.randn_like(out) if self.training else out


def test_a_norm_layer_that_draws_is_named_with_the_as_is_fix() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _NoisyNorm(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"'1' \(_NoisyNorm, training mode\)") as e:
        HessianOperator(model, _regression(), F.mse_loss)
    assert "mode='as-is'" in str(e.value)
    model[1].eval()
    HessianOperator(model, _regression(), F.mse_loss, mode="as-is")  # the advised fix


def test_a_replay_that_fails_still_refuses_and_removes_its_hooks() -> None:
    torch.manual_seed(0)
    model = NoisyNet(FlakyNoise())
    snapshot = snapshot_state(model)
    with pytest.raises(ValueError, match="could not tell which module drew them"):
        HessianOperator(model, _regression(), F.mse_loss)
    assert_state_unchanged(model, snapshot)
    assert _no_hooks_left(model)


def test_the_advised_seeded_model_loss_works() -> None:
    torch.manual_seed(0)
    model = NoisyNet(GaussianNoise())
    batch = {"x": _regression()[0][0], "y": _regression()[0][1]}

    def seeded(model: nn.Module, batch: Any) -> Tensor:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return F.mse_loss(model(batch["x"]), batch["y"])

    snapshot = snapshot_state(model)
    first = HessianOperator(model, [batch], ModelLoss(seeded), dtype=F64).to_dense()
    second = HessianOperator(
        model, [batch], ModelLoss(seeded), dtype=F64, cache_graph=False
    ).to_dense()
    assert_close(first, second, rtol=1e-12)
    assert_state_unchanged(model, snapshot)


# --------------------------------------------------------------- (d) flags and RNG restored
@pytest.mark.parametrize("seed", [0, 1])
def test_probing_restores_every_flag_and_the_rng(seed: int) -> None:
    problem = droppath_problem()
    model = problem.model
    pattern = random.Random(seed)
    for m in model.modules():
        m.training = pattern.random() < 0.5
    torch.manual_seed(seed)
    snapshot = snapshot_state(model)
    op = HessianOperator(model, problem.batches, problem.loss, cache_graph=False)
    op.matvec(torch.ones(op.size))
    op.gradient()
    assert_state_unchanged(model, snapshot)
    noisy = NoisyNet(GaussianNoise())
    for m in noisy.modules():
        m.training = pattern.random() < 0.5
    snapshot = snapshot_state(noisy)
    with pytest.raises(ValueError, match="'blocks.1.noise'"):
        HessianOperator(noisy, _regression(), F.mse_loss)
    assert_state_unchanged(noisy, snapshot)


def test_a_build_that_fails_after_drawing_leaves_the_global_rng_as_it_was() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)

    def failing(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        torch.randn(10)  # draws, then fails
        raise RuntimeError("the user's loss failed")

    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="the user's loss failed"):
        HessianOperator(model, [(x,)], ModelLoss(failing))
    assert torch.equal(torch.get_rng_state(), before)
