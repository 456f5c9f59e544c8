r"""The collectives of the curvature probe under ``torch.distributed``: one answer on every rank.

When a process group is in use, every rank holds its own shard of each probe batch (what a
``DistributedSampler`` gives it) and the probe describes the curvature of the loss on the **global
batch**, the union of every rank's batch (the weighting is
:mod:`uba_auto.curvature.allreduce`'s). Each rank computes its weighted local part of every
Hessian-vector product, gradient and batch loss, and one ``all_reduce`` (sum) makes them global.
The solvers then run on every rank with the same seed on bit-identical products, so their
estimates, and the φ chosen from them, are identical on every rank.

Failure protocol: a rank that fails while building an operator or computing its part of a product
tells the others through the same collective (a failure flag), and every rank raises
:class:`DistributedProbeError`; the group stays usable. Agreement steps (:meth:`Communicator.agree`)
all have the same signature, so a rank that fails between two of them pairs with the others' next
agreement step. A rank that fails while the others wait in a product, or dies, is caught by the
process group's own timeout (``init_process_group(timeout=...)``).

Debugging: with the environment variable ``UBA_AUTO_DISTRIBUTED_CHECK=1`` the probe all-gathers its
results and raises if any rank's differ (naming the ranks); φ is checked across ranks by
``auto_uba`` at every (re-)estimation whether or not the variable is set.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHECK_ENV_VAR",
    "Communicator",
    "DistributedProbeError",
    "check_enabled",
    "is_communication_failure",
    "resolve_process_group",
]

CHECK_ENV_VAR = "UBA_AUTO_DISTRIBUTED_CHECK"
"""Set to ``1`` to all-gather the probe's results and check them identical on every rank."""

_AGREE_SLOTS = 8  # every agreement step all-gathers this many float64 values per rank


class DistributedProbeError(RuntimeError):
    """The probe failed on some rank(s), or gave different results on different ranks.

    Raised on **every** rank, so that no rank waits for the others. On a rank that failed, the
    original exception is attached as ``__cause__``.

    Attributes:
        ranks: the ranks that failed (or whose results differ from rank 0's).
    """

    def __init__(self, message: str, ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)


