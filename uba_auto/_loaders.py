"""Drawing probe batches from a training loader without disturbing the training run.

Two promises, kept here for every caller that iterates the user's loader:

* A one-shot iterator is refused (:func:`check_reiterable`): the batches a probe took from a
  generator, or from ``iter(dataloader)``, would be gone from the training loop, silently.
* Iterating leaves the data order of the training run as it was (:func:`loader_untouched`): the
  loader's own generators and the global CPU generator are restored afterwards.

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

__all__ = [
    "BatchStream",
    "check_reiterable",
    "is_one_shot",
    "loader_generators",
    "loader_generators_preserved",
    "loader_untouched",
]


def is_one_shot(loader: Any) -> bool:
    """Whether iterating ``loader`` consumes it: an iterator, for which ``iter(loader) is loader``
    (a generator, ``iter(dataloader)``, ``itertools.islice(...)``, a file object...).

    Only an object with ``__next__`` is asked ``iter()``: for an iterator that has no side effect,
    while ``iter(dataloader)`` would build an iterator (and draw a seed, start workers).

    Example:
        >>> is_one_shot([1, 2]), is_one_shot(iter([1, 2])), is_one_shot(x for x in [1, 2])
        (False, True, True)
    """
    if not hasattr(type(loader), "__next__"):
        return False
    try:
        return iter(loader) is loader
    except TypeError:
        return False


def check_reiterable(loader: Any, caller: str) -> None:
    """Refuse a one-shot iterator as ``loader`` (:func:`is_one_shot`), naming ``caller``.

    A probe takes only the first batches of its loader. From a list or a ``DataLoader`` each
    ``iter()`` starts afresh, so the training loop still sees every batch; from a one-shot
    iterator they would be gone, and a training loop iterating it afterwards would silently miss
    them (with re-estimation, some of every stretch of training). Refusing, rather than taking
    them with a warning, keeps the training run whole: a warning is easy to miss in a log, and
    the batches taken cannot be put back.

    Raises:
        ValueError: if ``loader`` is a one-shot iterator.

    Example:
        >>> check_reiterable(iter([1]), "probe_curvature")
        Traceback (most recent call last):
        ...
        ValueError: loader is a one-shot iterator (list_iterator): ...
    """
    if is_one_shot(loader):
        raise ValueError(
            f"loader is a one-shot iterator ({type(loader).__name__}): iter(loader) is loader, so "
            f"the batches {caller} takes would be gone from it and a training loop iterating it "
            "afterwards would silently miss them. Pass a loader that can be iterated again: the "
            "DataLoader itself rather than iter(dataloader), a list of batches (e.g. "
            "list(itertools.islice(iterator, num_batches)), then train on the rest), or any "
            "iterable whose __iter__ starts afresh"
        )


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


@contextlib.contextmanager
def loader_untouched(loader: Any) -> Iterator[None]:
    """Iterate ``loader`` inside this block without changing the training run's data order.

    On exit, also when the block raises, the global CPU generator is restored (a shuffling
    ``DataLoader`` without ``generator=`` draws its sampler's seed, and its workers' base seed,
    from it, and a dataset's random transforms may draw from it too) and so are the loader's
    own generators (:func:`loader_generators_preserved`). The next pass over the loader then
    yields what it would have yielded had the block not run.

    Example:
        >>> import torch
        >>> gen = torch.Generator().manual_seed(0)
        >>> loader = torch.utils.data.DataLoader(range(6), 3, shuffle=True, generator=gen)
        >>> with loader_untouched(loader):
        ...     first = [b.tolist() for b in loader]
        >>> [b.tolist() for b in loader] == first
        True
    """
    with torch.random.fork_rng(devices=[]), loader_generators_preserved(loader):
        yield


class BatchStream:
    """Successive draws of batches from ``loader``, for one probe each.

    Attributes:
        loader: the loader drawn from.
        drawn: batches drawn so far (what :meth:`skip_to` fast-forwards past on resume).

    Raises:
        ValueError: for a one-shot iterator (:func:`check_reiterable`): its batches would be
            taken from the training loop, at the pre-training probe and at every re-estimation.
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        check_reiterable(loader, "auto_uba (its first probe and every re-estimation)")
        self.loader = loader
        self.drawn = 0
        self._iterator: Iterator[Any] | None = None

    def draw(self, num_batches: int) -> list[Any]:
        """The next ``num_batches`` batches of the loader (fresh data for each probe).

        The loader is restarted when it is exhausted, but never within a draw once that draw has
        batches: a loader shorter than ``num_batches`` gives a short draw (which the probe
        records), never a batch twice. Iterating runs under :func:`loader_untouched`: probing must
        not change the data order or dropout masks of the training run. The probe therefore sees
        the batches the training's next pass over the loader starts with.
        """
        out: list[Any] = []
        with loader_untouched(self.loader):
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
