"""The public entry point :func:`auto_uba`: check the arguments, resolve the process group once,
build the :class:`~uba_auto.auto.AutoUBA`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._distributed import resolve_process_group
from .._loaders import check_reiterable
from .._optim import group_peaks
from .._validation import check_int, check_positive_finite
from ..curvature import device_of
from ..phi import PHI_MAX, PHI_MIN, optimizer_stability
from ..probe import ProbeSettings
from ._autouba import AutoUBA
from ._choice import check_final_rate
from ._cooldown import under_several_ranks
from ._state import AutoSettings

__all__ = ["auto_uba"]

_PROBE_KEYWORDS = {f.name for f in dataclasses.fields(ProbeSettings)} - {"num_batches"}
"""What ``auto_uba`` passes on to the probe (``num_batches`` is its own argument)."""


def auto_uba(
    model: nn.Module,
    loader: Iterable[Any],
    budget: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Any = None,
    warmup_steps: int = 0,
    lr_min: float | None = None,
    lr_min_ratio: float | None = None,
    peak_lr: float | str | None = None,
    num_batches: int = 8,
    reestimate_every: int | None = None,
    probe_fraction: float = 0.02,
    link: str = "gated",
    phi_min: float = PHI_MIN,
    phi_max: float = PHI_MAX,
    curvature: str = "hessian",
    density: bool | None = None,
    seed: int = 0,
    progress: bool | None = None,
    process_group: Any = "auto",
    resume_from: dict[str, Any] | None = None,
    val_loader: Iterable[Any] | None = None,
    val_batches: int = 8,
    **probe_kwargs: Any,
) -> AutoUBA:
    """Probe the curvature, choose φ, and return the UBA schedule for a budget of ``budget`` steps.

    Args:
        model: the model to train (never modified by the probe).
        loader: the training loader; the first ``num_batches`` batches are probed, later
            re-estimations draw the following ones (cycling) from an iterator of auto_uba's
            own, restoring the loader's generators and the global RNG after every draw, so the
            training loop's data order is unchanged. It must be re-iterable (a ``DataLoader``,
            a list): a one-shot iterator (a generator, ``iter(dataloader)``) is refused with
            ``ValueError``, since every batch probed would be lost to the training loop.
        budget: optimizer steps the run will take; the schedule ends at ``lr_min`` on the last.
        optimizer: if given, :attr:`AutoUBA.scheduler` is ready at once; else call
            :meth:`AutoUBA.make_scheduler`. Every probe then measures the curvature this
            optimizer sees (``probe_curvature(..., optimizer=)``: preconditioned for Adam, AdamW,
            Adagrad and RMSprop, estimated before their first step), and the report gives its
            sharpness and the peak rate's share of its stability limit. Given only at
            ``make_scheduler``, the pre-training probe measured the raw curvature, which is
            what SGD sees but not what an adaptive optimizer sees (the report then has no
            stability rows for it).
        loss_fn: as for :func:`~uba_auto.probe.probe_curvature`. If ``None`` with
            ``(inputs, targets)`` batches: cross-entropy for integer targets, MSE for floating
            targets (a guess, the report's first line); floating targets whose rows are
            probabilities (soft labels) are refused.
        warmup_steps: linear warm-up length.
        lr_min, lr_min_ratio: the final rate (absolute, or a fraction of each group's peak).
        peak_lr: the peak rate the φ mapping should assume: a number; ``"suggest"`` to use (and,
            with an optimizer, set on every param group) the rate the curvature suggests,
            :data:`~uba_auto.phi.SUGGESTED_SHARE` of the optimizer's stability limit divided by
            the sharpness it sees (plain SGD without an optimizer). It is a starting point, not a
            tuned rate: on the held-out SGD tasks of our study it landed a median factor 12 from
            the peak tuned for cosine, up to ~200x off, and the AdamW share is fitted on one task
            (BENCHMARKS.md §3.C; it assumes a warm-up and, before the first step, the loop's
            clipping as ``grad_clip=``; without ``warmup_steps`` an adaptive optimizer's share is
            capped at its limit); ``None`` takes the optimizer's largest group lr (or the
            suggestion when there is no optimizer).
        num_batches: minibatches per probe (8: the curvature noise that drives the gated and
            calibrated links is a standard deviation across batches, and needs several; with 4
            the gated link's φ changed in 4 of the φ study's 54 runs, BENCHMARKS.md §1).
        reestimate_every: re-probe every this many steps (``None``: never).
        probe_fraction: the most probing may cost, as a fraction of the budget in
            gradient-equivalents (one gradient: a forward and backward pass on one batch). The
            pre-training probe and every planned re-estimation get equal shares, and each spends
            its share on the φ decision first (λ_max and the curvature noise, to the precision
            the decision needs: :class:`~uba_auto.probe.DecisionRule`), then on λ_min to full
            precision, the trace and the density with what is left (:mod:`uba_auto.auto._plan`).
            A probe whose decision alone costs more than its share runs anyway and says so (a
            ``RuntimeWarning`` and the report's warnings, with the numbers); a re-estimation
            that would take probing past the whole fraction is skipped and recorded. Passing
            ``max_hvps`` turns the plan off.
        link: the κ→φ link: ``"gated"`` (default: cosine, φ = 2, unless the probe sees almost
            no minibatch noise, then down to 0.25; worse than cosine by more than 1 % in 1 of the
            18 cells of our study), ``"gated-edge"`` (also φ = 1 when, with
            ``torch.optim.SGD``, the peak rate is under 3.8 % of the stability limit at init;
            fitted, and 7-12 % worse than cosine on the demo's task, so not the default),
            ``"hold"`` (φ = 1/4 for a self-stabilising run: an adaptive optimizer, or a
            normaliser with weight decay, :func:`~uba_auto.phi.self_stabilising`; else the gated
            φ; pre-registered and 1-25 % worse than cosine in 3 of 6 test cells, so not the
            default), ``"calibrated"`` (a power law in the curvature noise fitted to our
            study; it lost badly there) or ``"chebyshev"`` (the theory-only link φ = 2κ); see
            :mod:`uba_auto.phi` and BENCHMARKS.md. The link also sets when the probe's φ
            decision stops (:func:`~uba_auto.probe.rule_for_link`: the gated links do not wait
            for a curvature noise far above their gate to settle); ``decision_rule=`` overrides.
        phi_min, phi_max: the range φ is clamped to.
        curvature: ``"hessian"`` or ``"ggn"``.
        density: the spectral density for the report (pre-training probe only): ``None``
            (default) if the probe's share of ``probe_fraction`` has room for it once φ is
            decided, ``True`` always, ``False`` never. The trace follows the same rule (pass
            ``trace=True`` to force it).
        seed: seed of the probe's random vectors.
        progress: progress bar during probes (``None``: when stderr is a terminal).
        process_group: ``"auto"`` (default): under ``torch.distributed`` (e.g. a DDP script run
            with ``torchrun``) every probe is collective: it measures the curvature of the loss on
            the global batch (each rank draws ``num_batches`` batches of its own loader), φ and
            the scheduler are identical on every rank (checked at every estimation), and
            re-estimations happen at the same step on every rank; a failure on any rank is
            recorded as failed on every rank (φ kept everywhere). Call ``auto_uba`` and step the
            scheduler on every rank. ``None``/``False``: each process probes alone. Or a
            ``torch.distributed.ProcessGroup``. See
            :func:`~uba_auto.probe.probe_curvature`.
        resume_from: an :meth:`AutoUBA.state_dict` saved by an earlier run with the same
            settings: no pre-training probe is made; the report, φ, its history, the probing
            counters and (with ``optimizer=``, or at :meth:`~AutoUBA.make_scheduler`) the
            scheduler are the saved run's, and the loader is fast-forwarded past the batches it
            probed, so the run goes on exactly as if it had not stopped.
        val_loader: validation batches (a ``DataLoader`` or a list, never the training loader):
            φ is then decided mid-run by the validation loss, not by the curvature: the
            scheduler holds φ = 1/32 (the rate near its peak) while the loss of ``val_batches``
            validation batches improves, and switches to a whole cosine from the rate then
            (``set_phi(2, restart=True)``) at its first plateau or at 40 % of the budget,
            whichever comes first (the shape rule, :class:`~uba_auto.PlateauCooldown`, run by the
            scheduler's ``step()``; :attr:`AutoUBA.plateau`). The pre-training probe still
            runs, for the report (its stability rows; the link's reading is named in the
            report's reason).
            Opt-in: on its pre-registered test set it beat cosine by 1.7 % on average with its
            checks charged, never worse than it by more than 1 %, but a run whose peak is at its
            stability limit from the first steps can diverge under it (BENCHMARKS.md §2,
            finding 25). The checks (every 2.5 % of the budget from 5 % to before 40 %, or
            fewer once switched) each cost ``val_batches`` forward passes; the report's "φ
            decided by" gives their cost, and a note and a ``RuntimeWarning`` say when it is
            over a ``probe_fraction`` share of the budget (14 checks of 8 batches: below about
            1870 steps at the default 2 %). Not with ``reestimate_every`` (one signal decides φ)
            nor under a process group of more than one rank.
        val_batches: validation batches per check (8). Fewer cost less but decide worse: at
            equal total cost (the checks' forward passes taken from the training budget), 8
            batches still beat cosine on all five held-out cells of our benchmark as first
            measured; batches sized down to the 2 % share (1 below about 1000 steps) kept much
            less of that gain on four of them (BENCHMARKS.md §2, finding 16; the image cells'
            figures did not reproduce on another machine, finding 20).
        **probe_kwargs: passed to :func:`~uba_auto.probe.probe_curvature` (e.g. ``max_hvps``,
            ``mode``, ``dtype``, ``decision_rule``).

    Returns:
        An :class:`AutoUBA`.

    Raises:
        ValueError: ``budget <= warmup_steps + 1``, an empty or one-shot loader, bad option
            values; anything :func:`~uba_auto.probe.probe_curvature` raises for the pre-training
            probe.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_int("val_batches", val_batches, minimum=1)  # also when unused: a typo fails loudly
    settings = AutoSettings.checked(
        budget=budget,
        warmup_steps=warmup_steps,
        lr_min=lr_min,
        lr_min_ratio=lr_min_ratio,
        num_batches=num_batches,
        reestimate_every=reestimate_every,
        probe_fraction=probe_fraction,
        link=link,
        phi_min=phi_min,
        phi_max=phi_max,
        val_batches=None if val_loader is None else val_batches,
    )
    if val_loader is not None:
        if val_loader is loader:
            raise ValueError(
                "val_loader is the training loader: pass held-out validation batches (a "
                "held-out loss is the rule's point, and its checks would read training batches)"
            )
        check_reiterable(val_loader, "auto_uba(val_loader=...)")
    if isinstance(peak_lr, str) and peak_lr != "suggest":
        raise ValueError(f"peak_lr must be a number, 'suggest' or None, got {peak_lr!r}")
    if peak_lr is not None and not isinstance(peak_lr, str):
        check_positive_finite("peak_lr", peak_lr)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    # Checked now, so that a bad setting fails before the probe's cost, not after it.
    if peak_lr == "suggest" and optimizer is not None:
        try:
            optimizer_stability(optimizer)
        except ValueError as err:
            raise ValueError(
                f"peak_lr='suggest' sets a share of the optimizer's stability limit, and there is "
                f"none for this {type(optimizer).__name__}: {err}. Pass peak_lr as a number"
            ) from None
    if optimizer is not None and peak_lr is not None and not isinstance(peak_lr, str):
        try:
            stability = optimizer_stability(optimizer)
        except ValueError:
            stability = None  # no limit derived for it: nothing to check the peak against
        if stability is not None:
            stability.limit_at(float(peak_lr))  # raises for a peak AdamW's decay cannot survive
    peaks = None
    if optimizer is not None and peak_lr != "suggest":
        peaks = group_peaks(optimizer)
    check_final_rate(peaks, lr_min, lr_min_ratio)
    if settings.reestimate_every is not None and getattr(loader, "persistent_workers", False):
        raise ValueError(
            "reestimate_every needs a loader auto_uba can iterate on its own, but this DataLoader "
            "has persistent_workers=True: iterating it would reset the training loop's iterator. "
            "Pass a separate DataLoader (same dataset, persistent_workers=False) as loader"
        )
    # Defaults sized for a pre-training probe: the report's spread comes from the curvature noise
    # (one HVP per batch), not from a Lanczos run per batch; callers can override all.
    probe_settings = {
        "curvature": curvature,
        "seed": seed,
        "progress": progress,
        "density": density,
        "trace": None,
        "per_batch": False,
        "trace_matvecs": 12,
        "density_probes": 2,
        "density_iters": 24,
        **probe_kwargs,
    }
    unknown = sorted(set(probe_settings) - _PROBE_KEYWORDS)
    if unknown:
        raise TypeError(
            f"auto_uba got unexpected keyword argument(s) {unknown}: extra keywords go to "
            f"probe_curvature, which takes {sorted(_PROBE_KEYWORDS)}"
        )
    # Checked now (a bad value fails before the probe's cost); every probe builds its own.
    ProbeSettings(num_batches=settings.num_batches, **probe_settings)
    comm = resolve_process_group(process_group, device=device_of(model))  # once, here
    if settings.plateau and (comm is not None or under_several_ranks()):
        raise ValueError(
            "val_loader (the validation plateau rule) is not supported under a process group of "
            "more than one rank yet (each rank would judge its own validation shard, and the "
            "ranks' phi could differ); drop val_loader to keep the curvature's phi"
        )
    auto = AutoUBA(
        model,
        loader,
        settings,
        loss_fn=loss_fn,
        probe_kwargs=probe_settings,
        comm=comm,
        peak_lr=peak_lr,
        optimizer=optimizer,
        resume_from=resume_from,
        val_loader=val_loader,
    )
    if optimizer is not None:
        auto.make_scheduler(optimizer)
    return auto
