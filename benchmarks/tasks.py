r"""The task suite of the φ validation study: small, seeded, CPU-fast training problems.

Every task trains on data that ships with an installed package (scikit-learn's ``load_digits`` and
``load_breast_cancer``, the text of :mod:`pydoc_data.topics`) or that it generates itself; nothing
is downloaded. A task fixes everything except the learning-rate schedule and its peak:

* the data, split once into a train and a held-out set (the split does not depend on the seed);
* the model, built by :meth:`Task.make_model` from a seed (the global RNG is forked, not consumed);
* the loss, the optimizer (plain SGD, optionally with momentum, unless the task declares its own
  :attr:`Task.optimizer_factory`), the warm-up (a fraction of the budget, composed with the schedule
  under test; none for the SGD tasks), gradient clipping (none for the SGD tasks) and the batch
  size;
* the minibatch order, drawn from a :class:`torch.Generator` seeded from the run seed
  (:meth:`Task.batches`); the curvature probe uses the first batches of the same stream;
* two budgets in optimizer steps, each with the regime expected within it (``"under-fit"``: the
  held-out loss still falls at the end; ``"over-fit"``: the held-out loss has passed its minimum
  and rises by the end of training). The sweep also measures the regime, see
  ``benchmarks/phi_sweep.py``.

``base_lr[budget]`` is the centre of the peak-rate sweep (×0.25 … ×4), one per budget: the rate
that is best for cosine moves by more than the grid's ×16 between a short and a ten-times-longer
budget on the over-fitting tasks. They were set by hand from a first 3-seed sweep with one base per
task, so that the cosine optimum lies inside the grid where it can (when a larger rate is unstable,
the optimum may still be the top of the grid). For ``lstsq_illcond`` the base is
:math:`1/\lambda_{\max}` exactly, so that ×2 is the stability limit of gradient descent.

Representative tasks (:data:`REPRESENTATIVE_TASK_NAMES`, in neither suite above, so no existing
script runs them by default) train the way users train large models:

* ``gpt_adamw``: a GPT-style decoder LM (``benchmarks/transformer.py``: token and learned
  position embeddings, 3 pre-LayerNorm blocks of causal 4-head self-attention and a GELU MLP,
  ``d_model`` 96, untied head, no dropout; 0.39 M parameters) on the bytes of
  :mod:`pydoc_data.topics` (vocabulary 256; the last 10 % of the bytes held out), sequences of 64
  bytes, batch 16 (1024 tokens a step). AdamW with β = (0.9, 0.95), ε = 1e-8, weight decay 0.1
  on the weight matrices of the linear layers only (two param groups: none on biases, LayerNorm
  and embeddings), a linear warm-up over the first 5 % of the budget from 0 to the peak, then the
  schedule under test, and the gradient norm clipped at 1.0. Budgets 500 and 1000 steps (0.5 M
  and 1 M tokens, 1.2 and 2.4 passes over the 0.42 M train bytes). Loss: mean next-byte
  cross-entropy over all 64 positions (nats per byte); the accuracy is next-byte accuracy.
  ``base_lr`` is the best cosine peak of a sweep x0.25 … x4 around 3e-3 (seeds 0 and 1, mean
  held-out loss): 3e-3 for 500 steps (1.909; 6e-3: 1.960), 6e-3 for 1000 steps (1.533; 3e-3:
  1.572; 1.2e-2: 1.801, a loss spike on seed 1). Both budgets under-fit (the held-out loss still
  falls steeply at the end). One 1000-step run: about 50 s on one thread (the sweep's setting;
  50 s of CPU time measured on a shared machine), an estimated 30–35 s on two idle threads (28 ms
  a training step); the results are bit-reproducible for a fixed thread count only.

Held-out representative tasks (:data:`HELDOUT_REPRESENTATIVE_TASK_NAMES`) are kept out of every
fit of the φ link and were tuned with cosine only, so that the rule tested on them is written
down before any other schedule runs on them. Both train on scikit-learn's 1797 digits as
``(N, 1, 8, 8)`` images (pixel / 16, standardised by the train set's mean and std over all pixels),
1200 train / 597 held-out (:func:`_split`), batch 64, with light augmentation drawn from the run's
own stream (:attr:`Task.augment`): each train image shifted by -1 .. 1 pixels along each axis
(pad 1 with the background, random 8x8 crop; no flips, digits are not flip-invariant).
Models in ``benchmarks/vision_models.py``.

* ``resnet_bn``: a ResNet (3x3 stem, three stages of one basic block, widths 16-32-64, strides
  1-2-2, BatchNorm, global average pooling; 78 k parameters), SGD with Nesterov momentum 0.9 and
  weight decay 5e-4 on every parameter (the classic CIFAR recipe's
  ``SGD(model.parameters(), ...)``), no warm-up (as those recipes at batch 128), no clipping.
  ``benchmarks/train.py`` evaluates in eval mode (BatchNorm on its running statistics, since
  2026-12-02); the cosine-only sweep below that set ``base_lr`` was run when it evaluated in
  train mode (the held-out set's own batch statistics), so its losses are not those of later
  runs; the sweep's ×0.25…×4 grid re-tunes the peak. Budgets 300 and 1200 steps (16
  and 64 epochs). Cosine-only sweep, mean held-out loss of seeds 0 and 1 (per seed in brackets):

  300 steps: 0.025: 0.0332 (0.0260, 0.0403); 0.05: 0.0346 (0.0255, 0.0436); 0.1: 0.0253 (0.0238,
  0.0267); 0.2: 0.0281 (0.0251, 0.0310); 0.4: 0.0287 (0.0365, 0.0209); 0.8: 0.0712 (0.0782, 0.0641).
  1200 steps: 0.025: 0.0238 (0.0158, 0.0317); 0.05: 0.0199 (0.0165, 0.0232); 0.1: 0.0218 (0.0173,
  0.0263); 0.2: 0.0160 (0.0179, 0.0141); 0.4: 0.0200 (0.0175, 0.0225); 0.8: 0.0261 (0.0318, 0.0204).

  ``base_lr`` 0.2 for both (grid 0.05 .. 0.8, both ends worse than the inside). Held-out
  accuracy 99-99.7 %: the loss is set by a handful of examples, and the seed-to-seed spread (up
  to ×1.6 at one rate) is far above 1 %; compare schedules paired over seeds.
* ``vit_adamw``: a ViT (2x2 patches, 16 tokens, learned position embeddings, mean pooling,
  2 pre-LayerNorm blocks of bidirectional 4-head attention and a GELU MLP, d 48; 58 k
  parameters), AdamW with β = (0.9, 0.999), ε = 1e-8, weight decay 0.05 on the linear weight
  matrices only (:func:`~benchmarks.transformer.adamw_param_groups`), 5 % linear warm-up,
  gradient norm clipped at 1.0. Budgets 600 and 1200 steps (32 and 64 epochs); a 300-step
  budget would sit on the plateau the ViT starts on. Cosine-only sweep, as above:

  600 steps: 1e-3: 0.959 (0.971, 0.947); 2e-3: 1.032 (1.185, 0.879); 4e-3: 0.862 (0.969, 0.756);
  8e-3: 0.992 (1.357, 0.626); 1.6e-2: 1.407 (1.281, 1.533).
  1200 steps: 1e-3: 0.526 (0.528, 0.524); 2e-3: 0.391 (0.380, 0.403); 4e-3: 0.337 (0.383, 0.290);
  8e-3: 0.375 (0.358, 0.393); 1.6e-2: 0.865 (0.668, 1.063).

  ``base_lr`` 4e-3 for both, the centre of the grid. Both budgets under-fit (the held-out loss
  still falls at the end). The 600-step losses depend on when a seed leaves the plateau (×2
  between seeds at 8e-3).

One 1200-step run at ``base_lr`` on one thread: 21 s of CPU time for ``resnet_bn``, 25 s for
``vit_adamw`` (measured on a shared 2-core machine at load 7, so an upper bound; 32 and 37 s wall
there); the results are bit-reproducible for a fixed thread count (the timing runs repeated the
sweep's losses exactly).

The hold rule's test tasks (:data:`HOLD_TEST_TASK_NAMES`;
``benchmarks/results/prereg_hold_rule.md``) were built after that rule was committed:
``lstm_adamw`` (a char LSTM LM on the docstrings of 20 stdlib modules, AdamW, warm-up,
clipping), ``noisy_mlp_adamw`` (a GELU MLP on 400 synthetic rows with 15 % flipped labels,
AdamW: built to over-fit) and ``bn_mlp_sgd`` (an MLP with BatchNorm on 3000 synthetic rows,
Nesterov SGD with weight decay). Their ``base_lr`` is a common default for the optimizer, the
centre of the sweep's grid; the tuned peaks are in ``benchmarks/results/phi_sweep_hold_test.json``.
One run took 0.4-15 s of wall time on one thread here (the sweep, 2 workers on 2 cores).

The trend rule's test tasks (:data:`TREND_TEST_TASK_NAMES`;
``benchmarks/results/prereg_trend_rule.md``) were written after that rule's constant was chosen
and first trained in its test: ``gpt_code_adamw`` (a GPT byte LM on the source code of 16 stdlib
modules, AdamW, warm-up, clipping; the text depends on the Python version, its hash is in
``meta``), ``cnn_bn_noisy_sgd`` (a VGG-style BatchNorm CNN on the digits with fixed pixel noise,
Nesterov SGD with weight decay) and ``mixer_adamw`` (an MLP-Mixer on the same noisy digits,
AdamW). Their ``base_lr`` is a common default, the centre of the grid; the tuned peaks are in
``benchmarks/results/trend/test.json`` (``peak_tuning``). A step took 6-15 ms on one thread.

Use :func:`get_task` (cached per process), :data:`TASK_NAMES`, :data:`HOLDOUT_TASK_NAMES`,
:data:`REPRESENTATIVE_TASK_NAMES`, :data:`HELDOUT_REPRESENTATIVE_TASK_NAMES`,
:data:`HOLD_TEST_TASK_NAMES` or :data:`TREND_TEST_TASK_NAMES`.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.probe_models import digits_cnn
from benchmarks.transformer import TinyGPT, adamw_param_groups, lm_cross_entropy
from benchmarks.vision_models import DigitsResNet, DigitsViT, random_translate

__all__ = [
    "HELDOUT_REPRESENTATIVE_TASK_NAMES",
    "HOLDOUT_TASK_NAMES",
    "HOLD_TEST_TASK_NAMES",
    "REPRESENTATIVE_TASK_NAMES",
    "SHAPE_TEST_TASK_NAMES",
    "TASK_NAMES",
    "TREND30_TEST_TASK_NAMES",
    "TREND_TEST_TASK_NAMES",
    "Task",
    "get_task",
]

# The one seed that fixes every split and every generated dataset; run seeds only change the
# initialisation and the minibatch order.
DATA_SEED = 12345


@dataclass(frozen=True, eq=False)
class Task:
    """One training problem of the suite.

    Attributes:
        name: registry key.
        description: one line for tables and the JSON results.
        kind: ``"classification"`` (held-out accuracy reported) or ``"regression"``.
        model_factory: builds the untrained model; called inside a forked, seeded RNG.
        loss_fn: ``loss_fn(outputs, targets)``, a scalar mean over the batch.
        x_train, y_train, x_heldout, y_heldout: in-memory tensors (row ``i`` is example ``i``).
        batch_size: minibatch size; ``None`` for full-batch gradient descent.
        momentum: SGD momentum (0 for plain SGD); unused (0) when ``optimizer_factory`` is set.
        budgets: the two budgets, in optimizer steps.
        expected_regime: ``budget -> "under-fit" | "over-fit"``, the regime the task was designed
            to be in (the sweep measures it too).
        base_lr: ``budget -> rate``, the centre of the peak-rate sweep for that budget.
        curve_eval_size: held-out examples used for the loss curve during training (an evenly
            spaced subset when smaller than the held-out set); final losses always use all of it.
        train_eval_size: train examples used for the final train loss (evenly spaced subset).
        probe_batches: how many of the first minibatches the curvature probe uses.
        meta: anything else worth recording (sizes, generated spectrum...).
        optimizer_factory: ``factory(model, peak_lr) -> optimizer`` for a task that is not trained
            with SGD (:meth:`make_optimizer` calls it); ``None``: SGD with ``momentum``.
        optimizer_name: how :meth:`summary` names that optimizer (``None``: the SGD default).
        warmup_fraction: linear warm-up from 0 to the peak over the first
            ``round(warmup_fraction * budget)`` steps (:meth:`warmup_steps`), composed with the
            schedule under test by ``benchmarks/train.py``; 0: no warm-up.
        grad_clip: clip the gradient's total 2-norm to this before every optimizer step
            (:func:`torch.nn.utils.clip_grad_norm_`); ``None``: no clipping.
        augment: ``augment(x_batch, generator) -> x_batch``, applied to every training minibatch
            by :meth:`batches` with the stream's own generator (so a seed's stream, augmentation
            included, is reproducible and the probe sees the batches training sees); the labels
            are not touched. ``None``: no augmentation. Never applied to evaluation sets.
        augment_name: how :meth:`summary` names the augmentation.
    """

    name: str
    description: str
    kind: str
    model_factory: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    x_train: Tensor
    y_train: Tensor
    x_heldout: Tensor
    y_heldout: Tensor
    batch_size: int | None
    momentum: float
    budgets: tuple[int, int]
    expected_regime: dict[int, str]
    base_lr: dict[int, float]
    curve_eval_size: int | None = None
    train_eval_size: int | None = None
    probe_batches: int = 4
    meta: dict = field(default_factory=dict)
    optimizer_factory: Callable[[nn.Module, float], torch.optim.Optimizer] | None = None
    optimizer_name: str | None = None
    warmup_fraction: float = 0.0
    grad_clip: float | None = None
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None
    augment_name: str | None = None

    @property
    def num_train(self) -> int:
        return self.x_train.shape[0]

    def make_model(self, seed: int) -> nn.Module:
        """The model initialised from ``seed``; the caller's global RNG state is left untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.model_factory()

    def make_optimizer(self, model: nn.Module, peak_lr: float) -> torch.optim.Optimizer:
        """The task's optimizer over ``model`` with every group's ``lr`` at ``peak_lr``."""
        if self.optimizer_factory is not None:
            return self.optimizer_factory(model, peak_lr)
        return torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=self.momentum)

    def warmup_steps(self, budget: int) -> int:
        """The warm-up length of a run of ``budget`` steps: ``round(warmup_fraction * budget)``."""
        return round(self.warmup_fraction * budget)

    def batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The endless minibatch stream of run ``seed``: reshuffled epochs without replacement,
        each minibatch passed through :attr:`augment` when the task has one.

        Full-batch tasks yield the whole train set every step. The generator is private, so the
        stream depends on ``seed`` only; the probe and the training loop of the same seed see the
        same first batches. The augmentation draws from the same generator, after the epoch's
        permutation and in batch order; without one the stream is what it was before the field
        existed.
        """
        gen = torch.Generator().manual_seed(1_000_003 * seed + 17)
        augment = self.augment
        if self.batch_size is None:
            while True:
                x = self.x_train if augment is None else augment(self.x_train, gen)
                yield x, self.y_train
        n, b = self.num_train, self.batch_size
        while True:
            order = torch.randperm(n, generator=gen)
            # Drop the last incomplete batch so every step has the same batch size.
            for start in range(0, n - b + 1, b):
                idx = order[start : start + b]
                x = self.x_train[idx]
                yield (x if augment is None else augment(x, gen)), self.y_train[idx]

    def curve_heldout(self) -> tuple[Tensor, Tensor]:
        return _even_subset(self.x_heldout, self.y_heldout, self.curve_eval_size)

    def train_eval(self) -> tuple[Tensor, Tensor]:
        return _even_subset(self.x_train, self.y_train, self.train_eval_size)

    def summary(self) -> dict:
        """A JSON-ready description of the task (no tensors)."""
        model = self.make_model(0)
        out = {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "num_train": self.num_train,
            "num_heldout": int(self.x_heldout.shape[0]),
            "num_params": sum(p.numel() for p in model.parameters()),
            "batch_size": self.batch_size,
            "momentum": self.momentum,
            "optimizer": self.optimizer_name
            or "SGD" + (f"(momentum={self.momentum})" if self.momentum else ""),
            "budgets": list(self.budgets),
            "expected_regime": {str(k): v for k, v in self.expected_regime.items()},
            "base_lr": {str(k): v for k, v in self.base_lr.items()},
            "curve_eval_size": self.curve_eval_size,
            "train_eval_size": self.train_eval_size,
            "probe_batches": self.probe_batches,
            "meta": self.meta,
        }
        # Only where set, so the summaries of the SGD tasks (and the stored JSON) are unchanged.
        if self.warmup_fraction:
            out["warmup_fraction"] = self.warmup_fraction
        if self.grad_clip is not None:
            out["grad_clip"] = self.grad_clip
        if self.augment is not None:
            out["augment"] = self.augment_name or getattr(
                self.augment, "__name__", repr(self.augment)
            )
        return out


def _even_subset(x: Tensor, y: Tensor, size: int | None) -> tuple[Tensor, Tensor]:
    if size is None or size >= x.shape[0]:
        return x, y
    idx = torch.linspace(0, x.shape[0] - 1, size).round().long()
    return x[idx], y[idx]


def _split(num: int, num_train: int, num_heldout: int | None = None) -> tuple[Tensor, Tensor]:
    """A fixed random split of ``range(num)`` (seeded by :data:`DATA_SEED`)."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(DATA_SEED))
    end = num if num_heldout is None else num_train + num_heldout
    return order[:num_train], order[num_train:end]


