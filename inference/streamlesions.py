"""Lesions of a label map that is never held whole: connected components a band of rows at a time.

``lesions.find_lesions`` labels the whole map at once, and its int32
component image is four bytes a pixel: 6.4 GB for a 40000 x 40000 region.
:class:`BandLesions` takes the map as it comes out of the stitcher, a band of
rows at a time, and holds one band's component image only:

* each band is labelled on its own (OpenCV, 8-connectivity) and its
  components get fresh global ids;
* a union-find over the ids joins the components that touch across the
  boundary with the band above (the previous band's last row against this
  band's first, at offsets -1, 0, +1: exactly 8-connectivity);
* per id, everything a lesion record is made of is summed from the band's
  deposit pixels: area, x/y sums (centroid), bounding box, pixels per label,
  deposit probability, and the pixels in each tile window that overlaps the
  band; at the end the sums of joined ids are added up per root.

The result is exact, not an approximation: the same components, areas,
centroids, label fractions and tile weights as the whole-map finder (the
records come from the same ``lesions.lesion_records``). The price is
bookkeeping per component fragment (one row of sums per band a component
crosses, plus one ``(tile, fragment, pixels)`` triple per tile window it
touches), small next to the map, and a tie in evidence is broken by each
lesion's first pixel in raster order rather than the OpenCV index (the same
order, since OpenCV numbers components in raster order). ``components`` are
then not OpenCV indices: :attr:`BandLesions.seeds` keeps one pixel of each
lesion, from which its outline is traced in its bounding box alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .lesions import Lesions, LesionSums, lesion_records, min_area_px

__all__ = ["BandLesions"]

#: Columns of the per-fragment sums: area, sum x, sum y, x min, y min, x max, y max, first pixel.
_A, _SX, _SY, _X0, _Y0, _X1, _Y1, _FIRST = range(8)


class BandLesions:
    """Band-wise 8-connected components of deposit pixels (label > 0) with their lesion sums.

    Feed bands top to bottom with :meth:`add` (``labels`` uint8 ``(n, W)``,
    ``deposit_prob`` uint8 ``(n, W)`` or None, the tiles seen so far as
    ``(y0, x0, size)`` rows in map pixels); :meth:`finish` makes the records.
    Every tile whose window overlaps a band must be in ``boxes`` when the band
    is added.
    """

    def __init__(self, width: int, depth: int, with_prob: bool) -> None:
        self.width, self.depth, self.with_prob = int(width), int(depth), with_prob
        self._parent: list[int] = [0]
        self._sums: list[np.ndarray] = []  # (n, 8) int64 per band, ids in order
        self._hist: list[np.ndarray] = []  # (n, depth)
        self._psum: list[np.ndarray] = []  # (n,) float64 (uint8 units)
        self._tile_hits: list[np.ndarray] = []  # (m, 3) tile index, global id, pixels
        self._last_row: np.ndarray | None = None  # global ids of the previous band's last row
        self._top = 0
        self._tile_lo = 0

    def add(self, labels: np.ndarray, deposit_prob: np.ndarray | None, boxes: np.ndarray) -> None:
        """One band of rows, the next below the previous one."""
        n_rows = labels.shape[0]
        n, comp, stats, _ = cv2.connectedComponentsWithStats(
            np.ascontiguousarray(labels, np.uint8), connectivity=8, ltype=cv2.CV_32S
        )
        base = len(self._parent) - 1  # band component j -> global id base + j
        self._parent.extend(range(base + 1, base + n))
        if self._last_row is not None and n > 1:
            self._join(self._last_row, _global(comp[0], base))
        if n > 1:
            self._band_sums(labels, deposit_prob, comp, stats)
            self._tile_counts(comp, base, boxes, n_rows)
        self._last_row = _global(comp[-1], base)
        self._top += n_rows

    def _join(self, above: np.ndarray, below: np.ndarray) -> None:
        """Union the ids that touch across the boundary (8-connectivity)."""
        pairs = []
        for dx in (-1, 0, 1):
            a = above[max(0, dx) : len(above) + min(0, dx)]
            b = below[max(0, -dx) : len(below) + min(0, -dx)]
            m = (a > 0) & (b > 0)
            if m.any():
                pairs.append(np.stack([a[m], b[m]], 1))
        if pairs:
            for a, b in np.unique(np.concatenate(pairs), axis=0).tolist():
                self._union(a, b)

    def _find(self, i: int) -> int:
        parent = self._parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def _band_sums(
        self,
        labels: np.ndarray,
        prob: np.ndarray | None,
        comp: np.ndarray,
        stats: np.ndarray,
    ) -> None:
        """Per band component: area, coordinate sums, box, first pixel, label counts, probability."""
        n = stats.shape[0]
        flat = comp.ravel()
        nz = np.flatnonzero(flat)
        ids = flat[nz].astype(np.int64)
        ys, xs = np.divmod(nz, self.width)
        s = np.zeros((n, 8), np.int64)
        s[:, _A] = np.bincount(ids, minlength=n)
        s[:, _SX] = np.bincount(ids, weights=xs, minlength=n).round().astype(np.int64)
        s[:, _SY] = np.bincount(ids, weights=ys + self._top, minlength=n).round().astype(np.int64)
        s[:, _X0] = stats[:, cv2.CC_STAT_LEFT]
        s[:, _Y0] = stats[:, cv2.CC_STAT_TOP] + self._top
        s[:, _X1] = stats[:, cv2.CC_STAT_LEFT] + stats[:, cv2.CC_STAT_WIDTH]
        s[:, _Y1] = stats[:, cv2.CC_STAT_TOP] + stats[:, cv2.CC_STAT_HEIGHT] + self._top
        first = np.full(n, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first, ids, nz + self._top * self.width)
        s[:, _FIRST] = first
        key = ids * self.depth + labels.ravel()[nz]
        hist = np.bincount(key, minlength=n * self.depth).reshape(n, self.depth)
        self._sums.append(s[1:])
        self._hist.append(hist[1:])
        if self.with_prob:
            assert prob is not None
            pv = prob.ravel()[nz].astype(np.float64)
            self._psum.append(np.bincount(ids, weights=pv, minlength=n)[1:])

    def _tile_counts(self, comp: np.ndarray, base: int, boxes: np.ndarray, n_rows: int) -> None:
        """Pixels of each band component in each tile window over the band."""
        top, bottom = self._top, self._top + n_rows
        integ = cv2.integral((comp > 0).astype(np.uint8))
        while (
            self._tile_lo < len(boxes) and boxes[self._tile_lo, 0] + boxes[self._tile_lo, 2] <= top
        ):
            self._tile_lo += 1  # tiles come in row-major order: those above stay above
        hits = []
        for t in range(self._tile_lo, len(boxes)):
            ty, tx, ts = (int(v) for v in boxes[t])
            if ty >= bottom:
                break
            ya, yb = max(ty, top) - top, min(ty + ts, bottom) - top
            xa, xb = max(0, tx), min(self.width, tx + ts)
            if yb <= ya or xb <= xa:
                continue
            if integ[yb, xb] - integ[ya, xb] - integ[yb, xa] + integ[ya, xa] == 0:
                continue
            v = comp[ya:yb, xa:xb]
            ids, cnt = np.unique(v[v > 0], return_counts=True)
            hits.append(np.stack([np.full(ids.size, t), ids.astype(np.int64) + base, cnt], 1))
        if hits:
            self._tile_hits.append(np.concatenate(hits))

    def finish(
        self,
        *,
        mpp: float | None,
        class_names: Sequence[str],
        deposit_labels: Sequence[str],
        tile_probs: np.ndarray,
        tile_in_focus: np.ndarray,
        min_area_um2: float,
        lesion_threshold: float,
        fallback_probs: np.ndarray | None,
    ) -> tuple[Lesions, list[tuple[int, int]]]:
        """The lesion records (as ``find_lesions`` makes them) and one ``(x, y)`` pixel of each."""
        if not self._sums:
            return Lesions(), []
        tile_probs = np.asarray(tile_probs, np.float64)
        tile_in_focus = np.asarray(tile_in_focus, bool).reshape(-1)
        roots = np.array([self._find(i) for i in range(len(self._parent))], np.int64)
        s = np.concatenate(self._sums)
        r = roots[1:]  # fragment i (global id i + 1) -> its root
        uniq, lesion_of = np.unique(r, return_inverse=True)
        k_all = uniq.size
        area = np.bincount(lesion_of, weights=s[:, _A], minlength=k_all).astype(np.int64)
        keep = np.nonzero(area >= min_area_px(mpp, min_area_um2))[0]
        if keep.size == 0:
            return Lesions(), []
        sums, first = self._lesion_sums(s, lesion_of, k_all, keep, tile_probs, tile_in_focus)
        found = lesion_records(
            sums,
            first,
            mpp=mpp,
            class_names=class_names,
            deposit_labels=deposit_labels,
            depth=self.depth,
            lesion_threshold=lesion_threshold,
            fallback_probs=fallback_probs,
        )
        seeds = [(int(f % self.width), int(f // self.width)) for f in found.components]
        return found, seeds

    def _lesion_sums(
        self,
        s: np.ndarray,
        lesion_of: np.ndarray,
        k_all: int,
        keep: np.ndarray,
        tile_probs: np.ndarray,
        focus: np.ndarray,
    ) -> tuple[LesionSums, np.ndarray]:
        """Fragments' sums added up per lesion (root), for the lesions kept."""

        def total(col: np.ndarray) -> np.ndarray:
            return np.bincount(lesion_of, weights=col, minlength=k_all)[keep]

        def extreme(col: np.ndarray, fn: np.ufunc, start: int) -> np.ndarray:
            out = np.full(k_all, start, np.int64)
            fn.at(out, lesion_of, col)
            return out[keep]

        big = np.iinfo(np.int64).max
        area = total(s[:, _A]).astype(np.int64)
        x0, y0 = extreme(s[:, _X0], np.minimum, big), extreme(s[:, _Y0], np.minimum, big)
        x1, y1 = extreme(s[:, _X1], np.maximum, -1), extreme(s[:, _Y1], np.maximum, -1)
        stats = np.stack([x0, y0, x1 - x0, y1 - y0, area], 1)
        cents = np.stack([total(s[:, _SX]) / area, total(s[:, _SY]) / area], 1)
        first = extreme(s[:, _FIRST], np.minimum, big)
        hist_all = np.zeros((k_all, self.depth), np.int64)
        np.add.at(hist_all, lesion_of, np.concatenate(self._hist))
        psum = None
        if self.with_prob:
            psum = total(np.concatenate(self._psum)) / 255.0
        acc, wsum, ntiles = self._tile_sums(lesion_of, k_all, keep, tile_probs, focus)
        return LesionSums(stats, cents, hist_all[keep], psum, acc, wsum, ntiles), first

    def _tile_sums(
        self,
        lesion_of: np.ndarray,
        k_all: int,
        keep: np.ndarray,
        probs: np.ndarray,
        focus: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixel-weighted tile probabilities per lesion, and the tiles each one touches."""
        index = np.full(k_all, -1, np.int64)
        index[keep] = np.arange(keep.size)
        k, n_cls = keep.size, probs.shape[1]
        acc = np.zeros((2, k, n_cls), np.float64)
        wsum = np.zeros((2, k), np.float64)
        ntiles = np.zeros(k, np.int64)
        if not self._tile_hits:
            return acc, wsum, ntiles
        hits = np.concatenate(self._tile_hits)
        les = index[lesion_of[hits[:, 1] - 1]]
        hits, les = hits[les >= 0], les[les >= 0]
        # One (tile, lesion) pair per tile window, whatever the bands it was counted in.
        pairs, inv = np.unique(np.stack([hits[:, 0], les], 1), axis=0, return_inverse=True)
        cnt = np.bincount(inv.ravel(), weights=hits[:, 2], minlength=len(pairs))
        slot = np.where(focus[pairs[:, 0]], 0, 1)
        np.add.at(acc, (slot, pairs[:, 1]), cnt[:, None] * probs[pairs[:, 0]])
        np.add.at(wsum, (slot, pairs[:, 1]), cnt)
        np.add.at(ntiles, pairs[:, 1], 1)
        return acc, wsum, ntiles


def _global(row: np.ndarray, base: int) -> np.ndarray:
    """A row of band component indices as global ids (0 stays background)."""
    out = row.astype(np.int64)
    out[out > 0] += base
    return out
