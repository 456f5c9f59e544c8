"""Recomputed products in micro-batches (uba_auto.curvature.micro_batches): the split itself, the
exactness check that decides it, and the products against dense float64 Hessians."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from _models import make_problem
from _reference import F64, _Reference, assert_close
from _state_checks import assert_state_unchanged, snapshot_state
from torch import nn

from uba_auto import probe_curvature
from uba_auto.curvature import HessianOperator, ModelLoss, micro_batches
from uba_auto.curvature.micro_batches import (
    gradients_agree,
    losses_agree,
    micro_batch_parts,
    split_batch,
)
from uba_auto.probe import ProbeSettings

Pair = namedtuple("Pair", "x y")


@pytest.fixture(autouse=True)
def _split_small_graphs(monkeypatch, request):
    # The test models' graphs are a few KiB, under the floor below which nothing is split.
    if "keeps_the_floor" not in request.node.name:
        monkeypatch.setattr(micro_batches, "MIN_SPLIT_BYTES", 0)


def test_split_batch_slices_every_tensor_with_the_leading_dimension():
    x, y, scale = torch.arange(14.0).view(7, 2), torch.arange(7), torch.tensor(2.0)
    parts = split_batch({"x": x, "nested": Pair(y, [y, "tag"]), "scale": scale}, 3)
    assert [w for _, w in parts] == pytest.approx([3 / 7, 2 / 7, 2 / 7])
    assert torch.equal(torch.cat([p["x"] for p, _ in parts]), x)
    for p, _ in parts:
        assert isinstance(p["nested"], Pair) and p["nested"][1][1] == "tag"
        assert torch.equal(p["nested"].x, p["nested"][1][0])
        assert p["scale"] is scale  # 0-dim: shared by every part
        assert p["x"].data_ptr() >= x.data_ptr()  # a view, nothing copied
    assert torch.equal(torch.cat([p["nested"].x for p, _ in parts]), y)


def test_split_batch_refuses_what_it_cannot_tell():
    x = torch.zeros(4, 3)
    assert split_batch((x, torch.zeros(5)), 2) is None  # leading dimensions differ
    (a, _), (b, _) = split_batch((x, torch.ones(1, 3)), 2)  # a leading 1 broadcasts: shared
    assert a[0].shape == (2, 3) and a[1].shape == b[1].shape == (1, 3)
    assert split_batch({"a": "text"}, 2) is None  # no tensor
    assert split_batch((torch.zeros(1, 3), torch.zeros(1)), 2) is None  # one example
    assert split_batch((x, x), 1) is None
    assert len(split_batch((x, x), 10)) == 4  # at most one example per part
    with pytest.raises(TypeError, match="parts must be an int"):
        split_batch((x, x), 2.0)


def test_a_graph_under_the_floor_keeps_the_floor_and_stays_whole():
    mib = 2**20
    assert micro_batch_parts(4 * mib - 1, 0.1 * mib) == 1
    assert micro_batch_parts(4 * mib, 0.1 * mib) == 80
    problem = make_problem("tanh_mlp", num_batches=2)
    op = HessianOperator(problem.model, problem.batches, problem.loss, graph_memory=0.5)
    assert op.cached_batches == () and op.micro_batches == (1, 1)
    assert op.micro_batch_note is None  # nothing refused: nothing worth splitting


def test_parts_are_the_fewest_whose_graph_fits_twice():
    assert micro_batch_parts(100, 200.0) == 1
    assert micro_batch_parts(101, 200.0) == 2
    assert micro_batch_parts(161, 207.0) == 2
    assert micro_batch_parts(1000, 200.0) == 10
    assert micro_batch_parts(0, 200.0) == micro_batch_parts(5, 0.0) == 1


def test_the_agreement_checks_scale_with_the_dtype():
    eps32 = torch.finfo(torch.float32).eps
    whole = torch.tensor(2.0)
    same = [(torch.tensor(2.0 + 1e-6), 0.5), (torch.tensor(2.0), 0.5)]
    assert losses_agree(whole, same, eps32) is None
    off = losses_agree(whole, [(torch.tensor(2.01), 0.5), (torch.tensor(2.01), 0.5)], eps32)
    assert off == pytest.approx(0.01 / 2.005, rel=1e-4)  # relative to the mean magnitude
    g = torch.ones(10)
    assert gradients_agree(g, g * (1 + 1e-4), eps32) is None
    assert gradients_agree(g, g * 1.01, eps32) == pytest.approx(0.01, rel=1e-3)
    assert gradients_agree(g, g * (1 + 1e-4), torch.finfo(F64).eps) is not None


@pytest.mark.parametrize("name", ["tanh_mlp", "tiny_transformer", "hf_style", "tiny_lstm"])
def test_a_split_product_is_the_dense_hessian(name):
    problem = make_problem(name, num_batches=3, **({"batch_size": 8} if name != "tanh_mlp" else {}))
    args = (problem.model, problem.batches, problem.loss)
    before = snapshot_state(problem.model)
    op = HessianOperator(*args, dtype=F64, graph_memory=0.5)
    assert op.cached_batches == () and min(op.micro_batches) >= 2, op.micro_batch_note
    assert op.micro_batch_note is None
    whole = HessianOperator(*args, dtype=F64, graph_memory=0.5, micro_batches=False)
    assert whole.micro_batches == (1, 1, 1)
    ref = _Reference(problem, problem.batches, "train-deterministic")
    assert_close(op.to_dense(), ref.hessian())
    v = torch.randn(op.size, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert_close(op.matvec(v), whole.matvec(v), rtol=1e-12)
    assert torch.equal(op.batch_losses, whole.batch_losses)
    alone = _Reference(problem, problem.batches[2:], "train-deterministic")
    assert_close(op.batch_operator(2).to_dense(), alone.hessian())
    assert_state_unchanged(problem.model, before)


def test_batchnorm_on_batch_statistics_stays_whole_and_says_why():
    problem = make_problem("cnn_batchnorm", num_batches=2)
    op = HessianOperator(problem.model, problem.batches, problem.loss, dtype=F64, graph_memory=0.5)
    assert op.micro_batches == (1, 1)
    assert "loss is not the mean of its parts'" in op.micro_batch_note
    assert "BatchNorm" in op.micro_batch_note
    assert_close(
        op.to_dense(), _Reference(problem, problem.batches, "train-deterministic").hessian()
    )
    # In eval mode BatchNorm uses its running statistics: examples are independent again.
    evaluated = HessianOperator(
        problem.model, problem.batches, problem.loss, dtype=F64, graph_memory=0.5, mode="eval"
    )
    assert min(evaluated.micro_batches) >= 2 and evaluated.micro_batch_note is None


def _token_mean_problem(equal_tokens: bool):
    """A per-token loss averaged over the tokens a mask keeps: a mean over examples only when
    every example keeps as many tokens."""
    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    for p in model.parameters():
        nn.init.normal_(p, std=0.7, generator=gen)
    x = torch.randn(6, 5, 3, generator=gen, dtype=F64)
    y = torch.randint(0, 2, (6, 5), generator=gen)
    mask = torch.ones(6, 5, dtype=torch.bool)
    if not equal_tokens:
        mask[:3, 2:] = False  # the first half of the batch keeps fewer tokens

    def token_mean(model, batch):
        logits = model(batch["x"])
        losses = F.cross_entropy(logits.transpose(1, 2), batch["y"], reduction="none")
        return losses[batch["mask"]].mean()

    return model, [{"x": x, "y": y, "mask": mask}], ModelLoss(token_mean)


@pytest.mark.parametrize("equal_tokens", [True, False])
def test_a_token_mean_splits_only_when_every_part_holds_as_many_tokens(equal_tokens):
    model, batches, loss = _token_mean_problem(equal_tokens)
    op = HessianOperator(model, batches, loss, graph_memory=0.5)
    whole = HessianOperator(model, batches, loss, graph_memory=0.5, micro_batches=False)
    if equal_tokens:
        assert op.micro_batches[0] >= 2 and op.micro_batch_note is None
    else:
        assert op.micro_batches == (1,) and "not the mean of its parts'" in op.micro_batch_note
    assert_close(op.to_dense(), whole.to_dense(), rtol=1e-12)


def test_a_coupling_that_the_loss_value_hides_is_caught_by_the_gradient():
    # loss = mean CE + (std(z) - std(z).detach()): the added term is 0 at the point, in the
    # whole batch and in every part, but its gradient couples the batch's examples.
    problem = make_problem("tanh_mlp", num_batches=2)

    def coupled(model, batch):
        z = model(batch[0])
        s = z.std()
        return F.cross_entropy(z, batch[1]) + (s - s.detach())

    args = (problem.model, problem.batches, ModelLoss(coupled))
    op = HessianOperator(*args, dtype=F64, graph_memory=0.5)
    assert op.micro_batches == (1, 1)
    assert "batch 0's gradient is not the mean of its parts'" in op.micro_batch_note
    whole = HessianOperator(*args, dtype=F64, graph_memory=0.5, micro_batches=False)
    assert_close(op.to_dense(), whole.to_dense(), rtol=1e-12)


def test_without_a_cap_nothing_is_split():
    problem = make_problem("tanh_mlp", num_batches=2)
    args = (problem.model, problem.batches, problem.loss)
    assert HessianOperator(*args).micro_batches == (1, 1)
    assert HessianOperator(*args, graph_memory=0.5, cache_graph=False).micro_batches == (1, 1)
    assert HessianOperator(*args, graph_memory=1e6).micro_batches == (1, 1)


def test_the_probe_answers_the_same_with_micro_batches():
    problem = make_problem("tiny_transformer", num_batches=4, batch_size=8)
    common = dict(num_batches=4, dtype=F64, graph_memory=0.5, trace=False, seed=3)
    args = (problem.model, problem.batches, problem.loss)
    split = probe_curvature(*args, **common)
    whole = probe_curvature(*args, micro_batches=False, **common)
    assert split.hvps == whole.hvps
    assert split.lambda_max == pytest.approx(whole.lambda_max, rel=1e-10)
    assert split.lambda_min == pytest.approx(whole.lambda_min, rel=1e-10)


def test_micro_batches_must_be_a_bool():
    problem = make_problem("tanh_mlp", num_batches=1)
    with pytest.raises(TypeError, match="micro_batches must be a bool"):
        HessianOperator(problem.model, problem.batches, problem.loss, micro_batches=2)
    with pytest.raises(TypeError, match="micro_batches must be a bool"):
        ProbeSettings(micro_batches="auto")