def _standardise(train: np.ndarray, heldout: np.ndarray) -> tuple[Tensor, Tensor]:
    """Standardise both sets with the train set's mean and std (constant columns left at 0)."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (
        torch.tensor((train - mean) / std, dtype=torch.float32),
        torch.tensor((heldout - mean) / std, dtype=torch.float32),
    )


# --------------------------------------------------------------------------------------------------
# The tasks


def _digits(num_train: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = data.data.astype(np.float64), data.target
    train, held = _split(len(y), num_train)
    x_train, x_held = _standardise(x[train.numpy()], x[held.numpy()])
    y_t = torch.tensor(y, dtype=torch.long)
    return x_train, y_t[train], x_held, y_t[held]


DIGITS_LABEL_NOISE = 0.2


def _digits_mlp() -> Task:
    # Few train examples, a fifth of them with a wrong label, and a wide network: it fits the clean
    # labels first and then memorises the wrong ones, so the held-out loss passes a minimum and
    # rises (strongly under the long budget). The held-out labels are clean.
    x_train, y_train, x_held, y_held = _digits(num_train=300)
    gen = torch.Generator().manual_seed(DATA_SEED + 1)
    flip = torch.rand(len(y_train), generator=gen) < DIGITS_LABEL_NOISE
    shift = torch.randint(1, 10, (len(y_train),), generator=gen)
    y_train = torch.where(flip, (y_train + shift) % 10, y_train)

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    return Task(
        name="digits_mlp",
        description=(
            f"MLP 64-512-512-10 on 300 standardised digits with {DIGITS_LABEL_NOISE:.0%} of the "
            "train labels wrong, plain SGD, batch 32"
        ),
        kind="classification",
        model_factory=model,
        loss_fn=F.cross_entropy,
        x_train=x_train,
        y_train=y_train,
        x_heldout=x_held,
        y_heldout=y_held,
        batch_size=32,
        momentum=0.0,
        budgets=(300, 3000),
        expected_regime={300: "over-fit", 3000: "over-fit"},
        base_lr={300: 0.05, 3000: 0.0125},
        meta={"label_noise": DIGITS_LABEL_NOISE, "num_wrong_labels": int(flip.sum())},
    )


def _digits_cnn() -> Task:
    x_train, y_train, x_held, y_held = _digits(num_train=1200)

    return Task(
        name="digits_cnn",
        description="CNN conv16-conv32-pool-fc on 1200 digits (1x8x8), SGD momentum 0.9, batch 32",
        kind="classification",
        model_factory=digits_cnn,
        loss_fn=F.cross_entropy,
        x_train=x_train,
        y_train=y_train,
        x_heldout=x_held,
        y_heldout=y_held,
        batch_size=32,
        momentum=0.9,
        budgets=(200, 2000),
        expected_regime={200: "under-fit", 2000: "over-fit"},
        base_lr={200: 0.04, 2000: 0.04},
    )


def _breast_cancer_logreg() -> Task:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x, y = data.data.astype(np.float64), data.target
    train, held = _split(len(y), num_train=400)
    x_train, x_held = _standardise(x[train.numpy()], x[held.numpy()])
    y_t = torch.tensor(y, dtype=torch.float32)

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(30, 1), nn.Flatten(0))

    return Task(
        name="breast_cancer_logreg",
        description=(
            "logistic regression on 400 standardised breast-cancer rows, plain SGD, batch 32"
        ),
        kind="classification",
        model_factory=model,
        loss_fn=F.binary_cross_entropy_with_logits,
        x_train=x_train,
        y_train=y_t[train],
        x_heldout=x_held,
        y_heldout=y_t[held],
        batch_size=32,
        momentum=0.0,
        budgets=(100, 2000),
        # Nearly separable: with a high rate the long budget grows the weights past the held-out
        # optimum (the held-out loss rises); the tuned rate may avoid that.
        expected_regime={100: "under-fit", 2000: "over-fit"},
        base_lr={100: 0.6, 2000: 0.075},
    )


CHAR_CONTEXT = 16


def _char_text() -> str:
    from pydoc_data.topics import topics

    return "".join(topics.values())


def _char_lm() -> Task:
    text = _char_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    codes = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(codes))
    train_codes, held_codes = codes[:split], codes[split:]

    def windows(seq: Tensor) -> tuple[Tensor, Tensor]:
        # Views, not copies: row i is the context seq[i : i + C], its target seq[i + C].
        return seq[:-1].unfold(0, CHAR_CONTEXT, 1), seq[CHAR_CONTEXT:]

    x_train, y_train = windows(train_codes)
    x_held, y_held = windows(held_codes)
    num_vocab = len(vocab)

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Embedding(num_vocab, 16),
            nn.Flatten(1),
            nn.Linear(16 * CHAR_CONTEXT, 256),
            nn.Tanh(),
            nn.Linear(256, num_vocab),
        )

    return Task(
        name="char_lm",
        description=(
            f"char MLP LM (emb16 x ctx{CHAR_CONTEXT} -> 256 tanh -> {num_vocab}) on "
            "pydoc_data.topics, SGD momentum 0.9, batch 64"
        ),
        kind="classification",
        model_factory=model,
        loss_fn=F.cross_entropy,
        x_train=x_train,
        y_train=y_train,
        x_heldout=x_held,
        y_heldout=y_held,
        batch_size=64,
        momentum=0.9,
        budgets=(500, 4000),
        expected_regime={500: "under-fit", 4000: "under-fit"},
        base_lr={500: 0.05, 4000: 0.05},
        curve_eval_size=2048,
        train_eval_size=16384,
        meta={
            "num_chars": len(text),
            "vocab_size": num_vocab,
            "text_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            "heldout": "last 10% of the characters",
        },
    )


LSTSQ_DIM = 50
LSTSQ_KAPPA = 1e4
LSTSQ_NOISE = 0.5


def _lstsq_illcond() -> Task:
    r"""Least squares with an exactly controlled train Hessian spectrum.

    Loss :math:`\tfrac12\,\mathrm{mean}((Xw + b - y)^2)`. The train design is
    :math:`X = \sqrt{n}\,U \mathrm{diag}(\sqrt{h}) V^\top` with :math:`U^\top U = I`, so
    :math:`X^\top X / n = V \mathrm{diag}(h) V^\top`, with :math:`h` geometric from 1 down to
    :math:`1/\kappa`; the columns are centred, so the bias adds one eigenvalue 1 and stays
    decoupled. The held-out rows are drawn from the population with the same covariance. Targets:
    :math:`y = X w^\star + \sigma\varepsilon` with :math:`w^\star = V c`, :math:`c \sim N(0, I)`.
    """
    gen = torch.Generator().manual_seed(DATA_SEED)
    n, d = 1000, LSTSQ_DIM
    h = torch.logspace(0, -math.log10(LSTSQ_KAPPA), d, dtype=torch.float64)
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    raw = torch.randn(n, d, generator=gen, dtype=torch.float64)
    raw = raw - raw.mean(dim=0)
    u, _ = torch.linalg.qr(raw)  # centred orthonormal columns
    x_train = math.sqrt(n) * u @ torch.diag(h.sqrt()) @ v.T
    x_held = torch.randn(2000, d, generator=gen, dtype=torch.float64) @ torch.diag(h.sqrt()) @ v.T
    w_star = v @ torch.randn(d, generator=gen, dtype=torch.float64)
    y_train = x_train @ w_star + LSTSQ_NOISE * torch.randn(n, generator=gen, dtype=torch.float64)
    y_held = x_held @ w_star + LSTSQ_NOISE * torch.randn(2000, generator=gen, dtype=torch.float64)

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(d, 1), nn.Flatten(0))

    def half_mse(outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * F.mse_loss(outputs, targets)

    return Task(
        name="lstsq_illcond",
        description=(
            f"least squares d={d}, train Hessian spectrum geometric in [1/{LSTSQ_KAPPA:g}, 1], "
            f"noise {LSTSQ_NOISE}, full-batch GD"
        ),
        kind="regression",
        model_factory=model,
        loss_fn=half_mse,
        x_train=x_train.float(),
        y_train=y_train.float(),
        x_heldout=x_held.float(),
        y_heldout=y_held.float(),
        batch_size=None,
        momentum=0.0,
        budgets=(100, 1000),
        expected_regime={100: "under-fit", 1000: "under-fit"},
        # 1 / lambda_max: x2 is the stability limit of constant-rate GD.
        base_lr={100: 1.0, 1000: 1.0},
        probe_batches=1,
        meta={
            "kappa": LSTSQ_KAPPA,
            "lambda_max_exact": 1.0,
            "noise_std": LSTSQ_NOISE,
            "heldout_loss_floor": 0.5 * LSTSQ_NOISE**2,
        },
    )


# --------------------------------------------------------------------------------------------------
# Out-of-sample tasks: added after the links were calibrated on the five tasks above, and kept out
# of every fit (``benchmarks/calibrate_phi.py`` uses :data:`TASK_NAMES` only). They test whether a
# link carries over to tasks it has not seen.


def _diabetes_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x, y = data.data.astype(np.float64), data.target.astype(np.float64)
    train, held = _split(len(y), num_train=300)
    x_train, x_held = _standardise(x[train.numpy()], x[held.numpy()])
    y_mean, y_std = y[train.numpy()].mean(), y[train.numpy()].std()
    y_t = torch.tensor((y - y_mean) / y_std, dtype=torch.float32)
    return x_train, y_t[train], x_held, y_t[held]


def _diabetes_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1), nn.Flatten(0)
    )


def _half_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    return 0.5 * F.mse_loss(outputs, targets)


def _diabetes_mlp() -> Task:
    x_train, y_train, x_held, y_held = _diabetes_data()
    return Task(
        name="diabetes_mlp",
        description=(
            "MLP 10-64-64-1 regression on 300 standardised diabetes rows (standardised target), "
            "SGD momentum 0.9, batch 16"
        ),
        kind="regression",
        model_factory=_diabetes_model,
        loss_fn=_half_mse,
        x_train=x_train,
        y_train=y_train,
        x_heldout=x_held,
        y_heldout=y_held,
        batch_size=16,
        momentum=0.9,
        budgets=(200, 2000),
        expected_regime={200: "under-fit", 2000: "over-fit"},
        base_lr={200: 0.01, 2000: 0.0025},
    )


def _full_batch_twin(task: Task, what: str, base_lr: dict[int, float]) -> Task:
    """``task`` trained by full-batch gradient descent (same data, model, loss and budgets):
    the only setting where the default link departs from cosine (no minibatch noise: a small φ),
    tested on tasks it was not set on."""
    return replace(
        task,
        name=f"{task.name}_gd",
        description=f"{what}, full-batch gradient descent"
        + (f" with momentum {task.momentum:g}" if task.momentum else ""),
        batch_size=None,
        base_lr=base_lr,
        probe_batches=1,
    )


def _diabetes_mlp_gd() -> Task:
    what = "MLP 10-64-64-1 regression on 300 standardised diabetes rows (standardised target)"
    return _full_batch_twin(_diabetes_mlp(), what, {200: 0.01, 2000: 0.00125})


def _digits_logreg_gd() -> Task:
    # Convex, like lstsq_illcond, but not quadratic.
    what = "multinomial logistic regression on 1000 standardised digits"
    return _full_batch_twin(_digits_logreg(), what, {100: 4.0, 1000: 1.0})


def _digits_linear() -> nn.Module:
    return nn.Linear(64, 10)


def _digits_logreg() -> Task:
    x_train, y_train, x_held, y_held = _digits(num_train=1000)

    return Task(
        name="digits_logreg",
        description=(
            "multinomial logistic regression on 1000 standardised digits, plain SGD, batch 16"
        ),
        kind="classification",
        model_factory=_digits_linear,
        loss_fn=F.cross_entropy,
        x_train=x_train,
        y_train=y_train,
        x_heldout=x_held,
        y_heldout=y_held,
        batch_size=16,
        momentum=0.0,
        budgets=(100, 1000),
        expected_regime={100: "under-fit", 1000: "under-fit"},
        base_lr={100: 1.0, 1000: 0.4},
    )


# --------------------------------------------------------------------------------------------------
# Representative tasks: trained the way users train large models (AdamW, warm-up, clipping).

GPT_CONTEXT = 64
GPT_D_MODEL = 96
GPT_LAYERS = 3
GPT_HEADS = 4
GPT_BETAS = (0.9, 0.95)
GPT_WEIGHT_DECAY = 0.1


def _adamw(
    model: nn.Module, peak_lr: float, *, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.Optimizer:
    """AdamW with decay on the linear layers' weight matrices only (:func:`adamw_param_groups`),
    eps 1e-8: the recipe every AdamW task here shares, with its own decay and betas."""
    groups = adamw_param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=peak_lr, betas=betas, eps=1e-8)


def _lm_windows(codes: Tensor, context: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_held, y_held)`` of a next-token LM on ``codes``: the first 90 % for
    training, every window (views; row i is tokens i .. i + C - 1, its targets shifted by one),
    the last 10 % held out in non-overlapping windows, so each held-out token is predicted once."""
    split = int(0.9 * len(codes))
    train_codes, held_codes = codes[:split], codes[split:]
    c = context
    x_train, y_train = train_codes[:-1].unfold(0, c, 1), train_codes[1:].unfold(0, c, 1)
    x_held, y_held = held_codes[:-1].unfold(0, c, c), held_codes[1:].unfold(0, c, c)
    return x_train, y_train, x_held, y_held


