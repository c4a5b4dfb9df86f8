"""Test helpers shared by several test modules (imported as ``from helpers import ...``)."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: The tiny training config of the training tests (configs/ci.yaml: resnet10t).
CI_CONFIG = REPO / "configs" / "ci.yaml"


def tissue(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """Pink, textured 'tissue' with purple nuclei: passes the tissue and focus checks."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal((225, 150, 190), 14, (h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(max(4, h * w // 300)):
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), 4, (80, 40, 130), -1)
    return img


def make_train_cfg(manifest: Path, out: Path, *overrides: str):
    """configs/ci.yaml on ``manifest``, writing to ``out``: two steps of 4 per epoch."""
    from calcinosis.training.config import load_config

    base = [
        "data.source=manifest",
        f"data.manifest={manifest}",
        f"output_dir={out}",
        "train.max_steps_per_epoch=2",
        "train.batch_size=4",
    ]
    return load_config(CI_CONFIG, [*base, *overrides])


# --------------------------------------------------------------------------- the page (calcinosis serve)
# Test images, small slides and following a job, for tests/test_serve_*.py.
FIXTURES = REPO / "tests" / "fixtures" / "images"
#: A fixture patch with calcium deposits (64 x 64 px at 0.5 um/px, the tiny model's input).
PATCH = FIXTURES / "calcinosis_cutis" / "he_0000.png"


def fixture_patches() -> list[np.ndarray]:
    """Every committed fixture patch, RGB, in a fixed order."""
    out = []
    for p in sorted(FIXTURES.rglob("*.png")):
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return out


def mosaic(cols: int, rows: int, margin: int = 0) -> np.ndarray:
    """Fixture patches side by side (tissue with deposits everywhere), on white glass."""
    patches = fixture_patches()
    s = patches[0].shape[0]
    img = np.full((rows * s + 2 * margin, cols * s + 2 * margin, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            p = patches[(r * cols + c) % len(patches)]
            img[margin + r * s : margin + (r + 1) * s, margin + c * s : margin + (c + 1) * s] = p
    return img


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def huge_png(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of ``width x height`` (tiny on disk, huge decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    row = b"\x00" + b"\xff" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float, tile: int = 64) -> Path:
    """A tiled pyramidal TIFF (levels halved down to ~64 px, in SubIFDs) at ``mpp`` um/px."""
    import tifffile

    levels = [rgb]
    while max(levels[-1].shape[:2]) > 128:
        lv = levels[-1]
        levels.append(
            cv2.resize(lv, (lv.shape[1] // 2, lv.shape[0] // 2), interpolation=cv2.INTER_AREA)
        )
    opts = {"photometric": "rgb", "compression": "zlib", "metadata": None, "tile": (tile, tile)}
    res = 1e4 / mpp  # pixels per centimetre
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            levels[0],
            subifds=len(levels) - 1,
            resolution=(res, res),
            resolutionunit="CENTIMETER",
            **opts,
        )
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)
    return path


def follow(client, job: dict, timeout: float = 60.0) -> dict:
    """Long-poll a job (TestClient or anything with ``.get``) until it finishes."""
    deadline = time.monotonic() + timeout
    snap = job
    while snap["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"job {snap['id']} still {snap['state']}"
        r = client.get(f"/api/jobs/{snap['id']}", params={"since": snap["version"], "wait": 5})
        assert r.status_code == 200, r.text
        snap = r.json()
    return snap
