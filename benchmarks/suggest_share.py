r"""How far a peak rate suggested from the stability limit lands from the tuned peak.

``auto_uba(peak_lr="suggest")`` sets the peak rate to a share :math:`s` of the optimizer's
stability limit: :math:`\eta = s\,\ell / \lambda`, with :math:`\lambda` the sharpness the
optimizer sees at initialisation (the Hessian's :math:`\lambda_{\max}` plus coupled weight decay
for SGD; the preconditioned :math:`\lambda_{\max}` for Adam) and :math:`\ell` its limit on
:math:`\eta\lambda` (:func:`uba_auto.phi.optimizer_stability`). This script measures, for every
cell (task, budget) of the φ study, the share :math:`e^* = \eta^*\lambda/\ell` at which the
peak tuned for cosine annealing sits, fits :math:`s` as the geometric mean of :math:`e^*` over the
calibration cells (``benchmarks/results/phi_sweep.json``, SGD) and reports the ratio
suggestion / tuned peak on every cell, calibration and held out
(``phi_sweep_holdout.json``, ``phi_sweep_holdout_gd.json``), and for the AdamW task when its
sweep is given (``--adamw benchmarks/results/adamw_edge.json``).

Nothing is trained here: the tuned peaks and the curvature at initialisation are read from the
sweeps' JSON (their commands are in BENCHMARKS.md). Run::

    python benchmarks/suggest_share.py
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uba_auto.phi import SUGGESTED_SHARE, stability_limit

RESULTS = Path(__file__).resolve().parent / "results"


def cells(path: Path) -> list[dict]:
    """``(task, budget, tuned peak, e* per seed)`` of every cell of a phi_sweep JSON."""
    data = json.loads(path.read_text())
    out = []
    for cell in data["cells"]:
        task = cell["task"]
        lams = [p["lambda_max"] for key, p in data["probes"].items() if key.startswith(task + "/")]
        # torch.optim.SGD heavy ball: the study's tasks use no dampening, Nesterov or decay.
        limit = stability_limit(cell["momentum"])
        shares = [cell["peak_lr"] * lam / limit for lam in lams]
        out.append(
            {
                "task": task,
                "budget": cell["budget"],
                "optimizer": f"SGD(momentum={cell['momentum']:g})",
                "tuned_peak": cell["peak_lr"],
                "at_grid_edge": cell["peak_lr_at_grid_edge"],
                "share": math.exp(statistics.fmean(math.log(e) for e in shares)),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adamw", type=Path, default=None, help="adamw_edge.py's JSON")
    args = parser.parse_args()
    calibration = cells(RESULTS / "phi_sweep.json")
    held = cells(RESULTS / "phi_sweep_holdout.json")
    gd = RESULTS / "phi_sweep_holdout_gd.json"
    if gd.exists():
        held += cells(gd)
    fit = math.exp(statistics.fmean(math.log(c["share"]) for c in calibration))
    share = SUGGESTED_SHARE["hessian"]
    print(
        f"SGD share fitted on {len(calibration)} calibration cells: {fit:.3g} "
        f"(uba_auto.phi.SUGGESTED_SHARE['hessian'] = {share:g})"
    )
    print(
        f"(geometric mean of e* = tuned peak * lambda_max / limit; spread of e*: "
        f"{min(c['share'] for c in calibration):.3g} .. {max(c['share'] for c in calibration):.3g})"
    )
    rows = [("calibration", c) for c in calibration] + [("held out", c) for c in held]
    adaptive = SUGGESTED_SHARE["preconditioned"]
    if args.adamw is not None:
        data = json.loads(args.adamw.read_text())
        adam_cells = data.get("suggest_cells", [])
        rows += [("AdamW (fit)", {**c, "fitted_share": adaptive}) for c in adam_cells]
        fit = math.exp(statistics.fmean(math.log(c["share"]) for c in adam_cells))
        print(
            f"AdamW share fitted on {len(adam_cells)} cells of gpt_adamw: {fit:.3g} "
            f"(uba_auto.phi.SUGGESTED_SHARE['preconditioned'] = {adaptive:g})"
        )
    print()
    print(
        "| set | task | budget | optimizer | tuned peak | e* (tuned share) | suggestion / tuned |"
    )
    print("|---|---|---|---|---|---|---|")
    for what, c in rows:
        s = c.get("fitted_share", share)
        print(
            f"| {what} | {c['task']} | {c['budget']} | {c['optimizer']} | {c['tuned_peak']:.3g}"
            f"{' (grid edge)' if c.get('at_grid_edge') else ''} | {c['share']:.3g} | "
            f"{s / c['share']:.3g} |"
        )
    ratios = [share / c["share"] for what, c in rows if not what.startswith("AdamW")]
    logs = sorted(abs(math.log(r)) for r in ratios)
    print()
    print(
        f"SGD cells: median |log ratio| = x{math.exp(statistics.median(logs)):.3g}, "
        f"worst x{math.exp(logs[-1]):.3g} (a factor off the tuned peak, either way)"
    )


if __name__ == "__main__":
    main()
