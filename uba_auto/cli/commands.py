"""One function per command: check the flags before any work, then call the public functions
(:func:`~uba_auto.plotting.plot_schedules`, :func:`~uba_auto.demo.run_demo`,
:func:`~uba_auto.auto.auto_uba`) and print what they return. Each returns the exit status."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .checks import (
    FIGURE_SUFFIXES,
    check_folder,
    check_matplotlib,
    check_minimum,
    check_output,
    check_phis,
)
from .factories import make_data, make_model, resolve_loss

__all__ = ["demo_command", "plot_command", "report_command", "with_flags"]


def plot_command(args: argparse.Namespace) -> int:
    """``uba-auto plot``: the UBA family next to cosine (and linear decay), written to ``--out``."""
    from ..plotting import plot_schedules

    check_phis(args.phi)
    check_minimum("--total-steps", args.total_steps, 1)
    if not 0 <= args.warmup < args.total_steps:
        raise ValueError(
            f"--warmup must lie in [0, --total-steps), got --warmup {args.warmup} with "
            f"--total-steps {args.total_steps}"
        )
    out = check_output(args.out, "--out", FIGURE_SUFFIXES)
    fig = plot_schedules(
        args.phi,
        total_steps=args.total_steps,
        warmup_steps=args.warmup,
        include_linear=not args.no_linear,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    print(f"wrote {out}")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """``uba-auto demo``: :func:`~uba_auto.demo.run_demo`, its table, and its files in ``--out``."""
    from .. import demo

    demo.check_demo_dependencies()
    check_phis(args.phi)
    budget = args.budget
    if budget is None:
        budget = demo.QUICK_BUDGET if args.quick else demo.DEMO_BUDGET
    check_minimum("--budget", budget, 2, "optimizer steps per run")
    check_minimum("--seed", args.seed, 0)
    device = demo.resolve_device(args.device, "--device")
    out = Path(args.out)
    check_folder(out, "--out")

    def say(text: str) -> None:
        print(text, flush=True)  # before the progress bars on stderr

    result = demo.run_demo(
        budget,
        seed=args.seed,
        device=device,
        phis=args.phi,
        num_batches=demo.QUICK_NUM_BATCHES if args.quick else demo.DEMO_NUM_BATCHES,
        probe_kwargs=demo.QUICK_PROBE if args.quick else None,
        curve_points=demo.QUICK_CURVE_POINTS if args.quick else demo.CURVE_POINTS,
        progress=False if args.no_progress else None,
        log=say,
    )
    paths = demo.write_demo_files(result, out)
    say("")
    say(result.table())
    say("")
    say(f"wrote {', '.join(p.name for p in paths.values())} into {out}")
    say(f"demo finished in {result.wall_time_s:.0f} s")
    return 0


_FLAGS = {
    "mode=": "--mode",
    "loss_fn": "--loss",
    "num_batches": "--batches",
    "warmup_steps": "--warmup",
    "peak_lr": "--peak-lr",
}
"""The keywords of ``auto_uba`` that the library's messages may name, and the flags of
``report`` that set them."""


def with_flags(message: str) -> str:
    """``message`` of the library, with the flags that stand for the keywords it names.

    Example:
        >>> with_flags("random numbers drawn; use mode='eval'")
        "random numbers drawn; use mode='eval' (on the command line: mode= is --mode)"
    """
    named = [f"{key} is {flag}" for key, flag in _FLAGS.items() if key in message]
    return f"{message} (on the command line: {', '.join(named)})" if named else message


def report_command(args: argparse.Namespace) -> int:
    """``uba-auto report``: :func:`~uba_auto.auto.auto_uba` on the user's model and data, its
    report, the scheduler line to use it, and the ``--json`` and ``--plot`` files."""
    import torch

    from ..auto import auto_uba
    from ..demo import resolve_device

    check_minimum("--budget", args.budget, 2, "optimizer steps of your run")
    check_minimum("--batches", args.batches, 1)
    check_minimum("--warmup", args.warmup, 0)
    check_minimum("--seed", args.seed, 0)
    if args.peak_lr is not None and not (math.isfinite(args.peak_lr) and args.peak_lr > 0):
        raise ValueError(f"--peak-lr must be finite and > 0, got {args.peak_lr:g}")
    json_out = check_output(args.json, "--json", (".json",)) if args.json else None
    plot_out = check_output(args.plot, "--plot", FIGURE_SUFFIXES) if args.plot else None
    if plot_out is not None:
        check_matplotlib("--plot")
    device = None if args.device is None else resolve_device(args.device, "--device")
    loss_fn = resolve_loss(args.loss)

    torch.manual_seed(args.seed)  # the factories' initialisation and shuffling, reproducibly
    model = make_model(args.model)
    data = make_data(args.data)
    if device is not None:
        model = model.to(device)
    mode = {} if args.mode is None else {"mode": args.mode}  # else the library's default
    try:
        auto = auto_uba(
            model,
            data,
            args.budget,
            loss_fn=loss_fn,
            warmup_steps=args.warmup,
            peak_lr=args.peak_lr,
            num_batches=args.batches,
            seed=args.seed,
            **mode,
        )
    except (ValueError, TypeError) as err:  # the library's own messages already name the fix
        kind = TypeError if isinstance(err, TypeError) else ValueError  # subclasses differ
        raise kind(with_flags(str(err))) from None
    except Exception as err:  # raised inside the user's model, data or loss (shape, KeyError...)
        raise ValueError(
            f"the probe failed: {type(err).__name__}: {err} (raised in the model, the data or "
            "the loss; call your factories and loss in Python to see the traceback)"
        ) from None
    print(auto.report)
    warmup = f", warmup_steps={args.warmup}" if args.warmup else ""
    print(
        f"\nuse it: UBAScheduler(optimizer, total_steps={args.budget - 1}, "
        f"phi={auto.phi:.4g}{warmup})"
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(auto.report.to_json() + "\n", encoding="utf-8")
        print(f"wrote {json_out}")
    if plot_out is not None:
        plot_out.parent.mkdir(parents=True, exist_ok=True)
        auto.report.plot().savefig(plot_out, dpi=120)
        print(f"wrote {plot_out}")
    return 0
