"""Where a Lanczos step's time goes beyond its Hessian-vector product (issue 13, the CNN target).

Run from the repository root (CPU):

    python benchmarks/product_overhead.py [--models cnn mlp] [--repeats 11] [--steps 10]

For 1 and 8 batches of each model, the cost of one single-batch HVP in gradients (forward +
backward of one batch), timed with the thread's CPU clock (one thread, so that other processes on
a shared machine count less), interleaved in one process, median over the repeats of the ratio
within each repeat:

* ``bare``: ``torch.autograd.grad`` through cached gradient graphs, one call for all batches;
* ``matvec``: ``HessianOperator.matvec`` (the cached-graph engine);
* ``matvec+policy``: the same inside the mode policy, which the product entered before it
  skipped the policy (a backward pass runs no forward);
* ``lanczos``, ``lanczos+policy``: :func:`uba_auto.lanczos` for ``--steps`` steps (tolerance 0),
  without and with the policy per product;
* ``tracked``: the same Lanczos through the probe's ``Tracked`` wrapper (no progress bar).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from benchmarks.probe_models import batches, loss_fn, make_model
from uba_auto import HessianOperator, lanczos
from uba_auto.linear_operator import SymmetricOperator
from uba_auto.probe.bookkeeping import Tracked


class _InPolicy(SymmetricOperator):
    """Each product inside the operator's mode policy, as the cached engine did per product."""

    def __init__(self, op: HessianOperator) -> None:
        super().__init__()
        self.op, self.size, self.dtype, self.device = op, op.size, op.dtype, op.device

    def _matvec(self, v: Tensor) -> Tensor:
        with self.op._evaluation.computing(derivatives=True):
            return self.op.matvec(v)


def _bare(model: torch.nn.Module, bs: list) -> tuple:
    names = [n for n, _ in model.named_parameters()]
    leaves = [p.detach().requires_grad_() for p in model.parameters()]
    grads = []
    for x, y in bs:
        out = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
        g = torch.autograd.grad(loss_fn(out, y), leaves, create_graph=True)
        grads.append(torch.cat([t.reshape(-1) for t in g]))

    def product(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(grads, leaves, [v / len(bs)] * len(bs), retain_graph=True)
        return torch.cat([t.reshape(-1) for t in hv])

    return product


def measure(name: str, num_batches: int, repeats: int, steps: int) -> dict[str, float]:
    model = make_model(name)
    bs = batches(name, num_batches)
    params = list(model.parameters())
    op = HessianOperator(model, bs, loss_fn)
    in_policy, tracked = _InPolicy(op), Tracked(op, None, num_batches)
    bare = _bare(model, bs)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(0))

    def gradient() -> None:
        for _ in range(steps):
            torch.autograd.grad(loss_fn(model(bs[0][0]), bs[0][1]), params)

    def repeated(fn):
        return lambda: [fn(v) for _ in range(steps)]

    def solve(target):
        return lambda: lanczos(target, max_iters=steps, tol=1e-300, check_every=5)

    kernels = {
        "bare": repeated(bare),
        "matvec": repeated(op.matvec),
        "matvec+policy": repeated(in_policy.matvec),
        "lanczos": solve(op),
        "lanczos+policy": solve(in_policy),
        "tracked": solve(tracked),
    }
    for fn in (gradient, *kernels.values()):
        fn()  # warm-up
    ratios: dict[str, list[float]] = {k: [] for k in kernels}
    for r in range(repeats):
        order = list(kernels) if r % 2 == 0 else list(kernels)[::-1]
        t = time.thread_time()
        gradient()
        t_grad = time.thread_time() - t
        for key in order:
            t = time.thread_time()
            kernels[key]()
            ratios[key].append((time.thread_time() - t) / t_grad / num_batches)
    return {k: statistics.median(x) for k, x in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"one single-batch HVP in gradients, median of {args.repeats}, {args.steps} steps")
    for name in args.models:
        for num_batches in (1, 8):
            row = measure(name, num_batches, args.repeats, args.steps)
            cells = ", ".join(f"{k} {x:.3f}" for k, x in row.items())
            print(f"  {name}, {num_batches} batch(es): {cells}", flush=True)


if __name__ == "__main__":
    main()
