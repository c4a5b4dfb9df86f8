"""Overlay rendering: size, legend placement, deposit colours."""

from __future__ import annotations

import numpy as np
import pytest

from calcinosis.inference.overlay import MIN_SIDE, PANEL_WIDTH, render_overlay
from calcinosis.model.labels import BONE, CALCIUM, DEPOSIT_COLORS

PROBS = {
    "calcinosis_cutis": 0.8,
    "osteoma_cutis": 0.1,
    "gout": 0.05,
    "amyloidosis": 0.03,
    "normal": 0.02,
}


def _patch(h=128, w=128):
    img = np.full((h, w, 3), (235, 170, 200), np.uint8)
    lm = np.zeros((h, w), np.uint8)
    lm[30:90, 30:90] = CALCIUM
    lm[100:120, 5:40] = BONE
    return img, lm


def test_small_patch_is_enlarged_and_legend_sits_beside_it():
    img, lm = _patch()
    out = render_overlay(img, lm, PROBS, "calcinosis_cutis", "he", "patch 1.png", stain_prob=0.93)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    side = out.shape[1] - PANEL_WIDTH
    assert side >= MIN_SIDE and side % 128 == 0  # integer nearest-neighbour enlargement
    assert out.shape[0] >= side
    # The legend panel is not empty (text and bars drawn) and the image area is untouched by it.
    panel = out[:, side + 1 :]
    assert (panel < 200).any()


def test_calcium_pixels_take_the_calcium_colour():
    img, lm = _patch()
    out = render_overlay(img, lm, None, None, None, None)
    f = (out.shape[1] - PANEL_WIDTH) // 128
    # Middle of the calcium square, away from its contour.
    y, x = 60 * f, 60 * f
    got = out[y, x].astype(float)
    expect = 0.55 * np.array([235, 170, 200]) + 0.45 * np.array(DEPOSIT_COLORS[CALCIUM])
    np.testing.assert_allclose(got, expect, atol=3)
    # Background pixels are not tinted.
    np.testing.assert_allclose(out[10 * f, 110 * f].astype(float), [235, 170, 200], atol=3)
    # The calcium contour is drawn in the calcium colour somewhere on the boundary.
    edge = out[30 * f - 3 : 30 * f + 4, 60 * f]
    assert any(np.abs(px.astype(int) - DEPOSIT_COLORS[CALCIUM]).max() < 10 for px in edge)


def test_large_region_is_shrunk_and_everything_optional():
    img = np.full((3000, 1000, 3), 240, np.uint8)
    out = render_overlay(img, None)
    assert out.shape[0] <= 2048 + 1 and out.shape[1] == round(1000 * 2048 / 3000) + PANEL_WIDTH


def test_tall_legend_extends_the_canvas_not_the_tissue():
    img = np.full((40, 900, 3), 240, np.uint8)
    lm = np.zeros((40, 900), np.uint8)
    lm[:, :300] = CALCIUM
    out = render_overlay(
        img,
        lm,
        PROBS,
        "calcinosis_cutis",
        "von_kossa",
        "a very long title é ü",
        status="indeterminate",
    )
    assert out.shape[0] > 40  # panel needs more height than the image


def test_bad_shapes_are_rejected():
    img, lm = _patch()
    with pytest.raises(ValueError):
        render_overlay(img, lm[:10])
    with pytest.raises(ValueError):
        render_overlay(img.astype(np.float32), lm)


def test_region_overlay_lists_also_present_classes_in_the_panel():
    from calcinosis.inference.overlay import render_overlay

    rgb = np.full((64, 64, 3), 220, np.uint8)
    lm = np.zeros((64, 64), np.uint8)
    probs = {"gout": 0.8, "normal": 0.2}
    plain = render_overlay(rgb, lm, probs, "gout", "he", "r.png")
    listed = render_overlay(
        rgb, lm, probs, "gout", "he", "r.png", also_present=["amyloidosis", "osteoma_cutis"]
    )
    # three more text lines in the panel: the picture grows or its panel changes
    assert listed.shape != plain.shape or not np.array_equal(listed, plain)


def test_small_deposit_share_never_reads_zero():
    from calcinosis.inference.overlay import _percent

    assert _percent(0.0004) == "<0.1%"
    assert _percent(0.0123) == "1.2%"
    assert _percent(0.0) == "0.0%"
