"""The φ study's AdamW task (``gpt_adamw``) and the optimizer / warm-up / clipping hooks of
``benchmarks/train.py``: the data layout, the two AdamW param groups, causality, and a short
training run reproduced step by step by hand (warm-up, clipping and AdamW exactly as declared)."""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/

import uba_auto
from benchmarks import phi_sweep
from benchmarks.tasks import REPRESENTATIVE_TASK_NAMES, get_task
from benchmarks.train import RunResult, ScheduleSpec, evaluate, train
from benchmarks.transformer import TinyGPT, adamw_param_groups


@pytest.fixture(autouse=True)
def _one_thread():
    # Small models: extra threads only add overhead (and spin on a loaded machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(grad_clip: float | None = 1.0):
    """gpt_adamw with a 1-layer d16 model, so a run takes well under a second."""
    task = get_task("gpt_adamw")
    return replace(
        task,
        model_factory=lambda: TinyGPT(256, 64, 16, 1, 2),
        curve_eval_size=8,
        train_eval_size=8,
        x_heldout=task.x_heldout[:16],
        y_heldout=task.y_heldout[:16],
        grad_clip=grad_clip,
    )


def test_gpt_adamw_data_is_next_byte_prediction_with_the_last_tenth_held_out():
    task = get_task("gpt_adamw")
    assert "gpt_adamw" in REPRESENTATIVE_TASK_NAMES
    assert task.x_train.shape[1] == task.x_heldout.shape[1] == 64
    # Row i is a window starting at byte i; its targets are the same window shifted by one.
    assert torch.equal(task.y_train[:5, :-1], task.x_train[:5, 1:])
    assert torch.equal(task.x_train[1, :-1], task.x_train[0, 1:])
    # Held-out windows tile the held-out bytes without overlap.
    assert torch.equal(task.x_heldout[1, 0], task.y_heldout[0, -1])
    n = task.meta["num_bytes"]
    assert task.num_train == int(0.9 * n) - 64
    assert task.x_heldout.shape[0] == (n - int(0.9 * n) - 1) // 64
    assert int(task.x_train.max()) < 256 and int(task.x_train.min()) >= 0


def test_gpt_adamw_optimizer_decays_the_linear_weights_only():
    task = get_task("gpt_adamw")
    model = task.make_model(0)
    opt = task.make_optimizer(model, 1e-3)
    assert type(opt) is torch.optim.AdamW
    no_decay, decay = opt.param_groups
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.1)
    assert all(g["betas"] == (0.9, 0.95) and g["lr"] == 1e-3 for g in opt.param_groups)
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights
    everything = {id(p) for p in model.parameters()}
    assert {id(p) for p in no_decay["params"]} == everything - linear_weights
    names = {id(p): n for n, p in model.named_parameters()}
    assert {"tok_emb.weight", "pos_emb.weight", "ln_f.weight"} <= {
        names[id(p)] for p in no_decay["params"]
    }
    # A frozen parameter is in neither group.
    model.head.weight.requires_grad_(False)
    groups = adamw_param_groups(model, 0.1)
    assert id(model.head.weight) not in {id(p) for g in groups for p in g["params"]}


