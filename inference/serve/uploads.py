"""Uploaded images: sniffed by their bytes, checked, and decoded as ``predict`` decodes files.

A browser's file name and content type are the client's claims; what decides
is the file's first bytes (PNG, JPEG and TIFF signatures). Every refusal is an
:class:`UploadError` carrying the HTTP status and a message for the page:
400 for an empty upload, 413 for one over the byte or pixel limit, 415 for
content that is not one of the accepted image formats, 422 for an image that
cannot be decoded (a truncated PNG, a damaged JPEG). Decoding itself is
``model.imageio.read_rgb`` on the saved file, the reader ``calcinosis
predict`` uses, so an image reads the same here as on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from calcinosis.model.errors import ImageReadError

#: Default byte limit of one upload (a large exported region as PNG fits).
MAX_UPLOAD_BYTES = 256 * 1024 * 1024

#: (format, file suffix, signatures) of the accepted image formats.
_SIGNATURES: tuple[tuple[str, str, tuple[bytes, ...]], ...] = (
    ("PNG", ".png", (b"\x89PNG\r\n\x1a\n",)),
    ("JPEG", ".jpg", (b"\xff\xd8\xff",)),
    ("TIFF", ".tif", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
)
ACCEPTED = ", ".join(f for f, _, _ in _SIGNATURES)


class UploadError(Exception):
    """An upload the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """One accepted upload: where it was saved, what it is, and its pixels."""

    name: str  # the client's file name without folders (a label only, never opened)
    path: Path  # the saved copy, inside the job's folder
    format: str
    rgb: np.ndarray


def display_name(filename: str | None) -> str:
    """The client's file name without any folder part (``../../x.png`` -> ``x.png``)."""
    raw = (filename or "").replace("\x00", "")
    name = PureWindowsPath(PurePosixPath(raw).name).name.strip()
    return name[:200] or "upload"


def sniff(head: bytes) -> tuple[str, str] | None:
    """``(format, suffix)`` from a file's first bytes, or None when it is none we accept."""
    for fmt, suffix, sigs in _SIGNATURES:
        if any(head.startswith(s) for s in sigs):
            return fmt, suffix
    return None


def describe_content(head: bytes) -> str:
    """A few words on what refused content looks like, for the error message."""
    if not head:
        return "empty"
    sample = head[:512]
    for sig, what in (
        (b"%PDF", "a PDF document"),
        (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
        (b"GIF8", "a GIF image"),
        (b"BM", "a BMP image"),
        (b"RIFF", "a RIFF file (WebP, WAV or AVI)"),
    ):
        if sample.startswith(sig):
            return what
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A character cut off by the 512-byte sample is still text.
        text = sample[: exc.start].decode("utf-8") if exc.start >= len(sample) - 3 else None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "text"
    return "binary data of an unknown kind"


def accept_upload(
    data: bytes,
    filename: str | None,
    folder: Path,
    stem: str,
    *,
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int | None = None,
) -> Upload:
    """Check one upload, save it as ``folder/<stem><suffix>`` and decode it.

    ``max_pixels`` is the decoder's limit (None: ``imageio.DEFAULT_MAX_PIXELS``,
    as ``predict``; 0: none); the header is read before any pixel is decoded,
    so a 20000 x 20000 image is refused without decoding it.
    """
    from calcinosis.model.imageio import DEFAULT_MAX_PIXELS, image_size, read_rgb

    name = display_name(filename)
    if len(data) == 0:
        raise UploadError(400, f"{name}: the upload is empty (0 bytes); choose the file again")
    if len(data) > max_bytes:
        raise UploadError(
            413,
            f"{name}: {len(data) / 2**20:.1f} MB is over this server's upload limit of "
            f"{max_bytes / 2**20:.1f} MB; export a smaller region, or put whole slides in the "
            "slides folder (calcinosis serve --slides DIR)",
        )
    kind = sniff(data[:16])
    if kind is None:
        what = describe_content(data)
        raise UploadError(
            415,
            f"{name}: the file's content is {what}, not an image; the page reads {ACCEPTED} "
            "(checked by the file's content, not its name)",
        )
    fmt, suffix = kind
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}{suffix}"
    path.write_bytes(data)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    try:
        w, h = image_size(path)
    except ImageReadError as exc:
        raise UploadError(422, f"{name}: {_short(exc, path, name)}") from None
    if limit > 0 and w * h > limit:
        raise UploadError(
            413,
            f"{name}: {w} x {h} = {w * h:,} pixels is over the limit of {limit:,} pixels "
            "(calcinosis serve --max-pixels); export a smaller region, or put whole slides in "
            "the slides folder (calcinosis serve --slides DIR), which is read a tile at a time",
        )
    try:
        rgb = read_rgb(path, max_pixels=limit)
    except ImageReadError as exc:
        raise UploadError(422, f"{name}: {_short(exc, path, name)}") from None
    except (OSError, ValueError, MemoryError) as exc:
        raise UploadError(422, f"{name}: cannot decode the {fmt} image ({exc})") from None
    return Upload(name=name, path=path, format=fmt, rgb=rgb)


def _short(exc: Exception, path: Path, name: str) -> str:
    """The reader's message, naming the client's file rather than the server's copy."""
    text = str(exc)
    for prefix in (f"cannot read image '{path}': ", f"cannot read image '{name}': "):
        text = text.replace(prefix, "")
    return text.replace(f"'{path}'", f"'{name}'").replace(str(path), name)