def _gpt_adamw_optimizer(model: nn.Module, peak_lr: float) -> torch.optim.Optimizer:
    """AdamW as in common GPT recipes: decay on the linear layers' weight matrices only."""
    return _adamw(model, peak_lr, weight_decay=GPT_WEIGHT_DECAY, betas=GPT_BETAS)


def _gpt_model() -> nn.Module:
    return TinyGPT(256, GPT_CONTEXT, GPT_D_MODEL, GPT_LAYERS, GPT_HEADS)


def _gpt_adamw() -> Task:
    data = _char_text().encode("utf-8")
    codes = torch.tensor(list(data), dtype=torch.long)
    c = GPT_CONTEXT
    x_train, y_train, x_held, y_held = _lm_windows(codes, c)
    return Task(
        name="gpt_adamw",
        description=(
            f"GPT decoder (d{GPT_D_MODEL}, {GPT_LAYERS} layers, {GPT_HEADS} heads, ctx {c}) "
            "byte LM on pydoc_data.topics, AdamW (0.9, 0.95) wd 0.1, 5% warm-up, clip 1, batch 16"
        ),
        kind="classification",
        model_factory=_gpt_model,
        loss_fn=lm_cross_entropy,
        x_train=x_train,
        y_train=y_train,
        x_heldout=x_held,
        y_heldout=y_held,
        batch_size=16,
        momentum=0.0,
        budgets=(500, 1000),
        expected_regime={500: "under-fit", 1000: "under-fit"},
        # The best cosine peak of a x0.25..x4 sweep around 3e-3 (2 seeds, see the module docstring).
        base_lr={500: 3e-3, 1000: 6e-3},
        curve_eval_size=128,
        train_eval_size=512,
        optimizer_factory=_gpt_adamw_optimizer,
        optimizer_name=(
            f"AdamW(betas={GPT_BETAS}, eps=1e-8, weight_decay={GPT_WEIGHT_DECAY} on the linear "
            "weight matrices, 0 on biases/LayerNorm/embeddings)"
        ),
        warmup_fraction=0.05,
        grad_clip=1.0,
        meta={
            "num_bytes": len(data),
            "vocab_size": 256,
            "context": c,
            "d_model": GPT_D_MODEL,
            "num_layers": GPT_LAYERS,
            "num_heads": GPT_HEADS,
            "tokens_per_step": 16 * c,
            "text_sha256": hashlib.sha256(data).hexdigest()[:16],
            "heldout": "last 10% of the bytes, non-overlapping windows",
        },
    )


