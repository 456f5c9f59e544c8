"""Peak memory of one operation on a benchmark model, measured in a fresh process.

    python benchmarks/peak_memory.py MODEL WHAT [--device cpu] [--repeats 3] [--kwargs JSON]

``MODEL`` is one of :data:`benchmarks.probe_models.MODELS`; ``WHAT`` is

* ``train_step``: one SGD-momentum step on one batch (the reference; a first step, so the
  momentum buffers and ``.grad`` are allocated inside it, as in the first step of a run);
* ``probe``: ``probe_curvature(model, batches, loss_fn, **kwargs)`` (``--kwargs`` a JSON dict,
  default the probe's defaults on 8 batches);
* ``auto``: ``auto_uba(model, batches, 5000, loss_fn=loss_fn, **kwargs)`` on 8 batches;
* ``peer:NAME``: a peer library's top-eigenvalue solver on one batch (see ``probe_benchmark.py``);
* ``hvp:ENGINE``: one Hessian-vector product on one batch, recomputed from the batch as the probe
  does over its memory cap (``HessianOperator(..., engine=ENGINE, cache_graph=False)``, ``ENGINE``
  ``double-backward`` or ``forward-over-reverse``): the floor of a product's working memory;
  ``hvp:kept``: one batch's operator built with its graph kept (``graph_memory=None``) and one
  product on it, both measured (what a one-batch probe on a cached graph holds at its peak).

``python benchmarks/peak_memory.py MODEL hvp_rate [--repeats 5]`` instead times, in this one
process, the products of the probe's operator on 8 batches under its default graph cap
(``graph_memory=2.5``) against every graph cached (``graph_memory=None``): single-batch products
per second, interleaved round by round, median of ``repeats`` rounds and the ratio per round.

Every measurement runs in a new interpreter, after the model and its batches exist and after one
warm-up run of the same operation (which loads the libraries it imports and whatever they
initialise on first use; the training step is a first step again after it, with ``.grad`` and the
momentum buffers freed), so what is measured is the working memory the operation adds.
On CUDA: ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` before. On CPU: the rise of
the resident set size over its level before the operation, sampled every ~20 µs by a thread
(page-granular), with glibc's mmap threshold pinned to 64 KiB so that freed blocks leave the
resident set; ``OMP_NUM_THREADS=1``. Prints one JSON line ``{"bytes": ...}``; :func:`measure`
runs it ``repeats`` times and returns the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import gc, json, sys, threading, time, torch
sys.path.insert(0, {root!r})
from benchmarks.probe_models import make_model, batches, loss_fn, train_step
device = torch.device({device!r})
name, what, kwargs = {model!r}, {what!r}, json.loads({kwargs!r})
model = make_model(name, device)
data = batches(name, kwargs.pop("num_batches", 8), device)
if what == "train_step":
    def run():  # a first step: .grad and the momentum buffers are allocated inside it
        model.zero_grad(set_to_none=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        train_step(model, opt, data[0])
        model.zero_grad(set_to_none=True)
elif what == "probe":
    from uba_auto import probe_curvature
    kwargs.setdefault("progress", False)
    def run():
        probe_curvature(model, data, loss_fn, num_batches=len(data), **kwargs)
elif what == "auto":
    from uba_auto import auto_uba
    kwargs.setdefault("progress", False)
    def run():
        auto_uba(model, data, kwargs.pop("budget", 5000), loss_fn=loss_fn,
                 num_batches=len(data), **kwargs)
elif what.startswith("hvp:"):
    from uba_auto import HessianOperator
    if what == "hvp:kept":
        def run():
            op = HessianOperator(model, data[:1], loss_fn, graph_memory=None)
            op.matvec(torch.ones(op.size, device=device))
    else:
        op = HessianOperator(model, data[:1], loss_fn, engine=what[4:], cache_graph=False)
        v = torch.ones(op.size, device=device)
        def run():
            op.matvec(v)
elif what.startswith("peer:"):
    sys.path.insert(0, {bench!r})
    from probe_benchmark import peer_solver
    solve = peer_solver(what[5:], model, data[0])
    def run():
        solve()
else:
    raise SystemExit("unknown operation " + what)
# A warm-up run loads what the operation's code imports and initialises on first use (libraries,
# thread pools), which is not the operation's working memory; then the measured run.
run()
gc.collect()
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run(); torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
else:
    page = 4096
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    sys.setswitchinterval(1e-6)
    peak_rss, stop = [0], threading.Event()
    def sample():
        while not stop.is_set():
            peak_rss[0] = max(peak_rss[0], rss())
            time.sleep(2e-5)
    base = rss()
    thread = threading.Thread(target=sample); thread.start()
    run()
    stop.set(); thread.join()
    peak = max(peak_rss[0], rss()) - base
print(json.dumps({{"bytes": peak}}))
"""


def measure(
    model: str, what: str, *, device: str = "cpu", repeats: int = 3, kwargs: dict | None = None
) -> float:
    """Median peak bytes of ``what`` on ``model`` over ``repeats`` fresh processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    code = _CHILD.format(
        root=str(ROOT),
        bench=str(ROOT / "benchmarks"),
        device=device,
        model=model,
        what=what,
        kwargs=json.dumps(kwargs or {}),
    )
    values = []
    for _ in range(repeats):
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
        )
        if res.returncode != 0:
            raise RuntimeError(f"{model}/{what} failed:\n{res.stderr[-3000:]}")
        values.append(json.loads(res.stdout.strip().splitlines()[-1])["bytes"])
    return statistics.median(values)


def hvp_rate(model_name: str, *, repeats: int = 5, products: int = 8) -> dict:
    """Single-batch products per second, capped graphs vs every graph cached, side by side."""
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.probe_models import batches, loss_fn, make_model
    from uba_auto import HessianOperator
    from uba_auto.probe.settings import DEFAULT_GRAPH_MEMORY

    torch.set_num_threads(1)
    model = make_model(model_name)
    data = batches(model_name, 8)
    ops = {
        cap: HessianOperator(model, data, loss_fn, graph_memory=cap)
        for cap in (None, DEFAULT_GRAPH_MEMORY)
    }
    v = torch.randn(ops[None].size, generator=torch.Generator().manual_seed(0))
    rates: dict = {cap: [] for cap in ops}
    for _ in range(repeats + 1):  # the first round warms up
        for cap, op in ops.items():
            start = time.perf_counter()
            for i in range(products):
                op.batch_operator(i % op.num_batches).matvec(v)
            rates[cap].append(products / (time.perf_counter() - start))
    ratios = [c / f for c, f in zip(rates[DEFAULT_GRAPH_MEMORY][1:], rates[None][1:], strict=True)]
    return {
        "cached_batches": {str(cap): len(op.cached_batches) for cap, op in ops.items()},
        "hvps_per_s_all_cached": statistics.median(rates[None][1:]),
        "hvps_per_s_capped": statistics.median(rates[DEFAULT_GRAPH_MEMORY][1:]),
        "ratio_capped_over_cached": ratios,
        "median_ratio": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("what")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kwargs", default="{}")
    args = parser.parse_args()
    if args.what == "hvp_rate":
        print(json.dumps(hvp_rate(args.model, repeats=args.repeats)))
        return
    value = measure(
        args.model,
        args.what,
        device=args.device,
        repeats=args.repeats,
        kwargs=json.loads(args.kwargs),
    )
    print(f"{args.model} {args.what}: {value / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
