"""Whole-slide files: open one, describe its levels, read a region at a level.

A scanned slide is one to ten gigapixels in a pyramid of levels (full
resolution, then 4x, 16x, ... smaller), stored as compressed tiles. It must
never be decoded whole: :class:`SlideRegionSource` is a pixel source
(``tiling.PixelSource``) that decodes only the slide tiles under the rows the
tiler asks for, so predicting on a region holds a band of rows, not the region.

Readers
-------
tiffslide (pure Python on tifffile; ``pip install 'calcinosis[slides]'``) reads
the TIFF-based formats: Aperio ``.svs``, pyramidal/tiled ``.tif``/``.tiff``
(QuPath, bfconvert, vips exports), Hamamatsu ``.ndpi``, Leica ``.scn``,
Ventana ``.bif``. OpenSlide (``pip install openslide-python openslide-bin``),
when it is installed, reads what tiffslide cannot (MIRAX ``.mrxs``, Hamamatsu
``.vms``/``.vmu``, Sakura ``.svslide``) and is tried when tiffslide fails on a
file. Neither is needed for ordinary images.

Coordinates
-----------
``--region X,Y,W,H``, the GeoJSON outlines and the lesions' centroids and
bounding boxes (``predictions.json``, ``lesions/<name>.csv``) use one frame:
level-0 (full resolution) pixels with the origin at the top-left corner of the
image as QuPath shows it, which is also OpenSlide's convention. So outlines imported
into QuPath land where they were found, and a rectangle read off QuPath can be
passed as the region. For slides whose scanned area sits inside a larger
empty canvas (OpenSlide reports ``openslide.bounds-x/-y``, e.g. MIRAX), QuPath
shows only the bounds rectangle, so the frame starts at its corner; the
whole-slide default region is then that rectangle.

Resolution
----------
The microns per pixel of level 0 come from the slide's properties
(``tiffslide.mpp-x`` / ``openslide.mpp-x``: the Aperio ``MPP`` field or the
TIFF resolution tags); level ``k`` has that times its downsample. Values
outside :data:`MPP_RANGE` are ignored (a TIFF written at "72 dpi" would
otherwise claim 350 µm per pixel). ``--mpp`` overrides the slide's value.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from calcinosis.model.errors import CalcinosisError, ImageReadError

from .tiling import PAD_VALUE, PixelSource

if TYPE_CHECKING:
    from .predictor import PatchResult, Predictor

log = logging.getLogger(__name__)

#: Suffixes that are always whole-slide files (never decoded as ordinary images).
SLIDE_ONLY_EXTENSIONS: frozenset[str] = frozenset(
    {".svs", ".ndpi", ".scn", ".bif", ".mrxs", ".vms", ".vmu", ".svslide"}
)
#: TIFF suffixes: a slide when tiled (or too large to decode, or with --level/--region).
TIFF_EXTENSIONS: frozenset[str] = frozenset({".tif", ".tiff"})
#: Suffixes tiffslide is tried on first.
TIFFSLIDE_EXTENSIONS: frozenset[str] = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif"})
#: Every suffix that may be a slide.
SLIDE_EXTENSIONS: frozenset[str] = SLIDE_ONLY_EXTENSIONS | TIFF_EXTENSIONS

#: Plausible level-0 microns per pixel: a 100x oil objective is ~0.05, a 1.25x scan ~8.
MPP_RANGE = (0.02, 20.0)
#: Thumbnails are built from bands of about this many bytes of decoded slide pixels.
THUMB_BAND_BYTES = 32_000_000

INSTALL_TIFFSLIDE = "pip install 'calcinosis[slides]' (or: pip install tiffslide)"
INSTALL_OPENSLIDE = "pip install openslide-python openslide-bin"


# --------------------------------------------------------------------------- readers


def _import_tiffslide() -> Any | None:
    try:
        import tiffslide
    except ImportError:
        return None
    return tiffslide


def _import_openslide() -> Any | None:
    try:
        import openslide
    except (ImportError, OSError):  # OSError: the Python binding without the C library
        return None
    return openslide


def reader_available() -> bool:
    """True when tiffslide or OpenSlide can be imported."""
    return _import_tiffslide() is not None or _import_openslide() is not None


def _fail(path: Path, reason: str) -> ImageReadError:
    return ImageReadError(f"cannot read slide '{path}': {reason}")


def _tiff_layout(path: Path) -> tuple[bool, int]:
    """(tiled?, width x height) of a TIFF's first page from its header; (False, 0) if unreadable."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            return bool(page.is_tiled), int(page.imagewidth) * int(page.imagelength)
    except Exception:  # noqa: BLE001 - no tifffile, or not a TIFF: try Pillow
        pass
    try:
        from PIL import Image

        with Image.open(path) as im:
            tags = getattr(im, "tag_v2", {})
            return 322 in tags, int(im.width) * int(im.height)  # 322: TileWidth
    except Exception:  # noqa: BLE001 - the ordinary reader will say what is wrong
        return False, 0


