"""The plateau rule's cool-down φ: the choice pre-registered in
``benchmarks/results/prereg_cool_phi.md``, applied to stored ``benchmarks/plateau_rule.py`` results.

For each variant (``--variant VALUE FILE ...``: the COOL_PHI value and its result files) it
counts the cells where the rule is worse than cosine by more than 1 %, the mean of (rule vs the
best φ) and the cells within 1 % of the best φ, and prints every cell side by side. The headline
of a ``--mode heldout`` file is its test half, of a calibration file the whole held-out set.
The choice: fewest cells worse than cosine by more than 1 % (ties: the smaller mean of rule vs
best φ), replacing 2 only with strictly fewer such cells and no larger mean.

    python benchmarks/plateau_cool_phi.py --variant 2 FILES... --variant 4 FILES... \
        --variant 16 FILES...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def cells(files: list[Path]) -> dict[str, dict]:
    out = {}
    for path in files:
        for cell in json.loads(path.read_text())["cells"]:
            head = cell["test"] if "test" in cell else cell["heldout"]
            out[f"{cell['task']}/{cell['budget']}"] = head
    return out


def summary(rows: dict[str, dict]) -> dict:
    worse = [name for name, h in rows.items() if h["rule_vs_cosine"] > 0.01]
    return {
        "worse_than_cosine": worse,
        "mean_vs_best": statistics.mean(h["rule_vs_best"] for h in rows.values()),
        "within_1pct_of_best": sum(h["rule_vs_best"] <= 0.01 for h in rows.values()),
        "num_cells": len(rows),
    }


def choose(summaries: dict[float, dict], baseline: float = 2.0) -> float:
    """The pre-registered choice among the variants (the baseline unless one beats it)."""
    best = min(
        summaries,
        key=lambda v: (len(summaries[v]["worse_than_cosine"]), summaries[v]["mean_vs_best"]),
    )
    base, cand = summaries[baseline], summaries[best]
    better = len(cand["worse_than_cosine"]) < len(base["worse_than_cosine"])
    return best if better and cand["mean_vs_best"] <= base["mean_vs_best"] else baseline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs="+", action="append", required=True,
                        metavar="VALUE FILE")  # fmt: skip
    args = parser.parse_args(argv)
    variants = {float(v[0]): cells([Path(f) for f in v[1:]]) for v in args.variant}
    if 2.0 not in variants:
        parser.error("--variant 2 FILES... (the shipped rule) is the baseline and is required")
    summaries = {v: summary(rows) for v, rows in variants.items()}
    names = list(variants[2.0])
    print("| cell | " + " | ".join(f"rule vs cosine, COOL_PHI = {v:g}" for v in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for name in names:
        vals = [variants[v].get(name) for v in variants]
        shown = [f"{100 * h['rule_vs_cosine']:+.2f} %" if h else "n/a" for h in vals]
        print(f"| {name} | " + " | ".join(shown) + " |")
    print()
    for v, s in summaries.items():
        print(
            f"COOL_PHI = {v:g}: worse than cosine by > 1 % in {len(s['worse_than_cosine'])} of "
            f"{s['num_cells']} ({', '.join(s['worse_than_cosine'])}); within 1 % of the best phi "
            f"in {s['within_1pct_of_best']}; mean rule vs best phi {100 * s['mean_vs_best']:+.2f} %"
        )
    print(f"\npre-registered choice: COOL_PHI = {choose(summaries):g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