def test_gpt_is_causal_and_twice_differentiable():
    torch.manual_seed(0)
    model = TinyGPT(256, 16, 16, 2, 2).double()
    x = torch.randint(0, 256, (2, 16))
    x2 = x.clone()
    x2[:, 9] = (x2[:, 9] + 1) % 256
    out, out2 = model(x), model(x2)
    assert torch.equal(out[:, :9], out2[:, :9])
    assert not torch.equal(out[:, 9:], out2[:, 9:])
    # A Hessian-vector product (what the curvature probe needs) runs through the attention.
    loss = nn.functional.cross_entropy(out.flatten(0, 1), x.roll(-1, 1).flatten())
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * g.detach()).sum() for g in grads), params)
    assert all(torch.isfinite(h).all() for h in hvp)
    with pytest.raises(ValueError, match="context 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def _by_hand(task, budget: int, seed: int, peak: float, schedule: str) -> float:
    """train()'s loop written out: AdamW, linear warm-up then the schedule, clipping."""
    model = task.make_model(seed)
    opt = task.make_optimizer(model, peak)
    warm = task.warmup_steps(budget)
    plan = uba_auto.schedules.make_schedule(schedule, budget - 1, lr_max=peak, warmup_steps=warm)
    for step, (xb, yb) in enumerate(itertools.islice(task.batches(seed), budget)):
        for group in opt.param_groups:
            group["lr"] = plan(step)
        opt.zero_grad()
        task.loss_fn(model(xb), yb).backward()
        if task.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), task.grad_clip)
        opt.step()
    return evaluate(task, model, task.x_heldout, task.y_heldout)[0]


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_train_applies_the_tasks_optimizer_warmup_and_clipping(schedule):
    task, budget = _tiny(), 40
    assert task.warmup_steps(budget) == 2
    result = train(task, ScheduleSpec(schedule), budget, seed=0, peak_lr=3e-3)
    expected = _by_hand(task, budget, 0, 3e-3, schedule)
    assert result.final_heldout_loss == expected
    unclipped = _by_hand(_tiny(grad_clip=None), budget, 0, 3e-3, schedule)
    assert abs(unclipped - expected) > 1e-4  # clipping is active at this rate
    assert result.curve_lr[:3] == pytest.approx([0.0, 1.5e-3, 3e-3])  # 2 warm-up steps from 0


def test_callback_sees_every_step_and_changes_nothing():
    task, seen = _tiny(), []

    def callback(step, model, opt):
        seen.append((step, opt.param_groups[0]["lr"], int(opt.state[model.head.weight]["step"])))

    plain = train(task, ScheduleSpec("cosine"), 10, seed=1, peak_lr=1e-3)
    watched = train(task, ScheduleSpec("cosine"), 10, seed=1, peak_lr=1e-3, callback=callback)
    assert watched.final_heldout_loss == plain.final_heldout_loss
    assert [s for s, _, _ in seen] == list(range(1, 11)) == [n for _, _, n in seen]
    assert seen[-1][1] == 0.0  # the rate after the last scheduler step (the budget's end)


def test_every_schedule_gets_the_same_warmup():
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1.0)
    specs = [ScheduleSpec("cosine"), ScheduleSpec("wsd"), ScheduleSpec("uba", 0.5)]
    rates = [spec.factory(100, warmup_steps=5)(opt).lr_at for spec in specs]
    for lr_at in rates:
        assert [lr_at(t)[0] for t in range(6)] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        assert lr_at(99)[0] == 0.0
    # No warm-up: the schedulers exactly as before the argument existed.
    assert ScheduleSpec("cosine").factory(100)(opt).warmup_steps is None
    assert ScheduleSpec("uba", 2.0).factory(100)(opt).warmup_steps == 0


def test_train_refuses_a_factory_without_the_tasks_warmup():
    task = _tiny()

    def factory(opt):
        return uba_auto.UBAScheduler(opt, total_steps=39, phi=2.0)

    with pytest.raises(ValueError, match=r"warmup_steps=task.warmup_steps\(budget\) \(= 2\)"):
        train(task, factory, 40, seed=0, peak_lr=1e-3)


def test_sequence_accuracy_is_over_every_position():
    task = _tiny()
    model = task.make_model(0)
    loss, acc = evaluate(task, model, task.x_heldout, task.y_heldout)
    with torch.no_grad():
        out = model(task.x_heldout)
    assert acc == float((out.argmax(-1) == task.y_heldout).float().mean())
    assert loss == pytest.approx(float(task.loss_fn(out, task.y_heldout)), rel=1e-6)


def test_sgd_tasks_keep_their_optimizer_and_summary():
    task = get_task("digits_cnn")
    opt = task.make_optimizer(task.make_model(0), 0.1)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.9
    assert task.warmup_steps(2000) == 0 and task.grad_clip is None
    summary = task.summary()
    assert summary["optimizer"] == "SGD(momentum=0.9)"
    assert "warmup_fraction" not in summary and "grad_clip" not in summary
    gpt = get_task("gpt_adamw").summary()
    assert gpt["optimizer"].startswith("AdamW") and gpt["warmup_fraction"] == 0.05


# --------------------------------------------------------------------------------------------------
# The held-out representative tasks (resnet_bn, vit_adamw) and Task.augment


