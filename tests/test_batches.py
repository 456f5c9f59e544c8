"""Batch collection (_batches), batch forms and loss checks (curvature.batch_loss), mode policy."""

from __future__ import annotations

import collections
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _models import HFStyleModel, make_problem
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from uba_auto._batches import BatchSet, batch_size_of, collect_batches, move_batch
from uba_auto.curvature.batch_loss import ModelLoss, check_finite_losses, loss_at
from uba_auto.curvature.modes import MODES, evaluation_mode, mode_overrides

CPU = torch.device("cpu")


def _params_and_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {
        **{n: p.detach() for n, p in model.named_parameters()},
        **{n: b.clone() for n, b in model.named_buffers()},
    }


# ------------------------------------------------------------------------------- collect_batches
class TestCollectBatches:
    def test_dataloader_batches_keep_label_dtype_and_cast_floats_on_request(self) -> None:
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(10, 3, generator=gen), torch.arange(10))
        loader = DataLoader(data, batch_size=4)
        kept = collect_batches(loader, 2, device="cpu")
        assert kept.num_found == 2 and not kept.is_short and kept.batch_sizes == [4, 4]
        assert kept.batches[0][0].dtype == torch.float32
        cast = collect_batches(loader, 2, device=CPU, dtype=torch.float64)
        x, y = cast.batches[0]
        assert x.dtype == torch.float64 and y.dtype == torch.int64
        torch.testing.assert_close(x, data.tensors[0][:4].double())

    def test_short_loader_keeps_what_exists_and_records_it(self) -> None:
        batches = [(torch.zeros(3, 2), torch.zeros(3))] * 2
        result = collect_batches(batches, 5, device=CPU)
        assert result.num_found == 2 and result.num_requested == 5 and result.is_short
        assert "only 2" in result.shortfall_message
        assert collect_batches(batches, 2, device=CPU).shortfall_message is None

    def test_none_takes_every_batch(self) -> None:
        batches = [(torch.zeros(1, 2), torch.zeros(1))] * 7
        result = collect_batches(batches, None, device=CPU)
        assert result.num_found == 7 and not result.is_short

    def test_generator_is_read_once_and_stops_at_num_batches(self) -> None:
        pulled = []

        def gen() -> Any:
            for i in range(10):
                pulled.append(i)
                yield {"x": torch.full((2,), float(i))}

        result = collect_batches(gen(), 3, device=CPU)
        assert pulled == [0, 1, 2] and result.batch_sizes == [2, 2, 2]

    def test_empty_loader(self) -> None:
        with pytest.raises(ValueError, match="loader yielded no batches"):
            collect_batches([], 3, device=CPU)
        with pytest.raises(ValueError, match="loader yielded no batches"):
            collect_batches(DataLoader(TensorDataset(torch.zeros(0, 2)), batch_size=2), device=CPU)

    @pytest.mark.parametrize("num_batches", [0, -1, 2.0, True, "3"])
    def test_bad_num_batches(self, num_batches: Any) -> None:
        with pytest.raises(ValueError, match="num_batches must be a positive int"):
            collect_batches([(torch.zeros(1), torch.zeros(1))], num_batches, device=CPU)

    def test_single_batch_passed_as_loader(self) -> None:
        x, y = torch.zeros(4, 2), torch.zeros(4)
        with pytest.raises(ValueError, match=r"wrap it in a list: \[\(inputs, targets\)\]"):
            collect_batches((x, y), device=CPU)
        with pytest.raises(TypeError, match="got a Tensor"):
            collect_batches(x, device=CPU)
        with pytest.raises(TypeError, match="got a mapping"):
            collect_batches({"x": x}, device=CPU)
        with pytest.raises(TypeError, match="got int"):
            collect_batches(3, device=CPU)


class TestMoveBatch:
    def test_nested_structures_and_named_tuples(self) -> None:
        pair = collections.namedtuple("Pair", ["inputs", "targets"])
        batch = pair({"a": torch.zeros(2), "b": [torch.ones(2, dtype=torch.float16), "text"]}, 3)
        moved = move_batch(batch, CPU, torch.float64)
        assert isinstance(moved, pair) and moved.targets == 3
        assert moved.inputs["a"].dtype == torch.float64
        assert moved.inputs["b"][0].dtype == torch.float64 and moved.inputs["b"][1] == "text"
        same = move_batch(batch, CPU)
        assert same.inputs["a"] is batch.inputs["a"]  # nothing to do: no copy

    def test_batch_size(self) -> None:
        assert batch_size_of((torch.zeros(5, 2), torch.zeros(5))) == 5
        assert batch_size_of({"mask": torch.zeros(3, 4, dtype=torch.bool)}) == 3
        assert batch_size_of(("text", torch.tensor(1.0))) is None
        assert batch_size_of("text") is None


