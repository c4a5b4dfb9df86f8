"""Worker processes for the generator, with OpenCV kept on one thread.

The only place in the generator that changes OpenCV's thread count: a pool
of processes that each ran OpenCV on all cores would fight over them, and a
process forked while OpenCV's thread pool runs can hang (below).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import cv2

J = TypeVar("J")
R = TypeVar("R")


def _set_cv2_threads(n: int) -> int:
    """Set OpenCV's thread count; the count it had."""
    prev = cv2.getNumThreads()
    cv2.setNumThreads(n)
    return prev


@contextlib.contextmanager
def cv2_single_thread() -> Iterator[None]:
    """OpenCV on one thread while it lasts; every worker pool runs inside it.

    Besides keeping processes from fighting over the cores, this makes forking
    safe: a child forked while OpenCV's thread pool is running inherits the
    pool's locks but not its threads, and its first call into the pool (even
    ``setNumThreads``) can then wait forever. With the pool shut down in the
    parent before the fork, there is nothing to inherit.
    """
    prev = _set_cv2_threads(1)
    try:
        yield
    finally:
        _set_cv2_threads(prev)


def _init_worker() -> None:
    # a forked worker inherits one thread; a spawned one starts with OpenCV's default
    _set_cv2_threads(1)


def map_in_workers(
    fn: Callable[[J], R],
    jobs: Iterable[J],
    workers: int,
    *,
    ordered: bool = True,
    chunksize: int = 1,
) -> Iterator[R]:
    """``fn`` over ``jobs`` in ``workers`` processes (1: in this one), OpenCV on one thread.

    Results come in job order when ``ordered``, else as they finish. ``fn`` and
    the jobs travel to the workers by pickling: pass what a job needs in the
    job (or in ``fn``, a ``functools.partial``), never through module state.
    """
    with cv2_single_thread():
        if workers <= 1:
            yield from map(fn, jobs)
            return
        with mp.get_context().Pool(workers, initializer=_init_worker) as pool:
            run = pool.imap if ordered else pool.imap_unordered
            yield from run(fn, jobs, chunksize=chunksize)
