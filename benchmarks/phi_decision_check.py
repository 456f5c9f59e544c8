"""Does the budgeted default probe choose the φ the study's validation chose? (issue 13)

    python benchmarks/phi_decision_check.py [--links gated] [--budget-steps N]

For every run of ``benchmarks/results/phi_validation.json`` (task, budget, seed, link) it probes
the same freshly built model on the same first 8 minibatches with ``auto_uba``'s current
defaults (the probe planned inside ``probe_fraction`` of the run's budget) and compares the φ
chosen with the one stored. An identical φ means an identical training run, so the validation's
held-out losses carry over unchanged. Prints every cell, the HVPs spent and the share of the
budget in gradient-equivalents; writes ``benchmarks/results/phi_decision_check.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uba_auto
from benchmarks.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", nargs="+", default=["gated"])
    parser.add_argument("--num-batches", type=int, default=8, help="batches probed (default 8)")
    parser.add_argument("--out", default="benchmarks/results/phi_decision_check.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = json.loads(Path("benchmarks/results/phi_validation.json").read_text())["runs"]
    rows = []
    for r in runs:
        if r["link"] not in args.links:
            continue
        task = get_task(r["task"])
        model = task.make_model(r["seed"])
        model.train()
        batches = list(itertools.islice(task.batches(r["seed"]), args.num_batches))
        # The gated link does not read the peak rate; the sweep's centre stands in for it.
        opt = task.make_optimizer(model, task.base_lr[r["budget"]])
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            auto = uba_auto.auto_uba(
                model,
                batches,
                r["budget"],
                optimizer=opt,
                loss_fn=task.loss_fn,
                num_batches=args.num_batches,
                link=r["link"],
                progress=False,
                seed=r["seed"],
            )
        est = auto.report.estimate
        row = dict(
            task=r["task"],
            budget=r["budget"],
            seed=r["seed"],
            link=r["link"],
            stored_phi=r["phi"],
            phi=auto.phi,
            hvps=est.num_hvps,
            old_hvps=r.get("hvps"),
            decision_steps=est.decision_steps,
            share=auto.probe_cost_fraction,
            noise=est.curvature_noise,
        )
        rows.append(row)
        same = "same" if abs(row["phi"] - row["stored_phi"]) < 1e-9 else "DIFFERENT"
        print(
            f"{row['task']:22s} {row['budget']:5d} s{row['seed']} {row['link']:10s} "
            f"phi {row['phi']:.4g} (stored {row['stored_phi']:.4g}, {same}); "
            f"{row['hvps']} HVPs (was {row['old_hvps']}), decision at step "
            f"{row['decision_steps']}, {100 * row['share']:.1f}% of the budget",
            flush=True,
        )
    n_same = sum(abs(r["phi"] - r["stored_phi"]) < 1e-9 for r in rows)
    print(f"\nphi identical in {n_same} of {len(rows)} runs")
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
