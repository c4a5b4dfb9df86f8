"""The label map of a large region, kept on disk a band at a time instead of in memory.

At 40000 x 40000 px the whole-map path holds the uint8 label map (1.6 GB),
the stitcher's coverage mask (1.6 GB), the uint8 deposit probability
(1.6 GB) and, to find lesions, an int32 component image (6.4 GB). Above
:data:`STREAM_MIN_PX` pixels a region goes through :class:`StreamedMaps`
instead, which takes the stitcher's finished rows and holds none of these:

* each band is turned into labels (argmax, cleared off the section as the
  whole-map path clears them) and deposit probability, scaled to the
  region's own pixels (nearest neighbour, OpenCV's rule), and then
* appended to a scratch file of raw rows (:class:`LabelMapFile`; written and
  read with ``pwrite``/``pread``, never memory-mapped, so it is not resident),
* counted per label (the deposit areas),
* subsampled into a small copy for the overlay (at most :data:`THUMB_SIDE`),
* and handed, one band late (so every tile over it is known), to
  ``streamlesions.BandLesions``.

At the end the scratch rows become a tiled, pyramidal OME-TIFF
(:meth:`LabelMapFile.write_tiff`), which ``predict`` moves to
``maps/<name>.ome.tif``; the lesion outlines for the GeoJSON are traced from
windows of the scratch file. Label values in the TIFF are the deposit labels'
indices (``model.labels.DEPOSIT_LABELS``): 0 no deposit, 1 calcium, 2 bone,
3 urate, 4 amyloid; levels below full size take every 2nd, 4th, ... pixel
(labels are never averaged).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .streamlesions import BandLesions
from .tiling import label_histogram

__all__ = ["STREAM_MIN_PX", "THUMB_SIDE", "LabelMapFile", "StreamedMaps"]

#: Regions with more pixels than this (at the model's or their own mpp) are streamed.
STREAM_MIN_PX = 8192 * 8192
#: The longer side of the small label map kept for the overlay.
THUMB_SIDE = 4096
#: TIFF tile side, and the coarsest pyramid level's longest side at most.
TIFF_TILE, TIFF_MIN_SIDE = 256, 512


class LabelMapFile:
    """A uint8 ``(H, W)`` label map as raw rows in a scratch file, plus its small copy.

    Rows are appended in order (:meth:`append`); :meth:`window` reads any
    rectangle back. The scratch file is unlinked as soon as it is open; the
    folder (holding the TIFF until it is moved) is removed by :meth:`close` or
    when the object is collected.
    """

    def __init__(self, shape: tuple[int, int], mpp: float | None) -> None:
        self.height, self.width = int(shape[0]), int(shape[1])
        self.mpp = mpp
        self.folder = Path(tempfile.mkdtemp(prefix="calcinosis-map-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        raw = self.folder / "labels.raw"
        self._fd = os.open(raw, os.O_RDWR | os.O_CREAT, 0o600)
        # Only the descriptor is used: unlinked now, its space is freed when the process
        # ends, even killed (a cohort worker killed mid-slide leaves no 1.6 GB file).
        raw.unlink()
        self._close_fd = weakref.finalize(self, os.close, self._fd)
        self.rows = 0
        self.step = max(1, math.ceil(max(self.height, self.width) / THUMB_SIDE))
        #: Every ``step``-th row and column: the overlay's label map.
        self.thumbnail = np.zeros(
            (-(-self.height // self.step), -(-self.width // self.step)), np.uint8
        )
        self.tiff: Path | None = None
        #: Per lesion, in label-map pixels: its bounding box (x, y, w, h) and one of its pixels.
        self.outlines: list[tuple[tuple[int, int, int, int], tuple[int, int]]] = []

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, np.uint8)
        os.pwrite(self._fd, rows.tobytes(), self.rows * self.width)
        k = self.step
        first = -self.rows % k  # first row of this band on the thumbnail's grid
        picked = rows[first::k, ::k]
        t0 = (self.rows + first) // k
        self.thumbnail[t0 : t0 + picked.shape[0]] = picked
        self.rows += rows.shape[0]

    def row(self, y: int, x: int = 0, w: int | None = None, step: int = 1) -> np.ndarray:
        """Row ``y`` from column ``x`` (``w`` pixels), every ``step``-th pixel."""
        w = self.width - x if w is None else w
        data = os.pread(self._fd, w, y * self.width + x)
        return np.frombuffer(data, np.uint8)[::step]

    def window(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The ``h x w`` rectangle at ``(x, y)`` (inside the map)."""
        return np.stack([self.row(r, x, w) for r in range(y, y + h)])

    def write_tiff(self) -> Path:
        """The map as a tiled pyramidal OME-TIFF (levels in SubIFDs, halved by nearest)."""
        import tifffile

        levels = [1]  # downsamples: halved until the longer side fits TIFF_MIN_SIDE
        while max(self.height, self.width) // levels[-1] > TIFF_MIN_SIDE:
            levels.append(levels[-1] * 2)
        path = self.folder / "labels.ome.tif"
        meta = {"axes": "YX", "Name": "deposit labels"}
        if self.mpp:
            meta.update(PhysicalSizeX=self.mpp, PhysicalSizeY=self.mpp)
            meta.update(PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
        opts = {"photometric": "minisblack", "compression": "zlib", "tile": (TIFF_TILE,) * 2}
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
            for i, ds in enumerate(levels):
                shape = (-(-self.height // ds), -(-self.width // ds))
                extra = {"subifds": len(levels) - 1, "metadata": meta}
                if i:
                    extra = {"subfiletype": 1, "metadata": None}
                if self.mpp:
                    res = 1e4 / (self.mpp * ds)  # pixels per centimetre
                    extra.update(resolution=(res, res), resolutionunit="CENTIMETER")
                tw.write(self._tiles(ds), shape=shape, dtype=np.uint8, **opts, **extra)
        self.tiff = path
        return path

    def _tiles(self, ds: int) -> Iterator[np.ndarray]:
        """The level of downsample ``ds`` as TIFF tiles, row-major, a band of tile rows at a time."""
        t = TIFF_TILE
        h, w = -(-self.height // ds), -(-self.width // ds)
        for y0 in range(0, h, t):
            band = np.zeros((t, -(-w // t) * t), np.uint8)
            for r in range(y0, min(h, y0 + t)):
                band[r - y0, :w] = self.row(r * ds, step=ds)
            for x0 in range(0, w, t):
                yield band[:, x0 : x0 + t]

    def save_tiff(self, dest: Path) -> None:
        """Move the TIFF (written by :meth:`write_tiff`) to ``dest``."""
        assert self.tiff is not None
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.tiff), str(dest))
        self.tiff = None

    def close(self) -> None:
        self._close_fd()
        self._cleanup()


class StreamedMaps:
    """The stitcher's consumer for a large region: rows to the label file, counts and lesions.

    ``shape`` is the map at the model's mpp (the stitcher's), ``out_shape`` at
    the region's own; ``off_section`` the coarse mask of bare glass off the
    section (``tissue.outside_section``) whose labels are cleared; ``tiles()``
    returns the tiles seen so far as ``(y0, x0, size)`` rows in region pixels.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        out_shape: tuple[int, int],
        depth: int,
        off_section: np.ndarray,
        mpp: float | None,
        tiles: Callable[[], np.ndarray],
    ) -> None:
        (self.h, self.w), (self.oh, self.ow) = shape, out_shape
        self.off = off_section
        self.tiles = tiles
        self.file = LabelMapFile(out_shape, mpp)
        self.lesions = BandLesions(self.ow, depth, with_prob=True)
        self.counts = np.zeros(depth, np.int64)
        self.depth = depth
        th, tw = off_section.shape
        self._off_cols = np.minimum(np.arange(self.w) * tw // self.w, tw - 1)
        # Nearest neighbour as cv2.resize(INTER_NEAREST): source index floor(d / (dst / src)).
        self._ys = _nearest(self.oh, self.h)
        self._xs = _nearest(self.ow, self.w)
        self._next = 0  # next region row to emit
        self._pending: tuple[np.ndarray, np.ndarray] | None = None

    def accept(self, top: int, probs: np.ndarray, _wsum: np.ndarray) -> None:
        """Finished rows ``[top, top + n)`` of normalised probabilities at the model's mpp."""
        n = probs.shape[0]
        labels = probs.argmax(axis=-1).astype(np.uint8)
        if self.off.any():
            th = self.off.shape[0]
            rows = np.minimum(np.arange(top, top + n) * th // self.h, th - 1)
            labels[self.off[rows[:, None], self._off_cols[None, :]]] = 0
        dep = 255.0 * (1.0 - probs[..., 0]) + 0.5
        np.clip(dep, 0.0, 255.0, out=dep)
        dep = dep.astype(np.uint8)
        stop = int(np.searchsorted(self._ys, top + n))  # region rows whose source is here
        if stop > self._next:
            src = self._ys[self._next : stop] - top
            if (self.oh, self.ow) == (self.h, self.w):
                lab_r, dep_r = labels[src], dep[src]
            else:
                lab_r, dep_r = labels[src][:, self._xs], dep[src][:, self._xs]
            self._next = stop
            self._emit(lab_r, dep_r)

    def _emit(self, labels: np.ndarray, dep: np.ndarray) -> None:
        self.file.append(labels)
        self.counts += label_histogram(labels, self.depth)
        if self._pending is not None:
            self.lesions.add(*self._pending, self.tiles())
        self._pending = (labels, dep)

    def finish(self) -> LabelMapFile:
        """Hand the last band to the lesion finder; write the TIFF; the label file."""
        if self._pending is not None:
            self.lesions.add(*self._pending, self.tiles())
            self._pending = None
        assert self.file.rows == self.oh, (self.file.rows, self.oh)
        self.file.write_tiff()
        return self.file


def _nearest(dst: int, src: int) -> np.ndarray:
    """Source index of each of ``dst`` samples, OpenCV's INTER_NEAREST rule."""
    if dst == src:
        return np.arange(dst)
    ifx = 1.0 / (dst / src)
    return np.minimum(np.floor(np.arange(dst) * ifx).astype(np.int64), src - 1)
