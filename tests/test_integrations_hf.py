"""uba_auto.integrations.huggingface with the real transformers.Trainer (CPU, a tiny random-init
GPT-2, nothing downloaded): the warm-up schedule against the closed form and transformers' cosine,
and the callback's exact resume from a Trainer checkpoint, without a new probe."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from _state_checks import assert_state_unchanged, snapshot_state
from _trainer_checks import CHEAP_PROBE, ForwardCounter, assert_resumed_exactly

from uba_auto import uba_lr
from uba_auto.integrations.huggingface import UBACallback, get_uba_schedule_with_warmup


@pytest.fixture(scope="module")
def transformers():
    module = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    return module


def sgd(lrs=(0.1,)):
    params = [torch.zeros(1, requires_grad=True) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)])


def stepped_rates(optimizer, scheduler, steps: int) -> list[list[float]]:
    """The rates every optimizer step uses, the scheduler stepped after each (as Trainer does)."""
    rates = []
    for _ in range(steps):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


# -- get_uba_schedule_with_warmup ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("phi", "warmup", "ratio"), [(2.0, 0, 0.0), (0.5, 5, 0.0), (4.0, 3, 0.1), (16.0, 1, 1.0)]
)
@pytest.mark.filterwarnings("ignore::uba_auto.PastBudgetWarning")  # stepped past the end on purpose
def test_the_schedule_is_uba_lr_in_closed_form_per_group(phi, warmup, ratio):
    total, peaks = 30, (0.1, 0.03)
    opt = sgd(peaks)
    sched = get_uba_schedule_with_warmup(opt, warmup, total, phi=phi, lr_min_ratio=ratio)
    rates = stepped_rates(opt, sched, total + 4)  # past the end the minimum holds
    for i, peak in enumerate(peaks):
        expected = [
            uba_lr(t, total, phi=phi, lr_max=peak, lr_min=ratio * peak, warmup_steps=warmup)
            for t in range(total + 4)
        ]
        assert [r[i] for r in rates] == expected  # bit for bit
        if warmup:
            assert rates[0][i] == 0.0 and rates[warmup][i] == peak
            assert rates[1][i] == pytest.approx(peak / warmup, rel=1e-15)
        assert rates[total][i] == rates[total + 3][i] == pytest.approx(ratio * peak, abs=1e-18)


@pytest.mark.parametrize("warmup", [0, 4])
def test_phi_2_is_transformers_cosine_schedule(transformers, warmup):
    total = 25
    ours, theirs = sgd((0.1, 0.02)), sgd((0.1, 0.02))
    uba = stepped_rates(ours, get_uba_schedule_with_warmup(ours, warmup, total), total + 1)
    cosine = transformers.get_cosine_schedule_with_warmup(theirs, warmup, total)
    reference = stepped_rates(theirs, cosine, total + 1)
    for a, b in zip(uba, reference, strict=True):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-17)
    # and phi != 2 is a different schedule (the comparison above can fail)
    other = sgd((0.1, 0.02))
    far = stepped_rates(other, get_uba_schedule_with_warmup(other, warmup, total, phi=4.0), 20)
    assert far[warmup + 6][0] < reference[warmup + 6][0] * 0.95


def test_last_epoch_resumes_as_transformers_does(transformers):
    total, warmup, last = 20, 3, 7
    ours, theirs = sgd((0.1,)), sgd((0.1,))
    stepped_rates(ours, get_uba_schedule_with_warmup(ours, warmup, total), last + 1)
    stepped_rates(theirs, transformers.get_cosine_schedule_with_warmup(theirs, warmup, total), 8)
    # A new scheduler over the optimizers (whose groups hold initial_lr) at last_epoch=7.
    resumed = get_uba_schedule_with_warmup(ours, warmup, total, last_epoch=last)
    reference = transformers.get_cosine_schedule_with_warmup(theirs, warmup, total, last_epoch=last)
    assert resumed.last_epoch == reference.last_epoch == last + 1
    ahead = stepped_rates(ours, resumed, total - last)
    for a, b in zip(ahead, stepped_rates(theirs, reference, total - last), strict=True):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-17)
    fresh = sgd((0.1,))
    assert ahead[0] == [uba_lr(last + 1, total, phi=2.0, lr_max=0.1, warmup_steps=warmup)]
    with pytest.raises(ValueError, match=r"last_epoch=7 .* param group 0 has no 'initial_lr'"):
        get_uba_schedule_with_warmup(fresh, warmup, total, last_epoch=last)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_warmup_steps=10, num_training_steps=10), ValueError, "num_training_steps must"),
        (dict(num_warmup_steps=0, num_training_steps=10, phi=0.0), ValueError, "phi must be"),
        (dict(num_warmup_steps=0, num_training_steps=9, lr_min_ratio=2), ValueError, "lr_min_ra"),
        (dict(num_warmup_steps=-1, num_training_steps=10), ValueError, "num_warmup_steps must"),
        (dict(num_warmup_steps=0, num_training_steps=9, last_epoch=-2), ValueError, "last_epoch"),
    ],
)
def test_schedule_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        get_uba_schedule_with_warmup(sgd(), **kwargs)


# -- UBACallback in a real Trainer -----------------------------------------------------------------
MAX_STEPS, SAVE_STEPS = 36, 6  # 8 batches an epoch: checkpoint-6 is mid-epoch
PROBE = dict(reestimate_every=6, probe_fraction=1.0, **CHEAP_PROBE)  # three probes fit in 36


def tiny_gpt2(transformers):
    config = transformers.GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def token_data():
    ids = torch.randint(0, 32, (64, 12), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "labels": x} for x in ids]


def counting_data():
    """Sequences that count up from a random start (mod 32): learnt in a few steps."""
    starts = torch.randint(0, 32, (64, 1), generator=torch.Generator().manual_seed(2))
    ids = (starts + torch.arange(12)) % 32
    return [{"input_ids": x, "labels": x} for x in ids]


def make_recorder(transformers):
    class Recorder(transformers.TrainerCallback):
        """The rate each optimizer step used, and the model's forward calls before the first."""

        def __init__(self, model):
            self.rates: dict[int, float] = {}
            self.forwards = ForwardCounter(model)

        def on_step_begin(self, args, state, control, **kwargs):
            self.forwards.training_starts()

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.rates[state.global_step] = optimizer.param_groups[0]["lr"]

    return Recorder


