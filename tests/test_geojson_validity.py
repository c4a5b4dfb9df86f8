"""Our GeoJSON, read the way QuPath reads it, and its outlines checked with shapely.

What QuPath's own reader (qupath-core ``PathIO.readObjectsFromGeoJSON`` ->
``PathObjectTypeAdapters`` / ``ROITypeAdapters`` / ``GsonTools.PathClassTypeAdapter``)
requires of a file, and so what every file we write is checked for here:

- a ``FeatureCollection`` of ``Feature`` objects; ``properties.objectType``
  "annotation"; ``properties.name`` a string;
- ``classification`` an object with ``name`` *and* ``color`` (a name alone is
  not parsed: "Unable to parse PathClass"); the colour 3 integers 0-255; the
  name without ``:`` (QuPath splits a class at its delimiter into a derived
  class), line breaks or surrounding blanks, and only letters, digits, blanks
  and ASCII punctuation (``PathClass.validateNameCharacters``);
- ``measurements`` a map of name to number (read as ``Map<String, Double>``):
  finite numbers, since NaN is not JSON outside QuPath's lenient parser;
- every ring closed with at least 4 positions (JTS ``LinearRing``);
- valid polygons (no self-intersections), so that QuPath's area and
  "contains" tests mean what they say, and holes exactly where the mask has
  holes.

The label maps built here have a hole, a ring (thick and one pixel wide), two
blobs touching at a corner, two labels sharing an edge, and one-pixel-wide
lines; they go through the writer (``inference.geojson``) directly and through
the whole ``calcinosis predict`` path (a stand-in network paints the map the
image shows, so the expected outlines are known).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import LinearRing, shape

from calcinosis.inference.cli import main as cli_main
from calcinosis.inference.geojson import (
    MIN_AREA_PX,
    feature_collection,
    label_map_to_features,
    lesion_features,
    write_geojson,
)
from calcinosis.inference.lesions import find_lesions
from calcinosis.model.labels import (
    AMYLOID,
    BONE,
    CALCIUM,
    CLASS_NAMES,
    DEPOSIT_COLORS,
    DEPOSIT_DISPLAY,
    DEPOSIT_LABELS,
)

# PathClass.validateNameCharacters (QuPath >= 0.4): \w, letters, digits, blank and
# Java's \p{Punct} (ASCII punctuation); the delimiter ':' is refused outright.
_PUNCT = re.escape("!\"#$%&'()*+,-./;<=>?@[\\]^_`{|}~")
QUPATH_CLASS_NAME = re.compile(rf"[\w {_PUNCT}]+")


# --------------------------------------------------------------------------- checks


def _strict_json(text: str) -> dict:
    def no_constant(name: str) -> None:
        raise AssertionError(f"{name} in GeoJSON: not JSON, and not a number QuPath can show")

    return json.loads(text, parse_constant=no_constant)


def read_checked(path: Path) -> list[tuple[dict, object]]:
    """Parse one of our GeoJSON files as QuPath would; (properties, shapely geometry) per feature."""
    raw = path.read_bytes()
    assert raw.isascii(), f"{path.name}: non-ASCII bytes (QuPath v0.4 reads the platform charset)"
    fc = _strict_json(raw.decode("ascii"))
    assert fc["type"] == "FeatureCollection" and isinstance(fc["features"], list)
    return [check_feature(f) for f in fc["features"]]


def check_feature(f: dict) -> tuple[dict, object]:
    assert f["type"] == "Feature"
    props = f["properties"]
    assert props["objectType"] == "annotation"
    assert isinstance(props["name"], str) and props["name"]
    cls = props["classification"]
    assert set(cls) == {"name", "color"}, cls
    name = cls["name"]
    assert isinstance(name, str) and name == name.strip() and name, name
    assert ":" not in name and "\n" not in name and "\r" not in name, name
    assert QUPATH_CLASS_NAME.fullmatch(name), f"QuPath refuses class name {name!r}"
    col = cls["color"]
    assert len(col) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in col), col
    meas = props["measurements"]
    assert isinstance(meas, dict) and meas
    for k, v in meas.items():
        assert isinstance(k, str) and k
        assert isinstance(v, (int, float)) and not isinstance(v, bool), (k, v)
        assert math.isfinite(v), (k, v)
    geom = f["geometry"]
    assert geom["type"] in ("Polygon", "MultiPolygon"), geom["type"]
    polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
    assert polys
    for poly in polys:
        assert poly, "a polygon without an exterior ring"
        for ring in poly:
            assert len(ring) >= 4, "a LinearRing needs at least 4 positions"
            assert ring[0] == ring[-1], "ring not closed"
            for pos in ring:
                assert len(pos) == 2 and all(math.isfinite(c) for c in pos), pos
            lr = LinearRing(ring)
            assert lr.is_simple, f"self-intersecting ring: {shapely.is_valid_reason(lr)}"
    g = shape(geom)
    assert g.is_valid, shapely.is_valid_reason(g)
    assert not g.is_empty and g.area > 0
    return props, g


def holes_of(component: np.ndarray, min_hole_px: float) -> int:
    """Holes of one 8-connected component: 4-connected background areas it encloses."""
    bg = (~component).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(bg, connectivity=4)
    h, w = component.shape
    count = 0
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        touches_border = x == 0 or y == 0 or x + bw == w or y + bh == h
        if not touches_border and area >= min_hole_px:
            count += 1
    return count


def assert_outlines_match(
    mask: np.ndarray, geoms: list, *, min_hole_px: float = MIN_AREA_PX, corner_slack: int = 0
) -> None:
    """The outlines cover exactly ``mask``'s pixels (probed at pixel centres), component by
    component with the same holes; ``corner_slack`` off-mask pixels may be covered where a
    diagonal contact was bridged."""
    assert geoms, "no outline for a non-empty mask"
    n, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    ys, xs = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    cx, cy = xs.ravel() + 0.5, ys.ravel() + 0.5
    union = shapely.union_all(geoms)
    inside = shapely.contains_xy(union, cx, cy).reshape(mask.shape)
    missed = mask & ~inside
    extra = inside & ~mask
    assert not missed.any(), f"{int(missed.sum())} mask pixels outside the outlines"
    assert int(extra.sum()) <= corner_slack, f"{int(extra.sum())} non-mask pixels inside"
    assert len(geoms) == n - 1, f"{len(geoms)} outlines for {n - 1} connected components"
    for g in geoms:
        # The component whose pixels this outline covers, and its holes.
        ids = np.unique(comp[shapely.contains_xy(g, cx, cy).reshape(mask.shape) & mask])
        assert ids.size == 1 and ids[0] > 0, ids
        expected = holes_of(comp == ids[0], min_hole_px)
        parts = [g] if g.geom_type == "Polygon" else list(g.geoms)
        got = sum(len(p.interiors) for p in parts)
        assert got == expected, f"{got} holes in the outline, {expected} in the mask"


# --------------------------------------------------------------------------- label maps

S = 128


def _hole() -> np.ndarray:
    lm = np.zeros((S, S), np.uint8)
    lm[20:60, 20:70] = CALCIUM
    lm[30:40, 30:42] = 0  # one hole
    lm[45:52, 50:60] = 0  # and another
    return lm


def _ring() -> np.ndarray:
    lm = np.zeros((S, S), np.uint8)
    cv2.circle(lm, (64, 64), 40, CALCIUM, thickness=10)  # a thick ring
    cv2.circle(lm, (64, 64), 12, CALCIUM, thickness=-1)  # an island in its hole
    return lm


def _thin_ring() -> np.ndarray:
    lm = np.zeros((S, S), np.uint8)
    cv2.circle(lm, (64, 64), 30, CALCIUM, thickness=1)  # one pixel wide, diagonal steps
    cv2.rectangle(lm, (8, 8), (40, 30), BONE, thickness=1)  # a one-pixel square frame
    return lm


def _touching() -> np.ndarray:
    lm = np.zeros((S, S), np.uint8)
    lm[10:30, 10:30] = CALCIUM
    lm[30:50, 30:50] = CALCIUM  # touches the first block at one corner only
    lm[70:100, 10:40] = BONE
    lm[70:100, 40:70] = AMYLOID  # shares an edge with the bone
    return lm


def _lines() -> np.ndarray:
    lm = np.zeros((S, S), np.uint8)
    lm[10, 5:120] = CALCIUM  # horizontal, one pixel wide
    lm[20:120, 5] = CALCIUM  # vertical; touches nothing
    cv2.line(lm, (20, 30), (120, 110), CALCIUM, thickness=1)  # diagonal: corner contacts only
    return lm


LABEL_MAPS = {
    "hole": _hole,
    "ring": _ring,
    "thin_ring": _thin_ring,
    "touching": _touching,
    "lines": _lines,
}


def _corners(lm_mask: np.ndarray) -> int:
    """Diagonal-only contacts (2 x 2 checkerboards) of a mask: where bridging may add area."""
    m = lm_mask.astype(np.uint8)
    a, b, c, d = m[:-1, :-1], m[:-1, 1:], m[1:, :-1], m[1:, 1:]
    return int(((a & d & (1 - b) & (1 - c)) | (b & c & (1 - a) & (1 - d))).sum())


@pytest.mark.parametrize("name", sorted(LABEL_MAPS))
def test_label_map_features_are_valid_and_match_the_mask(name, tmp_path):
    lm = LABEL_MAPS[name]()
    feats = label_map_to_features(lm, mpp=0.5, min_area_px=1, properties={"source": name})
    path = write_geojson(tmp_path / f"{name}.geojson", feature_collection(feats, {"image": name}))
    got = read_checked(path)
    assert len(got) == len(feats)
    for lab in np.unique(lm[lm > 0]):
        mask = lm == lab
        geoms = [g for p, g in got if p["label"] == lab]
        for p, _ in got:
            if p["label"] == lab:
                assert p["classification"] == {
                    "name": DEPOSIT_DISPLAY[lab],
                    "color": list(DEPOSIT_COLORS[lab]),
                }
                m = p["measurements"]
                assert m["Area µm^2"] == pytest.approx(m["Area px^2"] * 0.25)
        assert_outlines_match(mask, geoms, corner_slack=_corners(mask))
    # Different labels never overlap (outlines run a quarter pixel inside the pixel edges).
    for i, (pa, ga) in enumerate(got):
        for pb, gb in got[i + 1 :]:
            if pa["label"] != pb["label"]:
                assert ga.intersection(gb).area == pytest.approx(0.0, abs=1e-9)


def _lesions(lm: np.ndarray):
    probs = np.array([[0.7, 0.1, 0.1, 0.05, 0.05]])
    return find_lesions(
        lm,
        mpp=0.5,
        class_names=CLASS_NAMES,
        deposit_labels=DEPOSIT_LABELS,
        tile_boxes=[(0, 0, S)],
        tile_probs=probs,
        min_area_um2=0.0,
    )


@pytest.mark.parametrize("name", sorted(LABEL_MAPS))
def test_lesion_features_are_valid_and_match_the_mask(name, tmp_path):
    lm = LABEL_MAPS[name]()
    found = _lesions(lm)
    feats = lesion_features(lm, found.lesions, found.components, 0.5, properties={"source": name})
    assert len(feats) == len(found.lesions)
    path = write_geojson(tmp_path / f"{name}.geojson", feature_collection(feats))
    got = read_checked(path)
    for (props, _), les in zip(got, found.lesions, strict=True):
        m = props["measurements"]
        assert m["Area px^2"] == les["area_px"]
        assert m["Area µm^2"] == pytest.approx(les["area_um2"])
        for c in CLASS_NAMES:
            assert m[f"Prob {c}"] == pytest.approx(les["probabilities"][c])
        assert props["classification"]["name"] == DEPOSIT_DISPLAY[les["label_value"]]
    mask = lm > 0
    assert_outlines_match(mask, [g for _, g in got], corner_slack=_corners(mask))


def test_the_area_name_is_escaped_ascii_and_reads_back_as_qupaths(tmp_path):
    lm = _hole()
    feats = label_map_to_features(lm, mpp=0.5)
    path = write_geojson(tmp_path / "x.geojson", feature_collection(feats))
    text = path.read_text(encoding="ascii")
    assert "Area \\u00b5m^2" in text and "µ" not in text
    # QuPath's AreaMeasurementBuilder: "Area " + GeneralTools.micrometerSymbol() + "^2",
    # the micrometer symbol being U+00B5 MICRO SIGN (not U+03BC GREEK SMALL LETTER MU).
    (f,) = json.loads(text)["features"]
    assert "Area \u00b5m^2" in f["properties"]["measurements"]
    assert "Area px^2" in f["properties"]["measurements"]


# --------------------------------------------------------------------------- predict

#: The painted images: label -> RGB. Tissue is pink; deposits far from it in colour.
PALETTE = {
    0: (225, 150, 185),
    CALCIUM: (50, 40, 205),
    BONE: (40, 190, 70),
    AMYLOID: (235, 215, 40),
}


def _paint(lm: np.ndarray, seed: int) -> np.ndarray:
    rgb = np.zeros((*lm.shape, 3), np.int16)
    for lab, col in PALETTE.items():
        rgb[lm == lab] = col
    noise = np.random.default_rng(seed).integers(-14, 15, rgb.shape)  # texture: in focus
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


@pytest.fixture()
def painting_network(monkeypatch, robust_checkpoint):
    """Stand-in for the network inside ``calcinosis predict``: each pixel's deposit label is
    the palette colour nearest to it, so the deposit map is the map the image was painted from."""
    from calcinosis.inference import engines
    from calcinosis.model import Preprocessing, load_checkpoint

    _, meta = load_checkpoint(robust_checkpoint)
    spec = Preprocessing.from_metadata(meta)
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    labels = np.array(sorted(PALETTE), np.int64)
    colours = np.array([PALETTE[k] for k in labels], np.float32)
    depth = len(DEPOSIT_LABELS)

    def forward(self, nhwc: np.ndarray):
        rgb = (nhwc * std + mean) * 255.0
        d = ((rgb[..., None, :] - colours) ** 2).sum(-1)
        lab = labels[d.argmin(-1)]  # (N, H, W)
        dep = np.where(np.arange(depth)[None, :, None, None] == lab[:, None], 10.0, -10.0)
        n = nhwc.shape[0]
        cls = np.tile(np.array([4.0, 0.0, 0.0, 0.0, -2.0], np.float32), (n, 1))
        return cls, np.zeros((n, 3), np.float32), dep.astype(np.float32)

    monkeypatch.setattr(engines.TorchEngine, "__call__", forward)


def _painted_region() -> np.ndarray:
    """All the shapes in one 256 x 256 region (tiled: larger than 1.5 model inputs)."""
    lm = np.zeros((256, 256), np.uint8)
    lm[:S, :S] = _hole()
    lm[:S, S:] = _ring()
    lm[S:, :S] = _touching()
    lm[S:, S:] = _thin_ring()
    lm[250, 10:240] = CALCIUM  # a one-pixel line near the bottom edge
    return lm


def test_predict_writes_outlines_of_the_painted_deposits(
    painting_network, robust_checkpoint, tmp_path
):
    from calcinosis.model.imageio import write_png

    lm = _painted_region()
    src = tmp_path / "in"
    src.mkdir()
    write_png(src / "painted.png", _paint(lm, 0))
    patch = _lines()[32:96, 32:96].copy()  # a 64 px patch (one network input)
    write_png(src / "patch.png", _paint(patch, 1))
    out = tmp_path / "out"
    rc = cli_main(
        [
            "predict",
            str(src),
            "--checkpoint",
            str(robust_checkpoint),
            "--out",
            str(out),
            "--min-lesion-area",
            "0",
            "--no-overlays",
            "--quiet",
            "--workers",
            "1",
        ]
    )
    assert rc == 0
    data = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    for rec, painted in ((r, lm if "painted" in r["path"] else patch) for r in data["results"]):
        got = read_checked(out / rec["outputs"]["geojson"])
        assert [p["lesion_id"] for p, _ in got] == [les["id"] for les in rec["lesions"]]
        mask = painted > 0
        assert_outlines_match(mask, [g for _, g in got], corner_slack=_corners(mask))
        for p, g in got:
            # Each lesion is classified by the majority label of its pixels.
            under = painted[shapely.contains_xy(g, *_centres(painted)).reshape(painted.shape)]
            counts = np.bincount(under[under > 0], minlength=len(DEPOSIT_LABELS))
            assert p["label"] == int(counts.argmax())
            assert p["classification"]["name"] == DEPOSIT_DISPLAY[p["label"]]


def _centres(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
    return xs.ravel() + 0.5, ys.ravel() + 0.5


def test_predict_geojson_of_a_real_network_is_valid(robust_checkpoint, tmp_path):
    """The tiny random network's deposit maps are ragged (holes, strands, specks): every
    file ``calcinosis predict`` writes for the fixture patches and a tiled region must still
    read as QuPath reads it and hold valid polygons."""
    from calcinosis.model.imageio import write_png
    from calcinosis.training.synthetic import render_region

    src = tmp_path / "in"
    fixtures = Path(__file__).parent / "fixtures" / "images"
    for p in sorted(fixtures.rglob("*.png"))[::3]:
        (src / p.parent.name).mkdir(parents=True, exist_ok=True)
        (src / p.parent.name / p.name).write_bytes(p.read_bytes())
    rgb, _ = render_region(384, 256, seed=5, tile=128, workers=1)
    write_png(src / "region.png", rgb)
    out = tmp_path / "out"
    rc = cli_main(
        ["predict", str(src), "--checkpoint", str(robust_checkpoint), "--out", str(out)]
        + ["--min-lesion-area", "0", "--no-overlays", "--quiet", "--workers", "1"]
    )
    assert rc == 0
    data = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    n_features = 0
    for rec in data["results"]:
        got = read_checked(out / rec["outputs"]["geojson"])
        assert len(got) == len(rec["lesions"])
        n_features += len(got)
    assert n_features > 0  # the check saw outlines, not only empty collections