def _old_stream(task, seed: int, num: int):
    """Task.batches as it was before the augment field: the reference for tasks without one."""
    if task.batch_size is None:
        return [(task.x_train, task.y_train)] * num
    gen = torch.Generator().manual_seed(1_000_003 * seed + 17)
    out, n, b = [], task.num_train, task.batch_size
    while len(out) < num:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - b + 1, b):
            idx = order[start : start + b]
            out.append((task.x_train[idx], task.y_train[idx]))
    return out[:num]


@pytest.mark.parametrize("name", ["digits_cnn", "char_lm", "lstsq_illcond"])
def test_tasks_without_augmentation_keep_their_stream_and_summary(name):
    task = get_task(name)
    assert task.augment is None
    num = 2 * task.num_train // task.batch_size + 3 if task.batch_size and name != "char_lm" else 3
    got = list(itertools.islice(task.batches(4), num))
    for (x, y), (x_ref, y_ref) in zip(got, _old_stream(task, 4, num), strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    # The summary keys stored in the JSON of the existing sweeps, exactly (no "augment").
    assert set(task.summary()) == {
        "name", "description", "kind", "num_train", "num_heldout", "num_params", "batch_size",
        "momentum", "optimizer", "budgets", "expected_regime", "base_lr", "curve_eval_size",
        "train_eval_size", "probe_batches", "meta",
    }  # fmt: skip


def test_heldout_representative_tasks_are_in_no_other_registry():
    from benchmarks.tasks import HELDOUT_REPRESENTATIVE_TASK_NAMES, HOLDOUT_TASK_NAMES, TASK_NAMES

    assert HELDOUT_REPRESENTATIVE_TASK_NAMES == ("resnet_bn", "vit_adamw")
    assert REPRESENTATIVE_TASK_NAMES == ("gpt_adamw",)
    others = set(TASK_NAMES) | set(HOLDOUT_TASK_NAMES) | set(REPRESENTATIVE_TASK_NAMES)
    assert not others & set(HELDOUT_REPRESENTATIVE_TASK_NAMES)


@pytest.mark.parametrize("name", ["resnet_bn", "vit_adamw"])
def test_image_tasks_split_all_1797_digits_into_images(name):
    from sklearn.datasets import load_digits

    task = get_task(name)
    assert task.x_train.shape == (1200, 1, 8, 8) and task.x_heldout.shape == (597, 1, 8, 8)
    assert float(task.x_train.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(task.x_train.std()) == pytest.approx(1.0, abs=1e-3)
    # Undo the standardisation: the raw digits, every one of the 1797 exactly once.
    raw = load_digits()
    x = torch.cat([task.x_train, task.x_heldout]).double().flatten(1)
    background = float(task.x_train.min())  # raw 0 is the smallest pixel value
    scale = (x.max() - background) / 1.0  # raw 16/16 is the largest
    restored = ((x - background) / scale * 16).round().long()
    labels = torch.cat([task.y_train, task.y_heldout])
    pairs = sorted(zip(map(tuple, restored.tolist()), labels.tolist(), strict=True))
    reference = sorted(
        zip(map(tuple, raw.data.astype(int).tolist()), raw.target.tolist(), strict=True)
    )
    assert pairs == reference
    summary = task.summary()
    assert summary["augment"].startswith("random translation by up to 1 pixel")
    assert summary["budgets"][1] == 1200 and summary["probe_batches"] == 4


def _naive_translations(image, fill: float):
    """Every shift of ``image`` (C, H, W) by -1..1 pixels per axis, written out by hand."""
    c, h, w = image.shape
    padded = torch.full((c, h + 2, w + 2), fill)
    padded[:, 1:-1, 1:-1] = image
    return [padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]


@pytest.mark.parametrize("name", ["resnet_bn", "vit_adamw"])
def test_augmented_stream_is_seeded_and_changes_the_images_not_the_labels(name):
    task = get_task(name)
    first = list(itertools.islice(task.batches(3), 25))  # past the first epoch (18 batches)
    again = list(itertools.islice(task.batches(3), 25))
    other = next(task.batches(4))
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(first[0][1], other[1])
    # The first epoch's order is drawn before any augmentation: the same examples as without it.
    plain = list(itertools.islice(replace(task, augment=None).batches(3), 18))
    background = float(task.x_train.min())
    shifted = 0
    for (x, y), (x_plain, y_plain) in zip(first[:18], plain, strict=True):
        assert torch.equal(y, y_plain) and x.shape == x_plain.shape
        for image, original in zip(x, x_plain, strict=True):
            candidates = _naive_translations(original, background)
            assert any(torch.equal(image, c) for c in candidates)
            shifted += not torch.equal(image, original)
    # 8 of the 9 offsets move the image (a digit never equals its own shift).
    assert 0.8 < shifted / (18 * 64) < 0.95


def test_random_translate_covers_every_offset_and_checks_its_input():
    from benchmarks.vision_models import random_translate

    images = torch.randn(500, 2, 5, 6)
    out = random_translate(images, torch.Generator().manual_seed(0), fill=-3.0)
    seen = set()
    for image, original in zip(out, images, strict=True):
        matches = [
            k for k, c in enumerate(_naive_translations(original, -3.0)) if torch.equal(image, c)
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(9))
    assert torch.equal(random_translate(images, torch.Generator(), max_shift=0), images)
    with pytest.raises(ValueError, match="channels, height, width"):
        random_translate(images.flatten(1), torch.Generator())


def test_resnet_bn_optimizer_is_nesterov_sgd_decaying_every_parameter():
    task = get_task("resnet_bn")
    model = task.make_model(0)
    opt = task.make_optimizer(model, 0.1)
    assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)
    assert len(group["params"]) == len(list(model.parameters()))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) >= 7
    assert task.warmup_steps(1200) == 0 and task.grad_clip is None