def is_slide_file(
    path: str | os.PathLike[str], *, force: bool = False, max_pixels: int | None = None
) -> bool:
    """Whether ``path`` is read as a whole slide rather than decoded as one image.

    Slide-only suffixes (``.svs .ndpi .scn .bif .mrxs .vms .vmu .svslide``)
    always are. A ``.tif``/``.tiff`` is when ``force`` is set (``--level`` or
    ``--region`` was given), or, with a slide reader installed, when it is
    tiled (scanner and QuPath exports are) or larger than ``max_pixels``
    (None: ``imageio.DEFAULT_MAX_PIXELS``; 0: no limit), which it could not be
    decoded under. Everything else is an ordinary image.
    """
    suffix = Path(path).suffix.lower()
    if suffix in SLIDE_ONLY_EXTENSIONS:
        return True
    if suffix not in TIFF_EXTENSIONS:
        return False
    if force:
        return True
    tiled, pixels = _tiff_layout(Path(path))
    if not tiled:
        from calcinosis.training.imageio import DEFAULT_MAX_PIXELS

        limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
        if not (limit > 0 and pixels > limit):
            return False
    return reader_available()


@contextmanager
def _quiet() -> Iterator[None]:
    """tiffslide warns about partially parsed vendor metadata; that is not the user's problem."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def open_slide(path: str | os.PathLike[str]) -> Slide:
    """Open a whole-slide file with tiffslide (TIFF-based formats) or OpenSlide.

    Every failure is an :class:`ImageReadError` that names the file and says
    what to do: a missing file, a format no installed reader handles (with the
    ``pip install`` line), or a damaged file.
    """
    from calcinosis.training.imageio import check_file

    p = Path(path)
    suffix = p.suffix.lower()
    check_file(
        p,
        _fail,
        folder="this is a folder; give the slide file itself (e.g. slide.svs)",
        empty="the file is empty (0 bytes); copy or export it again",
    )
    tiffslide = _import_tiffslide() if suffix in TIFFSLIDE_EXTENSIONS else None
    openslide = _import_openslide()
    errors: list[str] = []
    if tiffslide is not None:
        try:
            with _quiet():
                handle = tiffslide.TiffSlide(str(p))
                slide = Slide(p, handle, "tiffslide")
            return slide
        except ImageReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear error
            errors.append(f"tiffslide: {type(exc).__name__}: {exc}")
    if openslide is not None:
        try:
            handle = openslide.OpenSlide(str(p))
            return Slide(p, handle, "openslide")
        except ImageReadError:
            raise
        except Exception as exc:  # noqa: BLE001
            errors.append(f"openslide: {type(exc).__name__}: {exc}")
    if errors:
        hint = (
            f"; for formats tiffslide cannot read, install OpenSlide ({INSTALL_OPENSLIDE})"
            if openslide is None
            else ""
        )
        raise _fail(
            p,
            "not a whole-slide file the installed readers understand, or it is damaged "
            f"({'; '.join(errors)}). Check that the file is complete (copy or export it "
            f"again){hint}",
        )
    if suffix in TIFFSLIDE_EXTENSIONS:
        raise _fail(
            p,
            f"reading whole-slide files needs tiffslide, which is not installed: "
            f"{INSTALL_TIFFSLIDE}; or export a region as PNG/TIFF and predict on that",
        )
    raise _fail(
        p,
        f"{suffix} slides need OpenSlide, which is not installed: {INSTALL_OPENSLIDE}; "
        "or convert the slide to a pyramidal TIFF (e.g. with QuPath or vips)",
    )


# --------------------------------------------------------------------------- slide


class Slide:
    """An open whole-slide file: its levels, resolution, and region reads as RGB uint8.

    Use :func:`open_slide`; close it (or use ``with``) to release the file.
    """

    def __init__(self, path: Path, handle: Any, backend: str) -> None:
        self.path = path
        self.backend = backend
        self._handle = handle
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in handle.level_dimensions
        )
        if not self.level_dimensions or min(min(d) for d in self.level_dimensions) < 1:
            raise _fail(path, f"the slide reports no usable levels ({self.level_dimensions})")
        self.level_count = len(self.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(
            float(d) for d in handle.level_downsamples
        )
        self.properties: dict[str, Any] = dict(handle.properties)
        prefix = "tiffslide" if backend == "tiffslide" else "openslide"
        self.mpp, self.mpp_note = _level0_mpp(self.properties, prefix)
        # The area QuPath shows, in the file's level-0 pixels: (x, y, w, h).
        w0, h0 = self.level_dimensions[0]
        self.bounds = (0, 0, w0, h0)
        if backend == "openslide":
            b = [
                self.properties.get(f"openslide.bounds-{k}") for k in ("x", "y", "width", "height")
            ]
            try:
                bx, by, bw, bh = (int(float(v)) for v in b)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                pass
            else:
                if bw > 0 and bh > 0:
                    self.bounds = (bx, by, bw, bh)

    # ------------------------------------------------------------------ description

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0."""
        return self.level_dimensions[0]

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in level-0 pixels of the image QuPath shows (the bounds)."""
        return self.bounds[2], self.bounds[3]

    def level_mpp(self, level: int, level0_mpp: float | None = None) -> float | None:
        """Microns per pixel of ``level`` (``level0_mpp`` overrides the slide's own)."""
        mpp = self.mpp if level0_mpp is None else level0_mpp
        return None if mpp is None else float(mpp) * self.level_downsamples[level]

    def best_level(self, target_mpp: float, level0_mpp: float | None = None) -> int:
        """The coarsest level still at least as fine as ``target_mpp`` (2% slack).

        Shrinking a finer level to the model's resolution keeps detail that
        enlarging a coarser one would have to invent, and reads the fewest
        pixels that do; with no level fine enough, level 0.
        """
        mpp = self.mpp if level0_mpp is None else level0_mpp
        if mpp is None or not target_mpp:
            return 0
        best = 0
        for k in range(self.level_count):
            if mpp * self.level_downsamples[k] <= target_mpp * 1.02:
                best = k
        return best

    def describe(self) -> dict[str, Any]:
        """Levels, resolution and reader, JSON-ready (for predictions.json)."""
        return {
            "reader": self.backend,
            "vendor": self.properties.get(f"{self.backend}.vendor"),
            "dimensions": list(self.dimensions),
            "bounds": list(self.bounds),
            "mpp": self.mpp,
            "levels": [
                {
                    "width": w,
                    "height": h,
                    "downsample": round(ds, 4),
                    "mpp": self.level_mpp(k),
                }
                for k, ((w, h), ds) in enumerate(
                    zip(self.level_dimensions, self.level_downsamples, strict=True)
                )
            ],
        }

    def _levels_text(self) -> str:
        parts = []
        for k, ((w, h), ds) in enumerate(
            zip(self.level_dimensions, self.level_downsamples, strict=True)
        ):
            mpp = self.level_mpp(k)
            res = f", {mpp:.3g} um/px" if mpp else ""
            parts.append(f"{k}: {w} x {h} (downsample {ds:g}{res})")
        return "; ".join(parts)

    # ------------------------------------------------------------------ checks

    def check_level(self, level: int) -> int:
        """``level`` if the slide has it, else a clear error listing the levels."""
        if not 0 <= int(level) < self.level_count:
            raise CalcinosisError(
                f"slide '{self.path}' has no level {level}; it has {self.level_count} "
                f"level(s): {self._levels_text()}. Pick one with --level N"
            )
        return int(level)

    def check_region(self, region: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
        """``(x, y, w, h)`` in level-0 pixels, checked to lie inside the slide (None: all of it)."""
        sw, sh = self.size
        if region is None:
            return 0, 0, sw, sh
        x, y, w, h = (int(v) for v in region)
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > sw or y + h > sh:
            raise CalcinosisError(
                f"region {x},{y},{w},{h} does not lie inside slide '{self.path}', which is "
                f"{sw} x {sh} level-0 pixels; give --region X,Y,W,H with W, H > 0, "
                f"0 <= X, X + W <= {sw} and 0 <= Y, Y + H <= {sh} (level-0 pixels, "
                "the coordinates QuPath shows)"
            )
        return x, y, w, h

    def level_window(
        self, level: int, region: tuple[int, int, int, int]
    ) -> tuple[int, int, int, int]:
        """A level-0 region ``(x, y, w, h)`` as ``(lx, ly, lw, lh)`` pixels of ``level``.

        The window covers the region (rounded outwards to whole level pixels)
        and is clipped to the level.
        """
        x, y, w, h = region
        ds = self.level_downsamples[level]
        lw_max, lh_max = self.level_dimensions[level]
        fx, fy = x + self.bounds[0], y + self.bounds[1]
        lx, ly = int(math.floor(fx / ds)), int(math.floor(fy / ds))
        lx1 = min(lw_max, max(lx + 1, int(math.ceil((fx + w) / ds - 1e-9))))
        ly1 = min(lh_max, max(ly + 1, int(math.ceil((fy + h) / ds - 1e-9))))
        lx, ly = min(lx, lw_max - 1), min(ly, lh_max - 1)
        return lx, ly, lx1 - lx, ly1 - ly

    def level_origin(self, level: int, lx: int, ly: int) -> tuple[float, float]:
        """Level pixel ``(lx, ly)`` in level-0 coordinates of the QuPath frame."""
        ds = self.level_downsamples[level]
        return lx * ds - self.bounds[0], ly * ds - self.bounds[1]

    # ------------------------------------------------------------------ pixels

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``(h, w, 3)`` RGB uint8 of ``level`` whose top-left is level-0 ``(x, y)``.

        ``x, y`` are level-0 pixels (QuPath's frame, see the module docstring);
        ``w, h`` are pixels of ``level``, as in OpenSlide's ``read_region``.
        Transparent pixels and anything beyond the slide are white.
        """
        level = self.check_level(level)
        ds = self.level_downsamples[level]
        lx = int(math.floor((x + self.bounds[0]) / ds))
        ly = int(math.floor((y + self.bounds[1]) / ds))
        return self.read_level(level, lx, ly, w, h)

    def read_level(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        """``(h, w, 3)`` RGB uint8 at pixel ``(lx, ly)`` of ``level`` (level coordinates)."""
        lw, lh = self.level_dimensions[level]
        xa, ya = max(0, lx), max(0, ly)
        xb, yb = min(lw, lx + w), min(lh, ly + h)
        if xb <= xa or yb <= ya:
            return np.full((h, w, 3), PAD_VALUE, np.uint8)
        px = self._read(level, xa, ya, xb - xa, yb - ya)
        if (xa, ya, xb, yb) == (lx, ly, lx + w, ly + h):
            return px
        out = np.full((h, w, 3), PAD_VALUE, np.uint8)
        out[ya - ly : yb - ly, xa - lx : xb - lx] = px
        return out

    def _read(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        """Pixels inside the level, from the reader, as RGB uint8."""
        ds = self.level_downsamples[level]
        loc = (_to_level0(lx, ds), _to_level0(ly, ds))
        try:
            with _quiet():
                if self.backend == "tiffslide":
                    arr = np.asarray(self._handle.read_region(loc, level, (w, h), as_array=True))
                else:
                    arr = np.asarray(self._handle.read_region(loc, level, (w, h)))
        except Exception as exc:  # noqa: BLE001 - a damaged tile is the file's fault
            raise _fail(
                self.path,
                f"reading level {level} at ({lx}, {ly}), {w} x {h} px failed "
                f"({type(exc).__name__}: {exc}); the file may be truncated or damaged: "
                "copy or export it again",
            ) from None
        if arr.shape[:2] != (h, w):
            raise _fail(
                self.path,
                f"the reader returned {arr.shape[1]} x {arr.shape[0]} px for a {w} x {h} read "
                f"at level {level}; the file's level layout is not supported",
            )
        from .predictor import load_image  # the array conventions of ordinary images

        try:
            return load_image(arr)
        except ImageReadError as exc:
            raise _fail(self.path, f"unsupported pixel data ({exc})") from None

    def close(self) -> None:
        try:
            self._handle.close()
        except Exception:  # noqa: BLE001 - closing twice or a reader without close()
            pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, reader={self.backend}, levels={self.level_count})"


def _to_level0(v: int, ds: float) -> int:
    """A level-0 coordinate whose level pixel, ``int(c / ds)`` as the readers compute it, is ``v``."""
    c = int(round(v * ds))
    while int(c / ds) < v:
        c += 1
    while c > 0 and int(c / ds) > v:
        c -= 1
    return c


def _level0_mpp(props: dict[str, Any], prefix: str) -> tuple[float | None, str]:
    """Level-0 microns per pixel from the reader's properties, and a note when it is unusable."""
    vals = []
    for axis in ("x", "y"):
        raw = props.get(f"{prefix}.mpp-{axis}")
        try:
            v = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and v > 0:
            vals.append(v)
    if not vals:
        return None, "the slide records no resolution"
    mpp = sum(vals) / len(vals)
    lo, hi = MPP_RANGE
    if not lo <= mpp <= hi:
        return None, (
            f"the slide's recorded resolution ({mpp:.4g} um/px) is not plausible for a "
            "scan and was ignored"
        )
    return mpp, ""


def parse_region(text: str) -> tuple[int, int, int, int]:
    """``"X,Y,W,H"`` (level-0 pixels) -> a tuple; a clear error for anything else."""
    parts = [p.strip() for p in str(text).replace(" ", "").split(",")]
    try:
        x, y, w, h = (int(p) for p in parts)
    except ValueError:
        x = y = w = h = -1
        parts = []
    if len(parts) != 4 or min(x, y) < 0 or min(w, h) < 1:
        raise CalcinosisError(
            f"--region must be X,Y,W,H in level-0 pixels with X, Y >= 0 and W, H >= 1, "
            f"for example --region 10240,8192,4096,4096; got {text!r}"
        )
    return x, y, w, h


# --------------------------------------------------------------------------- pixel source


class SlideRegionSource:
    """A region of one slide level as a ``tiling.PixelSource``; decodes only what is read.

    ``read`` returns white beyond the region, even where the slide has more
    tissue, so a region gives exactly what the same pixels saved as a PNG give.
    ``thumbnail`` reads the coarsest level that still has the thumbnail's
    detail, a band of rows at a time.
    """

    def __init__(self, slide: Slide, level: int, lx: int, ly: int, lw: int, lh: int) -> None:
        self.slide = slide
        self.level = int(level)
        self.lx, self.ly = int(lx), int(ly)
        self.shape = (int(lh), int(lw), 3)
        #: Largest read so far, in pixels (the tests check that nothing reads the region whole).
        self.max_read_px = 0

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        rh, rw = self.shape[:2]
        xa, ya = max(0, x), max(0, y)
        xb, yb = min(rw, x + w), min(rh, y + h)
        if xb <= xa or yb <= ya:
            return np.full((h, w, 3), PAD_VALUE, np.uint8)
        self.max_read_px = max(self.max_read_px, (xb - xa) * (yb - ya))
        px = self.slide.read_level(self.level, self.lx + xa, self.ly + ya, xb - xa, yb - ya)
        if (xa, ya, xb, yb) == (x, y, x + w, y + h):
            return px
        out = np.full((h, w, 3), PAD_VALUE, np.uint8)
        out[ya - y : yb - y, xa - x : xb - x] = px
        return out

    def thumbnail(self, width: int, height: int) -> np.ndarray:
        rh, rw = self.shape[:2]
        width, height = max(1, int(width)), max(1, int(height))
        slide, lvl = self.slide, self.level
        ds = slide.level_downsamples[lvl]
        # The coarsest level whose copy of the region is still at least the thumbnail's size.
        k = lvl
        for j in range(lvl + 1, slide.level_count):
            r = ds / slide.level_downsamples[j]
            if rw * r >= width and rh * r >= height:
                k = j
        r = ds / slide.level_downsamples[k]
        kx, ky = int(math.floor(self.lx * r)), int(math.floor(self.ly * r))
        kw, kh = max(1, round(rw * r)), max(1, round(rh * r))
        if k == lvl:
            kx, ky, kw, kh = self.lx, self.ly, rw, rh

        def rows(s0: int, s1: int) -> np.ndarray:
            self.max_read_px = max(self.max_read_px, kw * (s1 - s0))
            band = slide.read_level(k, kx, ky + s0, kw, s1 - s0)
            return band

        if (kw, kh) == (width, height) and kw * kh * 3 <= THUMB_BAND_BYTES:
            return rows(0, kh)
        out = np.empty((height, width, 3), np.uint8)
        step = max(1, int(THUMB_BAND_BYTES // (3 * kw) * height // kh))
        for r0 in range(0, height, step):
            r1 = min(height, r0 + step)
            s0 = int(math.floor(r0 * kh / height))
            s1 = max(s0 + 1, min(kh, int(math.ceil(r1 * kh / height))))
            band = rows(s0, s1)
            out[r0:r1] = cv2.resize(band, (width, r1 - r0), interpolation=cv2.INTER_AREA)
        return out


# --------------------------------------------------------------------------- prediction


def predict_slide(
    predictor: Predictor,
    path: str | os.PathLike[str],
    *,
    level: int | None = None,
    region: tuple[int, int, int, int] | None = None,
    mpp: float | None = None,
    overlay_side: int | None = None,
    wrap_source: Callable[[PixelSource], PixelSource] | None = None,
) -> tuple[PatchResult, np.ndarray | None]:
    """Predict one region of a slide (default: all of it) without reading it whole.

    ``region`` is ``(x, y, w, h)`` in level-0 pixels (QuPath's frame);
    ``level`` defaults to :meth:`Slide.best_level` for the model's mpp;
    ``mpp`` is level 0's microns per pixel (default: the slide's). The
    result's label map is at the read level's resolution over the region;
    ``result.slide`` records the level, the region and how to map label-map
    pixels to slide coordinates (``origin`` + pixel x ``downsample``), which
    the GeoJSON writer uses; the lesions' ``centroid``, ``bbox`` and
    ``area_px`` are converted to level-0 pixels of the same frame (``area_um2``
    needs no conversion). With ``overlay_side``, also returns the region
    shrunk to fit that many pixels (the overlay's background), else None.
    ``wrap_source`` wraps the region's pixel source for the network's reads
    (``calcinosis serve`` reports progress and cancels through it).
    """
    with open_slide(path) as slide:
        if mpp is not None:
            mpp0: float | None = float(mpp)
            mpp_source = "given"
        elif slide.mpp is not None:
            mpp0, mpp_source = slide.mpp, "slide"
        else:
            mpp0, mpp_source = None, "assumed"
            log.warning(
                "%s: %s; assuming the model's %s um/px (pass --mpp to set level 0's)",
                slide.path,
                slide.mpp_note,
                predictor.model_mpp,
            )
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
        res = predictor.predict_source(read_from, mpp=level_mpp, name=str(path))
        thumb = None
        if overlay_side and res.status != "error":
            scale = min(1.0, overlay_side / max(lw, lh))
            thumb = source.thumbnail(max(1, round(lw * scale)), max(1, round(lh * scale)))
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
        if res.tiles:
            for t in res.tiles:
                t["slide_x0"] = round(ox + t["x0"] * ds, 1)
                t["slide_y0"] = round(oy + t["y0"] * ds, 1)
                t["slide_size"] = round(t["size"] * ds, 1)
        if res.lesions:
            # Lesions in the GeoJSON's frame: level-0 pixels (areas too).
            from .lesions import to_frame

            to_frame(res.lesions, (ox, oy), ds)
            for g in (res.region or {}).get("classes_present") or []:
                g["area_px"] = float(g["area_px"]) * ds * ds
    res.path = str(path)
    return res, thumb
