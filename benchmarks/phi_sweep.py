r"""Sweep the UBA shape φ against the baselines on the task suite, with the curvature at init.

For each task and each of its two budgets:

1. the peak rate is tuned **for cosine**: ``task.base_lr[budget]`` × {0.25, 0.5, 1, 2, 4}, the
   one with the lowest final held-out loss (mean over seeds) wins;
2. at that peak, UBA with φ in {0.25, 0.5, 1, 2, 4, 8, 16} and the baselines linear, step and WSD
   run for every seed (cosine's runs are those of step 1 at the chosen peak; UBA φ = 2 is the same
   schedule run again through :class:`uba_auto.UBAScheduler`, a consistency check);
3. unless ``--no-joint``: every φ ≠ 2 at the other four peak rates too, so that the best
   (peak rate, φ) pair is known and the best φ at the cosine-tuned peak can be told apart from a
   correction of the ×2 grid's rounding of the peak rate (φ = 2 at every rate is the cosine run);
4. the curvature at initialisation is probed once per task and seed (it does not depend on the
   budget or the rate) and combined with the cell's peak rate and budget into the quantities a
   φ mapping could use:

   * :math:`\eta\lambda_{\max}` and :math:`1/(\eta T)` (also with :math:`\eta_{\rm eff} =
     \eta/(1-\beta)` for momentum :math:`\beta`);
   * the resolvable band :math:`\kappa_T = \lambda_{\max} / \max(\lambda_{\rm floor}, 1/(\eta T))`
     for the floors: none (0), the smallest positive Ritz value, the mean eigenvalue
     (trace / number of parameters), and quantiles of :math:`|\lambda|` under the SLQ density.

Density quantiles: ``lambda_q*`` are quantiles of the signed eigenvalue distribution
(:meth:`uba_auto.SpectralDensity.quantile`), ``abs_lambda_q*`` quantiles of :math:`|\lambda|`
(computed here from the same quadrature nodes and weights).

Runs go to a pool of worker processes (one torch thread each). Results: one JSON file (``--out``)
and a table per task × budget on stdout, then a summary with the Spearman rank correlation between
the best φ and each candidate quantity across the cells.

Usage::

    python benchmarks/phi_sweep.py [--tasks ...] [--seeds 0 1 2] [--quick] \
        --out benchmarks/results/phi_sweep.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import uba_auto  # noqa: E402
from benchmarks.tasks import (  # noqa: E402
    HOLD_TEST_TASK_NAMES,
    HOLDOUT_TASK_NAMES,
    REPRESENTATIVE_TASK_NAMES,
    TASK_NAMES,
    TREND_TEST_TASK_NAMES,
    get_task,
)
from benchmarks.train import ScheduleSpec, probe_at_init, train  # noqa: E402

LR_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
PHIS = (1 / 32, 1 / 16, 1 / 8, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
"""The φ grid (``--phis`` overrides it): powers of two from 1/32, UBA's "hold, then drop" end,
to 16. Sweeps stored before 2026-12-02 used 0.25 ... 16."""
BASELINES = ("cosine", "linear", "step", "wsd", "wsd10")
"""``wsd``: a 20 % linear cool-down (the schedule's default); ``wsd10``: 10 %."""
_BASELINE_SPECS = {
    "cosine": ScheduleSpec("cosine"),
    "linear": ScheduleSpec("linear"),
    "step": ScheduleSpec("step"),
    "wsd": ScheduleSpec("wsd"),
    "wsd10": ScheduleSpec("wsd", decay_fraction=0.1),
}
QUANTILES = (0.5, 0.9, 0.99)
# A cell counts as over-fitting when its held-out loss (cosine at the tuned peak, mean curve over
# seeds) ends this much above its minimum along the run.
OVERFIT_RISE = 0.01


# --------------------------------------------------------------------------------------------------
# Jobs (run in the workers)


def _init_worker() -> None:
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def _run_job(job: tuple) -> tuple[tuple, dict, float]:
    start = time.perf_counter()
    if job[0] == "probe":
        _, name, seed = job
        out = _probe_record(name, seed)
    else:
        _, name, budget, seed, peak_lr, spec = job
        out = train(get_task(name), spec, budget, seed, peak_lr).to_dict()
    return job, out, time.perf_counter() - start


def _abs_quantile(density: uba_auto.SpectralDensity, q: float) -> float:
    """The ``q``-quantile of :math:`|\\lambda|` under the SLQ quadrature (same rule as
    :meth:`uba_auto.SpectralDensity.quantile`, applied to the absolute nodes)."""
    nodes = density.nodes.flatten().abs()
    weights = density.weights.flatten()
    order = torch.argsort(nodes)
    cdf = torch.cumsum(weights[order], dim=0)
    cdf = cdf / cdf[-1]
    pos = int(torch.searchsorted(cdf, torch.tensor([q], dtype=cdf.dtype))[0])
    return float(nodes[order][min(pos, nodes.numel() - 1)])


def _probe_record(name: str, seed: int) -> dict:
    task = get_task(name)
    est = probe_at_init(task, seed)
    rec = {
        "lambda_max": est.lambda_max,
        "lambda_min": est.lambda_min,
        "lambda_min_positive": est.lambda_min_positive,
        "trace": est.trace,
        "trace_std_error": est.trace_std_error,
        "num_params": est.num_params,
        "lambda_max_spread": est.lambda_max_spread,
        "lambda_max_per_batch": list(est.lambda_max_per_batch),
        "lambda_min_spread": est.lambda_min_spread,
        # std over batches of v'H_b v along the top eigenvector v, over lambda_max (newer probes).
        "curvature_noise": getattr(est, "curvature_noise", None),
        "top_curvature_per_batch": list(getattr(est, "top_curvature_per_batch", ())),
        "negative_mass": est.negative_mass,
        "num_hvps": est.num_hvps,
        "hvps": est.hvps,
        "wall_time_s": est.wall_time_s,
        "time_s": est.time_s,
        "converged": est.converged,
        "warnings": list(est.warnings),
        "num_batches": est.num_batches,
        "dtype": est.dtype,
        "density_nodes": est.density.nodes.tolist(),
        "density_weights": est.density.weights.tolist(),
    }
    for q in QUANTILES:
        rec[f"lambda_q{q:g}"] = est.density.quantile(q)
        rec[f"abs_lambda_q{q:g}"] = _abs_quantile(est.density, q)
    return rec


# --------------------------------------------------------------------------------------------------
# Pool


def _expected_cost(job: tuple) -> float:
    # Longest first keeps both workers busy until the end; probes of big models cost ~10 s.
    if job[0] == "probe":
        return 10.0 * get_task(job[1]).summary()["num_params"] / 3e5
    return float(job[2])


def _run_all(jobs: list[tuple], workers: int, what: str) -> dict[tuple, dict]:
    jobs = sorted(jobs, key=_expected_cost, reverse=True)
    results: dict[tuple, dict] = {}
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        for i, (job, out, seconds) in enumerate(pool.imap_unordered(_run_job, jobs), start=1):
            out["job_seconds"] = seconds
            results[job] = out
            if i % 25 == 0 or i == len(jobs):
                print(
                    f"  [{what}] {i}/{len(jobs)} jobs, {time.perf_counter() - start:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return results


# --------------------------------------------------------------------------------------------------
# Analysis


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        return math.inf, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _heldout(run: dict) -> float:
    v = run["final_heldout_loss"]
    return math.inf if v is None else v


def _summarise_runs(runs: list[dict]) -> dict:
    held = [_heldout(r) for r in runs]
    train_l = [math.inf if r["final_train_loss"] is None else r["final_train_loss"] for r in runs]
    mean, std = _mean_std(held)
    tmean, tstd = _mean_std(train_l)
    acc = [r["final_heldout_accuracy"] for r in runs if r["final_heldout_accuracy"] is not None]
    return {
        "heldout_loss_mean": mean,
        "heldout_loss_std": std,
        "heldout_loss_per_seed": held,
        "train_loss_mean": tmean,
        "train_loss_std": tstd,
        "heldout_accuracy_mean": float(np.mean(acc)) if len(acc) == len(runs) else None,
        "num_diverged": sum(bool(r["diverged"]) for r in runs),
    }


def _interpolated_best_phi(means: list[float]) -> float:
    """Vertex of the parabola in log2(φ) through the grid minimum and its neighbours (the grid
    minimum itself at an edge of the grid or when the three points are not convex)."""
    i = int(np.argmin(means))
    if i == 0 or i == len(PHIS) - 1 or not all(math.isfinite(m) for m in means[i - 1 : i + 2]):
        return PHIS[i]
    y0, y1, y2 = means[i - 1 : i + 2]
    curvature = y0 - 2 * y1 + y2  # grid step is 1 in log2(φ)
    if curvature <= 0:
        return PHIS[i]
    offset = 0.5 * (y0 - y2) / curvature
    return float(2.0 ** (math.log2(PHIS[i]) + max(-1.0, min(1.0, offset))))


def _rise(runs: list[dict]) -> tuple[float, float]:
    """Relative rise of the final held-out loss above the minimum of the seed-mean held-out curve
    (smoothed by a centred 5-point moving average, so that the minimum of a noisy curve is not
    biased low), and where that minimum is (fraction of the run); ``nan`` when a run diverged."""
    if any(r["diverged"] for r in runs):
        return math.nan, math.nan
    curve = np.mean([r["curve_heldout_loss"] for r in runs], axis=0)
    smooth = np.convolve(curve, np.ones(5) / 5, mode="valid") if curve.size >= 5 else curve
    i_min = int(np.argmin(smooth)) + (curve.size - smooth.size) // 2
    steps = runs[0]["curve_steps"]
    return float(max(0.0, curve[-1] / smooth.min() - 1.0)), steps[i_min] / steps[-1]


def _regime(all_runs: dict[str, list[dict]]) -> dict:
    """The regime measured at the tuned peak, from the cosine runs: ``"over-fit"`` when their
    held-out loss ends more than ``OVERFIT_RISE`` above its (smoothed) minimum along the run.

    The tuned peak regulates itself towards the edge of over-fitting (a rate that over-fits loses
    the tuning), so the rise of the schedules that hold the rate high for longest (WSD, small φ)
    is recorded too: it says whether the budget is longer than the data can use at that peak.
    """
    rises = {label: _rise(runs) for label, runs in all_runs.items()}
    cos = all_runs["cosine"]
    held = np.mean([_heldout(r) for r in cos])
    train_l = np.mean(
        [math.inf if r["final_train_loss"] is None else r["final_train_loss"] for r in cos]
    )
    rise_cos = rises["cosine"][0]
    return {
        "heldout_rise_cosine": rise_cos,
        "heldout_min_at_fraction_cosine": rises["cosine"][1],
        "heldout_rise_wsd": rises["wsd"][0],
        "heldout_rise_by_schedule": {k: v[0] for k, v in rises.items()},
        "heldout_min_at_fraction_by_schedule": {k: v[1] for k, v in rises.items()},
        "generalisation_gap": float((held - train_l) / held),
        "measured_regime": (
            "diverged"
            if math.isnan(rise_cos)
            else "over-fit"
            if rise_cos > OVERFIT_RISE
            else "under-fit"
        ),
    }


def _paired_vs_cosine(runs: list[dict], cos_runs: list[dict]) -> tuple[float, float]:
    """Mean and standard error over seeds of the relative held-out difference to cosine, paired
    by seed (same initialisation and batch order)."""
    diffs = np.asarray(
        [(_heldout(r) - _heldout(c)) / _heldout(c) for r, c in zip(runs, cos_runs, strict=True)]
    )
    if not np.all(np.isfinite(diffs)):
        return math.inf, math.nan
    se = float(diffs.std(ddof=1) / math.sqrt(diffs.size)) if diffs.size > 1 else math.nan
    return float(diffs.mean()), se


def _mean_probe(probes: list[dict]) -> dict:
    keys = [
        "lambda_max",
        "lambda_min",
        "lambda_min_positive",
        "trace",
        "lambda_max_spread",
        "curvature_noise",
        "negative_mass",
        "num_hvps",
        "wall_time_s",
    ]
    keys += [f"lambda_q{q:g}" for q in QUANTILES] + [f"abs_lambda_q{q:g}" for q in QUANTILES]
    out = {}
    for key in keys:
        vals = [p[key] for p in probes if p[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    out["num_params"] = probes[0]["num_params"]
    rel = [
        p["lambda_max_spread"] / p["lambda_max"]
        for p in probes
        if p["lambda_max_spread"] is not None
    ]
    # Full-batch tasks see one batch: there is no spread across minibatches to measure.
    out["lambda_max_rel_spread"] = float(np.mean(rel)) if rel else 0.0
    if out["curvature_noise"] is None:
        out["curvature_noise"] = 0.0
    out["lambda_min_over_max"] = out["lambda_min"] / out["lambda_max"]
    out["mean_eigenvalue"] = out["trace"] / out["num_params"]
    out["trace_over_lambda_max"] = out["trace"] / out["lambda_max"]
    return out


FLOORS = {
    "none": lambda c: 0.0,
    "lambda_min_positive": lambda c: c["lambda_min_positive"] or 0.0,
    "mean_eigenvalue": lambda c: max(c["mean_eigenvalue"], 0.0),
    "abs_q0.5": lambda c: c["abs_lambda_q0.5"],
    "abs_q0.9": lambda c: c["abs_lambda_q0.9"],
    "abs_q0.99": lambda c: c["abs_lambda_q0.99"],
}


def _products(curv: dict, peak_lr: float, budget: int, momentum: float) -> dict:
    out = {}
    for tag, eta in (("", peak_lr), ("_eff", peak_lr / (1.0 - momentum))):
        inv = 1.0 / (eta * budget)
        out[f"lr{tag}_lambda_max"] = eta * curv["lambda_max"]
        out[f"inv_lr{tag}_budget"] = inv
        for floor_name, floor in FLOORS.items():
            out[f"kappa_T{tag}[{floor_name}]"] = curv["lambda_max"] / max(floor(curv), inv)
    return out


def _add_paired(summary: dict, runs: list[dict], cos_runs: list[dict]) -> None:
    """Add the paired comparison with cosine (:func:`_paired_vs_cosine`) to a schedule's
    :func:`_summarise_runs` summary."""
    mean, se = _paired_vs_cosine(runs, cos_runs)
    summary["rel_diff_vs_cosine_paired_mean"] = mean
    summary["rel_diff_vs_cosine_paired_se"] = se


def _best_phi_fields(schedules: dict[str, dict]) -> dict:
    """A cell's best φ of the grid :data:`PHIS` and how it compares with the rest, from the
    summaries of its schedules (each with its paired comparison, :func:`_add_paired`)."""
    phi_means = [schedules[f"phi={p:g}"]["heldout_loss_mean"] for p in PHIS]
    best_phi = PHIS[int(np.argmin(phi_means))]
    best_loss = min(phi_means)
    best = schedules[f"phi={best_phi:g}"]
    ranked = sorted(schedules, key=lambda k: schedules[k]["heldout_loss_mean"])
    cos = schedules["cosine"]["heldout_loss_mean"]
    return {
        "best_phi": best_phi,
        "best_phi_interpolated": _interpolated_best_phi(phi_means),
        "best_phi_margin_over_runner_up": (
            (sorted(phi_means)[1] - best_loss) / best_loss if len(phi_means) > 1 else None
        ),
        "best_phi_std_over_loss": best["heldout_loss_std"] / best_loss,
        "best_schedule": ranked[0],
        "schedule_ranking": ranked,
        "cosine_gap_to_best_phi_pct": 100.0 * (cos - best_loss) / best_loss,
        # Best φ beats cosine by more than two standard errors of the paired difference.
        "best_phi_beats_cosine_significantly": bool(
            -best["rel_diff_vs_cosine_paired_mean"] > 2 * best["rel_diff_vs_cosine_paired_se"]
        ),
    }


def _analyse(
    task_names: list[str], seeds: list[int], lr_runs: dict, phase2: dict, probes: dict
) -> list[dict]:
    cells = []
    for name in task_names:
        task = get_task(name)
        probe_list = [probes[("probe", name, s)] for s in seeds]
        curv = _mean_probe(probe_list)
        for budget in _budgets(task):
            sweep = {}
            for m in LR_MULTIPLIERS:
                lr = task.base_lr[budget] * m
                runs = [
                    lr_runs[("train", name, budget, s, lr, ScheduleSpec("cosine"))] for s in seeds
                ]
                sweep[m] = (lr, _summarise_runs(runs), runs)
            best_m = min(LR_MULTIPLIERS, key=lambda m: sweep[m][1]["heldout_loss_mean"])
            peak_lr = sweep[best_m][0]
            schedules: dict[str, dict] = {}
            all_runs: dict[str, list[dict]] = {}
            for spec in _phase2_specs():
                runs = [phase2[("train", name, budget, s, peak_lr, spec)] for s in seeds]
                schedules[spec.label] = _summarise_runs(runs)
                all_runs[spec.label] = runs
            schedules["cosine"] = sweep[best_m][1]
            all_runs["cosine"] = sweep[best_m][2]
            for label, runs in all_runs.items():
                _add_paired(schedules[label], runs, all_runs["cosine"])
            cos = schedules["cosine"]["heldout_loss_mean"]
            phi2 = schedules["phi=2"]["heldout_loss_mean"]
            cells.append(
                {
                    "task": name,
                    "budget": budget,
                    "expected_regime": task.expected_regime[budget],
                    **_regime(all_runs),
                    "momentum": task.momentum,
                    "base_lr": task.base_lr[budget],
                    "lr_sweep": {
                        f"{m:g}": {"lr": sweep[m][0], **sweep[m][1]} for m in LR_MULTIPLIERS
                    },
                    "peak_lr_multiplier": best_m,
                    "peak_lr": peak_lr,
                    "peak_lr_at_grid_edge": best_m in (LR_MULTIPLIERS[0], LR_MULTIPLIERS[-1]),
                    "schedules": schedules,
                    **_best_phi_fields(schedules),
                    "cosine_vs_uba_phi2_rel_diff": (phi2 - cos) / cos,
                    "curvature": curv,
                    "products": _products(curv, peak_lr, budget, task.momentum),
                    "lr_grid_offset": _lr_grid_offset(
                        [sweep[m][1]["heldout_loss_mean"] for m in LR_MULTIPLIERS]
                    ),
                    **_joint(task, budget, seeds, phase2, sweep, peak_lr),
                    "runs": {k: v for k, v in all_runs.items()},
                    "lr_sweep_runs": {f"{m:g}": sweep[m][2] for m in LR_MULTIPLIERS},
                }
            )
    return cells


def _extend(old: dict, task_names: list[str] | None, seeds: list[int], workers: int) -> list[dict]:
    """The cells of a stored sweep ``old`` with every schedule of the current grid it lacks run at
    the cell's stored tuned peak, for ``seeds`` (those of the stored runs), and the cell's best φ,
    ranking and cosine gap recomputed over the whole grid. Stored runs are kept as they are; the
    peak is not re-tuned (the cosine runs it was tuned on are unchanged)."""
    cells = [c for c in old["cells"] if task_names is None or c["task"] in task_names]
    jobs = [
        ("train", c["task"], c["budget"], s, c["peak_lr"], spec)
        for c in cells
        for spec in _phase2_specs()
        if spec.label not in c["runs"]
        for s in seeds
    ]
    new = _run_all(jobs, workers, "extension")
    out = []
    for c in cells:
        c = dict(c, schedules=dict(c["schedules"]), runs=dict(c["runs"]))
        cos_runs = c["runs"]["cosine"]
        for spec in _phase2_specs():
            if spec.label in c["runs"]:
                continue
            runs = [new[("train", c["task"], c["budget"], s, c["peak_lr"], spec)] for s in seeds]
            summary = _summarise_runs(runs)
            _add_paired(summary, runs, cos_runs)
            c["schedules"][spec.label] = summary
            c["runs"][spec.label] = runs
        c.update(
            _best_phi_fields(c["schedules"]),
            extended_with=sorted({j[5].label for j in jobs if j[1] == c["task"]}),
        )
        out.append(c)
    return out


def _lr_grid_offset(means: list[float]) -> float:
    """Where the cosine optimum lies relative to the chosen grid rate, in octaves (log2 units):
    the vertex of the parabola in log2(rate) through the best grid point and its neighbours,
    clipped to [-1, 1]. Negative: the optimum is below the chosen rate. ``nan`` at an edge of the
    grid, next to a diverged rate, or when the three points are not convex."""
    i = int(np.argmin(means))
    if i == 0 or i == len(means) - 1:
        return math.nan
    y0, y1, y2 = means[i - 1 : i + 2]
    if not all(math.isfinite(y) for y in (y0, y1, y2)):
        return math.nan
    curvature = y0 - 2 * y1 + y2
    if curvature <= 0:
        return math.nan
    return max(-1.0, min(1.0, 0.5 * (y0 - y2) / curvature))


def _joint(
    task, budget: int, seeds: list[int], runs_by_job: dict, sweep: dict, peak_lr: float
) -> dict:
    """The (peak rate × φ) grid, when it was run (``--joint``): UBA φ = 2 at every rate is the
    cosine run of the peak-rate sweep (the two are bit-identical, checked at the tuned peak)."""
    base = task.base_lr[budget]
    # The runs at the tuned peak exist without the grid too, so check every rate.
    if any(
        ("train", task.name, budget, seeds[0], base * m, _uba(PHIS[0])) not in runs_by_job
        for m in LR_MULTIPLIERS
    ):
        return {"joint": None}
    table: dict[str, dict[str, float]] = {}
    runs_out: dict[str, dict[str, list[dict]]] = {}
    best = (math.inf, None, None)
    for m in LR_MULTIPLIERS:
        lr = base * m
        table[f"{m:g}"], runs_out[f"{m:g}"] = {}, {}
        for phi in PHIS:
            if phi == 2.0:
                runs = sweep[m][2]
            else:
                runs = [runs_by_job[("train", task.name, budget, s, lr, _uba(phi))] for s in seeds]
            mean = _summarise_runs(runs)["heldout_loss_mean"]
            table[f"{m:g}"][f"{phi:g}"] = mean
            # Final numbers only: the curves at the tuned peak are under "runs", those of
            # cosine at every rate under "lr_sweep_runs"; all of them would triple the file.
            runs_out[f"{m:g}"][f"{phi:g}"] = [{k: r[k] for k in _FINAL_KEYS} for r in runs]
            if mean < best[0]:
                best = (mean, m, phi)
    best_phi_per_lr = {m: float(min(PHIS, key=lambda p, m=m: table[m][f"{p:g}"])) for m in table}
    cos_best = min(sweep[m][1]["heldout_loss_mean"] for m in LR_MULTIPLIERS)
    return {
        "joint": {
            "heldout_loss_mean": table,
            "best_phi_per_lr_multiplier": best_phi_per_lr,
            "best_loss": best[0],
            "best_lr_multiplier": best[1],
            "best_lr": base * best[1],
            "best_phi": best[2],
            # What φ buys when the peak rate is tuned for each φ, not only for cosine.
            "cosine_gap_to_joint_best_pct": 100.0 * (cos_best - best[0]) / best[0],
            "peak_lr_multiplier_cosine": min(
                LR_MULTIPLIERS, key=lambda m: sweep[m][1]["heldout_loss_mean"]
            ),
        },
        "joint_runs": runs_out,
    }


_FINAL_KEYS = (
    "seed",
    "peak_lr",
    "final_train_loss",
    "final_heldout_loss",
    "final_heldout_accuracy",
    "diverged",
    "wall_time_s",
)


_ONLY_BUDGETS: tuple[int, ...] | None = None
"""``--budgets``: only these of each task's budgets (``None``: both)."""


def _budgets(task) -> tuple[int, ...]:
    return tuple(b for b in task.budgets if _ONLY_BUDGETS is None or b in _ONLY_BUDGETS)


def _uba(phi: float) -> ScheduleSpec:
    return ScheduleSpec("uba", phi)


def _phase2_specs() -> list[ScheduleSpec]:
    return [ScheduleSpec("uba", p) for p in PHIS] + [
        _BASELINE_SPECS[b] for b in BASELINES if b != "cosine"
    ]


def _product_getter(key: str):
    return lambda c: c["products"][key]


CANDIDATES = [
    ("budget", lambda c: c["budget"]),
    ("cosine lr-grid offset", lambda c: c["lr_grid_offset"]),
    ("peak_lr*lambda_max", lambda c: c["products"]["lr_lambda_max"]),
    ("peak_lr_eff*lambda_max", lambda c: c["products"]["lr_eff_lambda_max"]),
    ("1/(peak_lr*T)", lambda c: c["products"]["inv_lr_budget"]),
    ("1/(peak_lr_eff*T)", lambda c: c["products"]["inv_lr_eff_budget"]),
    *[(f"kappa_T[{f}]", _product_getter(f"kappa_T[{f}]")) for f in FLOORS],
    ("kappa_T_eff[none]", lambda c: c["products"]["kappa_T_eff[none]"]),
    ("kappa_T_eff[abs_q0.9]", lambda c: c["products"]["kappa_T_eff[abs_q0.9]"]),
    (
        "lambda_max/lambda_min_pos",
        lambda c: (
            c["curvature"]["lambda_max"] / (c["curvature"]["lambda_min_positive"] or math.nan)
        ),
    ),
    ("lambda_max rel. spread", lambda c: c["curvature"]["lambda_max_rel_spread"]),
    ("curvature noise", lambda c: c["curvature"]["curvature_noise"]),
    ("negative mass", lambda c: c["curvature"]["negative_mass"]),
    ("lambda_min/lambda_max", lambda c: c["curvature"]["lambda_min_over_max"]),
    ("trace/lambda_max", lambda c: c["curvature"]["trace_over_lambda_max"]),
    ("over-fit (expected)", lambda c: float(c["expected_regime"] == "over-fit")),
    ("over-fit (measured)", lambda c: float(c["measured_regime"] == "over-fit")),
    ("held-out rise (cosine)", lambda c: c["heldout_rise_cosine"]),
    ("held-out rise (WSD)", lambda c: c["heldout_rise_wsd"]),
    ("generalisation gap", lambda c: c["generalisation_gap"]),
]


def _spearman(cells: list[dict]) -> list[dict]:
    from scipy.stats import spearmanr

    out = []
    targets = {
        "best_phi": lambda c: c["best_phi"],
        "best_phi_interpolated": lambda c: c["best_phi_interpolated"],
    }
    if all(c["joint"] is not None for c in cells):
        targets["best_phi_joint"] = lambda c: c["joint"]["best_phi"]
    for target, get in targets.items():
        y = np.log([get(c) for c in cells])
        for name, fn in CANDIDATES:
            x = np.asarray([fn(c) for c in cells], dtype=np.float64)
            ok = np.isfinite(x)
            if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
                rho, p = math.nan, math.nan
            else:
                res = spearmanr(x[ok], y[ok])
                rho, p = float(res.statistic), float(res.pvalue)
            out.append({"target": target, "quantity": name, "rho": rho, "p": p, "n": int(ok.sum())})
    return out


# --------------------------------------------------------------------------------------------------
# Printing


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def _print_cell(c: dict) -> None:
    print()
    print(f"=== {c['task']}  budget={c['budget']}  " + "=" * 40)
    regime = (
        f"expected {c['expected_regime']}; measured {c['measured_regime']} (held-out rise after "
        f"its minimum: cosine {100 * c['heldout_rise_cosine']:.1f}% (min at "
        f"{c['heldout_min_at_fraction_cosine']:.2f} of the run), WSD "
        f"{100 * c['heldout_rise_wsd']:.1f}%; "
        f"gap (held-train)/held {c['generalisation_gap']:.2f})"
    )
    print(f"regime: {regime}")
    sweep = "  ".join(f"x{m}:{_fmt(v['heldout_loss_mean'])}" for m, v in c["lr_sweep"].items())
    edge = "  (AT GRID EDGE)" if c["peak_lr_at_grid_edge"] else ""
    print(
        f"peak lr (cosine-tuned) = {_fmt(c['peak_lr'])} = x{c['peak_lr_multiplier']:g} "
        f"base {c['base_lr']:g}{edge};  momentum {c['momentum']:g};  cosine lr sweep: {sweep}"
    )
    print(
        f"  {'schedule':<9} {'held-out loss':>22} {'vs cosine (paired)':>19} {'train loss':>11} "
        f"{'acc':>7} {'div':>4}"
    )
    for label, s in c["schedules"].items():
        mark = " <- best phi" if label == f"phi={c['best_phi']:g}" else ""
        acc = s["heldout_accuracy_mean"]
        print(
            f"  {label:<9} {_fmt(s['heldout_loss_mean'], 5):>10} ± "
            f"{_fmt(s['heldout_loss_std'], 2):<9}"
            f" {100 * s['rel_diff_vs_cosine_paired_mean']:>+8.2f}% ± "
            f"{100 * s['rel_diff_vs_cosine_paired_se']:<6.2f}"
            f" {_fmt(s['train_loss_mean'], 4):>11} {('n/a' if acc is None else f'{acc:.4f}'):>7}"
            f" {s['num_diverged']:>4}{mark}"
        )
    print(
        f"best phi = {c['best_phi']:g} (interpolated {c['best_phi_interpolated']:.3g}; margin over "
        f"runner-up {100 * c['best_phi_margin_over_runner_up']:.2f}%, seed std "
        f"{100 * c['best_phi_std_over_loss']:.2f}%);  best overall = {c['best_schedule']};  "
        f"cosine gap to best phi = {c['cosine_gap_to_best_phi_pct']:.2f}%"
        f" ({'significant' if c['best_phi_beats_cosine_significantly'] else 'within noise'})"
    )
    if c["joint"] is not None:
        j = c["joint"]
        print(
            f"joint (peak rate x phi) grid, mean held-out loss; best phi={j['best_phi']:g} at "
            f"x{j['best_lr_multiplier']:g} ({_fmt(j['best_loss'], 5)}); cosine (tuned) is "
            f"{j['cosine_gap_to_joint_best_pct']:.2f}% worse; cosine lr-grid offset "
            f"{_fmt(c['lr_grid_offset'], 2)} octaves"
        )
        print("  " + f"{'lr':>7}" + "".join(f"{'phi=' + f'{p:g}':>10}" for p in PHIS) + "  best")
        for m, row in j["heldout_loss_mean"].items():
            cells_txt = "".join(f"{_fmt(row.get(f'{p:g}'), 4):>10}" for p in PHIS)
            print(f"  {'x' + m:>7}{cells_txt}  {j['best_phi_per_lr_multiplier'][m]:g}")
    k = c["curvature"]
    print(
        f"curvature@init: lambda_max {_fmt(k['lambda_max'])} (rel. spread "
        f"{_fmt(k['lambda_max_rel_spread'], 3)}, curvature noise "
        f"{_fmt(k['curvature_noise'], 3)}), lambda_min {_fmt(k['lambda_min'])}, "
        f"smallest positive {_fmt(k['lambda_min_positive'])}, trace {_fmt(k['trace'])}, "
        f"negative mass {_fmt(k['negative_mass'], 3)}"
    )
    print(
        "  density quantiles  lambda q.5/.9/.99: "
        + "/".join(_fmt(k[f"lambda_q{q:g}"], 3) for q in QUANTILES)
        + "   |lambda| q.5/.9/.99: "
        + "/".join(_fmt(k[f"abs_lambda_q{q:g}"], 3) for q in QUANTILES)
        + f"   probe: {k['num_hvps']:.0f} HVPs, {k['wall_time_s']:.1f} s (mean per seed)"
    )
    p = c["products"]
    print(
        f"products: peak_lr*lambda_max {_fmt(p['lr_lambda_max'], 3)} (eff "
        f"{_fmt(p['lr_eff_lambda_max'], 3)}), 1/(peak_lr*T) {_fmt(p['inv_lr_budget'], 3)}, "
        "kappa_T by floor: " + ", ".join(f"{f} {_fmt(p[f'kappa_T[{f}]'], 3)}" for f in FLOORS)
    )


def _print_summary(cells: list[dict], spearman: list[dict]) -> None:
    print()
    print("=== summary " + "=" * 80)
    head = (
        f"{'task':<21}{'T':>5} {'regime exp/meas':<19}{'best phi':>8}{'interp':>7}{'best':>9}"
        f"{'cos gap%':>9}{'sig':>4}{'eta*lmax':>9}{'1/(eta T)':>10}{'kT[none]':>9}{'kT[l+min]':>10}"
        f"{'kT[|q.9|]':>10}{'spread':>7}{'noise':>6}{'neg':>6}{'lr-off':>7}"
        f"{'joint phi@lr':>13}{'gain%':>7}"
    )
    print(head)
    for c in cells:
        p, k = c["products"], c["curvature"]
        regime = f"{c['expected_regime'][:5]}/{c['measured_regime'][:5]}"
        print(
            f"{c['task']:<21}{c['budget']:>5} {regime:<19}{c['best_phi']:>8g}"
            f"{c['best_phi_interpolated']:>7.3g}{c['best_schedule']:>9}"
            f"{c['cosine_gap_to_best_phi_pct']:>9.2f}"
            f"{'yes' if c['best_phi_beats_cosine_significantly'] else 'no':>4}"
            f"{p['lr_lambda_max']:>9.3g}"
            f"{p['inv_lr_budget']:>10.3g}{p['kappa_T[none]']:>9.3g}"
            f"{p['kappa_T[lambda_min_positive]']:>10.3g}{p['kappa_T[abs_q0.9]']:>10.3g}"
            f"{k['lambda_max_rel_spread']:>7.2f}{k['curvature_noise']:>6.2f}"
            f"{_fmt(k['negative_mass'], 2):>6}"
            f"{_fmt(c['lr_grid_offset'], 2):>7}"
            + (
                f"{j['best_phi']:>7g}@x{j['best_lr_multiplier']:<4g}"
                f"{j['cosine_gap_to_joint_best_pct']:>7.2f}"
                if (j := c["joint"]) is not None
                else ""
            )
        )
    print()
    by_q: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in spearman:
        by_q[row["quantity"]][row["target"]] = row
    targets = list(next(iter(by_q.values())))
    print(
        "Spearman rank correlation with log(best phi) across cells; targets: "
        + ", ".join(targets)
        + " (rho, p)"
    )
    for q, rows in by_q.items():
        parts = [f"{_fmt(rows[t]['rho'], 2):>6} ({_fmt(rows[t]['p'], 2):>6})" for t in targets]
        print(f"  {q:<28} " + "   ".join(parts) + f"   n={rows[targets[0]]['n']}")


# --------------------------------------------------------------------------------------------------
# Main


def _environment() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "uba_auto"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = None, None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "uba_auto": uba_auto.__version__,
        "git_commit": commit,
        "uba_auto_dirty": dirty,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        choices=TASK_NAMES
        + HOLDOUT_TASK_NAMES
        + REPRESENTATIVE_TASK_NAMES
        + HOLD_TEST_TASK_NAMES
        + TREND_TEST_TASK_NAMES,
        help="default: the five calibration tasks (with --extend: every task of the file); the "
        "out-of-sample ones are "
        + " ".join(HOLDOUT_TASK_NAMES)
        + "; the representative ones "
        + " ".join(REPRESENTATIVE_TASK_NAMES),
    )
    parser.add_argument(
        "--phis",
        nargs="+",
        type=float,
        default=None,
        help="the φ grid, ascending, containing 2 (default: powers of two from 1/32 to 16)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--quick", action="store_true", help="one seed (the first of --seeds), for timing"
    )
    parser.add_argument(
        "--no-joint",
        dest="joint",
        action="store_false",
        help="skip the (peak rate x phi) grid; run the phi grid at the cosine-tuned peak only",
    )
    parser.add_argument(
        "--lr-multipliers",
        nargs="+",
        type=float,
        default=None,
        help="the cosine peak-rate grid around task.base_lr (default 0.25 0.5 1 2 4); '1' alone "
        "takes base_lr as the tuned peak (for a task whose base_lr is a stored sweep's result)",
    )
    parser.add_argument(
        "--budgets", nargs="+", type=int, default=None, help="only these budgets of each task"
    )
    parser.add_argument(
        "--extend",
        type=Path,
        default=None,
        help="a stored sweep: run only the schedules of the current grid it lacks, at its tuned "
        "peaks, and write its cells with those added (no peak-rate sweep, no probes)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    global PHIS, LR_MULTIPLIERS, _ONLY_BUDGETS
    if args.phis is not None:
        if 2.0 not in args.phis or sorted(args.phis) != args.phis:
            parser.error(f"--phis must be ascending and contain 2 (cosine), got {args.phis}")
        PHIS = tuple(args.phis)
    if args.lr_multipliers is not None:
        LR_MULTIPLIERS = tuple(sorted(args.lr_multipliers))
    if args.budgets is not None:
        _ONLY_BUDGETS = tuple(args.budgets)
    seeds = args.seeds[:1] if args.quick else args.seeds
    out = args.out or ROOT / "benchmarks" / "results" / (
        "phi_sweep_quick.json" if args.quick else "phi_sweep.json"
    )
    started = time.perf_counter()
    if args.extend is not None:
        old = json.loads(args.extend.read_text())
        cells = _extend(old, args.tasks, old["settings"]["seeds"], args.workers)
        result = {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "environment": _environment(),
            "extends": str(args.extend),
            "settings": {**old["settings"], "phis": PHIS, "baselines": BASELINES},
            "wall_time_s": {"total": time.perf_counter() - started},
            "tasks": old.get("tasks", {}),
            "cells": cells,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(result)))
        for c in cells:
            _print_cell(c)
        print(f"wall time {result['wall_time_s']['total']:.0f} s; results in {out}")
        return 0
    args.tasks = args.tasks or list(TASK_NAMES)
    tasks = [get_task(n) for n in args.tasks]

    # Phase 1: probes and the cosine peak-rate sweep (independent of each other).
    jobs: list[tuple] = [("probe", t.name, s) for t in tasks for s in seeds]
    jobs += [
        ("train", t.name, b, s, t.base_lr[b] * m, ScheduleSpec("cosine"))
        for t in tasks
        for b in _budgets(t)
        for s in seeds
        for m in LR_MULTIPLIERS
    ]
    phase1 = _run_all(jobs, args.workers, "probes + lr sweep")
    t1 = time.perf_counter() - started

    # Phase 2: every schedule at each cell's tuned peak.
    jobs = []
    for t in tasks:
        for b in _budgets(t):
            means = {}
            for m in LR_MULTIPLIERS:
                held = [
                    _heldout(
                        phase1[("train", t.name, b, s, t.base_lr[b] * m, ScheduleSpec("cosine"))]
                    )
                    for s in seeds
                ]
                means[m] = np.mean(held) if all(math.isfinite(h) for h in held) else math.inf
            peak = t.base_lr[b] * min(LR_MULTIPLIERS, key=means.__getitem__)
            jobs += [("train", t.name, b, s, peak, spec) for spec in _phase2_specs() for s in seeds]
            if args.joint:
                jobs += [
                    ("train", t.name, b, s, t.base_lr[b] * m, _uba(phi))
                    for m in LR_MULTIPLIERS
                    if t.base_lr[b] * m != peak
                    for phi in PHIS
                    if phi != 2.0
                    for s in seeds
                ]
    phase2 = _run_all(jobs, args.workers, "schedules")
    wall = time.perf_counter() - started

    probes = {k: v for k, v in phase1.items() if k[0] == "probe"}
    cells = _analyse(args.tasks, seeds, phase1, phase2, probes)
    spearman = _spearman(cells) if len(cells) >= 3 else []
    train_seconds = sum(
        v["wall_time_s"] for k, v in {**phase1, **phase2}.items() if k[0] == "train"
    )
    probe_seconds = sum(v["wall_time_s"] for v in probes.values())
    result = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": _environment(),
        "settings": {
            "seeds": seeds,
            "quick": args.quick,
            "workers": args.workers,
            "lr_multipliers": LR_MULTIPLIERS,
            "phis": PHIS,
            "baselines": BASELINES,
            "total_steps": "budget - 1 (the last update uses lr_min = 0)",
            "lr_min": 0.0,
            "peak_lr_selection": "cosine, lowest mean final held-out loss over seeds",
            "joint_grid": args.joint,
            "overfit_rise_threshold": OVERFIT_RISE,
            "density_quantiles": "lambda_q*: of the signed eigenvalues; abs_lambda_q*: of |lambda|",
            "kappa_T": "lambda_max / max(floor, 1/(peak_lr * budget)); _eff: peak_lr/(1-momentum)",
            "probe": "probe_curvature(density=True, dtype=float64) at init on the first "
            "task.probe_batches minibatches of the run's stream, one per seed; cell values are "
            "means over seeds",
        },
        "wall_time_s": {
            "total": wall,
            "phase1_probes_and_lr_sweep": t1,
            "phase2_schedules_and_joint_grid": wall - t1,
            "sum_of_train_runs": train_seconds,
            "sum_of_probes": probe_seconds,
            "num_train_runs": sum(1 for k in {**phase1, **phase2} if k[0] == "train"),
        },
        "tasks": {t.name: t.summary() for t in tasks},
        "probes": {f"{k[1]}/seed{k[2]}": v for k, v in probes.items()},
        "cells": cells,
        "spearman_log_best_phi": spearman,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_json_safe(result)))

    for c in cells:
        _print_cell(c)
    if spearman:
        _print_summary(cells, spearman)
    print()
    print(
        f"wall time {wall:.0f} s ({len(seeds)} seed(s), {result['wall_time_s']['num_train_runs']} "
        f"runs: {train_seconds:.0f} s of training and {probe_seconds:.0f} s of probing on "
        f"{args.workers} workers); results in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
