"""The plateau rule (``uba_auto.phi``'s ``plateau_*``) trained on the φ study's cells.

Every task's held-out set is split once, by example index, into a *validation* half (even
indices: the only data the rule reads while training) and a *test* half (odd indices). A rule
run trains with φ = HOLD_PHI, measures the validation loss on ``--val-batches`` fixed chunks of
the validation half at the rule's check steps, and calls ``set_phi(COOL_PHI)`` at the first
plateau. The training data, the minibatch order, the model's seed and the peak rate are those of
the sweep's runs, so a rule run is paired with the sweep's run of the same seed.

Two modes:

* ``calibration`` (default): the cells of the stored wide sweeps (``--sweeps``) at their tuned
  peak. Only rule runs are trained; each is compared with the stored schedules, scored on the
  whole held-out set, as the stored runs are. The validation half is part of that set, so these
  figures are where the rule's constants were looked at, not a test.
* ``heldout``: tasks kept out of every fit (``--tasks``, budgets ``--budgets`` or the task's
  two), at the task's cosine-tuned ``base_lr``: the rule *and* the φ grid, WSD and linear are
  trained, all scored on the test half (the headline) and on the whole held-out set.

The cost of the rule beyond training is its validation forward passes, reported per run as
gradient-equivalents (one forward of a batch = 1/3 of a training step of that many examples).

    python benchmarks/plateau_rule.py --out benchmarks/results/plateau_calibration.json
    python benchmarks/plateau_rule.py --mode heldout --tasks resnet_bn vit_adamw \
        --out benchmarks/results/plateau_heldout.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uba_auto
from benchmarks import shape_rule as SR
from benchmarks import tasks as T
from benchmarks import trend_rule as TR
from benchmarks.midrun_signals import spearman
from benchmarks.phi_sweep import LR_MULTIPLIERS
from benchmarks.train import ScheduleSpec, evaluate, train
from uba_auto.auto._plan import validation_batches, validation_cost, validation_plan
from uba_auto.phi import _plateau as P

AUTO_PROBE_FRACTION = 0.02
"""``auto_uba``'s default ``probe_fraction``, which sizes its validation checks."""
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SWEEPS = [
    RESULTS / "phi_sweep_wide.json",
    RESULTS / "phi_sweep_holdout_wide.json",
    RESULTS / "phi_sweep_holdout_gd_wide.json",
    RESULTS / "phi_sweep_gpt_adamw_wide.json",
]
GRID = [
    ScheduleSpec("uba", phi)
    for phi in (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0, 16.0)
] + [
    ScheduleSpec("wsd"),
    ScheduleSpec("wsd", decay_fraction=0.1),
    ScheduleSpec("wsd", decay_fraction=0.6, decay_shape="cosine"),  # the shape of finding 24
    ScheduleSpec("linear"),
]


