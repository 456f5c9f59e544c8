"""Dense float64 references for curvature tests: Hessian, GGN and gradient by torch.func."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from _models import Problem
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

F64 = torch.float64
RTOL = 1e-10


# ----------------------------------------------------------------------- independent references
@contextlib.contextmanager
def _reference_kernels() -> Iterator[None]:
    """The math attention kernel and no MHA fast path: the only ones torch.func.hessian handles."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


# torch.func.hessian (vmap over jvp/vjp) returns wrong mixed second derivatives through the native
# batch_norm (train mode) and layer_norm kernels in torch 2.13: checked against finite differences
# and torch.autograd.functional.hessian, which agree with the operators. The references therefore
# spell both normalisations out in elementary ops.
class _FormulaBatchNorm2d(nn.Module):
    """BatchNorm2d in elementary ops, with the same parameter names.

    ``batch_statistics`` chooses training (batch) or running statistics.
    """

    def __init__(self, bn: nn.BatchNorm2d, batch_statistics: bool) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps
        self.running_mean, self.running_var = bn.running_mean, bn.running_var
        self.batch_statistics = batch_statistics

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_statistics:
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, as BatchNorm
        else:
            mean = self.running_mean.view(1, -1, 1, 1)
            var = self.running_var.view(1, -1, 1, 1)
        x_hat = (x - mean) / torch.sqrt(var + self.eps)
        return x_hat * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class _FormulaLayerNorm(nn.Module):
    """LayerNorm over the last dimension in elementary ops, with the same parameter names."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        assert len(ln.normalized_shape) == 1
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class _FormulaLSTM(nn.Module):
    """A one-layer, one-direction, batch-first ``nn.LSTM`` in elementary ops (same parameter
    names; gates in PyTorch's order i, f, g, o): a reference that runs no recurrent kernel."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        assert lstm.num_layers == 1 and not lstm.bidirectional and lstm.batch_first
        assert lstm.bias and lstm.proj_size == 0
        self.hidden_size = lstm.hidden_size
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            setattr(self, name, getattr(lstm, name))

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h = x.new_zeros(x.shape[0], self.hidden_size)
        c = h
        outputs = []
        for t in range(x.shape[1]):
            gates = x[:, t] @ self.weight_ih_l0.T + self.bias_ih_l0
            gates = gates + h @ self.weight_hh_l0.T + self.bias_hh_l0
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h[None], c[None])


def _reference_model(model: nn.Module, mode: str) -> nn.Module:
    """A float64 copy of ``model`` whose modules implement ``mode`` permanently."""
    assert mode in ("train-deterministic", "eval")
    ref = copy.deepcopy(model).to(F64)
    for name, m in list(ref.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        if isinstance(m, nn.BatchNorm2d):
            replacement: nn.Module = _FormulaBatchNorm2d(m, batch_statistics=mode != "eval")
        elif isinstance(m, nn.LayerNorm):
            replacement = _FormulaLayerNorm(m)
        elif isinstance(m, nn.LSTM):
            replacement = _FormulaLSTM(m)
        else:
            continue
        setattr(ref.get_submodule(parent_name), attr, replacement)
    ref.eval()  # dropout (also MultiheadAttention's) off; BatchNorm was replaced above
    return ref


def _to64(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(F64) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to64(v) for k, v in batch.items()}
    return type(batch)(_to64(b) for b in batch)


class _Reference:
    """Dense float64 Hessian/GGN/gradient of the mean batch loss, by torch.func on flat params."""

    def __init__(self, problem: Problem, batches: list[Any], mode: str) -> None:
        self.problem = problem
        self.model = _reference_model(problem.model, mode)
        self.batches = [_to64(b) for b in batches]
        named = dict(self.model.named_parameters())
        self.names = [n for n, p in named.items() if p.requires_grad]
        self.shapes = [named[n].shape for n in self.names]
        self.fixed = {n: p.detach() for n, p in named.items() if n not in self.names}
        self.fixed.update(dict(self.model.named_buffers()))
        self.flat0 = torch.cat([named[n].detach().reshape(-1) for n in self.names])

    def params(self, flat: Tensor) -> dict[str, Tensor]:
        out, start = dict(self.fixed), 0
        for n, s in zip(self.names, self.shapes, strict=True):
            out[n] = flat[start : start + s.numel()].view(s)
            start += s.numel()
        return out

    def outputs(self, flat: Tensor, batch: Any) -> Tensor:
        return functional_call(self.model, self.params(flat), (batch[0],))

    def batch_loss(self, flat: Tensor, batch: Any) -> Tensor:
        if isinstance(batch, dict):
            out = functional_call(self.model, self.params(flat), (), batch)
            return out["loss"] if isinstance(out, dict) else out.loss
        return self.problem.loss(self.outputs(flat, batch), batch[1])

    def mean_loss(self, flat: Tensor) -> Tensor:
        return torch.stack([self.batch_loss(flat, b) for b in self.batches]).mean()

    def hessian(self) -> Tensor:
        with _reference_kernels():
            return torch.func.hessian(self.mean_loss)(self.flat0)

    def gradient(self) -> Tensor:
        with _reference_kernels():
            return torch.func.grad(self.mean_loss)(self.flat0)

    def ggn(self) -> Tensor:
        total = torch.zeros(self.flat0.numel(), self.flat0.numel(), dtype=F64)
        with _reference_kernels():
            for batch in self.batches:
                z = self.outputs(self.flat0, batch)
                jac = torch.func.jacrev(self.outputs)(self.flat0, batch).reshape(z.numel(), -1)

                def loss_of_flat_outputs(z_flat: Tensor, shape: Any = z.shape, y: Any = batch[1]):
                    return self.problem.loss(z_flat.view(shape), y)

                hess_z = torch.func.hessian(loss_of_flat_outputs)(z.reshape(-1))
                total += jac.T @ hess_z @ jac
        return total / len(self.batches)


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-300)
    err = float((actual - expected).abs().max() / scale)
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"
