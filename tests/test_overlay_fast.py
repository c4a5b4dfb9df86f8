"""Overlay speed work: exact enlargement, PNG encoding level, atomic writes, legend text."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from calcinosis.inference.overlay import (
    MIN_SIDE,
    PANEL_WIDTH,
    _fit,
    encode_png,
    render_overlay,
    write_overlay,
)
from calcinosis.model.labels import BONE, CALCIUM, DEPOSIT_COLORS

PROBS = {"calcinosis_cutis": 0.7, "osteoma_cutis": 0.1, "gout": 0.1, "amyloidosis": 0.05}


def _noisy(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_enlargement_repeats_each_pixel_as_a_square():
    img = _noisy(48, 64)
    out = render_overlay(img, None)
    f = MIN_SIDE // 48  # integer factor: 8
    assert out.shape == (48 * f, 64 * f + PANEL_WIDTH, 3)
    expected = np.repeat(np.repeat(img, f, axis=0), f, axis=1)
    np.testing.assert_array_equal(out[:, : 64 * f], expected)


def test_tint_is_exact_inside_deposits_and_absent_outside():
    img = np.full((64, 64, 3), (230, 160, 200), np.uint8)
    lm = np.zeros((64, 64), np.uint8)
    lm[10:40, 10:40] = CALCIUM
    lm[50:60, 5:60] = BONE
    out = render_overlay(img, lm, PROBS, "calcinosis_cutis", "he", "t.png")
    f = (out.shape[1] - PANEL_WIDTH) // 64
    # A whole enlarged block well inside the calcium square has one blended colour.
    block = out[25 * f : 26 * f, 25 * f : 26 * f].reshape(-1, 3)
    expect = np.round(0.55 * np.array([230, 160, 200]) + 0.45 * np.array(DEPOSIT_COLORS[CALCIUM]))
    assert (np.abs(block.astype(int) - expect).max(axis=1) <= 1).all()
    # Untinted tissue keeps its colour exactly.
    np.testing.assert_array_equal(out[45 * f, 45 * f], [230, 160, 200])
    # Both deposits are outlined in their colours near their first rows.
    for lab, (y, x) in ((CALCIUM, (10, 25)), (BONE, (50, 30))):
        column = out[y * f - 3 : y * f + f, x * f].astype(int)
        assert (np.abs(column - DEPOSIT_COLORS[lab]).max(axis=1) < 10).any(), lab


def test_legend_has_the_probability_bars_and_grows_with_deposit_keys():
    img = np.full((64, 64, 3), 220, np.uint8)
    lm = np.zeros((64, 64), np.uint8)
    one = render_overlay(img, lm, PROBS, "calcinosis_cutis", "he", "a.png", min_side=64)
    lm[:8] = CALCIUM
    lm[8:16] = BONE
    two = render_overlay(img, lm, PROBS, "calcinosis_cutis", "he", "a.png", min_side=64)
    # Taller than the 64 px image: the panel sets the height, and two key rows add to it.
    assert two.shape[0] > one.shape[0] > 64
    panel = one[:, 64 + 1 :]
    # The top class's bar is drawn in the highlight colour (200, 60, 40).
    assert (np.abs(panel.astype(int) - (200, 60, 40)).max(axis=2) < 4).sum() > 50


def test_fit_is_ascii_and_shortened():
    assert _fit("épreuve ü", 500, 0.5, 1) == "?preuve ?"
    long = "x" * 200
    cut = _fit(long, 100, 0.5, 1)
    assert cut.endswith("~") and len(cut) < 50
    assert _fit(long, 100, 0.5, 1) is cut  # cached


@pytest.mark.parametrize("shape", [(40, 70, 3), (33, 21)])
def test_encode_png_round_trips_at_every_level(shape):
    noise = _noisy(*shape[:2])
    ramp = np.broadcast_to(np.arange(shape[1], dtype=np.uint8)[None, :, None], noise.shape)
    for img in (noise, np.ascontiguousarray(ramp)):
        img = img if len(shape) == 3 else img[..., 0]
        sizes = {}
        for level in (0, 1, 6, 9):
            data = encode_png(img, level)
            back = np.asarray(Image.open(io.BytesIO(data)))
            np.testing.assert_array_equal(back, img)
            sizes[level] = len(data)
    assert sizes[0] > sizes[1]  # on the ramp: level 0 stores, 1 compresses


def test_encode_png_level_trades_size_on_an_overlay():
    out = render_overlay(_noisy(64, 64), None, PROBS, "gout", "he", "x.png")
    assert len(encode_png(out, 0)) > 2 * len(encode_png(out, 1))
    assert len(encode_png(out, 9)) <= len(encode_png(out, 1))


def test_encode_png_rejects_bad_input():
    with pytest.raises(ValueError, match="0-9"):
        encode_png(_noisy(4, 4), 10)
    with pytest.raises(ValueError):
        encode_png(_noisy(4, 4).astype(np.float32))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 4), np.uint8))


def test_write_overlay_writes_a_readable_file_and_no_temp(tmp_path):
    img = render_overlay(_noisy(16, 16), None)
    p = write_overlay(tmp_path / "sub" / "o.png", img, compress_level=3)
    assert p == tmp_path / "sub" / "o.png"
    np.testing.assert_array_equal(np.asarray(Image.open(p)), img)
    assert [x.name for x in (tmp_path / "sub").iterdir()] == ["o.png"]