def split_heldout(task: T.Task) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(validation, test): the held-out examples of even and of odd index."""
    x, y = task.x_heldout, task.y_heldout
    return (x[0::2], y[0::2]), (x[1::2], y[1::2])


def _chunks(x: Tensor, y: Tensor, num: int) -> list[tuple[Tensor, Tensor]]:
    return list(zip(torch.tensor_split(x, num), torch.tensor_split(y, num), strict=False))


@torch.no_grad()
def _batch_losses(task: T.Task, model: nn.Module, batches: list) -> list[float]:
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        return [float(task.loss_fn(model(xb), yb)) for xb, yb in batches]
    finally:
        for m, flag in zip(model.modules(), flags, strict=False):
            m.training = flag


def run_one(
    task: T.Task,
    spec: ScheduleSpec | None,
    budget: int,
    seed: int,
    peak_lr: float,
    val_batches: int,
    equal_cost: bool = False,
    product_batches: int | None = None,
    rule: str = "plateau",
) -> dict:
    """One run: under the rule ``rule`` (``spec`` None: ``"plateau"``, ``"trend"``,
    ``benchmarks/trend_rule.py``, or ``"shape"``, ``benchmarks/shape_rule.py``) or under a
    fixed schedule ``spec``.

    With ``equal_cost`` a rule run trains :func:`equal_cost_steps` steps instead of ``budget``
    (its whole schedule fitted to them), so that training and every check it could make together
    cost no more gradient-equivalents than ``budget`` training steps. ``product_batches``: the
    rule reads that many batches of the training batch size, as ``auto_uba(val_loader=...,
    val_batches=product_batches)`` does (:func:`validation_set`), in as many chunks.

    Returns the run's :class:`~benchmarks.train.RunResult` fields plus ``final_test_loss`` (the
    test half) and, for the rule, the step it switched at, why, its checks and their cost.
    """
    (xv, yv), (xt, yt) = validation_set(task, product_batches)
    batches = _chunks(xv, yv, val_batches if product_batches is None else product_batches)
    cell_budget = budget
    if spec is None and equal_cost:
        budget = equal_cost_steps(task, budget, product_batches, rule)
    warmup = task.warmup_steps(budget)
    total = budget - 1
    steps_of = {"trend": TR.check_steps, "shape": SR.check_steps}.get(rule, P.plateau_check_steps)
    checks = set(steps_of(total, warmup)) if spec is None else set()
    box: dict = {"switched": None, "reason": None, "test": math.inf, "done": False}
    box["cooled"] = box["cool_reason"] = None
    history: list[list[float]] = []
    log: list[dict] = []
    trend = TR.TrendRule(total) if rule == "trend" else None
    shape = SR.ShapeRule(total) if rule == "shape" and spec is None else None

    def factory(opt):
        start_phi = TR.START_PHI if trend is not None else P.HOLD_PHI
        box["sched"] = uba_auto.UBAScheduler(
            opt, total_steps=total, phi=start_phi, warmup_steps=warmup
        )
        return box["sched"]

    def trend_check(step, losses):
        action, why = trend.check(step, losses)
        log.append({"step": step, "loss": sum(losses) / len(losses), "state": trend.state})
        if action == "hold":
            TR.restart(box["sched"], TR.HOLD_PHI)
            box["switched"], box["reason"] = step, why
        elif action == "cool":
            TR.restart(box["sched"], TR.COOL_PHI)
            box["cooled"], box["cool_reason"] = step, why
        if action in ("cool", "stop"):
            box["done"] = True

    def shape_cool(step, action, why):
        if action == "cool":
            if SR.COOL_BY_RESTART:
                TR.restart(box["sched"], SR.COOL_PHI)
            else:  # the library's PlateauCooldown: set_phi(restart=True), the same curve
                box["sched"].set_phi(SR.COOL_PHI, restart=True)
            box["switched"], box["reason"], box["done"] = step, why, True

    def callback(step, model, opt):
        if step == budget:
            box["test"], _ = evaluate(task, model, xt, yt)
        if shape is not None and not box["done"]:
            shape_cool(step, *shape.due(step))  # the cosine at SWITCH_BY, with no check
        if box["done"] or step not in checks:
            return
        history.append(_batch_losses(task, model, batches))
        if trend is not None:
            trend_check(step, history[-1])
            return
        if shape is not None:
            action, why = shape.check(step, history[-1])
            log.append({"step": step, "loss": sum(history[-1]) / len(history[-1]), "why": why})
            shape_cool(step, action, why)
            return
        d = P.plateau_decision(history)
        log.append(
            {
                "step": step,
                "loss": d.loss,
                "relative_gain": d.relative_gain,
                "plateaued": d.plateaued,
            }
        )
        if d.plateaued:
            box["sched"].set_phi(P.COOL_PHI)
            box["switched"], box["reason"] = step, d.reason
            box["done"] = True

    result = train(task, spec if spec is not None else factory, budget, seed, peak_lr, callback)
    out = result.to_dict()
    out["label"] = rule if spec is None else spec.label
    out["budget"], out["trained_steps"] = cell_budget, budget
    out["final_test_loss"] = (
        box["test"] if math.isfinite(box["test"]) and not result.diverged else None
    )
    if spec is None:
        examples = task.batch_size or task.num_train
        out.update(
            schedule=rule,
            switched_at=box["switched"],
            switched_at_fraction=None if box["switched"] is None else box["switched"] / budget,
            reason=box["reason"],
            held_fraction=_held_fraction(rule, box["switched"], box["cooled"], budget),
            checks=log,
            num_val_evals=len(history),
            val_cost_gradient_equivalents=len(history) * xv.shape[0] / (3 * examples),
        )
        if rule == "trend":
            out.update(
                cooled_at=box["cooled"],
                cooled_at_fraction=None if box["cooled"] is None else box["cooled"] / budget,
                cool_reason=box["cool_reason"],
            )
    for key in ("curve_steps", "curve_train_loss", "curve_lr"):
        out.pop(key, None)
    return out


def _held_fraction(rule: str, held: int | None, cooled: int | None, budget: int) -> float:
    """How long a rule run held the rate high, as a fraction of the budget: the plateau rule
    holds from the start to its switch (1 without one); the trend rule from its hold to its
    cool-down or the end (0 without a hold)."""
    if rule in ("plateau", "shape"):
        return 1.0 if held is None else held / budget
    if held is None:
        return 0.0
    return ((budget if cooled is None else cooled) - held) / budget


def validation_set(
    task: T.Task, product_batches: int | None
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(validation, test) examples: :func:`split_heldout`, with the validation half cut, given
    ``product_batches``, to that many batches of the training batch size (its first examples,
    the same at every check), what ``auto_uba(val_loader=..., val_batches=product_batches)``
    reads."""
    (xv, yv), test = split_heldout(task)
    if product_batches is not None:
        keep = product_batches * (task.batch_size or task.num_train)
        xv, yv = xv[:keep], yv[:keep]
    return (xv, yv), test