# ----------------------------------------------------------------------------------- loss_at
class TestLossAt:
    def test_pair_form_with_module_and_function_losses(self) -> None:
        problem = make_problem("tanh_mlp", num_batches=1)
        (x, y) = problem.batches[0]
        pb = _params_and_buffers(problem.model)
        expected = F.cross_entropy(problem.model(x), y)
        torch.testing.assert_close(loss_at(pb, problem.model, (x, y), F.cross_entropy), expected)
        torch.testing.assert_close(
            loss_at(pb, problem.model, [x, y], nn.CrossEntropyLoss()), expected
        )

    @pytest.mark.parametrize("return_dict", [False, True])
    def test_dict_form_reads_the_models_loss(self, return_dict: bool) -> None:
        problem = make_problem("hf_style", num_batches=1, return_dict=return_dict)
        problem.model.eval()
        batch = problem.batches[0]
        out = problem.model(**batch)
        expected = out["loss"] if return_dict else out.loss
        torch.testing.assert_close(
            loss_at(_params_and_buffers(problem.model), problem.model, batch), expected
        )

    def test_model_loss_form_sees_the_given_parameters(self) -> None:
        model = nn.Linear(2, 1, bias=False)
        params = {"weight": torch.tensor([[2.0, 3.0]])}

        def loss(m: nn.Module, batch: Any) -> Tensor:
            return m(batch["x"]).sum()

        value = loss_at(params, model, {"x": torch.ones(1, 2)}, ModelLoss(loss))
        assert float(value) == 5.0
        assert ModelLoss(ModelLoss(loss)).fn is loss

    def test_pair_without_loss_fn(self) -> None:
        with pytest.raises(ValueError, match="pass loss_fn"):
            loss_at({}, nn.Linear(2, 1), (torch.zeros(1, 2), torch.zeros(1, 1)))

    def test_dict_with_loss_fn_is_ambiguous(self) -> None:
        model = HFStyleModel()
        batch = {"features": torch.zeros(2, 5), "labels": torch.zeros(2, dtype=torch.long)}
        with pytest.raises(ValueError, match="dict batch has no targets"):
            loss_at(_params_and_buffers(model), model, batch, F.cross_entropy)

    def test_dict_model_without_loss(self) -> None:
        model = HFStyleModel()
        with pytest.raises(ValueError, match=r"batch 3 .*loss=None.*labels"):
            loss_at(
                _params_and_buffers(model),
                model,
                {"features": torch.zeros(2, 5)},
                None,
                batch_index=3,
            )

    def test_other_batch_forms_need_model_loss(self) -> None:
        model = nn.Linear(2, 1)
        with pytest.raises(TypeError, match=r"batch 1 is a Tensor.*ModelLoss"):
            loss_at({}, model, torch.zeros(2, 2), F.mse_loss, batch_index=1)
        with pytest.raises(TypeError, match="tuple of length 3"):
            loss_at({}, model, (torch.zeros(1, 2),) * 3, F.mse_loss)
        with pytest.raises(TypeError, match="loss must be None, a callable"):
            loss_at({}, model, (torch.zeros(1, 2), torch.zeros(1, 1)), "mse")
        with pytest.raises(TypeError, match="fn must be callable"):
            ModelLoss(3)

    def test_non_scalar_loss_names_batch_and_shape(self) -> None:
        model = nn.Linear(2, 1)
        batch = (torch.zeros(4, 2), torch.zeros(4, 1))
        with pytest.raises(
            ValueError, match=r"batch 2 must be a scalar.*\(4, 1\).*reduction='mean'"
        ):
            loss_at(
                _params_and_buffers(model),
                model,
                batch,
                nn.MSELoss(reduction="none"),
                batch_index=2,
            )

    def test_non_finite_losses_name_the_first_bad_batch(self) -> None:
        check_finite_losses(torch.tensor([1.0, 2.0]))
        with pytest.raises(ValueError, match=r"batch 1 is not finite \(nan\)"):
            check_finite_losses(torch.tensor([1.0, float("nan"), float("inf")]))

    def test_functional_call_writes_running_stats_into_the_copies_only(self) -> None:
        problem = make_problem("cnn_batchnorm", num_batches=1)
        model = problem.model.train()
        before = {n: b.clone() for n, b in model.named_buffers()}
        pb = _params_and_buffers(model)
        loss_at(pb, model, problem.batches[0], problem.loss)
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, before[name]), name
        # The copies did take the update: the policy relies on it landing there.
        assert not torch.equal(pb["bn.running_mean"], before["bn.running_mean"])
        assert int(pb["bn.num_batches_tracked"]) == int(before["bn.num_batches_tracked"]) + 1


