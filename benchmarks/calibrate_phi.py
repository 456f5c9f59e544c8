"""Fit the calibrated κ→φ link of ``uba_auto.phi`` to the fixed-φ sweep.

Run from the repository root, after ``benchmarks/phi_sweep.py``:

    python benchmarks/calibrate_phi.py [--sweep benchmarks/results/phi_sweep.json]
                                       [--num-batches 8] [--out benchmarks/results/calibration.json]

For every task and seed of the sweep it probes the model at initialisation on the first
``--num-batches`` minibatches of that seed's stream (what ``auto_uba`` does) and records the
curvature noise σ and κ_mb = (1 + σ)/(1 - σ). For a link φ = 2((κ_mb - 1)/(κ_c - 1))^p it then
predicts, per cell (task × budget) and seed, the held-out loss at the chosen φ by interpolating the
sweep's mean held-out loss linearly in log φ, and scores the link by

* the number of cells whose mean predicted loss is within 1 % of the best swept φ,
* the number of cells more than 1 % worse than cosine,
* the mean regret over cells.

It fits (κ_c, p) on a grid over all cells, and, to show how much of that is fitting, also by
leave-one-task-out: fit on four tasks, score on the fifth. The real check (training with
``auto_uba``) is ``benchmarks/phi_validation.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uba_auto
from benchmarks.tasks import get_task

PHIS = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
KAPPA_C_GRID = np.round(np.linspace(1.05, 2.0, 39), 4)
P_GRID = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0]


def curvature_noise(task_name: str, seed: int, num_batches: int) -> dict:
    task = get_task(task_name)
    model = task.make_model(seed)
    model.train()
    batches = list(itertools.islice(task.batches(seed), num_batches))
    est = uba_auto.probe_curvature(
        model,
        batches,
        task.loss_fn,
        num_batches=num_batches,
        per_batch=False,
        trace=False,
        seed=seed,
        progress=False,
    )
    # One batch in the stream (full-batch training): no minibatch noise by construction.
    sigma = 0.0 if est.curvature_noise is None else est.curvature_noise
    return {
        "sigma": sigma,
        "lambda_max": est.lambda_max,
        "hvps": est.num_hvps,
        "seconds": est.wall_time_s,
        "num_batches": est.num_batches,
    }


def phi_of(kappa: float, kappa_c: float, p: float) -> float:
    raw = math.inf if math.isinf(kappa) else 2.0 * ((kappa - 1.0) / (kappa_c - 1.0)) ** p
    return min(max(raw, uba_auto.phi.PHI_MIN), uba_auto.phi.PHI_MAX)


def loss_at(phi: float, losses: list[float]) -> float:
    """Mean held-out loss of the sweep, interpolated linearly in log2 φ."""
    x = np.log2(PHIS)
    return float(np.interp(math.log2(phi), x, losses))


def score(cells: list[dict], kappa_c: float, p: float) -> dict:
    within, worse_than_cos, regrets = 0, 0, []
    for c in cells:
        preds = [loss_at(phi_of(k, kappa_c, p), c["losses"]) for k in c["kappas"]]
        pred = float(np.mean(preds))
        best = min(c["losses"])
        regret = pred / best - 1
        regrets.append(regret)
        within += regret <= 0.01
        worse_than_cos += pred > 1.01 * c["cosine"]
    return {
        "within_1pct": within,
        "worse_than_cosine_1pct": worse_than_cos,
        "mean_regret": float(np.mean(regrets)),
    }


def fit(cells: list[dict]) -> tuple[float, float, dict]:
    best = None
    for kappa_c, p in itertools.product(KAPPA_C_GRID, P_GRID):
        s = score(cells, float(kappa_c), p)
        key = (s["within_1pct"] - s["worse_than_cosine_1pct"], -s["mean_regret"])
        if best is None or key > best[0]:
            best = (key, float(kappa_c), p, s)
    return best[1], best[2], best[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="benchmarks/results/phi_sweep.json")
    parser.add_argument("--num-batches", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/calibration.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sweep = json.loads(Path(args.sweep).read_text())
    seeds = sweep["settings"]["seeds"]
    tasks = sorted({c["task"] for c in sweep["cells"]})
    probes = {(t, s): curvature_noise(t, s, args.num_batches) for t in tasks for s in seeds}
    cells = []
    for c in sweep["cells"]:
        sched = c["schedules"]
        sigmas = [probes[(c["task"], s)]["sigma"] for s in seeds]
        cells.append(
            {
                "task": c["task"],
                "budget": c["budget"],
                "losses": [sched[f"phi={p:g}"]["heldout_loss_mean"] for p in PHIS],
                "cosine": sched["cosine"]["heldout_loss_mean"],
                "sigmas": sigmas,
                "kappas": [uba_auto.phi.minibatch_condition_number(s) for s in sigmas],
                "best_phi": c["best_phi"],
            }
        )
    kappa_c, p, s_all = fit(cells)
    loto = {}
    for held in tasks:
        k_c, pp, _ = fit([c for c in cells if c["task"] != held])
        loto[held] = {
            "kappa_c": k_c,
            "p": pp,
            "score": score([c for c in cells if c["task"] == held], k_c, pp),
        }
    print(
        f"# calibration of the kappa->phi link ({args.num_batches} probe batches, seeds {seeds})\n"
    )
    print("| task | budget | σ per seed | φ per seed (fit) | best swept φ | predicted regret |")
    print("|---|---|---|---|---|---|")
    for c in cells:
        phis = [phi_of(k, kappa_c, p) for k in c["kappas"]]
        pred = float(np.mean([loss_at(f, c["losses"]) for f in phis]))
        print(
            f"| {c['task']} | {c['budget']} | {', '.join(f'{x:.3f}' for x in c['sigmas'])} | "
            f"{', '.join(f'{x:.3g}' for x in phis)} | {c['best_phi']:g} | "
            f"{100 * (pred / min(c['losses']) - 1):+.2f}% |"
        )
    print(f"\nfit on all cells: kappa_c = {kappa_c:.4g}, p = {p:g}: {s_all}")
    print("\nleave-one-task-out (fit on the other four, scored on the held-out task):")
    for held, r in loto.items():
        print(f"  {held}: kappa_c = {r['kappa_c']:.4g}, p = {r['p']:g} -> {r['score']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "num_batches": args.num_batches,
                "probes": {f"{t}/seed{s}": v for (t, s), v in probes.items()},
                "cells": cells,
                "fit": {"kappa_c": kappa_c, "p": p, **s_all},
                "leave_one_task_out": loto,
            },
            indent=1,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