def check_cost(task: T.Task, budget: int, product_batches: int | None) -> float:
    """Gradient-equivalents of every check the rule can make in ``budget`` steps: each is a
    forward pass over the validation set (a third of a training step per batch of examples)."""
    size = validation_set(task, product_batches)[0][0].shape[0]
    return _check_cost(task, budget, size)


def _check_cost(task: T.Task, budget: int, size: int, rule: str = "plateau") -> float:
    # auto_uba's own arithmetic, with the validation set counted in training batches.
    if budget <= 1:
        return 0.0
    batches = size / (task.batch_size or task.num_train)
    if rule in ("trend", "shape"):
        module = TR if rule == "trend" else SR
        checks = len(module.check_steps(budget - 1, task.warmup_steps(budget)))
        return validation_cost(checks, batches)
    # The plateau rule as it was studied (checks to LAST_CHECK), not the library's shape rule.
    return validation_cost(
        len(P.plateau_check_steps(budget - 1, task.warmup_steps(budget))), batches
    )


def equal_cost_steps(
    task: T.Task, budget: int, product_batches: int | None, rule: str = "plateau"
) -> int:
    """The most training steps ``s`` with ``s + check_cost(task, s) <= budget`` (at least 1):
    the rule's run at the cost of ``budget`` steps of a schedule that checks nothing, in the
    worst case of every check made (the rule cannot know in advance when it will switch)."""
    size = validation_set(task, product_batches)[0][0].shape[0]
    for steps in range(budget, 1, -1):
        if steps + _check_cost(task, steps, size, rule) <= budget:
            return steps
    return 1


def _job(args: tuple) -> dict:
    name, spec, budget, seed, peak, val_batches, overrides, equal_cost, product_batches, rule = args
    torch.set_num_threads(1)
    for key, value in overrides.items():  # exploring the rule's constants (--set)
        own = {"trend": TR, "shape": SR}.get(rule)
        setattr(own if own is not None and hasattr(own, key) else P, key, value)
    task = T.get_task(name)
    return run_one(task, spec, budget, seed, peak, val_batches, equal_cost, product_batches, rule)


