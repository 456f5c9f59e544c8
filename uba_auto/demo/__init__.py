r"""The ``uba-auto demo``: probe a small CNN, then train it with the auto-chosen UBA schedule and
with cosine annealing under the same budget, and compare.

Everything is fixed except the learning-rate schedule, so that the comparison is about the
schedule only:

* the data: scikit-learn's ``load_digits`` (1797 images of 8×8 pixels, shipped with scikit-learn,
  nothing is downloaded), pixel values scaled to [0, 1], split once into :data:`NUM_TRAIN` train
  and 1297 held-out images by :data:`DATA_SEED` (the split does not depend on the run seed);
* the model, :func:`make_demo_model`, initialised from the run seed (the same weights for every
  schedule);
* the minibatch order and the augmentation (each train image shifted by at most one pixel in each
  direction, :func:`shift_images`), drawn from a private generator seeded from the run seed, so
  every schedule sees the same batches in the same order; the curvature probe uses the first
  ``num_batches`` of them;
* the optimizer, SGD with momentum :data:`DEMO_MOMENTUM`, batch :data:`DEMO_BATCH_SIZE`, and the
  peak rate :data:`DEMO_PEAK_LR` for every schedule; every schedule decays to 0 at the last of the
  ``budget`` steps (``total_steps = budget - 1``, as :meth:`AutoUBA.make_scheduler
  <uba_auto.auto.AutoUBA.make_scheduler>`).

:func:`run_demo` runs it and returns a :class:`DemoResult` (the table, the curves, the curvature
report); :meth:`DemoResult.plot` draws the figure and :func:`write_demo_files` writes the files.
scikit-learn and matplotlib come with ``pip install "uba-auto[demo]"``.

The package, by concern: :mod:`~uba_auto.demo.settings` (the fixed setup),
:mod:`~uba_auto.demo.environment` (optional packages, device), :mod:`~uba_auto.demo.data` (digits,
minibatch stream, CNN), :mod:`~uba_auto.demo.training` (:func:`run_demo`) and
:mod:`~uba_auto.demo.result` (:class:`DemoResult`, :func:`write_demo_files`).
"""

from .data import make_demo_model, shift_images
from .environment import check_demo_dependencies, resolve_device
from .result import DEMO_FILES, DemoResult, DemoRun, write_demo_files
from .settings import (
    CURVE_POINTS,
    DATA_SEED,
    DEMO_BATCH_SIZE,
    DEMO_BUDGET,
    DEMO_MOMENTUM,
    DEMO_NUM_BATCHES,
    DEMO_PEAK_LR,
    NUM_TRAIN,
    QUICK_BUDGET,
    QUICK_CURVE_POINTS,
    QUICK_NUM_BATCHES,
    QUICK_PROBE,
)
from .training import run_demo

__all__ = [
    "CURVE_POINTS",
    "DATA_SEED",
    "DEMO_BATCH_SIZE",
    "DEMO_BUDGET",
    "DEMO_FILES",
    "DEMO_MOMENTUM",
    "DEMO_NUM_BATCHES",
    "DEMO_PEAK_LR",
    "NUM_TRAIN",
    "QUICK_BUDGET",
    "QUICK_CURVE_POINTS",
    "QUICK_NUM_BATCHES",
    "QUICK_PROBE",
    "DemoResult",
    "DemoRun",
    "check_demo_dependencies",
    "make_demo_model",
    "resolve_device",
    "run_demo",
    "shift_images",
    "write_demo_files",
]