def train(transformers, output_dir, resume=None, probe=PROBE, data=None):
    """The user's script, the same for the first and the resumed run."""
    from transformers import Trainer, TrainingArguments

    model, data = tiny_gpt2(transformers), token_data() if data is None else data
    probe_loader = torch.utils.data.DataLoader(data, batch_size=8)
    uba = UBACallback(probe_loader, **probe)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    recorder = make_recorder(transformers)(model)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizers=(optimizer, uba.scheduler(optimizer)),
        callbacks=[uba, recorder],
    )
    trainer.train(resume_from_checkpoint=resume)
    return uba, recorder.rates, recorder.forwards, model


@pytest.fixture(scope="module")
def uninterrupted(transformers, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("hf_run")
    return output_dir, train(transformers, output_dir)


@pytest.mark.slow
def test_resuming_from_a_trainer_checkpoint_continues_bit_for_bit(
    transformers, uninterrupted, tmp_path
):
    output_dir, full = uninterrupted
    history = full[0].auto.report.history
    # at the checkpoint's step 6 and after it; from 18 on the probing budget is spent
    steps = [(r.step, r.status) for r in history]
    assert steps == [(0, "ok"), (6, "ok"), (12, "ok")] + [(s, "skipped") for s in (18, 24, 30)]
    assert len({r.phi for r in history}) >= 2  # the probes moved phi
    assert full[2].before_training > 0  # the counter sees the first run's probe
    checkpoint = output_dir / f"checkpoint-{SAVE_STEPS}"
    assert (checkpoint / "scheduler.pt").is_file()
    resumed = train(transformers, tmp_path, resume=str(checkpoint))
    assert_resumed_exactly(full, resumed, resume_step=SAVE_STEPS, max_steps=MAX_STEPS)


@pytest.mark.slow
def test_the_plateau_rule_runs_inside_the_callback_and_resumes_bit_for_bit(transformers, tmp_path):
    """UBACallback(val_loader=...): the scheduler the Trainer steps runs the rule's checks (on
    dict batches, the model's own loss), and a run resumed from a checkpoint has the same rates,
    checks and history."""
    # Held-out counting sequences: a loss that keeps falling past the checkpoint.
    val = torch.utils.data.DataLoader(counting_data()[48:], batch_size=8)
    plateau = dict(probe_fraction=1.0, val_loader=val, val_batches=2, **CHEAP_PROBE)
    full = train(transformers, tmp_path / "full", probe=plateau, data=counting_data()[:48])
    watch = full[0].auto.plateau
    assert [c.step for c in watch.checks if c.step <= SAVE_STEPS]  # checks before the checkpoint
    assert [c.step for c in watch.checks if c.step > SAVE_STEPS]  # ... and after it
    assert all(c.status != "failed" for c in watch.checks)
    assert full[0].auto.report.history[0].phi == 1 / 32
    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_STEPS}"
    resumed = train(
        transformers,
        tmp_path / "resumed",
        resume=str(checkpoint),
        probe=plateau,
        data=counting_data()[:48],
    )
    assert_resumed_exactly(full, resumed, resume_step=SAVE_STEPS, max_steps=MAX_STEPS)

    def strip(checks):
        return [(c.step, c.status, c.loss, c.phi, c.reason) for c in checks]

    assert strip(resumed[0].auto.plateau.checks) == strip(watch.checks)


