"""The checked factories and their composition against closed forms, for every schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uba_auto.schedules import (
    SCHEDULES,
    Schedule,
    decay_progress,
    decay_schedule,
    join_schedules,
    make_schedule,
    uba_factor,
    uba_reentry,
    warmup_schedule,
)

NAMES = sorted(SCHEDULES)
# Each schedule's own arguments, away from their defaults.
OWN = {
    "uba": {"phi": 0.7},
    "constant": {},
    "cosine": {},
    "linear": {},
    "step": {"milestones": (0.2, 0.6), "gamma": 0.3},
    "wsd": {"decay_fraction": 0.4, "decay_shape": "cosine"},
    "rex": {"beta": 0.3},
    "onecycle": {"pct_start": 0.25, "div_factor": 10.0},
}
REQUIRED = {"uba": {"phi": 3.0}}
DECAY_OWN = {name: ({} if name == "onecycle" else kw) for name, kw in OWN.items()}


def fraction(name: str, s: np.ndarray, **kw) -> np.ndarray:
    """The remaining fraction f(s) of each schedule, written from the papers' formulas."""
    s = np.clip(np.asarray(s, dtype=np.float64), 0.0, 1.0)
    if name == "uba":
        with np.errstate(over="ignore"):
            tan2 = np.tan(np.pi * s / 2) ** 2
        return np.where(s >= 1, 0.0, 1 / (1 + kw["phi"] / 2 * tan2))
    if name in ("cosine", "onecycle"):
        return (1 + np.cos(np.pi * s)) / 2
    if name == "linear":
        return 1 - s
    if name == "constant":
        return np.ones_like(s)
    if name == "step":
        k = sum((s >= m).astype(float) for m in kw.get("milestones", (0.5, 0.75)))
        return kw.get("gamma", 0.1) ** k
    if name == "wsd":
        p = np.clip(1 - (1 - s) / kw.get("decay_fraction", 0.2), 0, 1)
        shape = kw.get("decay_shape", "linear")
        return {"linear": 1 - p, "cosine": (1 + np.cos(np.pi * p)) / 2, "1-sqrt": 1 - np.sqrt(p)}[
            shape
        ]
    if name == "rex":
        beta = kw.get("beta", 0.5)
        return (1 - s) / (1 - beta * s)
    raise AssertionError(name)


class TestMakeSchedule:
    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize("warmup", [{}, {"warmup_steps": 7, "warmup_start_lr": 0.01}])
    @pytest.mark.parametrize("own", ["defaults", "own"])
    def test_equals_the_function_bit_for_bit(self, name, warmup, own):
        kw = dict(lr_max=0.3, lr_min=0.003, **warmup, **(OWN[name] if own == "own" else {}))
        kw = {**REQUIRED.get(name, {}), **kw}
        schedule, fn = make_schedule(name, 120, **kw), SCHEDULES[name]
        assert isinstance(schedule, Schedule)
        steps = np.arange(0, 140)
        np.testing.assert_array_equal(schedule(steps), fn(steps, 120, **kw))
        as_torch = schedule(torch.tensor(steps))
        assert as_torch.dtype == torch.float64
        np.testing.assert_array_equal(as_torch.numpy(), fn(torch.tensor(steps), 120, **kw).numpy())
        for t in (0, 7, 8, 60, 120, 1000):
            out = schedule(t)
            assert isinstance(out, float) and out == fn(t, 120, **kw)

    def test_none_warmup_keeps_each_schedules_default(self):
        assert make_schedule("cosine", 50, lr_max=1.0, warmup_steps=None)(0) == 1.0
        one = make_schedule("onecycle", 100, lr_max=1.0)
        assert one(0) == 0.04 and one(30) == 1.0  # lr_max / 25, then the peak at 0.3 * T

    @pytest.mark.parametrize(
        "name,kw,error,match",
        [
            ("uba", {"phi": 0.0}, ValueError, r"phi must be finite and > 0, got 0.0; phi = 2"),
            ("cosine", {"lr_min": 0.2}, ValueError, r"lr_min must be <= lr_max, got lr_min=0.2"),
            ("linear", {"warmup_steps": 10}, ValueError, r"total_steps must be > warmup_steps"),
            ("step", {"milestones": (0.5, 0.5)}, ValueError, "strictly increasing"),
            ("wsd", {"decay_shape": "exp"}, ValueError, "decay_shape must be one of"),
            ("rex", {"beta": 1.0}, ValueError, r"beta must lie in \[0, 1\)"),
            ("onecycle", {"div_factor": 0.5}, ValueError, "div_factor must be >= 1"),
            ("cosine", {"warmup_steps": 2.0}, TypeError, "warmup_steps must be an int"),
        ],
    )
    def test_checked_at_construction_with_the_functions_messages(self, name, kw, error, match):
        with pytest.raises(error, match=match):
            make_schedule(name, 10, lr_max=0.1, **kw)
        with pytest.raises(error, match=match):
            SCHEDULES[name](1, 10, lr_max=0.1, **kw)

    def test_calling_checks_only_the_step(self):
        schedule = make_schedule("uba", 10, phi=1.0, lr_max=0.1)
        with pytest.raises(ValueError, match=r"step must be >= 0, got -1"):
            schedule(-1)
        with pytest.raises(TypeError, match="step must be an int, a float"):
            schedule("3")

    def test_names_and_arguments_that_do_not_fit(self):
        with pytest.raises(ValueError, match=r"unknown schedule 'cosin'.*'cosine'"):
            make_schedule("cosin", 10, lr_max=0.1)
        with pytest.raises(TypeError, match=r"schedule 'cosine' got unexpected \['milestones'\]"):
            make_schedule("cosine", 10, lr_max=0.1, milestones=(0.5,))
        with pytest.raises(TypeError, match=r"schedule 'uba' needs \['phi'\]"):
            make_schedule("uba", 10, lr_max=0.1)


