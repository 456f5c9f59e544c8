"""What a probe spends: single-batch HVPs and seconds by part, and the progress bar they advance."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import Tensor

from ..linear_operator import SymmetricOperator

__all__ = ["Ledger", "Tracked", "progress_bar"]

T = TypeVar("T")


@contextlib.contextmanager
def progress_bar(progress: bool | None, total: int, desc: str, rank: int = 0) -> Iterator[Any]:
    """A tqdm bar counting HVPs (closed on exit), or ``None`` when none is to be shown.

    ``progress=None`` shows one per job: on rank 0 when stderr is a terminal (all ranks of a
    torchrun job share the terminal).
    """
    show = progress if progress is not None else (sys.stderr.isatty() and rank == 0)
    if not show:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="hvp", leave=False)
    try:
        yield bar
    finally:
        bar.close()


class Tracked(SymmetricOperator):
    """Forwards products to ``inner``; each costs ``hvps_per_product`` HVPs, shown on ``bar``."""

    def __init__(self, inner: SymmetricOperator, bar: Any, hvps_per_product: int) -> None:
        super().__init__()
        self.inner, self.bar, self.hvps_per_product = inner, bar, hvps_per_product
        self.size, self.dtype, self.device = inner.size, inner.dtype, inner.device

    @property
    def hvps(self) -> int:
        """Single-batch HVPs spent through this wrapper."""
        return self.num_matvecs * self.hvps_per_product

    def _matvec(self, v: Tensor) -> Tensor:
        out = self.inner.matvec(v)
        if self.bar is not None:
            self.bar.update(self.hvps_per_product)
        return out


@dataclass
class Ledger:
    """HVPs and seconds spent by each part of a probe, in the order the parts ran."""

    hvps: dict[str, int] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time the block as part ``name``."""
        t = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t

    def spend(self, name: str, op: Tracked, step: Callable[[Tracked], T]) -> T:
        """``step(op)`` as part ``name``: its seconds, and the HVPs ``op`` counted."""
        with self.part(name):
            result = step(op)
        self.hvps[name] = op.hvps
        return result

    def end_setup(self) -> None:
        """Record the seconds since the ledger opened as ``"setup"``."""
        self.times["setup"] = time.perf_counter() - self.start

    def elapsed(self) -> float:
        """Seconds since the ledger opened."""
        return time.perf_counter() - self.start

    @property
    def num_hvps(self) -> int:
        return sum(self.hvps.values())
