"""Atomic writes: whole file or old file, never half; temp files cleaned up; normal permissions."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from calcinosis.model.fileio import (
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
)

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_bytes_and_text_round_trip_and_overwrite(tmp_path):
    p = atomic_write_bytes(tmp_path / "new" / "a.bin", b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write_bytes(p, b"second")
    assert p.read_bytes() == b"second"
    t = atomic_write_text(tmp_path / "t.txt", "épreuve\n")
    assert t.read_bytes() == "épreuve\n".encode()
    with atomic_write(tmp_path / "c.csv", "w", newline="") as fh:
        fh.write("a,b\r\n")
    assert (tmp_path / "c.csv").read_bytes() == b"a,b\r\n"
    assert sorted(x.name for x in tmp_path.rglob("*")) == ["a.bin", "c.csv", "new", "t.txt"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path, error):
    p = atomic_write_text(tmp_path / "keep.json", '{"epoch": 1}')
    with pytest.raises(error), atomic_write(p, "w") as fh:
        fh.write('{"epoch": 2, "half')
        raise error
    with pytest.raises(error), atomic_path(p) as tmp:
        tmp.write_bytes(b"half a file")
        raise error
    assert p.read_text() == '{"epoch": 1}'
    assert [x.name for x in tmp_path.iterdir()] == ["keep.json"]


def test_no_temp_is_left_when_the_target_cannot_be_replaced(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "dir", b"x")  # a folder is in the way
    assert [x.name for x in tmp_path.iterdir()] == ["dir"]


def test_bad_mode_is_refused(tmp_path):
    for mode in ("a", "r", "wb+"):
        with pytest.raises(ValueError, match="modes"), atomic_write(tmp_path / "x", mode):
            pass
    assert not list(tmp_path.iterdir())


def test_concurrent_writers_never_mix(tmp_path):
    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [
        threading.Thread(target=atomic_write_bytes, args=(target, data), kwargs={"fsync": False})
        for data in payloads
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_bytes() in payloads  # one whole payload, never a mixture
    assert [x.name for x in tmp_path.iterdir()] == ["shared.bin"]


@posix_only
def test_text_and_bytes_follow_the_umask(tmp_path):
    with umask(0o022):
        assert mode_of(atomic_write_text(tmp_path / "a.txt", "x")) == 0o644
    with umask(0o077):
        assert mode_of(atomic_write_bytes(tmp_path / "b.bin", b"x")) == 0o600


@posix_only
def test_png_and_checkpoint_are_readable_by_others_under_umask_022(tmp_path, robust_checkpoint):
    """mkstemp makes 0600 files: overlays and checkpoints were unreadable to colleagues."""
    from calcinosis.model import load_checkpoint, read_checkpoint_metadata, save_checkpoint
    from calcinosis.model.imageio import read_rgb, write_png

    model, meta = load_checkpoint(robust_checkpoint)
    img = np.full((8, 8, 3), 200, np.uint8)
    with umask(0o022):
        png = write_png(tmp_path / "overlay.png", img)
        ckpt = save_checkpoint(tmp_path / "last.safetensors", model, meta)
        ckpt_again = save_checkpoint(ckpt, model, {**meta, "epoch": 2})  # replacing keeps it
    for path in (png, ckpt_again):
        mode = mode_of(path)
        assert mode & stat.S_IRGRP and mode & stat.S_IROTH, oct(mode)
        assert not mode & (stat.S_IWGRP | stat.S_IWOTH), oct(mode)
    np.testing.assert_array_equal(read_rgb(png), img)
    assert read_checkpoint_metadata(ckpt)["epoch"] == 2
    assert sorted(x.name for x in tmp_path.iterdir()) == ["last.safetensors", "overlay.png"]
