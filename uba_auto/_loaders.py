"""Drawing probe batches from a training loader without disturbing the training run.

:class:`BatchStream` is the one mutable resource of :class:`~uba_auto.auto.AutoUBA`: a loader
iterator cannot be rewound, so the batches a probe drew stay drawn even if the probe fails, and
:attr:`BatchStream.drawn` is what a resumed run fast-forwards past.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["BatchStream", "loader_generators", "loader_generators_preserved"]


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects iterating ``loader`` draws from (each once): the loader's
    own (``DataLoader(generator=...)``), its sampler's and its batch sampler's.

    Example:
        >>> import torch
        >>> gen = torch.Generator()
        >>> loader = torch.utils.data.DataLoader(range(4), shuffle=True, generator=gen)
        >>> loader_generators(loader) == [gen]
        True
    """
    found: list[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


@contextlib.contextmanager
def loader_generators_preserved(loader: Any) -> Iterator[None]:
    """Restore the states of ``loader``'s own generators on exit (:func:`loader_generators`)."""
    saved = [(gen, gen.get_state()) for gen in loader_generators(loader)]
    try:
        yield
    finally:
        for gen, state in saved:
            gen.set_state(state)


class BatchStream:
    """Successive draws of batches from ``loader``, for one probe each.

    Attributes:
        loader: the loader drawn from.
        drawn: batches drawn so far (what :meth:`skip_to` fast-forwards past on resume).
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.drawn = 0
        self._iterator: Iterator[Any] | None = None

    def draw(self, num_batches: int) -> list[Any]:
        """The next ``num_batches`` batches of the loader (fresh data for each probe).

        The loader is restarted when it is exhausted, but never within a draw once that draw has
        batches: a loader shorter than ``num_batches`` gives a short draw (which the probe
        records), never a batch twice. Iterating runs under a forked RNG, because a shuffling
        ``DataLoader`` draws its seed from the global generator, and with the states of the
        loader's own generators restored afterwards (:func:`loader_generators_preserved`):
        probing must not change the data order or dropout masks of the training run. The probe
        therefore sees the batches the training's next pass over the loader starts with.
        """
        out: list[Any] = []
        with torch.random.fork_rng(devices=[]), loader_generators_preserved(self.loader):
            for _ in range(2):  # at most one restart, and only for an empty draw
                if self._iterator is None:
                    self._iterator = iter(self.loader)
                out += list(itertools.islice(self._iterator, num_batches - len(out)))
                if out:
                    if len(out) < num_batches:
                        self._iterator = None
                    break
                self._iterator = None
        self.drawn += len(out)
        return out

    def skip_to(self, drawn: int, num_batches: int) -> Any:
        """Start the loader afresh and draw, ``num_batches`` at a time as the saved run did, until
        ``drawn`` batches are drawn (used on resume); returns the first batch (``None`` if none)."""
        self._iterator, self.drawn = None, 0
        first = None
        while self.drawn < drawn:
            got = self.draw(num_batches)
            if not got:
                break
            if first is None:
                first = got[0]
        return first