# --------------------------------------------------------------------------------------------------
# Held-out representative tasks: image models trained with common recipes, kept out of every fit
# of the φ link; tuned with cosine only, so that the rule tested on them can be fixed first.

DIGIT_IMAGES_TRAIN = 1200
RESNET_WIDTHS = (16, 32, 64)
RESNET_WEIGHT_DECAY = 5e-4
VIT_PATCH = 2
VIT_D_MODEL = 48
VIT_LAYERS = 2
VIT_HEADS = 4
VIT_BETAS = (0.9, 0.999)
VIT_WEIGHT_DECAY = 0.05
IMAGE_BATCH = 64


@functools.cache
def _digit_images() -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """The 1797 digits as ``(N, 1, 8, 8)`` images: pixel / 16, standardised by the train set's
    mean and std over all pixels (one channel, as per-channel image normalisation), split 1200 /
    597 with :func:`_split`. Also returns the background's value (raw 0) for padding."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = data.images.astype(np.float64) / 16.0, data.target
    train, held = (idx.numpy() for idx in _split(len(y), DIGIT_IMAGES_TRAIN))
    mean, std = x[train].mean(), x[train].std()
    images = torch.tensor((x - mean) / std, dtype=torch.float32).unsqueeze(1)
    y_t = torch.tensor(y, dtype=torch.long)
    return images[train], y_t[train], images[held], y_t[held], float(-mean / std)


def _translate_augment(background: float) -> Callable[[Tensor, torch.Generator], Tensor]:
    # A partial of a module-level function: picklable, for worker processes.
    return functools.partial(random_translate, max_shift=1, fill=background)


_TRANSLATE_NAME = "random translation by up to 1 pixel per axis (pad 1 with background, crop 8x8)"


def _digit_image_task(
    images: Callable[[], tuple[Tensor, Tensor, Tensor, Tensor, float]] = _digit_images, **fields
) -> Task:
    """A classification task on the digit images (``images()``: :func:`_digit_images`, or its
    noisy twin) with what every image task shares: the split, cross-entropy, batch 64 and the
    translation augmentation; ``fields`` give the rest."""
    x_train, y_train, x_held, y_held, background = images()
    return Task(
        kind="classification",
        loss_fn=F.cross_entropy,
        x_train=x_train,
        y_train=y_train,
        x_heldout=x_held,
        y_heldout=y_held,
        batch_size=IMAGE_BATCH,
        momentum=0.0,  # unused: the image tasks declare their optimizer
        augment=_translate_augment(background),
        augment_name=_TRANSLATE_NAME,
        **fields,
    )


def _resnet_model() -> nn.Module:
    return DigitsResNet(widths=RESNET_WIDTHS, blocks_per_stage=1)


def _resnet_optimizer(model: nn.Module, peak_lr: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.9 and weight decay on every parameter, as the classic
    CIFAR ResNet recipes (He et al. 2016; ``torch.optim.SGD(model.parameters(), ...)``)."""
    return torch.optim.SGD(
        model.parameters(),
        lr=peak_lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=RESNET_WEIGHT_DECAY,
    )


