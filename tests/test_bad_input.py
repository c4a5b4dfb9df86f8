"""End to end through ``calcinosis predict``: one folder of everything a scanner or a colleague
produces. A bad file gets ``status=error`` with the reason, the rest are processed, the exit
status says that some failed, and nothing is written outside ``--out``."""

from __future__ import annotations

import csv
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from calcinosis.inference.cli import main as cli_main
from calcinosis.inference.predict import EXIT_SOME_FAILED
from calcinosis.model import imageio
from calcinosis.model.imageio import read_rgb, write_png
from calcinosis.model.labels import CLASS_NAMES

FIXTURES = Path(__file__).parent / "fixtures" / "images"
GOOD = ("calcinosis_cutis/he_0000.png", "gout/von_kossa_0001.png")
UNICODE_DIR = "sub dir Fälle ünï"
UNICODE_NAME = "Kalzinose Ω 01.png"
#: Linux allows backslashes in names: a naive Windows-style join would climb out of OUT.
BACKSLASH_NAME = "..\\..\\evil.png"


def _fixture(rel: str) -> np.ndarray:
    return read_rgb(FIXTURES / rel)


def _png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", rgb[..., ::-1])
    assert ok
    return buf.tobytes()


def _jpeg_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- the folder

#: name (relative to the input folder) -> expected status, or ("error", words in the reason).
EXPECTED: dict[str, str | tuple[str, tuple[str, ...]]] = {
    "truncated.png": ("error", ("truncated",)),
    "truncated.jpg": ("error", ("truncated",)),
    "empty.png": ("error", ("empty", "0 bytes")),
    "notes.png": ("error", ("not an image",)),
    "gray.png": "processed",
    "transparent.png": "no_tissue",  # tissue under alpha 0: composited on white, it is glass
    "half_transparent.png": "ok",
    "deep16.tif": "ok",
    "cmyk.jpg": "ok",
    "tiny8.png": "processed",
    "UPPER.PNG": "ok",
    f"{UNICODE_DIR}/{UNICODE_NAME}": "ok",
    "white.png": "no_tissue",
    "good_a.png": "ok",
    "good_b.png": "ok",
    "...png": "ok",
    "CON.png": "ok",
}
if sys.platform != "win32":
    EXPECTED[BACKSLASH_NAME] = "ok"