@pytest.mark.slow
def test_the_probe_at_train_begin_leaves_the_model_and_rng_alone(transformers, tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, data = tiny_gpt2(transformers), token_data()
    seen = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["before"] = snapshot_state(model)

    class Check(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            assert uba.auto is not None and uba.auto.probe_hvps > 0
            assert_state_unchanged(model, seen["before"])
            seen["checked"] = True

    uba = UBACallback(torch.utils.data.DataLoader(data, batch_size=8), **PROBE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, save_strategy="no", report_to=[], use_cpu=True
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizers=(optimizer, uba.scheduler(optimizer)),
        callbacks=[Snapshot(), uba, Check()],
    )
    trainer.train()
    assert seen["checked"] and uba.auto.scheduler.last_epoch == 3
    assert uba.auto.budget == 3  # the Trainer's max_steps


def test_a_checkpoint_without_the_uba_state_is_refused(transformers, uninterrupted, tmp_path):
    output_dir, _ = uninterrupted
    checkpoint = tmp_path / f"checkpoint-{SAVE_STEPS}"
    shutil.copytree(output_dir / checkpoint.name, checkpoint)
    os.remove(checkpoint / "scheduler.pt")  # as with save_only_model=True
    with pytest.raises(
        ValueError, match=rf"resumes at step {SAVE_STEPS}, but its checkpoint holds no UBA"
    ):
        train(transformers, tmp_path / "out", resume=str(checkpoint))


def test_a_trainer_that_steps_another_scheduler_is_refused(transformers, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, data = tiny_gpt2(transformers), token_data()
    uba = UBACallback(torch.utils.data.DataLoader(data, batch_size=8), **PROBE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    uba.scheduler(optimizer)  # made, but not given to the Trainer, which builds its own
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True)
    trainer = Trainer(
        model=model, args=args, train_dataset=data, optimizers=(optimizer, None), callbacks=[uba]
    )
    with pytest.raises(ValueError, match=r"Trainer does not step this callback's scheduler"):
        trainer.train()


def test_the_scheduler_without_its_callback_says_what_is_missing(transformers, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, data = tiny_gpt2(transformers), token_data()
    uba = UBACallback(torch.utils.data.DataLoader(data, batch_size=8), **PROBE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True)
    trainer = Trainer(
        model=model, args=args, train_dataset=data, optimizers=(optimizer, uba.scheduler(optimizer))
    )
    with pytest.raises(RuntimeError, match=r"add the UBA callback .* to the trainer's callbacks"):
        trainer.train()


@pytest.mark.parametrize("name", ["model", "optimizer", "resume_from"])
def test_arguments_the_trainer_supplies_are_refused(transformers, name):
    with pytest.raises(TypeError, match=rf"{name}= is not an argument here"):
        UBACallback([{"x": torch.ones(1)}], **{name: None})


def test_without_the_extra_the_modules_import_and_the_callbacks_name_it():
    # A fresh interpreter in which transformers and Lightning cannot be imported.
    code = textwrap.dedent(
        """
        import sys
        for name in ("transformers", "accelerate", "pytorch_lightning", "lightning"):
            sys.modules[name] = None
        import torch
        import uba_auto
        from uba_auto.integrations import huggingface, lightning
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = huggingface.get_uba_schedule_with_warmup(opt, 0, 4)
        print("schedule", sched.lr_at(2)[0])
        for module in (huggingface, lightning):
            try:
                module.UBACallback([{"x": torch.ones(1)}])
            except ImportError as err:
                print("ImportError", err)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert math.isclose(float(lines[0].split()[1]), 0.5)
    assert len(lines) == 3
    assert "UBACallback needs transformers" in lines[1] and "uba-auto[integrations]" in lines[1]
    assert "UBACallback needs pytorch_lightning" in lines[2]
    assert "uba-auto[integrations]" in lines[2]
