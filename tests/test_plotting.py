"""plot_schedules draws the curves it says it draws, with the values of the pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from uba_auto import plot_schedules, uba_lr

pytest.importorskip("matplotlib")


def test_curves_are_the_schedules():
    fig = plot_schedules([0.5, 3.0], total_steps=200, warmup_steps=20, include_linear=False)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["UBA φ=0.5", "UBA φ=3", "cosine (= UBA φ=2)"]
    x, y = lines[1].get_data()
    np.testing.assert_array_equal(x, np.arange(201))
    np.testing.assert_array_equal(
        y, uba_lr(np.arange(201), 200, phi=3.0, lr_max=1.0, warmup_steps=20)
    )


def test_draws_into_given_axes_and_saves(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert plot_schedules(2.0, ax=ax) is fig
    out = tmp_path / "s.png"
    fig.savefig(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"phis": []}, "at least one value of phi"),
        ({"phis": [1.0, 0.0]}, r"phis\[1\] must be finite and > 0"),
        ({"phis": [1.0], "total_steps": 0}, "total_steps must be >= 1"),
        ({"phis": [1.0], "warmup_steps": 2000}, "total_steps must be > warmup_steps"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_schedules(**kwargs)