def _build_input_folder(src: Path) -> None:
    tissue = _fixture(GOOD[0])
    h, w = tissue.shape[:2]
    src.mkdir(parents=True)
    png = _png_bytes(tissue)
    (src / "truncated.png").write_bytes(png[: len(png) * 2 // 3])
    jpg = _jpeg_bytes(tissue)
    (src / "truncated.jpg").write_bytes(jpg[: int(len(jpg) * 0.8)])
    (src / "empty.png").write_bytes(b"")
    (src / "notes.png").write_text("slide 12, block B: see report\n", encoding="utf-8")
    (src / "readme.txt").write_text("not an image and not an image suffix: ignored\n")
    Image.fromarray(tissue).convert("L").save(src / "gray.png")
    rgba = np.dstack([tissue, np.zeros((h, w), np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(src / "transparent.png")
    rgba[:, : w // 2, 3] = 255  # left half opaque tissue, right half transparent
    Image.fromarray(rgba, mode="RGBA").save(src / "half_transparent.png")
    # 16-bit RGB TIFF (OpenCV writes BGR): values up to 65535, scaled back to 8 bits.
    cv2.imwrite(str(src / "deep16.tif"), (tissue.astype(np.uint16) * 257)[..., ::-1])
    Image.fromarray(tissue).convert("CMYK").save(src / "cmyk.jpg", quality=95)
    Image.fromarray(np.ascontiguousarray(tissue[20:28, 20:28])).save(src / "tiny8.png")
    Image.fromarray(tissue).save(src / "UPPER.PNG", format="PNG")
    (src / UNICODE_DIR).mkdir()
    shutil.copy(FIXTURES / GOOD[0], src / UNICODE_DIR / UNICODE_NAME)
    write_png(src / "white.png", np.full((h, w, 3), 255, np.uint8))
    shutil.copy(FIXTURES / GOOD[0], src / "good_a.png")
    shutil.copy(FIXTURES / GOOD[1], src / "good_b.png")
    shutil.copy(FIXTURES / GOOD[1], src / "...png")
    shutil.copy(FIXTURES / GOOD[1], src / "CON.png")
    if sys.platform != "win32":
        shutil.copy(FIXTURES / GOOD[1], src / BACKSLASH_NAME)


def _build_manifest(root: Path) -> tuple[Path, dict[str, str | tuple[str, tuple[str, ...]]]]:
    """A manifest in its own folder whose paths climb with '..' to files elsewhere."""
    other = root / "elsewhere"
    (other / "a").mkdir(parents=True)
    (other / "b").mkdir()
    shutil.copy(FIXTURES / GOOD[0], other / "b" / "x.png")
    shutil.copy(FIXTURES / GOOD[1], other / "b" / "..png")
    lists = root / "lists" / "deep"
    lists.mkdir(parents=True)
    manifest = lists / "manifest.csv"
    rows = {
        "../../elsewhere/a/../b/./x.png": "ok",
        "../../elsewhere/b/..png": "ok",
        "../../../../../../no/such/../dir/y.png": ("error", ("does not exist",)),
    }
    manifest.write_text("path\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return manifest, rows


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, robust_checkpoint):
    """Predict the odd folder plus a '..'-riddled manifest once; tests read the outputs."""
    root = tmp_path_factory.mktemp("bad_input")
    src = root / "in"
    _build_input_folder(src)
    manifest, manifest_rows = _build_manifest(root)
    out = root / "run" / "out"
    before = _files(root)
    rc = cli_main(
        [
            "predict",
            str(src),
            str(manifest),
            "--checkpoint",
            str(robust_checkpoint),
            "--out",
            str(out),
            "--quiet",
            "--workers",
            "2",
        ]
    )
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    expected = {str(src / k): v for k, v in EXPECTED.items()}
    expected.update({str(manifest.parent / k): v for k, v in manifest_rows.items()})
    return {
        "rc": rc,
        "root": root,
        "src": src,
        "out": out,
        "rows": rows,
        "expected": expected,
        "before": before,
    }


def test_one_row_per_image_file_and_the_exit_status_says_some_failed(bad_run):
    assert bad_run["rc"] == EXIT_SOME_FAILED == 3
    paths = [r["path"] for r in bad_run["rows"]]
    assert len(paths) == len(set(paths))
    assert set(paths) == set(bad_run["expected"])  # readme.txt is not among them
    assert not any(p.endswith(".txt") for p in paths)
    details = json.loads((bad_run["out"] / "predictions.json").read_text(encoding="utf-8"))
    assert len(details["results"]) == len(paths)


def test_each_bad_file_is_an_error_row_naming_the_file_and_the_problem(bad_run):
    rows = {r["path"]: r for r in bad_run["rows"]}
    bad = {p: e for p, e in bad_run["expected"].items() if isinstance(e, tuple)}
    assert len(bad) == 5
    for path, (_, words) in bad.items():
        row = rows[path]
        assert row["status"] == "error", path
        assert Path(path).name in row["reason"], row["reason"]
        for word in words:
            assert word in row["reason"], (word, row["reason"])
        assert row["prediction"] == "" and row["overlay"] == "" and row["p_normal"] == ""
        assert "Traceback" not in row["reason"] and "internal error" not in row["reason"]


def test_odd_but_valid_files_are_processed(bad_run):
    rows = {r["path"]: r for r in bad_run["rows"]}
    good = {p: e for p, e in bad_run["expected"].items() if not isinstance(e, tuple)}
    for path, want in good.items():
        row = rows[path]
        assert row["status"] != "error", (path, row["reason"])
        if want != "processed":
            assert row["status"] == want, (path, row["status"], row["reason"])
        probs = [row[f"p_{c}"] for c in CLASS_NAMES]
        if row["status"] == "no_tissue":
            assert probs == [""] * len(CLASS_NAMES)  # the network was not asked
        else:
            assert sum(float(p) for p in probs) == pytest.approx(1.0, abs=2e-3), path
            assert row["prediction"] in CLASS_NAMES
        assert row["overlay"] and (bad_run["out"] / row["overlay"]).is_file()
    src = bad_run["src"]
    assert rows[str(src / "tiny8.png")]["width"] == "8"
    assert rows[str(src / "deep16.tif")]["width"] == "64"
    # Composited on white, half the transparent image is glass ...
    half = float(rows[str(src / "half_transparent.png")]["tissue_fraction"])
    assert 0.3 < half < 0.7, half
    # ... and the fully transparent one is white glass (not black) in its overlay, whose
    # left part is the image enlarged to 384 px (the legend panel lies to its right).
    overlay = read_rgb(bad_run["out"] / rows[str(src / "transparent.png")]["overlay"])
    assert overlay.shape[0] >= 384 and (overlay[:384, :380] == 255).all()


def test_outputs_stay_inside_out_whatever_the_input_names(bad_run):
    out = bad_run["out"].resolve()
    written = _files(bad_run["root"]) - bad_run["before"]
    assert written, "nothing was written"
    for f in written:
        assert f.resolve().is_relative_to(out), f
    names = [p.name for p in (out / "overlays").iterdir()]
    assert all(not n.startswith(".") and "\\" not in n for n in names), names
    processed = [r for r in bad_run["rows"] if r["status"] != "error"]
    assert len(set(names)) == len(names) == len(processed)  # no two results share a file
    for r in processed:
        for key in ("overlay", "geojson"):
            assert (out / r[key]).resolve().parent.parent == out


# --------------------------------------------------------------------------- size limits


def test_max_pixels_option_reports_and_lifts_the_limit(tmp_path, robust_checkpoint):
    img = tmp_path / "in" / "wide.png"
    shutil.copy(FIXTURES / GOOD[0], tmp_path / "good.png")
    write_png(img, np.tile(_fixture(GOOD[0]), (1, 2, 1)))  # 64 x 128 = 8,192 pixels
    args = ["predict", str(img), str(tmp_path / "good.png"), "--checkpoint"]
    args += [str(robust_checkpoint), "--quiet", "--no-overlays", "--no-geojson"]
    assert cli_main([*args, "--out", str(tmp_path / "o1"), "--max-pixels", "5000"]) == 3
    with open(tmp_path / "o1" / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    reason = rows["wide.png"]["reason"]
    assert rows["wide.png"]["status"] == "error"
    assert "8,192" in reason and "5,000" in reason and "--max-pixels" in reason
    assert imageio.MAX_PIXELS_ENV in reason
    assert rows["good.png"]["status"] == "ok"
    assert cli_main([*args, "--out", str(tmp_path / "o2"), "--max-pixels", "0"]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "o3"), "--max-pixels", "-1"]) == 2
    assert not (tmp_path / "o3").exists()  # a usage error, caught before anything is written


def test_large_images_are_tiled_never_fed_whole(robust_predictor, monkeypatch):
    """Every forward pass sees model-sized tiles, however big the image."""
    shapes: list[tuple[int, ...]] = []
    engine = robust_predictor.engine

    def recording(batch):
        shapes.append(batch.shape)
        return engine(batch)

    monkeypatch.setattr(robust_predictor, "engine", recording)
    big = np.full((1500, 2100, 3), 245, np.uint8)
    big[600:664, 1000:1128] = np.tile(_fixture(GOOD[0]), (1, 2, 1))  # a little tissue
    res = robust_predictor.predict(big)
    assert res.mode == "region" and res.label_map.shape == (1500, 2100)
    assert shapes and {s[1:] for s in shapes} == {(64, 64, 3)}
    assert 0 < res.region["tissue_tiles"] < res.region["tiles"]


def test_blank_glass_rows_are_stitched_in_bounded_memory():
    """A region whose tiles are all skipped (glass) once cost a float (H, W, D) array at
    finish(): 8 GB for a blank 20000 x 20000 scan. Now it goes a band at a time."""
    import tracemalloc

    from calcinosis.inference.tiling import Stitcher

    h, w, depth, tile = 4096, 3000, 5, 64
    tracemalloc.start()
    try:
        st = Stitcher((h, w), depth, tile, 16)
        tile_map = np.zeros((tile, tile, depth), np.float32)
        tile_map[..., 2] = 1.0
        st.add(0, 0, tile_map)  # one tile at the top, then only glass
        labels = st.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert labels.shape == (h, w) and (labels[:40, :40] == 2).all() and (labels[200:] == 0).all()
    assert st.label_counts.sum() == h * w and not st.coverage[200:].any()
    # label_map and coverage (2 x 12 MB) plus a band; the old full gap was 245 MB.
    assert peak < 64e6, peak


def _white_png(path: Path, width: int, height: int) -> Path:
    """A valid all-white RGB PNG streamed row by row: a few MB on disk, never in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    comp = zlib.compressobj(1)
    parts = [comp.compress(b"\x00" + b"\xff" * (3 * width))]  # first row, no filter
    up = b"\x02" + bytes(3 * width)  # "Up" filter: every other row equals the one above
    block = up * 64
    for _ in range((height - 1) // 64):
        parts.append(comp.compress(block))
    parts.append(comp.compress(up * ((height - 1) % 64)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.slow
def test_20000_square_image_names_the_pixel_limit_and_how_to_lift_it(
    tmp_path, robust_checkpoint, monkeypatch
):
    monkeypatch.setattr(imageio, "DEFAULT_MAX_PIXELS", 100_000_000)
    # The generator makes valid PNGs (checked small), so the limit, not damage, is the reason.
    small = read_rgb(_white_png(tmp_path / "small.png", 70, 130))
    assert small.shape == (130, 70, 3) and (small == 255).all()
    src = tmp_path / "in"
    src.mkdir()
    _white_png(src / "huge scan.png", 20_000, 20_000)
    assert (src / "huge scan.png").stat().st_size < 20_000_000
    shutil.copy(FIXTURES / GOOD[0], src / "good.png")
    out = tmp_path / "out"
    rc = cli_main(
        ["predict", str(src), "--checkpoint", str(robust_checkpoint), "--out", str(out)]
        + ["--quiet", "--workers", "2"]
    )
    assert rc == 3
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    big = rows["huge scan.png"]
    assert big["status"] == "error"
    for words in ("huge scan.png", "20000 x 20000", "100,000,000", "--max-pixels"):
        assert words in big["reason"], (words, big["reason"])
    assert imageio.MAX_PIXELS_ENV in big["reason"]
    assert rows["good.png"]["status"] == "ok"
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["good.png"]


# --------------------------------------------------------------------------- arrays


def test_arrays_follow_the_same_conventions_as_files(robust_predictor):
    """Predictor.predict(array): 16-bit, bool, grey(+alpha) and [0, 1] floats are read as
    files of those kinds are; what cannot be an image is an error row naming the problem."""
    tissue = _fixture(GOOD[0])
    ref = robust_predictor.predict(tissue)
    assert ref.status == "ok"
    as16 = robust_predictor.predict(tissue.astype(np.uint16) * 257)
    as_float = robust_predictor.predict(tissue.astype(np.float64) / 255.0)
    for res in (as16, as_float):
        assert res.probabilities == pytest.approx(ref.probabilities, abs=1e-5)
    grey = tissue.mean(axis=2).astype(np.uint8)
    same_grey = [
        robust_predictor.predict(g) for g in (grey, grey[..., None], np.dstack([grey] * 3))
    ]
    assert same_grey[0].probabilities == pytest.approx(same_grey[2].probabilities, abs=1e-6)
    assert same_grey[1].probabilities == pytest.approx(same_grey[2].probabilities, abs=1e-6)
    clear = np.dstack([grey, np.zeros_like(grey)])  # grey + alpha 0: glass
    assert robust_predictor.predict(clear).status == "no_tissue"
    assert robust_predictor.predict(np.ones((64, 64), bool)).status == "no_tissue"  # all white
    bad = {
        "NaN": np.full((8, 8, 3), np.nan, np.float32),
        "-5..300": np.linspace(-5, 300, 192).reshape(8, 8, 3).astype(np.int32),
        "shape (2, 8, 8, 3)": np.zeros((2, 8, 8, 3), np.uint8),
        "shape (0, 8, 3)": np.zeros((0, 8, 3), np.uint8),
        "expected floats in [0, 1]": np.full((8, 8, 3), 255.0, np.float32),
    }
    for words, arr in bad.items():
        res = robust_predictor.predict(arr)
        assert res.status == "error" and words in res.reason, (words, res.reason)


# --------------------------------------------------------------------------- hostile files


class _Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_are_never_run(tmp_path, robust_checkpoint):
    """Checkpoints, starting weights and resume state: nothing from a stranger's pickle runs."""
    import torch

    from calcinosis.model import load_checkpoint, load_init_weights
    from calcinosis.model.errors import CheckpointError, ConfigError
    from calcinosis.training.train import STATE_FILE, load_resume_state

    marker = tmp_path / "PWNED"
    evil = {"encoder.conv1.weight": torch.zeros(1), "x": _Payload(marker)}
    model, _ = load_checkpoint(robust_checkpoint)
    for name in ("weights.pth", "weights.bin", "looks_like.safetensors"):
        torch.save(evil, tmp_path / name)
        with pytest.raises(CheckpointError, match=name):
            load_init_weights(model, tmp_path / name)
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_checkpoint(tmp_path / "looks_like.safetensors")
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"run": {}, "model": evil}, run / STATE_FILE)
    with pytest.raises(ConfigError, match="cannot resume"):
        load_resume_state(run)
    assert not marker.exists()


def test_yaml_tags_are_never_run(tmp_path):
    from calcinosis.model.errors import ConfigError
    from calcinosis.training.config import load_config

    marker = tmp_path / "PWNED"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'train:\n  lr: !!python/object/apply:builtins.open ["{marker}", "w"]\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, [f'train.lr=!!python/object/apply:builtins.open ["{marker}", "w"]'])
    assert not marker.exists()
