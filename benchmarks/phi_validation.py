"""Validation of auto_uba: does the φ it picks train as well as the best φ of a sweep?

Run from the repository root, after ``benchmarks/phi_sweep.py`` (which fixes each cell's peak
learning rate and holds the fixed-φ and baseline results for the same tasks, budgets and seeds):

    python benchmarks/phi_validation.py
        [--sweeps benchmarks/results/phi_sweep.json benchmarks/results/phi_sweep_holdout.json
                  benchmarks/results/phi_sweep_holdout_gd.json]
        [--links gated-edge gated calibrated chebyshev] [--num-batches 8] [--workers 2]
        [--out benchmarks/results/phi_validation.json]

For every cell (task × budget) and seed of the sweep, it trains the task with the schedule
``auto_uba`` returns, at the sweep's cosine-tuned peak rate, and compares the held-out loss at the
end of the budget (mean over seeds) with the best fixed φ and with cosine. ``auto_uba`` probes a
freshly built copy of the seed's model (identical to the one trained: same seed, and the probe
changes nothing) on the first ``--num-batches`` minibatches of that seed's stream. The probe's
wall time is reported as a share of the run's training time.

The summary counts cells and tasks (a task passes when both of its budgets are within 1 % of the
best fixed φ) separately for the five calibration tasks, on which the links' constants were fitted,
and the out-of-sample tasks (``benchmarks.tasks.HOLDOUT_TASK_NAMES``), which no fit has seen.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uba_auto
from benchmarks.tasks import HOLD_TEST_TASK_NAMES, HOLDOUT_TASK_NAMES, get_task
from benchmarks.train import ScheduleSpec, train

OUT_OF_SAMPLE = HOLDOUT_TASK_NAMES + HOLD_TEST_TASK_NAMES


def _init_worker() -> None:
    torch.set_num_threads(1)


def _run(job: tuple) -> dict:
    task_name, budget, seed, peak_lr, link, num_batches = job
    task = get_task(task_name)
    info: dict = {}

    def factory(opt: torch.optim.Optimizer):
        twin = task.make_model(seed)
        twin.train()
        batches = list(itertools.islice(task.batches(seed), num_batches))
        # A task with its own optimizer (AdamW, SGD with weight decay...) is probed with the
        # twin's own optimizer, fresh like the real one before its first step (the probe reads
        # its preconditioner and decay, on the twin's parameters); the real run then gets the
        # UBA schedule of the phi chosen, the sweep's own schedule code for that phi. The plain
        # SGD tasks keep auto_uba's scheduler on the real optimizer, as in the stored results.
        own = task.optimizer_factory is not None
        t0 = time.perf_counter()
        auto = uba_auto.auto_uba(
            twin,
            batches,
            budget,
            optimizer=task.make_optimizer(twin, peak_lr) if own else opt,
            loss_fn=task.loss_fn,
            num_batches=num_batches,
            warmup_steps=task.warmup_steps(budget),  # train() requires the task's warm-up
            link=link,
            density=False,
            per_batch=False,
            trace=False,
            progress=False,
            seed=seed,
        )
        info.update(
            phi=auto.phi,
            kappa=auto.report.kappa,
            probe_s=time.perf_counter() - t0,
            hvps=auto.report.estimate.num_hvps,
            reason=auto.report.reason,
        )
        if own:
            return ScheduleSpec("uba", auto.phi).factory(budget, task.warmup_steps(budget))(opt)
        return auto.scheduler

    t0 = time.perf_counter()
    result = train(task, factory, budget, seed, peak_lr)
    total = time.perf_counter() - t0
    return {
        "task": task_name,
        "budget": budget,
        "seed": seed,
        "link": link,
        **info,
        "heldout": result.final_heldout_loss,
        "train": result.final_train_loss,
        "diverged": result.diverged,
        "train_s": total - info["probe_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sweeps",
        "--sweep",
        nargs="+",
        default=[
            "benchmarks/results/phi_sweep.json",
            "benchmarks/results/phi_sweep_holdout.json",
            "benchmarks/results/phi_sweep_holdout_gd.json",
        ],
    )
    parser.add_argument(
        "--links", nargs="+", default=["gated-edge", "gated", "calibrated", "chebyshev"]
    )
    parser.add_argument("--num-batches", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=None, help="only these tasks")
    parser.add_argument("--out", default="benchmarks/results/phi_validation.json")
    args = parser.parse_args()
    sweeps = [json.loads(Path(f).read_text()) for f in args.sweeps]
    seeds = sweeps[0]["settings"]["seeds"]
    if any(s["settings"]["seeds"] != seeds for s in sweeps):
        raise SystemExit("the sweeps were run with different seeds")
    sweep = {"cells": [c for s in sweeps for c in s["cells"]]}
    if args.tasks:
        sweep["cells"] = [c for c in sweep["cells"] if c["task"] in args.tasks]
    jobs = [
        (c["task"], c["budget"], s, c["peak_lr"], link, args.num_batches)
        for c in sweep["cells"]
        for s in seeds
        for link in args.links
    ]
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker) as pool:
        runs = pool.map(_run, jobs)
    wall = time.perf_counter() - start

    rows, summary = [], {}
    for link in args.links:
        within = not_worse = 0
        chosen, best = [], []
        split = {"calibration": [0, 0, 0], "out-of-sample": [0, 0, 0]}  # within, not worse, cells
        task_ok: dict[str, bool] = {}
        for c in sweep["cells"]:
            mine = [
                r
                for r in runs
                if r["task"] == c["task"] and r["budget"] == c["budget"] and r["link"] == link
            ]
            sched = c["schedules"]
            # the sweep's own grid (the wide sweeps reach 1/32)
            fixed = {
                float(k[4:]): v["heldout_loss_mean"]
                for k, v in sched.items()
                if k.startswith("phi=")
            }
            best_phi = min(fixed, key=fixed.get)
            auto_loss = statistics.mean(r["heldout"] for r in mine)
            cos = sched["cosine"]["heldout_loss_mean"]
            gap_best = auto_loss / fixed[best_phi] - 1
            gap_cos = auto_loss / cos - 1
            within += gap_best <= 0.01
            not_worse += gap_cos <= 0.01
            part = split["out-of-sample" if c["task"] in OUT_OF_SAMPLE else "calibration"]
            part[0] += gap_best <= 0.01
            part[1] += gap_cos <= 0.01
            part[2] += 1
            task_ok[c["task"]] = task_ok.get(c["task"], True) and gap_best <= 0.01
            phis = [r["phi"] for r in mine]
            chosen.append(statistics.median(phis))
            best.append(best_phi)
            overhead = statistics.mean(r["probe_s"] / r["train_s"] for r in mine)
            rows.append(
                [
                    link,
                    c["task"],
                    c["budget"],
                    ", ".join(f"{p:.3g}" for p in phis),
                    f"{best_phi:g}",
                    f"{auto_loss:.4g}",
                    f"{fixed[best_phi]:.4g}",
                    f"{cos:.4g}",
                    f"{100 * gap_best:+.2f}%",
                    f"{100 * gap_cos:+.2f}%",
                    f"{100 * overhead:.1f}%",
                ]
            )
        rho = spearmanr(chosen, best).statistic if len(set(chosen)) > 1 else float("nan")
        summary[link] = {
            "cells_within_1pct_of_best": within,
            "cells_not_worse_than_cosine_by_1pct": not_worse,
            "num_cells": len(sweep["cells"]),
            "spearman_chosen_vs_best_phi": rho,
            "by_set": {
                name: {
                    "cells_within_1pct_of_best": w,
                    "cells_not_worse_than_cosine_by_1pct": nw,
                    "num_cells": n,
                    "tasks_within_1pct_in_both_budgets": sum(
                        ok
                        for t, ok in task_ok.items()
                        if (t in OUT_OF_SAMPLE) == (name == "out-of-sample")
                    ),
                    "num_tasks": sum(
                        (t in OUT_OF_SAMPLE) == (name == "out-of-sample") for t in task_ok
                    ),
                }
                for name, (w, nw, n) in split.items()
                if n
            },
        }

    print(
        f"# auto_uba validation (seeds {seeds}, {args.num_batches} probe batches, "
        f"{len(runs)} runs in {wall:.0f} s)\n"
    )
    head = [
        "link",
        "task",
        "budget",
        "φ chosen (per seed)",
        "best swept φ",
        "held-out auto",
        "held-out best φ",
        "held-out cosine",
        "auto vs best φ",
        "auto vs cosine",
        "probe / training time",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    print()
    for link, s in summary.items():
        print(
            f"{link}: within 1% of the best swept φ in {s['cells_within_1pct_of_best']}/"
            f"{s['num_cells']} cells; not worse than cosine by >1% in "
            f"{s['cells_not_worse_than_cosine_by_1pct']}/{s['num_cells']}; Spearman(chosen φ, "
            f"best φ) = {s['spearman_chosen_vs_best_phi']:.2f}"
        )
        for name, b in s["by_set"].items():
            print(
                f"    {name}: {b['cells_within_1pct_of_best']}/{b['num_cells']} cells within 1%, "
                f"{b['cells_not_worse_than_cosine_by_1pct']}/{b['num_cells']} not worse than "
                f"cosine by >1%, {b['tasks_within_1pct_in_both_budgets']}/{b['num_tasks']} tasks "
                "within 1% in both budgets"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"command": " ".join(sys.argv), "wall_s": wall, "runs": runs, "summary": summary},
            indent=1,
            default=float,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
