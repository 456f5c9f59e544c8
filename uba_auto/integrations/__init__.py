"""Trainer integrations: :func:`~uba_auto.auto_uba` with exact checkpoint resume.

* :mod:`uba_auto.integrations.huggingface`: ``transformers.Trainer`` (``UBACallback``) and
  ``get_uba_schedule_with_warmup``;
* :mod:`uba_auto.integrations.lightning`: PyTorch Lightning (``UBACallback``).

Each drives :class:`~uba_auto.AutoUBA` through its public methods and ``state_dict()`` only. The
modules import without the trainers; their callbacks need the ``integrations`` extra
(``pip install 'uba-auto[integrations]'``) and say so when it is missing.
"""

from ._deferred import DeferredAutoUBA, DeferredUBAScheduler

__all__ = ["DeferredAutoUBA", "DeferredUBAScheduler"]
