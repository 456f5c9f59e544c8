r"""Exploratory: can a held-out check early in a cosine run tell which φ the rest of the run wants?

The cells whose best φ is below 2 (BENCHMARKS.md §2) are, but for one, cells where the held-out loss
is still falling at the end of the cosine run. That is hindsight; this script measures what a rule
could see mid-run. For every cell of the given sweep files (the task, the budget and the cosine-
tuned peak) and seeds 0-2 it trains with UBA φ = 2 (cosine), records the held-out loss (the task's
curve subset) and the train loss (the task's train-eval subset) at fractions ``FRACS`` of the
budget, and at each decision point ``s`` in ``DECIDE`` copies the run and finishes it with every φ
in ``CONTINUE`` through :meth:`uba_auto.UBAScheduler.set_phi` (no jump in the rate). A rule "at s,
look at the held-out trend, pick φ" can then be scored offline on the recorded finals, since each
choice it could make was run.

Nothing here feeds the library. Usage (a few minutes on 2 cores)::

    python benchmarks/heldout_switch.py [--sweeps FILE ...] [--out FILE] [--analyse]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import multiprocessing as mp
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uba_auto
from benchmarks.tasks import get_task
from benchmarks.train import evaluate

FRACS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
DECIDE = (0.2, 0.3)
CONTINUE = (0.25, 0.5, 1.0, 2.0, 4.0)
ROOT = Path(__file__).resolve().parent


def _steps(task, model, opt, sched, stream, n: int) -> bool:
    for xb, yb in itertools.islice(stream, n):
        loss = task.loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(float(loss.detach())):
            return False
    return True


def run(job: tuple) -> dict:
    name, budget, peak, seed = job
    torch.set_num_threads(1)
    task = get_task(name)
    x_held, y_held = task.curve_heldout()
    x_tr, y_tr = task.train_eval()
    model = task.make_model(seed)
    model.train()
    opt = task.make_optimizer(model, peak)
    sched = uba_auto.UBAScheduler(opt, total_steps=budget - 1, phi=2.0)
    stream = task.batches(seed)
    done, heldout, train, finals = 0, {}, {}, {}
    for frac in FRACS:
        target = round(frac * budget)
        _steps(task, model, opt, sched, stream, target - done)
        done = target
        heldout[f"{frac:g}"] = evaluate(task, model, x_held, y_held)[0]
        train[f"{frac:g}"] = evaluate(task, model, x_tr, y_tr)[0]
        if frac in DECIDE:
            for phi in CONTINUE:
                m, o, s = copy.deepcopy((model, opt, sched))
                s.set_phi(phi)
                rest = task.batches(seed)
                for _ in itertools.islice(rest, done):
                    pass
                ok = _steps(task, m, o, s, rest, budget - done)
                x, y = task.x_heldout, task.y_heldout
                finals[f"{frac:g}/{phi:g}"] = evaluate(task, m, x, y)[0] if ok else math.inf
    return {
        "task": name,
        "budget": budget,
        "seed": seed,
        "peak_lr": peak,
        "heldout": heldout,
        "train": train,
        "finals": finals,
    }


def _ratio(run: dict, a: float, b: float) -> float:
    """Held-out improvement over train improvement between fractions ``a`` and ``b``."""
    dh = run["heldout"][f"{a:g}"] - run["heldout"][f"{b:g}"]
    dt = run["train"][f"{a:g}"] - run["train"][f"{b:g}"]
    return dh / dt if dt > 0 else math.nan


def analyse(out: dict) -> None:
    """Print, per cell: the loss of every switch (% over the best fixed φ of the sweep), and the
    held-out signals a rule at the decision point could read."""
    runs: dict[tuple, list[dict]] = {}
    for r in out["runs"]:
        runs.setdefault((r["task"], r["budget"]), []).append(r)
    print(
        "Final held-out loss after switching from cosine to φ at fraction s, % over the best fixed "
        "φ of the sweep (mean of 3 seeds),\nand medians over seeds of what the run shows at s: "
        "r = ln L_held(s - 0.1) - ln L_held(s) and R = ΔL_held/ΔL_train over [s - 0.1, s]."
    )
    for cell in sorted(out["cells"], key=lambda c: (c["best_phi"], c["task"], c["budget"])):
        rs = runs[(cell["task"], cell["budget"])]
        best = min(cell["phi_losses"].values())
        line = f"{cell['task']:21s} {cell['budget']:5d} best φ {cell['best_phi']:<5g}"
        for s in out["decide"]:
            finals = {
                phi: statistics.mean(r["finals"][f"{s:g}/{phi:g}"] for r in rs)
                for phi in out["continue"]
            }
            line += f" | s={s:g}: " + " ".join(
                f"{phi:g}:{100 * (v / best - 1):+.1f}" for phi, v in finals.items()
            )
            prev = round(s - 0.1, 2)
            r_med = statistics.median(
                math.log(r["heldout"][f"{prev:g}"]) - math.log(r["heldout"][f"{s:g}"]) for r in rs
            )
            big_r = statistics.median(_ratio(r, prev, s) for r in rs)
            line += f"  r={r_med:.3f} R={big_r:.2f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sweeps",
        nargs="+",
        default=[
            str(ROOT / "results" / "phi_sweep.json"),
            str(ROOT / "results" / "phi_sweep_holdout.json"),
        ],
    )
    parser.add_argument("--out", default=str(ROOT / "results" / "heldout_switch.json"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--analyse", action="store_true", help="only print the analysis of an existing --out file"
    )
    args = parser.parse_args()
    if args.analyse:
        analyse(json.loads(Path(args.out).read_text()))
        return
    cells = [c for f in args.sweeps for c in json.loads(Path(f).read_text())["cells"]]
    jobs = [(c["task"], c["budget"], c["peak_lr"], s) for c in cells for s in range(3)]
    # Longest first, so the pool does not end on one slow job.
    jobs.sort(key=lambda j: -j[1] * (4 if j[0] == "char_lm" else 1))
    with mp.get_context("spawn").Pool(args.workers) as pool:
        runs = pool.map(run, jobs, chunksize=1)
    cell_info = {
        (c["task"], c["budget"]): {
            "best_phi": c["best_phi"],
            "phi_losses": {
                k[4:]: v["heldout_loss_mean"]
                for k, v in c["schedules"].items()
                if k.startswith("phi=")
            },
        }
        for c in cells
    }
    out = {
        "command": "benchmarks/heldout_switch.py",
        "fractions": FRACS,
        "decide": DECIDE,
        "continue": CONTINUE,
        "cells": [{"task": t, "budget": b, **v} for (t, b), v in cell_info.items()],
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    analyse(out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
