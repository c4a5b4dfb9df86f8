"""Region prediction: an image much larger than the network input, tile -> stitch -> lesions.

The path of one region (an image in memory, or a slide region read band by
band straight from the file):

1. :func:`predict_slide` opens the slide, picks the level and reads the
   region through a pixel source (``slide.SlideRegionSource``); an image in
   memory is an ``ArraySource``. :func:`predict_source` puts the source at the
   model's microns per pixel (``tiling.ResampledSource``, a band at a time).
2. :class:`TissueMap`: tissue is found once, on a thumbnail, so each tile's
   tissue fraction and mask cost nothing; glass tiles never reach the network.
3. :class:`TileRun`: the tiles of ``tiling.tile_grid`` are read in row-major
   order, checked for focus, preprocessed as every patch is
   (``Preprocessing.apply``) and run in batches; each tile's deposit
   probabilities go into the ``tiling.Stitcher``, which blends them into one
   label map a band of rows at a time.
4. The stitched map's deposits become lesions (``lesions.find_lesions``) and
   the region is called by them (``lesions.region_call``); the
   tissue-weighted mean of the tile probabilities stays in
   ``region["tile_mean_probabilities"]``.

Test-time augmentation for tiles is the predictor's ``region_tta``: one pass
unless asked for (``--tta d4``), since eight passes per tile make a large
region eight times slower.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from . import bigmap
from .bigmap import StreamedMaps
from .lesions import region_call, to_frame
from .prefetch import run_tiles_prefetched
from .result import PatchResult
from .slide import SlideRegionSource, open_slide
from .tilerun import TileRun
from .tiling import PixelSource, ResampledSource
from .tissue import outside_section, tissue_mask

if TYPE_CHECKING:
    from .predictor import Predictor

__all__ = [
    "TISSUE_THUMB_SIDE",
    "TileRun",
    "TissueMap",
    "predict_region",
    "predict_slide",
    "predict_source",
]

log = logging.getLogger(__name__)

#: Region tissue detection runs on a thumbnail whose longer side is at most this.
TISSUE_THUMB_SIDE = 2048
#: Read a region's tiles in a thread while the network runs (``prefetch``).
PREFETCH = True


# --------------------------------------------------------------------------- entry points


def predict_slide(
    predictor: Predictor,
    path: str | os.PathLike[str],
    *,
    level: int | None = None,
    region: tuple[int, int, int, int] | None = None,
    mpp: float | None = None,
    wrap_source: Callable[[PixelSource], PixelSource] | None = None,
) -> PatchResult:
    """Predict one region of a slide (default: all of it) without reading it whole.

    ``region`` is ``(x, y, w, h)`` in level-0 pixels (QuPath's frame);
    ``level`` defaults to ``Slide.best_level`` for the model's mpp; ``mpp`` is
    level 0's microns per pixel (default: the slide's). The result's label map
    is at the read level's resolution over the region; ``result.slide``
    records the level, the region and how to map label-map pixels to slide
    coordinates (``origin`` + pixel x ``downsample``), which the GeoJSON
    writer and ``slide.region_thumbnail`` use; the lesions' ``centroid``,
    ``bbox`` and ``area_px`` are converted to level-0 pixels of the same frame
    (``area_um2`` needs no conversion). ``wrap_source`` wraps the region's
    pixel source for the network's reads (``calcinosis serve`` reports progress
    and cancels through it); the pixels must pass through unchanged.
    """
    with open_slide(path) as slide:
        mpp0, mpp_source = _slide_mpp(slide, mpp, predictor.model_mpp)
        if level is None:
            lvl = slide.best_level(predictor.model_mpp, mpp0) if predictor.model_mpp else 0
        else:
            lvl = slide.check_level(level)
        x, y, w, h = slide.check_region(region)
        lx, ly, lw, lh = slide.level_window(lvl, (x, y, w, h))
        ds = slide.level_downsamples[lvl]
        source = SlideRegionSource(slide, lvl, lx, ly, lw, lh)
        level_mpp = None if mpp0 is None else mpp0 * ds
        read_from = source if wrap_source is None else wrap_source(source)
        res = predict_source(predictor, read_from, mpp=level_mpp, name=str(path))
        ox, oy = slide.level_origin(lvl, lx, ly)
        res.slide = {
            **slide.describe(),
            "level": lvl,
            "level_auto": level is None,
            "level_downsample": ds,
            "mpp_source": mpp_source,
            "mpp_level0": mpp0,
            "region": [x, y, w, h],
            "level_region": [lx, ly, lw, lh],
            "origin": [ox, oy],
            "max_read_px": source.max_read_px,
        }
    _to_slide_frame(res, (ox, oy), ds)
    res.path = str(path)
    return res


def predict_source(
    predictor: Predictor, source: PixelSource, mpp: float | None = None, name: str | None = None
) -> PatchResult:
    """Predict an image served by a pixel source (``tiling.PixelSource``), such as a slide region.

    A source that is small at the model's mpp is read whole and predicted
    like an array; a larger one is tiled straight from the source,
    resampled a band at a time when its mpp differs from the model's, so
    it is never held whole.
    """
    h0, w0 = source.shape[:2]
    _, factor, _ = predictor.resolution(mpp)
    nh, nw = max(1, round(h0 * factor)), max(1, round(w0 * factor))
    if not predictor.is_region((nh, nw)):
        return predictor.predict_batch([source.read(0, 0, h0, w0)], mpp=[mpp], names=[name])[0]
    base = predictor.result_template(name, (h0, w0), mpp)
    base.mode = "region"
    src = source if factor == 1.0 else ResampledSource(source, factor)
    return predict_region(predictor, src, base, factor)


def predict_region(
    predictor: Predictor, source: PixelSource, result: PatchResult, factor: float
) -> PatchResult:
    """Tile, run, stitch, find the lesions and call a region; fills and returns ``result``.

    ``source`` serves the region at the model's mpp; ``factor`` is that scale
    over the region's own (``result`` holds its size), so tiles, maps and
    lesions are reported in the region's own pixels. Tiles beyond the image
    read as white glass, as if padded.
    """
    tissue = TissueMap(source, predictor.input_size)
    maps = _streamed_maps(predictor, source, tissue, result)
    run = TileRun(predictor, source.shape[:2], sink=maps)
    if maps is not None:
        maps.tiles = run.seen_array
    run_tiles(run, source, tissue, 1.0 / factor, result.path)
    result.tiles = run.tiles
    result.tissue_fraction = tissue.fraction
    tile_mean = run.tile_mean()
    if tile_mean is not None:
        result.set_stain(run.stain_mean(), predictor.stain_names)
    if maps is None:
        _whole_map_lesions(predictor, run, tissue, result, factor, tile_mean)
    else:
        _streamed_lesions(predictor, run, maps, result, tile_mean)
    call = _call(predictor, result, run, tile_mean)
    result.region = _summary(predictor, result, run, tile_mean, call, 1.0 / factor)
    return result


def run_tiles(
    run: TileRun,
    source: PixelSource,
    tissue: TissueMap,
    inv: float,
    name: str | None = None,
    prefetch: bool | None = None,
) -> None:
    """Every tile of the grid in order, read in a thread (``prefetch``) or in turn.

    Both give the same tiles, batches and results; the thread lets reading and
    resampling overlap the network. ``prefetch`` defaults to :data:`PREFETCH`.
    """
    if PREFETCH if prefetch is None else prefetch:
        run_tiles_prefetched(run, source, tissue, inv, name)
        return
    for y0, x0 in run.grid:
        run.visit(source, tissue, y0, x0, inv)
    run.flush()


def _streamed_maps(
    predictor: Predictor, source: PixelSource, tissue: TissueMap, result: PatchResult
) -> StreamedMaps | None:
    """A :class:`bigmap.StreamedMaps` for a region above ``bigmap.STREAM_MIN_PX``, else None."""
    h, w = source.shape[:2]
    if max(h * w, result.height * result.width) <= bigmap.STREAM_MIN_PX:
        return None
    return StreamedMaps(
        (h, w),
        (result.height, result.width),
        len(predictor.deposit_labels),
        outside_section(tissue.mask),
        result.mpp,
        lambda: np.zeros((0, 3), np.int64),
    )


def _whole_map_lesions(
    predictor: Predictor,
    run: TileRun,
    tissue: TissueMap,
    result: PatchResult,
    factor: float,
    tile_mean: np.ndarray | None,
) -> None:
    """Label map in memory, its areas and lesions (``lesions.find_lesions``): regions up to
    ``bigmap.STREAM_MIN_PX`` pixels."""
    label_map, deposit_prob = _finish_maps(run, tissue, result, factor)
    result.label_map = label_map
    result.set_deposit_areas(label_map, predictor.deposit_labels)
    boxes, probs, focus = run.seen_arrays()
    found = predictor.find_lesions(
        result, label_map, boxes, probs, focus, deposit_prob=deposit_prob, fallback=tile_mean
    )
    result.lesions, result.lesion_components = found.lesions, found.components


def _streamed_lesions(
    predictor: Predictor,
    run: TileRun,
    maps: StreamedMaps,
    result: PatchResult,
    tile_mean: np.ndarray | None,
) -> None:
    """The streamed map's file, areas and band-wise lesions (``streamlesions.BandLesions``)."""
    run.stitcher.finish()
    file = maps.finish()
    result.label_file = file
    result.set_deposit_counts(maps.counts, predictor.deposit_labels)
    _, probs, focus = run.seen_arrays()
    found, seeds = maps.lesions.finish(
        mpp=result.mpp,
        class_names=predictor.class_names,
        deposit_labels=predictor.deposit_labels,
        tile_probs=probs,
        tile_in_focus=focus,
        min_area_um2=predictor.min_lesion_area_um2,
        lesion_threshold=predictor.lesion_threshold,
        fallback_probs=tile_mean,
    )
    result.lesions, result.lesion_components = found.lesions, None
    file.outlines = [
        (tuple(int(v) for v in les["bbox"]), seed)  # type: ignore[misc]
        for les, seed in zip(found.lesions, seeds, strict=True)
    ]