class TestDecaySchedule:
    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize("entry", [0.0, 0.3, 0.85])
    def test_closed_form(self, name, entry):
        n, own = 80, DECAY_OWN[name]
        kw = {**REQUIRED.get(name, {}), **own}
        decay = decay_schedule(name, n, lr_max=0.4, lr_min=0.01, entry=entry, **kw)
        k = np.arange(0, n + 6, dtype=np.float64)
        s = np.minimum(1.0, entry + (1 - entry) * k / n)
        f = fraction(name, s, **kw)
        np.testing.assert_allclose(decay(k), 0.4 * f + 0.01 * (1 - f), rtol=1e-12, atol=1e-15)
        if name not in ("step", "constant"):  # the annealing ones end exactly at lr_min
            assert decay(n) == 0.01 and decay(n + 5) == 0.01

    @pytest.mark.parametrize("name", NAMES)
    def test_entry_zero_is_the_decay_phase_of_the_schedule(self, name):
        kw = {**REQUIRED.get(name, {}), **DECAY_OWN[name]}
        decay = decay_schedule(name, 50, lr_max=0.2, lr_min=0.002, **kw)
        steps = np.arange(0, 60)
        expected = make_schedule(name, 50, lr_max=0.2, lr_min=0.002, warmup_steps=0, **kw)(steps)
        np.testing.assert_array_equal(decay(steps), expected)

    def test_arguments(self):
        with pytest.raises(ValueError, match=r"entry must lie in \[0, 1\]"):
            decay_schedule("uba", 10, phi=1.0, lr_max=0.1, entry=1.5)
        with pytest.raises(ValueError, match="steps must be >= 1"):
            decay_schedule("linear", 0, lr_max=0.1)
        with pytest.raises(ValueError, match="lr_min must be <= lr_max"):
            decay_schedule("linear", 10, lr_max=0.1, lr_min=0.5)


class TestWarmupSchedule:
    def test_linear_and_cosine_closed_forms(self):
        t = np.arange(0, 21, dtype=np.float64)
        p = np.minimum(t / 16, 1.0)
        lin = warmup_schedule(16, start_lr=0.1, end_lr=0.9)
        cos = warmup_schedule(16, start_lr=0.1, end_lr=0.9, shape="cosine")
        np.testing.assert_allclose(lin(t), 0.1 + 0.8 * p, rtol=1e-14)
        np.testing.assert_allclose(cos(t), 0.1 + 0.8 * (1 - np.cos(np.pi * p)) / 2, rtol=1e-14)
        assert lin(16) == 0.9 and lin(40) == 0.9 and cos(16) == 0.9

    def test_arguments(self):
        with pytest.raises(ValueError, match="shape must be one of"):
            warmup_schedule(4, start_lr=0.0, end_lr=1.0, shape="exp")
        with pytest.raises(ValueError, match="start_lr must be finite and >= 0"):
            warmup_schedule(4, start_lr=-1.0, end_lr=1.0)


