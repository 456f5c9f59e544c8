"""PyTorch Lightning: :func:`~uba_auto.auto_uba` in a ``Trainer``, with exact checkpoint resume.

:class:`UBACallback` makes the scheduler ``configure_optimizers`` returns (stepped every optimizer
step: ``"interval": "step"``) and runs the probe when training begins (``on_train_start``, after
Lightning has restored any checkpoint). The :class:`~uba_auto.AutoUBA` state travels in the
``.ckpt`` as that scheduler's state, so ``trainer.fit(model, ckpt_path=...)`` continues with the
same remaining rates and φ history, without probing again. The script is the same for the first
and the resumed run::

    class Model(pl.LightningModule):
        def __init__(self, uba):
            super().__init__()
            self.uba = uba
            ...

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=3e-4)
            scheduler = self.uba.scheduler(optimizer)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    uba = UBACallback(probe_loader, reestimate_every=500)
    trainer = pl.Trainer(max_steps=10_000, callbacks=[uba, checkpointing])
    trainer.fit(Model(uba), train_loader, ckpt_path=resume)   # None, "last" or a .ckpt file
    print(uba.auto.report)

This module imports without Lightning; :class:`UBACallback` needs ``pytorch_lightning`` (the
``integrations`` extra: ``pip install 'uba-auto[integrations]'``), or else ``lightning``
(``lightning.pytorch``), whichever is installed, ``pytorch_lightning`` first. Use the callback with
the ``Trainer`` of that same package.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._deferred import DeferredAutoUBA, import_extra

try:
    from pytorch_lightning import Callback as _Base
except ImportError:
    try:
        from lightning.pytorch import Callback as _Base
    except ImportError:  # the extra is missing: UBACallback(...) says which one
        _Base = object

__all__ = ["UBACallback"]


class UBACallback(DeferredAutoUBA, _Base):
    """:func:`~uba_auto.auto_uba` in a Lightning ``Trainer``, with exact resume (see the module
    docstring for the whole script).

    Return ``uba.scheduler(optimizer)`` from ``configure_optimizers`` with ``"interval": "step"``
    and pass ``callbacks=[uba]``. When training begins the callback either probes the model, as
    ``auto_uba`` does, or, when ``fit`` resumed from a checkpoint, rebuilds the
    :class:`~uba_auto.AutoUBA` from the state Lightning restored into the scheduler, without a
    probe: the remaining rates, re-estimations and φ history are those of an uninterrupted run
    (given Lightning's own exact resume of model, optimizer and data).

    Args:
        loader: the loader the probe draws from: a ``DataLoader`` of its own over the training
            data (``(inputs, targets)`` batches with ``loss_fn``, dicts for ``model(**batch)``
            returning ``.loss``, or any batch with ``loss_fn=ModelLoss(fn)``), not the Trainer's.
        budget: optimizer steps in all; ``None`` (default) takes the Trainer's
            ``estimated_stepping_batches`` (its ``max_steps`` when set).
        **auto_uba_kwargs: the other arguments of :func:`~uba_auto.auto_uba` (``loss_fn``,
            ``warmup_steps``, ``lr_min_ratio``, ``reestimate_every``, ``link``, probe keywords);
            they must be the same on resume.

    Attributes:
        auto: the :class:`~uba_auto.AutoUBA` (report, φ, history), ``None`` before training.

    Raises:
        ImportError: if neither ``pytorch_lightning`` nor ``lightning`` is installed.
    """

    def __init__(
        self, loader: Iterable[Any], *, budget: int | None = None, **auto_uba_kwargs: Any
    ) -> None:
        if _Base is object:
            import_extra("pytorch_lightning", "UBACallback")
        super().__init__(loader, budget=budget, **auto_uba_kwargs)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        for config in trainer.lr_scheduler_configs:
            if self.steps(config.scheduler) and (
                config.interval != "step" or config.frequency != 1
            ):
                raise ValueError(
                    "the UBA scheduler must be stepped after every optimizer step: return it "
                    'from configure_optimizers as {"scheduler": scheduler, "interval": "step"} '
                    f"(got interval={config.interval!r}, frequency={config.frequency})"
                )
        total = trainer.estimated_stepping_batches
        self.start(
            pl_module,
            total_steps=None if total == float("inf") else int(total),
            step=trainer.global_step,
            stepped=[c.scheduler for c in trainer.lr_scheduler_configs],
            trainer="Lightning Trainer",
            grad_clip=_norm_clip(trainer),
        )


def _norm_clip(trainer: Any) -> float | None:
    """The trainer's gradient-norm clipping value (``None`` without it, or for value clipping)."""
    value = getattr(trainer, "gradient_clip_val", None)
    algorithm = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm").lower()
    return float(value) if value and algorithm.endswith("norm") else None