def _resnet_bn() -> Task:
    widths = "-".join(str(w) for w in RESNET_WIDTHS)
    return _digit_image_task(
        name="resnet_bn",
        description=(
            f"ResNet ({widths}, 1 basic block a stage, BatchNorm) on 1200 digits (1x8x8), "
            f"translation augmentation, SGD Nesterov 0.9 wd {RESNET_WEIGHT_DECAY:g}, "
            f"batch {IMAGE_BATCH}"
        ),
        model_factory=_resnet_model,
        budgets=(300, 1200),
        # 1200 steps: the held-out loss reaches its minimum at 400-1000 steps and ends 5-15 %
        # above it (train loss 1e-3); 300 steps: still falling near the end.
        expected_regime={300: "under-fit", 1200: "over-fit"},
        # The best cosine peak of a cosine-only sweep 0.025 .. 0.8 (seeds 0 and 1, mean held-out
        # loss; see the module docstring): 0.1 .. 0.4 for 300 steps, 0.2 for 1200. Centred at
        # 0.2, both ends of the x0.25 .. x4 grid are worse than its inside.
        base_lr={300: 0.2, 1200: 0.2},
        optimizer_factory=_resnet_optimizer,
        optimizer_name=(
            f"SGD(momentum=0.9, nesterov=True, weight_decay={RESNET_WEIGHT_DECAY:g} on every "
            "parameter)"
        ),
        meta={
            "widths": list(RESNET_WIDTHS),
            "blocks_per_stage": 1,
            "image_size": 8,
            "heldout": "597 digits (the rest of the 1797)",
            "batchnorm": "batch statistics in training, running statistics in evaluation",
        },
    )


def _vit_model() -> nn.Module:
    return DigitsViT(8, VIT_PATCH, VIT_D_MODEL, VIT_LAYERS, VIT_HEADS)


def _vit_optimizer(model: nn.Module, peak_lr: float) -> torch.optim.Optimizer:
    """AdamW as in ViT / DeiT recipes: decay on the linear layers' weight matrices only."""
    return _adamw(model, peak_lr, weight_decay=VIT_WEIGHT_DECAY, betas=VIT_BETAS)


def _vit_adamw() -> Task:
    tokens = (8 // VIT_PATCH) ** 2
    return _digit_image_task(
        name="vit_adamw",
        description=(
            f"ViT ({VIT_PATCH}x{VIT_PATCH} patches, {tokens} tokens, mean pooling, d{VIT_D_MODEL}, "
            f"{VIT_LAYERS} layers, {VIT_HEADS} heads) on 1200 digits, translation augmentation, "
            f"AdamW {VIT_BETAS} wd {VIT_WEIGHT_DECAY:g}, 5% warm-up, clip 1, batch {IMAGE_BATCH}"
        ),
        model_factory=_vit_model,
        # Not 300: the first ~300 steps are the plateau a ViT spends learning where its patches
        # are (held-out loss ~1.7, 40 % accuracy), so a 300-step run measures the escape time.
        budgets=(600, 1200),
        expected_regime={600: "under-fit", 1200: "under-fit"},
        # The best cosine peak of a cosine-only sweep 1e-3 .. 1.6e-2 (seeds 0 and 1, mean held-out
        # loss; see the module docstring), the centre of the grid for both budgets.
        base_lr={600: 4e-3, 1200: 4e-3},
        optimizer_factory=_vit_optimizer,
        optimizer_name=(
            f"AdamW(betas={VIT_BETAS}, eps=1e-8, weight_decay={VIT_WEIGHT_DECAY:g} on the linear "
            "weight matrices, 0 on biases/LayerNorm/position embeddings)"
        ),
        warmup_fraction=0.05,
        grad_clip=1.0,
        meta={
            "patch": VIT_PATCH,
            "num_tokens": tokens,
            "pooling": "mean",
            "d_model": VIT_D_MODEL,
            "num_layers": VIT_LAYERS,
            "num_heads": VIT_HEADS,
            "image_size": 8,
            "heldout": "597 digits (the rest of the 1797)",
        },
    )


# --------------------------------------------------------------------------------------------------
# The hold rule's test tasks (benchmarks/results/prereg_hold_rule.md): built and first trained after
# that rule and its constant were committed; never used to fit anything.

LSTM_CONTEXT = 32
LSTM_HIDDEN = 128
LSTM_EMBED = 32
LSTM_BETAS = (0.9, 0.99)
LSTM_WEIGHT_DECAY = 0.01
DOC_MODULES = (
    "collections", "itertools", "functools", "string", "textwrap", "json", "re", "random",
    "statistics", "fractions", "decimal", "heapq", "bisect", "shutil", "pathlib", "argparse",
    "logging", "datetime", "calendar", "difflib",
)  # fmt: skip


@functools.cache
def _docstring_text(modules: tuple[str, ...] = DOC_MODULES) -> str:
    """The docstrings of ``modules`` (:data:`DOC_MODULES`) and their public members, in a fixed
    order (the text depends on the Python version; its hash is in the task's ``meta``)."""
    import importlib
    import inspect

    parts: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        objects = [module] + [
            getattr(module, attr) for attr in sorted(vars(module)) if not attr.startswith("_")
        ]
        for obj in objects:
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc and doc not in parts:
                parts.append(doc)
    return "\n\n".join(parts)


class CharLSTM(nn.Module):
    """Embedding -> one LSTM layer -> linear read-out, every position predicted."""

    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out)


def _docstring_lm_task(
    name: str,
    modules: tuple[str, ...],
    context: int,
    model: Callable[[int], Callable[[], nn.Module]],
    description: str,
    budgets: tuple[int, int],
    base_lr: float,
) -> Task:
    """A character LM on the docstrings of ``modules`` (:func:`_docstring_text`), every position
    predicted, windows of ``context`` (:func:`_lm_windows`), trained as the suite's small LMs are:
    AdamW (0.9, 0.99) with decay 0.01 on the linear read-out's weight, 5 % warm-up, clipping at 1,
    batch 32. ``model(vocab_size)`` is the model factory; ``base_lr`` the centre of the grid at
    both ``budgets``."""
    text = _docstring_text(modules)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    codes = torch.tensor([index[c] for c in text], dtype=torch.long)
    x_train, y_train, x_held, y_held = _lm_windows(codes, context)
    return Task(
        name=name,
        description=description,
        kind="classification",
        model_factory=model(len(vocab)),
        loss_fn=lm_cross_entropy,
        x_train=x_train,
        y_train=y_train,
        x_heldout=x_held,
        y_heldout=y_held,
        batch_size=32,
        momentum=0.0,
        budgets=budgets,
        expected_regime=dict.fromkeys(budgets, "under-fit"),
        base_lr=dict.fromkeys(budgets, base_lr),
        curve_eval_size=128,
        train_eval_size=512,
        optimizer_factory=functools.partial(
            _adamw, weight_decay=LSTM_WEIGHT_DECAY, betas=LSTM_BETAS
        ),
        optimizer_name=(
            f"AdamW(betas={LSTM_BETAS}, eps=1e-8, weight_decay={LSTM_WEIGHT_DECAY:g} on the "
            "linear read-out's weight, 0 elsewhere)"
        ),
        warmup_fraction=0.05,
        grad_clip=1.0,
        meta={
            "num_chars": len(text),
            "vocab_size": len(vocab),
            "modules": list(modules),
            "text_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            "heldout": "last 10% of the characters, non-overlapping windows",
        },
    )


def _lstm_adamw() -> Task:
    return _docstring_lm_task(
        "lstm_adamw",
        DOC_MODULES,
        LSTM_CONTEXT,
        lambda v: functools.partial(CharLSTM, v, LSTM_EMBED, LSTM_HIDDEN),
        f"char LSTM LM (emb{LSTM_EMBED}, 1 layer, hidden {LSTM_HIDDEN}, ctx {LSTM_CONTEXT}) on "
        f"stdlib docstrings, AdamW {LSTM_BETAS} wd {LSTM_WEIGHT_DECAY:g}, 5% warm-up, clip 1, "
        "batch 32",
        (400, 1200),
        4e-3,  # a common AdamW default for small recurrent LMs, the centre of the x0.25..x4 grid
    )


NOISY_FLIP = 0.15
NOISY_TRAIN = 400
NOISY_WEIGHT_DECAY = 0.01


def _noisy_mlp_adamw() -> Task:
    from sklearn.datasets import make_classification

    # flip_y relabels that share of the examples at random: the held-out labels carry the same
    # noise, so memorising the train set's wrong labels raises the held-out loss.
    x, y = make_classification(
        n_samples=2000,
        n_features=20,
        n_informative=10,
        n_redundant=4,
        n_classes=4,
        flip_y=NOISY_FLIP,
        class_sep=1.0,
        random_state=DATA_SEED,
    )
    train, held = _split(len(y), NOISY_TRAIN)
    x_train, x_held = _standardise(x[train.numpy()], x[held.numpy()])
    y_t = torch.tensor(y, dtype=torch.long)

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(20, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 4)
        )

    return Task(
        name="noisy_mlp_adamw",
        description=(
            f"GELU MLP 20-256-256-4 on {NOISY_TRAIN} synthetic rows, {NOISY_FLIP:.0%} labels "
            f"flipped, AdamW (0.9, 0.999) wd {NOISY_WEIGHT_DECAY:g}, 5% warm-up, batch 32"
        ),
        kind="classification",
        model_factory=model,
        loss_fn=F.cross_entropy,
        x_train=x_train,
        y_train=y_t[train],
        x_heldout=x_held,
        y_heldout=y_t[held],
        batch_size=32,
        momentum=0.0,
        budgets=(300, 1500),
        expected_regime={300: "over-fit", 1500: "over-fit"},
        base_lr={300: 1e-3, 1500: 1e-3},
        optimizer_factory=functools.partial(
            _adamw, weight_decay=NOISY_WEIGHT_DECAY, betas=(0.9, 0.999)
        ),
        optimizer_name=(
            f"AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay={NOISY_WEIGHT_DECAY:g} on the "
            "weight matrices)"
        ),
        warmup_fraction=0.05,
        meta={"flip_y": NOISY_FLIP, "generator": "sklearn make_classification, 4 classes"},
    )


