"""Pictures for the page: deep-zoom tiles of a slide and the deposit map as a layer.

Deep zoom (the pyramid OpenSeadragon asks for): level ``L`` of ``0..max_level``
is the slide's level-0 image scaled by ``2 ** (L - max_level)``, with
``max_level = ceil(log2(max(width, height)))``, cut into square tiles of
:data:`TILE` pixels without overlap. Each tile is read from the coarsest
slide level that is still at least as fine as the tile, through
``Slide.read_region``, and shrunk to the tile with area averaging.

The deposit layer is the label map coloured with the overlay's colours
(``labels.DEPOSIT_COLORS``) on a transparent background, with only the
labels the page has switched on, so the page can fade it (opacity) and
toggle labels without recomputing anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import cv2
import numpy as np

from calcinosis.inference.slide import Slide
from calcinosis.model.labels import DEPOSIT_COLORS

#: Deep-zoom tile side in pixels.
TILE = 256
#: Longest side of the picture and label map the page shows for an image result.
DISPLAY_SIDE = 2048
#: Longest side of a slide region's deposit layer.
LAYER_SIDE = 4096
#: JPEG quality of slide tiles (the viewer's, not the model's, pixels).
JPEG_QUALITY = 85


class TileError(Exception):
    """A tile that does not exist (level or position out of range)."""


def max_level(width: int, height: int) -> int:
    return max(0, math.ceil(math.log2(max(1, width, height))))


def level_size(width: int, height: int, level: int) -> tuple[int, int]:
    """``(w, h)`` of deep-zoom ``level`` (the rounding OpenSeadragon uses)."""
    f = 2.0 ** (level - max_level(width, height))
    return max(1, math.ceil(width * f)), max(1, math.ceil(height * f))


def render_tile(slide: Slide, level: int, col: int, row: int, tile: int = TILE) -> np.ndarray:
    """RGB uint8 tile ``(col, row)`` of deep-zoom ``level`` of ``slide``."""
    width, height = slide.size
    top = max_level(width, height)
    if not 0 <= level <= top:
        raise TileError(f"deep-zoom level {level} is not in 0..{top}")
    lw, lh = level_size(width, height, level)
    x0, y0 = col * tile, row * tile
    if col < 0 or row < 0 or x0 >= lw or y0 >= lh:
        raise TileError(f"tile {col},{row} is outside level {level} ({lw} x {lh} px)")
    tw, th = min(tile, lw - x0), min(tile, lh - y0)
    ds = 2.0 ** (top - level)  # level-0 pixels per tile pixel
    # The coarsest slide level at least as fine as the tile.
    k = 0
    for j, d in enumerate(slide.level_downsamples):
        if d <= ds * 1.01:
            k = j
    dk = slide.level_downsamples[k]
    X0, Y0 = x0 * ds, y0 * ds
    X1, Y1 = min(width, (x0 + tw) * ds), min(height, (y0 + th) * ds)
    rw = max(1, math.ceil((X1 - X0) / dk))
    rh = max(1, math.ceil((Y1 - Y0) / dk))
    px = slide.read_region(k, int(X0), int(Y0), rw, rh)
    if (rw, rh) != (tw, th):
        interp = cv2.INTER_AREA if rw > tw else cv2.INTER_LINEAR
        px = cv2.resize(px, (tw, th), interpolation=interp)
    return px


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise ValueError("OpenCV could not encode the tile as JPEG")
    return buf.tobytes()


def encode_png_rgba(rgba: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(
        ".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA), [cv2.IMWRITE_PNG_COMPRESSION, 1]
    )
    if not ok:
        raise ValueError("OpenCV could not encode the layer as PNG")
    return buf.tobytes()


def shrink_to(arr: np.ndarray, side: int, nearest: bool) -> np.ndarray:
    """``arr`` shrunk so that its longer side is at most ``side`` (never enlarged)."""
    h, w = arr.shape[:2]
    s = min(1.0, side / max(h, w))
    if s >= 1.0:
        return arr
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(arr, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def deposit_layer(label_map: np.ndarray, labels: Iterable[int], outline: bool = True) -> np.ndarray:
    """RGBA: the chosen deposit labels in their colours, opaque; everything else transparent.

    With ``outline``, each deposit's border is drawn darker, so a deposit stays
    visible where the page's opacity makes its fill faint.
    """
    lm = np.asarray(label_map, np.uint8)
    lut = np.zeros((256, 4), np.uint8)
    for lab in labels:
        if lab in DEPOSIT_COLORS:
            lut[lab, :3] = DEPOSIT_COLORS[lab]
            lut[lab, 3] = 255
    rgba = lut[lm]
    if outline:
        on = rgba[..., 3] > 0
        if on.any():
            eroded = cv2.erode(on.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            edge = on & ~eroded
            rgba[edge, :3] = (rgba[edge, :3] * 0.45).astype(np.uint8)
    return rgba
