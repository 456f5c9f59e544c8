"""``CurvatureEstimate``: what a curvature probe measured, what it cost, how far to trust it."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._serialize import json_safe
from ..slq import SpectralDensity

__all__ = ["NEGATIVE_MASS_THRESHOLD", "CurvatureEstimate", "condition_number", "negative_mass"]

NEGATIVE_MASS_THRESHOLD = 1e-3
"""Eigenvalues below ``-NEGATIVE_MASS_THRESHOLD * |lambda_max|`` count as negative curvature."""


def negative_mass(density: SpectralDensity, lambda_max: float) -> float:
    r"""The fraction of the spectrum that ``density`` resolves below
    :math:`-t = -10^{-3} |\lambda_{\max}|` (:data:`NEGATIVE_MASS_THRESHOLD`).

    The cut-off is tied to the density's own resolution: a Gauss rule of :math:`m` nodes places
    each node's weight only to within the gap to its neighbours, so the weight of each probe's
    largest node below :math:`-t` may belong above the cut-off and is not counted; the mass of
    the nodes below it is (the lower Chebyshev–Markov–Stieltjes bound,
    :meth:`SpectralDensity.cdf_bounds <uba_auto.slq.SpectralDensity.cdf_bounds>`, of the
    fraction below :math:`-t`). A coarse density whose heavy node for the near-zero bulk lands
    just under the cut-off thus no longer reads as negative curvature, while negative
    eigenvalues spread well beyond the node spacing still count, less one node's weight. Where a
    rule is exact (its Lanczos run broke down, or it has a node per dimension) all of its mass
    below :math:`-t` counts.

    Example:
        >>> import torch
        >>> bulk_node_just_under = SpectralDensity(  # lambda_max = 42: the cut-off is -0.042
        ...     nodes=torch.tensor([[-3.0, -0.061, 2.0, 42.0]], dtype=torch.float64),
        ...     weights=torch.tensor([[0.01, 0.45, 0.5, 0.04]], dtype=torch.float64),
        ...     num_matvecs=4, size=10_000, num_nodes=torch.tensor([4]))
        >>> round(bulk_node_just_under.negative_mass(threshold=0.042), 12)  # counted in full
        0.46
        >>> round(negative_mass(bulk_node_just_under, lambda_max=42.0), 12)  # resolved
        0.01
    """
    lower, _ = density.cdf_bounds(-NEGATIVE_MASS_THRESHOLD * abs(lambda_max))
    return lower


def condition_number(lambda_max: float, lambda_min_positive: float | None) -> float:
    """``lambda_max / lambda_min_positive``, ``inf`` without a positive pair of ends."""
    if lambda_min_positive is None or lambda_max <= 0:
        return math.inf
    return lambda_max / lambda_min_positive


@dataclass(frozen=True)
class CurvatureEstimate:
    r"""What :func:`~uba_auto.probe.probe_curvature` measured, what it cost, how far to trust it.

    All eigenvalues are those of the curvature (Hessian or GGN) of the **mean** of the per-batch
    losses over the probed batches, at the model's current parameters.

    Attributes:
        lambda_max: the largest eigenvalue.
        lambda_min: the smallest eigenvalue (negative for an indefinite Hessian); ``None`` for
            ``method="pyhessian"``, which only computes the top of the spectrum.
        lambda_min_positive: the smallest positive Ritz value of the final Krylov space, an
            estimate of the smallest positive eigenvalue *the solver could resolve*; ``None`` if
            there is none. It is an interior eigenvalue and usually not converged: see
            ``converged["lambda_min_positive"]``.
        condition_number: ``lambda_max / lambda_min_positive`` (``inf`` when no positive
            eigenvalue below ``lambda_max`` was found). Near zero, the spectrum of a network is
            dense, so this ratio is large and depends on the solver's resolution: it is reported,
            not recommended as the input of the φ mapping.
        residuals: :math:`\|A y - \theta y\|` of each Ritz pair reported (keys ``"lambda_max"``,
            ``"lambda_min"``, ``"lambda_min_positive"``; for ``method="power"`` the power
            iteration's residuals).
        converged: whether each quantity met its tolerance (same keys, plus ``"trace"`` when
            computed: ``True`` when the standard error is below 10 % of ``|trace|``).
        trace: Hutch++ estimate of the trace (``None`` if not asked for).
        trace_std_error: its standard error.
        lambda_max_per_batch, lambda_min_per_batch: the same eigenvalues for each batch alone
            (empty with one batch or ``per_batch=False``).
        lambda_max_spread, lambda_min_spread: sample standard deviation of the per-batch values
            (``None`` without them).
        top_curvature_per_batch: :math:`v^\top H_b v` for each batch :math:`b`, with :math:`v`
            the top eigenvector of the mean operator: the curvature each minibatch shows along
            the sharpest direction (their weighted mean is ``lambda_max``). With
            ``method="lanczos"`` they come from the batches' projections on the Lanczos basis,
            at no extra HVP (:mod:`uba_auto.probe.projected`); otherwise one HVP per batch.
        curvature_noise: their sample standard deviation divided by ``lambda_max``: how much the
            sharpness a single SGD step sees fluctuates from batch to batch (``None`` with one
            batch, or for ``method="pyhessian"``). 0 means full-batch-like curvature.
        batch_losses: loss of each probed batch at the current parameters.
        density: the spectral density by stochastic Lanczos quadrature, or ``None``.
        negative_mass: the fraction of the spectrum that ``density`` resolves below
            :math:`-10^{-3}\lambda_{\max}` (:data:`NEGATIVE_MASS_THRESHOLD`; see
            :func:`negative_mass`): the near-zero cluster of a network's spectrum straddles 0
            and would otherwise count as half negative, and the mass of each probe's node
            nearest under the cut-off is not counted, as a coarse density cannot tell on which
            side of it that mass lies.
        num_hvps: single-batch Hessian-vector products spent in total.
        hvps: the same, by part (``"extremes"``, ``"per_batch"``, ``"trace"``, ``"density"``).
        wall_time_s: seconds in total; ``time_s`` by part (``"setup"`` included).
        num_params, num_batches, batch_sizes: what was probed.
        method, curvature, engine, mode, tol: the settings used.
        device, dtype: where and in which precision it ran.
        warnings: anything the caller should know (short loader, no convergence...).
        world_size: the number of ranks whose batches make up each (global) batch; 1 in a single
            process. Under a process group, ``batch_sizes`` and ``batch_losses`` are those of the
            global batches and every value above is identical on every rank.
        optimizer: the class name of the optimizer given to the probe (``None`` without one).
        preconditioner: ``None`` when the spectrum is that of the curvature itself; for an
            adaptive optimizer, the preconditioner :math:`P` of the measured
            :math:`P^{-1/2} A P^{-1/2}` and where it came from (its state, or an estimate).
        decision_steps: the Lanczos step at which λ_max and the curvature noise had settled to
            the precision the φ decision needs (:class:`~uba_auto.probe.projected.DecisionRule`);
            ``None`` when it was not met (or for another method).
        hvp_budget: the HVP budget the probe was run under (``None``: none, every part ran as
            set; see :class:`~uba_auto.probe.ProbeSettings`).
    """

    lambda_max: float
    lambda_min: float | None
    lambda_min_positive: float | None
    condition_number: float
    residuals: dict[str, float]
    converged: dict[str, bool]
    trace: float | None
    trace_std_error: float | None
    lambda_max_per_batch: tuple[float, ...]
    lambda_min_per_batch: tuple[float, ...]
    lambda_max_spread: float | None
    lambda_min_spread: float | None
    top_curvature_per_batch: tuple[float, ...]
    curvature_noise: float | None
    batch_losses: tuple[float, ...]
    density: SpectralDensity | None
    negative_mass: float | None
    num_hvps: int
    hvps: dict[str, int]
    wall_time_s: float
    time_s: dict[str, float]
    num_params: int
    num_batches: int
    batch_sizes: tuple[int | None, ...]
    method: str
    curvature: str
    engine: str
    mode: str
    tol: float
    device: str
    dtype: str
    warnings: tuple[str, ...] = field(default=())
    world_size: int = 1
    optimizer: str | None = None
    preconditioner: str | None = None
    decision_steps: int | None = None
    hvp_budget: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the density as its nodes and weights; inf and NaN as None)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.density is not None:
            out["density"] = {
                "nodes": self.density.nodes.tolist(),
                "weights": self.density.weights.tolist(),
                "size": self.density.size,
                "num_matvecs": self.density.num_matvecs,
                "num_nodes": self.density.num_nodes.tolist(),
            }
        for key in (
            "lambda_max_per_batch",
            "lambda_min_per_batch",
            "top_curvature_per_batch",
            "batch_losses",
        ):
            out[key] = list(out[key])
        out["batch_sizes"] = list(self.batch_sizes)
        out["warnings"] = list(self.warnings)
        return json_safe(out)

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CurvatureEstimate:
        """Rebuild an estimate from :meth:`to_dict` (or its JSON): ``from_dict(e.to_dict())``
        has the same :meth:`to_dict` as ``e``. ``None`` stands for an infinite condition number.

        Raises:
            ValueError: if ``data`` lacks a field (it names the first missing one).
        """
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(
                f"data is not a CurvatureEstimate.to_dict(): it has no {missing[0]!r} field"
            )
        kw = {n: data[n] for n in names if n in data}
        for key in (
            "lambda_max_per_batch",
            "lambda_min_per_batch",
            "top_curvature_per_batch",
            "batch_losses",
            "batch_sizes",
            "warnings",
        ):
            if key in kw:
                kw[key] = tuple(kw[key])
        if kw["condition_number"] is None:
            kw["condition_number"] = math.inf
        if kw["density"] is not None:
            d = kw["density"]
            nodes = torch.tensor(d["nodes"], dtype=torch.float64)
            num_nodes = d.get("num_nodes") or [nodes.shape[1]] * nodes.shape[0]
            kw["density"] = SpectralDensity(
                nodes=nodes,
                weights=torch.tensor(d["weights"], dtype=torch.float64),
                num_matvecs=d["num_matvecs"],
                size=d["size"],
                num_nodes=torch.tensor(num_nodes, dtype=torch.int64),
            )
        return cls(**kw)

    def __str__(self) -> str:
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.6g}"

        lines = [
            f"CurvatureEstimate ({self.curvature}, {self.method}, {self.num_batches} batch(es), "
            + (f"each over {self.world_size} ranks, " if self.world_size > 1 else "")
            + f"{self.num_params} params, {self.device}/{self.dtype})",
            f"  lambda_max          {fmt(self.lambda_max)}"
            + (
                f"  ± {self.lambda_max_spread:.3g} across batches" if self.lambda_max_spread else ""
            ),
            f"  lambda_min          {fmt(self.lambda_min)}"
            + (
                f"  ± {self.lambda_min_spread:.3g} across batches" if self.lambda_min_spread else ""
            ),
            f"  smallest positive   {fmt(self.lambda_min_positive)}",
            f"  curvature noise     {fmt(self.curvature_noise)}",
            f"  lambda_max / that   {fmt(self.condition_number)}",
            f"  trace               {fmt(self.trace)}"
            + (
                f"  ± {self.trace_std_error:.3g}"
                if self.trace_std_error is not None and math.isfinite(self.trace_std_error)
                else ""
            ),
        ]
        if self.negative_mass is not None:
            lines.append(f"  negative mass       {self.negative_mass:.3g}")
        lines.append(f"  cost                {self.num_hvps} HVPs, {self.wall_time_s:.3g} s")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)
