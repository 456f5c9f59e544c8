r"""What a run shows early on, next to the φ it wants: the signals a mid-run φ decision could read.

For every cell (task × budget) of the given sweeps, at the cell's cosine-tuned peak, each seed
trains with cosine and stops at fractions ``f`` of its decay phase (after the task's warm-up).
At each stop, on 8 minibatches drawn from the train set by a generator of this script's own (the
run's stream is not touched, and nothing of the run is changed: the probe restores it):

* ``share``: the stability share :math:`e_t = \eta_t(\lambda_{\max} + w)/\ell`, with
  :math:`\lambda_{\max}` the sharpness the optimizer sees (the Hessian for SGD, the
  preconditioned one for Adam/AdamW, ``probe_curvature(optimizer=opt)``) and :math:`\ell` its
  stability limit (``uba_auto.optimizer_stability``): 1 is the edge of stability (Cohen et al.
  2021, 2022);
* ``sigma``: the curvature noise along the top direction;
* ``noise_ratio``: :math:`\operatorname{tr}\Sigma_B / \lVert\bar g\rVert^2`, minibatch gradient
  noise over the squared mean gradient on those batches (McCandlish et al. 2018's simple noise
  scale over the batch size);
* ``loss_ratio``: the loss on those batches (eval mode) at the stop over after the first update
  (how much of the loss the run has already removed).

The cells' best φ come from the sweep files; this script only trains cosine up to the stops.

Usage::

    python benchmarks/midrun_signals.py --sweeps benchmarks/results/phi_sweep_wide.json \
        --out benchmarks/results/midrun_signals.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import uba_auto  # noqa: E402
from benchmarks.tasks import get_task  # noqa: E402
from benchmarks.train import ScheduleSpec, evaluate, gradient_stats, train  # noqa: E402

FRACTIONS = (0.1, 0.25)
PROBE_BATCHES = 8


class _Stop(Exception):
    """Raised by the callback after the last stop: the rest of the run is not needed."""


def _probe_batches(task, seed: int, num: int) -> list:
    if task.batch_size is None:
        return [(task.x_train, task.y_train)]
    gen = torch.Generator().manual_seed(7_919 * seed + 101)
    idx = torch.randperm(task.num_train, generator=gen)
    b = task.batch_size
    out = []
    for i in range(num):
        sel = idx[(i * b) % task.num_train :][:b]
        xb = task.x_train[sel]
        if task.augment is not None:
            xb = task.augment(xb, gen)
        out.append((xb, task.y_train[sel]))
    return out


def _batch_loss(task, model, batches: list) -> float:
    """The mean over ``batches`` of each batch's loss, in eval mode (:func:`evaluate`)."""
    return sum(evaluate(task, model, x, y)[0] for x, y in batches) / len(batches)


def _signals(task, seed: int, batches: list, step: int, model, opt, first_loss: float) -> dict:
    lr = opt.param_groups[0]["lr"]
    est = uba_auto.probe_curvature(
        model,
        batches,
        task.loss_fn,
        num_batches=len(batches),
        optimizer=opt,
        grad_clip=task.grad_clip,
        trace=False,
        density=False,
        dtype=torch.float64,
        seed=seed,
        progress=False,
        max_hvps=20 * len(batches),
    )
    stab = uba_auto.optimizer_stability(opt)
    lam, limit = est.lambda_max, stab.limit_at(lr)
    share = uba_auto.phi.stability_fraction(lam, lr, limit, stab.weight_decay)
    grads = gradient_stats(task, model, batches) if len(batches) > 1 else None
    return {
        "step": step,
        "lr": lr,
        "sharpness": lam,
        "limit": limit,
        "share": share,
        "sigma": est.curvature_noise,
        "noise_ratio": (grads["trS"] / grads["g2"]) if grads and grads["g2"] > 0 else None,
        "loss_ratio": _batch_loss(task, model, batches) / first_loss,
        "hvps": est.num_hvps,
    }


def _run(job: tuple) -> tuple[tuple, list[dict]]:
    name, budget, seed, peak = job
    task = get_task(name)
    warm = task.warmup_steps(budget)
    stops = {warm + max(1, round(f * (budget - warm))): f for f in FRACTIONS}
    batches = _probe_batches(task, seed, PROBE_BATCHES)
    out: list[dict] = []
    first_loss: list[float] = []
    last = max(stops)

    def callback(step, model, opt):
        if step == 1:
            first_loss.append(_batch_loss(task, model, batches))
        if step in stops:
            rec = _signals(task, seed, batches, step, model, opt, first_loss[0])
            rec["fraction"] = stops[step]
            out.append(rec)
            if step == last:
                raise _Stop

    try:
        train(task, ScheduleSpec("cosine"), budget, seed, peak, callback=callback)
    except _Stop:
        pass
    return job, out


