"""Worker processes for the generator, with OpenCV kept on one thread.

Every pool runs inside :func:`calcinosis.training.threads.cv2_single_thread`
(why: see that module, the one place that changes OpenCV's thread count).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from ..threads import cv2_single_thread, set_cv2_threads

J = TypeVar("J")
R = TypeVar("R")


def _init_worker() -> None:
    # a forked worker inherits one thread; a spawned one starts with OpenCV's default
    set_cv2_threads(1)


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
