"""uba_auto.integrations.lightning with a real PyTorch Lightning Trainer (CPU, a small random-init
MLP): the scheduler from configure_optimizers, and the callback's exact resume from a .ckpt,
without a new probe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _state_checks import assert_state_unchanged, snapshot_state
from _trainer_checks import CHEAP_PROBE, ForwardCounter, assert_resumed_exactly

from uba_auto import UBAScheduler
from uba_auto.integrations.lightning import UBACallback

pl = pytest.importorskip("pytorch_lightning")

pytestmark = [  # Lightning's own notes on resuming into a new folder, and its own deprecation
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
    pytest.mark.filterwarnings("ignore:.*treespec"),
]

MAX_STEPS, EVERY = 48, 8  # 8 batches an epoch: checkpoints at epoch ends
PROBE = dict(loss_fn=F.cross_entropy, reestimate_every=8, probe_fraction=1.0, **CHEAP_PROBE)


class Classifier(pl.LightningModule):
    """The user's module: configure_optimizers returns the callback's scheduler."""

    def __init__(self, uba, interval="step", lr=0.1):
        super().__init__()
        self.uba, self.interval, self.lr = uba, interval, lr
        gen = torch.Generator().manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        scheduler = self.uba.scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.interval},
        }


class Recorder(pl.Callback):
    """The rate each optimizer step uses, and the model's forward calls before the first."""

    def __init__(self, model):
        self.rates: dict[int, float] = {}
        self.forwards = ForwardCounter(model)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.forwards.training_starts()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates[trainer.global_step] = optimizer.param_groups[0]["lr"]


def dataset():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    return torch.utils.data.TensorDataset(x, y)


def fit(
    checkpoint_dir, ckpt_path=None, max_steps=MAX_STEPS, extra=(), probe=PROBE, **module_kwargs
):
    """The user's script, the same for the first and the resumed run."""
    data = dataset()
    uba = UBACallback(torch.utils.data.DataLoader(data, batch_size=16), **probe)
    model = Classifier(uba, **module_kwargs)
    recorder = Recorder(model)
    extra = [make(uba, model) for make in extra]
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=checkpoint_dir, every_n_train_steps=EVERY, save_top_k=-1
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=[*extra[:1], uba, *extra[1:], recorder, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    return uba, recorder.rates, recorder.forwards, model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    checkpoint_dir = tmp_path_factory.mktemp("pl_run")
    return checkpoint_dir, fit(checkpoint_dir)


def test_resuming_from_a_lightning_checkpoint_continues_bit_for_bit(uninterrupted, tmp_path):
    checkpoint_dir, full = uninterrupted
    history = full[0].auto.report.history
    # Four probes of 12 gradient-equivalents fit in the 48 steps, a fifth does not.
    expected = [(s, "ok") for s in (0, 8, 16, 24)] + [(s, "skipped") for s in (32, 40)]
    assert [(r.step, r.status) for r in history] == expected
    assert len({r.phi for r in history}) >= 4  # re-estimations moved phi
    assert full[2].before_training > 0  # the counter sees the first run's probe
    (checkpoint,) = checkpoint_dir.glob("*step=16.ckpt")  # re-estimated at this very step
    saved = torch.load(checkpoint, weights_only=True)["lr_schedulers"][0]
    assert saved["uba_auto"]["scheduler"]["last_epoch"] == 16
    resumed = fit(tmp_path, ckpt_path=str(checkpoint))
    assert_resumed_exactly(full, resumed, resume_step=16, max_steps=MAX_STEPS)
    assert isinstance(resumed[0].auto.scheduler, UBAScheduler)


def test_the_plateau_rule_runs_inside_the_callback_and_resumes_bit_for_bit(tmp_path):
    """UBACallback(val_loader=...): the scheduler Lightning steps runs the rule's checks, and a
    run resumed from a checkpoint has the same rates, checks and history."""
    plateau = dict(
        loss_fn=F.cross_entropy,
        probe_fraction=1.0,
        # The training data, in a loader of its own: a loss that keeps falling past the
        # checkpoint (held-out batches of these random labels plateau at once).
        val_loader=torch.utils.data.DataLoader(dataset(), batch_size=16),
        val_batches=2,
        **CHEAP_PROBE,
    )
    full = fit(tmp_path / "full", probe=plateau, lr=0.02)
    watch = full[0].auto.plateau
    assert [c.step for c in watch.checks if c.step <= 16]  # checks before the checkpoint ...
    assert [c.step for c in watch.checks if c.step > 16]  # ... and after it
    assert full[0].auto.report.history[0].phi == 1 / 32
    (checkpoint,) = (tmp_path / "full").glob("*step=16.ckpt")
    resumed = fit(tmp_path / "resumed", ckpt_path=str(checkpoint), probe=plateau, lr=0.02)
    assert_resumed_exactly(full, resumed, resume_step=16, max_steps=MAX_STEPS)
    strip = [(c.step, c.status, c.loss, c.phi, c.reason) for c in watch.checks]
    again = resumed[0].auto.plateau.checks
    assert [(c.step, c.status, c.loss, c.phi, c.reason) for c in again] == strip


def test_a_scheduler_stepped_per_epoch_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"stepped after every optimizer step.*interval='epoch'"):
        fit(tmp_path, interval="epoch")


def test_a_checkpoint_whose_scheduler_state_is_not_ours_is_refused(uninterrupted, tmp_path):
    (checkpoint,) = uninterrupted[0].glob("*step=16.ckpt")
    state = torch.load(checkpoint, weights_only=True)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    state["lr_schedulers"] = [UBAScheduler(optimizer, 40, phi=2.0).state_dict()]
    torch.save(state, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"must come from DeferredUBAScheduler.state_dict\(\)"):
        fit(tmp_path / "out", ckpt_path=str(tmp_path / "other.ckpt"))


def test_the_probe_at_train_start_leaves_the_model_and_rng_alone(tmp_path):
    seen = {}

    class Snapshot(pl.Callback):
        def __init__(self, uba, model):
            self.model = model

        def on_train_start(self, trainer, pl_module):
            seen["before"] = snapshot_state(self.model)

    class Check(pl.Callback):
        def __init__(self, uba, model):
            self.uba, self.model = uba, model

        def on_train_start(self, trainer, pl_module):
            assert self.uba.auto is not None and self.uba.auto.probe_hvps > 0
            assert_state_unchanged(self.model, seen["before"])
            seen["checked"] = True

    uba, *_ = fit(tmp_path, max_steps=3, extra=(Snapshot, Check))
    assert seen["checked"] and uba.auto.scheduler.last_epoch == 3
    assert uba.auto.budget == 3  # the Trainer's max_steps


def test_the_scheduler_without_its_callback_says_what_is_missing(tmp_path):
    uba = UBACallback(torch.utils.data.DataLoader(dataset(), batch_size=16), **PROBE)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(dataset(), batch_size=8)
    with pytest.raises(RuntimeError, match=r"add the UBA callback .* to the trainer's callbacks"):
        trainer.fit(Classifier(uba), loader)
