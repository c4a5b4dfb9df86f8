"""Tiling a large image into model-sized tiles and stitching the tiles' maps back.

A region bigger than the network input is cut into overlapping tiles. Each
tile's per-pixel label probabilities are blended with a smooth window that
fades towards the tile's edges, where a convolutional network sees least
context; overlapping tiles therefore hand over gradually and leave no seams.

Memory design (why the stitcher works in row bands)
---------------------------------------------------
A full float32 probability map of an 8192 x 8192 region with 5 labels is
1.3 GB, plus its weights. The stitcher never holds it: tiles arrive in the
row-major order of :func:`tile_grid`, and once the tiles of one grid row are in,
every image row above the next grid row's top edge is final (no later tile
touches it). So the stitcher keeps only a rolling band ``tile`` rows high
(``tile x W x D`` float32 plus ``tile x W`` weights, about 21 MB for W = 8192,
tile = 128, D = 5), normalises finished rows, and hands them to a consumer
that keeps what is wanted at low cost: the argmax label map (uint8, 64 MB for
8192 x 8192) and, only on request, the probabilities at float16.

Where the pixels come from (pixel sources)
------------------------------------------
The tiler never needs the whole image at once either: it asks a *pixel
source* (:class:`PixelSource`: a ``shape`` and ``read(y, x, h, w)``) for one
tile at a time, in the same row-major order, and for one small thumbnail for
tissue detection. :class:`ArraySource` serves an image already in memory; a
whole-slide region (``slide.SlideRegionSource``) decodes only the slide tiles
under the rows asked for; :class:`ResampledSource` puts either at the model's
microns per pixel one band of rows at a time. So a numpy array and a slide
share one code path, and a slide region is never held whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

#: Value used to pad images smaller than a tile: white, the colour of empty
#: glass, so padding reads as "no tissue" and never invents deposits.
PAD_VALUE = 255


def _axis_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every ``stride`` pixels, the last flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


def tile_grid(shape: tuple[int, int], tile: int, overlap: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y0, x0)`` of tiles covering every pixel of an ``(H, W)`` image.

    Tiles step by ``tile - overlap``; the last tile of each row and column is
    placed flush with the image edge (so it may overlap its neighbour more than
    ``overlap``), and every tile lies inside the image. An image side shorter
    than ``tile`` gets a single start at 0: tile a grid of at least ``tile`` a
    side, and read it from a :class:`PixelSource`, which pads with white
    glass. The order is row-major, which is what :class:`Stitcher` needs.
    """
    h, w = int(shape[0]), int(shape[1])
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap} for tile={tile}")
    if h < 1 or w < 1:
        raise ValueError(f"image shape must be positive, got {shape}")
    stride = tile - overlap
    ys = _axis_starts(h, tile, stride)
    xs = _axis_starts(w, tile, stride)
    return [(y, x) for y in ys for x in xs]


def blend_weights(tile: int, overlap: int) -> np.ndarray:
    """Separable blending window ``(tile, tile)`` float32, strictly positive.

    Inside ``overlap`` pixels of each edge the weight rises along a raised
    cosine from near 0 to 1; the centre is flat at 1. Sampling at pixel centres
    (``i + 0.5``) keeps the smallest weight above zero, so a pixel at the image
    border that only one tile covers is still normalised correctly.
    """
    if overlap <= 0:
        return np.ones((tile, tile), dtype=np.float32)
    ramp_len = min(overlap, tile // 2)
    line = np.ones(tile, dtype=np.float64)
    i = np.arange(ramp_len, dtype=np.float64)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (i + 0.5) / ramp_len)
    line[:ramp_len] = ramp
    line[tile - ramp_len :] = np.minimum(line[tile - ramp_len :], ramp[::-1])
    return np.outer(line, line).astype(np.float32)


RowsConsumer = Callable[[int, np.ndarray, np.ndarray], None]

#: A stitcher's flush normalises at most about this many bytes of float32 rows at once.
EMIT_BYTES = 32_000_000


