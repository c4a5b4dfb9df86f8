"""Large regions streamed to disk (``inference.bigmap``): the same answers as the in-memory path.

A region above ``bigmap.STREAM_MIN_PX`` pixels keeps no full-size map: its
labels go to a pyramidal OME-TIFF a band at a time and its lesions are found
band-wise (``streamlesions.BandLesions``). These tests lower the threshold so
that a small region takes that path, and compare it with the whole-map path on
the same region: the TIFF's full level equals the label map, the lesions,
areas and call are equal, and the files ``predict`` writes come out.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import tifffile
from helpers import mosaic

from calcinosis.inference import bigmap
from calcinosis.inference.lesions import find_lesions
from calcinosis.inference.region import predict_source
from calcinosis.inference.streamlesions import BandLesions
from calcinosis.inference.tiling import ArraySource
from calcinosis.model.labels import CLASS_NAMES, DEPOSIT_LABELS


def _region() -> np.ndarray:
    """Fixture patches with deposits (9 x 7 of 64 px) on glass: lesions cross many bands."""
    return mosaic(9, 7, margin=40)


def _both(predictor, image: np.ndarray, mpp: float):
    """The region predicted in memory, then streamed (the threshold lowered to stream it)."""
    whole = predict_source(predictor, ArraySource(image), mpp=mpp, name="r")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bigmap, "STREAM_MIN_PX", 1000)
        streamed = predict_source(predictor, ArraySource(image), mpp=mpp, name="r")
    return whole, streamed


@pytest.mark.parametrize(
    "mpp",
    [0.5, pytest.param(0.4, marks=pytest.mark.slow)],  # the model's mpp; resampled
)
def test_a_streamed_region_equals_the_in_memory_one(robust_predictor, mpp):
    whole, streamed = _both(robust_predictor, _region(), mpp)
    assert whole.label_file is None and streamed.label_map is None
    try:
        with tifffile.TiffFile(streamed.label_file.tiff) as tif:
            series = tif.series[0]
            levels = [lv.asarray() for lv in series.levels]
            assert tif.is_ome and series.pages[0].is_tiled
        assert len(levels) >= 2, "a pyramid: full size and at least one level below"
        np.testing.assert_array_equal(levels[0], whole.label_map)
        for k, lv in enumerate(levels[1:], start=1):
            np.testing.assert_array_equal(lv, whole.label_map[:: 2**k, :: 2**k])
        assert streamed.lesions == whole.lesions and whole.lesions
        assert streamed.to_dict(include_tiles=True) == whole.to_dict(include_tiles=True)
        step = streamed.label_file.step
        np.testing.assert_array_equal(
            streamed.label_file.thumbnail, whole.label_map[::step, ::step]
        )
    finally:
        streamed.release_maps()


def test_band_lesions_equal_whole_map_lesions_across_band_boundaries():
    """Random discs and diagonal pairs that touch only across a band boundary."""
    rng = np.random.default_rng(0)
    h, w, band = 700, 900, 100
    lm = np.zeros((h, w), np.uint8)
    for _ in range(60):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(lm, centre, int(rng.integers(2, 40)), int(rng.integers(1, 5)), -1)
    for y in range(band, h, band):  # 8-connected only diagonally, across the boundary
        lm[y - 1, 10:14], lm[y, 14:18] = 1, 2
    dp = rng.integers(128, 256, (h, w)).astype(np.uint8)
    boxes = np.array([(y, x, 128) for y in range(0, h - 64, 96) for x in range(0, w - 64, 96)])
    probs = rng.dirichlet(np.ones(len(CLASS_NAMES)), len(boxes))
    focus = rng.random(len(boxes)) > 0.2
    kw = dict(mpp=0.5, class_names=CLASS_NAMES, deposit_labels=DEPOSIT_LABELS)
    kw.update(min_area_um2=3.0, lesion_threshold=0.5, fallback_probs=probs[0])
    ref = find_lesions(
        lm, tile_boxes=boxes, tile_probs=probs, tile_in_focus=focus, deposit_prob=dp, **kw
    )
    finder = BandLesions(w, len(DEPOSIT_LABELS), with_prob=True)
    for y0 in range(0, h, band):
        finder.add(lm[y0 : y0 + band], dp[y0 : y0 + band], boxes)
    got, seeds = finder.finish(tile_probs=probs, tile_in_focus=focus, **kw)
    assert len(ref.lesions) > 20
    assert got.lesions == ref.lesions
    assert any(les["bbox"][1] < band <= les["bbox"][1] + les["bbox"][3] for les in got.lesions)
    assert all(lm[y, x] > 0 for x, y in seeds)


@pytest.mark.slow
def test_predict_writes_the_streamed_map_and_traces_the_same_outlines(robust_predictor, tmp_path):
    """predict's files for a streamed region: the TIFF in maps/, the same GeoJSON outlines."""
    from calcinosis.inference.outputs import planned_files, write_outputs

    rgb = _region()
    whole, streamed = _both(robust_predictor, rgb, 0.5)
    expected = whole.label_map.copy()
    outs = {}
    for tag, res in (("whole", whole), ("streamed", streamed)):
        files = planned_files(tmp_path / tag, "r", res, overlays=True, geojson=True)
        write_outputs(tmp_path / tag, "r", res, rgb, files)
        outs[tag] = files
        assert res.label_map is None and res.label_file is None  # released
    assert "label_map" not in outs["whole"]
    tif = tmp_path / "streamed" / outs["streamed"]["label_map"]
    np.testing.assert_array_equal(tifffile.imread(tif), expected)
    geo = [json.loads((tmp_path / t / "geojson" / "r.geojson").read_text()) for t in outs]
    assert geo[0]["features"] == geo[1]["features"] and geo[0]["features"]
    assert (tmp_path / "streamed" / "overlays" / "r.png").stat().st_size > 0


@pytest.mark.slow
def test_a_12000_px_slide_region_stays_under_its_memory_ceiling(tmp_path):
    """``predict --level 0`` on a 12000^2 region (streamed) in a child: peak RSS under 1.75 GiB.

    The slide is the benchmark's (one synthetic block repeated, tissue in one
    block of 3 x 3); in memory this region's maps alone (label map, coverage,
    deposit probability, int32 components) would take about 1.0 GB on top of
    the model and the stitcher's band.
    """
    import resource
    import sys

    from helpers import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_region_memory as bench

    slide = bench.make_slide(tmp_path / "s.tif", 12000, 1024, every=3)
    ckpt = bench.make_checkpoint(tmp_path / "tiny.safetensors", 128)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    secs, rss, rec = bench.predict(slide, ckpt, tmp_path / "out", [])
    assert rec["status"] != "error", rec["reason"]
    assert "label_map" in rec["outputs"], "a region this size is streamed"
    assert rss > before * 1024, "the ceiling is measured on the child that predicted"
    # 1.75 GiB: the model, the band and the reader's queue took 1.45-1.55 GiB over
    # runs here; the in-memory path would add its ~1.0 GB of maps on top.
    assert rss < 1.75 * 2**30, f"peak RSS {rss / 2**20:.0f} MiB"
