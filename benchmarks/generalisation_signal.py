"""How much of a cosine run's progress reaches the held-out loss, early on, against the best φ.

An exploration on stored sweeps (no training), not a rule: for each cell's cosine runs it reads,
over the window of 10 % of the budget ending at a fraction ``f`` of it, the *generalisation share
of progress*

    G(f) = [log L_heldout(f - 0.1) - log L_heldout(f)] / [log L_train(f - 0.1) - log L_train(f)]

(``L_train``: the mean minibatch loss of the curve point, what training saw; ``L_heldout``: the
curve's held-out loss; the curve points nearest to those fractions; median over seeds). Near 1,
the held-out loss falls as fast as the training loss: the run is progress-limited, where a held
rate should pay. Near or below 0, the training loss falls alone: it memorises, where an early
decay should. Printed: every cell sorted by its best φ, and Spearman(log best φ, G(f)) for each f.

    python benchmarks/generalisation_signal.py [--sweeps FILE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from scipy.stats import spearmanr

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SWEEPS = [
    RESULTS / name
    for name in (
        "phi_sweep_wide.json",
        "phi_sweep_holdout_wide.json",
        "phi_sweep_holdout_gd_wide.json",
        "phi_sweep_gpt_adamw_wide.json",
        "phi_sweep_hold_test.json",
    )
]
FRACTIONS = (0.1, 0.2, 0.3, 0.4)
WINDOW = 0.1


def _nearest(steps: list[int], step: float) -> int:
    return min(range(len(steps)), key=lambda i: abs(steps[i] - step))


def share_of_progress(run: dict, fraction: float) -> float:
    """G(fraction) of one stored run (NaN when the window is empty or training did not fall)."""
    steps, budget = run["curve_steps"], run["budget"]
    end = _nearest(steps, fraction * budget)
    start = _nearest(steps, max(fraction - WINDOW, 0.0) * budget)
    if end == start:
        return math.nan
    train, held = run["curve_train_loss"], run["curve_heldout_loss"]
    fell = math.log(train[start]) - math.log(train[end])
    if not fell > 1e-9:
        return math.nan
    return (math.log(held[start]) - math.log(held[end])) / fell


def cells(paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        for cell in json.loads(path.read_text())["cells"]:
            sched = cell["schedules"]
            phis = {
                float(k[4:]): v["heldout_loss_mean"]
                for k, v in sched.items()
                if k.startswith("phi=")
            }
            best = min(phis, key=phis.get)
            runs = cell["runs"].get("cosine") or cell["runs"]["phi=2"]
            signal = {}
            for f in FRACTIONS:
                values = [g for g in (share_of_progress(r, f) for r in runs) if not math.isnan(g)]
                signal[f] = statistics.median(values) if values else math.nan
            gain = phis[best] / sched["cosine"]["heldout_loss_mean"] - 1
            out.append({"cell": f"{cell['task']}/{cell['budget']}", "best_phi": best, "gain": gain,
                        "G": signal})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", nargs="+", type=Path, default=DEFAULT_SWEEPS)
    args = parser.parse_args(argv)
    rows = sorted(cells(args.sweeps), key=lambda r: r["best_phi"])
    head = " | ".join(f"G({f:g})" for f in FRACTIONS)
    print(f"| cell | best φ | best φ vs cosine | {head} |")
    print("|---|---|---|" + "---|" * len(FRACTIONS))
    for r in rows:
        gs = " | ".join(f"{r['G'][f]:+.2f}" for f in FRACTIONS)
        print(f"| {r['cell']} | {r['best_phi']:g} | {100 * r['gain']:+.2f} % | {gs} |")
    print()
    for f in FRACTIONS:
        pairs = [(math.log(r["best_phi"]), r["G"][f]) for r in rows if not math.isnan(r["G"][f])]
        rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
        print(f"Spearman(log best phi, G({f:g})) = {rho:+.2f} over {len(pairs)} cells")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