BN_MLP_TRAIN = 3000
BN_WEIGHT_DECAY = 5e-4


def _bn_mlp_sgd() -> Task:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=4000,
        n_features=32,
        n_informative=16,
        n_redundant=8,
        n_classes=8,
        n_clusters_per_class=2,
        flip_y=0.02,
        class_sep=1.5,
        random_state=DATA_SEED + 7,
    )
    train, held = _split(len(y), BN_MLP_TRAIN)
    x_train, x_held = _standardise(x[train.numpy()], x[held.numpy()])
    y_t = torch.tensor(y, dtype=torch.long)

    def model() -> nn.Module:
        layers: list[nn.Module] = []
        width = 32
        for _ in range(3):
            layers += [nn.Linear(width, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU()]
            width = 128
        return nn.Sequential(*layers, nn.Linear(128, 8))

    def optimizer(model: nn.Module, peak_lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            model.parameters(),
            lr=peak_lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=BN_WEIGHT_DECAY,
        )

    return Task(
        name="bn_mlp_sgd",
        description=(
            f"MLP 32-128-128-128-8 with BatchNorm on {BN_MLP_TRAIN} synthetic rows (8 classes), "
            f"SGD Nesterov 0.9 wd {BN_WEIGHT_DECAY:g}, batch 64"
        ),
        kind="classification",
        model_factory=model,
        loss_fn=F.cross_entropy,
        x_train=x_train,
        y_train=y_t[train],
        x_heldout=x_held,
        y_heldout=y_t[held],
        batch_size=64,
        momentum=0.0,  # unused: the task declares its optimizer
        budgets=(400, 1600),
        expected_regime={400: "under-fit", 1600: "over-fit"},
        base_lr={400: 0.1, 1600: 0.1},
        optimizer_factory=optimizer,
        optimizer_name=(
            f"SGD(momentum=0.9, nesterov=True, weight_decay={BN_WEIGHT_DECAY:g} on every parameter)"
        ),
        meta={"generator": "sklearn make_classification, 8 classes, 2 clusters each"},
    )


# --------------------------------------------------------------------------------------------------
# The trend rule's test tasks (benchmarks/results/prereg_trend_rule.md): written after that rule and
# its constant were committed, first trained (beyond one timing run) after the choice; never used
# to fit anything.

CODE_MODULES = (
    "textwrap", "difflib", "fractions", "heapq", "bisect", "calendar", "shlex", "colorsys",
    "statistics", "string", "glob", "fnmatch", "graphlib", "numbers", "queue", "sched",
)  # fmt: skip
CODE_CONTEXT = 48
CODE_D_MODEL = 64
CODE_LAYERS = 2
CODE_HEADS = 4
NOISY_DIGITS_SIGMA = 1.0
MIXER_D_MODEL = 64
MIXER_WEIGHT_DECAY = 0.05
NOISY_CNN_WIDTHS = (16, 32, 64)


@functools.cache
def _code_text() -> str:
    """The source code of :data:`CODE_MODULES`, concatenated in that order (it depends on the
    Python version; its hash is in the task's ``meta``)."""
    import importlib
    import inspect

    return "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in CODE_MODULES)


def _gpt_code_model() -> nn.Module:
    return TinyGPT(256, CODE_CONTEXT, CODE_D_MODEL, CODE_LAYERS, CODE_HEADS)


def _gpt_code_adamw() -> Task:
    data = _code_text().encode("utf-8")
    codes = torch.tensor(list(data), dtype=torch.long)
    c = CODE_CONTEXT
    x_train, y_train, x_held, y_held = _lm_windows(codes, c)
    return Task(
        name="gpt_code_adamw",
        description=(
            f"GPT decoder (d{CODE_D_MODEL}, {CODE_LAYERS} layers, {CODE_HEADS} heads, ctx {c}) "
            f"byte LM on the source of {len(CODE_MODULES)} stdlib modules, AdamW (0.9, 0.95) "
            "wd 0.1, 5% warm-up, clip 1, batch 16"
        ),
        kind="classification",
        model_factory=_gpt_code_model,
        loss_fn=lm_cross_entropy,
        x_train=x_train,
        y_train=y_train,
        x_heldout=x_held,
        y_heldout=y_held,
        batch_size=16,
        momentum=0.0,
        budgets=(300, 900),
        expected_regime={300: "under-fit", 900: "under-fit"},
        # A common AdamW peak for small GPTs (nanoGPT's small configs: 1e-3 .. 6e-3), the centre
        # of the x0.25 .. x4 grid; not tuned before the rule was fixed.
        base_lr={300: 3e-3, 900: 3e-3},
        curve_eval_size=128,
        train_eval_size=512,
        optimizer_factory=_gpt_adamw_optimizer,
        optimizer_name=(
            f"AdamW(betas={GPT_BETAS}, eps=1e-8, weight_decay={GPT_WEIGHT_DECAY} on the linear "
            "weight matrices, 0 on biases/LayerNorm/embeddings)"
        ),
        warmup_fraction=0.05,
        grad_clip=1.0,
        meta={
            "num_bytes": len(data),
            "modules": list(CODE_MODULES),
            "context": c,
            "d_model": CODE_D_MODEL,
            "num_layers": CODE_LAYERS,
            "num_heads": CODE_HEADS,
            "text_sha256": hashlib.sha256(data).hexdigest()[:16],
            "heldout": "last 10% of the bytes, non-overlapping windows",
        },
    )


@functools.cache
def _noisy_digit_images() -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """:func:`_digit_images` with fixed Gaussian pixel noise (std :data:`NOISY_DIGITS_SIGMA` in
    standardised units, one draw per example from :data:`DATA_SEED`) on train and held-out images
    alike: a harder task, whose held-out loss is not set by a handful of examples."""
    x_train, y_train, x_held, y_held, background = _digit_images()
    gen = torch.Generator().manual_seed(DATA_SEED + 11)
    noise = torch.randn(x_train.shape[0] + x_held.shape[0], *x_train.shape[1:], generator=gen)
    sigma = NOISY_DIGITS_SIGMA
    x_train = x_train + sigma * noise[: x_train.shape[0]]
    x_held = x_held + sigma * noise[x_train.shape[0] :]
    return x_train, y_train, x_held, y_held, background


class NoisyDigitsCNN(nn.Module):
    """Three 3x3 conv-BatchNorm-ReLU layers (the last two with stride 2), global average pooling,
    a linear head: a VGG-style CNN."""

    def __init__(self, widths: tuple[int, int, int] = NOISY_CNN_WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _cnn_bn_noisy_sgd() -> Task:
    widths = "-".join(str(w) for w in NOISY_CNN_WIDTHS)
    return _digit_image_task(
        _noisy_digit_images,
        name="cnn_bn_noisy_sgd",
        description=(
            f"VGG-style CNN ({widths}, BatchNorm) on 1200 noisy digits (pixel noise std "
            f"{NOISY_DIGITS_SIGMA:g}), translation augmentation, SGD Nesterov 0.9 wd "
            f"{RESNET_WEIGHT_DECAY:g}, batch {IMAGE_BATCH}"
        ),
        model_factory=NoisyDigitsCNN,
        budgets=(300, 1200),
        expected_regime={300: "under-fit", 1200: "over-fit"},
        # The classic SGD peak for BatchNorm CNNs (0.1), the centre of the grid; not tuned before
        # the rule was fixed.
        base_lr={300: 0.1, 1200: 0.1},
        optimizer_factory=_resnet_optimizer,
        optimizer_name=(
            f"SGD(momentum=0.9, nesterov=True, weight_decay={RESNET_WEIGHT_DECAY:g} on every "
            "parameter)"
        ),
        meta={
            "widths": list(NOISY_CNN_WIDTHS),
            "pixel_noise_std": NOISY_DIGITS_SIGMA,
            "image_size": 8,
            "heldout": "597 noisy digits (the rest of the 1797)",
            "batchnorm": "batch statistics in training, running statistics in evaluation",
        },
    )


class _MixerBlock(nn.Module):
    def __init__(self, tokens: int, d_model: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.tokens = nn.Sequential(
            nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens)
        )
        self.norm2 = nn.LayerNorm(d_model)
        self.channels = nn.Sequential(
            nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, tokens, d)
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


class DigitsMixer(nn.Module):
    """An MLP-Mixer (Tolstikhin et al. 2021) on 8x8 images: 2x2 patches (16 tokens), a linear
    patch embedding, two pre-LayerNorm mixer blocks (token- and channel-mixing GELU MLPs of twice
    the width), mean pooling, LayerNorm, a linear head."""

    def __init__(self, d_model: int = MIXER_D_MODEL, num_blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d_model)
        self.blocks = nn.Sequential(*(_MixerBlock(16, d_model) for _ in range(num_blocks)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        patches = x.reshape(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
        return self.head(self.norm(self.blocks(self.embed(patches))).mean(dim=1))


def _mixer_adamw() -> Task:
    return _digit_image_task(
        _noisy_digit_images,
        name="mixer_adamw",
        description=(
            f"MLP-Mixer (2x2 patches, 16 tokens, d{MIXER_D_MODEL}, 2 blocks) on 1200 noisy "
            f"digits, translation augmentation, AdamW (0.9, 0.999) wd {MIXER_WEIGHT_DECAY:g}, "
            f"5% warm-up, clip 1, batch {IMAGE_BATCH}"
        ),
        model_factory=DigitsMixer,
        budgets=(400, 1200),
        expected_regime={400: "under-fit", 1200: "over-fit"},
        # A common AdamW peak for small vision models, the centre of the grid; not tuned before
        # the rule was fixed.
        base_lr={400: 2e-3, 1200: 2e-3},
        optimizer_factory=functools.partial(
            _adamw, weight_decay=MIXER_WEIGHT_DECAY, betas=(0.9, 0.999)
        ),
        optimizer_name=(
            f"AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay={MIXER_WEIGHT_DECAY:g} on the "
            "linear weight matrices, 0 on biases/LayerNorm)"
        ),
        warmup_fraction=0.05,
        grad_clip=1.0,
        meta={
            "d_model": MIXER_D_MODEL,
            "num_blocks": 2,
            "pixel_noise_std": NOISY_DIGITS_SIGMA,
            "heldout": "597 noisy digits (the rest of the 1797)",
        },
    )


# --------------------------------------------------------------------------------------------------
# The test tasks of the trend rule checking from 30 % (benchmarks/results/prereg_trend_from30.md):
# written after that file was committed; never used to fit anything.

GRU_MODULES = (
    "email.message", "http.client", "urllib.parse", "csv", "sqlite3", "unittest.case",
    "asyncio.tasks", "zipfile", "tarfile", "configparser", "threading", "subprocess",
    "inspect", "typing", "dataclasses", "enum",
)  # fmt: skip
GRU_CONTEXT = 24
GRU_HIDDEN = 96
SEQ_LENGTH = 16
SEQ_VOCAB = 12
SEQ_CLASSES = 4
SEQ_LABEL_NOISE = 0.1
SEQ_D_MODEL = 48
RESMLP_WIDTH = 128


class CharGRU(nn.Module):
    """Embedding -> one GRU layer -> linear read-out, every position predicted."""

    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(self.embed(x))
        return self.head(out)


def _gru_docs_adamw() -> Task:
    return _docstring_lm_task(
        "gru_docs_adamw",
        GRU_MODULES,
        GRU_CONTEXT,
        lambda v: functools.partial(CharGRU, v, 32, GRU_HIDDEN),
        f"char GRU LM (emb 32, 1 layer, hidden {GRU_HIDDEN}, ctx {GRU_CONTEXT}) on the docstrings "
        f"of {len(GRU_MODULES)} other stdlib modules, AdamW (0.9, 0.99) wd 0.01, 5% warm-up, "
        "clip 1, batch 32",
        (500, 1500),
        # The common AdamW default of small recurrent LMs, the centre of the grid; not tuned
        # before the rule was fixed.
        4e-3,
    )


class SeqClassifier(nn.Module):
    """Token and learned position embeddings, pre-LayerNorm transformer encoder layers (GELU),
    mean pooling, LayerNorm, a linear head."""

    def __init__(self, vocab: int, length: int, d_model: int, classes: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(length, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, 4, 2 * d_model, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.tok(x) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


def _seq_transformer_adamw() -> Task:
    gen = torch.Generator().manual_seed(DATA_SEED + 21)
    n = 6000
    x = torch.randint(0, SEQ_VOCAB, (n, SEQ_LENGTH), generator=gen)
    counts = torch.stack([(x == k).sum(dim=1) for k in range(SEQ_CLASSES)], dim=1)
    y = counts.argmax(dim=1)  # the most frequent of tokens 0-3 (ties: the lowest)
    flip = torch.rand(n, generator=gen) < SEQ_LABEL_NOISE
    y = torch.where(flip, torch.randint(0, SEQ_CLASSES, (n,), generator=gen), y)
    train, held = _split(n, 4000)
    return Task(
        name="seq_transformer_adamw",
        description=(
            f"transformer encoder (d{SEQ_D_MODEL}, 2 layers, 4 heads, mean pooling) classifying "
            f"synthetic sequences ({SEQ_LENGTH} tokens of {SEQ_VOCAB}: which of tokens 0-3 is "
            f"most frequent, {SEQ_LABEL_NOISE:.0%} labels random), AdamW (0.9, 0.999) wd 0.05, "
            "5% warm-up, clip 1, batch 64"
        ),
        kind="classification",
        model_factory=functools.partial(
            SeqClassifier, SEQ_VOCAB, SEQ_LENGTH, SEQ_D_MODEL, SEQ_CLASSES
        ),
        loss_fn=F.cross_entropy,
        x_train=x[train],
        y_train=y[train],
        x_heldout=x[held],
        y_heldout=y[held],
        batch_size=64,
        momentum=0.0,
        budgets=(500, 1500),
        expected_regime={500: "under-fit", 1500: "under-fit"},
        # A common AdamW peak for small transformers, the centre of the grid; not tuned before
        # the rule was fixed.
        base_lr={500: 1e-3, 1500: 1e-3},
        optimizer_factory=functools.partial(_adamw, weight_decay=0.05, betas=(0.9, 0.999)),
        optimizer_name=(
            "AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05 on the linear weight "
            "matrices, 0 on biases/LayerNorm/embeddings)"
        ),
        warmup_fraction=0.05,
        grad_clip=1.0,
        meta={"generator": "uniform tokens; label the argmax count of tokens 0-3, 10% random"},
    )


class ResMLP(nn.Module):
    """A linear stem, three residual blocks ``x + W2 relu(BN(W1 x))`` with BatchNorm, a head."""

    def __init__(self, features: int, width: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Linear(features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Linear(width, width, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(),
                nn.Linear(width, width),
            )
            for _ in range(3)
        )
        self.head = nn.Sequential(nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, classes))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _resmlp_bn_sgd() -> Task:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=8000,
        n_features=40,
        n_informative=20,
        n_redundant=10,
        n_classes=10,
        n_clusters_per_class=2,
        flip_y=0.05,
        class_sep=1.2,
        random_state=DATA_SEED + 31,
    )
    train, held = _split(len(y), 6000)
    x_train, x_held = _standardise(x[train.numpy()], x[held.numpy()])
    y_t = torch.tensor(y, dtype=torch.long)
    return Task(
        name="resmlp_bn_sgd",
        description=(
            f"residual MLP (width {RESMLP_WIDTH}, 3 blocks, BatchNorm) on 6000 synthetic rows "
            f"(10 classes), SGD Nesterov 0.9 wd {BN_WEIGHT_DECAY:g}, batch 128"
        ),
        kind="classification",
        model_factory=functools.partial(ResMLP, 40, RESMLP_WIDTH, 10),
        loss_fn=F.cross_entropy,
        x_train=x_train,
        y_train=y_t[train],
        x_heldout=x_held,
        y_heldout=y_t[held],
        batch_size=128,
        momentum=0.0,  # unused: the task declares its optimizer
        budgets=(400, 1600),
        expected_regime={400: "under-fit", 1600: "over-fit"},
        # The classic SGD peak for BatchNorm nets, the centre of the grid; not tuned before the
        # rule was fixed.
        base_lr={400: 0.1, 1600: 0.1},
        optimizer_factory=_resnet_optimizer,
        optimizer_name=(
            f"SGD(momentum=0.9, nesterov=True, weight_decay={RESNET_WEIGHT_DECAY:g} on every "
            "parameter)"
        ),
        meta={"generator": "sklearn make_classification, 10 classes, 2 clusters each"},
    )


_BUILDERS: dict[str, Callable[[], Task]] = {
    "digits_mlp": _digits_mlp,
    "digits_cnn": _digits_cnn,
    "breast_cancer_logreg": _breast_cancer_logreg,
    "char_lm": _char_lm,
    "lstsq_illcond": _lstsq_illcond,
}

TASK_NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""The calibration suite: every fit and the headline tables use these five tasks."""

_HOLDOUT_BUILDERS: dict[str, Callable[[], Task]] = {
    "diabetes_mlp": _diabetes_mlp,
    "digits_logreg": _digits_logreg,
    "diabetes_mlp_gd": _diabetes_mlp_gd,
    "digits_logreg_gd": _digits_logreg_gd,
}
HOLDOUT_TASK_NAMES: tuple[str, ...] = tuple(_HOLDOUT_BUILDERS)
"""Out-of-sample tasks, never used to fit a link."""

_REPRESENTATIVE_BUILDERS: dict[str, Callable[[], Task]] = {"gpt_adamw": _gpt_adamw}
REPRESENTATIVE_TASK_NAMES: tuple[str, ...] = tuple(_REPRESENTATIVE_BUILDERS)
"""Tasks trained like large models (AdamW, warm-up, clipping); in neither suite above."""

_HELDOUT_REPRESENTATIVE_BUILDERS: dict[str, Callable[[], Task]] = {
    "resnet_bn": _resnet_bn,
    "vit_adamw": _vit_adamw,
}
HELDOUT_REPRESENTATIVE_TASK_NAMES: tuple[str, ...] = tuple(_HELDOUT_REPRESENTATIVE_BUILDERS)
"""Representative tasks kept out of every fit of the φ link (and trained with cosine only until
the rule to test on them is written down)."""


_HOLD_TEST_BUILDERS: dict[str, Callable[[], Task]] = {
    "lstm_adamw": _lstm_adamw,
    "noisy_mlp_adamw": _noisy_mlp_adamw,
    "bn_mlp_sgd": _bn_mlp_sgd,
}
HOLD_TEST_TASK_NAMES: tuple[str, ...] = tuple(_HOLD_TEST_BUILDERS)
"""The hold rule's test tasks (``benchmarks/results/prereg_hold_rule.md``): first trained after
that rule was committed, kept out of every fit."""

_TREND_TEST_BUILDERS: dict[str, Callable[[], Task]] = {
    "gpt_code_adamw": _gpt_code_adamw,
    "cnn_bn_noisy_sgd": _cnn_bn_noisy_sgd,
    "mixer_adamw": _mixer_adamw,
}
TREND_TEST_TASK_NAMES: tuple[str, ...] = tuple(_TREND_TEST_BUILDERS)
"""The trend rule's test tasks (``benchmarks/results/prereg_trend_rule.md``): first trained after
that rule's constant was chosen and committed, kept out of every fit."""

_TREND30_TEST_BUILDERS: dict[str, Callable[[], Task]] = {
    "gru_docs_adamw": _gru_docs_adamw,
    "seq_transformer_adamw": _seq_transformer_adamw,
    "resmlp_bn_sgd": _resmlp_bn_sgd,
}
TREND30_TEST_TASK_NAMES: tuple[str, ...] = tuple(_TREND30_TEST_BUILDERS)
"""The test tasks of the trend rule checking from 30 % (``prereg_trend_from30.md``)."""


# --------------------------------------------------------------------------------------------------
# The test tasks of the shape rule (benchmarks/results/prereg_shape_rule.md): written after that
# file was committed; never used to fit anything. Families not in the earlier sets: a causal
# dilated convolution LM, an autoencoder (a reconstruction loss) and a matrix factorisation.

TCN_MODULES = (
    "os", "io", "types", "copy", "pprint", "weakref", "abc", "contextlib", "operator",
    "traceback", "warnings", "tempfile", "uuid", "base64", "hashlib", "hmac",
)  # fmt: skip
TCN_CONTEXT = 24
TCN_CHANNELS = 48
TCN_DILATIONS = (1, 2, 4)
AE_CODE = 8
MF_USERS, MF_ITEMS, MF_RANK, MF_DIM = 300, 200, 5, 16
MF_OBSERVED, MF_NOISE = 0.15, 0.5


class CausalConvLM(nn.Module):
    """Embedding -> residual blocks of a causal dilated 1-D convolution (kernel 3, left padding)
    with GELU -> LayerNorm -> linear read-out, every position predicted (a WaveNet/TCN-style LM)."""

    def __init__(self, vocab: int, channels: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, channels)
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, 3, dilation=d, padding=0) for d in dilations
        )
        self.dilations = dilations
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, vocab)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x).transpose(1, 2)  # (B, C, T)
        for conv, d in zip(self.convs, self.dilations, strict=True):
            h = h + F.gelu(conv(F.pad(h, (2 * d, 0))))  # sees positions t, t-d, t-2d only
        return self.head(self.norm(h.transpose(1, 2)))


def _tcn_docs_adamw() -> Task:
    return _docstring_lm_task(
        "tcn_docs_adamw",
        TCN_MODULES,
        TCN_CONTEXT,
        lambda v: functools.partial(CausalConvLM, v, TCN_CHANNELS, TCN_DILATIONS),
        f"causal dilated conv LM ({len(TCN_DILATIONS)} residual blocks, {TCN_CHANNELS} "
        f"channels, dilations {TCN_DILATIONS}, ctx {TCN_CONTEXT}) on the docstrings of "
        f"{len(TCN_MODULES)} other stdlib modules, AdamW (0.9, 0.99) wd 0.01, 5% warm-up, "
        "clip 1, batch 32",
        (300, 900),
        3e-3,  # a common AdamW default for small conv LMs, the centre of the grid
    )


def _digits_autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 32), nn.GELU(), nn.Linear(32, AE_CODE), nn.GELU(),
        nn.Linear(AE_CODE, 32), nn.GELU(), nn.Linear(32, 64),
    )  # fmt: skip


