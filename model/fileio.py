"""Atomic file writes (a reader, or a run killed mid-write, sees the old file or the new one)
and the one conversion of results to JSON types (:func:`to_jsonable`).

Every file the project writes that someone else may read while it is being
written (checkpoints, ``state.pt``, overlays, manifests, ONNX exports) goes
through here: the bytes go to a temporary file in the same folder (so the
final rename never crosses file systems), which is flushed and renamed over
the target with :func:`os.replace`. Any exception, KeyboardInterrupt
included, removes the temporary file and leaves the target untouched.

The temporary file is created with ``os.open(..., 0o666)``, so the kernel
applies the umask exactly as for a plain ``open()``, and the final file keeps
those bits even when the writer recreates the file itself (safetensors does,
as 0600): readable by group and others under the usual umask 022.
(``tempfile.mkstemp`` creates 0600 files, which made shared overlays and
checkpoints unreadable to other users.)
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_digest",
    "to_jsonable",
]

PathLike = str | os.PathLike


def _create_temp(target: Path, suffix: str = ".tmp") -> tuple[Path, int]:
    """A new, empty file beside ``target`` and its permission bits (0o666 & ~umask).

    The kernel applies the umask at creation, so the bits are read back from
    the file rather than by toggling ``os.umask`` (process-wide, not thread-safe).
    """
    fd, tmp = _open_temp(target, suffix)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    return tmp, mode


def _open_temp(target: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new, empty file beside ``target``, open for writing: ``(descriptor, path)``.

    Created with ``0o666`` so the kernel applies the umask as for ``open()``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        # Hidden, and unique per writer: threads or DDP ranks writing the same
        # target never share a temporary file.
        # (The name is shortened so a long target name stays within NAME_MAX.)
        tmp = target.with_name(f".{target.name[:120]}.{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {target}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, fsync: bool = True, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    For writers that insist on a file name (safetensors, ONNX, OpenCV): they
    write the yielded path, and when the block ends without an exception the
    file is flushed to disk (``fsync=True``) and renamed over ``path``. The
    parent folder is created if needed. ``suffix`` ends the temporary name,
    for writers that pick the format from it (``cv2.imwrite`` needs ``.png``).
    """
    with _replacing(path, sync_file=fsync, sync_dir=fsync, suffix=suffix) as tmp:
        yield tmp


@contextlib.contextmanager
def _replacing(
    path: PathLike, *, sync_file: bool, sync_dir: bool, suffix: str = ".tmp"
) -> Iterator[Path]:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temp(target, suffix)
    try:
        yield tmp
        # Writers that recreate the file themselves (safetensors does, with
        # 0600) would otherwise leave it private: restore the normal bits.
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        if sync_file:
            _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_write(
    path: PathLike,
    mode: str = "wb",
    *,
    encoding: str | None = None,
    newline: str | None = None,
    fsync: bool = True,
) -> Iterator[IO[Any]]:
    """Open ``path`` for writing, atomically: ``with atomic_write(p, "w") as fh: ...``.

    ``mode`` is ``"wb"`` (default) or ``"w"``/``"wt"`` (text; ``encoding``
    defaults to UTF-8). The handle writes a temporary file that replaces
    ``path`` only when the block ends without an exception.
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(f"atomic_write supports modes 'wb', 'w' and 'wt', not {mode!r}")
    text = "b" not in mode
    if not text and (encoding is not None or newline is not None):
        raise ValueError("encoding and newline apply to text mode only")
    # The handle itself is synced before it closes; the rename is synced after.
    with _replacing(path, sync_file=False, sync_dir=fsync) as tmp:
        kwargs: dict[str, Any] = (
            {"encoding": encoding or "utf-8", "newline": newline} if text else {}
        )
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())


def atomic_write_bytes(path: PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    The bytes go through the descriptor that created the temporary file (no
    second open, no Python file object): about half the system calls of
    :func:`atomic_write`, which counts when a run writes thousands of small
    files (overlays, GeoJSON). The parent folder is created if needed.
    """
    target = Path(path)
    try:
        fd, tmp = _open_temp(target)
    except FileNotFoundError:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _open_temp(target)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        _fsync_dir(target.parent)
    return target


def atomic_write_text(
    path: PathLike,
    text: str,
    *,
    encoding: str = "utf-8",
    newline: str | None = None,
    fsync: bool = True,
) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default) and return the path."""
    with atomic_write(path, "w", encoding=encoding, newline=newline, fsync=fsync) as fh:
        fh.write(text)
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    """Recursively turn numpy values, tuples and paths into JSON types; NaN/inf -> None.

    The one sanitiser for everything the project writes as JSON (metrics.json,
    the run history, predictions.json): numpy scalars and arrays become Python
    numbers and lists, a NaN or infinite value (numpy's or Python's) becomes
    None (JSON has no NaN), a ``Path`` its string, any other object its ``str``.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def file_digest(path: PathLike) -> str:
    """SHA-256 of a file's bytes, hex (identifies a checkpoint: exports, cohort markers, the page)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
