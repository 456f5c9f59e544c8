r"""Exploratory: does a noisy quadratic model, fed the curvature at init, predict the best φ?

The Chebyshev link (φ = 2κ) is the worst case of noise-free gradient descent on a quadratic. Its
average-case, noisy counterpart is the noisy quadratic model (NQM; Zhang et al. 2019, "Which
algorithmic choices matter at which batch sizes?"): SGD with momentum β on
:math:`\tfrac12\sum_i \lambda_i x_i^2` with gradient noise of covariance :math:`c H`. For one
eigen-direction, with :math:`v_{t+1} = \beta v_t + \lambda x_t + \xi_t` and
:math:`x_{t+1} = x_t - \eta_t v_{t+1}` (PyTorch's SGD), the second moments
:math:`(E x^2, E xv, E v^2)` follow an exact linear recursion, so the expected loss after the budget
is computable for any schedule. This script reads everything the model needs from a probe at
initialisation, on the first 8 minibatches of each run (as ``auto_uba`` does):

* the spectrum: the SLQ density's nodes and weights (positive part), times the number of parameters;
* the noise scale :math:`c = \operatorname{tr}\Sigma_B / \operatorname{tr} H`, with
  :math:`\operatorname{tr}\Sigma_B` the unbiased variance of the 8 minibatch gradients;
* the initial distance, isotropic: ``G``: :math:`e^2 = \|\bar g\|^2/\operatorname{tr}H^2` (from
  the mean gradient, debiased), or ``L``: :math:`e^2 = 2L_0/\operatorname{tr}H` (the initial loss
  taken as all excess);

and picks the φ of the sweep's grid with the lowest predicted loss at the cell's cosine-tuned peak.
It is scored against the sweep's measured held-out losses (% over the best fixed φ, mean over the
seeds' picks). Nothing here feeds the library; the result is a finding in BENCHMARKS.md.

Usage (about 1 minute)::

    python benchmarks/nqm_link_probe.py [--out benchmarks/results/nqm_link.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uba_auto
from benchmarks.tasks import get_task
from benchmarks.train import gradient_stats, init_batches, probe_at_init

PHIS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
ROOT = Path(__file__).resolve().parent
SWEEPS = ("phi_sweep.json", "phi_sweep_holdout.json")


def nqm_excess_loss(
    lam: np.ndarray, weight: np.ndarray, c: float, e2: float, lrs: np.ndarray, beta: float
) -> np.ndarray:
    r"""Expected final excess loss :math:`\sum_k w_k \lambda_k E[x_k^2]/2` for each row of ``lrs``.

    ``lam``/``weight``: eigenvalues (> 0) and their multiplicities; ``lrs``: ``(P, T)`` schedules.
    """
    lam = lam[None, :]
    xx = np.full((lrs.shape[0], lam.shape[1]), e2)
    xv = np.zeros_like(xx)
    vv = np.zeros_like(xx)
    for t in range(lrs.shape[1]):
        eta = lrs[:, t : t + 1]
        x_v_next = beta * xv + lam * xx  # E[x v'] with v' = βv + λx + ξ
        vv = beta * beta * vv + 2 * beta * lam * xv + lam * lam * xx + c * lam
        xx = xx - 2 * eta * x_v_next + eta * eta * vv
        xv = x_v_next - eta * vv
    return (weight[None, :] * lam * xx / 2).sum(axis=1)


def probe(task, seed: int) -> dict:
    batches = init_batches(task, seed, 8)
    est = probe_at_init(
        task, seed, len(batches), dtype=None, per_batch=False, trace=False, process_group=None
    )
    model = task.make_model(seed)
    model.train()
    stats = gradient_stats(task, model, batches)
    density = est.density
    nodes = density.nodes.numpy().ravel()
    weights = density.weights.numpy().ravel() * density.size / density.num_probes
    keep = nodes > 0
    return {
        "lam": nodes[keep],
        "weight": weights[keep],
        "tr_sigma": stats["trS"],
        "mean_grad_sq": max(stats["g2"] - stats["trS"] / len(batches), 1e-12),
        "loss": stats["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "nqm_link.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cells = [c for f in SWEEPS for c in json.loads((ROOT / "results" / f).read_text())["cells"]]
    probes: dict[tuple, dict] = {}
    rows = []
    print(f"{'task':21s} {'budget':>6s} best φ | NQM pick per seed (% over best fixed φ): G, L")
    for cell in cells:
        task = get_task(cell["task"])
        budget, peak = cell["budget"], cell["peak_lr"]
        lrs = np.stack(
            [uba_auto.uba_lr(np.arange(budget), budget - 1, phi=p, lr_max=peak) for p in PHIS]
        )
        picks: dict[str, list[float]] = {"G": [], "L": []}
        for seed in range(3):
            if (task.name, seed) not in probes:
                probes[(task.name, seed)] = probe(task, seed)
            p = probes[(task.name, seed)]
            tr_h = float((p["weight"] * p["lam"]).sum())
            tr_h2 = float((p["weight"] * p["lam"] ** 2).sum())
            c = p["tr_sigma"] / tr_h
            for variant, e2 in (("G", p["mean_grad_sq"] / tr_h2), ("L", 2 * p["loss"] / tr_h)):
                pred = nqm_excess_loss(p["lam"], p["weight"], c, e2, lrs, task.momentum)
                pred = np.where(np.isfinite(pred), pred, np.inf)
                picks[variant].append(PHIS[int(np.argmin(pred))])
        losses = {
            k[4:]: v["heldout_loss_mean"]
            for k, v in cell["schedules"].items()
            if k.startswith("phi=")
        }
        best = min(losses.values())
        regret = {
            v: float(np.mean([100 * (losses[f"{phi:g}"] / best - 1) for phi in ph]))
            for v, ph in picks.items()
        }
        rows.append(
            {
                "task": task.name,
                "budget": budget,
                "best_phi": cell["best_phi"],
                "picks": picks,
                "regret_pct": regret,
            }
        )
        print(
            f"{task.name:21s} {budget:6d} {cell['best_phi']:<5g} | "
            + "  ".join(
                f"{v}: {','.join(f'{x:g}' for x in picks[v])} ({regret[v]:+.2f}%)" for v in picks
            ),
            flush=True,
        )
    for v in ("G", "L"):
        within = sum(r["regret_pct"][v] <= 1.0 for r in rows)
        print(f"variant {v}: within 1% of the best fixed φ in {within}/{len(rows)} cells")
    Path(args.out).write_text(
        json.dumps(
            {"command": "benchmarks/nqm_link_probe.py", "phis": PHIS, "cells": rows}, indent=1
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