def _ae_digits_adam() -> Task:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)  # pixels in [0, 1]
    train, held = _split(x.shape[0], 1000)
    x_train, x_held = x[train], x[held]
    return Task(
        name="ae_digits_adam",
        description=(
            f"autoencoder 64-32-{AE_CODE}-32-64 (GELU) reconstructing the digits (pixels / 16, "
            "mean squared error), Adam (0.9, 0.999), no decay, batch 64"
        ),
        kind="regression",
        model_factory=_digits_autoencoder,
        loss_fn=F.mse_loss,
        x_train=x_train,
        y_train=x_train,
        x_heldout=x_held,
        y_heldout=x_held,
        batch_size=64,
        momentum=0.0,
        budgets=(300, 1500),
        expected_regime={300: "under-fit", 1500: "over-fit"},
        base_lr={300: 3e-3, 1500: 3e-3},
        optimizer_factory=lambda model, lr: torch.optim.Adam(model.parameters(), lr=lr),
        optimizer_name="Adam(betas=(0.9, 0.999), eps=1e-8)",
        meta={"num_train": 1000, "targets": "the inputs"},
    )


class MatrixFactorisation(nn.Module):
    """Rating of ``(user, item)``: ``<u, v> + b_u + b_i + mu`` from embeddings of ``dim``."""

    def __init__(self, users: int, items: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(users, dim)
        self.item = nn.Embedding(items, dim)
        for e in (self.user, self.item):
            nn.init.normal_(e.weight, std=0.1)
        self.user_bias = nn.Embedding(users, 1)
        self.item_bias = nn.Embedding(items, 1)
        for e in (self.user_bias, self.item_bias):
            nn.init.zeros_(e.weight)
        self.mu = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        u, i = x[:, 0], x[:, 1]
        dot = (self.user(u) * self.item(i)).sum(dim=-1)
        return dot + self.user_bias(u).squeeze(-1) + self.item_bias(i).squeeze(-1) + self.mu


def _mf_sgd_optimizer(model: nn.Module, peak_lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=peak_lr, momentum=0.9, nesterov=True, weight_decay=1e-4
    )


def _mf_nesterov_sgd() -> Task:
    gen = torch.Generator().manual_seed(DATA_SEED + 31)
    u = torch.randn(MF_USERS, MF_RANK, generator=gen)
    v = torch.randn(MF_ITEMS, MF_RANK, generator=gen)
    ratings = (u @ v.T) / math.sqrt(MF_RANK)
    mask = torch.rand(MF_USERS, MF_ITEMS, generator=gen) < MF_OBSERVED
    pairs = mask.nonzero()
    y = ratings[mask] + MF_NOISE * torch.randn(int(mask.sum()), generator=gen)
    n = pairs.shape[0]
    train, held = _split(n, int(0.8 * n))
    return Task(
        name="mf_nesterov_sgd",
        description=(
            f"matrix factorisation (dim {MF_DIM}, biases) of a synthetic rank-{MF_RANK} "
            f"{MF_USERS}x{MF_ITEMS} rating matrix, {MF_OBSERVED:.0%} observed, noise "
            f"{MF_NOISE}; mean squared error, SGD Nesterov 0.9, wd 1e-4, batch 128"
        ),
        kind="regression",
        model_factory=functools.partial(MatrixFactorisation, MF_USERS, MF_ITEMS, MF_DIM),
        loss_fn=F.mse_loss,
        x_train=pairs[train],
        y_train=y[train],
        x_heldout=pairs[held],
        y_heldout=y[held],
        batch_size=128,
        momentum=0.0,
        budgets=(400, 1600),
        expected_regime={400: "under-fit", 1600: "over-fit"},
        base_lr={400: 0.2, 1600: 0.2},
        optimizer_factory=_mf_sgd_optimizer,
        optimizer_name="SGD(momentum=0.9, nesterov=True, weight_decay=1e-4)",
        meta={"num_pairs": n, "noise": MF_NOISE, "rank": MF_RANK},
    )


_SHAPE_TEST_BUILDERS: dict[str, Callable[[], Task]] = {
    "tcn_docs_adamw": _tcn_docs_adamw,
    "ae_digits_adam": _ae_digits_adam,
    "mf_nesterov_sgd": _mf_nesterov_sgd,
}
SHAPE_TEST_TASK_NAMES: tuple[str, ...] = tuple(_SHAPE_TEST_BUILDERS)
"""The shape rule's test tasks (``benchmarks/results/prereg_shape_rule.md``), the fifth set."""


@functools.cache
def get_task(name: str) -> Task:
    """The task called ``name``, built once per process."""
    builders = {
        **_BUILDERS,
        **_HOLDOUT_BUILDERS,
        **_REPRESENTATIVE_BUILDERS,
        **_HELDOUT_REPRESENTATIVE_BUILDERS,
        **_HOLD_TEST_BUILDERS,
        **_TREND_TEST_BUILDERS,
        **_TREND30_TEST_BUILDERS,
        **_SHAPE_TEST_BUILDERS,
    }
    if name not in builders:
        raise ValueError(f"unknown task {name!r}; valid names are {list(builders)}")
    return builders[name]()
