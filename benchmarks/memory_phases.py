"""Where the probe's memory goes, phase by phase (issue 13, the memory target).

Run from the repository root (CPU; the environment pins glibc's mmap threshold so that freed
blocks leave the resident set, as ``peak_memory.py`` does):

    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/memory_phases.py MODEL product
    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/memory_phases.py MODEL auto

``MODEL`` is one of :data:`benchmarks.probe_models.MODELS`. A thread samples the resident set every
~20 µs and keeps the peak of each phase, over the level before the measured run (after one
warm-up run of the same thing):

* ``product``: one double-backward Hessian-vector product on one batch, written out with
  ``torch.autograd.grad`` (what a recomputed product does): the forward pass, the ``create_graph``
  backward, the second backward;
* ``auto``: ``auto_uba(model, 8 batches, 5000)``; for every single-batch product, the resident
  set at its entry (what the probe holds besides the product) and its rise inside it.
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.probe_models import MODELS, batches, loss_fn, make_model

MIB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class Sampler:
    """The peak resident set per phase (``phase`` set by the measured code)."""

    def __init__(self) -> None:
        self.phase, self.peaks, self._stop = "start", {}, threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss, phase = _rss(), self.phase
            self.peaks[phase] = max(self.peaks.get(phase, 0), rss)
            time.sleep(2e-5)

    def __enter__(self) -> Sampler:
        sys.setswitchinterval(1e-6)
        self.base = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def product(name: str) -> None:
    from torch.func import functional_call

    model = make_model(name)
    model.train()
    x, y = batches(name, 1)[0]
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    leaves = list(params.values())
    v = [torch.ones_like(p) for p in leaves]

    def run(s: Sampler | None) -> None:
        def phase(label: str) -> None:
            if s is not None:
                s.phase = label

        phase("forward")
        loss = loss_fn(functional_call(model, params, (x,)), y)
        phase("create_graph backward")
        g = torch.autograd.grad(loss, leaves, create_graph=True)
        del loss
        phase("second backward")
        hv = torch.autograd.grad(g, leaves, v)
        del g, hv
        phase("end")

    run(None)
    gc.collect()
    with Sampler() as s:
        run(s)
    param_mib = sum(p.numel() * p.element_size() for p in leaves) / MIB
    print(f"{name}: one double-backward product, peak MiB over the start (P = {param_mib:.2f} MiB)")
    for label in ("forward", "create_graph backward", "second backward"):
        print(f"  {label:24s} {(s.peaks.get(label, s.base) - s.base) / MIB:8.1f}")


def auto(name: str) -> None:
    import uba_auto
    from uba_auto.curvature.local import LocalOperator

    model = make_model(name)
    data = batches(name, 8)
    log: list[tuple[str, float, float]] = []
    sampler: list[Sampler] = []
    inner = LocalOperator._matvec

    def matvec(self: LocalOperator, v: torch.Tensor) -> torch.Tensor:
        if not sampler:
            return inner(self, v)
        s = sampler[0]
        entry, s.phase = _rss(), f"product {len(log)}"
        try:
            return inner(self, v)
        finally:
            rise = s.peaks.get(s.phase, entry) - entry
            log.append((s.phase, (entry - s.base) / MIB, rise / MIB))
            s.phase = "between products"

    def run() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the plan's overspend note
            uba_auto.auto_uba(model, data, 5000, loss_fn=loss_fn, num_batches=8, progress=False)

    LocalOperator._matvec = matvec
    try:
        run()
        gc.collect()
        with Sampler() as s:
            sampler.append(s)
            run()
    finally:
        LocalOperator._matvec = inner
    print(f"{name}: auto_uba's single-batch products, MiB over the start")
    for label, entry, rise in log:
        print(f"  {label:12s} held at entry {entry:8.1f}   rise inside {rise:8.1f}")
    print(f"  peak of the whole run {(max(s.peaks.values()) - s.base) / MIB:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("what", choices=["product", "auto"])
    args = parser.parse_args()
    torch.manual_seed(0)
    (product if args.what == "product" else auto)(args.model)


if __name__ == "__main__":
    main()
