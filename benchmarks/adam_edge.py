r"""Does AdamW run at its edge of stability on our transformer task? And how good is the
pre-training estimate of its preconditioner?

On ``gpt_adamw`` (``benchmarks/tasks.py``: a small GPT-style decoder on bytes of Python's docs,
AdamW β = (0.9, 0.95), weight decay 0.1 on matrices, 5 % linear warm-up, clipping at 1) this
trains cosine annealing at the task's peak rate and, every 10 % of the budget, measures the
sharpness AdamW sees: :math:`\lambda_{\max}(P^{-1/2} H P^{-1/2})` with :math:`P = \sqrt{\hat v}
+ \epsilon` read from the optimizer's state (``probe_curvature(..., optimizer=opt)``), on the same
four training batches every time. Cohen et al. (2022, "Adaptive gradient methods at the edge of
stability") find that it rises to Adam's stability threshold :math:`\ell/\eta_t`,
:math:`\ell = (2 + 2\beta_1)/(1 - \beta_1) = 38`, and hovers there; the table prints
:math:`\eta_t \lambda / \ell_t` (1 = at the edge; :math:`\ell_t` includes AdamW's
:math:`(1 - \eta_t w / 2)` factor, :func:`uba_auto.phi.optimizer_stability`).

Before the first step there is no state: ``probe_curvature`` estimates :math:`P` from the mean
squared per-batch gradients of the probe batches. The second table compares that estimate with
the real state after K steps: the median and 90th percentile over coordinates of
:math:`|\log_{10}(P_{est}/P_K)|`, the correlation of :math:`\log P`, and the sharpness of the
*initial* Hessian preconditioned by each (so only the preconditioner differs).

Run (about 2 minutes per seed on 2 idle cores)::

    python benchmarks/adam_edge.py --seeds 0 1 --out benchmarks/results/adamw_edge.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uba_auto
from benchmarks.tasks import get_task
from uba_auto.curvature import (
    HessianOperator,
    PreconditionedOperator,
    estimate_preconditioner,
    optimizer_param_names,
    preconditioner_from_state,
)

PROBE = dict(per_batch=False, trace=False, density=False, progress=False)
# The task clips the gradient norm: the pre-training estimate of P is told so (grad_clip), as a
# user passes their max_grad_norm; the unclipped estimate is measured beside it.


def _lanczos_top(op, steps: int, seed: int) -> float:
    gen = torch.Generator(device=op.device).manual_seed(seed)
    return float(uba_auto.lanczos(op, max_iters=steps, tol=1e-4, generator=gen).eigenvalues[-1])


def _compare(p_est: torch.Tensor, p_k: torch.Tensor) -> dict:
    logratio = (p_est.log10() - p_k.log10()).abs()
    a, b = p_est.log(), p_k.log()
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return {
        "median_abs_log10_ratio": float(logratio.median()),
        "p90_abs_log10_ratio": float(logratio.quantile(0.9)),
        "log_corr": corr,
        "median_ratio_est_over_state": float((p_est / p_k).median()),
    }


def run(seed: int, budget: int, peak: float, steps: int, checkpoints: tuple[int, ...]) -> dict:
    task = get_task("gpt_adamw")
    model = task.make_model(seed)
    model.train()
    opt = task.make_optimizer(model, peak)
    warmup = task.warmup_steps(budget)
    sched = uba_auto.UBAScheduler(opt, total_steps=budget - 1, phi=2.0, warmup_steps=warmup)
    stream = task.batches(seed)
    probe_batches = list(itertools.islice(task.batches(seed), task.probe_batches))
    probe = dict(PROBE, max_hvps=steps * len(probe_batches))
    stability = uba_auto.phi.optimizer_stability

    # The pre-training estimate: P estimated from the probe batches, sharpness and the share of
    # the limit at the peak rate (what auto_uba reports).
    t0 = time.perf_counter()
    est0 = uba_auto.probe_curvature(
        model, probe_batches, task.loss_fn, optimizer=opt, grad_clip=task.grad_clip, **probe
    )
    init_probe_s = time.perf_counter() - t0
    limit0 = stability(opt).limit
    model0 = copy.deepcopy(model)
    names = optimizer_param_names(model, opt)
    op_live = HessianOperator(model, probe_batches, task.loss_fn, params=names)
    pre_est = estimate_preconditioner(opt, model, op_live, grad_clip=task.grad_clip)
    pre_raw = estimate_preconditioner(opt, model, op_live)  # as if the loop did not clip
    p_est, p_raw = pre_est.diagonal, pre_raw.diagonal
    del op_live
    op0 = HessianOperator(model0, probe_batches, task.loss_fn, params=names)
    lam_est_h0 = _lanczos_top(PreconditionedOperator(op0, pre_est), steps, 0)
    lam_raw_h0 = _lanczos_top(PreconditionedOperator(op0, pre_raw), steps, 0)

    along, compare = [], []
    every = max(1, budget // 10)
    step_times = []
    for step, (xb, yb) in enumerate(itertools.islice(stream, budget), start=1):
        t1 = time.perf_counter()
        loss = task.loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if task.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), task.grad_clip)
        opt.step()
        sched.step()
        step_times.append(time.perf_counter() - t1)
        if step in checkpoints:
            op_k = HessianOperator(model, probe_batches, task.loss_fn, params=names)
            pre_k = preconditioner_from_state(opt, model, op_k)
            del op_k
            lam_k_h0 = _lanczos_top(PreconditionedOperator(op0, pre_k), steps, 0)
            compare.append(
                {
                    "K": step,
                    **_compare(p_est, pre_k.diagonal),
                    "unclipped": _compare(p_raw, pre_k.diagonal),
                    "sharpness_H0_with_estimate": lam_est_h0,
                    "sharpness_H0_with_unclipped_estimate": lam_raw_h0,
                    "sharpness_H0_with_state_K": lam_k_h0,
                }
            )
        if step % every == 0 or step == budget - 1:
            eta = opt.param_groups[0]["lr"]  # the decayed group: every group has the same lr
            est = uba_auto.probe_curvature(
                model, probe_batches, task.loss_fn, optimizer=opt, **probe
            )
            # The limit of the *current* rate: AdamW's decoupled decay enters with eta_t (at
            # eta_t = 0 the share is 0 whatever the limit).
            limit_t = stability(opt).limit_at(eta) if eta > 0 else stability(opt).limit
            along.append(
                {
                    "step": step,
                    "fraction": step / budget,
                    "lr": eta,
                    "sharpness": est.lambda_max,
                    "edge_sharpness": limit_t / eta if eta > 0 else math.inf,
                    "share_of_edge": eta * est.lambda_max / limit_t,
                    "train_loss": float(loss.detach()),
                }
            )
            print(
                f"  seed {seed} step {step:5d}: lr {eta:.3g}, sharpness {est.lambda_max:.4g}, "
                f"38-edge {limit_t / eta if eta > 0 else math.inf:.4g}, "
                f"share {eta * est.lambda_max / limit_t:.3f}",
                flush=True,
            )
    step_s = statistics.median(step_times)
    return {
        "seed": seed,
        "budget": budget,
        "peak_lr": peak,
        "warmup_steps": warmup,
        "init": {
            "sharpness": est0.lambda_max,
            "preconditioner": est0.preconditioner,
            "limit": limit0,
            "share_at_peak": peak * est0.lambda_max / limit0,
            "probe_s": init_probe_s,
            "probe_hvps": est0.num_hvps,
        },
        "along": along,
        "estimate_vs_state": compare,
        "median_step_s": step_s,
    }


def _finite(obj):
    """``obj`` with inf and NaN as ``None`` (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--peak", type=float, default=None, help="default: the task's base_lr")
    parser.add_argument("--steps", type=int, default=20, help="Lanczos steps per probe")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    task = get_task("gpt_adamw")
    peak = args.peak if args.peak is not None else task.base_lr[args.budget]
    checkpoints = tuple(k for k in (1, 10, 50, 100, args.budget // 2) if k < args.budget)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    runs = [run(s, args.budget, peak, args.steps, checkpoints) for s in args.seeds]
    # The share of the limit at which each budget's cosine-tuned peak sits at initialisation, for
    # benchmarks/suggest_share.py (the sharpness at init does not depend on the peak rate).
    suggest_cells = []
    reference = uba_auto.phi.optimizer_stability(task.make_optimizer(task.make_model(0), peak))
    for b, tuned in sorted(task.base_lr.items()):
        limit = reference.limit_at(tuned)
        shares = [tuned * r["init"]["sharpness"] / limit for r in runs]
        suggest_cells.append(
            {
                "task": task.name,
                "budget": b,
                "optimizer": "AdamW(0.9, 0.95), wd 0.1",
                "tuned_peak": tuned,
                "share": math.exp(statistics.fmean(math.log(e) for e in shares)),
            }
        )
    out = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}",
        "wall_s": time.perf_counter() - t0,
        "task": task.summary(),
        "runs": runs,
        "suggest_cells": suggest_cells,
    }
    print()
    print(
        "| step | fraction | lr | sharpness AdamW sees (median over seeds) | 38-edge ℓ_t/η_t |"
        " η_t·λ/ℓ_t (1 = edge) |"
    )
    print("|---|---|---|---|---|---|")
    for i, row in enumerate(runs[0]["along"]):
        rows = [r["along"][i] for r in runs]
        lam = statistics.median(r["sharpness"] for r in rows)
        share = statistics.median(r["share_of_edge"] for r in rows)
        print(
            f"| {row['step']} | {row['fraction']:.2f} | {row['lr']:.3g} | {lam:.4g} | "
            f"{row['edge_sharpness']:.4g} | {share:.3f} |"
        )
    print()
    print("pre-training estimate (P estimated from the probe batches):")
    for r in runs:
        i = r["init"]
        print(
            f"  seed {r['seed']}: sharpness {i['sharpness']:.4g}, share of the limit at the "
            f"peak {i['share_at_peak']:.3g}, {i['probe_hvps']} HVPs in {i['probe_s']:.1f} s "
            f"(a training step: {r['median_step_s'] * 1e3:.0f} ms)"
        )
    print()
    print(
        "| K | median abs log10(P_est/P_K) | p90 | corr(log P) | median P_est/P_K (unclipped "
        "estimate) | sharpness of H_0 with P_est (unclipped) | with P_K |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, row in enumerate(runs[0]["estimate_vs_state"]):
        rows = [r["estimate_vs_state"][i] for r in runs]

        def med(key, rows=rows):
            return statistics.median(r[key] for r in rows)

        print(
            f"| {row['K']} | {med('median_abs_log10_ratio'):.3g} | "
            f"{med('p90_abs_log10_ratio'):.3g} | {med('log_corr'):.3f} | "
            f"{med('median_ratio_est_over_state'):.3g} "
            f"({statistics.median(r['unclipped']['median_ratio_est_over_state'] for r in rows):.3g}"
            ")"
            f" | {med('sharpness_H0_with_estimate'):.4g} "
            f"({med('sharpness_H0_with_unclipped_estimate'):.4g}) | "
            f"{med('sharpness_H0_with_state_K'):.4g} |"
        )
    print()
    for c in suggest_cells:
        print(
            f"budget {c['budget']}: tuned peak {c['tuned_peak']:.3g} sits at {c['share']:.3g} of "
            "AdamW's limit at initialisation (geometric mean over seeds)"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(_finite(out), indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
