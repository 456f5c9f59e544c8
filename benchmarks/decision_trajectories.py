"""Where the φ decision's Lanczos run stands step by step, and what a gate-aware stop would save.

    python benchmarks/decision_trajectories.py record {cells|models|heldout} [--steps 16]
    python benchmarks/decision_trajectories.py stops FILE.json [FILE.json ...]

``record`` runs ``auto_uba``'s default probe (8 batches, the budgeted plan) with the decision rule
held open to ``--steps`` Lanczos steps and writes, per run, every step's top Ritz value θ_m, its
residual relative to the spectral scale r_m and the curvature noise σ_m along its Ritz vector
(what :class:`uba_auto.probe.DecisionRule` reads) to
``benchmarks/results/decision_trajectories_{cells,models,heldout}.json``:

* ``cells``: each (task, seed) of the φ study (``benchmarks/results/phi_validation.json``; 24
  runs, the same model, batches and optimizer as ``phi_decision_check.py``), about 25 s;
* ``models``: the probe benchmark's MLP, CNN, transformer and half-width ResNet-18 (what the
  "≤ 2 % of a 5000-step budget" target is measured on; SGD momentum), about 7 min;
* ``heldout``: the representative tasks gpt_adamw, resnet_bn and vit_adamw, seeds 0-2, at their
  first budget, about 4 min.

``stops`` replays the trajectories offline and, for each setting (ρ, M) of the gate-aware stop,
prints the decision steps of the current rule and of the rule with the extra branch "stop at
m ≥ 3 once r_m ≤ ρ and σ_m, σ_{m-1} ≥ M · gate" (the gated link's φ is 2 whatever σ is above
its gate, 0.05), how often it fired, the worst later σ over σ at its stop, and how many runs
later fell below the gate (a φ the branch would have got wrong). The branch as measured here
(its ρ up to 0.5) was not shipped (BENCHMARKS.md §1 says why); what ships since 2026-12-07 for the
gated links keeps the residual test at ``rtol`` and takes σ ≥ 4 × gate at two steps as settled
(``DecisionRule.noise_ceiling``, BENCHMARKS.md §1, "A decision at two steps").
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uba_auto  # noqa: E402
from uba_auto.probe import DECISION_RULE, DecisionRule, projected  # noqa: E402

GATE = DECISION_RULE.noise_floor  # the gated link's gate (GATE_NOISE)
SETTINGS = [(rho, m) for rho in (0.2, 0.3, 0.5, 1.0) for m in (1.5, 2.0, 3.0)]


def _record_run(model, batches, budget, optimizer, loss_fn, seed, steps):
    """The trajectory of one default probe from a random start (``warm_start=False``: the warm
    start's own single-batch run would be recorded too), the decision rule held open to
    ``steps`` steps."""
    held_open = DecisionRule(rtol=0.0, max_steps=steps)
    trace = []
    update = projected.DecisionMonitor.update

    def recording(self, theta, s, beta_m):
        self.rule = held_open
        out = update(self, theta, s, beta_m)
        p = self._last
        trace.append([p.steps, p.lambda_max, p.residual, p.curvature_noise])
        return out

    projected.DecisionMonitor.update = recording
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the plan's overspend note: expected here
            uba_auto.auto_uba(
                model, batches, budget, optimizer=optimizer, loss_fn=loss_fn,
                num_batches=len(batches), progress=False, seed=seed, warm_start=False,
            )  # fmt: skip
    finally:
        projected.DecisionMonitor.update = update
    return trace


def runs(which: str):
    """Each run of ``which`` (``cells``, ``heldout`` or ``models``, see the module's docstring) as
    ``(name, model, batches, budget, optimizer, loss_fn, seed)``, built when it is reached."""
    from benchmarks.tasks import get_task

    if which in ("cells", "heldout"):
        if which == "cells":  # each (task, seed) once: the probe does not depend on the budget
            stored = json.loads((ROOT / "benchmarks/results/phi_validation.json").read_text())
            keys, seen = [], set()
            for r in stored["runs"]:
                if r["link"] == "gated" and (r["task"], r["seed"]) not in seen:
                    seen.add((r["task"], r["seed"]))
                    keys.append((r["task"], r["seed"], r["budget"]))
        else:
            keys = [
                (name, seed, get_task(name).budgets[0])
                for name in ("gpt_adamw", "resnet_bn", "vit_adamw")
                for seed in (0, 1, 2)
            ]
        for name, seed, budget in keys:
            task = get_task(name)
            model = task.make_model(seed)
            model.train()
            batches = list(itertools.islice(task.batches(seed), 8))
            opt = task.make_optimizer(model, task.base_lr[budget])
            yield f"{name}/s{seed}", model, batches, budget, opt, task.loss_fn, seed
    elif which == "models":
        from benchmarks import probe_models as pm

        for name in ("mlp", "cnn", "transformer", "resnet"):
            model = pm.make_model(name)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            yield name, model, pm.batches(name, 8), 5000, opt, pm.loss_fn, 0
    else:
        raise SystemExit(f"which must be cells, models or heldout, got {which!r}")


def record(which: str, steps: int) -> None:
    rows = []
    t = time.perf_counter()
    for name, model, batches, budget, opt, loss_fn, seed in runs(which):
        rows.append(
            {"name": name, "trace": _record_run(model, batches, budget, opt, loss_fn, seed, steps)}
        )
        print(name, f"{time.perf_counter() - t:.0f} s", flush=True)
        t = time.perf_counter()
    out = ROOT / f"benchmarks/results/decision_trajectories_{which}.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=0))
    for r in rows:
        print(r["name"])
        for m, lam, res, sig in r["trace"]:
            sig_text = "-" if sig is None else f"{sig:.4f}"
            print(f"  step {m:2d}  theta {lam:.5g}  residual {res:.3g}  sigma {sig_text}")


def current_stop(trace, rule: DecisionRule = DECISION_RULE) -> int:
    """The step ``rule`` decides at (replayed), or the last step recorded (the default: the plain
    rule of ``probe_curvature``; ``auto_uba``'s gated links add a ``noise_ceiling``,
    ``uba_auto.probe.rule_for_link``)."""
    previous = None
    for m, lam, res, sig in trace:
        if m >= rule.min_steps and lam > 0 and rule.settled(sig, previous) and res <= rule.rtol:
            return m
        previous = sig
    return trace[-1][0]


def gate_stop(trace, rho: float, margin: float, min_steps: int = 3) -> int | None:
    """The step the gate-aware branch would stop at, or ``None``."""
    previous = None
    for m, lam, res, sig in trace:
        if (
            m >= min_steps
            and lam > 0
            and sig is not None
            and previous is not None
            and res <= rho
            and min(sig, previous) >= margin * GATE
        ):
            return m
        previous = sig
    return None


def stops(files: list[str]) -> None:
    rows = [r for f in files for r in json.loads(Path(f).read_text())["rows"]]
    rows = [r for r in rows if r["trace"][-1][3] not in (None, 0.0)]  # minibatch runs only
    print(f"{len(rows)} runs with a curvature noise, from {', '.join(files)}")
    for rho, margin in SETTINGS:
        now = new = fired = below = 0
        worst = float("inf")
        for r in rows:
            trace = r["trace"]
            c, g = current_stop(trace), gate_stop(trace, rho, margin)
            now += c
            if g is not None and g < c:
                fired += 1
                later = min(t[3] for t in trace if t[0] > g)
                worst = min(worst, later / trace[g - 1][3])
                below += later < GATE
                new += g
            else:
                new += c
        worst_text = "n/a" if fired == 0 else f"{worst:.2f}"
        print(
            f"rho {rho:<4g} M {margin:<3g}: decision steps {now} -> {new} ({new / now:.2f}x), "
            f"fired in {fired}/{len(rows)}, worst later sigma / sigma at the stop {worst_text}, "
            f"fell below the gate later in {below}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("which", choices=["cells", "models", "heldout"])
    rec.add_argument("--steps", type=int, default=16)
    st = sub.add_parser("stops")
    st.add_argument("files", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cmd == "record":
        record(args.which, args.steps)
    else:
        stops(args.files)


if __name__ == "__main__":
    main()
