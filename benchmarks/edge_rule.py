r"""Exploratory, pre-registered: does a peak rate far below the stability edge call for a small φ?

On the five calibration tasks the three minibatch cells whose best φ is below 2 were also the three
whose cosine-tuned peak sat furthest below the stability edge at initialisation,
:math:`e = \eta\lambda_{\max}/(2(1+\beta))` (heavy-ball SGD is stable for
:math:`\eta\lambda < 2(1+\beta)`):
:math:`e \le 0.030` for them, :math:`e \ge 0.048` for the others. Before the out-of-sample tasks
(``diabetes_mlp``, ``digits_logreg``) were swept, the rule was fixed as

    φ = min(φ_gated, 1 if e < 0.038 else 2),   0.038 = the geometric midpoint of 0.030 and 0.048,

with :math:`\lambda_{\max}` probed at initialisation on the run's first 8 minibatches (as
``auto_uba`` does) and φ_gated the default link. This script scores that rule on every cell of both
sweeps from the sweep's own per-seed runs at fixed φ (the rule picks a φ of the grid, so nothing is
retrained): held-out loss, mean over seeds, against the best fixed φ and against cosine. Nothing
here feeds the library; the result is a finding in BENCHMARKS.md.

Usage (about 20 seconds)::

    python benchmarks/edge_rule.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uba_auto
from benchmarks.tasks import HOLDOUT_TASK_NAMES, get_task
from benchmarks.train import init_batches, probe_at_init

EDGE = 0.038
LOW_PHI = 1.0
ROOT = Path(__file__).resolve().parent
SWEEPS = ("phi_sweep.json", "phi_sweep_holdout.json")


def main() -> None:
    torch.set_num_threads(1)
    cells = [c for f in SWEEPS for c in json.loads((ROOT / "results" / f).read_text())["cells"]]
    probes: dict[tuple, uba_auto.CurvatureEstimate] = {}
    print(
        f"rule: phi = min(phi_gated, {LOW_PHI:g} if e < {EDGE} else 2), "
        "e = peak_lr * lambda_max / (2 (1 + momentum)) at init"
    )
    print(
        f"{'task':21s} {'budget':>6s} {'set':8s} {'e (per seed)':22s} {'rule φ':10s} best φ "
        " rule vs best  rule vs cosine"
    )
    scores = {"in-sample": [0, 0, 0], "out-of-sample": [0, 0, 0]}
    for cell in cells:
        task = get_task(cell["task"])
        budget, peak = cell["budget"], cell["peak_lr"]
        edges, phis, losses = [], [], []
        for seed in range(3):
            if (task.name, seed) not in probes:
                probes[(task.name, seed)] = probe_at_init(
                    task,
                    seed,
                    len(init_batches(task, seed, 8)),
                    dtype=None,
                    density=False,
                    per_batch=False,
                    trace=False,
                    process_group=None,
                )
            est = probes[(task.name, seed)]
            e = peak * est.lambda_max / (2 * (1 + task.momentum))
            gated = uba_auto.choose_phi(est, peak_lr=peak, budget=budget).phi
            phi = min(gated, LOW_PHI if e < EDGE else 2.0)
            # The sweep ran only the grid; the gated link gives 0.25 or 2 here, both on it.
            run = next(r for r in cell["runs"][f"phi={phi:g}"] if r["seed"] == seed)
            edges.append(e)
            phis.append(phi)
            losses.append(run["final_heldout_loss"])
        rule = statistics.mean(losses)
        best = min(
            v["heldout_loss_mean"] for k, v in cell["schedules"].items() if k.startswith("phi=")
        )
        cosine = cell["schedules"]["cosine"]["heldout_loss_mean"]
        vs_best, vs_cos = 100 * (rule / best - 1), 100 * (rule / cosine - 1)
        split = "out-of-sample" if task.name in HOLDOUT_TASK_NAMES else "in-sample"
        scores[split][0] += vs_best <= 1.0
        scores[split][1] += vs_cos <= 1.0
        scores[split][2] += 1
        print(
            f"{task.name:21s} {budget:6d} {split[:8]:8s} "
            f"{', '.join(f'{e:.3g}' for e in edges):22s} {', '.join(f'{p:g}' for p in phis):10s} "
            f"{cell['best_phi']:<6g} {vs_best:+11.2f}% {vs_cos:+13.2f}%"
        )
    for split, (within, safe, num) in scores.items():
        print(
            f"{split}: within 1% of the best fixed φ in {within}/{num} cells, "
            f"not worse than cosine by > 1% in {safe}/{num}"
        )


if __name__ == "__main__":
    main()
