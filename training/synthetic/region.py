"""Rendering a region plan: tiles cut out of one section, cross-faded into one image.

Neighbouring tiles are rendered with a margin and cross-faded, and each pixel
keeps the label of its own tile. Every tile's job carries what it needs (its
class, seed and :class:`.region_plan.TileWindow`); what all tiles share (the
stain, the lab's staining and scanner) travels with the task function, so a
worker process holds no state of its own.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from calcinosis.model.errors import ConfigError, DataError
from calcinosis.model.fileio import atomic_path
from calcinosis.model.labels import CLASS_NAMES, DEPOSIT_LABELS, STAIN_NAMES

from .contract import GENERATOR_VERSION, NOMINAL_MPP
from .optics import lab_settings, style_settings
from .patches import patch_seed
from .region_plan import GLASS, REGION_FEATHER, RegionPlan, TileWindow, plan_region
from .scene import TileContext, smoothstep
from .style_a import render_scene
from .workers import map_in_workers


@dataclass(frozen=True)
class _RegionRun:
    """What every tile of one :func:`render_plan` call shares (small: it goes with each task)."""

    stain: str
    si: int
    shift: float
    mpp: float
    lab: dict  # one staining run and one scanner for the whole region
    margin: int  # px of each tile's feathered band on each side


@dataclass
class _TileJob:
    label: str  # the class drawn in the tile ("normal" for a bare-glass tile)
    seed: int
    window: TileWindow


def _tile_context(win: TileWindow, run: _RegionRun) -> TileContext:
    """Cut a tile, with its feather margin, out of the region's layers and fields."""
    lay, mpp, n, lab = win.layers, run.mpp, win.n, run.lab
    xs, ys = np.arange(win.x0, win.x0 + n), np.arange(win.y0, win.y0 + n)
    vertical = ys[:, None] - win.top[None, :]
    depth = vertical * (win.top_cos * mpp)[None, :]
    depth = (depth + lay["wobble"] * win.field("wobble")).astype(np.float32)
    deep = depth + lay["lobes"] * win.field("lobes") + lay["deep"] * win.field("deep")
    outside = np.zeros((n, n), bool)
    if win.bottom is not None:
        outside |= ys[:, None] > win.bottom[None, :]
    if win.side == "right":
        outside |= xs[None, :] > win.edge[:, None]
    elif win.side == "left":
        outside |= xs[None, :] < win.edge[:, None]
    thick = lab["thickness"] * (1 + 0.07 * win.field("thick"))
    light = lab["background"] * (1 + 0.006 * win.field("light"))
    return TileContext(
        depth=depth,
        depth_deep=deep.astype(np.float32),
        outside=outside,
        theta=math.atan2(1.0, -float(win.top_slope[n // 2])),
        keratin=lay["keratin"],
        epidermis=lay["epidermis"],
        papillary=lay["papillary"],
        subcutis=lay["subcutis"],
        lab=lab,
        thickness=thick.astype(np.float32),
        light=light.astype(np.float32),
        collagen=np.clip(0.8 + 0.1 * win.field("collagen"), 0.55, 1.05),
        septa=smoothstep(lay["septa"] - np.abs(win.field("septa")), 0, 0.02),
        margin=run.margin,
    )


def _render_tile(run: _RegionRun, job: _TileJob) -> tuple[np.ndarray, np.ndarray]:
    """One tile of the region, feather margin included: (RGB, labels)."""
    ctx = _tile_context(job.window, run)
    ci = CLASS_NAMES.index(job.label)
    n = job.window.n
    return render_scene(job.label, run.stain, ci, run.si, job.seed, n, run.shift, run.mpp, ctx)


def _tile_jobs(plan: RegionPlan, m: int) -> Iterator[_TileJob]:
    """Every tile's job, row by row."""
    n = plan.tile + 2 * m
    for r in range(plan.rows):
        for c in range(plan.cols):
            label = plan.grid[r][c]
            window = plan.geometry.window(c * plan.tile - m, r * plan.tile - m, n)
            seed = patch_seed(plan.seed, r * plan.cols + c)
            yield _TileJob("normal" if label == GLASS else label, seed, window)


def _feather(n: int, m: int, first: bool, last: bool) -> np.ndarray:
    """Weights along one axis of a tile with margin ``m``: ramps where neighbours overlap.

    Rising and falling ramps are mirror images of a smoothstep, so a pixel's
    weights from the two tiles that cover it always add up to one.
    """
    w = np.ones(n, np.float32)
    t = (np.arange(2 * m, dtype=np.float32) + 0.5) / (2 * m)
    ramp = t * t * (3 - 2 * t)
    if not first:
        w[: 2 * m] = ramp
    if not last:
        w[n - 2 * m :] = ramp[::-1]
    return w


class _Mosaic:
    """Cross-fades a region's tiles, given row by row, into the RGB image and label map.

    Only one row of tiles is held as floats at a time, so memory stays close to
    the output's size.
    """

    def __init__(self, plan: RegionPlan, m: int) -> None:
        self.plan, self.m, self.n = plan, m, plan.tile + 2 * m
        self.rgb = np.empty((plan.height, plan.width, 3), np.uint8)
        self.labels = np.empty((plan.height, plan.width), np.uint8)
        # one row of tiles: region rows [y0 - m, y0 + tile + m), columns from -m
        self.acc = np.zeros((self.n, plan.cols * plan.tile + 2 * m, 3), np.float32)

    def _flush(self, rows_acc: np.ndarray, y_first: int) -> None:
        height, width, m = self.plan.height, self.plan.width, self.m
        y0, y1 = max(y_first, 0), min(y_first + len(rows_acc), height)
        if y1 > y0:
            part = rows_acc[y0 - y_first : y1 - y_first, m : m + width]
            np.clip(part + 0.5, 0, 255, out=part)
            self.rgb[y0:y1] = part

    def add(self, r: int, c: int, img: np.ndarray, lab_map: np.ndarray) -> None:
        plan, m, n, acc = self.plan, self.m, self.n, self.acc
        tile = plan.tile
        wy = _feather(n, m, r == 0, r == plan.rows - 1)
        wx = _feather(n, m, c == 0, c == plan.cols - 1)
        acc[:, c * tile : c * tile + n] += img * (wy[:, None] * wx[None, :])[:, :, None]
        y0, x0 = r * tile, c * tile
        h, w = min(tile, plan.height - y0), min(tile, plan.width - x0)
        self.labels[y0 : y0 + h, x0 : x0 + w] = lab_map[m : m + h, m : m + w]
        if c == plan.cols - 1:  # row of tiles done: its upper part is final
            self._flush(acc[:tile], y0 - m)
            acc[: 2 * m] = acc[tile:]
            acc[2 * m :] = 0

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        self._flush(self.acc[: 2 * self.m], self.plan.rows * self.plan.tile - self.m)
        return self.rgb, self.labels


def render_plan(
    plan: RegionPlan, stain: str = "he", shift: float = 0.0, *, workers: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Render a :class:`RegionPlan` in one stain: (RGB uint8 HxWx3, labels uint8 HxW).

    Tiles are rendered with a margin and cross-faded with their neighbours
    over :data:`REGION_FEATHER` px; each pixel's label comes from the tile
    whose weight dominates there (the tile's own cell). Only one row of tiles
    is held as floats at a time, so memory stays close to the output's size.
    """
    if stain not in STAIN_NAMES:
        raise ConfigError(f"unknown stain {stain!r}; choose one of {', '.join(STAIN_NAMES)}")
    if shift < 0:
        raise ConfigError(f"shift must be >= 0, got {shift}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0 (0 = all cores), got {workers}")
    si = STAIN_NAMES.index(stain)
    # one staining run and one scanner for the whole region
    lab_rng = np.random.default_rng([plan.seed & 0xFFFFFFFF, si, 0x5EC7, 2])
    style = style_settings(np.random.default_rng([plan.seed & 0xFFFFFFFF, si, 0x57E]))
    lab = dict(lab_settings(lab_rng, float(shift), style), style=style)
    m = REGION_FEATHER // 2
    run = _RegionRun(stain, si, float(shift), plan.mpp, lab, m)
    cells = [(r, c) for r in range(plan.rows) for c in range(plan.cols)]
    workers = min(workers or os.cpu_count() or 1, max(1, len(cells) // 8))
    tiles = map_in_workers(
        functools.partial(_render_tile, run),
        _tile_jobs(plan, m),
        workers,
        chunksize=max(1, plan.cols // 4),
    )
    mosaic = _Mosaic(plan, m)
    for (r, c), (img, lab_map) in zip(cells, tiles, strict=True):
        mosaic.add(r, c, img, lab_map)
    return mosaic.finish()


def render_region(
    width: int,
    height: int,
    seed: int = 0,
    stain: str = "he",
    shift: float = 0.0,
    tile: int = 256,
    mpp: float = NOMINAL_MPP,
    classes: Sequence[str] | None = None,
    *,
    workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A large synthetic region, like one exported from a slide: (RGB uint8, labels uint8).

    A mosaic of generator tiles (``tile`` px) over one section: skin surface,
    dermis and subcutis run on from tile to tile, mostly normal tissue with
    small lesions of the deposit ``classes`` (default: all four), and bare
    glass above the surface and beyond the section's cut edges (label 0).
    Deterministic in its arguments, whatever ``workers``; see
    :func:`plan_region` for the layout and :func:`render_plan` for rendering.
    """
    plan = plan_region(width, height, seed, tile, mpp, classes)
    return render_plan(plan, stain, shift, workers=workers)


def region_metadata(plan: RegionPlan, stain: str, shift: float) -> dict:
    """What a region's JSON side-car records: enough to regenerate it and to score on it."""
    return {
        "generator_version": GENERATOR_VERSION,
        "width": plan.width,
        "height": plan.height,
        "mpp": plan.mpp,
        "stain": stain,
        "seed": plan.seed,
        "shift": float(shift),
        "tile": plan.tile,
        "rows": plan.rows,
        "cols": plan.cols,
        "deposit_classes": list(plan.classes),
        "tile_classes": plan.grid,
        "tile_tissue_fraction": [[round(float(v), 3) for v in row] for row in plan.tissue],
        "label_values": {name: i for i, name in enumerate(DEPOSIT_LABELS)},
    }


def region_json(meta: dict) -> str:
    """JSON with one line per key, and one line per row for the tile grids (readable at 32 x 32)."""
    parts = []
    for key, value in meta.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            rows = ",\n".join(f"    {json.dumps(row)}" for row in value)
            parts.append(f"  {json.dumps(key)}: [\n{rows}\n  ]")
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_region_png(path: Path, image: np.ndarray) -> None:
    """Write a large region (RGB or labels) as PNG, atomically, without a second copy in memory.

    RGB pixels are swapped to OpenCV's BGR order in place, a band of rows at
    a time (the array is spent afterwards; ``cv2.cvtColor`` would clone the
    whole image first), and libpng streams the rows to disk, where a PIL
    image would hold another 4 bytes per pixel.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.ndim == 3:
        for y in range(0, image.shape[0], 256):
            band = image[y : y + 256]
            band[...] = band[..., ::-1]
    with atomic_path(path, suffix=".tmp.png") as tmp:  # OpenCV picks the encoder by suffix
        if not cv2.imwrite(str(tmp), image, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise DataError(
                f"could not write {path} (OpenCV imwrite failed; is the folder writable?)"
            )
