"""GeoJSON export: valid polygons, QuPath keys, coordinates inside the image."""

from __future__ import annotations

import json

import numpy as np
from shapely.geometry import MultiPolygon, Point, shape

from calcinosis.inference.geojson import feature_collection, label_map_to_features, write_geojson
from calcinosis.model.labels import AMYLOID, BONE, CALCIUM, DEPOSIT_COLORS, DEPOSIT_DISPLAY, URATE


def _label_map():
    lm = np.zeros((100, 120), np.uint8)
    lm[10:30, 10:40] = CALCIUM
    lm[15:20, 20:25] = 0  # a hole in the calcium deposit
    lm[50:90, 60:110] = BONE
    lm[60:70, 70:80] = CALCIUM  # an island inside the bone
    lm[0:6, 112:120] = AMYLOID  # touches the image border
    lm[95, 5] = URATE  # a single pixel: dropped by min_area_px
    # Two blobs touching only at a corner: the classic self-touching contour.
    lm[40:45, 0:5] = URATE
    lm[45:50, 5:10] = URATE
    return lm


def test_features_are_valid_inside_the_image_and_qupath_shaped():
    lm = _label_map()
    feats = label_map_to_features(lm, mpp=0.5, min_area_px=4, properties={"source": "x.png"})
    names = sorted(f["properties"]["classification"]["name"] for f in feats)
    assert names.count(DEPOSIT_DISPLAY[CALCIUM]) == 2
    assert DEPOSIT_DISPLAY[BONE] in names and DEPOSIT_DISPLAY[AMYLOID] in names
    for f in feats:
        assert f["type"] == "Feature"
        props = f["properties"]
        assert props["objectType"] == "annotation"
        cls = props["classification"]
        assert set(cls) == {"name", "color"} and len(cls["color"]) == 3
        lab = props["label"]
        assert tuple(cls["color"]) == DEPOSIT_COLORS[lab]
        m = props["measurements"]
        assert m["area_um2"] == m["area_px"] * 0.25
        assert props["source"] == "x.png"
        geom = f["geometry"]
        assert geom["type"] in ("Polygon", "MultiPolygon")
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for poly in polys:
            for ring in poly:
                assert ring[0] == ring[-1] and len(ring) >= 4  # closed rings
                xs, ys = zip(*ring, strict=True)
                assert 0 <= min(xs) and max(xs) <= 120 and 0 <= min(ys) and max(ys) <= 100
        g = shape(geom)
        assert g.is_valid and not g.is_empty
        # The outline runs a quarter pixel inside the pixel edges.
        assert m["area_px"] - 0.25 * g.length - 1 <= g.area <= m["area_px"]
    # The hole survives.
    calcium = [shape(f["geometry"]) for f in feats if f["properties"]["label"] == CALCIUM]
    assert any(len(g.interiors) == 1 for g in calcium if g.geom_type == "Polygon")
    # JSON round trip as QuPath would read it.
    fc = json.loads(json.dumps(feature_collection(feats, {"image": "x.png"})))
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == len(feats)


def test_offset_scale_and_no_mpp():
    lm = np.zeros((20, 20), np.uint8)
    lm[2:6, 4:8] = CALCIUM  # 4x4 pixels
    (f,) = label_map_to_features(lm, mpp=None, offset=(1000, 2000), scale=2.0, min_area_px=1)
    g = shape(f["geometry"])
    assert g.bounds == (1008.5, 2004.5, 1015.5, 2011.5)
    assert f["properties"]["measurements"] == {"Area px^2": 64.0, "area_px": 64.0}


def test_thin_strands_and_noise_give_valid_polygons_quickly():
    """One-pixel strands, corner contacts and speckle: valid without slow repairs."""
    import time

    rng = np.random.default_rng(0)
    lm = (rng.random((256, 256)) < 0.45).astype(np.uint8) * CALCIUM  # salt-and-pepper
    lm[100, :] = CALCIUM  # a one-pixel-wide line across everything
    t0 = time.perf_counter()
    feats = label_map_to_features(lm, 0.5, min_area_px=1)
    assert time.perf_counter() - t0 < 10
    assert feats
    for f in feats:
        g = shape(f["geometry"])
        assert g.is_valid and g.area > 0


def test_min_area_and_empty_map(tmp_path):
    lm = np.zeros((30, 30), np.uint8)
    assert label_map_to_features(lm, 0.5) == []
    lm[0, 0] = CALCIUM
    assert label_map_to_features(lm, 0.5, min_area_px=2) == []
    p = write_geojson(tmp_path / "x.geojson", feature_collection([]))
    assert json.loads(p.read_text())["features"] == []


def test_checkerboard_contacts_are_bridged_and_nothing_is_removed() -> None:
    from calcinosis.inference.geojson import _trace, _well_compose  # internals under test

    rng = np.random.default_rng(3)
    for density in (0.3, 0.5, 0.7):
        m = (rng.random((60, 70)) < density).astype(np.uint8)
        fixed = m.copy()
        _well_compose(fixed)
        assert np.all(fixed >= m)  # only bridges are added
        a, b, c, d = fixed[:-1, :-1], fixed[:-1, 1:], fixed[1:, :-1], fixed[1:, 1:]
        assert not np.any((a & d & (1 - b) & (1 - c)) | (b & c & (1 - a) & (1 - d)))
        # the outlines cover the labelled pixels and leave the others out, probed
        # at each pixel centre (bridged pixels may fall either way)
        union = MultiPolygon(_trace(m, 0.0)).buffer(0)
        for y, x in np.ndindex(*m.shape):
            inside = union.contains(Point(x + 0.5, y + 0.5))
            assert inside == bool(m[y, x]) or (inside and fixed[y, x]), (y, x)
