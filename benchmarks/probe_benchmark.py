"""Curvature probe benchmark: uba-auto's Lanczos probe vs PyHessian, HVP cost, probe memory.

Run from the repository root:

    python benchmarks/probe_benchmark.py [--repeats 7] [--device cpu] [--out PATH]

Everything is measured side by side in one run, on the same model and the same minibatch, with
the median over ``--repeats`` repeats (each repeat a different random start vector):

A. Top eigenvalue. For each model: HVPs and wall time (setup included: both build the gradient
   graph once) of uba-auto's probe (Lanczos, both ends, default tolerance) and of PyHessian's
   ``eigenvalues()`` (power iteration, default tol 1e-3 on the relative change), the relative
   error each reaches, and the "oracle" number of HVPs each needs before its estimate is within
   1e-3 of the truth. Truth: float64 Lanczos run to a residual below 1e-10 relative.
B. One HVP in units of one gradient (forward + backward) for each engine.
C. Peak memory of the probe vs one training step (SGD with momentum), each in a fresh
   subprocess: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the rise of the resident set
   size over its level before the operation, sampled every ~20 us by a thread while the operation
   runs three times (page-granular; glibc's mmap threshold pinned so freed blocks leave RSS).

Models: an MLP and a small CNN on scikit-learn's digits (nothing is downloaded), float32, at
their seeded initialisation, one minibatch of 256 images.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

BATCH = 256
REL = 1e-3


def digits_batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:BATCH] / 16.0, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(data.target[:BATCH], dtype=torch.int64)
    return x.to(device), y.to(device)


def make_model(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
        )
    elif name == "cnn":
        model = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 16, 10),
        )
    else:
        raise ValueError(name)
    return model.to(device)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def truth(model: nn.Module, batch: Any) -> tuple[float, float, float]:
    from uba_auto import HessianOperator, lanczos

    op = HessianOperator(model, [batch], loss_fn, dtype=torch.float64)
    res = lanczos(op, max_iters=min(op.size, 400), tol=1e-11)
    return res.lambda_max, res.lambda_min, float(res.residuals.max())


def first_within(estimates: list[float], target: float) -> int | None:
    """1-based index after which every estimate stays within REL of target."""
    ok = [abs(e - target) <= REL * abs(target) for e in estimates]
    for i in range(len(ok)):
        if all(ok[i:]):
            return i + 1
    return None


def lanczos_trajectory(model: nn.Module, batch: Any, seed: int, max_iters: int) -> list[float]:
    from uba_auto import HessianOperator, lanczos
    from uba_auto._krylov import tridiagonal_eigh

    op = HessianOperator(model, [batch], loss_fn)
    gen = torch.Generator(device=op.device).manual_seed(seed)
    res = lanczos(op, max_iters=max_iters, tol=1e-30, generator=gen, check_every=max_iters)
    a, b = res.alpha.numpy(), res.beta.numpy()
    return [float(tridiagonal_eigh(a[:m], b[:m])[0][-1]) for m in range(1, a.size + 1)]


# The probe variants of section A: default tolerance, and tol=1e-3, whose residual bound
# |theta - lambda| <= residual guarantees a relative error <= 1e-3 of max|lambda|: the accuracy
# PyHessian's default is meant to reach.
VARIANTS = {"default": None, "tol1e-3": REL}


def section_a(name: str, model: nn.Module, batch: Any, repeats: int, device: torch.device):
    from uba_auto import probe_curvature
    from uba_auto.probe.pyhessian import run_pyhessian

    lam_max, lam_min, resid = truth(model, batch)
    sides = [*VARIANTS, "pyhessian"]
    rows: dict[str, dict[str, list[float]]] = {
        side: {"hvps": [], "s": [], "err_max": [], "err_min": [], "oracle": []} for side in sides
    }
    for r in range(repeats):
        # Alternate the order so that no side always runs on a warm cache.
        for side in sides if r % 2 == 0 else sides[::-1]:
            sync(device)
            t = time.perf_counter()
            if side in VARIANTS:
                est = probe_curvature(
                    model,
                    [batch],
                    loss_fn,
                    num_batches=1,
                    per_batch=False,
                    trace=False,
                    seed=r,
                    progress=False,
                    tol=VARIANTS[side],
                )
                sync(device)
                rows[side]["s"].append(time.perf_counter() - t)
                rows[side]["hvps"].append(est.num_hvps)
                rows[side]["err_max"].append(abs(est.lambda_max - lam_max) / abs(lam_max))
                rows[side]["err_min"].append(abs(est.lambda_min - lam_min) / abs(lam_min))
            else:
                res = run_pyhessian(model, [batch], loss_fn, seed=r)
                sync(device)
                rows[side]["s"].append(time.perf_counter() - t)
                rows[side]["hvps"].append(res.eigen_hvps)
                rows[side]["err_max"].append(abs(res.eigenvalues[0] - lam_max) / abs(lam_max))
        traj = lanczos_trajectory(model, batch, seed=r, max_iters=100)
        rows["default"]["oracle"].append(first_within(traj, lam_max) or float("nan"))
        long = run_pyhessian(model, [batch], loss_fn, seed=r, max_iters=1000, tol=1e-12)
        rows["pyhessian"]["oracle"].append(
            first_within(long.eigen_history, lam_max) or float("nan")
        )
    med = {
        side: {k: statistics.median(v) if v else None for k, v in cols.items()}
        for side, cols in rows.items()
    }
    ph = med["pyhessian"]
    return {
        "model": name,
        "num_params": sum(p.numel() for p in model.parameters()),
        "lambda_max": lam_max,
        "lambda_min": lam_min,
        "truth_residual": resid,
        "median": med,
        "raw": rows,
        "ratios_vs_pyhessian": {
            side: {"hvps": med[side]["hvps"] / ph["hvps"], "s": med[side]["s"] / ph["s"]}
            for side in VARIANTS
        },
        "oracle_ratio": med["default"]["oracle"] / ph["oracle"],
    }


def timed(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def section_b(name: str, model: nn.Module, batch: Any, device: torch.device, reps: int):
    from uba_auto import GGNOperator, HessianOperator

    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), params)

    t_grad = timed(gradient, device, reps)
    ops = {
        "hessian, double-backward, cached graph": HessianOperator(model, [batch], loss_fn),
        "hessian, double-backward, no cache": HessianOperator(
            model, [batch], loss_fn, cache_graph=False
        ),
        "hessian, forward-over-reverse": HessianOperator(
            model, [batch], loss_fn, engine="forward-over-reverse"
        ),
        "ggn, double-backward, cached": GGNOperator(model, [batch], loss_fn),
    }
    gen = torch.Generator(device=device).manual_seed(0)
    out = {"model": name, "gradient_s": t_grad, "hvp_in_gradients": {}}
    for label, op in ops.items():
        v = torch.randn(op.size, generator=gen, device=device, dtype=op.dtype)
        out["hvp_in_gradients"][label] = (
            timed(lambda op=op, v=v: op.matvec(v), device, reps) / t_grad
        )
    return out


_MEMORY_CHILD = r"""
import gc, json, sys, threading, time, torch
sys.path.insert(0, {bench_dir!r})
from probe_benchmark import digits_batch, make_model, loss_fn
device = torch.device({device!r})
model = make_model({model!r}, device)
batch = digits_batch(device)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
what = {what!r}
if what == "train_step":
    def run():
        opt.zero_grad(); loss_fn(model(batch[0]), batch[1]).backward(); opt.step()
