"""OpenCV's thread count: the one place in training/ that changes it.

Two reasons to keep OpenCV on one thread. Processes that each ran OpenCV on
all cores would fight over them (DataLoader workers, the generator's pool).
And forking is only safe with OpenCV's thread pool shut down: a child forked
while the pool runs inherits the pool's locks but not its threads, and its
first call into the pool (even ``setNumThreads``) can then wait forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import cv2

__all__ = ["cv2_single_thread", "set_cv2_threads"]


def set_cv2_threads(n: int) -> int:
    """Set OpenCV's thread count (1: its pool shut down); returns the count it had."""
    prev = cv2.getNumThreads()
    cv2.setNumThreads(n)
    return prev


@contextlib.contextmanager
def cv2_single_thread() -> Iterator[None]:
    """OpenCV on one thread while it lasts, then back to the count it had."""
    prev = set_cv2_threads(1)
    try:
        yield
    finally:
        set_cv2_threads(prev)