def test_vit_adamw_optimizer_decays_the_linear_weights_only():
    task = get_task("vit_adamw")
    model = task.make_model(0)
    opt = task.make_optimizer(model, 1e-3)
    no_decay, decay = opt.param_groups
    assert type(opt) is torch.optim.AdamW
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)
    assert all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights
    assert id(model.pos_emb.weight) in {id(p) for p in no_decay["params"]}
    assert task.warmup_steps(300) == 15 and task.grad_clip == 1.0


def test_vit_attends_both_ways_and_is_twice_differentiable():
    from benchmarks.vision_models import DigitsViT

    torch.manual_seed(0)
    model = DigitsViT(d_model=16, num_layers=1, num_heads=2, pooling="cls").double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.double)
    x2 = x.clone()
    x2[:, :, 7, 7] += 1.0  # the last patch: a causal model's class token could not see it
    assert not torch.allclose(model(x), model(x2))
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2]))
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * g.detach()).sum() for g in grads), params)
    assert all(torch.isfinite(h).all() for h in hvp)
    with pytest.raises(ValueError, match="patch must divide"):
        DigitsViT(patch=3)
    with pytest.raises(ValueError, match="pooling must be"):
        DigitsViT(pooling="max")


# The ViT starts on a plateau (it must learn where its patches are), the ResNet drops at once.
@pytest.mark.parametrize(("name", "factor"), [("resnet_bn", 0.5), ("vit_adamw", 0.97)])
def test_a_short_cosine_run_reduces_the_loss(name, factor):
    task = get_task(name)
    model = task.make_model(0)
    x_tr, y_tr = task.train_eval()
    before, _ = evaluate(task, model, x_tr, y_tr)
    peak = task.base_lr[task.budgets[0]]
    result = train(task, ScheduleSpec("cosine"), 60, seed=0, peak_lr=peak)
    assert not result.diverged
    assert result.final_train_loss < factor * before
    assert result.final_heldout_loss < factor * before


# The φ study's tools: WSD with a chosen cool-down, the sweep's --extend mode, and the default
# link where small φ diverges.


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_wsd_spec_cools_down_over_its_fraction_of_the_run(fraction):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = ScheduleSpec("wsd", decay_fraction=fraction).factory(101)(opt)
    rates = []
    for _ in range(101):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    total = 100  # total_steps = budget - 1
    start = total - fraction * total
    for t, lr in enumerate(rates):
        expected = 1.0 if t <= start else (total - t) / (total - start)
        assert lr == pytest.approx(expected, abs=1e-12), t


