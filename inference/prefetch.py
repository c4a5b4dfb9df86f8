"""Reading a region's tiles in a thread while the network runs: :func:`run_tiles_prefetched`.

On a slide, a tile costs a decode of the slide tiles under it (and a band
resample when its mpp differs from the model's) before the network sees it;
done in turn, the cores wait for the reader and then for the network. Here a
reader thread walks the grid exactly as ``TileRun.visit`` does (tissue
check, read, focus, preprocessing) and hands each batch, made up exactly as
the serial path makes it, through a bounded ``queue.Queue``; the calling
thread runs the network and stitches. So results are the same as the serial
path's, tile for tile, and at most :data:`QUEUE_BATCHES` batches of pixels
wait in memory.

Shutdown: an exception in the reader (a corrupt slide tile, a cancelled job)
is passed through the queue and raised in the caller, unchanged in type,
with a note naming the file and the tile; an exception or ``KeyboardInterrupt``
in the caller sets a stop flag, empties the queue so the reader cannot stay
blocked on it, and joins the reader before going on.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .region import TissueMap
    from .tilerun import TileRun
    from .tiling import PixelSource

__all__ = ["QUEUE_BATCHES", "run_tiles_prefetched"]

#: Ready batches the reader may be ahead of the network.
QUEUE_BATCHES = 2


@dataclass
class _Batch:
    """Tile-table rows in grid order (glass ones too) and the tissue tiles among them."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    todo: list[tuple[dict[str, Any], int, int, np.ndarray]] = field(default_factory=list)
    pixels: np.ndarray | None = None


class _Reader(threading.Thread):
    def __init__(self, run: TileRun, source: PixelSource, tissue: TissueMap, inv: float) -> None:
        super().__init__(name="tile-reader", daemon=True)
        self.run_, self.source, self.tissue, self.inv = run, source, tissue, inv
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=QUEUE_BATCHES)
        self.stop = threading.Event()
        self.where = (0, 0)

    def run(self) -> None:
        try:
            batch, size = _Batch(), self.run_.predictor.batch_size
            for y0, x0 in self.run_.grid:
                if self.stop.is_set():
                    return
                self.where = (y0, x0)
                row, tile = self.run_.check(self.source, self.tissue, y0, x0, self.inv)
                batch.rows.append(row)
                if tile is not None:
                    batch.todo.append((row, y0, x0, tile))
                    if len(batch.todo) >= size:
                        self._put("batch", self._ready(batch))
                        batch = _Batch()
            self._put("batch", self._ready(batch))
            self._put("done", None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
            self._put("error", exc)

    def _ready(self, batch: _Batch) -> _Batch:
        if batch.todo:
            batch.pixels = self.run_.preprocess(batch.todo)
        return batch

    def _put(self, kind: str, item: Any) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put((kind, item), timeout=0.1)
                return
            except queue.Full:
                continue


def run_tiles_prefetched(
    run: TileRun, source: PixelSource, tissue: TissueMap, inv: float, name: str | None
) -> None:
    """``region.run_tiles`` with the reading in a thread; the same tiles, batches and order."""
    reader = _Reader(run, source, tissue, inv)
    reader.start()
    try:
        while True:
            kind, item = reader.queue.get()
            if kind == "done":
                break
            if kind == "error":
                y0, x0 = reader.where
                item.add_note(f"while reading the tile at y={y0}, x={x0} of {name or 'the image'}")
                raise item
            run.tiles.extend(item.rows)
            run.run_batch(item.todo, item.pixels)
    finally:
        reader.stop.set()
        while reader.is_alive():
            try:
                reader.queue.get(timeout=0.1)
            except queue.Empty:
                pass
        reader.join()