else:
    from uba_auto import probe_curvature
    def run():
        probe_curvature(model, [batch], loss_fn, num_batches=1, per_batch=False, trace=False,
                        progress=False)
with torch.no_grad():
    model(batch[0])
gc.collect()
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run(); torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
else:
    # Sample the resident set every ~20 us while the operation runs (glibc returns large blocks
    # to the OS at once: MALLOC_MMAP_THRESHOLD_ is pinned by the parent, so RSS tracks live data).
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
    for _ in range({inner}):
        run()
    stop.set(); thread.join()
    peak = peak_rss[0] - base
print(json.dumps({{"bytes": peak}}))
"""


def section_c(name: str, device: torch.device, repeats: int):
    out = {"model": name, "bytes": {}}
    env = {**_env(), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    for what in ("train_step", "probe"):
        values = []
        for _ in range(repeats):
            code = _MEMORY_CHILD.format(
                bench_dir=str(Path(__file__).parent),
                device=str(device),
                model=name,
                what=what,
                inner=3,
            )
            res = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
            )
            values.append(json.loads(res.stdout.strip().splitlines()[-1])["bytes"])
        out["bytes"][what] = statistics.median(values)
    out["ratio"] = out["bytes"]["probe"] / max(out["bytes"]["train_step"], 1)
    return out


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def fmt_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/probe_benchmark.json")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "device": str(device)
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "repeats": args.repeats,
        "A": [],
        "B": [],
        "C": [],
    }
    batch = digits_batch(device)
    for name in ("mlp", "cnn"):
        model = make_model(name, device)
        results["A"].append(section_a(name, model, batch, args.repeats, device))
        results["B"].append(section_b(name, model, batch, device, reps=max(20, args.repeats)))
        if not args.skip_memory:
            results["C"].append(section_c(name, device, args.repeats))

    print(
        f"\n# probe benchmark ({results['device']}, torch {results['torch']}, "
        f"median of {args.repeats})\n"
    )
    print("## A. top eigenvalue: uba-auto (Lanczos, both ends) vs PyHessian eigenvalues()\n")
    rows = []
    labels = {
        "tol1e-3": "uba-auto, tol=1e-3",
        "default": "uba-auto, default tol",
        "pyhessian": "PyHessian eigenvalues()",
    }
    for a in results["A"]:
        for side, label in labels.items():
            m = a["median"][side]
            ratio = a["ratios_vs_pyhessian"].get(side)
            rows.append(
                [
                    a["model"],
                    a["num_params"],
                    label,
                    f"{m['hvps']:.0f}" + (f" ({ratio['hvps']:.2f}x)" if ratio else ""),
                    f"{m['s'] * 1e3:.0f} ms" + (f" ({ratio['s']:.2f}x)" if ratio else ""),
                    f"{m['err_max']:.1e}",
                    "n/a" if m["err_min"] is None else f"{m['err_min']:.1e}",
                    "" if m["oracle"] is None else f"{m['oracle']:.0f}",
                ]
            )
    print(
        fmt_table(
            [
                "model",
                "params",
                "method",
                "HVPs (vs PyHessian)",
                "wall (vs PyHessian)",
                "λ_max rel. err",
                "λ_min rel. err",
                "HVPs until λ_max stays within 1e-3",
            ],
            rows,
        )
    )
    for a in results["A"]:
        print(
            f"\n{a['model']}: λ_max = {a['lambda_max']:.6g}, λ_min = {a['lambda_min']:.6g} "
            f"(float64 Lanczos, max residual {a['truth_residual']:.1e}); oracle HVPs ratio "
            f"{a['oracle_ratio']:.2f}x"
        )
    print("\n## B. one HVP in units of one gradient (forward + backward)\n")
    labels = list(results["B"][0]["hvp_in_gradients"])
    rows = [[lab] + [f"{b['hvp_in_gradients'][lab]:.2f}" for b in results["B"]] for lab in labels]
    rows.append(["(one gradient, ms)"] + [f"{b['gradient_s'] * 1e3:.2f}" for b in results["B"]])
    print(fmt_table(["engine"] + [b["model"] for b in results["B"]], rows))
    if results["C"]:
        print("\n## C. peak memory: probe vs one training step\n")
        rows = [
            [
                c["model"],
                f"{c['bytes']['train_step'] / 2**20:.2f} MiB",
                f"{c['bytes']['probe'] / 2**20:.2f} MiB",
                f"{c['ratio']:.2f}x",
            ]
            for c in results["C"]
        ]
        print(fmt_table(["model", "training step", "probe", "ratio"], rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
