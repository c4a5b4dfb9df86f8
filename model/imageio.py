"""Robust image reading (files and in-memory arrays) and atomic PNG writing.

Pathologists hand this project whatever their scanner or export script
produced: 8- or 16-bit, grayscale, palette, with or without alpha, CMYK JPEGs,
upper-case extensions, names with spaces or accents. :func:`read_rgb` turns all
of them into one thing, an ``(H, W, 3)`` ``uint8`` RGB array, and every way a
file can be unusable becomes an :class:`ImageReadError` that names the file and
the reason. Nothing else escapes, so a training loop can catch one type.
:func:`load_image` applies the same conventions to arrays and PIL images: one
rule, :func:`to_uint8`, turns pixel values of any type into uint8 for both.

Pixel data is returned as stored: EXIF orientation is *not* applied, so an image
and its mask (which carries no EXIF) stay aligned.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageReadError
from .fileio import atomic_write

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS_ENV",
    "image_size",
    "is_image_file",
    "load_image",
    "read_mask",
    "read_rgb",
    "to_uint8",
    "write_png",
]

#: Suffixes read as images (compare lower-cased: ``.PNG`` counts).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
)

#: Environment variable that overrides :data:`DEFAULT_MAX_PIXELS` (an integer; 0 = no limit).
MAX_PIXELS_ENV = "CALCINOSIS_MAX_PIXELS"


def _default_max_pixels() -> int:
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if raw:
        try:
            return max(0, int(float(raw)))
        except ValueError:
            pass
    return 100_000_000


#: Largest image (width x height) read in one piece. 1e8 pixels is a 10000 x 10000
#: region: 300 MB as uint8 RGB, and decoding briefly needs two or three times that.
#: Patches are far smaller; anything bigger is a whole slide or a slide export,
#: which should be tiled (``calcinosis predict`` tiles) rather than loaded whole
#: by every DataLoader worker. Lift it with ``read_rgb(..., max_pixels=N)``
#: (0 = no limit) or the ``CALCINOSIS_MAX_PIXELS`` environment variable.
DEFAULT_MAX_PIXELS: int = _default_max_pixels()

# PIL keeps its own global decompression-bomb guard (Image.MAX_IMAGE_PIXELS): a
# warning above it and DecompressionBombError above twice it, raised inside
# Image.open before we can see the size. We enforce our own limit from the header
# instead (its message names the file and how to lift it), so PIL's guard is only
# ever raised to match ours, never lowered, and its error is still caught and
# translated in case another library lowered it.
_PIL_LOCK = threading.Lock()


def _align_pil_guard(max_pixels: int) -> None:
    """Raise (never lower) PIL's global guard to our limit, so ours is the one that speaks."""
    if max_pixels <= 0:
        return
    with _PIL_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the name ends with a supported image suffix (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- errors


def _fail(path: Path, reason: str) -> ImageReadError:
    return ImageReadError(f"cannot read image '{path}': {reason}")


def check_file(
    path: Path,
    fail: Callable[[Path, str], Exception] | None = None,
    *,
    folder: str = "this is a folder, not an image file",
    empty: str = "the file is empty (0 bytes); re-export or remove it",
) -> None:
    """Cheap checks that give clearer messages than a decoder would.

    ``fail(path, reason)`` builds the error (default: "cannot read image");
    ``folder`` and ``empty`` are the reasons for those two cases, so a slide
    reader can word them for slides.
    """
    fail = fail or _fail
    try:
        st = path.stat()
    except FileNotFoundError:
        raise fail(path, "file not found (check the path and its folder)") from None
    except OSError as exc:
        raise fail(path, f"cannot access the file ({exc.strerror or exc})") from None
    if path.is_dir():
        raise fail(path, folder)
    if st.st_size == 0:
        raise fail(path, empty)


def _limit_error(path: Path, w: int, h: int, max_pixels: int) -> ImageReadError:
    return _fail(
        path,
        f"{w} x {h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} pixels. "
        "Tile large images or slides into patches, or lift the limit with "
        "'calcinosis predict --max-pixels N', read_rgb(..., max_pixels=N) or the "
        f"environment variable {MAX_PIXELS_ENV}=N (0 = no limit)",
    )


def _decode_reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    low = text.lower()
    if isinstance(exc, UnidentifiedImageError):
        return (
            "not an image this project can decode (PNG, JPEG, TIFF, BMP, WebP), "
            "or its header is damaged"
        )
    if "truncated" in low or "premature" in low or "broken" in low:
        return f"the file is truncated or corrupt ({text}); re-export or copy it again"
    return f"decoding failed ({type(exc).__name__}: {text})"


def _is_truncation(exc: BaseException) -> bool:
    low = str(exc).lower()
    return any(word in low for word in ("truncated", "premature", "broken", "crc"))


# --------------------------------------------------------------------------- opening


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and enforce the pixel limit before anything is decoded.

    Decoder errors (not an image, unknown format) propagate for the caller to
    wrap; only the limit raises :class:`ImageReadError` here.
    """
    _align_pil_guard(max_pixels)
    try:
        im = Image.open(path)
    except Image.DecompressionBombError:
        # PIL's guard is stricter than ours (another library lowered it, or
        # max_pixels=0): read the header with it off, then apply our own limit.
        with _PIL_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    if max_pixels > 0 and w * h > max_pixels:
        im.close()
        raise _limit_error(path, w, h, max_pixels)
    return im


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` from the header only, so callers can decide to tile first."""
    path = Path(path)
    check_file(path)
    try:
        with _open(path, 0) as im:
            return im.size
    except Exception as exc:  # noqa: BLE001 - every decoder failure becomes ImageReadError
        arr = _cv2_decode(path)  # slow (full decode) but only for files PIL cannot parse
        if arr is None:
            raise _fail(path, _decode_reason(exc)) from None
        return int(arr.shape[1]), int(arr.shape[0])


def _cv2_decode(path: Path) -> np.ndarray | None:
    """OpenCV fallback for files PIL cannot identify (some TIFF variants)."""
    try:
        # np.fromfile + imdecode handles non-ASCII paths on every platform.
        buf = np.fromfile(str(path), dtype=np.uint8)
        if buf.size == 0:
            return None
        return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------- conversion


def _bit_depth(im: Image.Image, arr: np.ndarray) -> int:
    """Declared bits per sample where the format says it, else the smallest that fits."""
    tag = getattr(im, "tag_v2", None)
    if tag is not None:
        bps = tag.get(258)
        if isinstance(bps, (tuple, list)) and bps:
            bps = bps[0]
        if isinstance(bps, int) and 1 <= bps <= 32:
            return bps
    if im.mode.startswith("I;16") or (im.format == "PNG" and im.mode == "I"):
        return 16  # PNG integer modes are 16-bit samples, however dark the image
    vmax = int(arr.max()) if arr.size else 0
    return 8 if vmax <= 255 else 16 if vmax <= 65535 else 32


#: Float pixels may stray this far outside [0, 1] (resampling overshoot) and are clipped.
FLOAT_SLACK = 0.05


def to_uint8(pixels: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Pixel values as uint8: the one rule for image files and in-memory arrays alike.

    * uint8 as is; bool as 0 / 255.
    * Integers are scaled by their bit depth (``2**bits - 1`` -> 255): ``bits``
      is what a file's header declares (negative samples are clipped to 0);
      without it (an array) uint16 is 16-bit data and other integer types must
      hold 0..255.
    * Floats must be finite and within [0, 1] (:data:`FLOAT_SLACK` of
      overshoot is clipped); they are scaled by 255. Float data declares no
      range, and guessing one from its maximum reads a [0, 1] image with a
      little overshoot, or a 0..255 image with one hot pixel, as something
      else; so anything outside [0, 1] is an :class:`ImageReadError` that says
      how to convert, whether it came from a file or an array.
    """
    arr = np.asarray(pixels)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        return _integers_to_uint8(arr, bits)
    if np.issubdtype(arr.dtype, np.floating):
        return _floats_to_uint8(arr)
    raise ImageReadError(
        f"image array of dtype {arr.dtype} is not supported; pass uint8 (0..255), "
        "uint16 or floats in [0, 1]"
    )


def _integers_to_uint8(arr: np.ndarray, bits: int | None) -> np.ndarray:
    if bits is None:
        if arr.dtype == np.uint16:  # 16-bit samples, as 16-bit files are scaled
            bits = 16
        else:
            lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
            if lo < 0 or hi > 255:
                raise ImageReadError(
                    f"integer image array of {arr.dtype} has values {lo}..{hi}; expected 0..255 "
                    "(or pass uint16 for 16-bit data, or floats in [0, 1])"
                )
            return arr.astype(np.uint8)
    arr = np.clip(arr.astype(np.float64), 0, None)
    if bits <= 8:
        return np.clip(arr, 0, 255).round().astype(np.uint8)
    top = float(2**bits - 1)
    return np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)


def _floats_to_uint8(arr: np.ndarray) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise ImageReadError(
            "image holds NaN or infinite values; replace them (e.g. numpy.nan_to_num) first"
        )
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < -FLOAT_SLACK or hi > 1.0 + FLOAT_SLACK:
        raise ImageReadError(
            f"float image has values {lo:g}..{hi:g}; expected floats in [0, 1] "
            "(divide 0..255 data by 255 and 16-bit data by 65535, or save and pass "
            "8- or 16-bit integers)"
        )
    return (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Transparent pixels are glass: blend onto white, not black."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode == "L":
        return _gray3(np.asarray(im, dtype=np.uint8))
    if mode == "1":
        return _gray3(np.asarray(im.convert("L"), dtype=np.uint8))
    if mode == "P":
        if "transparency" in im.info:
            return _pil_to_rgb(im.convert("RGBA"))
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode == "PA":
        return _pil_to_rgb(im.convert("RGBA"))
    if mode == "LA":
        arr = np.asarray(im, dtype=np.uint8)
        return _composite_on_white(_gray3(arr[..., 0]), arr[..., 1])
    if mode in ("RGBA", "RGBa"):
        arr = np.asarray(im.convert("RGBA") if mode == "RGBa" else im, dtype=np.uint8)
        return _composite_on_white(arr[..., :3], arr[..., 3])
    if mode in ("RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if arr.dtype.kind not in "iu":
            arr = np.asarray(im, dtype=np.int64)
        arr = np.clip(arr.astype(np.int64), 0, None)
        return _gray3(to_uint8(arr, _bit_depth(im, arr)))
    if mode == "F":
        return _gray3(to_uint8(np.asarray(im, dtype=np.float32)))
    raise ValueError(f"unsupported pixel mode '{mode}'")


def _cv2_to_rgb(arr: np.ndarray) -> np.ndarray:
    """Convert an OpenCV IMREAD_UNCHANGED result (BGR order, any depth) to RGB uint8."""
    if arr.dtype == np.uint16:
        arr = to_uint8(arr, 16)
    elif arr.dtype.kind in "iu" and arr.dtype != np.uint8:
        arr = to_uint8(arr, 16 if arr.max() <= 65535 else 32)
    else:
        arr = to_uint8(arr)
    if arr.ndim == 2:
        return _gray3(arr)
    channels = arr.shape[2]
    if channels == 1:
        return _gray3(arr[..., 0])
    if channels == 3:
        return np.ascontiguousarray(arr[..., ::-1])
    if channels == 4:
        return _composite_on_white(np.ascontiguousarray(arr[..., 2::-1]), arr[..., 3])
    if channels == 2:
        return _composite_on_white(_gray3(arr[..., 0]), arr[..., 1])
    raise ValueError(f"unsupported channel count {channels}")


# --------------------------------------------------------------------------- public readers


def read_rgb(path: str | os.PathLike[str], max_pixels: int | None = None) -> np.ndarray:
    """Read any supported image as ``(H, W, 3)`` uint8 RGB.

    Alpha is composited on white (transparent = empty glass), 16-bit data is
    scaled by its bit depth (65535 -> 255), palette and CMYK are converted. Any
    failure raises :class:`ImageReadError` naming the file and the reason.
    ``max_pixels=None`` means :data:`DEFAULT_MAX_PIXELS`; 0 means no limit.
    """
    path = Path(path)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    check_file(path)
    try:
        im = _open(path, limit)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure becomes ImageReadError
        return _read_rgb_cv2(path, exc, limit)
    try:
        with im:
            im.load()
            rgb = _pil_to_rgb(im)
    except ImageReadError as exc:  # decoded, but the pixel values break the rule of to_uint8
        raise _fail(path, str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        if _is_truncation(exc):
            raise _fail(path, _decode_reason(exc)) from None
        return _read_rgb_cv2(path, exc, limit)  # e.g. a TIFF compression PIL lacks
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise _fail(path, f"decoded to an unexpected shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _read_rgb_cv2(path: Path, pil_exc: BaseException, limit: int) -> np.ndarray:
    """Second chance with OpenCV; if it fails too, report PIL's reason."""
    arr = _cv2_decode(path)
    if arr is None or arr.ndim not in (2, 3) or arr.size == 0:
        raise _fail(path, _decode_reason(pil_exc))
    h, w = arr.shape[:2]
    if limit > 0 and w * h > limit:
        raise _limit_error(path, w, h, limit)
    try:
        return _cv2_to_rgb(arr)
    except ImageReadError as exc:
        raise _fail(path, str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise _fail(path, _decode_reason(exc)) from None


def read_mask(path: str | os.PathLike[str], max_pixels: int | None = None) -> np.ndarray:
    """Read a label mask as ``(H, W)`` uint8 label values (not colours).

    Palette PNGs give their indices, 16-bit masks their values (which must fit
    0..255), RGB masks are accepted only when the three channels are equal.
    Lossy formats (JPEG) smear labels; prefer PNG.
    """
    path = Path(path)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    check_file(path)
    try:
        with _open(path, limit) as im:
            im.load()
            arr = _pil_mask_array(path, im)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure becomes ImageReadError
        cv = None if _is_truncation(exc) else _cv2_decode(path)
        if cv is None or cv.ndim != 2:
            raise _fail(path, _decode_reason(exc)) from None
        arr = cv
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and (
            not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))
        ):
            raise _fail(path, "the mask holds non-integer values; save integer labels 0..4")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise _fail(
                path,
                f"mask values span {arr.min()}..{arr.max()}, outside 0..255; save labels 0..4",
            )
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _pil_mask_array(path: Path, im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("L", "P"):
        return np.asarray(im)  # palette: the indices are the labels
    if mode == "1":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("LA", "PA"):
        return np.asarray(im)[..., 0]
    if mode.startswith("I") or mode == "F":
        return np.asarray(im)
    if mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(im)[..., :3]
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            raise _fail(
                path,
                "a mask must hold one label value per pixel (0..4) but this is a colour image; "
                "save it as a single-channel (grayscale or palette) PNG",
            )
        return rgb[..., 0]
    raise _fail(path, f"unsupported pixel mode '{mode}' for a mask; save a grayscale PNG")


# --------------------------------------------------------------------------- writing


def write_png(
    path: str | os.PathLike[str],
    array: np.ndarray,
    compress_level: int = 1,
    *,
    fsync: bool = False,
) -> Path:
    """Write ``array`` as PNG atomically: a temp file in the same folder, then ``os.replace``.

    A reader (or a crashed run) never sees a half-written file, and the file
    gets the usual permissions (``0o666 & ~umask``). Accepts uint8 (H, W),
    (H, W, 3) RGB, (H, W, 4) RGBA, bool (as 0/255) and uint16 (H, W).
    ``compress_level=1`` trades a little size for much faster writes;
    ``fsync=True`` also flushes the file to disk before the rename.
    """
    path = Path(path)
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint16 and arr.ndim == 2:
        im = Image.fromarray(arr)  # 16-bit grayscale
    elif arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        im = Image.fromarray(np.ascontiguousarray(arr))
    else:
        raise ValueError(
            f"write_png needs uint8 (H,W), (H,W,3) or (H,W,4), or uint16 (H,W); got "
            f"{arr.dtype} {arr.shape}"
        )
    # No fsync: generated datasets and overlays are many small files that are
    # cheap to recreate; the rename alone keeps readers from half-written PNGs.
    with atomic_write(path, "wb", fsync=fsync) as fh:
        im.save(fh, format="PNG", compress_level=compress_level)
    return path


# --------------------------------------------------------------------------- in-memory images


def load_image(image: Any) -> np.ndarray:
    """Any accepted input -> ``(H, W, 3)`` uint8 RGB (paths via :func:`read_rgb`).

    Arrays and PIL images follow the same conventions as image files (one rule
    for the values, :func:`to_uint8`): ``(H, W)`` or ``(H, W, 1)`` grey,
    ``(H, W, 2)`` grey + alpha, ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA (alpha
    composited on white); uint8, uint16 (scaled 65535 -> 255), other integers
    within 0..255, bool (0/255) or floats in [0, 1]. Anything else raises
    :class:`ImageReadError` saying what was expected.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_rgb(image)
    if isinstance(image, Image.Image):  # decoded as the file it came from would be
        try:
            return np.ascontiguousarray(_pil_to_rgb(image))
        except ValueError as exc:  # an unsupported mode (ImageReadError is no ValueError)
            raise ImageReadError(f"cannot use this PIL image: {exc}") from None
    try:
        arr = np.asarray(image)
    except Exception as exc:  # noqa: BLE001 - ragged lists and the like
        raise ImageReadError(f"cannot use {type(image).__name__} as an image: {exc}") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(
            f"expected an image array (H, W), (H, W, 3) or (H, W, 4) with H, W >= 1, "
            f"got shape {arr.shape}"
        )
    arr = to_uint8(arr)
    channels = arr.shape[2]
    if channels in (2, 4):  # transparent pixels are glass: blend onto white
        a = arr[..., -1:].astype(np.float32) / 255.0
        colour = arr[..., :-1].astype(np.float32)
        arr = (colour * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)