def _init() -> None:
    torch.set_num_threads(1)


SIGNALS = ("share", "sigma", "noise_ratio", "loss_ratio")


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else math.nan


def table(result: dict, best_from: list[dict]) -> str:
    """A markdown table of the stored signals (median over seeds) next to each cell's best φ
    (from ``best_from``, sweep cells, when they hold the cell; else the stored best φ), and the
    Spearman correlation of log best φ with each signal over the cells that have it."""
    best = {(c["task"], c["budget"]): c for c in best_from}
    lines = [
        "| task | budget | best φ | cosine vs best φ | "
        + " | ".join(f"{k} at {f:g}" for f in result["fractions"] for k in SIGNALS)
        + " |",
        "|---" * (4 + len(SIGNALS) * len(result["fractions"])) + "|",
    ]
    cols: dict[tuple, list] = {}
    ys: list[float] = []
    for c in result["cells"]:
        ref = best.get((c["task"], c["budget"]), c)
        row = [
            c["task"],
            str(c["budget"]),
            f"{ref['best_phi']:g}",
            f"{ref['cosine_gap_to_best_phi_pct']:+.2f} %",
        ]
        ys.append(math.log2(ref["best_phi"]))
        for i, f in enumerate(result["fractions"]):
            for k in SIGNALS:
                vals = sorted(s[i][k] for s in c["signals_per_seed"] if s[i][k] is not None)
                med = vals[len(vals) // 2] if vals else None
                cols.setdefault((f, k), []).append(med)
                row.append("n/a" if med is None else f"{med:.3g}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for (f, k), vals in cols.items():
        pairs = [(v, y) for v, y in zip(vals, ys, strict=True) if v is not None]
        rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
        lines.append(f"Spearman(log best φ, {k} at {f:g}) = {rho:+.2f} over {len(pairs)} cells")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweeps", nargs="+", type=Path, required=True)
    parser.add_argument(
        "--table",
        type=Path,
        default=None,
        help="print the markdown table of this stored result (best φ from --sweeps) and exit",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.table is not None:
        best = [c for f in args.sweeps for c in json.loads(f.read_text())["cells"]]
        print(table(json.loads(args.table.read_text()), best))
        return 0
    cells = [c for f in args.sweeps for c in json.loads(f.read_text())["cells"]]
    if args.out is None:
        parser.error("--out is required unless --table is given")
    jobs = [(c["task"], c["budget"], s, c["peak_lr"]) for c in cells for s in args.seeds]
    started = time.perf_counter()
    results: dict[tuple, list[dict]] = {}
    with mp.get_context("spawn").Pool(args.workers, initializer=_init) as pool:
        for job, out in pool.imap_unordered(_run, sorted(jobs, key=lambda j: -j[1])):
            results[job] = out
            print(f"  {job}: " + ", ".join(f"e={r['share']:.3g}" for r in out), file=sys.stderr)
    rows = []
    for c in cells:
        per_seed = [results[(c["task"], c["budget"], s, c["peak_lr"])] for s in args.seeds]
        row = {
            "task": c["task"],
            "budget": c["budget"],
            "peak_lr": c["peak_lr"],
            "best_phi": c["best_phi"],
            "best_schedule": c["best_schedule"],
            "cosine_gap_to_best_phi_pct": c["cosine_gap_to_best_phi_pct"],
            "heldout_loss_by_schedule": {
                k: v["heldout_loss_mean"] for k, v in c["schedules"].items()
            },
            "signals_per_seed": per_seed,
        }
        rows.append(row)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "fractions": FRACTIONS,
                "probe_batches": PROBE_BATCHES,
                "wall_time_s": time.perf_counter() - started,
                "cells": rows,
            },
            default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x,
        )
    )
    head = f"{'task':22s}{'budget':>7s} {'best φ':>7s} {'cos gap':>8s}"
    print(head + "  share e (f=0.1 / 0.25, per seed)")
    for r in rows:
        shares = " ".join(
            "/".join(f"{x['share']:.2f}" for x in seed) for seed in r["signals_per_seed"]
        )
        print(
            f"{r['task']:22s}{r['budget']:7d} {r['best_phi']:7.3g} "
            f"{r['cosine_gap_to_best_phi_pct']:7.2f}%  {shares}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
