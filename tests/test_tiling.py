"""Tiling, blending and the tissue/focus checks: pure NumPy/OpenCV, no torch."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calcinosis.inference.tiling import Stitcher, blend_weights, tile_grid
from calcinosis.inference.tissue import focus_measure, tissue_fraction, tissue_mask


def _stitch(shape, tiles, tile, overlap) -> Stitcher:
    """The Stitcher fed tiles in row-major order, keeping float32 probabilities to compare."""
    st_ = Stitcher(
        shape, tiles[0][2].shape[-1], tile, overlap, keep_probs=True, probs_dtype=np.float32
    )
    for y0, x0, m in tiles:
        st_.add(y0, x0, m)
    st_.finish()
    return st_


def _coverage(shape, tile, overlap):
    cov = np.zeros(shape, dtype=np.int32)
    for y0, x0 in tile_grid(shape, tile, overlap):
        cov[y0 : y0 + tile, x0 : x0 + tile] += 1
    return cov


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 400),
    w=st.integers(1, 400),
    tile=st.integers(8, 128),
    frac=st.floats(0.0, 0.75),
)
def test_tile_grid_covers_every_pixel_and_stays_inside(h, w, tile, frac):
    overlap = int(tile * frac)
    grid = tile_grid((h, w), tile, overlap)
    hp, wp = max(h, tile), max(w, tile)  # images smaller than a tile are padded first
    for y0, x0 in grid:
        assert 0 <= y0 <= hp - tile and 0 <= x0 <= wp - tile
    assert (_coverage((hp, wp), tile, overlap)[:h, :w] > 0).all()
    # Row-major order, no duplicates.
    assert grid == sorted(set(grid))


def test_tile_grid_last_tile_is_flush_and_rejects_bad_overlap():
    grid = tile_grid((300, 500), 128, 32)
    assert max(y for y, _ in grid) == 300 - 128
    assert max(x for _, x in grid) == 500 - 128
    with pytest.raises(ValueError):
        tile_grid((300, 500), 128, 128)


def test_blend_weights_positive_smooth_and_flat_inside():
    w = blend_weights(64, 16)
    assert w.dtype == np.float32 and w.shape == (64, 64)
    assert (w > 0).all() and w.max() == pytest.approx(1.0)
    assert np.allclose(w[16:48, 16:48], 1.0)
    # Monotone ramp at the edge, symmetric window.
    assert (np.diff(w[32, :16]) > 0).all()
    assert np.allclose(w, w[::-1, ::-1])


@pytest.mark.parametrize(
    "shape,tile,overlap", [((300, 500), 64, 16), ((97, 131), 32, 8), ((40, 70), 64, 16)]
)
def test_constant_maps_stitch_back_exactly(shape, tile, overlap):
    """Every tile says the same thing -> the stitched map says exactly that (no seams)."""
    const = np.array([0.1, 0.6, 0.05, 0.2, 0.05], np.float32)
    hp, wp = max(shape[0], tile), max(shape[1], tile)
    tiles = [
        (y, x, np.broadcast_to(const, (tile, tile, 5)))
        for y, x in tile_grid((hp, wp), tile, overlap)
    ]
    st_ = _stitch(shape, tiles, tile, overlap)
    assert st_.coverage.all()
    assert st_.probs.shape == (*shape, 5)
    np.testing.assert_allclose(
        st_.probs, np.broadcast_to(const, st_.probs.shape), rtol=0, atol=1e-6
    )
    assert (st_.label_map == 1).all()
    assert st_.label_counts.tolist() == [0, shape[0] * shape[1], 0, 0, 0]


def test_stitching_a_smooth_field_leaves_no_seams():
    """Tiles cut from one smooth map blend back to it: no jump at tile borders."""
    h, w, tile, overlap = 200, 260, 64, 16
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.stack([np.sin(yy / 40.0) * 0.5 + 0.5, np.cos(xx / 50.0) * 0.5 + 0.5], -1)
    tiles = [(y, x, field[y : y + tile, x : x + tile]) for y, x in tile_grid((h, w), tile, overlap)]
    st_ = _stitch((h, w), tiles, tile, overlap)
    np.testing.assert_allclose(st_.probs, field, atol=1e-5)


def test_stitcher_band_memory_and_skipped_tiles():
    h, w, tile, overlap = 700, 300, 64, 16
    s = Stitcher((h, w), 3, tile, overlap)
    # The working band is tile rows high, independent of the image height.
    assert s._acc.shape == (tile, w, 3)
    one = np.zeros((tile, tile, 3), np.float32)
    one[..., 2] = 1.0
    grid = tile_grid((h, w), tile, overlap)
    for y, x in grid:
        if 200 <= y < 400:
            continue  # a tissue-free stretch: no tile submitted
        s.add(y, x, one)
    lm = s.finish()
    assert lm.shape == (h, w)
    assert (lm[:150] == 2).all() and (lm[-150:] == 2).all()
    gap = ~s.coverage
    assert gap.any() and (lm[gap] == 0).all()
    assert s.label_counts.sum() == h * w
    with pytest.raises(RuntimeError):
        s.add(0, 0, one)


def test_stitcher_rejects_out_of_order_tiles():
    s = Stitcher((200, 200), 2, 64, 16)
    s.add(100, 0, np.zeros((64, 64, 2), np.float32))
    with pytest.raises(ValueError):
        s.add(0, 0, np.zeros((64, 64, 2), np.float32))


# --------------------------------------------------------------------------- tissue


def _tissue_like(h=128, w=128, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (230, 150, 190), np.uint8)  # eosin pink
    noise = rng.normal(0, 12, (h, w, 3))
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    for _ in range(40):  # haematoxylin nuclei
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        cv2.circle(img, (int(cx), int(cy)), 3, (70, 40, 130), -1)
    return img


def test_tissue_mask_separates_tissue_from_glass_and_black_fill():
    img = np.full((128, 256, 3), 245, np.uint8)  # glass
    img[:, 128:] = _tissue_like(128, 128)
    img[:, :20] = 0  # scanner fill at the border
    m = tissue_mask(img)
    assert m[:, 140:].mean() > 0.95
    assert m[:, 25:120].mean() < 0.02
    assert not m[:, :20].any()
    assert tissue_fraction(np.full((64, 64, 3), 250, np.uint8)) == 0.0


def test_black_deposit_inside_tissue_counts_as_tissue():
    img = _tissue_like()
    cv2.circle(img, (64, 64), 15, (5, 5, 5), -1)  # von Kossa black calcium
    assert tissue_mask(img)[64, 64]


def test_focus_measure_drops_when_blurred():
    img = _tissue_like()
    sharp = focus_measure(img)
    blurred = focus_measure(cv2.GaussianBlur(img, (0, 0), 3))
    assert sharp > 5 * blurred
    assert focus_measure(np.full((64, 64, 3), 250, np.uint8)) == 0.0


def test_label_histogram_matches_bincount_exactly():
    from calcinosis.inference.tiling import label_histogram

    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, (1500, 6001), dtype=np.uint8)  # > 2**23 pixels: several chunks
    np.testing.assert_array_equal(label_histogram(a, 5), np.bincount(a.ravel(), minlength=5))
    assert label_histogram(np.zeros((0, 4), np.uint8), 3).tolist() == [0, 0, 0]
