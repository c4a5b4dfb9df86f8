"""Progress and cancellation of a region prediction, seen through its pixel reads.

The predictor tiles a region in row-major order and reads every tile from a
pixel source (``tiling.PixelSource``), after one thumbnail for the tissue
mask. :class:`ProgressSource` wraps that source: the lowest row read so far,
over the region's height, is how far the work has come, and a read after
cancellation raises :class:`Cancelled`, which unwinds the prediction at the
next tile. The pixels pass through untouched, so results do not change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from calcinosis.inference.tiling import PixelSource


class Cancelled(Exception):
    """The job was cancelled while it ran."""


class ProgressSource:
    """A pixel source that reports ``report(fraction, message)`` and honours ``cancel``."""

    def __init__(
        self,
        base: PixelSource,
        report: Callable[[float, str], None],
        cancel: threading.Event,
    ) -> None:
        self.base = base
        self.shape = base.shape
        self._report = report
        self._cancel = cancel
        self._done_rows = 0
        self._reported = -1.0

    def _check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled")

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        self._check()
        height, width = self.shape[:2]
        if y <= 0 and x <= 0 and y + h >= height and x + w >= width:
            # The whole source at once: a patch, or a region's tissue pass (a small
            # region is its own thumbnail). Tiles come after; this is not progress.
            self._report(0.0, "reading the image and finding the tissue")
            return self.base.read(y, x, h, w)
        px = self.base.read(y, x, h, w)
        rows = min(height, max(0, y + h))
        if rows > self._done_rows:
            self._done_rows = rows
            frac = rows / max(1, height)
            # Every 1% at most: each report wakes every client that follows the job.
            if frac - self._reported >= 0.01 or rows == height:
                self._reported = frac
                self._report(frac, f"predicting tiles: {frac:.0%} of the rows")
        return px

    def thumbnail(self, width: int, height: int) -> np.ndarray:
        self._check()
        self._report(0.0, "finding the tissue on a thumbnail")
        out = self.base.thumbnail(width, height)
        self._check()
        return out

    def __getattr__(self, name: str):  # e.g. SlideRegionSource.max_read_px
        return getattr(self.base, name)