class Stitcher:
    """Blend per-tile maps ``(tile, tile, D)`` into an ``(H, W)`` result, band by band.

    Feed tiles with :meth:`add` in the row-major order of :func:`tile_grid`
    (``y0`` never decreasing). Tiles may stick out past the bottom or right
    edge (padded images); the excess is clipped. Pixels no tile covered (for
    example tissue-free tiles that were skipped) get weight 0 and come out as
    label ``fill_label`` with a one-hot probability.

    Results: :attr:`label_map` (uint8 argmax, always), :attr:`probs` (float16
    ``(H, W, D)``, only with ``keep_probs=True``), :attr:`coverage` (bool, which
    pixels any tile covered) and per-label pixel counts :attr:`label_counts`.
    A custom ``consumer(y0, probs_rows, weight_rows)`` may be given to receive
    the normalised rows instead of (in addition to) the built-in ones; with
    ``keep_maps=False`` the consumer is all there is (no label map, coverage
    or counts are kept: a large region's consumer writes them to disk).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        depth: int,
        tile: int,
        overlap: int,
        *,
        keep_probs: bool = False,
        probs_dtype: np.dtype | type = np.float16,
        fill_label: int = 0,
        consumer: RowsConsumer | None = None,
        keep_maps: bool = True,
    ) -> None:
        self.height, self.width = int(shape[0]), int(shape[1])
        self.depth = int(depth)
        self.tile = int(tile)
        self.window = blend_weights(self.tile, overlap)
        self.fill_label = int(fill_label)
        self.consumer = consumer
        #: Rows normalised and handed on at once: bounds the float temporaries of a
        #: flush to ``emit_rows x W x D`` (26 MB at W = 40000, D = 5) whatever the tile.
        self.emit_rows = max(1, EMIT_BYTES // max(1, self.width * self.depth * 4))
        # Rolling band: rows [self._top, self._top + tile) of the image.
        self._acc = np.zeros((self.tile, self.width, self.depth), dtype=np.float32)
        self._wsum = np.zeros((self.tile, self.width), dtype=np.float32)
        self._top = 0
        self._done = False
        # Without keep_maps (a large region streamed by its consumer) neither is held.
        shape = (self.height, self.width) if keep_maps else (0, 0)
        self.label_map = np.full(shape, self.fill_label, dtype=np.uint8)
        self.coverage = np.zeros(shape, dtype=bool)
        self.keep_maps = keep_maps
        self.probs: np.ndarray | None = (
            np.zeros((self.height, self.width, self.depth), dtype=probs_dtype)
            if keep_probs
            else None
        )
        self.label_counts = np.zeros(self.depth, dtype=np.int64)

    def add(self, y0: int, x0: int, tile_map: np.ndarray, weight: np.ndarray | None = None) -> None:
        """Accumulate one tile's map ``(tile, tile, D)`` (probabilities) at ``(y0, x0)``.

        ``weight`` optionally scales the tile's window (for example by how sure
        the tile is); by default every tile counts the same.
        """
        if self._done:
            raise RuntimeError("Stitcher.add() called after finish()")
        if tile_map.shape != (self.tile, self.tile, self.depth):
            raise ValueError(
                f"tile map must have shape {(self.tile, self.tile, self.depth)}, got {tile_map.shape}"
            )
        if y0 < self._top:
            raise ValueError(
                f"tiles must arrive in row-major order: y0={y0} is above the current band "
                f"starting at row {self._top}"
            )
        if y0 > self._top:
            self._flush(y0 - self._top)
        h = min(self.tile, self.height - y0)
        w = min(self.tile, self.width - x0)
        if h <= 0 or w <= 0:
            return
        win = self.window[:h, :w]
        if weight is not None:
            win = win * np.asarray(weight, dtype=np.float32)[:h, :w]
        self._acc[:h, x0 : x0 + w] += (
            tile_map[:h, :w].astype(np.float32, copy=False) * win[..., None]
        )
        self._wsum[:h, x0 : x0 + w] += win

    def finish(self) -> np.ndarray:
        """Normalise the remaining rows and return the label map (uint8, ``(H, W)``)."""
        if not self._done:
            self._flush(self.height - self._top)
            self._done = True
        return self.label_map

    def _flush(self, n: int) -> None:
        """Finalise image rows ``[top, top + n)`` and move the band down by ``n`` rows.

        ``n`` may exceed the band height when whole grid rows were skipped; the
        rows beyond the band were never covered and get the fill label.
        """
        n = min(n, self.height - self._top)
        if n <= 0:
            return
        top = self._top
        nb = min(n, self.tile)
        step = self.emit_rows
        for r0 in range(0, nb, step):  # normalised a few rows at a time: small temporaries
            r1 = min(nb, r0 + step)
            acc = self._acc[r0:r1]
            wsum = self._wsum[r0:r1]
            covered = wsum > 0
            probs = np.zeros_like(acc)
            np.divide(acc, wsum[..., None], out=probs, where=covered[..., None])
            probs[~covered, self.fill_label] = 1.0
            self._emit(top + r0, probs, wsum, covered)
        if n > nb:  # rows no tile reached at all (blank glass), a band at a time:
            # one (gap, W, D) float array would be 8 GB for a blank 20000 x 20000 scan.
            rows = min(n - nb, step, self.tile)  # never more than a band's worth
            empty = np.zeros((rows, self.width, self.depth), dtype=np.float32)
            empty[..., self.fill_label] = 1.0
            zero_w = np.zeros((rows, self.width), dtype=np.float32)
            uncovered = np.zeros((rows, self.width), dtype=bool)
            for start in range(top + nb, top + n, rows):
                k = min(rows, top + n - start)
                self._emit(start, empty[:k], zero_w[:k], uncovered[:k])
        # Shift the rolling band: rows below nb move up, the freed rows start empty.
        keep = self.tile - nb
        if keep > 0 and n == nb:
            self._acc[:keep] = self._acc[nb:].copy()
            self._wsum[:keep] = self._wsum[nb:].copy()
            self._acc[keep:] = 0.0
            self._wsum[keep:] = 0.0
        else:
            self._acc[:] = 0.0
            self._wsum[:] = 0.0
        self._top = top + n

    def _emit(self, top: int, probs: np.ndarray, wsum: np.ndarray, covered: np.ndarray) -> None:
        n = probs.shape[0]
        if self.keep_maps:
            labels = probs.argmax(axis=-1).astype(np.uint8)
            self.label_map[top : top + n] = labels
            self.coverage[top : top + n] = covered
            self.label_counts += label_histogram(labels, self.depth)
        if self.probs is not None:
            self.probs[top : top + n] = probs
        if self.consumer is not None:
            self.consumer(top, probs, wsum)


def label_histogram(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixel count of each label ``0..n-1`` in a uint8 map, without big temporaries.

    ``np.bincount`` first converts its input to 64-bit integers: 512 MB for an
    8192 x 8192 map. OpenCV's histogram reads the uint8 data as it is; it
    returns float32, which is exact below 2**24, so it runs on row chunks of at
    most 8 M pixels and the chunks are summed as integers.
    """
    lab = np.asarray(labels)
    if lab.dtype != np.uint8:
        lab = lab.astype(np.uint8)
    if lab.ndim != 2:
        lab = lab.reshape(1, -1) if lab.size else lab.reshape(0, 1)
    total = np.zeros(256, dtype=np.int64)
    if lab.size == 0:
        return total[:n]
    rows = max(1, 8_000_000 // max(1, lab.shape[1]))
    for y in range(0, lab.shape[0], rows):
        chunk = np.ascontiguousarray(lab[y : y + rows])
        total += np.rint(cv2.calcHist([chunk], [0], None, [256], [0, 256]).ravel()).astype(np.int64)
    return total[:n]


# --------------------------------------------------------------------------- pixel sources


@runtime_checkable
class PixelSource(Protocol):
    """Anything the tiler can read RGB pixels from, a window at a time.

    ``shape`` is ``(H, W, 3)``. ``read(y, x, h, w)`` returns an ``(h, w, 3)``
    uint8 array; parts of the window beyond the image are white (:data:`PAD_VALUE`,
    empty glass), so edge tiles need no special case.
    ``thumbnail(width, height)`` returns the whole image shrunk to
    ``(height, width, 3)`` uint8 (area averaging), for tissue detection.
    Reads come in row-major order, which lets a source decode a band of rows
    once and serve every tile in it.
    """

    shape: tuple[int, int, int]

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray: ...

    def thumbnail(self, width: int, height: int) -> np.ndarray: ...


def read_padded(
    image: np.ndarray, y: int, x: int, h: int, w: int, value: int = PAD_VALUE
) -> np.ndarray:
    """Window ``[y, y+h) x [x, x+w)`` of an array; a view when it lies inside, else padded."""
    ih, iw = image.shape[:2]
    if y >= 0 and x >= 0 and y + h <= ih and x + w <= iw:
        return image[y : y + h, x : x + w]
    out = np.full((h, w, *image.shape[2:]), value, dtype=image.dtype)
    ya, xa = max(0, y), max(0, x)
    yb, xb = min(ih, y + h), min(iw, x + w)
    if yb > ya and xb > xa:
        out[ya - y : yb - y, xa - x : xb - x] = image[ya:yb, xa:xb]
    return out


class ArraySource:
    """A :class:`PixelSource` over an ``(H, W, 3)`` uint8 array already in memory.

    Reads inside the image are views (no copy); the thumbnail is one
    ``cv2.resize`` with area averaging, exactly what region mode did before
    pixel sources existed, so results on arrays are unchanged.
    """

    def __init__(self, image: np.ndarray) -> None:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
        self.image = image
        self.shape = (int(image.shape[0]), int(image.shape[1]), 3)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return read_padded(self.image, y, x, h, w)

    def thumbnail(self, width: int, height: int) -> np.ndarray:
        if (height, width) == self.shape[:2]:
            return self.image
        return cv2.resize(self.image, (width, height), interpolation=cv2.INTER_AREA)


#: A resampled band holds about this many bytes of float32 source pixels at most
#: (it grows past it only when one read needs more rows).
BAND_BYTES = 48_000_000


class ResampledSource:
    """Another :class:`PixelSource` scaled by ``factor`` (> 1 enlarges), a band of rows at a time.

    Resampling a whole slide region first would hold it twice; this decodes
    only the source rows under the band being tiled. Horizontally each band is
    resized at full width with OpenCV (area averaging when shrinking, bilinear
    when enlarging, as ``cv2.resize`` of the whole image would), vertically by
    an explicit weight matrix with the same sampling rule, in float32 with one
    rounding at the end; so the result matches ``cv2.resize`` of the whole
    image to within one grey level, whatever the band boundaries.
    """

    def __init__(self, base: PixelSource, factor: float, band_bytes: int | None = None) -> None:
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.base = base
        self.factor = float(factor)
        bh, bw = base.shape[:2]
        self.shape = (max(1, round(bh * self.factor)), max(1, round(bw * self.factor)), 3)
        # Source rows per output row, times a source row's float32 bytes.
        per_row = max(1.0, 1.0 / self.factor) * bw * 3 * 4 + self.shape[1] * 3 * 5
        budget = BAND_BYTES if band_bytes is None else band_bytes
        self.band_rows = max(16, int(budget // per_row))
        self._band: np.ndarray | None = None
        self._top = 0

    def thumbnail(self, width: int, height: int) -> np.ndarray:
        # Same field of view: shrink the base directly (cheaper and sharper).
        return self.base.thumbnail(width, height)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        oh = self.shape[0]
        ya, yb = max(0, y), min(oh, y + h)
        if yb <= ya:
            return np.full((h, w, 3), PAD_VALUE, np.uint8)
        band = self._band
        if band is None or ya < self._top or yb > self._top + band.shape[0]:
            self._load(ya, max(yb - ya, self.band_rows))
            band = self._band
        assert band is not None
        return read_padded(band, y - self._top, x, h, w)

    def _load(self, top: int, rows: int) -> None:
        """Resample output rows ``[top, top + rows)`` (full width) into the band."""
        self._band = None  # free the old band before building the new one
        oh, ow = self.shape[:2]
        bh, bw = self.base.shape[:2]
        rows = min(rows, oh - top)
        weights, s0, s1 = _axis_weights(top, rows, bh, oh)
        src = self.base.read(s0, 0, s1 - s0, bw).astype(np.float32)
        interp = cv2.INTER_AREA if ow < bw else cv2.INTER_LINEAR
        if ow != bw:
            src = cv2.resize(src, (ow, s1 - s0), interpolation=interp)
        out = weights @ src.reshape(s1 - s0, -1)
        del src
        np.clip(out, 0.0, 255.0, out=out)
        out += 0.5
        self._band = out.astype(np.uint8).reshape(rows, ow, 3)
        self._top = top


def _axis_weights(start: int, n: int, src_len: int, dst_len: int) -> tuple[np.ndarray, int, int]:
    """Weights ``(n, s1 - s0)`` mapping source samples ``[s0, s1)`` to outputs ``[start, start+n)``.

    Shrinking: area averaging (each output sample covers ``src/dst`` source
    samples, partial ones weighted by their overlap), as OpenCV's INTER_AREA.
    Enlarging or equal: bilinear with OpenCV's pixel-centre rule
    ``s = (d + 0.5) * src/dst - 0.5``, clamped at the edges, as INTER_LINEAR.
    """
    scale = src_len / dst_len
    d = np.arange(start, start + n, dtype=np.float64)
    if dst_len < src_len:
        lo, hi = d * scale, np.minimum((d + 1) * scale, src_len)
        s0 = int(math.floor(lo[0]))
        s1 = min(src_len, int(math.ceil(hi[-1])))
        idx = np.arange(s0, s1, dtype=np.float64)
        overlap = np.clip(
            np.minimum(hi[:, None], idx[None, :] + 1) - np.maximum(lo[:, None], idx[None, :]),
            0.0,
            None,
        )
        w = overlap / overlap.sum(axis=1, keepdims=True)
        return w.astype(np.float32), s0, s1
    pos = (d + 0.5) * scale - 0.5
    i0 = np.floor(pos)
    frac = pos - i0
    i0 = i0.astype(np.int64)
    frac[i0 < 0] = 0.0
    i0[i0 < 0] = 0
    last = i0 >= src_len - 1
    frac[last] = 0.0
    i0[last] = src_len - 1
    i1 = np.minimum(i0 + 1, src_len - 1)
    s0, s1 = int(i0.min()), int(i1.max()) + 1
    w = np.zeros((n, s1 - s0), np.float64)
    r = np.arange(n)
    np.add.at(w, (r, i0 - s0), 1.0 - frac)
    np.add.at(w, (r, i1 - s0), frac)
    return w.astype(np.float32), s0, s1