def test_wsd_spec_with_a_cosine_cool_down_is_the_closed_form():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    spec = ScheduleSpec("wsd", decay_fraction=0.6, decay_shape="cosine")
    sched = spec.factory(101)(opt)
    total, start = 100, 40.0
    for t in range(101):
        s_ = max(0.0, (t - start) / (total - start))
        expected = 0.5 * (1 + math.cos(math.pi * s_))
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), t
        opt.step()
        sched.step()
    assert spec.label == "wsd60cos" and ScheduleSpec("wsd", decay_shape="cosine").label == "wsdcos"
    with pytest.raises(ValueError, match="decay_shape is a parameter of the 'wsd' schedule"):
        ScheduleSpec("uba", phi=1.0, decay_shape="cosine")


def test_wsd_spec_labels_and_refuses_the_fraction_elsewhere():
    assert ScheduleSpec("wsd").label == "wsd"
    assert ScheduleSpec("wsd", decay_fraction=0.1).label == "wsd10"
    with pytest.raises(ValueError, match="decay_fraction"):
        ScheduleSpec("cosine", decay_fraction=0.1)
    task = get_task("lstsq_illcond")
    run = train(task, ScheduleSpec("wsd", decay_fraction=0.1), 20, seed=0, peak_lr=1.0)
    assert run.label == "wsd10" and run.decay_fraction == 0.1
    assert RunResult(**{**run.__dict__, "decay_fraction": None}).label == "wsd"


def _stored_cell(task, budget, peak, seeds, specs):
    runs = {
        s.label: [train(task, s, budget, seed, peak).to_dict() for seed in seeds] for s in specs
    }
    schedules = {k: phi_sweep._summarise_runs(v) for k, v in runs.items()}
    return {
        "task": task.name,
        "budget": budget,
        "peak_lr": peak,
        "runs": runs,
        "schedules": schedules,
    }


def test_extend_adds_only_the_missing_schedules_and_rechooses_the_best_phi(monkeypatch):
    task = get_task("lstsq_illcond")
    budget, peak, seeds = 30, 1.0, [0, 1]
    monkeypatch.setattr(phi_sweep, "PHIS", (0.5, 1.0, 2.0))
    monkeypatch.setattr(phi_sweep, "BASELINES", ("cosine", "wsd10"))
    stored = [ScheduleSpec("cosine"), ScheduleSpec("uba", 1.0), ScheduleSpec("uba", 2.0)]
    old = {"cells": [_stored_cell(task, budget, peak, seeds, stored)]}
    (cell,) = phi_sweep._extend(old, None, seeds, workers=1)
    assert cell["extended_with"] == ["phi=0.5", "wsd10"]
    assert cell["runs"]["phi=1"] == old["cells"][0]["runs"]["phi=1"]  # stored runs kept
    for label, spec in (
        ("phi=0.5", ScheduleSpec("uba", 0.5)),
        ("wsd10", ScheduleSpec("wsd", decay_fraction=0.1)),
    ):
        fresh = [train(task, spec, budget, s, peak).final_heldout_loss for s in seeds]
        assert cell["schedules"][label]["heldout_loss_per_seed"] == pytest.approx(fresh)
    means = {p: cell["schedules"][f"phi={p:g}"]["heldout_loss_mean"] for p in (0.5, 1.0, 2.0)}
    assert cell["best_phi"] == min(means, key=means.get)
    cos = cell["schedules"]["cosine"]["heldout_loss_mean"]
    assert cell["cosine_gap_to_best_phi_pct"] == pytest.approx(
        100 * (cos - min(means.values())) / min(means.values())
    )


@pytest.mark.parametrize("budget", [200, 2000])
def test_default_link_keeps_cosine_where_small_phi_diverges(budget):
    """``digits_cnn`` at its cosine-tuned peak (0.08, momentum 0.9) sits where φ < 2 diverged in
    the sweep (BENCHMARKS.md §2): the default link must not pick φ < 2 there."""
    task = get_task("digits_cnn")
    model = task.make_model(0)
    batches = list(itertools.islice(task.batches(0), 8))
    opt = task.make_optimizer(model, 0.08)
    auto = uba_auto.auto_uba(model, batches, budget, loss_fn=task.loss_fn, optimizer=opt)
    assert auto.phi >= 2.0, auto.report.reason


