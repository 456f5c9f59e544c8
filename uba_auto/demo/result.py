"""What the demo returns and writes: one :class:`DemoRun` per schedule, the :class:`DemoResult`
(table, JSON, CSV, figure) and :func:`write_demo_files`."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._serialize import json_safe
from ..report import CurvatureReport

__all__ = ["DEMO_FILES", "DemoResult", "DemoRun", "write_demo_files"]


@dataclass(frozen=True)
class DemoRun:
    """One training run of the demo.

    Attributes:
        name: ``"auto"``, ``"cosine"`` or ``"phi=X"``.
        label: how tables and plots name it.
        phi: the φ of the schedule (2 for cosine, which is UBA with φ = 2).
        final_train_loss, final_train_accuracy: on the whole (unshifted) train set at the end.
        final_heldout_loss, final_heldout_accuracy: on the held-out set at the end.
        diverged: the training loss became NaN or infinite (the run stopped there).
        wall_time_s: training time, evaluation of the curves included.
        curve_steps: optimizer steps done at each curve point.
        curve_train_loss: mean minibatch loss since the previous point (the loss training saw).
        curve_heldout_loss: held-out loss at each point.
        curve_lr: the rate of the last update before each point.
    """

    name: str
    label: str
    phi: float
    final_train_loss: float
    final_train_accuracy: float
    final_heldout_loss: float
    final_heldout_accuracy: float
    diverged: bool
    wall_time_s: float
    curve_steps: tuple[int, ...]
    curve_train_loss: tuple[float, ...]
    curve_heldout_loss: tuple[float, ...]
    curve_lr: tuple[float, ...]

    def summary(self) -> dict[str, Any]:
        """The final numbers, without the curves (one row of the CSV)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.name.startswith("curve_")
        }