class TestJoin:
    def test_at_a_boundary_the_earlier_schedule_holds(self):
        a = decay_schedule("linear", 10, lr_max=1.0)
        b = decay_schedule("cosine", 30, lr_max=0.5, lr_min=0.1)
        joined = join_schedules([a, b], [6])
        for t in range(0, 50):
            assert joined(t) == (a(t) if t <= 6 else b(t - 6))

    def test_several_boundaries_vectorised_equals_scalar(self):
        pieces = [
            warmup_schedule(5, start_lr=0.0, end_lr=1.0),
            decay_schedule("uba", 20, phi=4.0, lr_max=1.0, lr_min=0.1),
            decay_schedule("linear", 10, lr_max=0.3, lr_min=0.0),
        ]
        joined = join_schedules(pieces, [5, 15])
        steps = np.arange(0, 40)
        scalar = np.array([joined(int(t)) for t in steps])
        expected = [
            pieces[0](t) if t <= 5 else pieces[1](t - 5) if t <= 15 else pieces[2](t - 15)
            for t in steps
        ]
        np.testing.assert_array_equal(scalar, expected)
        np.testing.assert_array_equal(joined(steps), scalar)
        np.testing.assert_array_equal(joined(torch.tensor(steps)).numpy(), scalar)

    @pytest.mark.parametrize("name", NAMES)
    def test_warmup_then_decay_is_the_schedule(self, name):
        # Every schedule is its warm-up joined to its decay, bit for bit.
        kw = {**REQUIRED.get(name, {}), **DECAY_OWN[name]}
        shape = "cosine" if name == "onecycle" else "linear"
        joined = join_schedules(
            [
                warmup_schedule(12, start_lr=0.02, end_lr=0.3, shape=shape),
                decay_schedule(name, 100 - 12, lr_max=0.3, lr_min=0.001, **kw),
            ],
            [12],
        )
        schedule = make_schedule(
            name, 100, lr_max=0.3, lr_min=0.001, warmup_steps=12, warmup_start_lr=0.02, **kw
        )
        steps = np.arange(0, 110)
        np.testing.assert_array_equal(joined(steps), schedule(steps))

    def test_one_schedule_is_itself(self):
        a = decay_schedule("linear", 10, lr_max=1.0)
        assert join_schedules([a], []) is a

    @pytest.mark.parametrize(
        "schedules,boundaries,error,match",
        [
            ([], [], ValueError, "at least one schedule"),
            ([None], [], TypeError, r"schedules\[0\] must be a Schedule"),
            (["a", "b"], [3], TypeError, "must be a Schedule"),
            ([1, 1], [], ValueError, "one boundary fewer"),
            ([1, 1, 1], [5, 5], ValueError, "boundaries must be strictly increasing"),
            ([1, 1], [-1], ValueError, r"boundaries\[0\] must be >= 0"),
        ],
    )
    def test_arguments(self, schedules, boundaries, error, match):
        piece = decay_schedule("linear", 10, lr_max=1.0)
        schedules = [piece if s == 1 else s for s in schedules]
        with pytest.raises(error, match=match):
            join_schedules(schedules, boundaries)


class TestReentry:
    @pytest.mark.parametrize("phi", [0.25, 1.0, 2.0, 8.0])
    @pytest.mark.parametrize("new_phi", [0.1, 1.0, 6.0])
    @pytest.mark.parametrize("s", [0.0, 0.2, 0.5, 0.93])
    def test_same_remaining_fraction(self, phi, new_phi, s):
        s_new = uba_reentry(s, phi, new_phi)
        assert 0.0 <= s_new < 1.0
        assert uba_factor(s_new, new_phi) == pytest.approx(uba_factor(s, phi), rel=1e-12, abs=0)
        tan_form = math.sqrt(phi / new_phi) * math.tan(math.pi * s / 2)
        assert math.tan(math.pi * s_new / 2) == pytest.approx(tan_form, rel=1e-12, abs=1e-300)

    def test_same_phi_and_arguments(self):
        assert uba_reentry(0.4, 3.0, 3.0) == pytest.approx(0.4, rel=1e-15)
        with pytest.raises(ValueError, match="new_phi must be finite and > 0"):
            uba_reentry(0.4, 3.0, 0.0)
        with pytest.raises(ValueError, match=r"progress must lie in \[0, 1\]"):
            uba_reentry(1.2, 3.0, 1.0)


def test_decay_progress_closed_form():
    k = np.arange(0, 30, dtype=np.float64)
    np.testing.assert_allclose(
        decay_progress(k, 20, entry=0.25), np.minimum(1, 0.25 + 0.75 * k / 20), rtol=1e-15
    )
    assert decay_progress(-3, 20) == 0.0  # pieces of a join see negative steps