@pytest.mark.parametrize(
    ("name", "budget"),
    [("digits_mlp", 300), ("digits_logreg", 100), ("lstsq_illcond", 100), ("gpt_adamw", 1000)],
)
def test_equal_cost_rule_runs_fit_training_and_every_check_in_the_budget(name, budget):
    # benchmarks/plateau_rule.py --equal-cost: the most steps s with s + (every check's forward
    # passes, in gradient-equivalents) <= budget, with the validation set auto_uba reads.
    from benchmarks import plateau_rule as R
    from uba_auto.phi import _plateau as P

    task = get_task(name)
    (xv, _), (xt, _) = R.validation_set(task, 8)
    (xv_all, _), (xt_all, _) = R.split_heldout(task)
    batch = task.batch_size or task.num_train
    assert xv.shape[0] == min(8 * batch, xv_all.shape[0]) and torch.equal(xt, xt_all)

    def cost(steps):  # written out: checks x examples per check / (3 x examples per step)
        checks = P.plateau_check_steps(steps - 1, task.warmup_steps(steps))
        return len(checks) * xv.shape[0] / (3 * batch)

    steps = R.equal_cost_steps(task, budget, 8)
    assert steps + cost(steps) <= budget
    assert all(s + cost(s) > budget for s in range(steps + 1, budget + 1))
    assert R.check_cost(task, steps, 8) == pytest.approx(cost(steps))


def test_hold_test_tasks_are_new_and_classified_as_the_preregistration_says():
    """The hold rule's test tasks (benchmarks/results/prereg_hold_rule.md): in no other registry,
    and each a self-stabilising run of the kind it was built to test."""
    from benchmarks.tasks import (
        HELDOUT_REPRESENTATIVE_TASK_NAMES,
        HOLD_TEST_TASK_NAMES,
        HOLDOUT_TASK_NAMES,
        TASK_NAMES,
    )
    from uba_auto.phi import self_stabilising

    assert HOLD_TEST_TASK_NAMES == ("lstm_adamw", "noisy_mlp_adamw", "bn_mlp_sgd")
    others = (
        set(TASK_NAMES)
        | set(HOLDOUT_TASK_NAMES)
        | set(REPRESENTATIVE_TASK_NAMES)
        | set(HELDOUT_REPRESENTATIVE_TASK_NAMES)
    )
    assert not others & set(HOLD_TEST_TASK_NAMES)
    kinds = {}
    for name in HOLD_TEST_TASK_NAMES:
        task = get_task(name)
        model = task.make_model(0)
        kinds[name] = self_stabilising(
            model, task.make_optimizer(model, task.base_lr[task.budgets[0]])
        )
        x, y = next(task.batches(0))
        assert torch.isfinite(task.loss_fn(model(x), y))
    assert kinds["lstm_adamw"].startswith("AdamW is an adaptive")
    assert kinds["noisy_mlp_adamw"].startswith("AdamW is an adaptive")
    assert (
        kinds["bn_mlp_sgd"].startswith("SGD with weight decay 0.0005")
        and "BatchNorm1d" in (kinds["bn_mlp_sgd"])
    )
    # The calibration SGD tasks are not self-stabilising: the hold link leaves their phi alone.
    for name in TASK_NAMES:
        task = get_task(name)
        model = task.make_model(0)
        assert self_stabilising(model, task.make_optimizer(model, 0.1)) is None, name


def test_generalisation_share_of_progress_on_known_curves():
    """G(f) of benchmarks/generalisation_signal.py: 1 when the held-out loss falls as the training
    loss does, 0 when it stays, negative when it rises, NaN when training did not fall."""
    import math

    from benchmarks.generalisation_signal import share_of_progress

    steps = list(range(0, 101, 10))
    train = [math.exp(-0.1 * i) for i in range(11)]

    def run(held):
        return dict(curve_steps=steps, budget=100, curve_train_loss=train, curve_heldout_loss=held)

    assert share_of_progress(run(train), 0.3) == pytest.approx(1.0)
    assert share_of_progress(run([1.0] * 11), 0.3) == pytest.approx(0.0)
    rising = [math.exp(0.05 * i) for i in range(11)]
    assert share_of_progress(run(rising), 0.3) == pytest.approx(-0.5)
    flat = dict(run(train), curve_train_loss=[1.0] * 11)
    assert math.isnan(share_of_progress(flat, 0.3))
