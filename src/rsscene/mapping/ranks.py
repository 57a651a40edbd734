"""Mapping under torchrun: how the work is shared between ranks, and how they meet.

A region's scenes go to ranks whole (:func:`share`); one scene's batches of windows go to
ranks in contiguous blocks (:func:`block`). Ranks meet in :func:`exchange`, which every rank
calls at the same points: what one rank refuses or fails at, every rank raises, so that none
waits for a rank that has stopped.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from rsscene.device import Dist
from rsscene.errors import UserError

T = TypeVar("T")


def share(weights: Sequence[int], world: int) -> list[int]:
    """Each item's rank: heaviest first, each to the least loaded rank so far (the lowest on
    a tie), so that the loads come out close to even, the same on every rank."""
    load, owners = [0] * world, [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += weights[i]
    return owners


def block(count: int, rank: int, world: int) -> range:
    """``rank``'s contiguous share of ``count`` items in order: sizes differ by one at most,
    the larger ones first."""
    size, extra = divmod(count, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


def exchange(dist: Dist, work: Callable[[], T]) -> list[T]:
    """Every rank's ``work()``, in rank order, on every rank: each rank runs its own, waits
    for the others however long they work (:meth:`~rsscene.device.Dist.wait_for_all`), and
    they swap results in one collective. An exception on any rank is raised on every rank:
    its own where it happened, elsewhere a :class:`UserError` naming the rank and the error.
    Outside torchrun, ``[work()]``."""
    if not dist.enabled:
        return [work()]
    failure: Exception | None = None
    try:
        with _beating(dist):
            mine: tuple[bool, Any] = (True, work())
    except Exception as e:  # any failure must reach the others, or they wait for this rank
        failure, mine = e, (False, str(e))
    dist.wait_for_all()
    outcomes = dist.gather(mine)
    if failure is not None:
        raise failure
    for rank, (ok, value) in enumerate(outcomes):
        if not ok:
            raise UserError(f"rank {rank} of {dist.world} stopped: {value}")
    return [value for _, value in outcomes]


@contextlib.contextmanager
def _beating(dist: Dist, every: float = 5.0) -> Iterator[None]:
    """Beats for this rank from a thread while it works between two meetings: its checks
    (opening every scene, a HEAD request each, the earlier maps' checksums) and its writes
    (COG overviews, a remote scene's preview) can outlast the timeout without a batch to beat
    after. A process that dies stops beating; one hung inside a call beats on, and only
    torchrun or the user stops it."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            dist.beat()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def agree(dist: Dist, work: Callable[[], T]) -> T:
    """``work()``'s result on this rank, once it succeeded on every rank (as :func:`exchange`,
    but nothing is sent: the ranks swap only whether it failed)."""
    results: list[T] = []
    exchange(dist, lambda: results.append(work()))
    return results[0]