# ------------------------------------------------------------------------------- mode policy
class _Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.inorm = nn.InstanceNorm1d(4, track_running_stats=True)
        self.drop = nn.Dropout(0.5)
        self.drop2d = nn.Dropout2d(0.5)
        self.alpha = nn.AlphaDropout(0.5)
        self.attn = nn.MultiheadAttention(4, 2, dropout=0.5)
        self.rnn = nn.GRU(4, 4, num_layers=2, dropout=0.5)
        self.rnn_plain = nn.GRU(4, 4)
        self.linear = nn.Linear(4, 4)
        self.seq = nn.Sequential(nn.Dropout(0.1), nn.BatchNorm1d(4))


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


class TestEvaluationMode:
    @pytest.mark.parametrize("initial", ["train", "eval", "mixed"])
    def test_train_deterministic_policy_and_exact_restore(self, initial: str) -> None:
        model = _Zoo().train(initial == "train")
        if initial == "mixed":
            for i, m in enumerate(model.modules()):
                m.training = i % 3 == 0
        before = _flags(model)
        with evaluation_mode(model):
            inside = _flags(model)
        assert _flags(model) == before
        for name in ("bn", "inorm", "seq.1"):
            # One in eval mode inside a model in training mode was frozen on purpose.
            assert inside[name] is (before[name] or not before[""])
        for name in ("drop", "drop2d", "alpha", "attn", "rnn", "seq.0"):
            assert inside[name] is False
        for name in ("", "linear", "seq", "attn.out_proj"):
            assert inside[name] is False  # every module but the norms in eval mode
        assert inside["rnn_plain"] is True  # no dropout: cuDNN differentiates training mode only

    def test_eval_and_as_is(self) -> None:
        model = _Zoo().train()
        with evaluation_mode(model, "eval"):
            assert not any(_flags(model).values())
        model.drop.eval()
        before = _flags(model)
        with evaluation_mode(model, "as-is"):
            assert _flags(model) == before
        assert _flags(model) == before
        assert mode_overrides(model, "as-is") == []

    def test_restores_flags_after_an_exception(self) -> None:
        model = _Zoo().eval()
        before = _flags(model)
        with pytest.raises(KeyError), evaluation_mode(model):
            raise KeyError("boom")
        assert _flags(model) == before

    def test_attention_kernels_and_grad_mode_inside_only(self) -> None:
        fastpath = torch.backends.mha.get_fastpath_enabled()
        flash = torch.backends.cuda.flash_sdp_enabled()
        with torch.no_grad(), evaluation_mode(nn.Linear(1, 1)):
            assert torch.is_grad_enabled()
            assert not torch.backends.mha.get_fastpath_enabled()
            assert not torch.backends.cuda.flash_sdp_enabled()
            assert torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.mha.get_fastpath_enabled() == fastpath
        assert torch.backends.cuda.flash_sdp_enabled() == flash

    def test_unknown_mode(self) -> None:
        with pytest.raises(ValueError, match=r"mode must be one of .*got 'training'"):
            mode_overrides(nn.Linear(1, 1), "training")
        assert "train-deterministic" in MODES

    def test_default_mode_forward_draws_no_random_numbers(self) -> None:
        problem = make_problem("tiny_transformer", num_batches=1)
        model = problem.model.train()
        state = torch.get_rng_state()
        with evaluation_mode(model):
            pb = _params_and_buffers(model)
            first = loss_at(pb, model, problem.batches[0], problem.loss)
            second = loss_at(pb, model, problem.batches[0], problem.loss)
        assert torch.equal(first, second)
        assert torch.equal(torch.get_rng_state(), state)

    def test_transformer_fast_path_is_not_taken_in_eval(self) -> None:
        problem = make_problem("tiny_transformer", num_batches=1)
        model = problem.model.eval()
        x, _ = problem.batches[0]
        params = {n: p.detach() for n, p in model.named_parameters()}
        tangents = {n: torch.ones_like(p) for n, p in params.items()}

        def outputs(p: dict[str, Tensor]) -> Tensor:
            return functional_call(model, p, (x,))

        with evaluation_mode(model, "eval"):
            torch.func.jvp(outputs, (params,), (tangents,))  # the fast path would raise here


def test_batch_set_defaults() -> None:
    batch_set = BatchSet([1, 2])
    assert batch_set.num_found == 2 and not batch_set.is_short
