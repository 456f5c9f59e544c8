"""``ProbeSettings``: every choice of a curvature probe, checked once, and what follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._validation import check_int, check_positive_finite
from ..curvature import ENGINES, MODES
from ..curvature.graph_memory import check_graph_memory
from .projected import DECISION_RULE, DecisionRule

__all__ = [
    "CURVATURES",
    "DEFAULT_GRAPH_MEMORY",
    "METHODS",
    "STARTS",
    "ProbeSettings",
    "check_model",
]

METHODS = ("lanczos", "power", "pyhessian")
STARTS = ("gradient", "random")
"""The start vectors of the Lanczos run (:attr:`ProbeSettings.start`)."""
CURVATURES = ("hessian", "ggn")
DEFAULT_GRAPH_MEMORY = 2.5
"""The probe's default cap on cached gradient graphs, in estimated training steps
(:mod:`uba_auto.curvature.graph_memory`): the probe's peak memory target, 2.5 training steps."""


def check_model(model: Any) -> None:
    """Raise ``TypeError`` unless ``model`` is a ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


@dataclass(frozen=True)
class ProbeSettings:
    """The keywords of :func:`~uba_auto.probe.probe_curvature` (all but ``process_group``).

    Construction checks every field, with the errors :func:`~uba_auto.probe.probe_curvature`
    raises, and stores the checked values (``int``/``float``), so a :class:`ProbeSettings` is valid
    by construction. The fields and their defaults are those of ``probe_curvature``.

    Example:
        >>> settings = ProbeSettings(num_batches=2)
        >>> settings.budget(2), settings.lanczos_steps(2), settings.method
        (200, 100, 'lanczos')
        >>> ProbeSettings(method="arnoldi")
        Traceback (most recent call last):
        ...
        ValueError: method must be one of ('lanczos', 'power', 'pyhessian'), got 'arnoldi'
    """

    num_batches: int = 4
    max_hvps: int | None = None
    tol: float | None = None
    method: str = "lanczos"
    curvature: str = "hessian"
    engine: str = "double-backward"
    mode: str = "train-deterministic"
    dtype: torch.dtype | None = None
    per_batch: bool = True
    trace: bool | None = True
    trace_matvecs: int = 30
    density: bool | None = False
    density_probes: int = 4
    density_iters: int = 40
    seed: int = 0
    progress: bool | None = None
    basis_device: torch.device | str | None = None
    grad_clip: float | None = None
    hvp_budget: int | None = None
    graph_memory: float | None = DEFAULT_GRAPH_MEMORY
    micro_batches: bool = True
    compact_basis: bool = True
    warm_start: bool | None = None
    decision_rule: DecisionRule = DECISION_RULE
    start: str = "random"

    def __post_init__(self) -> None:
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        store("num_batches", check_int("num_batches", self.num_batches, minimum=1))
        for name, allowed in (
            ("method", METHODS),
            ("curvature", CURVATURES),
            ("engine", ENGINES),
            ("mode", MODES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        store("trace_matvecs", check_int("trace_matvecs", self.trace_matvecs, minimum=3))
        store("density_probes", check_int("density_probes", self.density_probes, minimum=1))
        store("density_iters", check_int("density_iters", self.density_iters, minimum=2))
        store("seed", check_int("seed", self.seed, minimum=0))
        if self.max_hvps is not None:
            store("max_hvps", check_int("max_hvps", self.max_hvps, minimum=1))
        if self.tol is not None:
            store("tol", check_positive_finite("tol", self.tol))
        if self.grad_clip is not None:
            store("grad_clip", check_positive_finite("grad_clip", self.grad_clip))
        if self.hvp_budget is not None:
            store("hvp_budget", check_int("hvp_budget", self.hvp_budget, minimum=0))
        store("graph_memory", check_graph_memory(self.graph_memory))
        if not isinstance(self.micro_batches, bool):
            raise TypeError(f"micro_batches must be a bool, got {self.micro_batches!r}")
        if not isinstance(self.compact_basis, bool):
            raise TypeError(f"compact_basis must be a bool, got {self.compact_basis!r}")
        if not (self.warm_start is None or isinstance(self.warm_start, bool)):
            raise TypeError(
                f"warm_start must be True, False or None (on for a budgeted probe), got "
                f"{self.warm_start!r}"
            )
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        if self.start == "gradient" and self.method != "lanczos":
            raise ValueError(
                f"start='gradient' starts a Lanczos run; method={self.method!r} has its own start: "
                "use method='lanczos', or leave start='random'"
            )
        if not isinstance(self.decision_rule, DecisionRule):
            raise TypeError(
                "decision_rule must be a uba_auto.probe.DecisionRule (e.g. "
                f"uba_auto.probe.DECISION_RULE), got {type(self.decision_rule).__name__}"
            )
        for name in ("trace", "density", "per_batch"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (value is None and name != "per_batch")):
                allowed = "a bool" if name == "per_batch" else "True, False or None (if it fits)"
                raise TypeError(f"{name} must be {allowed}, got {value!r}")
        if self.method == "pyhessian" and self.curvature != "hessian":
            raise ValueError(
                "method='pyhessian' computes the Hessian only; use curvature='hessian'"
            )

    def budget(self, num_found: int) -> int:
        """Single-batch HVPs for the extreme eigenvalues over ``num_found`` batches."""
        return 100 * num_found if self.max_hvps is None else self.max_hvps

    def lanczos_steps(self, num_found: int) -> int:
        """Operator products (solver steps) the budget buys; raises if fewer than two."""
        budget = self.budget(num_found)
        steps = budget // num_found
        if steps < 2:
            raise ValueError(
                f"max_hvps={budget} is too small for {num_found} batch(es): one Lanczos step "
                f"costs {num_found} HVPs and an estimate needs at least 2 steps; use "
                f"max_hvps >= {2 * num_found} (a few hundred is typical)"
            )
        return steps

    def tol_for(self, dtype: torch.dtype) -> float:
        """The residual tolerance: ``tol``, or the default of ``dtype``."""
        if self.tol is not None:
            return self.tol
        # Residuals cannot fall much below the rounding of one product: ~1e-7 relative in float32.
        return 1e-6 if dtype == torch.float64 else 1e-4

    def warm_starts(self, num_found: int) -> bool:
        """Whether the Lanczos run on the mean starts from one batch's top Ritz vector
        (:attr:`warm_start`; ``None``: for a budgeted probe of more than one batch)."""
        if self.method != "lanczos" or num_found < 2:
            return False
        return self.hvp_budget is not None if self.warm_start is None else self.warm_start

    def fits(self, part: str, cost: int, spent: int) -> bool:
        """Whether ``part`` (``"trace"`` or ``"density"``, costing ``cost`` HVPs) runs after
        ``spent`` HVPs: ``True`` always, ``None`` if it fits :attr:`hvp_budget` (always without
        one), ``False`` never."""
        asked = getattr(self, part)
        if asked is None:
            return self.hvp_budget is None or spent + cost <= self.hvp_budget
        return bool(asked)

    def planned_hvps(self, num_found: int) -> int:
        """The most single-batch HVPs the main path can spend (the progress bar's total)."""
        if self.hvp_budget is not None:
            return max(self.hvp_budget, self.decision_rule.min_steps * num_found)
        budget = self.budget(num_found)
        per_batch_runs = self.per_batch and num_found > 1
        total = budget * (2 if per_batch_runs else 1) + (num_found if num_found > 1 else 0)
        total += (self.trace_matvecs if self.trace else 0) * num_found
        total += (self.density_probes * self.density_iters if self.density else 0) * num_found
        return total

    def fingerprint(self) -> str:
        """The settings every rank of a process group must share, as one string."""
        settings = (self.num_batches, self.max_hvps, self.tol, self.method, self.curvature)
        settings += (self.engine, self.mode, str(self.dtype), self.per_batch, self.trace)
        settings += (self.trace_matvecs, self.density, self.density_probes, self.density_iters)
        settings += (self.grad_clip, self.hvp_budget, self.graph_memory, self.micro_batches)
        settings += (self.compact_basis, self.warm_start, self.decision_rule, self.start)
        return repr(settings)