# --------------------------------------------------------------------------- steps


class TissueMap:
    """A region's tissue, found once on a thumbnail: the whole's fraction, each tile's, its mask.

    The thumbnail's longer side is at most :data:`TISSUE_THUMB_SIDE`, so
    memory and time stay bounded on big regions; an integral image of the mask
    gives any tile's tissue fraction in O(1).
    """

    def __init__(self, source: PixelSource, tile: int) -> None:
        hw, ww = source.shape[:2]
        self.shape, self.tile = (hw, ww), tile
        self.ds = max(1, int(np.ceil(max(hw, ww) / TISSUE_THUMB_SIDE)))
        if self.ds == 1:
            thumb = source.read(0, 0, hw, ww)
        else:
            thumb = source.thumbnail(max(1, ww // self.ds), max(1, hw // self.ds))
        self.mask = tissue_mask(thumb)
        del thumb
        self.fraction = float(self.mask.mean())
        self._integral = cv2.integral(self.mask.astype(np.uint8))
        th, tw = self.mask.shape
        self._sy, self._sx = th / hw, tw / ww

    def tile_fraction(self, y0: int, x0: int) -> float:
        """Share of tissue in the tile at ``(y0, x0)``."""
        s, (hw, ww), (th, tw) = self.tile, self.shape, self.mask.shape
        sy, sx = self._sy, self._sx
        ya = int(y0 * sy)
        yb = max(ya + 1, min(th, int(np.ceil(min(y0 + s, hw) * sy))))
        xa = int(x0 * sx)
        xb = max(xa + 1, min(tw, int(np.ceil(min(x0 + s, ww) * sx))))
        ya, xa = min(ya, th - 1), min(xa, tw - 1)
        integ = self._integral
        tot = integ[yb, xb] - integ[ya, xb] - integ[yb, xa] + integ[ya, xa]
        return float(tot) / max(1, (yb - ya) * (xb - xa))

    def tile_mask(self, y0: int, x0: int) -> np.ndarray:
        """The tile's tissue mask, from the thumbnail (cheaper than recomputing it)."""
        s, mask = self.tile, self.mask
        if self.ds == 1:
            m = np.zeros((s, s), bool)
            part = mask[y0 : y0 + s, x0 : x0 + s]
            m[: part.shape[0], : part.shape[1]] = part
            return m
        ya, xa = int(y0 * self._sy), int(x0 * self._sx)
        yb = max(ya + 1, int(np.ceil((y0 + s) * self._sy)))
        xb = max(xa + 1, int(np.ceil((x0 + s) * self._sx)))
        part = np.zeros((yb - ya, xb - xa), np.uint8)
        sub = mask[ya:yb, xa:xb]
        part[: sub.shape[0], : sub.shape[1]] = sub
        return cv2.resize(part, (s, s), interpolation=cv2.INTER_NEAREST).astype(bool)


def _finish_maps(
    run: TileRun, tissue: TissueMap, result: PatchResult, factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """The stitched label map and deposit probability, cleared off the section, at region size.

    No deposit lies on the bare glass around the section: the network's calls
    there (pale, structureless, like unstained amyloid) are cleared. Pale
    deposits inside the section are enclosed by tissue and kept.
    """
    label_map = run.stitcher.finish()
    _clear_where(label_map, outside_section(tissue.mask))
    dep_prob = run.deposit_prob
    if factor != 1.0:
        size = (result.width, result.height)
        label_map = cv2.resize(label_map, size, interpolation=cv2.INTER_NEAREST)
        dep_prob = cv2.resize(dep_prob, size, interpolation=cv2.INTER_NEAREST)
    return label_map, dep_prob


def _call(
    predictor: Predictor, res: PatchResult, run: TileRun, tile_mean: np.ndarray | None
) -> dict[str, Any]:
    """The region's prediction and status from its lesions (``lesions.region_call``)."""
    if tile_mean is not None:
        call = region_call(
            res.lesions,
            dict(zip(predictor.class_names, map(float, tile_mean), strict=True)),
            predictor.class_names,
            indeterminate_threshold=predictor.indeterminate_threshold,
        )
        res.probabilities = call["probabilities"]
        res.prediction, res.status, res.reason = call["prediction"], call["status"], call["reason"]
        return call
    n_tissue = run.count("ok", "out_of_focus")
    if n_tissue:
        res.status = "out_of_focus"
        res.reason = f"all {n_tissue} tissue tiles are out of focus"
        res.prediction = None
    else:
        res.status = "no_tissue"
        res.reason = (
            f"no tile has at least {predictor.min_tissue_fraction:.0%} tissue: "
            "blank glass or background"
        )
    return {}


def _summary(
    predictor: Predictor,
    res: PatchResult,
    run: TileRun,
    tile_mean: np.ndarray | None,
    call: dict[str, Any],
    inv: float,
) -> dict[str, Any]:
    """``result.region``: tiles, tissue, burden, votes, the call's basis and the settings used."""
    tissue_px = res.tissue_fraction * res.height * res.width
    area_um = (res.mpp or 0.0) ** 2
    votes: dict[str, int] = {}
    for t in run.tiles:
        if t.get("status") == "ok":
            votes[t["prediction"]] = votes.get(t["prediction"], 0) + 1
    names = predictor.class_names
    return {
        "tiles": len(run.tiles),
        "tissue_tiles": run.count("ok", "out_of_focus"),
        "out_of_focus_tiles": run.count("out_of_focus"),
        "tile_size_px": int(round(predictor.input_size * inv)),
        "tile_overlap_px": int(round(predictor.tile_overlap * inv)),
        "tissue_area_px": float(tissue_px),
        "tissue_area_um2": float(tissue_px * area_um) if res.mpp else None,
        "deposit_burden": {
            k: (float(v) / tissue_px if tissue_px > 0 else 0.0)
            for k, v in res.deposit_area_px.items()
        },
        "tile_votes": votes,
        # The mean the region used to be called by, for reference.
        "tile_mean_probabilities": (
            None
            if tile_mean is None
            else {c: float(p) for c, p in zip(names, tile_mean, strict=True)}
        ),
        "call_basis": call.get("basis"),
        "lesion_class": call.get("lesion_class"),
        "also_present": call.get("also_present", []),
        "classes_present": call.get("classes_present", []),
        "lesions_found": len(res.lesions or []),
        "lesions_passed": sum(1 for les in res.lesions or [] if les["passed"]),
        "lesion_threshold": predictor.lesion_threshold,
        "min_lesion_area_um2": predictor.min_lesion_area_um2,
        # Test-time augmentation of the tiles (see Predictor.describe_tta).
        "tta": predictor.region_tta,
    }


def _clear_where(label_map: np.ndarray, coarse: np.ndarray, band_rows: int = 1024) -> None:
    """Set ``label_map`` to 0 where the coarse boolean mask (nearest-neighbour
    scaled to its size) is True; row band by band, no full-size temporary."""
    if not coarse.any():
        return
    h, w = label_map.shape
    th, tw = coarse.shape
    cols = np.minimum(np.arange(w) * tw // w, tw - 1)
    for y0 in range(0, h, band_rows):
        y1 = min(h, y0 + band_rows)
        rows = np.minimum(np.arange(y0, y1) * th // h, th - 1)
        label_map[y0:y1][coarse[rows[:, None], cols[None, :]]] = 0


# --------------------------------------------------------------------------- slides


def _slide_mpp(slide: Any, mpp: float | None, model_mpp: float | None) -> tuple[float | None, str]:
    """Level 0's microns per pixel and where they came from: given, the slide's, or assumed."""
    if mpp is not None:
        return float(mpp), "given"
    if slide.mpp is not None:
        return slide.mpp, "slide"
    log.warning(
        "%s: %s; assuming the model's %s um/px (pass --mpp to set level 0's)",
        slide.path,
        slide.mpp_note,
        model_mpp,
    )
    return None, "assumed"


def _to_slide_frame(res: PatchResult, origin: tuple[float, float], ds: float) -> None:
    """Tiles and lesions of a slide region in level-0 pixels of QuPath's frame (areas too)."""
    ox, oy = origin
    for t in res.tiles or []:
        t["slide_x0"] = round(ox + t["x0"] * ds, 1)
        t["slide_y0"] = round(oy + t["y0"] * ds, 1)
        t["slide_size"] = round(t["size"] * ds, 1)
    if res.lesions:
        to_frame(res.lesions, (ox, oy), ds)
        for g in (res.region or {}).get("classes_present") or []:
            g["area_px"] = float(g["area_px"]) * ds * ds
