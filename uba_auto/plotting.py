"""Plots of the schedules, and the pieces other plots share.

matplotlib is optional (``pip install "uba-auto[plot]"``) and imported only when a plot is asked
for; functions return the Figure and let the caller choose where it goes. :func:`plot_schedules`
is the public plot; :func:`new_figure` and :func:`draw_density` are the building blocks of the
report's and the demo's figures (public in this module, not exported by the package).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._validation import check_int, check_positive_finite
from .schedules import cosine_lr, linear_lr, uba_lr

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["draw_density", "new_figure", "plot_schedules"]


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A new matplotlib Figure of ``figsize`` inches, with a constrained layout.

    Raises:
        ImportError: if matplotlib is not installed; the message gives the command that installs it.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "plotting needs matplotlib; install it with: pip install 'uba-auto[plot]'"
        ) from err
    # A bare Figure, not pyplot: no global state, no GUI backend, safe in scripts and threads.
    return Figure(figsize=figsize, layout="constrained")


def plot_schedules(
    phis: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    *,
    total_steps: int = 1000,
    warmup_steps: int = 0,
    lr_max: float = 1.0,
    lr_min: float = 0.0,
    include_linear: bool = True,
    ax: Any = None,
) -> Figure:
    r"""Plot the UBA family for several :math:`\varphi` next to cosine annealing (and linear decay).

    Args:
        phis: the values of φ to draw, each finite and > 0.
        total_steps: budget ``T`` of the plotted schedules.
        warmup_steps: linear warm-up length (from 0).
        lr_max: peak rate (1 shows the rate as a fraction of the peak).
        lr_min: final rate.
        include_linear: also draw linear decay, which no φ reproduces.
        ax: a matplotlib Axes to draw into; a new Figure is made when None.

    Returns:
        The matplotlib Figure (``ax.figure`` when ``ax`` is given).

    Example:
        >>> fig = plot_schedules([0.5, 4.0], total_steps=100)
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['UBA φ=0.5', 'UBA φ=4', 'cosine (= UBA φ=2)', 'linear']
    """
    if isinstance(phis, (int, float)):
        phis = [phis]
    phis = [check_positive_finite(f"phis[{i}]", p) for i, p in enumerate(phis)]
    if not phis:
        raise ValueError("phis must hold at least one value of phi, got an empty sequence")
    total_steps = check_int("total_steps", total_steps, minimum=1)
    common = dict(lr_max=lr_max, lr_min=lr_min, warmup_steps=warmup_steps)
    steps = np.arange(total_steps + 1)
    # Validate everything before drawing anything.
    curves = [(f"UBA φ={p:g}", uba_lr(steps, total_steps, phi=p, **common)) for p in phis]

    if ax is None:
        fig = new_figure((7.0, 4.2))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    cmap = _viridis(len(phis))
    for color, (label, lr) in zip(cmap, curves, strict=True):
        ax.plot(steps, lr, color=color, lw=2, label=label)
    ax.plot(
        steps, cosine_lr(steps, total_steps, **common), "k--", lw=1.5, label="cosine (= UBA φ=2)"
    )
    if include_linear:
        ax.plot(
            steps,
            linear_lr(steps, total_steps, **common),
            ":",
            color="0.45",
            lw=1.5,
            label="linear",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate" if lr_max != 1.0 else "learning rate / peak")
    title = f"UBA schedules, T = {total_steps}"
    ax.set_title(title + (f", warm-up {warmup_steps}" if warmup_steps else ""))
    ax.set_xlim(0, total_steps)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    return fig


def _viridis(n: int) -> list[Any]:
    from matplotlib import colormaps

    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.9, n)]


def draw_density(ax: Any, estimate: Any, *, title: str | None = None) -> None:
    """Draw ``estimate``'s SLQ spectral density (log scale) with λ_max and λ_min marked on ``ax``.

    ``estimate`` is a :class:`~uba_auto.probe.CurvatureEstimate`; without a density the panel says
    so. ``title`` defaults to "<curvature> spectral density (SLQ), <negative mass>".
    """
    import torch

    est = estimate
    mass = "" if est.negative_mass is None else f", {100 * est.negative_mass:.1f} % negative"
    if est.density is None:
        ax.text(
            0.5,
            0.5,
            "no density probed\n(probe with density=True)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    else:
        lo, hi = float(est.density.nodes.min()), float(est.density.nodes.max())
        pad = 0.05 * (hi - lo or 1.0)
        grid = torch.linspace(lo - pad, hi + pad, 400, dtype=torch.float64)
        dens = est.density.density(grid)
        ax.plot(grid.numpy(), dens.numpy(), color="C0")
        ax.fill_between(grid.numpy(), dens.numpy(), alpha=0.2, color="C0")
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(float(dens.max()) * 1e-6, 1e-12))
        ax.set_ylabel("density (per unit eigenvalue)")
    for value, style, label in ((est.lambda_max, "--", "λ_max"), (est.lambda_min, ":", "λ_min")):
        if value is not None and np.isfinite(value):
            ax.axvline(value, color="k", ls=style, lw=1, label=f"{label} = {value:.3g}")
    ax.set_title(title or f"{est.curvature} spectral density (SLQ){mass}", fontsize="medium")
    ax.set_xlabel("eigenvalue")
    ax.legend(frameon=False, fontsize="small", loc="upper left")
