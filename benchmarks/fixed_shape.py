"""Is the validation rules' gain their schedule's shape? A fixed hold-then-cosine run, no checks.

    python benchmarks/fixed_shape.py [--fraction 0.6] [--out benchmarks/results/fixed_shape.json]

The plateau rule holds the peak rate and switches to a cosine from the current rate at its first
plateau (20-47 % of the budget on the fourth held-out set); the trend rule starts on cosine and,
where it holds, holds from 40 %. Where they beat every fixed φ (``resmlp_bn_sgd`` at 400 steps:
the plateau rule 2-4 % below cosine on every seed with its checks charged, every fixed φ < 2 above
it), is that the signal or the shape? UBA's family cannot hold the rate for 40 % of the budget and
then anneal it like a cosine over the remaining 60 %: a small φ drops late and fast. This script
runs the signal-free version of that shape, WSD with a cosine cool-down over the last
``--fraction`` of the decay phase (``wsd60cos``: the peak until 40 %, then a cosine to
``lr_min``), beside cosine (both fresh, side by side), on every stored cell of the held-out
sets at its stored cosine-tuned peak, 3 seeds, scored as each set was: the test half
(``plateau_rule.split_heldout``) for the held-out sets, the held-out loss for the calibration
cells. It also prints the stored rule runs of the same cells (their checks not charged) and the
best fixed φ of each grid. No check is made and none is charged: the shape costs nothing.

An exploration, not a pre-registered test: every cell here has been seen by the rules' fits or
tests.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import plateau_rule as PR  # noqa: E402
from benchmarks import tasks as T  # noqa: E402
from benchmarks.train import ScheduleSpec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HELDOUT_SETS = {
    "first (rerun here)": RESULTS / "plateau_heldout_rerun.json",
    "GPT at 1000 steps": RESULTS / "plateau_heldout_gpt1000.json",
    "second": RESULTS / "plateau_heldout_hold_test.json",
    "third": RESULTS / "trend" / "test.json",
    "fourth": RESULTS / "trend" / "test30.json",
}
"""Stored held-out sets: cells with a tuned peak, a φ grid on the test half and rule runs."""
CALIBRATION = RESULTS / "plateau_calibration.json"
"""The plateau rule's 19 calibration cells (held-out loss; the grid from the wide sweeps)."""


def _job(args: tuple) -> dict:
    name, spec, budget, seed, peak = args
    torch.set_num_threads(1)
    run = PR.run_one(T.get_task(name), spec, budget, seed, peak, val_batches=8)
    keep = ("task", "budget", "seed", "label", "final_test_loss", "final_heldout_loss", "diverged")
    return {k: run.get(k) for k in keep}


def _paired(a: list[float | None], b: list[float | None]) -> float | None:
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if len(pairs) < len(a) or any(not (math.isfinite(x) and math.isfinite(y)) for x, y in pairs):
        return None
    return statistics.fmean((x - y) / y for x, y in pairs)


def _stored_cells() -> list[dict]:
    cells = []
    for set_name, path in HELDOUT_SETS.items():
        for c in json.loads(path.read_text())["cells"]:
            grid = {
                label: [r.get("final_test_loss") for r in runs]
                for label, runs in c["grid_runs"].items()
            }
            rule = [r.get("final_test_loss") for r in c["rule_runs"]]
            cells.append(
                {
                    "set": set_name,
                    "task": c["task"],
                    "budget": c["budget"],
                    "peak": c["peak_lr"],
                    "key": "final_test_loss",
                    "grid": grid,
                    "rule": rule,
                }
            )
    for c in json.loads(CALIBRATION.read_text())["cells"]:
        summary = c["heldout"]
        cells.append(
            {
                "set": "calibration",
                "task": c["task"],
                "budget": c["budget"],
                "peak": c["peak_lr"],
                "key": "final_heldout_loss",
                "grid": {},
                "rule_vs_cosine": summary["rule_vs_cosine"],
                "best_vs_cosine": summary["best_vs_cosine"],
            }
        )
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.6, help="the cool-down's share")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--sets", nargs="*", default=None, help="only these sets (names above)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=RESULTS / "fixed_shape.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    shape = ScheduleSpec("wsd", decay_fraction=args.fraction, decay_shape="cosine")
    cosine = ScheduleSpec("uba", phi=2.0)
    cells = [c for c in _stored_cells() if args.sets is None or c["set"] in args.sets]
    jobs = [
        (c["task"], spec, c["budget"], seed, c["peak"])
        for c in cells
        for spec in (cosine, shape)
        for seed in args.seeds
    ]
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        runs = pool.map(_job, jobs, chunksize=1)
    rows = []
    print(
        f"{'set':>18} {'cell':>28}  {shape.label} vs cosine (fresh, paired)   stored: rule vs "
        "cosine (uncharged), best fixed φ vs cosine, cosine fresh vs stored"
    )
    for c in cells:
        mine = [
            r
            for r in runs
            if r["task"] == c["task"] and r["budget"] == c["budget"] and r["seed"] in args.seeds
        ]
        key = c["key"]
        by = {lab: [r[key] for r in mine if r["label"] == lab] for lab in ("phi=2", shape.label)}
        cos_stored = c["grid"].get("phi=2")
        if cos_stored:
            fixed = [_paired(v, cos_stored) for lab, v in c["grid"].items() if lab != "phi=2"]
            stored_rule = _paired(c["rule"], cos_stored)
            stored_best = min((v for v in fixed if v is not None), default=None)
        else:  # calibration: the stored summary (its grid is the wide sweeps')
            stored_rule, stored_best = c["rule_vs_cosine"], c["best_vs_cosine"]
        row = {
            "set": c["set"],
            "task": c["task"],
            "budget": c["budget"],
            "peak_lr": c["peak"],
            "score": key,
            "cosine": by["phi=2"],
            shape.label: by[shape.label],
            "shape_vs_cosine": _paired(by[shape.label], by["phi=2"]),
            "rule_vs_cosine_stored": stored_rule,
            "best_fixed_vs_cosine_stored": stored_best,
            "cosine_fresh_vs_stored": _paired(by["phi=2"], cos_stored) if cos_stored else None,
        }
        rows.append(row)

        def pct(x: float | None) -> str:
            return "   n/a " if x is None else f"{100 * x:+6.2f} %"

        print(
            f"{c['set']:>18} {c['task'] + '/' + str(c['budget']):>28}  "
            f"{pct(row['shape_vs_cosine']):>10}   {pct(row['rule_vs_cosine_stored'])}  "
            f"{pct(row['best_fixed_vs_cosine_stored'])}  {pct(row['cosine_fresh_vs_stored'])}",
            flush=True,
        )
    for group in [*HELDOUT_SETS, "calibration"]:
        if not any(r["set"] == group for r in rows):
            continue
        vals = [r["shape_vs_cosine"] for r in rows if r["set"] == group]
        finite = [v for v in vals if v is not None]
        worse = sum(v > 0.01 for v in finite) + sum(v is None for v in vals)
        mean = statistics.fmean(finite) if finite else math.nan
        print(
            f"{group}: {shape.label} worse than cosine by > 1 % in {worse} of {len(vals)} cells "
            f"(a diverged seed counts as worse), mean {100 * mean:+.2f} % over the finite ones"
        )
    out = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "python " + " ".join(sys.argv),
        "schedule": shape.label,
        "seeds": args.seeds,
        "wall_time_s": time.perf_counter() - start,
        "rows": rows,
    }
    args.out.write_text(json.dumps(out, indent=1, default=lambda v: None))
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