def _cosine_job(args: tuple) -> dict:
    name, budget, seed, lr = args
    torch.set_num_threads(1)
    task = T.get_task(name)
    run = train(task, ScheduleSpec("cosine"), budget, seed, lr)
    return {"task": name, "budget": budget, "seed": seed, "lr": lr,
            "final_heldout_loss": run.final_heldout_loss}  # fmt: skip


def tune_peaks(pool, names: list[str], budgets: list[int] | None, seeds: list[int]) -> dict:
    """``(task, budget) -> {"peak_lr", "sweep"}``: the cosine peak of ``phi_sweep.py``'s protocol,
    ``base_lr`` x :data:`LR_MULTIPLIERS` with the lowest mean held-out loss (whole held-out set)
    over ``seeds``, trained with the ``cosine`` baseline schedule as the sweep does.
    (``phi_sweep.py`` tunes the same way, but only together with its probes and its baselines at
    the tuned peak, which a rule's test does not need.)"""
    cells = [(n, b) for n in names for b in (budgets or sorted(T.get_task(n).base_lr))]
    jobs = [
        (n, b, s, T.get_task(n).base_lr[b] * m)
        for n, b in cells
        for m in LR_MULTIPLIERS
        for s in seeds
    ]
    runs = pool.map(_cosine_job, jobs, chunksize=1)
    out = {}
    for n, b in cells:
        sweep = {}
        for m in LR_MULTIPLIERS:
            lr = T.get_task(n).base_lr[b] * m
            losses = [
                r["final_heldout_loss"]
                for r in runs
                if (r["task"], r["budget"], r["lr"]) == (n, b, lr)
            ]
            finite = [x for x in losses if x is not None and math.isfinite(x)]
            sweep[m] = statistics.fmean(losses) if len(finite) == len(losses) else math.inf
        best = min(LR_MULTIPLIERS, key=sweep.get)
        out[(n, b)] = {"peak_lr": T.get_task(n).base_lr[b] * best, "multiplier": best,
                       "sweep": {str(m): v for m, v in sweep.items()}}  # fmt: skip
        print(f"{n:>22} {b:>5}  cosine peak x{best:g} = {out[(n, b)]['peak_lr']:g}", flush=True)
    return out


def _stored_cells(paths: list[Path]) -> list[dict]:
    cells = []
    for path in paths:
        for cell in json.loads(path.read_text())["cells"]:
            cells.append(cell)
    return cells


def _product_batches(args: argparse.Namespace, name: str, budget: int) -> int | None:
    """The validation batches of a rule run (None: the benchmark's own chunks of the half)."""
    if args.auto_validation:
        task = T.get_task(name)
        checks, _ = validation_plan(budget, task.warmup_steps(budget), 1)
        return validation_batches(budget, checks, AUTO_PROBE_FRACTION)
    return 8 if args.product_validation else None


