"""Property-based fuzzing: whatever bytes or arrays come in, the image loader and the predictor
either give a result or raise the project's own error type, never anything else.

Deterministic by default (a fixed set of examples, so CI is reproducible). For a real fuzzing
session set ``CALCINOSIS_FUZZ_EXAMPLES=5000``: the examples are then random on every run.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from calcinosis.inference.predictor import STATUSES, PatchResult
from calcinosis.model.errors import CalcinosisError, ImageReadError
from calcinosis.model.imageio import image_size, read_mask, read_rgb

# Damaged files make PIL warn (corrupt EXIF, decompression bomb, ...): expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_EXAMPLES = int(os.environ.get("CALCINOSIS_FUZZ_EXAMPLES", "0") or 0)
FUZZ = settings(
    max_examples=_EXAMPLES or 60,
    deadline=None,
    derandomize=not _EXAMPLES,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- bytes -> read_rgb


def _encoded(fmt: str, **kwargs) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


REAL = {
    "png": _encoded("PNG"),
    "jpeg": _encoded("JPEG", quality=90),
    "tiff": _encoded("TIFF"),
    "tiff-lzw": _encoded("TIFF", compression="tiff_lzw"),
    "bmp": _encoded("BMP"),
    "webp": _encoded("WEBP", quality=80),
}

MAGIC = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"\xff\xd8\xff\xee",  # Adobe (CMYK) JPEG
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",  # BigTIFF
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"GIF89a",
]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@st.composite
def png_with_random_header(draw) -> bytes:
    """A PNG with a valid-CRC header of any size, depth and colour type, then junk data."""
    w = draw(st.integers(0, 2**31 - 1) | st.integers(1, 64))
    h = draw(st.integers(0, 2**31 - 1) | st.integers(1, 64))
    depth = draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0]))
    colour = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, draw(st.integers(0, 1)))
    payload = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        payload = zlib.compress(payload)
    return (
        MAGIC[0]
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", payload)
        + _png_chunk(b"IEND", b"")
    )


@st.composite
def mutated_real_file(draw) -> bytes:
    """A real PNG/JPEG/TIFF/BMP/WebP, truncated and/or with bytes overwritten."""
    data = bytearray(REAL[draw(st.sampled_from(sorted(REAL)))])
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


any_bytes = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda m, rest: m + rest, st.sampled_from(MAGIC), st.binary(max_size=512)),
    png_with_random_header(),
    mutated_real_file(),
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _check_rgb(arr: np.ndarray) -> None:
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8
    assert arr.ndim == 3 and arr.shape[2] == 3 and arr.shape[0] > 0 and arr.shape[1] > 0


@FUZZ
@given(data=any_bytes, suffix=st.sampled_from([".png", ".jpg", ".tif", ".PNG", ".bmp", ".webp"]))
def test_read_rgb_returns_rgb_or_raises_image_read_error(fuzz_dir, data, suffix):
    path = fuzz_dir / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        arr = read_rgb(path, max_pixels=4_000_000)
    except ImageReadError as exc:
        assert str(path) in str(exc)  # the message names the file
        event("read_rgb: ImageReadError")
    else:
        _check_rgb(arr)
        event("read_rgb: image")
    # Its siblings keep the same contract.
    try:
        size = image_size(path)
    except ImageReadError:
        pass
    else:
        assert len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    try:
        mask = read_mask(path, max_pixels=4_000_000)
    except ImageReadError:
        pass
    else:
        assert mask.dtype == np.uint8 and mask.ndim == 2


def test_the_real_files_themselves_decode():
    """The seeds of the mutations are valid, so the fuzzer starts from real decoders' paths."""
    for name, data in REAL.items():
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert arr.shape == (24, 20, 3), name


# --------------------------------------------------------------------------- arrays -> Predictor

DTYPES = [np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]


@st.composite
def any_array(draw) -> np.ndarray:
    side = st.integers(1, 12) | st.integers(1, 140)  # small patches, and some tiled regions
    kind = draw(st.sampled_from(["2d", "3d", "3d", "3d", "4d", "empty", "1d", "0d"]))
    if kind == "2d":
        shape: tuple[int, ...] = (draw(side), draw(side))
    elif kind == "3d":
        shape = (draw(side), draw(side), draw(st.integers(1, 4)))
    elif kind == "4d":
        shape = (draw(st.integers(1, 2)), draw(side), draw(side), 3)
    elif kind == "empty":
        shape = draw(st.sampled_from([(0, 5, 3), (5, 0, 3), (4, 4, 0), (0, 0), (0,)]))
    elif kind == "1d":
        shape = (draw(side),)
    else:
        shape = ()
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    fill = draw(st.sampled_from(["random", "random", "zeros", "max", "nan", "inf", "unit"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype == np.bool_:
        arr = rng.integers(0, 2, shape).astype(bool)
    elif dtype.kind in "ui":
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    else:
        arr = (rng.standard_normal(shape) * 300).astype(dtype)
    if fill == "zeros":
        arr = np.zeros(shape, dtype)
    elif fill == "max":
        arr = np.full(shape, np.iinfo(dtype).max if dtype.kind in "ui" else 1.0, dtype)
    elif fill == "unit" and dtype.kind == "f":
        arr = rng.random(shape).astype(dtype)  # the [0, 1] float convention
    elif fill in ("nan", "inf") and dtype.kind == "f" and arr.size:
        flat = arr.reshape(-1)
        flat[rng.integers(0, flat.size, max(1, flat.size // 5))] = (
            np.nan if fill == "nan" else np.inf
        )
    if draw(st.booleans()) and arr.ndim >= 2:
        arr = arr[::-1]  # a negative-stride view, as slicing produces
    return arr


@FUZZ
@given(image=any_array())
def test_predictor_returns_a_result_or_raises_its_own_error(robust_predictor, image):
    try:
        res = robust_predictor.predict(image)
    except CalcinosisError:
        event("raised CalcinosisError")
        return
    assert isinstance(res, PatchResult) and res.status in STATUSES
    event(f"status {res.status}")
    if res.status == "error":
        assert res.reason
        return
    h, w = image.shape[:2]
    assert (res.height, res.width) == (h, w)
    assert res.label_map is not None and res.label_map.shape == (h, w)
    if res.probabilities:
        assert sum(res.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert all(np.isfinite(p) for p in res.probabilities.values())
