"""The pre-training curvature report: what was measured, which φ was chosen, and why."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._serialize import json_safe
from .probe import NEGATIVE_MASS_THRESHOLD, CurvatureEstimate

__all__ = ["CurvatureReport", "ReestimationRecord"]


@dataclass(frozen=True)
class ReestimationRecord:
    """One (re-)estimation of φ during a run.

    Attributes:
        step: the scheduler step it happened at (0 for the pre-training probe).
        status: ``"ok"``, ``"skipped"`` (probing budget spent) or ``"failed"`` (φ kept).
        kappa: the condition number the mapping used (None unless ``ok``).
        phi: φ in force after this record.
        hvps: single-batch Hessian-vector products spent.
        seconds: wall time spent.
        message: why it was skipped or how it failed (for ``ok``: how φ was derived).
        warnings: what the probe of this estimation warned about (e.g. no convergence within
            its budget of products); empty when all went well.
    """

    step: int
    status: str
    kappa: float | None
    phi: float
    hvps: int
    seconds: float
    message: str = ""
    warnings: tuple[str, ...] = ()

    def to_row(self) -> list[Any]:
        """The record as a plain list of its fields, in order (what :meth:`from_row` reads)."""
        return list(dataclasses.astuple(self))

    @classmethod
    def from_row(cls, row: Any) -> ReestimationRecord:
        """Rebuild a record from :meth:`to_row` (lists back to tuples)."""
        fields = list(row)
        if len(fields) > 7:
            fields[7] = tuple(fields[7])
        return cls(*fields)


@dataclass(frozen=True)
class CurvatureReport:
    """The curvature report of :func:`~uba_auto.auto.auto_uba`.

    ``print(report)`` gives a compact table; :meth:`to_dict` / :meth:`to_json` the same data for
    files; :meth:`plot` the spectral density and the chosen schedule beside cosine.

    Attributes:
        estimate: the pre-training :class:`~uba_auto.probe.CurvatureEstimate`.
        phi: the chosen φ.
        phi_unclamped: φ before the clamp to [phi_min, phi_max] (equal to ``phi`` if none).
        clamped: whether the clamp changed φ.
        phi_min, phi_max: the clamp range.
        kappa: the condition number fed to the φ mapping.
        kappa_kind: which κ that is, in words.
        link: the κ→φ link used (one of :data:`uba_auto.phi.LINKS`).
        reason: one sentence on how φ was derived.
        phi_signal: which measured signal decided φ, in words: the curvature noise (the
            minibatch links), the spectrum's band (chebyshev), or the validation loss
            (``auto_uba(val_loader=...)``: the plateau rule decides mid-run); ``""`` in reports
            saved before it existed.
        peak_lr: the peak learning rate the mapping assumed, and ``peak_lr_source`` where it came
            from (the optimizer, the caller, or the curvature suggestion).
        suggested_lr: the peak rate the curvature suggests, a share
            (:data:`uba_auto.phi.SUGGESTED_SHARE`) of the optimizer's stability limit divided by
            the sharpness it sees (plain SGD without an optimizer; see
            :attr:`AutoUBA.suggested_lr <uba_auto.auto.AutoUBA.suggested_lr>`).
        budget, warmup_steps: the run's budget in optimizer steps and its warm-up.
        probe_fraction: the share of the budget probing may take (in gradient-equivalents).
        history: every (re-)estimation, a list of :class:`ReestimationRecord`.
        warnings: anything the user should act on.
        edge_fraction: the peak rate as a fraction of the optimizer's stability limit at
            initialisation, ``peak_lr * (lambda_max + weight_decay) / stability_limit``
            (:func:`uba_auto.phi.stability_fraction`; 1 is the edge), what the gated-edge link
            reads; ``None`` when the optimizer's limit is unknown, or for other links.
        optimizer_sharpness: the sharpness the optimizer sees at initialisation: ``lambda_max``
            of the estimate (preconditioned for an adaptive optimizer) plus SGD's coupled weight
            decay; ``None`` while the optimizer, or its stability limit, is unknown.
        stability_limit: the optimizer's stability limit on ``lr * sharpness``
            (:func:`uba_auto.phi.optimizer_stability`).
        stability_share: ``peak_lr * optimizer_sharpness / stability_limit`` (1 is the edge), for
            every link.
        stability_note: which optimizer, the limit's formula, and which curvature was measured.
        loss_guess: the loss ``auto_uba`` guessed from the targets when no ``loss_fn`` was given
            (a guess that could be wrong: ``print(report)`` puts it on its first line, above the
            table); ``""`` when the loss was given or the model returns its own.
    """

    estimate: CurvatureEstimate
    phi: float
    phi_unclamped: float
    clamped: bool
    phi_min: float
    phi_max: float
    kappa: float | None
    kappa_kind: str
    link: str
    reason: str
    peak_lr: float
    peak_lr_source: str
    suggested_lr: float | None
    budget: int
    warmup_steps: int
    probe_fraction: float
    history: tuple[ReestimationRecord, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    edge_fraction: float | None = None
    optimizer_sharpness: float | None = None
    stability_limit: float | None = None
    stability_share: float | None = None
    stability_note: str = ""
    loss_guess: str = ""
    phi_signal: str = ""

    # ------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the estimate as :meth:`CurvatureEstimate.to_dict`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["estimate"] = self.estimate.to_dict()
        out["history"] = [dataclasses.asdict(r) for r in self.history]
        out["warnings"] = list(self.warnings)
        return json_safe(out)

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as a JSON string (``indent=2`` unless given)."""
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CurvatureReport:
        """Rebuild a report from :meth:`to_dict` (or its JSON, after ``json.loads``):
        ``from_dict(r.to_dict())`` prints and serialises as ``r`` does.

        Raises:
            ValueError: if ``data`` lacks a field (it names the first missing one).
        """
        fields = dataclasses.fields(cls)
        missing = [
            f.name for f in fields if f.default is dataclasses.MISSING and f.name not in data
        ]
        if missing:
            raise ValueError(f"data is not a CurvatureReport.to_dict(): it has no {missing[0]!r}")
        kw = {f.name: data[f.name] for f in fields if f.name in data}
        kw["estimate"] = CurvatureEstimate.from_dict(data["estimate"])
        if kw["phi_unclamped"] is None:  # json_safe wrote inf as None
            kw["phi_unclamped"] = math.inf
        kw["history"] = tuple(
            ReestimationRecord(**{**r, "warnings": tuple(r.get("warnings", ()))})
            for r in data.get("history", ())
        )
        kw["warnings"] = tuple(data.get("warnings", ()))
        return cls(**kw)

    # ------------------------------------------------------------------------------------- text
    def __str__(self) -> str:
        est = self.estimate

        def num(x: float | None, spec: str = ".4g") -> str:
            return (
                "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
            )

        def spread(x: float | None) -> str:
            return f" (± {x:.3g} over batches)" if x else ""

        rows = []
        if est.preconditioner is not None:
            what = f"P^-1/2 A P^-1/2, A the {est.curvature} of the loss (+ coupled weight decay)"
            rows += [
                ("curvature measured", f"{what}, as {est.optimizer} sees it"),
                ("  preconditioner P", est.preconditioner),
            ]
        rows += [
            ("λ_max", num(est.lambda_max) + spread(est.lambda_max_spread)),
            ("λ_min", num(est.lambda_min) + spread(est.lambda_min_spread)),
            ("smallest positive λ", num(est.lambda_min_positive)),
            ("λ_max / smallest positive", num(est.condition_number)),
            (
                "trace",
                num(est.trace)
                + (
                    f" ± {est.trace_std_error:.2g}"
                    if est.trace_std_error is not None and math.isfinite(est.trace_std_error)
                    else " (no error bar: too few probe vectors)"
                    if est.trace is not None
                    else ""
                ),
            ),
        ]
        if est.curvature_noise is not None:
            rows.append(
                (
                    "curvature noise",
                    f"{num(est.curvature_noise, '.3g')}  [std over batches of v·H_b·v / λ_max]",
                )
            )
        if est.negative_mass is not None:
            rows.append(("negative-curvature mass", _negative_mass_text(est)))
        rows += [
            ("κ used for φ", f"{num(self.kappa)}  [{self.kappa_kind}]"),
            ("peak lr assumed", f"{self.peak_lr:.4g}  [{self.peak_lr_source}]"),
        ]
        if self.optimizer_sharpness is not None:
            seen = (
                "λ_max of P^-1/2 A P^-1/2"
                if est.preconditioner is not None
                else "λ_max + coupled weight decay"
            )
            rows += [
                ("sharpness the optimizer sees", f"{num(self.optimizer_sharpness)}  [{seen}]"),
                ("its stability limit", f"{num(self.stability_limit)}  [{self.stability_note}]"),
            ]
        share = self.edge_fraction if self.stability_share is None else self.stability_share
        if share is not None:
            rows.append(
                (
                    "share of stability limit",
                    f"{num(share, '.3g')}  [peak lr · sharpness / the optimizer's stability "
                    "limit, at init; 1 = the edge]",
                )
            )
        rows += [
            (
                "φ chosen",
                f"{self.phi:.4g}"
                + (
                    f"  (clamped from {self.phi_unclamped:.4g} to [{self.phi_min:g}, "
                    f"{self.phi_max:g}])"
                    if self.clamped
                    else ""
                ),
            ),
            ("why", self.reason),
            *([("φ decided by", self.phi_signal)] if self.phi_signal else []),
            (
                "probe cost",
                f"{est.num_hvps} HVPs on {est.num_batches} batch(es), {est.wall_time_s:.2f} s "
                f"({est.curvature}, {est.method}, {est.device}/{est.dtype})",
            ),
        ]
        if len(self.history) > 1:
            rows.append(
                (
                    "mid-run φ decisions",
                    ", ".join(
                        f"step {r.step}: {r.status} φ={r.phi:.3g}" + (" (!)" if r.warnings else "")
                        for r in self.history[1:]
                    ),
                )
            )
        width = max(len(k) for k, _ in rows)
        lines = [f"! {self.loss_guess}"] if self.loss_guess else []  # above all: a guess
        lines.append(
            f"uba-auto curvature report  (budget {self.budget} steps, warm-up {self.warmup_steps})"
        )
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        lines += [f"  ! {w}" for w in self.warnings]
        lines += [f"  ! step {r.step}: {w}" for r in self.history[1:] for w in r.warnings]
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------- plot
    def plot(self, *, lr_max: float | None = None) -> Any:
        """Spectral density (if probed with ``density=True``) and the chosen schedule beside cosine.

        Returns:
            The matplotlib Figure.
        """
        import numpy as np

        from .plotting import draw_density, new_figure
        from .schedules import cosine_lr, uba_lr

        fig = new_figure((10.0, 4.0))
        ax_density, ax_lr = fig.subplots(1, 2)
        draw_density(ax_density, self.estimate)

        peak = self.peak_lr if lr_max is None else lr_max
        total = max(self.budget - 1, self.warmup_steps + 1)
        steps = np.arange(total + 1)
        kw = dict(lr_max=peak, warmup_steps=self.warmup_steps)
        ax_lr.plot(
            steps,
            uba_lr(steps, total, phi=self.phi, **kw),
            lw=2,
            color="C1",
            label=f"UBA φ={self.phi:.3g} (chosen)",
        )
        ax_lr.plot(steps, cosine_lr(steps, total, **kw), "k--", lw=1.5, label="cosine (φ=2)")
        for rec in self.history[1:]:
            if rec.status == "ok":
                ax_lr.axvline(rec.step, color="0.6", lw=0.8)
        ax_lr.set_xlabel("step")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_title("chosen schedule")
        ax_lr.set_ylim(bottom=0)
        ax_lr.grid(alpha=0.3)
        ax_lr.legend(frameon=False, fontsize="small")
        return fig


def _negative_mass_text(est: CurvatureEstimate) -> str:
    """The resolved negative mass, and how much more the density cannot rule out (its upper
    Chebyshev–Markov–Stieltjes bound), when that differs."""
    text = f"{100 * est.negative_mass:.1f} %"
    if est.density is None:
        return text
    _, upper = est.density.cdf_bounds(-NEGATIVE_MASS_THRESHOLD * abs(est.lambda_max))
    if upper - est.negative_mass < 5e-4:
        return text
    return f"{text}  [resolved; up to {100 * upper:.1f} % within the density's resolution]"