def check_enabled() -> bool:
    """Whether ``UBA_AUTO_DISTRIBUTED_CHECK`` asks for the cross-rank consistency check.

    Example:
        >>> import os
        >>> os.environ.pop("UBA_AUTO_DISTRIBUTED_CHECK", None) and None
        >>> check_enabled()
        False
    """
    return os.environ.get(CHECK_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


# What gloo and NCCL put in the plain RuntimeErrors they raise for a failed transport (gloo's
# timeouts and lost peers are not DistError subclasses in torch 2.13).
_TRANSPORT_MARKERS = (
    "third_party/gloo",
    "Timed out waiting",
    "Connection closed by peer",
    "Connection reset by peer",
    "ProcessGroupNCCL",
    "NCCL error",
    "NCCL communicator",
)


def is_communication_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failure of ``torch.distributed`` itself (a timeout, a lost peer).

    After one, the process group is unusable: such errors must propagate, not be recorded as a
    failed probe while training continues (the collective that would record it would only wait
    for the group's timeout a second time).
    """
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _TRANSPORT_MARKERS)


def _fingerprint(text: str) -> float:
    """A float that identifies ``text`` identically in every process (``hash`` is salted)."""
    return float(zlib.crc32(text.encode()))


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


class Communicator:
    """The collectives of the probe on one process group (use :func:`resolve_process_group`).

    Never mutated: :meth:`with_device` returns a new one.

    Attributes:
        group: the ``ProcessGroup`` (``None`` for the default group).
        rank, world_size: of this process in the group.
        backend: the group's backend name (``"gloo"``, ``"nccl"``...).
        device: the probed model's device, or ``None``: a GPU-only backend's bookkeeping goes
            there, not to the current device (``cuda:0`` on every rank without ``set_device``).
    """

    def __init__(
        self,
        group: Any,
        *,
        rank: int,
        world_size: int,
        backend: str,
        device: torch.device | None = None,
    ) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.device = device

    def with_device(self, device: torch.device) -> Communicator:
        """The same group, with its bookkeeping next to a model on ``device``."""
        kept = {"rank": self.rank, "world_size": self.world_size, "backend": self.backend}
        return Communicator(self.group, **kept, device=device)

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, world_size={self.world_size}, {self.backend})"

    # -------------------------------------------------------------------------------- plumbing
    def _small_device(self) -> torch.device:
        """Where the small bookkeeping tensors live: the CPU, unless the backend is GPU-only."""
        backend = self.backend.lower()
        if "gloo" in backend or "mpi" in backend or "cpu:" in backend:
            return torch.device("cpu")
        if self.device is not None and self.device.type == "cuda":
            return self.device
        return torch.device("cuda", torch.cuda.current_device())

    def all_gather(self, values: Tensor) -> Tensor:
        """``(world_size, *values.shape)`` on the CPU: every rank's small ``values``."""
        import torch.distributed as dist

        values = values.to(self._small_device())
        out = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(out, values, group=self.group)
        return torch.stack(out).cpu()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The sum over ranks of ``tensor`` (a new tensor; every rank gets the same bits)."""
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out, group=self.group)
        return out

    def _gather_objects(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as err:  # only ever on a failure path: keep the original error visible
            if is_communication_failure(err):
                raise
            return [None] * self.world_size
        return out

    def _raise_failure(self, error: BaseException | None, flags: Tensor, what: str) -> None:
        """Raise :class:`DistributedProbeError` on every rank (all ranks call this together).

        The message is the same on every rank: it names each failed rank, what that rank was
        doing and its error.
        """
        failed = [r for r in range(self.world_size) if float(flags[r]) > 0.5]
        mine = None if error is None else (what, f"{type(error).__name__}: {error}")
        reports = self._gather_objects(mine)
        # Ranks that failed the same way are listed together (often all of them).
        by_report: dict[Any, list[int]] = {}
        for r in failed:
            by_report.setdefault(reports[r] if isinstance(reports[r], tuple) else None, []).append(
                r
            )
        details = "; ".join(
            f"{_ranks(ranks)} ({report[0]}): {report[1]}"
            if report is not None
            else f"{_ranks(ranks)}: see the log"
            for report, ranks in by_report.items()
        )
        message = (
            f"the curvature probe failed on rank(s) {failed} of {self.world_size}; every rank "
            f"raises this error, so none waits for the others. {details}"
        )
        if error is not None:
            raise DistributedProbeError(message, failed) from error
        raise DistributedProbeError(message, failed)

    # ------------------------------------------------------------------------------ agreement
    def agree(
        self,
        error: BaseException | None,
        what: str,
        *,
        equal: Mapping[str, float] | None = None,
        gather: Mapping[str, float] | None = None,
        hint: str = "",
    ) -> dict[str, list[float]]:
        """A collective checkpoint: every rank learns whether any failed, and compares values.

        Every rank must call it at the same point of the program. If any rank passes an
        ``error``, every rank raises :class:`DistributedProbeError` naming the failed ranks and
        their errors. Otherwise values in ``equal`` must be identical on every rank (else
        ``ValueError``, naming the value and the ranks that differ, followed by ``hint``).

        Args:
            error: this rank's exception, or ``None``.
            what: what the ranks were doing, for the messages.
            equal: values every rank must share (settings, sizes).
            gather: values to collect from every rank.
            hint: how to fix a mismatch of ``equal``.

        Returns:
            ``name -> [value on rank 0, value on rank 1, ...]`` for ``equal`` and ``gather``.
        """
        equal, gather = dict(equal or {}), dict(gather or {})
        names = [*equal, *gather]
        if len(names) > _AGREE_SLOTS - 2:
            raise ValueError(f"agree() takes at most {_AGREE_SLOTS - 2} values, got {len(names)}")
        row = torch.full((_AGREE_SLOTS,), math.nan, dtype=torch.float64)
        row[0] = 0.0 if error is None else 1.0
        # The point of the program: ranks at different points (a control-flow bug) are named.
        row[1] = _fingerprint(what)
        for i, name in enumerate(names):
            row[2 + i] = float(equal.get(name, gather.get(name, math.nan)))
        table = self.all_gather(row)
        if bool((table[:, 0] > 0.5).any()):
            self._raise_failure(error, table[:, 0], what)
        if not all(_same(float(table[r, 1]), float(table[0, 1])) for r in range(self.world_size)):
            places = self._gather_objects(what)
            raise DistributedProbeError(
                "the ranks reached different collective steps of the curvature probe: "
                + "; ".join(f"rank {r}: {p}" for r, p in enumerate(places))
                + ". Call probe_curvature/auto_uba with the same arguments at the same points "
                "on every rank",
                range(self.world_size),
            )
        out = {name: [float(v) for v in table[:, 2 + i]] for i, name in enumerate(names)}
        for name in equal:
            values = out[name]
            differ = [r for r in range(self.world_size) if not _same(values[r], values[0])]
            if differ:
                listing = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(values))
                raise ValueError(
                    f"{name} differs across ranks while {what} ({listing}); it must be the same "
                    "on every rank" + (f": {hint}" if hint else "")
                )
        return out

    def check_identical(self, values: Mapping[str, float | None], what: str) -> None:
        """Raise :class:`DistributedProbeError` on every rank unless ``values`` agree bitwise.

        ``None`` is compared as NaN. A collective: every rank must call it.
        """
        clean = {k: math.nan if v is None else float(v) for k, v in values.items()}
        table = self.agree(None, what, gather=clean)
        problems = []
        for name, per_rank in table.items():
            differ = [r for r in range(self.world_size) if not _same(per_rank[r], per_rank[0])]
            if differ:
                listing = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(per_rank))
                problems.append((name, differ, listing))
        if problems:
            ranks = sorted({r for _, differ, _ in problems for r in differ})
            listing = "; ".join(f"{n}: {s}" for n, _, s in problems)
            raise DistributedProbeError(
                f"{what}: results differ across ranks ({listing}); rank(s) {ranks} differ from "
                "rank 0. The Hessian-vector products are all-reduced, "
                "so this means the ranks ran different code or settings (seed, max_hvps, "
                "versions) or non-deterministic kernels (e.g. different GPU models)",
                ranks,
            )

    # ------------------------------------------------------------------------------ products
    def sum_of_parts(self, compute: Callable[[], Tensor], like: Tensor, what: str) -> Tensor:
        """:math:`\\sum_r` ``compute()`` over ranks, with a failure flag in the same collective.

        A rank whose ``compute`` raises contributes zeros and the flag; every rank then raises
        :class:`DistributedProbeError` instead of waiting for it.

        Args:
            compute: this rank's (already weighted) part, a tensor shaped like ``like``.
            like: a tensor of the result's shape, dtype and device.
            what: what is computed, for the message.
        """
        import torch.distributed as dist

        error: BaseException | None = None
        try:
            part = compute()
        except Exception as err:
            if is_communication_failure(err):
                raise
            error, part = err, torch.zeros_like(like)
        flag = torch.ones(1, dtype=part.dtype, device=part.device) * (error is not None)
        buffer = torch.cat([part.reshape(-1), flag])
        dist.all_reduce(buffer, group=self.group)
        if float(buffer[-1]) > 0.5:
            mine = torch.tensor([1.0 if error is not None else 0.0], dtype=torch.float64)
            flags = self.all_gather(mine)[:, 0]
            self._raise_failure(error, flags, what)
        return buffer[:-1].view(part.shape)


def resolve_process_group(
    process_group: Any, *, device: torch.device | None = None
) -> Communicator | None:
    """The :class:`Communicator` for a ``process_group`` argument, or ``None`` (single process).

    Args:
        process_group: ``"auto"``: the default group when ``torch.distributed`` is available and
            initialised with more than one rank; ``None`` or ``False``: no communication (each
            process probes its own batches alone); a ``torch.distributed.ProcessGroup``: that
            group; a :class:`Communicator`: itself (with ``device``, if given).
        device: the probed model's device (see :attr:`Communicator.device`).

    Example:
        >>> resolve_process_group("auto") is None  # no process group initialised here
        True
    """
    if isinstance(process_group, Communicator):
        return process_group if device is None else process_group.with_device(device)
    if process_group is None or process_group is False:
        return None
    import torch.distributed as dist

    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(
                "process_group must be 'auto', None/False (no communication) or a "
                f"torch.distributed.ProcessGroup, got {process_group!r}"
            )
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = None
    elif process_group is True:
        raise TypeError(
            "process_group=True is ambiguous; pass 'auto' (the default group when one is "
            "initialised) or a torch.distributed.ProcessGroup"
        )
    else:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group(...) first, or pass process_group=None"
            )
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                "process_group must be 'auto', None/False or a torch.distributed.ProcessGroup, "
                f"got {type(process_group).__name__}"
            )
        group = process_group
    world_size = dist.get_world_size(group)
    if world_size < 0:
        raise ValueError(
            "this process is not a member of process_group; pass a group it belongs to, or "
            "process_group=None on the processes outside it"
        )
    if world_size == 1:
        return None
    return Communicator(
        group,
        rank=dist.get_rank(group),
        world_size=world_size,
        backend=str(dist.get_backend(group)),
        device=device,
    )
