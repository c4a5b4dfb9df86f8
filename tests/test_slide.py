"""Whole-slide input: the reader, slide regions as pixel sources, and ``predict`` on slides.

The slides are small pyramidal TIFFs written here with tifffile: an Aperio-style
``.svs`` (the MPP in the ImageDescription, as scanners write it) and a generic
tiled TIFF with SubIFD levels and resolution tags. Pixels are zlib-compressed,
so a slide region and the same pixels saved as PNG are the same input.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from calcinosis.inference.cli import main as cli_main
from calcinosis.inference.slide import (
    SlideRegionSource,
    is_slide_file,
    open_slide,
    parse_region,
    region_thumbnail,
)
from calcinosis.model.errors import CalcinosisError, ImageReadError
from calcinosis.model.labels import CLASS_NAMES

tifffile = pytest.importorskip("tifffile")
try:
    import tiffslide  # noqa: F401

    HAVE_TIFFSLIDE = True
except ImportError:  # pragma: no cover - the dev extra installs it
    HAVE_TIFFSLIDE = False
needs_tiffslide = pytest.mark.skipif(not HAVE_TIFFSLIDE, reason="tiffslide is not installed")

W, H = 512, 384


@pytest.fixture(scope="module")
def region_rgb() -> np.ndarray:
    """A synthetic H&E region (tissue, deposits and bare glass), 512 x 384 px at 0.5 um/px."""
    from calcinosis.training.synthetic import render_region

    rgb, _ = render_region(W, H, seed=1, tile=128, workers=1)
    return rgb


def half(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)


def write_svs(path: Path, levels: list[np.ndarray], mpp: float | None, tile: int = 64) -> Path:
    """An Aperio-layout pyramid: level 0, a stripped thumbnail, then the smaller levels."""
    h, w = levels[0].shape[:2]
    desc = f"Aperio Image Library v12.0.0\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) RAW|AppMag = 20"
    if mpp is not None:
        desc += f"|MPP = {mpp}"
    opts = {"photometric": "rgb", "compression": "zlib", "metadata": None}
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], tile=(tile, tile), description=desc, **opts)
        thumb = cv2.resize(levels[0], (w // 8, h // 8), interpolation=cv2.INTER_AREA)
        tw.write(thumb, description="Aperio Image Library v12.0.0\nthumbnail", **opts)
        for lv in levels[1:]:
            tw.write(lv, tile=(tile, tile), description="Aperio Image Library v12.0.0", **opts)
    return path


def write_generic(path: Path, levels: list[np.ndarray], resolution, unit: str) -> Path:
    """A generic pyramidal TIFF (levels in SubIFDs) with its resolution in the TIFF tags."""
    opts = {"photometric": "rgb", "compression": "zlib", "metadata": None, "tile": (64, 64)}
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            levels[0],
            subifds=len(levels) - 1,
            resolution=resolution,
            resolutionunit=unit,
            **opts,
        )
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)
    return path


@pytest.fixture(scope="module")
def svs(region_rgb, tmp_path_factory) -> Path:
    """Level 0 at 0.5 um/px (the test model's resolution) and level 1 at 1.0."""
    folder = tmp_path_factory.mktemp("slides")
    return write_svs(folder / "case 1.svs", [region_rgb, half(region_rgb)], mpp=0.5)


# --------------------------------------------------------------------------- reader


@needs_tiffslide
def test_reader_levels_mpp_and_reads(svs, region_rgb):
    with open_slide(svs) as slide:
        assert slide.backend == "tiffslide"
        assert slide.level_count == 2
        assert slide.level_dimensions == ((W, H), (W // 2, H // 2))
        assert slide.level_downsamples == pytest.approx((1.0, 2.0))
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_mpp(1) == pytest.approx(1.0)
        # The coarsest level still at least as fine as the model.
        assert slide.best_level(0.5) == 0 and slide.best_level(1.0) == 1
        assert slide.best_level(0.7) == 0 and slide.best_level(4.0) == 1
        np.testing.assert_array_equal(
            slide.read_region(0, 100, 50, 64, 32), region_rgb[50:82, 100:164]
        )
        # Level-0 location, level-1 size (OpenSlide's convention).
        np.testing.assert_array_equal(
            slide.read_region(1, 100, 50, 20, 10), half(region_rgb)[25:35, 50:70]
        )
        # Beyond the slide: white glass.
        edge = slide.read_region(0, W - 12, H - 14, 20, 20)
        assert edge.shape == (20, 20, 3) and edge.dtype == np.uint8
        np.testing.assert_array_equal(edge[:14, :12], region_rgb[H - 14 :, W - 12 :])
        assert (edge[14:] == 255).all() and (edge[:, 12:] == 255).all()
        info = slide.describe()
        json.dumps(info)
        assert info["levels"][1]["mpp"] == pytest.approx(1.0)


@needs_tiffslide
def test_generic_tiff_mpp_from_resolution_tags(region_rgb, tmp_path):
    levels = [region_rgb, half(region_rgb)]
    good = write_generic(tmp_path / "g.tif", levels, (1e4 / 0.25, 1e4 / 0.25), "CENTIMETER")
    with open_slide(good) as slide:
        assert slide.level_count == 2 and slide.mpp == pytest.approx(0.25)
        assert slide.best_level(0.5) == 1
    # A desktop-publishing 72 dpi is not a scan's resolution: ignored, not 353 um/px.
    dpi = write_generic(tmp_path / "dpi.tif", levels, (72, 72), "INCH")
    with open_slide(dpi) as slide:
        assert slide.mpp is None and "not plausible" in slide.mpp_note


@needs_tiffslide
def test_which_files_are_slides(svs, region_rgb, tmp_path):
    from PIL import Image

    from calcinosis.model.imageio import write_png

    tiled = write_generic(tmp_path / "tiled.tif", [region_rgb], (2e4, 2e4), "CENTIMETER")
    Image.fromarray(region_rgb).save(tmp_path / "strips.tif")  # an ordinary (stripped) TIFF
    write_png(tmp_path / "p.png", region_rgb)
    assert is_slide_file(svs) and is_slide_file(tiled)
    assert not is_slide_file(tmp_path / "strips.tif")
    assert is_slide_file(tmp_path / "strips.tif", force=True)  # --level / --region given
    assert is_slide_file(tmp_path / "strips.tif", max_pixels=1000)  # too large to decode
    assert not is_slide_file(tmp_path / "p.png", force=True)


def test_parse_region():
    assert parse_region("10, 20,300,400") == (10, 20, 300, 400)
    for bad in ("1,2,3", "a,b,c,d", "-1,0,10,10", "0,0,0,10", ""):
        with pytest.raises(CalcinosisError, match="X,Y,W,H"):
            parse_region(bad)


@needs_tiffslide
def test_region_source_reads_and_thumbnail(svs, region_rgb):
    with open_slide(svs) as slide:
        x, y, w, h = slide.check_region((96, 64, 320, 256))
        src = SlideRegionSource(slide, 0, *slide.level_window(0, (x, y, w, h)))
        assert src.shape == (256, 320, 3)
        crop = region_rgb[64:320, 96:416]
        np.testing.assert_array_equal(src.read(10, 20, 30, 40), crop[10:40, 20:60])
        # White beyond the region, even though the slide has pixels there.
        edge = src.read(240, 300, 32, 32)
        np.testing.assert_array_equal(edge[:16, :20], crop[240:, 300:])
        assert (edge[16:] == 255).all() and (edge[:, 20:] == 255).all()
        # A thumbnail a quarter the size comes from level 1, not from level 0.
        src.max_read_px = 0
        thumb = src.thumbnail(80, 64)
        assert thumb.shape == (64, 80, 3)
        assert src.max_read_px <= 160 * 128
        ref = cv2.resize(crop, (80, 64), interpolation=cv2.INTER_AREA)
        assert np.abs(thumb.astype(int) - ref).mean() < 3


def test_resampled_source_matches_whole_image_resize(region_rgb):
    from calcinosis.inference.tiling import ArraySource, ResampledSource

    for factor in (0.5, 0.37, 1.3, 2.0):
        src = ResampledSource(ArraySource(region_rgb), factor, band_bytes=100_000)
        oh, ow = src.shape[:2]
        interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
        ref = cv2.resize(region_rgb, (ow, oh), interpolation=interp)
        out = np.zeros_like(ref)
        for y in range(0, oh, 48):  # row-major tile reads, as the tiler makes them
            for x in range(0, ow, 48):
                t = src.read(y, x, 64, 64)
                out[y : y + 64, x : x + 64] = t[: min(64, oh - y), : min(64, ow - x)]
        assert np.abs(out.astype(int) - ref).max() <= 1, factor


# --------------------------------------------------------------------------- predict


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        return {Path(r["path"]).name: r for r in csv.DictReader(fh)}


def _features(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["features"]


def _all_coords(geom: dict) -> np.ndarray:
    rings = geom["coordinates"] if geom["type"] == "Polygon" else sum(geom["coordinates"], [])
    return np.concatenate([np.asarray(r, float) for r in rings])


@needs_tiffslide
def test_predict_slide_region_matches_png_and_geojson_lands_in_place(
    svs, region_rgb, robust_checkpoint, tmp_path, capsys
):
    from calcinosis.model.imageio import write_png

    x, y, w, h = 96, 64, 320, 256
    png = write_png(tmp_path / "crop.png", region_rgb[y : y + h, x : x + w])
    out = tmp_path / "out"
    rc = cli_main(
        [
            "predict",
            str(svs),
            str(png),
            "--checkpoint",
            str(robust_checkpoint),
            "--out",
            str(out),
            "--region",
            f"{x},{y},{w},{h}",
            "--quiet",
            "--workers",
            "1",
        ]
    )
    assert rc == 0
    assert "ordinary image(s) are predicted whole" in capsys.readouterr().err
    rows = _rows(out)
    s, p = rows[svs.name], rows["crop.png"]
    assert s["status"] == p["status"] != "error" and s["mode"] == p["mode"] == "region"
    assert s["prediction"] == p["prediction"]
    for c in CLASS_NAMES:
        assert float(s[f"p_{c}"]) == pytest.approx(float(p[f"p_{c}"]), abs=1e-4)
    for k in ("tissue_fraction", "area_px_calcium", "area_px_bone", "width", "height", "mpp"):
        assert s[k] == p[k], k
    assert (s["width"], s["height"]) == (str(w), str(h))
    data = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    rec = next(r for r in data["results"] if r["path"] == str(svs))
    info = rec["slide"]
    assert info["reader"] == "tiffslide" and info["level"] == 0 and info["level_auto"]
    assert info["region"] == [x, y, w, h] and info["origin"] == [x, y]
    assert info["mpp_source"] == "slide" and info["mpp_level0"] == pytest.approx(0.5)
    # Tile rows also say where each tile lies on the slide.
    with open(out / rec["outputs"]["tiles"], newline="") as fh:
        tiles = list(csv.DictReader(fh))
    assert all(float(t["slide_x0"]) == float(t["x0"]) + x for t in tiles)
    assert all(float(t["slide_y0"]) == float(t["y0"]) + y for t in tiles)
    # GeoJSON: the same outlines, moved by the region's origin, inside the region.
    fs = _features(out / rec["outputs"]["geojson"])
    png_rec = next(r for r in data["results"] if r["path"] == str(png))
    fp = _features(out / png_rec["outputs"]["geojson"])
    assert fs and len(fs) == len(fp)
    for a, b in zip(fs, fp, strict=True):
        assert a["properties"]["name"] == b["properties"]["name"]
        assert a["properties"]["measurements"] == b["properties"]["measurements"]
        ca, cb = _all_coords(a["geometry"]), _all_coords(b["geometry"])
        np.testing.assert_allclose(ca, cb + [x, y])
        assert (ca[:, 0] >= x).all() and (ca[:, 0] <= x + w).all()
        assert (ca[:, 1] >= y).all() and (ca[:, 1] <= y + h).all()
    # Lesions: the same ones, their centroids and boxes in the same level-0 frame.
    assert len(rec["lesions"]) == len(png_rec["lesions"]) == len(fs)
    for a, b in zip(rec["lesions"], png_rec["lesions"], strict=True):
        assert a["centroid"] == pytest.approx([b["centroid"][0] + x, b["centroid"][1] + y])
        assert a["bbox"] == pytest.approx([b["bbox"][0] + x, b["bbox"][1] + y, *b["bbox"][2:]])
        assert a["area_um2"] == pytest.approx(b["area_um2"])
        assert a["probabilities"] == pytest.approx(b["probabilities"])
    gj = json.loads((out / rec["outputs"]["geojson"]).read_text(encoding="utf-8"))
    assert gj["properties"]["slide"]["region"] == [x, y, w, h]
    assert (out / rec["outputs"]["overlay"]).stat().st_size > 0


@needs_tiffslide
def test_level_choice_and_resampling(region_rgb, robust_predictor, tmp_path, monkeypatch):
    """A 0.25 um/px slide: level 1 is the model's 0.5 um/px; level 0 is shrunk band by band."""
    import calcinosis.inference.region as region_mod
    import calcinosis.inference.tiling as tiling

    l1 = half(region_rgb)
    fine = write_svs(tmp_path / "fine.svs", [region_rgb, l1], mpp=0.25)
    auto = robust_predictor.predict_slide(fine)
    assert auto.slide["level"] == 1 and auto.mpp == pytest.approx(0.5)
    ref = robust_predictor.predict(l1, mpp=0.5)
    assert auto.probabilities == pytest.approx(ref.probabilities, abs=1e-5)
    np.testing.assert_array_equal(auto.label_map, ref.label_map)
    # Level 0 is resampled to the model's mpp in bands (tiny bands here), never whole;
    # a small thumbnail side makes tissue detection use a thumbnail, as on big regions.
    monkeypatch.setattr(tiling, "BAND_BYTES", 150_000)
    monkeypatch.setattr(region_mod, "TISSUE_THUMB_SIDE", 64)
    lvl0 = robust_predictor.predict_slide(fine, level=0)
    whole = robust_predictor.predict(region_rgb, mpp=0.25)
    assert lvl0.slide["level"] == 0 and lvl0.mode == whole.mode == "region"
    assert lvl0.label_map.shape == whole.label_map.shape == (H, W)
    assert lvl0.probabilities == pytest.approx(whole.probabilities, abs=0.02)
    assert (lvl0.label_map == whole.label_map).mean() > 0.97
    assert lvl0.slide["max_read_px"] < W * H // 2
    # An explicit mpp overrides the slide's: level 0 is then already the model's.
    given = robust_predictor.predict_slide(fine, mpp=0.5)
    assert given.slide["mpp_source"] == "given" and given.slide["level"] == 0
    # A slide path given to predict() goes the slide way.
    assert robust_predictor.predict(str(fine)).slide["level"] == 1


@needs_tiffslide
def test_slide_is_never_read_whole(svs, robust_predictor, monkeypatch):
    import calcinosis.inference.region as region_mod
    from calcinosis.inference.slide import Slide

    # Make the tissue thumbnail path the one taken, as on regions above 2048 px.
    monkeypatch.setattr(region_mod, "TISSUE_THUMB_SIDE", 128)
    res = robust_predictor.predict_slide(svs)
    assert res.mode == "region" and res.label_map.shape == (H, W)
    assert res.slide["max_read_px"] <= (W // 2) * (H // 2)  # at most level 1 for the thumbnail
    # The overlay's background is read from the coarsest level with its detail, in bands.
    reads: list[int] = []
    read_level = Slide.read_level

    def counting(self, level, lx, ly, w, h):
        reads.append(w * h)
        return read_level(self, level, lx, ly, w, h)

    monkeypatch.setattr(Slide, "read_level", counting)
    thumb = region_thumbnail(svs, res.slide, 200)
    assert max(thumb.shape[:2]) == 200 and thumb.dtype == np.uint8
    assert reads and max(reads) <= (W // 2) * (H // 2)


@needs_tiffslide
def test_bad_slides_and_regions_are_clear_errors(svs, robust_checkpoint, tmp_path, capsys):
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    missing = tmp_path / "missing.ndpi"
    out = tmp_path / "out"
    args = ["--checkpoint", str(robust_checkpoint), "--out", str(out), "--quiet"]
    rc = cli_main(
        ["predict", str(missing), str(garbage), str(svs), "--region", "400,300,200,200"] + args
    )
    assert rc == 3
    rows = _rows(out)
    assert all(r["status"] == "error" for r in rows.values())
    assert "missing.ndpi" in rows["missing.ndpi"]["reason"]
    assert "garbage.svs" in rows["garbage.svs"]["reason"]
    assert "copy or export it again" in rows["garbage.svs"]["reason"]
    outside = rows[svs.name]["reason"]
    assert str(svs) in outside and "512 x 384" in outside and "--region X,Y,W,H" in outside
    # A level the slide does not have: the message lists the levels there are.
    rc = cli_main(["predict", str(svs), "--level", "5"] + args)
    assert rc == 3
    reason = _rows(out)[svs.name]["reason"]
    assert "no level 5" in reason and "2 level(s)" in reason and "--level N" in reason
    # A malformed --region is a usage error (exit 2), said on one line.
    capsys.readouterr()
    assert cli_main(["predict", str(svs), "--region", "1,2,3"] + args) == 2
    assert "X,Y,W,H" in capsys.readouterr().err


def test_missing_reader_says_what_to_install(svs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiffslide", None)  # import tiffslide -> ImportError
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(ImageReadError) as err:
        open_slide(svs)
    msg = str(err.value)
    assert str(svs) in msg and "pip install 'calcinosis[slides]'" in msg
    mrxs = tmp_path / "x.mrxs"
    mrxs.write_bytes(b"not empty")
    with pytest.raises(ImageReadError, match="openslide-python openslide-bin"):
        open_slide(mrxs)
    # Without a reader, a tiled .tif is decoded as an ordinary image, as before.
    tiled = tmp_path / "tiled.tif"
    tifffile.imwrite(tiled, np.zeros((64, 64, 3), np.uint8), tile=(16, 16), photometric="rgb")
    assert not is_slide_file(tiled) and is_slide_file(svs)
