"""Loaders the probe must not disturb, torch.compile'd models, and batches weighted by examples.

* One-shot iterators (generators, ``iter(dataloader)``) are refused by ``probe_curvature`` and
  ``auto_uba`` before a batch is taken; the operators take them whole (every batch is used).
* A ``DataLoader``'s generators and the global RNG are bit-identical after a probe, so the next
  epoch's order is the one it would have been, and two probes in a row agree exactly.
* ``torch.compile(model)`` is probed through ``model._orig_mod``, compiling nothing.
* Batches of different sizes are weighted by their numbers of examples: batches of 8, 64 and 2
  examples give the curvature of the 74 examples as one batch (dense float64 ground truth).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from _models import make_problem
from _state_checks import assert_state_unchanged, snapshot_state
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from uba_auto import (
    GGNOperator,
    HessianOperator,
    ModelLoss,
    UnsupportedDerivativeError,
    auto_uba,
    probe_curvature,
)
from uba_auto._loaders import is_one_shot
from uba_auto.curvature import unwrap_model

F64 = torch.float64
CHEAP = dict(trace=False, per_batch=False, dtype=F64)


def _vectors(size: int, count: int = 3) -> Tensor:
    """``count`` seeded random columns: operators are compared on their products (a dense
    matrix would cost ``size`` products per operator)."""
    return torch.randn(size, count, generator=torch.Generator().manual_seed(7), dtype=F64)


def _products(op, vectors: Tensor) -> Tensor:
    return torch.stack([op.matvec(v) for v in vectors.T], 1)


def _assert_same_operator(op, other, rtol: float = 1e-12) -> None:
    vectors = _vectors(op.size)
    torch.testing.assert_close(_products(op, vectors), _products(other, vectors), rtol=rtol, atol=0)


def _problem(num_batches: int = 4, batch_size: int = 8):
    return make_problem("tanh_mlp", num_batches=num_batches, batch_size=batch_size)


def _dataset(num_examples: int = 32) -> TensorDataset:
    gen = torch.Generator().manual_seed(11)
    return TensorDataset(
        torch.randn(num_examples, 4, generator=gen),
        torch.randint(0, 3, (num_examples,), generator=gen),
    )


def _order(loader) -> list[list[int]]:
    return [y.tolist() for _, y in loader]


# ------------------------------------------------------------------------- one-shot iterators
def test_is_one_shot_tells_iterators_from_reiterables_without_iterating_them():
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(_dataset(), batch_size=8, shuffle=True, generator=gen)
    state = gen.get_state()
    assert not is_one_shot(loader) and not is_one_shot([1]) and not is_one_shot(range(3))
    assert torch.equal(gen.get_state(), state)  # no iterator of the DataLoader was built
    assert is_one_shot(iter(loader)) and is_one_shot(x for x in [1])
    assert is_one_shot(itertools.islice([1, 2], 1)) and is_one_shot(iter([1]))


@pytest.mark.parametrize("kind", ["generator", "iter(DataLoader)"])
def test_probe_refuses_a_one_shot_iterator_and_takes_nothing_from_it(kind):
    problem = _problem(num_batches=16)
    if kind == "generator":
        loader = (b for b in problem.batches)
    else:
        loader = iter(DataLoader(_dataset(128), batch_size=8))
    snap = snapshot_state(problem.model)
    with pytest.raises(ValueError, match=r"one-shot iterator.*list of batches") as info:
        probe_curvature(problem.model, loader, problem.loss, num_batches=4, **CHEAP)
    assert "probe_curvature" in str(info.value) and "DataLoader itself" in str(info.value)
    assert len(list(loader)) == 16  # every batch is still there for the training loop
    assert_state_unchanged(problem.model, snap)


@pytest.mark.parametrize("reestimate_every", [None, 5])
def test_auto_uba_refuses_a_one_shot_iterator_and_takes_nothing_from_it(reestimate_every):
    problem = _problem(num_batches=16)
    loader = (b for b in problem.batches)
    with pytest.raises(ValueError, match=r"one-shot iterator.*auto_uba"):
        auto_uba(
            problem.model,
            loader,
            60,
            loss_fn=problem.loss,
            reestimate_every=reestimate_every,
            density=False,
            trace=False,
        )
    assert len(list(loader)) == 16


def test_operators_take_a_one_shot_iterator_whole():
    problem = _problem(num_batches=3)
    gen = (b for b in problem.batches)
    op = HessianOperator(problem.model, gen, problem.loss, dtype=F64)
    ref = HessianOperator(problem.model, problem.batches, problem.loss, dtype=F64)
    assert op.num_batches == 3 and list(gen) == []  # consumed to its end, as documented
    _assert_same_operator(op, ref, rtol=0)


# ------------------------------------------------------------ the loader's generators and RNG
def test_probe_leaves_a_dataloaders_generator_and_the_global_rng_bit_identical():
    problem = _problem()
    gen = torch.Generator().manual_seed(3)
    loader = DataLoader(_dataset(), batch_size=8, shuffle=True, generator=gen)
    twin = DataLoader(
        _dataset(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    state, rng = gen.get_state(), torch.get_rng_state()
    first = probe_curvature(problem.model, loader, problem.loss, num_batches=2, **CHEAP)
    assert torch.equal(gen.get_state(), state) and torch.equal(torch.get_rng_state(), rng)
    second = probe_curvature(problem.model, loader, problem.loss, num_batches=2, **CHEAP)
    assert first.lambda_max == second.lambda_max and first.lambda_min == second.lambda_min
    assert first.batch_losses == second.batch_losses
    assert _order(loader) == _order(twin)  # the next epoch: the order it had without probes


def test_probe_leaves_the_global_rng_of_a_shuffling_loader_without_generator():
    # DataLoader(shuffle=True) with generator=None draws its seed from the global generator.
    problem = _problem()
    loader = DataLoader(_dataset(), batch_size=8, shuffle=True)
    torch.manual_seed(5)
    without_probe = _order(loader)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    first = probe_curvature(problem.model, loader, problem.loss, num_batches=2, **CHEAP)
    assert torch.equal(torch.get_rng_state(), rng)
    second = probe_curvature(problem.model, loader, problem.loss, num_batches=2, **CHEAP)
    assert first.batch_losses == second.batch_losses
    assert _order(loader) == without_probe


def test_probe_leaves_a_samplers_generator_and_operators_leave_the_loader_too():
    problem = _problem()
    sgen = torch.Generator().manual_seed(4)
    loader = DataLoader(_dataset(), batch_size=8, sampler=RandomSampler(_dataset(), generator=sgen))
    state, rng = sgen.get_state(), torch.get_rng_state()
    probe_curvature(problem.model, loader, problem.loss, num_batches=2, **CHEAP)
    HessianOperator(problem.model, loader, problem.loss, dtype=F64)
    assert torch.equal(sgen.get_state(), state) and torch.equal(torch.get_rng_state(), rng)


# ----------------------------------------------------------------------------- torch.compile
class _RecordingBackend:
    """A torch.compile backend that records every graph it is asked to compile."""

    def __init__(self) -> None:
        self.graphs: list = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.mark.parametrize("backend", ["recording", "inductor"])
def test_a_compiled_model_is_probed_through_its_original_module(backend):
    problem = _problem(num_batches=1)
    recorder = _RecordingBackend()
    compiled = torch.compile(problem.model, backend=recorder if backend == "recording" else backend)
    assert unwrap_model(compiled) is problem.model
    assert unwrap_model(nn.DataParallel(compiled)) is problem.model
    snap = snapshot_state(compiled)
    # A compile would be seen by the recording backend, and with inductor it would take 15-40 s
    # and then raise "aot_autograd does not currently support double backward".
    est = probe_curvature(compiled, problem.batches, problem.loss, **CHEAP)
    op = HessianOperator(compiled, problem.batches, problem.loss, dtype=F64)
    vectors = _vectors(op.size)
    products = _products(op, vectors)
    assert recorder.graphs == []
    assert_state_unchanged(compiled, snap)
    plain = probe_curvature(problem.model, problem.batches, problem.loss, **CHEAP)
    assert est.lambda_max == plain.lambda_max and est.lambda_min == plain.lambda_min
    assert est.batch_losses == plain.batch_losses
    reference = HessianOperator(problem.model, problem.batches, problem.loss, dtype=F64)
    torch.testing.assert_close(products, _products(reference, vectors), rtol=0, atol=0)
    notes = [w for w in est.warnings if "torch.compile" in w]
    assert len(notes) == 1 and "_orig_mod" in notes[0] and "without compiling" in notes[0]
    assert not any("torch.compile" in w for w in plain.warnings)


# ------------------------------------------------------------------ weights by example count
_SIZES = (8, 64, 2)


def _uneven(seed: int = 0):
    """A 51-parameter tanh MLP and 74 examples split into batches of 8, 64 and 2."""
    problem = _problem(num_batches=1)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(_SIZES), 4, generator=gen)
    y = torch.randint(0, 3, (sum(_SIZES),), generator=gen)
    batches = list(zip(x.split(_SIZES), y.split(_SIZES), strict=True))
    return problem.model, batches, (x, y)


def _dense_hessian_of_all_examples(model: nn.Module, x: Tensor, y: Tensor) -> tuple:
    """The float64 Hessian, gradient and loss of the mean cross-entropy over all of ``x``."""
    model64 = _copy64(model)
    names = [n for n, _ in model64.named_parameters()]
    shapes = [p.shape for _, p in model64.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])

    def loss(flat: Tensor) -> Tensor:
        params, start = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = flat[start : start + s.numel()].view(s)
            start += s.numel()
        out = torch.func.functional_call(model64, params, (x.to(F64),))
        return F.cross_entropy(out, y)

    return torch.func.hessian(loss)(flat0), torch.func.grad(loss)(flat0), loss(flat0)


def _copy64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(F64)


@pytest.mark.parametrize("engine", ["double-backward", "forward-over-reverse"])
def test_uneven_batches_give_the_operator_of_all_their_examples(engine):
    model, batches, (x, y) = _uneven()
    hessian, gradient, loss = _dense_hessian_of_all_examples(model, x, y)
    op = HessianOperator(model, batches, F.cross_entropy, dtype=F64, engine=engine)
    assert op.batch_sizes == list(_SIZES)
    assert op.coefficients == tuple(n / 74 for n in _SIZES)
    vectors = _vectors(op.size)
    torch.testing.assert_close(_products(op, vectors), hessian @ vectors, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(op.gradient(), gradient, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(op.loss_value(), loss, rtol=1e-12, atol=0)
    # The per-batch parts stay per batch: batch i alone, with weight 1.
    xb, yb = batches[2]
    alone = HessianOperator(model, [(xb, yb)], F.cross_entropy, dtype=F64, engine=engine)
    assert [op.batch_operator(i).coefficients for i in range(3)] == [(1.0,)] * 3
    _assert_same_operator(op.batch_operator(2), alone)
    torch.testing.assert_close(op.batch_operator(2).loss_value(), alone.loss_value())


def test_uneven_batches_ggn_and_probe_equal_those_of_one_batch():
    model, batches, (x, y) = _uneven()
    ggn = GGNOperator(model, batches, F.cross_entropy, dtype=F64)
    _assert_same_operator(ggn, GGNOperator(model, [(x, y)], F.cross_entropy, dtype=F64))
    est = probe_curvature(model, batches, F.cross_entropy, **CHEAP)
    one = probe_curvature(model, [(x, y)], F.cross_entropy, **CHEAP)
    eigenvalues = torch.linalg.eigvalsh(_dense_hessian_of_all_examples(model, x, y)[0])
    assert est.lambda_max == pytest.approx(float(eigenvalues[-1]), rel=1e-8)
    assert est.lambda_max == pytest.approx(one.lambda_max, rel=1e-8)
    assert est.batch_sizes == _SIZES and not any("weighted equally" in w for w in est.warnings)


def test_global_batches_of_different_sizes_weigh_by_their_examples():
    # The process-group operator weighs global batches as the local one weighs batches: a group
    # of one rank (in this process, gloo) must give the operator of the 74 examples as one batch.
    import torch.distributed as dist

    from uba_auto._distributed import Communicator
    from uba_auto.curvature import build_operator

    model, batches, (x, y) = _uneven()
    whole = HessianOperator(model, [(x, y)], F.cross_entropy, dtype=F64, process_group=None)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        comm = Communicator(None, rank=0, world_size=1, backend="gloo")
        op = build_operator(
            "hessian",
            model,
            batches,
            F.cross_entropy,
            mode="train-deterministic",
            engine="double-backward",
            dtype=F64,
            comm=comm,
        )
        assert type(op).__name__ == "AllReducedOperator" and op.global_batch_sizes == [8, 64, 2]
        _assert_same_operator(op, whole)
        torch.testing.assert_close(op.gradient(), whole.gradient(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(op.loss_value(), whole.loss_value(), rtol=1e-12, atol=0)
        _assert_same_operator(
            op.batch_operator(2), HessianOperator(model, [batches[2]], F.cross_entropy, dtype=F64)
        )
    finally:
        dist.destroy_process_group()


def test_a_dataloaders_short_last_batch_weighs_by_its_examples():
    # 74 examples in batches of 32: 32, 32 and a last batch of 10 (drop_last=False).
    model, _, (x, y) = _uneven()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    op = HessianOperator(model, loader, F.cross_entropy, dtype=F64)
    whole = HessianOperator(model, [(x, y)], F.cross_entropy, dtype=F64)
    assert op.batch_sizes == [32, 32, 10]
    _assert_same_operator(op, whole)


def test_equal_batches_keep_equal_weights():
    problem = _problem(num_batches=3)
    op = HessianOperator(problem.model, problem.batches, problem.loss, dtype=F64)
    assert op.coefficients == (1 / 3,) * 3
    vectors = _vectors(op.size)
    mean = sum(
        _products(HessianOperator(problem.model, [b], problem.loss, dtype=F64), vectors)
        for b in problem.batches
    )
    torch.testing.assert_close(_products(op, vectors), mean / 3, rtol=1e-12, atol=0)


def test_batches_without_a_size_are_weighted_equally_and_the_probe_says_so():
    model, batches, _ = _uneven()

    def loss(m: nn.Module, batch) -> Tensor:
        _, xb, yb = batch
        return F.cross_entropy(m(xb), yb)

    # A 0-dim first tensor: nothing to count examples by.
    unsized = [(torch.tensor(1.0), xb, yb) for xb, yb in batches]
    op = HessianOperator(model, unsized, ModelLoss(loss), dtype=F64)
    assert op.batch_sizes == [None] * 3 and op.coefficients == (1 / 3,) * 3
    vectors = _vectors(op.size)
    mean = sum(
        _products(HessianOperator(model, [b], F.cross_entropy, dtype=F64), vectors) for b in batches
    )
    torch.testing.assert_close(_products(op, vectors), mean / 3, rtol=1e-12, atol=0)
    torch.testing.assert_close(op.loss_value(), op.batch_losses.mean(), rtol=1e-14, atol=0)
    est = probe_curvature(model, unsized, ModelLoss(loss), **CHEAP)
    assert any("weighted equally (1 / num_batches)" in w for w in est.warnings)


def test_a_compiled_submodule_fails_fast_with_what_to_do() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model[0] = torch.compile(model[0], backend="aot_eager")  # aot_autograd: no double backward
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with pytest.raises(UnsupportedDerivativeError, match="torch.compile'd part") as info:
        probe_curvature(model, [(x, y)], nn.functional.cross_entropy, trace=False)
    message = str(info.value)
    assert "_orig_mod" in message and "forward-over-reverse" in message
    # The advised engine works on the same model.
    est = probe_curvature(
        model, [(x, y)], nn.functional.cross_entropy, trace=False, engine="forward-over-reverse"
    )
    assert est.lambda_max > 0