def _reusable_grids(paths: list[Path], seeds: list[int]) -> dict[tuple, dict[str, list[dict]]]:
    """(task, budget, peak) -> the grid's runs (label -> runs) of earlier heldout results."""
    found: dict[tuple, dict[str, list[dict]]] = {}
    for path in paths:
        result = json.loads(path.read_text())
        if result["mode"] != "heldout" or result["seeds"] != seeds:
            raise SystemExit(f"{path}: not a heldout result with seeds {seeds}")
        for cell in result["cells"]:
            found[(cell["task"], cell["budget"], cell["peak_lr"])] = cell["grid_runs"]
    return found


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds of a/b - 1 (inf when a diverged)."""
    diffs = [
        (x / y - 1) if (x is not None and math.isfinite(x)) else math.inf
        for x, y in zip(a, b, strict=False)
    ]
    mean = statistics.fmean(diffs)
    se = (
        statistics.stdev(diffs) / math.sqrt(len(diffs))
        if len(diffs) > 1 and math.isfinite(mean)
        else 0.0
    )
    return mean, se


def _summarise(cell_runs: dict[str, list[dict]], key: str, rule: str = "plateau") -> dict:
    """Per cell: every schedule's paired difference vs cosine (phi=2) and the rule's (runs
    labelled ``rule``) gap to the best φ of the grid, on loss ``key``."""

    def losses(label):
        runs = sorted(cell_runs[label], key=lambda r: r["seed"])
        return [r[key] if r[key] is not None else math.inf for r in runs]

    cos = losses("cosine")
    table = {label: _paired(losses(label), cos)[0] for label in cell_runs}
    uba = {k: statistics.fmean(losses(k)) for k in cell_runs if k.startswith("phi=")}
    best = min(uba, key=uba.get)
    rule_vs_best = _paired(losses(rule), losses(best))
    rule_vs_cos = _paired(losses(rule), cos)
    gain_best = _paired(losses(best), cos)[0]
    return {
        "vs_cosine": table,
        "best_phi": best,
        "best_vs_cosine": gain_best,
        "rule_vs_best": rule_vs_best[0],
        "rule_vs_cosine": rule_vs_cos[0],
        "rule_vs_cosine_se": rule_vs_cos[1],
        "share_of_gain_captured": (rule_vs_cos[0] / gain_best) if gain_best < 0 else None,
        "switched_at_fraction": [r["switched_at_fraction"] for r in cell_runs[rule]],
        "held_fraction": [r["held_fraction"] for r in cell_runs[rule]],
    }


def table(result: dict) -> str:
    """The per-cell markdown table and the target counts of a result file."""
    lines = [
        "| task | budget | best φ of the grid | best φ vs cosine | rule vs cosine (± s.e.) | "
        "rule vs best φ | share of the gain | switched at (fraction, per seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    within = worse = 0
    shares, held, best_phis = [], [], []
    for cell in result["cells"]:
        h = cell.get("test") or cell["heldout"]
        within += h["rule_vs_best"] <= 0.01
        worse += h["rule_vs_cosine"] > 0.01
        share = h["share_of_gain_captured"] if h["best_vs_cosine"] < -0.01 else None
        if share is not None:
            shares.append(share)
        switched = ", ".join("—" if f is None else f"{f:.2f}" for f in h["switched_at_fraction"])
        held.append(
            statistics.fmean(
                h.get("held_fraction")
                or [1.0 if f is None else f for f in h["switched_at_fraction"]]
            )
        )
        best_phis.append(math.log(float(h["best_phi"].removeprefix("phi="))))
        lines.append(
            f"| {cell['task']} | {cell['budget']} | {h['best_phi'].removeprefix('phi=')} | "
            f"{100 * h['best_vs_cosine']:+.2f} % | {100 * h['rule_vs_cosine']:+.2f} % ± "
            f"{100 * h['rule_vs_cosine_se']:.2f} | {100 * h['rule_vs_best']:+.2f} % | "
            + ("—" if share is None else f"{100 * share:.0f} %")
            + f" | {switched} |"
        )
    n = len(result["cells"])
    lines.append("")
    lines.append(
        f"Within 1 % of the best φ: {within} of {n} cells; worse than cosine by more than 1 %: "
        f"{worse} of {n}; share of the best φ's gain captured where it beats cosine by > 1 %: "
        + (", ".join(f"{100 * x:.0f} %" for x in shares) or "no such cell")
        + "."
    )
    if n > 2:
        rho = spearman(held, best_phis)
        held_what = (
            "the share of the budget between its hold and its cool-down"
            if result.get("rule_name") == "trend"
            else "mean switch fraction, 1 without a switch"
        )
        lines.append(
            f"Spearman(log best φ, how long the rule held the rate: {held_what}) = {rho:+.2f} "
            f"over {n} cells (the rule moves with the task when negative)."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("calibration", "heldout"), default="calibration")
    parser.add_argument(
        "--rule",
        choices=("plateau", "trend", "shape"),
        default="plateau",
        help="the plateau rule (uba_auto.phi, the library's), the trend rule "
        "(benchmarks/trend_rule.py, pre-registered in results/prereg_trend_rule.md) or the "
        "shape rule (benchmarks/shape_rule.py, results/prereg_shape_rule.md)",
    )
    parser.add_argument("--sweeps", nargs="*", type=Path, default=DEFAULT_SWEEPS)
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--budgets", nargs="*", type=int, default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument(
        "--equal-cost",
        action="store_true",
        help="rule runs train fewer steps, so that training plus every check they could make "
        "costs the budget (equal_cost_steps); the grid trains the whole budget",
    )
    parser.add_argument(
        "--product-validation",
        action="store_true",
        help="the rule reads what auto_uba(val_loader=, val_batches=8) reads: 8 batches of the "
        "training batch size (the start of the validation half), not the whole half",
    )
    parser.add_argument(
        "--auto-validation",
        action="store_true",
        help="the rule reads what auto_uba(val_loader=) reads by default: val_batches sized "
        "by the cell's budget (uba_auto.auto._plan.validation_batches, probe_fraction 2 %%) "
        "batches of the training batch size",
    )
    parser.add_argument(
        "--grid",
        nargs="*",
        default=None,
        metavar="LABEL",
        help="heldout mode: only these schedules of the grid (labels such as phi=0.25, wsd); "
        "phi=2 (cosine) is always run",
    )
    parser.add_argument(
        "--reuse-grid",
        nargs="*",
        type=Path,
        default=[],
        metavar="RESULT.json",
        help="heldout mode: take the grid's runs of a cell from these earlier heldout results "
        "(the same task, budget, peak and seeds) and train only the rule",
    )
    parser.add_argument(
        "--tune-peaks",
        action="store_true",
        help="heldout mode: tune each cell's cosine peak first (base_lr x 0.25 .. 4, 3 seeds, "
        "the phi_sweep protocol; tune_peaks) and run the rule and the grid there",
    )
    parser.add_argument(
        "--peaks-from",
        type=Path,
        default=None,
        metavar="SWEEP.json",
        help="heldout mode: each cell's peak rate from this phi_sweep result (its cosine-tuned "
        "peak for the task and budget) instead of the task's base_lr",
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--table",
        type=Path,
        metavar="RESULT.json",
        help="print the table of a result file, no runs",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="override a constant of the rule (exploration only; the default runs the library's)",
    )
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.out is None:
        parser.error("--out is required (or --table to print a stored result)")
    overrides = {k: float(v) for k, v in (item.split("=") for item in args.set)}
    if "WINDOW" in overrides:
        overrides["WINDOW"] = int(overrides["WINDOW"])
    start = time.perf_counter()
    jobs, cells = [], []
    tuning: dict = {}
    if args.mode == "calibration":
        for cell in _stored_cells(args.sweeps):
            if args.tasks and cell["task"] not in args.tasks:
                continue
            if args.budgets and cell["budget"] not in args.budgets:
                continue
            cells.append((cell["task"], cell["budget"], cell["peak_lr"], cell))
    else:
        tuned = {}
        if args.tune_peaks:
            with mp.get_context("spawn").Pool(args.workers) as pool:
                tuning = tune_peaks(
                    pool,
                    args.tasks or list(T.HELDOUT_REPRESENTATIVE_TASK_NAMES),
                    args.budgets,
                    args.seeds,
                )
            tuned = {key: v["peak_lr"] for key, v in tuning.items()}
        elif args.peaks_from is not None:
            sweep = json.loads(args.peaks_from.read_text())
            tuned = {(c["task"], c["budget"]): c["peak_lr"] for c in sweep["cells"]}
        for name in args.tasks or T.HELDOUT_REPRESENTATIVE_TASK_NAMES:
            task = T.get_task(name)
            for budget in args.budgets or sorted(task.base_lr):
                if args.peaks_from is not None and (name, budget) not in tuned:
                    parser.error(f"{args.peaks_from} has no cell {name}/{budget}")
                peak = tuned.get((name, budget), task.base_lr[budget])
                cells.append((name, budget, peak, None))
    reused = _reusable_grids(args.reuse_grid, args.seeds)
    for name, budget, peak, _ in cells:
        grid = [g for g in GRID if not args.grid or g.label in args.grid or g.label == "phi=2"]
        fresh = args.mode == "heldout" and (name, budget, peak) not in reused
        specs = [None] + (grid if fresh else [])
        for spec, seed in itertools.product(specs, args.seeds):
            jobs.append(
                (
                    *(name, spec, budget, seed, peak, args.val_batches, overrides),
                    *(args.equal_cost, _product_batches(args, name, budget), args.rule),
                )
            )
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        runs = pool.map(_job, jobs, chunksize=1)
    out_cells = []
    for name, budget, peak, stored in cells:
        mine = [r for r in runs if r["task"] == name and r["budget"] == budget]
        by_label: dict[str, list[dict]] = {}
        for r in mine:
            by_label.setdefault(r["label"], []).append(r)
        if stored is not None:
            for label, sched in stored["schedules"].items():
                per_seed = sched["heldout_loss_per_seed"]
                by_label.setdefault(
                    label,
                    [
                        {"seed": s, "final_heldout_loss": v}
                        for s, v in zip(args.seeds, per_seed, strict=False)
                    ],
                )
        else:
            for label, grid_runs in reused.get((name, budget, peak), {}).items():
                by_label.setdefault(label, grid_runs)
            by_label["cosine"] = by_label["phi=2"]
        entry = {"task": name, "budget": budget, "peak_lr": peak}
        entry["heldout"] = _summarise(by_label, "final_heldout_loss", args.rule)
        if stored is None:
            entry["test"] = _summarise(by_label, "final_test_loss", args.rule)
        entry["rule_runs"] = by_label[args.rule]
        if stored is None:
            entry["grid_runs"] = {
                k: v
                for k, v in by_label.items()
                if k not in ("plateau", "trend", "shape", "cosine")
            }
        out_cells.append(entry)
        headline = entry["test"] if stored is None else entry["heldout"]
        print(
            f"{name:>22} {budget:>5}  best {headline['best_phi']:>11} "
            f"({100 * headline['best_vs_cosine']:+6.2f} % vs cosine)  rule vs cosine "
            f"{100 * headline['rule_vs_cosine']:+6.2f} %  "
            f"vs best {100 * headline['rule_vs_best']:+6.2f} %"
            f"  switched at {headline['switched_at_fraction']}",
            flush=True,
        )
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "python " + " ".join(sys.argv),
        "mode": args.mode,
        "rule_name": args.rule,
        "rule": {
            k: overrides.get(k, getattr(P, k))
            for k in P.__all__
            if k.isupper() and not (args.rule == "trend" and hasattr(TR, k))
        }
        | (
            {k: overrides.get(k, getattr(TR, k)) for k in dir(TR) if k.isupper()}
            if args.rule == "trend"
            else {}
        )
        | (
            {k: overrides.get(k, getattr(SR, k)) for k in dir(SR) if k.isupper()}
            if args.rule == "shape"
            else {}
        ),
        "seeds": args.seeds,
        "val_batches": args.val_batches,
        "equal_cost": args.equal_cost,
        "product_validation": args.product_validation,
        "auto_validation": args.auto_validation,
        "wall_time_s": time.perf_counter() - start,
        "peak_tuning": {f"{n}/{b}": v for (n, b), v in tuning.items()},
        "cells": out_cells,
    }
    args.out.write_text(json.dumps(result, indent=1, default=lambda v: None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
