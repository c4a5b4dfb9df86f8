"""A region's plan: the section's outline and layers, and the class drawn in every tile.

Regions (:func:`.region.render_region`) stand in for an area exported from a
slide, for tiling, tissue detection and speed tests: a grid of tiles drawn by
the patch code, but cut out of one section. The skin surface, the layer
depths, collagen density, fat septa, section thickness and lighting are
shared across the region (:class:`_Geometry`), so layers run on from tile to
tile; the section's outline leaves bare glass above the surface and beyond
its cut edges; a few tiles hold a nodule of a deposit class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from calcinosis.model.errors import ConfigError
from calcinosis.model.labels import CLASS_NAMES

from .contract import NOMINAL_MPP

#: Classes whose deposits a region scatters by default (normal tissue fills the rest).
DEPOSIT_CLASSES: tuple[str, ...] = tuple(c for c in CLASS_NAMES if c != "normal")
#: Name in a region's tile grid of a tile with no tissue at all.
GLASS = "glass"
#: Width (px) of the band over which neighbouring region tiles are cross-faded.
REGION_FEATHER = 16
#: Smallest region side and largest region area accepted by render_region.
REGION_MIN_SIDE = 64
REGION_MAX_PIXELS = 16384 * 16384
# coarse sampling step (px) of the region's smooth 2-D fields
_FIELD_STEP = 8


@dataclass
class _Geometry:
    """The section's outline and layers, sampled so any tile can be cut out of it."""

    pad: int  # the 1-D and 2-D fields start at pixel -pad
    top: np.ndarray  # y (px) of the skin surface for every x
    top_cos: np.ndarray  # vertical -> perpendicular depth factor (surface slope)
    top_slope: np.ndarray
    bottom: np.ndarray | None  # y (px) of the deep cut edge for every x (glass below)
    side: str | None  # "left" / "right": which end of the section is in view
    edge: np.ndarray | None  # x (px) of that end for every y
    fields: dict[str, np.ndarray]  # smooth unit-variance fields on a _FIELD_STEP grid
    layers: dict[str, float]  # keratin, epidermis, papillary, subcutis, wobble amplitudes (um)

    def window(self, x0: int, y0: int, n: int) -> TileWindow:
        """What the n x n tile whose top-left region pixel is (x0, y0) reads of the geometry.

        A few kilobytes, where the whole geometry of a large region is a few hundred
        megabytes: each tile's job carries its own window to the worker processes.
        """
        s = _FIELD_STEP
        cols = slice(x0 + self.pad, x0 + self.pad + n)
        rows = slice(y0 + self.pad, y0 + self.pad + n)
        # field samples under the tile, with a margin for the linear interpolation
        fx, fy = max(0, (x0 + self.pad) // s - 1), max(0, (y0 + self.pad) // s - 1)
        fx1, fy1 = -(-(x0 + self.pad + n) // s) + 2, -(-(y0 + self.pad + n) // s) + 2
        return TileWindow(
            x0=x0,
            y0=y0,
            n=n,
            top=self.top[cols],
            top_cos=self.top_cos[cols],
            top_slope=self.top_slope[cols],
            bottom=None if self.bottom is None else self.bottom[cols],
            side=self.side,
            edge=None if self.edge is None else self.edge[rows],
            fields={k: np.ascontiguousarray(v[fy:fy1, fx:fx1]) for k, v in self.fields.items()},
            field_origin=((x0 + self.pad) / s - fx, (y0 + self.pad) / s - fy),
            layers=self.layers,
        )


@dataclass
class TileWindow:
    """The part of a region's :class:`_Geometry` under one tile (see ``_Geometry.window``).

    The 1-D arrays run over the tile's columns (``edge``: its rows); ``fields``
    are crops of the region's fields, ``field_origin`` the crop coordinate of
    the tile's top-left pixel.
    """

    x0: int
    y0: int
    n: int
    top: np.ndarray
    top_cos: np.ndarray
    top_slope: np.ndarray
    bottom: np.ndarray | None
    side: str | None
    edge: np.ndarray | None
    fields: dict[str, np.ndarray]
    field_origin: tuple[float, float]
    layers: dict[str, float]

    def field(self, name: str) -> np.ndarray:
        """The tile's n x n samples of smooth region field ``name`` (bilinear)."""
        s = _FIELD_STEP
        fx, fy = self.field_origin
        m = np.float64([[1 / s, 0, fx], [0, 1 / s, fy]])
        return cv2.warpAffine(
            self.fields[name],
            m,
            (self.n, self.n),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )


@dataclass
class RegionPlan:
    """What a synthetic region holds: its outline and the class drawn in every tile.

    ``grid[r][c]`` is the class rendered in tile (r, c) (``normal`` or a
    deposit class) or ``"glass"`` where the tile holds no tissue; ``tissue``
    is each tile's approximate tissue fraction. Rendering follows the plan, so
    one plan serves all three stains (serial sections of the same block).
    """

    width: int
    height: int
    seed: int
    tile: int
    mpp: float
    classes: tuple[str, ...]
    grid: list[list[str]]
    tissue: np.ndarray
    geometry: _Geometry = dataclasses.field(repr=False)

    @property
    def rows(self) -> int:
        return len(self.grid)

    @property
    def cols(self) -> int:
        return len(self.grid[0])


def _smooth_1d(rng: np.random.Generator, length: int, scale: float) -> np.ndarray:
    """Smooth unit-variance noise of ``length`` samples, correlation length ~``scale``."""
    scale = max(float(scale), 1.0)
    k = int(length / scale) + 5
    knots = rng.standard_normal((1, k)).astype(np.float32)
    up = cv2.resize(knots, (int(k * scale), 1), interpolation=cv2.INTER_CUBIC)[0]
    off = int(1.5 * scale)
    out = up[off : off + length].astype(np.float64)
    return (out - out.mean()) / (out.std() + 1e-6)


def _smooth_2d(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth unit-variance 2-D noise, correlation length ~``scale`` samples."""
    scale = max(float(scale), 1.0)
    h, w = shape
    kh, kw = int(h / scale) + 5, int(w / scale) + 5
    knots = rng.standard_normal((kh, kw)).astype(np.float32)
    up = cv2.resize(knots, (int(kw * scale), int(kh * scale)), interpolation=cv2.INTER_CUBIC)
    off = int(1.5 * scale)
    out = up[off : off + h, off : off + w]
    return ((out - out.mean()) / (out.std() + 1e-6)).astype(np.float32)


def _inside(geo: _Geometry, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Section (tissue) mask on the grid xs x ys, without the fine surface wobble."""
    ix, iy = xs + geo.pad, ys + geo.pad
    ok = ys[:, None] >= geo.top[ix][None, :]
    if geo.bottom is not None:
        ok &= ys[:, None] <= geo.bottom[ix][None, :]
    if geo.side == "right":
        ok &= xs[None, :] <= geo.edge[iy][:, None]
    elif geo.side == "left":
        ok &= xs[None, :] >= geo.edge[iy][:, None]
    return ok


def _draw_geometry(
    rng: np.random.Generator, width: int, height: int, rows: int, cols: int, tile: int, mpp: float
) -> _Geometry:
    """One random section outline: skin surface on top, optional deep and side cut edges."""
    pad = REGION_FEATHER + 8
    nx, ny = cols * tile + 2 * pad, rows * tile + 2 * pad
    big = max(width, height)
    ppu = 1.0 / mpp
    # skin surface, gently undulating, with glass above it
    top = (
        height * rng.uniform(0.04, 0.16)
        + height * rng.uniform(0.015, 0.05) * _smooth_1d(rng, nx, big / 2.5)
        + ppu * rng.uniform(4, 12) * _smooth_1d(rng, nx, ppu * 120)
    )
    slope = np.gradient(top)
    bottom = side = edge = None
    if rng.random() < 0.55:  # the deep cut edge of the section (through fat or dermis)
        bottom = (
            height * rng.uniform(0.68, 0.95)
            + height * 0.05 * _smooth_1d(rng, nx, big / 3)
            + ppu * rng.uniform(8, 30) * _smooth_1d(rng, nx, ppu * 80)
        )
    if rng.random() < 0.5:  # one end of the section
        side = "right" if rng.random() < 0.5 else "left"
        e0 = rng.uniform(0.68, 0.92)
        wave = width * 0.05 * _smooth_1d(rng, ny, big / 3) + ppu * rng.uniform(8, 30) * _smooth_1d(
            rng, ny, ppu * 80
        )
        edge = (width * e0 + wave) if side == "right" else (width * (1 - e0) + wave)
    fields = _draw_fields(rng, (ny // _FIELD_STEP + 3, nx // _FIELD_STEP + 3), ppu)
    # the section's median thickness decides how deep the subcutis starts
    lo = np.clip(top[pad : pad + width], 0, height)
    hi = np.full(width, float(height)) if bottom is None else bottom[pad : pad + width]
    thickness_um = float(np.median(np.clip(hi - lo, 0, None))) * mpp
    layers = _draw_layers(rng, thickness_um)
    return _Geometry(pad, top, 1 / np.sqrt(1 + slope**2), slope, bottom, side, edge, fields, layers)


def _draw_fields(
    rng: np.random.Generator, shape: tuple[int, int], ppu: float
) -> dict[str, np.ndarray]:
    """The region's smooth fields, on a grid of one sample per _FIELD_STEP px."""
    s = _FIELD_STEP
    return {
        "wobble": _smooth_2d(rng, shape, ppu * 25 / s),  # fine undulation of the layers
        "deep": _smooth_2d(rng, shape, ppu * 40 / s),
        "lobes": _smooth_2d(rng, shape, ppu * 160 / s),  # lobules of the subcutis boundary
        "thick": _smooth_2d(rng, shape, ppu * 30 / s),  # section thickness
        "light": _smooth_2d(rng, shape, ppu * 400 / s),  # uneven illumination
        "collagen": _smooth_2d(rng, shape, ppu * 300 / s),  # denser and looser dermis
        "septa": _smooth_2d(rng, shape, ppu * 250 / s),  # fat lobules: septa at zero crossings
    }


def _draw_layers(rng: np.random.Generator, thickness_um: float) -> dict[str, float]:
    """Layer thicknesses (um) shared by the whole section, and the wobble amplitudes."""
    keratin, epidermis = rng.uniform(5, 14), rng.uniform(22, 40)
    dej = keratin + epidermis
    return {
        "keratin": keratin,
        "epidermis": epidermis,
        "papillary": rng.uniform(20, 45),
        "subcutis": dej + 60 + rng.uniform(0.3, 0.65) * max(thickness_um - dej - 60, 0),
        "wobble": rng.uniform(2, 6),
        "deep": rng.uniform(8, 25),
        "lobes": rng.uniform(20, 60),
        "septa": rng.uniform(0.03, 0.06),  # septum half-width, in units of the septa field
    }


def _tile_fractions(
    geo: _Geometry, width: int, height: int, rows: int, cols: int, tile: int, mpp: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tile: tissue fraction, below-epidermis fraction, and whether it is surely glass."""
    step = 8
    xs, ys = np.arange(0, width, step), np.arange(0, height, step)
    inside = _inside(geo, xs, ys)
    depth_um = (ys[:, None] - geo.top[xs + geo.pad][None, :]) * mpp
    dej = geo.layers["keratin"] + geo.layers["epidermis"]
    deep = inside & (depth_um > dej + 15)
    # the fine wobble moves the outline by a few um: a tile is glass only if
    # no tissue lies within two lattice steps of it
    near = cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    tissue = np.zeros((rows, cols))
    deep_frac = np.zeros((rows, cols))
    blank = np.zeros((rows, cols), bool)
    k = tile // step
    for r in range(rows):
        for c in range(cols):
            win = (slice(r * k, (r + 1) * k), slice(c * k, (c + 1) * k))
            tissue[r, c] = inside[win].mean()
            deep_frac[r, c] = deep[win].mean()
            blank[r, c] = not near[win].any()
    return tissue, deep_frac, blank


def _assign_classes(
    rng: np.random.Generator,
    deep_frac: np.ndarray,
    blank: np.ndarray,
    classes: tuple[str, ...],
) -> list[list[str]]:
    """Mostly normal tissue; deposits as small lesions of 1-3 neighbouring tiles.

    Every requested class gets at least one lesion when there are enough tiles
    with room below the epidermis; about a fifth of those tiles carry deposits.
    """
    rows, cols = deep_frac.shape
    grid = [[GLASS if blank[r, c] else "normal" for c in range(cols)] for r in range(rows)]
    eligible = {(r, c) for r in range(rows) for c in range(cols) if deep_frac[r, c] >= 0.6}
    if not classes or not eligible:
        return grid
    target = min(len(eligible), max(len(classes), round(rng.uniform(0.15, 0.3) * len(eligible))))
    order = [classes[i] for i in rng.permutation(len(classes))]
    placed, lesion = 0, 0
    while placed < target and eligible:
        label = order[lesion % len(order)]
        lesion += 1
        start = sorted(eligible)[int(rng.integers(len(eligible)))]
        cells, size = [start], int(rng.integers(1, 4))
        eligible.discard(start)
        # leave room for the classes that have not had a lesion yet
        unseen = max(0, len(order) - lesion)
        while len(cells) < size and placed + len(cells) + unseen < target:
            r, c = cells[int(rng.integers(len(cells)))]
            nbrs = [p for p in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)) if p in eligible]
            if not nbrs:
                break
            nxt = nbrs[int(rng.integers(len(nbrs)))]
            eligible.discard(nxt)
            cells.append(nxt)
        for r, c in cells:
            grid[r][c] = label
        placed += len(cells)
    return grid


def _check_region_args(width: int, height: int, tile: int, mpp: float, classes) -> tuple:
    for name, v in (("width", width), ("height", height)):
        if int(v) != v or v < REGION_MIN_SIDE:
            raise ConfigError(f"region {name} must be an integer >= {REGION_MIN_SIDE}, got {v}")
    if width * height > REGION_MAX_PIXELS:
        raise ConfigError(
            f"region {width}x{height} is too large ({width * height / 1e6:.0f} Mpx; "
            f"at most {REGION_MAX_PIXELS / 1e6:.0f} Mpx): render several smaller regions"
        )
    if int(tile) != tile or tile < 32:
        raise ConfigError(f"region tile must be an integer >= 32 pixels, got {tile}")
    if not mpp > 0:
        raise ConfigError(f"mpp must be > 0, got {mpp}")
    classes = DEPOSIT_CLASSES if classes is None else tuple(classes)
    for c in classes:
        if c not in DEPOSIT_CLASSES:
            raise ConfigError(
                f"unknown deposit class {c!r} for a region; choose from "
                f"{', '.join(DEPOSIT_CLASSES)} (normal tissue is always there)"
            )
    return tuple(dict.fromkeys(classes))


def plan_region(
    width: int,
    height: int,
    seed: int = 0,
    tile: int = 256,
    mpp: float = NOMINAL_MPP,
    classes: Sequence[str] | None = None,
) -> RegionPlan:
    """Lay out a synthetic region: section outline, layers and the class of every tile.

    The section has its skin surface near the top (glass above it), and often
    a deep cut edge and one end in view, so every region of at least 2 x 2
    tiles has whole tiles of bare glass as well as tissue. Deterministic in
    its arguments; the stain is chosen at rendering.
    """
    classes = _check_region_args(width, height, tile, mpp, classes)
    width, height, tile = int(width), int(height), int(tile)
    rows, cols = -(-height // tile), -(-width // tile)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, width, height, tile, 0x5EC7, 1])
    need_blank = rows >= 2 and cols >= 2
    for _attempt in range(24):
        geo = _draw_geometry(rng, width, height, rows, cols, tile, mpp)
        tissue, deep_frac, blank = _tile_fractions(geo, width, height, rows, cols, tile, mpp)
        if (blank.any() or not need_blank) and 0.35 <= tissue.mean() <= 0.9:
            break
    else:
        # rare: cut the section short on the right so the last column is glass
        wave = width * 0.03 * _smooth_1d(rng, rows * tile + 2 * geo.pad, max(width, height) / 3)
        geo.side, geo.edge = "right", (cols - 1) * tile - 24 - wave.max() + wave
        tissue, deep_frac, blank = _tile_fractions(geo, width, height, rows, cols, tile, mpp)
    grid = _assign_classes(rng, deep_frac, blank, classes)
    return RegionPlan(width, height, int(seed), tile, float(mpp), classes, grid, tissue, geo)
