"""The demo's fixed setup: the data split, the optimizer, the peak rate and the budgets.

Everything here is the same for every schedule the demo trains, so that the comparison is about
the schedule only (see :mod:`uba_auto.demo`).
"""

from __future__ import annotations

from typing import Any

DATA_SEED = 12345
"""Seed of the train/held-out split (fixed; run seeds change the initial weights and batches)."""

NUM_TRAIN = 500
"""Train images; the other 1297 of the 1797 are held out. Few enough that the schedule matters:
the network fits the train set long before the budget ends, and the held-out loss separates the
schedules."""

DEMO_BATCH_SIZE = 64
DEMO_MOMENTUM = 0.9

DEMO_PEAK_LR = 0.05
"""The peak learning rate of every schedule (SGD, momentum 0.9, batch 64).

Chosen by a sweep of cosine annealing at the default budget and seed 0 (held-out loss at the end:
0.086 at 0.025, 0.069 at 0.05, 0.073 at 0.1; at 0.2 the network does not train). At 0.05 the UBA
family trains over the whole range the auto choice can pick (φ = 0.25 and φ = 16 reach held-out
losses of 0.077 and 0.072). It is deliberately not ``1 / λ_max`` of the probe
(``peak_lr="suggest"``), a rule for plain SGD, and it is the same for every schedule, so that the
comparison is about the shape of the schedule only."""

DEMO_BUDGET = 6000
"""Default budget in optimizer steps: about 20 s per schedule on two idle CPU cores."""

CURVE_POINTS = 50
"""Default number of points of the loss and learning-rate curves; the held-out set is evaluated
at each."""

QUICK_BUDGET = 40
"""Budget of ``uba-auto demo --quick`` (a smoke test of a few seconds, not a comparison)."""

QUICK_PROBE: dict[str, Any] = {"max_hvps": 24, "trace_matvecs": 3, "density_iters": 8}
"""Probe settings of ``--quick``: a coarse probe, enough to exercise every part of the report."""

DEMO_NUM_BATCHES = 8
"""Minibatches the curvature probe uses by default (the first ones of the training stream)."""

QUICK_NUM_BATCHES = 2
"""Minibatches the probe uses with ``--quick``."""

QUICK_CURVE_POINTS = 10
"""Points of the curves with ``--quick``."""
