"""What the trainer-integration tests share: the model's forward calls before training, and the
comparison of a resumed run with an uninterrupted one."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

__all__ = ["CHEAP_PROBE", "ForwardCounter", "assert_resumed_exactly"]

CHEAP_PROBE = dict(link="chebyshev", num_batches=1, max_hvps=3, trace=False, density=False)
"""auto_uba keywords for probes of 3 HVPs (12 gradient-equivalents in the plan's count, 1.5 for
the graph's setup + 3 x 3.5: with probe_fraction=1, a budget of B steps pays for B // 12 of
them), whose chebyshev link moves φ with the curvature (2 HVPs are too few for that)."""


class ForwardCounter:
    """Counts the model's forward calls (a forward pre-hook: the probe's ``functional_call`` runs
    it too); :meth:`training_starts` keeps the count at the first training step."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.before_training: int | None = None
        model.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: tuple) -> None:
        self.calls += 1

    def training_starts(self) -> None:
        if self.before_training is None:
            self.before_training = self.calls


def _without_seconds(history):
    return [dataclasses.replace(r, seconds=0.0) for r in history]


def assert_resumed_exactly(full, resumed, *, resume_step: int, max_steps: int) -> None:
    """``resumed`` (a run resumed at ``resume_step``) went on exactly as ``full`` (uninterrupted).

    Each run is ``(uba callback, rates by step, forward counter, model)``.
    """
    full_uba, full_rates, _, full_model = full
    uba, rates, forwards, model = resumed
    assert forwards.before_training == 0  # no probe of the model on resume
    assert sorted(rates) == list(range(resume_step, max_steps))
    assert all(rates[t] == full_rates[t] for t in rates)  # every remaining rate, bit for bit
    history, again = full_uba.auto.report.history, uba.auto.report.history
    # the records up to the checkpoint are the saved ones (their timings too: nothing re-ran) ...
    assert [r for r in again if r.step <= resume_step] == [
        r for r in history if r.step <= resume_step
    ]
    # ... and the later re-estimations measured the same model at the same steps
    assert _without_seconds(again) == _without_seconds(history)
    assert uba.auto.probe_hvps == full_uba.auto.probe_hvps
    assert uba.auto.batches_drawn == full_uba.auto.batches_drawn
    for (name, p), q in zip(model.named_parameters(), full_model.parameters(), strict=True):
        assert torch.equal(p, q), name
