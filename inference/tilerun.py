"""One region's tiles in row-major order and what the network made of them (:class:`TileRun`).

Its own module beside ``region`` (which drives it): the tile table, the
network's batches, the stitcher and the tallies the region's call is made
from. Tiles can be fed one at a time (:meth:`TileRun.visit`, the serial path)
or checked, read and preprocessed elsewhere and handed over as a batch
(:meth:`TileRun.check`, :meth:`TileRun.preprocess`, :meth:`TileRun.run_batch`,
which ``prefetch`` does from a reader thread); both make the same batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from calcinosis.model.labels import INDETERMINATE
from calcinosis.model.probability import softmax

from .tiling import PixelSource, Stitcher, label_histogram, tile_grid
from .tissue import focus_measure

if TYPE_CHECKING:
    from .bigmap import StreamedMaps
    from .predictor import Predictor
    from .region import TissueMap

__all__ = ["TileRun"]


class TileRun:
    """The tiles of one region, visited in row-major order, and what they produced.

    Besides the label map, the stitcher's rows give the per-pixel deposit
    probability (``1 - p(label 0)``) at uint8 (a quarter of float32), for
    each lesion's ``deposit_probability``. Tiles waiting for the network are
    held with their pixels, so a source is read once, in order.
    """

    def __init__(
        self, predictor: Predictor, shape: tuple[int, int], sink: StreamedMaps | None = None
    ) -> None:
        self.predictor = predictor
        s, ov = predictor.input_size, predictor.tile_overlap
        hw, ww = shape
        self.shape = (hw, ww)
        self.depth = len(predictor.deposit_labels)
        # A large region's rows go to its sink (on disk); a small one keeps its maps here.
        self.deposit_prob = np.zeros((0, 0) if sink else (hw, ww), np.uint8)
        consumer = self._keep_deposit_prob if sink is None else sink.accept
        self.stitcher = Stitcher(
            (hw, ww), self.depth, s, ov, consumer=consumer, keep_maps=sink is None
        )
        self.grid = tile_grid((max(hw, s), max(ww, s)), s, ov)
        #: One row per tile (the tile table), in region pixels.
        self.tiles: list[dict[str, Any]] = []
        #: Every tile the network saw: (y0, x0, size) in region pixels, probabilities, in focus.
        self.seen_boxes: list[tuple[int, int, int]] = []
        self.seen_probs: list[np.ndarray] = []
        self.seen_in_focus: list[bool] = []
        # In-focus tiles: tissue fraction (the weight), class and stain probabilities.
        self._weights: list[float] = []
        self._probs: list[np.ndarray] = []
        self._stains: list[np.ndarray] = []
        self._todo: list[tuple[dict[str, Any], int, int, np.ndarray]] = []

    def _keep_deposit_prob(self, top: int, probs: np.ndarray, _wsum: np.ndarray) -> None:
        band = 255.0 * (1.0 - probs[..., 0]) + 0.5
        np.clip(band, 0.0, 255.0, out=band)
        self.deposit_prob[top : top + probs.shape[0]] = band.astype(np.uint8)

    def visit(self, source: PixelSource, tissue: TissueMap, y0: int, x0: int, inv: float) -> None:
        """Check the tile at ``(y0, x0)``: glass is skipped, tissue queued for the network."""
        row, tile_img = self.check(source, tissue, y0, x0, inv)
        self.tiles.append(row)
        if tile_img is None:
            return
        self._todo.append((row, y0, x0, tile_img))
        if len(self._todo) >= self.predictor.batch_size:
            self.flush()

    def check(
        self, source: PixelSource, tissue: TissueMap, y0: int, x0: int, inv: float
    ) -> tuple[dict[str, Any], np.ndarray | None]:
        """The tile's row of the tile table, and its pixels unless it is glass (never read)."""
        p, s = self.predictor, self.predictor.input_size
        tf = tissue.tile_fraction(y0, x0)
        row: dict[str, Any] = {
            "y0": int(round(y0 * inv)),
            "x0": int(round(x0 * inv)),
            "size": int(round(s * inv)),
            "tissue_fraction": tf,
        }
        if tf < p.min_tissue_fraction:
            row.update(status="no_tissue", prediction=None)
            return row, None
        tile_img = source.read(y0, x0, s, s)
        foc = focus_measure(tile_img, tissue.tile_mask(y0, x0))
        row["focus"] = foc
        row["status"] = (
            "out_of_focus" if p.focus_threshold is not None and foc < p.focus_threshold else "ok"
        )
        return row, tile_img

    def flush(self) -> None:
        """Run the queued tiles through the network and stitch their deposit maps."""
        if not self._todo:
            return
        todo, self._todo = self._todo, []
        self.run_batch(todo, self.preprocess(todo))

    def preprocess(self, todo: list[tuple[dict[str, Any], int, int, np.ndarray]]) -> np.ndarray:
        """The network's input batch for queued tiles (``Preprocessing.apply`` each)."""
        return np.stack([self.predictor.preprocessing.apply(t[3])[0] for t in todo])

    def run_batch(
        self, todo: list[tuple[dict[str, Any], int, int, np.ndarray]], batch: np.ndarray | None
    ) -> None:
        """Tiles and their prepared batch through the network; their maps into the stitcher."""
        if not todo:
            return
        p = self.predictor
        cls_l, stain_l, dep_l = p.infer(batch, p.region_tta)
        probs = p.calibrated(cls_l, p.region_tta)
        stain_p = softmax(np.asarray(stain_l, np.float32), axis=-1)
        dep = softmax(np.asarray(dep_l, np.float32), axis=1).transpose(0, 2, 3, 1)
        for j, (row, y, x, _) in enumerate(todo):
            tile_map = np.ascontiguousarray(dep[j])
            self.stitcher.add(y, x, tile_map)
            self._record(row, probs[j], stain_p[j], tile_map, y, x)

    def _record(
        self,
        row: dict[str, Any],
        p: np.ndarray,
        stain: np.ndarray,
        tile_map: np.ndarray,
        y: int,
        x: int,
    ) -> None:
        """One tile's calls into its row of the tile table and the region's tallies."""
        pr = self.predictor
        top = int(p.argmax())
        row["prediction"] = (
            pr.class_names[top] if p[top] >= pr.indeterminate_threshold else INDETERMINATE
        )
        for k, c in enumerate(pr.class_names):
            row[f"p_{c}"] = float(p[k])
        si = int(stain.argmax())
        row["stain"] = pr.stain_names[si]
        row["p_stain"] = float(stain[si])
        s, (hw, ww) = pr.input_size, self.shape
        lab = tile_map[: min(s, hw - y), : min(s, ww - x)].argmax(-1)
        counts = label_histogram(lab.astype(np.uint8), self.depth)
        for k, name in enumerate(pr.deposit_labels[1:], start=1):
            row[f"tile_px_{name}"] = int(counts[k])
        self.seen_boxes.append((row["y0"], row["x0"], row["size"]))
        self.seen_probs.append(p)
        self.seen_in_focus.append(row["status"] == "ok")
        if row["status"] == "ok":
            self._weights.append(row["tissue_fraction"])
            self._probs.append(p)
            self._stains.append(stain)

    def _mean(self, values: list[np.ndarray]) -> np.ndarray | None:
        """Tissue-weighted mean over the in-focus tiles (None without any)."""
        if not self._weights:
            return None
        w = np.asarray(self._weights, np.float64)
        w = w / w.sum() if w.sum() > 0 else np.full_like(w, 1.0 / len(w))
        return (np.asarray(values) * w[:, None]).sum(0)

    def tile_mean(self) -> np.ndarray | None:
        """Tissue-weighted mean class probabilities of the in-focus tiles."""
        return self._mean(self._probs)

    def stain_mean(self) -> np.ndarray | None:
        """Tissue-weighted mean stain probabilities of the in-focus tiles."""
        return self._mean(self._stains)

    def seen_array(self) -> np.ndarray:
        """The tiles the network saw so far, ``(n, 3)`` int64 rows of (y0, x0, size)."""
        return np.asarray(self.seen_boxes, np.int64).reshape(-1, 3)

    def seen_arrays(self) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """Boxes, ``(n, C)`` class probabilities and in-focus flags of the tiles seen."""
        probs = np.asarray(self.seen_probs, np.float64)
        probs = probs.reshape(len(self.seen_boxes), len(self.predictor.class_names))
        return self.seen_array(), probs, self.seen_in_focus

    def count(self, *statuses: str) -> int:
        return sum(1 for t in self.tiles if t.get("status") in statuses)
