r"""Exploratory: is the SGD noise floor, measured during a cosine run, what the best φ tracks?

For every cell of the φ sweep (task, budget, the cosine-tuned peak rate in
``benchmarks/results/phi_sweep.json``) and seeds 0-2, this trains with cosine and, at fractions
``s`` of the budget, measures on 8 fresh minibatches of the training batch size:

* ``trS``: :math:`\operatorname{tr}\Sigma_B`, the variance of a minibatch gradient
  (unbiased, over the 8 batches), ``g2`` the squared norm of their mean, ``loss`` their mean loss;
* the noise-floor ratio :math:`q = \eta_{\mathrm{eff}}\operatorname{tr}\Sigma_B / (4L)`, with
  :math:`\eta_{\mathrm{eff}} = \eta_t/(1-\beta)` the current rate over one minus the momentum. On a
  quadratic, SGD's stationary excess loss is about
  :math:`\eta_{\mathrm{eff}}\operatorname{tr}\Sigma_B/4`,
  so :math:`q \ll 1` means progress-limited (keep the rate high: small φ) and :math:`q \gtrsim 1`
  noise-limited (anneal: larger φ), if the loss :math:`L` stands in for the excess loss.

Nothing here feeds the library; the result is a finding in BENCHMARKS.md. Usage (about 2 minutes)::

    python benchmarks/noise_floor_probe.py [--out benchmarks/results/noise_floor.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uba_auto
from benchmarks.tasks import get_task
from benchmarks.train import gradient_stats

FRACS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
ROOT = Path(__file__).resolve().parent


def run_cell(cell: dict, seed: int) -> dict:
    task = get_task(cell["task"])
    budget, peak = cell["budget"], cell["peak_lr"]
    model = task.make_model(seed)
    model.train()
    opt = task.make_optimizer(model, peak)
    sched = uba_auto.BudgetScheduler(opt, budget - 1, schedule="cosine")
    at = {int(f * budget): f for f in FRACS}
    points = []
    for step, (xb, yb) in enumerate(itertools.islice(task.batches(seed), budget)):
        if step in at:
            # Fresh batches from a stream of their own, so training's stream is not consumed.
            probe = list(itertools.islice(task.batches(seed + 100 + step), 8))
            m = gradient_stats(task, model, probe)
            lr = opt.param_groups[0]["lr"]
            m.update(frac=at[step], step=step, lr=lr)
            m["q"] = lr / (1 - task.momentum) * m["trS"] / (4 * m["loss"])
            points.append(m)
        loss = task.loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(float(loss.detach())):
            break
    return {"task": task.name, "budget": budget, "seed": seed, "peak_lr": peak, "points": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "noise_floor.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    sweep = json.loads((ROOT / "results" / "phi_sweep.json").read_text())
    runs = []
    fracs = " ".join(map(str, FRACS))
    print(f"{'task':22s} {'budget':>6s}  best phi (within 1%)   median q at s = {fracs}")
    for cell in sweep["cells"]:
        sched = cell["schedules"]
        phis = [k for k in sched if k.startswith("phi=")]
        best = min(sched[k]["heldout_loss_mean"] for k in phis)
        ok = [k[4:] for k in phis if sched[k]["heldout_loss_mean"] <= 1.01 * best]
        cell_runs = [run_cell(cell, seed) for seed in range(3)]
        runs += cell_runs
        med = [
            sorted(r["points"][i]["q"] for r in cell_runs)[1]
            if all(len(r["points"]) > i for r in cell_runs)
            else float("nan")
            for i in range(len(FRACS))
        ]
        print(
            f"{cell['task']:22s} {cell['budget']:6d}  {','.join(ok):20s}  "
            + " ".join(f"{q:.3g}" for q in med),
            flush=True,
        )
    Path(args.out).write_text(json.dumps({"fractions": FRACS, "runs": runs}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
