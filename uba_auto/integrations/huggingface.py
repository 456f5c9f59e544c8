r"""Hugging Face ``transformers``: the UBA schedule for ``Trainer``, and ``auto_uba`` with exact
checkpoint resume.

* :func:`get_uba_schedule_with_warmup`: a fixed-φ UBA schedule in the convention of
  ``transformers.get_cosine_schedule_with_warmup`` (φ = 2 is that cosine schedule).
* :class:`UBACallback`: :func:`~uba_auto.auto_uba` inside a ``Trainer``. The probe runs when
  training begins; the :class:`~uba_auto.AutoUBA` state is saved with every checkpoint (in its
  ``scheduler.pt``), and ``trainer.train(resume_from_checkpoint=...)`` continues with the same
  remaining rates and φ history, without probing again. The script is the same for the first and
  the resumed run::

      uba = UBACallback(probe_loader, reestimate_every=500)
      optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
      trainer = Trainer(model=model, args=args, train_dataset=train_dataset,
                        optimizers=(optimizer, uba.scheduler(optimizer)), callbacks=[uba])
      trainer.train(resume_from_checkpoint=resume)   # None, True or a checkpoint folder
      print(uba.auto.report)

This module imports without ``transformers``; :class:`UBACallback` needs it (the
``integrations`` extra: ``pip install 'uba-auto[integrations]'``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch.optim import Optimizer

from .._validation import check_int
from ..scheduler import UBAScheduler
from ._deferred import DeferredAutoUBA, import_extra

try:
    from transformers import TrainerCallback as _Base
except ImportError:  # the extra is missing: UBACallback(...) says which one
    _Base = object

__all__ = ["UBACallback", "get_uba_schedule_with_warmup"]


def get_uba_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    phi: float = 2.0,
    lr_min_ratio: float = 0.0,
    last_epoch: int = -1,
) -> UBAScheduler:
    r"""A linear warm-up, then the UBA decay, in the convention of
    ``transformers.get_cosine_schedule_with_warmup``.

    Step it once per optimizer step (``Trainer`` does). The rate of step :math:`t` is
    :math:`\eta_{\max} t / W` during the warm-up (:math:`t < W`), then
    :math:`\eta_{\min} + (\eta_{\max} - \eta_{\min}) / (1 + \tfrac{\varphi}{2}\tan^2(\pi s / 2))`
    with :math:`s = (t - W) / (T - W)`, reaching :math:`\eta_{\min}` at
    :math:`t = T` = ``num_training_steps`` (held after it), where :math:`\eta_{\max}` is each
    param group's ``lr`` and :math:`\eta_{\min}` = ``lr_min_ratio`` :math:`\eta_{\max}`. With
    φ = 2 and ``lr_min_ratio=0`` this is ``get_cosine_schedule_with_warmup``'s schedule; the rates
    are :func:`~uba_auto.uba_lr`'s.

    Args:
        optimizer: the optimizer whose param groups' ``lr`` (the peaks) it schedules.
        num_warmup_steps: ``W``, steps of linear warm-up from 0 (0 for none).
        num_training_steps: ``T``, the step at which the rate reaches its minimum
            (``> num_warmup_steps``).
        phi: the UBA shape parameter (> 0): below 2 the rate stays high for longer, above 2 it
            decays early.
        lr_min_ratio: the final rate as a fraction of each group's peak, in [0, 1].
        last_epoch: the index of the last step taken, to resume at step ``last_epoch + 1``
            (``-1``: start). As for ``torch`` schedulers, resuming needs each param group's
            ``initial_lr`` (the peak), which a scheduler leaves in the optimizer's state dict.

    Returns:
        A :class:`~uba_auto.UBAScheduler` (``set_phi`` re-shapes the rest of the budget).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = get_uba_schedule_with_warmup(opt, 2, 6, phi=2.0)
        >>> [round(sched.lr_at(t)[0], 12) for t in range(7)]  # 0.5 (1 + cos(pi s)) after warm-up
        [0.0, 0.5, 1.0, 0.853553390593, 0.5, 0.146446609407, 0.0]
    """
    last_epoch = check_int("last_epoch", last_epoch, minimum=-1)
    if last_epoch >= 0 and isinstance(optimizer, Optimizer):  # else UBAScheduler says what it is
        missing = [i for i, g in enumerate(optimizer.param_groups) if "initial_lr" not in g]
        if missing:
            raise ValueError(
                f"last_epoch={last_epoch} resumes a schedule, but param group {missing[0]} has no "
                "'initial_lr' (its peak rate, which a scheduler leaves in the optimizer); load the "
                "optimizer's state dict first, or pass last_epoch=-1 to start"
            )
    try:  # checks every argument before it touches the optimizer
        sched = UBAScheduler(
            optimizer,
            total_steps=num_training_steps,
            phi=phi,
            lr_min_ratio=lr_min_ratio,
            warmup_steps=num_warmup_steps,
        )
    except (TypeError, ValueError) as err:  # in the names of this function's arguments
        message = str(err).replace("total_steps", "num_training_steps")
        raise type(err)(message.replace("warmup_steps", "num_warmup_steps")) from None
    if last_epoch >= 0:
        # torch's convention: the scheduler stands at last_epoch + 1 after construction.
        state = sched.state_dict()
        step = last_epoch + 1
        state.update(last_epoch=step, _last_lr=sched.lr_at(step))
        sched.load_state_dict(state)
    return sched


class UBACallback(DeferredAutoUBA, _Base):
    """:func:`~uba_auto.auto_uba` in a ``transformers.Trainer``, with exact resume (see the
    module docstring for the whole script).

    Give the Trainer ``optimizers=(optimizer, uba.scheduler(optimizer))`` and
    ``callbacks=[uba]``. When training begins (``on_train_begin``, after the Trainer has restored
    any checkpoint) the callback either probes the model, as ``auto_uba`` does, or, when the
    Trainer resumed from a checkpoint, rebuilds the :class:`~uba_auto.AutoUBA` from the state the
    Trainer restored with the scheduler (``scheduler.pt``), without a probe: the remaining rates,
    re-estimations and φ history are those of an uninterrupted run (given the Trainer's own exact
    resume of model, optimizer, data order and RNG).

    Args:
        loader: the loader the probe draws from: a ``DataLoader`` of its own over the training
            data (batches as the model takes them: dicts for ``model(**batch)`` returning
            ``.loss``, or ``(inputs, targets)`` with ``loss_fn``), not the Trainer's.
        budget: optimizer steps in all; ``None`` (default) takes the Trainer's ``max_steps``.
        **auto_uba_kwargs: the other arguments of :func:`~uba_auto.auto_uba` (``loss_fn``,
            ``warmup_steps``, ``lr_min_ratio``, ``reestimate_every``, ``link``, probe keywords);
            they must be the same on resume.

    Attributes:
        auto: the :class:`~uba_auto.AutoUBA` (report, φ, history), ``None`` before training.

    Raises:
        ImportError: if ``transformers`` is not installed.
    """

    def __init__(
        self, loader: Iterable[Any], *, budget: int | None = None, **auto_uba_kwargs: Any
    ) -> None:
        if _Base is object:
            import_extra("transformers", "UBACallback")
        super().__init__(loader, budget=budget, **auto_uba_kwargs)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start(
            kwargs["model"],
            total_steps=state.max_steps,
            step=state.global_step,
            stepped=[kwargs.get("lr_scheduler")],
            trainer="Trainer",
            grad_clip=getattr(args, "max_grad_norm", None),
        )
