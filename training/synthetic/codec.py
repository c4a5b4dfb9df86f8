"""Image encoding shared by the renderers and the writers: the scanner's JPEG, PNG files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from calcinosis.model.errors import DataError


def scanner_jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """``rgb`` (uint8) as a scanner saving JPEG at ``quality`` leaves it (0: unchanged)."""
    if quality:
        ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            rgb = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    return np.ascontiguousarray(rgb)


def png_bytes(arr: np.ndarray) -> bytes:
    """An RGB or label image as PNG (OpenCV, compression 3: the committed fixtures' bytes)."""
    img = arr[:, :, ::-1] if arr.ndim == 3 else arr
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise DataError("could not encode a PNG (OpenCV imencode failed)")
    return buf.tobytes()


def write_png(path: Path, arr: np.ndarray) -> None:
    path.write_bytes(png_bytes(arr))
