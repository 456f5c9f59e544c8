"""Cost of one Hessian-vector product on the byte-level LSTM, in training steps, per engine.

Run from the repository root (CPU; issue 13, "Costly architectures"):

    python benchmarks/lstm_hvp_cost.py [--repeats 7] [--threads 1]

A training step is forward + backward + SGD step on one batch (``probe_models.train_step``) of a
copy of the model, with the kernels training uses (oneDNN's fused LSTM on the CPU). Times are the
process's CPU time (``time.process_time``: other processes on a shared machine count less). Each
engine's product is timed twice in the same process, interleaved with the training step (the mean
of 3 per repeat), and every ratio is taken within one repeat: "fused" builds and runs the operator
with the recurrent layer on the fused kernels (what the probe did before
``modes.unfused_recurrent_kernels``), "unfused" as the probe does now. Prints the median ratio
over the repeats, and every ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Iterator

import torch

from benchmarks.probe_models import batches, loss_fn, make_model, train_step
from uba_auto import HessianOperator
from uba_auto.curvature import modes

ENGINES = {
    "double-backward, cached graph": {},
    "double-backward, no cache": {"cache_graph": False},
    "forward-over-reverse": {"engine": "forward-over-reverse"},
}

_unfused = modes.unfused_recurrent_kernels
_fused = [False]


@contextlib.contextmanager
def _switch(modules):  # the probe's kernel switch, bypassed while _fused[0] is set
    with contextlib.nullcontext() if _fused[0] else _unfused(modules):
        yield


@contextlib.contextmanager
def fused(on: bool) -> Iterator[None]:
    _fused[0] = on
    try:
        yield
    finally:
        _fused[0] = False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes.unfused_recurrent_kernels = _switch  # evaluation_mode looks it up at each call

    model = make_model("lstm")
    batch = batches("lstm", 1)
    trained = copy.deepcopy(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.0)
    v = torch.randn(
        sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0)
    )

    products = {}
    for kernels in ("fused", "unfused"):
        for label, kwargs in ENGINES.items():
            with fused(kernels == "fused"):
                try:
                    op = HessianOperator(model, batch, loss_fn, **kwargs)
                    op.matvec(v)
                except Exception as err:  # forward-over-reverse has no fused-kernel derivative
                    print(f"{kernels}, {label}: fails ({type(err).__name__}: {str(err)[:90]}...)")
                    continue

            def product(op=op, on=kernels == "fused") -> torch.Tensor:
                with fused(on):
                    return op.matvec(v)

            products[f"{kernels}, {label}"] = product
    reference = products["fused, double-backward, cached graph"]()
    for key, product in products.items():
        error = float((product() - reference).norm() / reference.norm())
        print(f"{key}: relative difference to the fused cached product {error:.1e}")

    def step() -> None:
        train_step(trained, optimizer, batch[0])

    step()
    ratios: dict[str, list[float]] = {key: [] for key in products}
    steps = []
    clock = time.process_time  # CPU time: other processes on a shared machine count less
    for r in range(args.repeats):
        order = list(products) if r % 2 == 0 else list(products)[::-1]
        t = clock()
        for _ in range(3):
            step()
        t_step = (clock() - t) / 3
        steps.append(t_step)
        for key in order:
            t = clock()
            products[key]()
            ratios[key].append((clock() - t) / t_step)
    print(
        f"\n{args.threads} thread(s), training step {statistics.median(steps) * 1e3:.1f} ms CPU "
        f"(median of {args.repeats}); one product in training steps:"
    )
    for key, values in ratios.items():
        rounded = ", ".join(f"{x:.2f}" for x in values)
        print(f"  {key}: median {statistics.median(values):.2f} ({rounded})")


if __name__ == "__main__":
    main()
