"""snapshot_state / assert_state_unchanged detect every kind of change; preserve_state restores."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _models import make_problem
from _state_checks import assert_state_unchanged, snapshot_state
from torch import nn

from uba_auto._state import preserve_state


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    """The CNN (BatchNorm buffers, dropout) with Adam state and a mix of .grad tensors and None."""
    problem = make_problem("cnn_batchnorm", num_batches=1)
    model = problem.model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = problem.batches[0]
    problem.loss(model(x), y).backward()
    optimizer.step()
    model.conv.bias.grad = None
    model.fc.bias.requires_grad_(False)
    return model, optimizer


def test_fresh_snapshot_matches() -> None:
    model, optimizer = _model_and_optimizer()
    snapshot = snapshot_state(model, optimizer)
    assert_state_unchanged(model, snapshot, optimizer)
    assert snapshot.grads["conv.bias"] is None and snapshot.grads["fc.weight"] is not None
    assert snapshot.requires_grad["fc.bias"] is False
    assert set(snapshot.training) == {"", "conv", "bn", "drop", "pool", "fc"}
    assert "bn.num_batches_tracked" in snapshot.buffers


def _no_grad(fn: Callable[[nn.Module], object]) -> Callable[[nn.Module], None]:
    def run(model: nn.Module) -> None:
        with torch.no_grad():
            fn(model)

    return run


CHANGES: dict[str, tuple[Callable[[nn.Module], object], str]] = {
    "parameter": (_no_grad(lambda m: m.fc.weight.add_(1e-7)), "parameter 'fc.weight' changed"),
    "running mean": (
        _no_grad(lambda m: m.bn.running_mean.mul_(0.5)),
        "buffer 'bn.running_mean' changed",
    ),
    "num_batches_tracked": (
        _no_grad(lambda m: m.bn.num_batches_tracked.add_(1)),
        "buffer 'bn.num_batches_tracked' changed",
    ),
    "BatchNorm forward in train mode": (
        lambda m: m(torch.randn(2, 1, 8, 8)),
        "buffer 'bn.running_mean' changed",
    ),
    "grad None -> tensor": (
        lambda m: setattr(m.conv.bias, "grad", torch.zeros(3)),
        "'conv.bias' was None, is now a tensor",
    ),
    "grad tensor -> None": (
        lambda m: setattr(m.fc.weight, "grad", None),
        "'fc.weight' was a tensor, is now None",
    ),
    "grad values": (_no_grad(lambda m: m.conv.weight.grad.mul_(2)), ".grad of 'conv.weight'"),
    "grad with graph": (
        lambda m: setattr(m.conv.weight, "grad", m.conv.weight.grad.clone().requires_grad_()),
        "requires_grad of .grad of 'conv.weight' was False",
    ),
    "submodule training flag": (lambda m: m.drop.eval(), "training flag of module 'drop'"),
    "requires_grad": (
        lambda m: m.conv.weight.requires_grad_(False),
        "requires_grad of 'conv.weight' was True",
    ),
    "rng": (lambda m: torch.rand(1), "random number generator"),
    "global switch": (
        lambda m: torch.backends.mha.set_fastpath_enabled(False),
        "global switch 'mha_fastpath'",
    ),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_kind_of_change_is_reported(change: str) -> None:
    model, optimizer = _model_and_optimizer()
    snapshot = snapshot_state(model, optimizer)
    mutate, message = CHANGES[change]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        mutate(model)
        with pytest.raises(AssertionError, match="difference") as info:
            assert_state_unchanged(model, snapshot, optimizer)
        assert message in str(info.value)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def test_optimizer_state_change_is_reported() -> None:
    model, optimizer = _model_and_optimizer()
    snapshot = snapshot_state(model, optimizer)
    optimizer.param_groups[0]["lr"] = 0.5
    with pytest.raises(AssertionError, match=r"optimizer state \['param_groups'\]\[0\]\['lr'\]"):
        assert_state_unchanged(model, snapshot, optimizer)
    optimizer.param_groups[0]["lr"] = 1e-3
    with torch.no_grad():
        optimizer.state[model.fc.weight]["exp_avg"].add_(1)
    with pytest.raises(AssertionError, match="optimizer state .*'exp_avg'"):
        assert_state_unchanged(model, snapshot, optimizer)


def test_comparison_is_bitwise() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.bias.fill_(0.0)
    snapshot = snapshot_state(model)
    with torch.no_grad():
        model.bias.fill_(-0.0)  # equal as numbers, different bits
    with pytest.raises(AssertionError, match="parameter 'bias' changed"):
        assert_state_unchanged(model, snapshot)


def test_nan_equals_the_same_nan() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    assert_state_unchanged(model, snapshot_state(model))


def test_many_differences_are_summarised() -> None:
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(8)])
    snapshot = snapshot_state(model)
    model.eval()
    with pytest.raises(AssertionError, match=r"9 difference\(s\)(.|\n)*and 4 more"):
        assert_state_unchanged(model, snapshot, max_reported=5)


def test_optimizer_must_match_the_snapshot() -> None:
    model, optimizer = _model_and_optimizer()
    with pytest.raises(ValueError, match="pass the optimizer"):
        assert_state_unchanged(model, snapshot_state(model), optimizer)


def test_snapshot_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        snapshot_state([])


# ----------------------------------------------------------------------------- preserve_state
def _meddle(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Everything preserve_state promises to undo."""
    model.eval()
    model.bn.train()
    model.conv.weight.requires_grad_(False)
    model.fc.weight.grad = None
    model.conv.bias.grad = torch.ones(3)
    torch.rand(10)
    torch.set_grad_enabled(False)
    torch.backends.mha.set_fastpath_enabled(False)
    torch.backends.cuda.enable_flash_sdp(False)
    optimizer.param_groups[0]["lr"] = 123.0


def test_preserve_state_restores_on_exit() -> None:
    model, optimizer = _model_and_optimizer()
    snapshot = snapshot_state(model, optimizer)
    grad = model.fc.weight.grad
    with preserve_state(model, optimizer):
        _meddle(model, optimizer)
    assert_state_unchanged(model, snapshot, optimizer)
    assert model.fc.weight.grad is grad  # the very tensor object


def test_preserve_state_restores_after_an_exception() -> None:
    model, optimizer = _model_and_optimizer()
    snapshot = snapshot_state(model, optimizer)
    with pytest.raises(RuntimeError, match="boom"), preserve_state(model, optimizer):
        _meddle(model, optimizer)
        raise RuntimeError("boom")
    assert_state_unchanged(model, snapshot, optimizer)


def test_preserve_state_without_optimizer() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    snapshot = snapshot_state(model)
    with preserve_state(model):
        model.eval()
        model(torch.randn(3, 2))
    assert_state_unchanged(model, snapshot)