_CSV_FIELDS = tuple(f.name for f in dataclasses.fields(DemoRun) if not f.name.startswith("curve_"))


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` returns.

    Attributes:
        report: the curvature report of the pre-training probe.
        runs: the auto-chosen UBA run first, then cosine, then any fixed φ.
        budget, seed, peak_lr, batch_size, momentum: the settings.
        device: where it ran.
        num_train, num_heldout, num_params: sizes.
        probe_time_s: wall time of the pre-training probe (:func:`~uba_auto.auto.auto_uba`).
        probe_share: ``probe_time_s`` over the training time of the auto run.
        probe_cost_fraction: the probe in gradient-equivalents over the budget
            (:attr:`AutoUBA.probe_cost_fraction <uba_auto.auto.AutoUBA.probe_cost_fraction>`).
        wall_time_s: the whole demo.
    """

    report: CurvatureReport
    runs: tuple[DemoRun, ...]
    budget: int
    seed: int
    peak_lr: float
    batch_size: int
    momentum: float
    device: str
    num_train: int
    num_heldout: int
    num_params: int
    probe_time_s: float
    probe_share: float
    probe_cost_fraction: float
    wall_time_s: float

    def run(self, name: str) -> DemoRun:
        """The run called ``name`` (``"auto"``, ``"cosine"``, ``"phi=0.5"``...)."""
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(f"no run named {name!r}; runs: {[r.name for r in self.runs]}")

    def table(self) -> str:
        """The comparison as a text table, with the probe cost below it."""
        cosine = next((r for r in self.runs if r.name == "cosine"), None)
        header = (
            "schedule",
            "phi",
            "train loss",
            "train acc",
            "held-out loss",
            "held-out acc",
            "vs cosine",
            "time (s)",
        )
        rows = []
        for r in self.runs:
            if r.diverged:
                rel = "diverged"
            elif cosine is None or r is cosine or not cosine.final_heldout_loss > 0:
                rel = ""
            else:
                rel = f"{100 * (r.final_heldout_loss / cosine.final_heldout_loss - 1):+.1f} %"
            rows.append(
                (
                    r.label,
                    f"{r.phi:.3g}",
                    f"{r.final_train_loss:.4g}",
                    f"{100 * r.final_train_accuracy:.1f} %",
                    f"{r.final_heldout_loss:.4g}",
                    f"{100 * r.final_heldout_accuracy:.2f} %",
                    rel,
                    f"{r.wall_time_s:.1f}",
                )
            )
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            first = f"{cells[0]:<{widths[0]}}"
            return "  ".join(
                [first, *(f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True))]
            )

        est = self.report.estimate
        lines = [
            f"{self.budget} steps of SGD (momentum {self.momentum:g}, batch {self.batch_size}, "
            f"peak lr {self.peak_lr:g}) on {self.num_train} digits, {self.num_heldout} held out, "
            f"seed {self.seed}, {self.device}",
            line(header),
            line(["-" * w for w in widths]),
            *(line(row) for row in rows),
            f"probe: {est.num_hvps} HVPs on {est.num_batches} batches in {self.probe_time_s:.1f} s "
            f"= {100 * self.probe_share:.0f} % of the auto run's training time "
            f"({100 * self.probe_cost_fraction:.0f} % of the budget in gradient-equivalents)",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the settings, every run with its curves, and the report."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["report"] = self.report.to_dict()
        out["runs"] = [dataclasses.asdict(r) for r in self.runs]
        return json_safe(out)

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as a JSON string (``indent=2`` unless given)."""
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    def to_csv(self) -> str:
        """One row per run with the final numbers (no curves)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in self.runs:
            writer.writerow(r.summary())
        return buf.getvalue()

    def plot(self) -> Any:
        """Training and held-out loss curves, the learning rates, and the spectral density.

        Returns:
            The matplotlib Figure.
        """
        from ..plotting import draw_density, new_figure

        fig = new_figure((11.0, 7.5))
        (ax_train, ax_held), (ax_lr, ax_density) = fig.subplots(2, 2)
        for i, r in enumerate(self.runs):
            style = {"color": f"C{i}", "lw": 2 if r.name == "auto" else 1.3}
            if r.name == "cosine":
                style.update(color="k", ls="--")
            ax_train.plot(r.curve_steps, r.curve_train_loss, label=r.label, **style)
            ax_held.plot(r.curve_steps, r.curve_heldout_loss, label=r.label, **style)
            ax_lr.plot(r.curve_steps, r.curve_lr, label=r.label, **style)
        for ax, title in (
            (ax_train, "training loss (mean over the minibatches since the previous point)"),
            (ax_held, f"held-out loss ({self.num_heldout} digits)"),
        ):
            ax.set_yscale("log")
            ax.set_title(title, fontsize="medium")
        ax_lr.set_title("learning rate", fontsize="medium")
        ax_lr.set_ylim(bottom=0)
        for ax in (ax_train, ax_held, ax_lr):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(frameon=False, fontsize="small")
        mass = self.report.estimate.negative_mass
        draw_density(
            ax_density,
            self.report.estimate,
            title="Hessian spectral density at initialisation"
            + ("" if mass is None else f", {100 * mass:.0f} % negative"),
        )
        fig.suptitle(
            f"uba-auto demo: CNN on digits, {self.budget} steps, peak lr {self.peak_lr:g}, "
            f"auto φ = {self.report.phi:.3g}"
        )
        return fig


DEMO_FILES = {
    "figure": "demo.png",
    "report": "curvature_report.json",
    "results_json": "results.json",
    "results_csv": "results.csv",
}
"""The files :func:`write_demo_files` writes, by role."""


def write_demo_files(result: DemoResult, out: str | Path, *, dpi: int = 120) -> dict[str, Path]:
    """Write the figure, the curvature report and the results into the folder ``out``.

    The folder is created if needed; files of an earlier demo there are replaced.

    Returns:
        The paths written, by role (the keys of :data:`DEMO_FILES`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {role: out / name for role, name in DEMO_FILES.items()}
    fig = result.plot()
    fig.savefig(paths["figure"], dpi=dpi)
    paths["report"].write_text(result.report.to_json() + "\n", encoding="utf-8")
    paths["results_json"].write_text(result.to_json() + "\n", encoding="utf-8")
    paths["results_csv"].write_text(result.to_csv(), encoding="utf-8")
    return paths
