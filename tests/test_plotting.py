"""plot_schedules draws the curves it says it draws, with the values of the pure functions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from uba_auto import DenseOperator, plot_schedules, slq_density, uba_lr
from uba_auto.plotting import draw_density, new_figure

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


def test_new_figure_is_a_bare_figure():
    from matplotlib.figure import Figure

    fig = new_figure((3.0, 2.0))
    assert isinstance(fig, Figure) and tuple(fig.get_size_inches()) == (3.0, 2.0)
    assert fig.axes == []


def test_draw_density_without_a_density_says_so():
    estimate = SimpleNamespace(
        density=None, negative_mass=None, lambda_max=3.0, lambda_min=-1.0, curvature="hessian"
    )
    ax = new_figure((4.0, 3.0)).add_subplot()
    draw_density(ax, estimate)
    assert [t.get_text() for t in ax.texts] == ["no density probed\n(probe with density=True)"]
    assert ax.get_title() == "hessian spectral density (SLQ)"
    assert [ln.get_label() for ln in ax.get_lines()] == ["λ_max = 3", "λ_min = -1"]


def test_draw_density_draws_the_slq_density():
    eigenvalues = torch.tensor([-1.0, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    density = slq_density(
        DenseOperator(torch.diag(eigenvalues)),
        num_probes=2,
        num_iters=5,
        generator=torch.Generator().manual_seed(0),
    )
    estimate = SimpleNamespace(
        density=density, negative_mass=0.2, lambda_max=4.0, lambda_min=-1.0, curvature="ggn"
    )
    ax = new_figure((4.0, 3.0)).add_subplot()
    draw_density(ax, estimate, title="my title")
    assert ax.get_title() == "my title" and ax.get_yscale() == "log"
    grid, values = ax.get_lines()[0].get_data()
    assert grid.min() < -1.0 and grid.max() > 4.0
    np.testing.assert_allclose(values, density.density(torch.as_tensor(grid)).numpy())
    assert [ln.get_label() for ln in ax.get_lines()[1:]] == ["λ_max = 4", "λ_min = -1"]
    default = new_figure((4.0, 3.0)).add_subplot()
    draw_density(default, estimate)
    assert default.get_title() == "ggn spectral density (SLQ), 20.0 % negative"
