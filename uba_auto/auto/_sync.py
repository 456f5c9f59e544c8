"""What the ranks of a process group agree on at every (re-)estimation of ``auto_uba``."""

from __future__ import annotations

import math

from .._distributed import Communicator, DistributedProbeError
from ._state import AutoSettings

__all__ = ["agree_phi"]


def agree_phi(
    comm: Communicator | None,
    settings: AutoSettings,
    error: Exception | None,
    phi: float | None,
    what: str,
) -> Exception | None:
    """Under a process group, make this (re-)estimation's outcome collective: a failure on
    any rank becomes one on every rank, and φ and the settings must be bit-identical on every
    rank. Returns the error to handle (``None`` on success; ``error`` itself without a group);
    see :mod:`uba_auto._distributed`."""
    if comm is None or isinstance(error, DistributedProbeError):
        return error  # a DistributedProbeError was already raised on every rank
    try:
        # The settings' fingerprint too: ranks with, say, different reestimate_every would
        # otherwise meet in different collectives later and wait for the group's timeout.
        comm.agree(
            error,
            what,
            equal={
                "phi": math.nan if phi is None else phi,
                "the auto_uba settings (budget, warmup_steps, lr_min, num_batches, "
                "reestimate_every, probe_fraction, link, phi bounds)": settings.fingerprint(),
            },
            hint="pass the same auto_uba arguments on every rank; if they are the same, the "
            "ranks' estimates differ (see UBA_AUTO_DISTRIBUTED_CHECK)",
        )
    except (DistributedProbeError, ValueError) as err:
        return err
    return None
