"""Predictor, predict CLI and ONNX export on a tiny random-weight checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import tissue

from calcinosis.inference.cli import main as cli_main
from calcinosis.inference.predict import collect_inputs, csv_columns, safe_stem, unique_names
from calcinosis.inference.predictor import PatchResult, Predictor
from calcinosis.model.labels import AMYLOID, CLASS_NAMES, INDETERMINATE

SIZE = 64


@pytest.fixture(scope="module")
def predict_checkpoint(tmp_path_factory, tiny_checkpoint_factory) -> Path:
    """The tiny random-weight checkpoint at 64 px, with temperature 1.5."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return tiny_checkpoint_factory(path, SIZE, 1.5)


@pytest.fixture(scope="module")
def predictor(predict_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(predict_checkpoint)


def test_patch_probabilities_are_calibrated_and_complete(predictor):
    res = predictor.predict(tissue())
    assert res.status == "ok" and res.mode == "patch"
    assert list(res.probabilities) == list(CLASS_NAMES)
    assert sum(res.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert res.prediction == max(res.probabilities, key=res.probabilities.get)
    assert res.stain in ("he", "von_kossa", "alizarin_red") and 0 < res.stain_probability <= 1
    assert res.label_map.shape == (SIZE, SIZE) and res.label_map.dtype == np.uint8
    assert sum(res.deposit_area_px.values()) == int((res.label_map > 0).sum())
    assert res.deposit_area_um2["calcium"] == pytest.approx(res.deposit_area_px["calcium"] * 0.25)
    assert res.tissue_fraction > 0.9
    # The forward pass flushes denormals, but must not leave that CPU flag set.
    assert np.float64(2.2250738585072014e-308) / 2 != 0
    d = res.to_dict()
    assert "label_map" not in d
    json.dumps(d)
    # The temperature is applied: softmax(logits / T).
    logits = np.array([[2.0, 0.0, -1.0, 0.5, 0.0]], np.float32)
    e = np.exp(logits / 1.5)
    np.testing.assert_allclose(predictor.calibrated(logits), e / e.sum(), rtol=1e-6)


def test_batch_fits_other_sizes_as_evaluation_does_and_keeps_order(predictor):
    imgs = [tissue(SIZE, SIZE, 1), tissue(80, 70, 2), tissue(40, 50, 3)]
    res = predictor.predict_batch(imgs)
    assert [r.label_map.shape for r in res] == [(64, 64), (80, 70), (40, 50)]
    assert all(r.mode == "patch" for r in res)
    one = predictor.predict(imgs[1])
    assert one.probabilities == pytest.approx(res[1].probabilities, abs=1e-5)
    from PIL import Image

    pil = predictor.predict(Image.fromarray(imgs[1]))
    assert pil.probabilities == pytest.approx(one.probabilities, abs=1e-6)
    # The class comes from the patch reflect-padded / centre-cropped at its own scale
    # (never resized): 40 x 50 padded to 64, 80 x 70 cut to its central 64 x 64.
    spec = predictor.preprocessing
    for img, r in zip(imgs, res, strict=True):
        x, _, _ = spec.apply(img)
        cls_l, _, _ = predictor.engine(x[None])
        want = predictor.calibrated(cls_l)[0]
        np.testing.assert_allclose(list(r.probabilities.values()), want, atol=1e-5)
    centre = imgs[1][8:72, 3:67]
    np.testing.assert_allclose(
        list(predictor.predict(centre).probabilities.values()),
        list(res[1].probabilities.values()),
        atol=1e-5,
    )


def test_a_cropped_patch_still_gets_deposits_over_all_its_pixels(predict_checkpoint):
    p = Predictor.from_checkpoint(predict_checkpoint)
    real = p.engine
    calls = []

    def amyloid_where_bright(nhwc):
        calls.append(len(nhwc))
        cls_l, stain_l, dep_l = real(nhwc)
        dep_l = np.zeros_like(dep_l)
        dep_l[:, AMYLOID] = 10.0 * (nhwc.mean(axis=3) > 1.5)  # white input pixels
        return cls_l, stain_l, dep_l

    p.engine = amyloid_where_bright
    img = tissue(90, 70, seed=5)
    img[:4, :4] = img[-4:, -4:] = 255  # corners the central crop never sees
    res = p.predict(img)
    assert res.mode == "patch" and res.label_map.shape == (90, 70)
    assert (res.label_map[:4, :4] == AMYLOID).all() and (res.label_map[-4:, -4:] == AMYLOID).all()
    assert (res.label_map[20:70, 10:60] != AMYLOID).mean() > 0.95
    assert sum(calls) > 1  # the centre for the class, windows covering the rest


def test_threshold_one_makes_everything_indeterminate(predict_checkpoint):
    p = Predictor.from_checkpoint(predict_checkpoint, indeterminate_threshold=1.0)
    res = p.predict(tissue())
    assert res.status == "indeterminate" and res.prediction == INDETERMINATE
    assert "below the threshold" in res.reason


def test_blank_glass_is_no_tissue_and_blur_is_out_of_focus(predictor):
    res = predictor.predict(np.full((SIZE, SIZE, 3), 246, np.uint8))
    assert res.status == "no_tissue" and res.prediction is None and res.probabilities == {}
    blurred = cv2.GaussianBlur(tissue(), (0, 0), 6)
    res = predictor.predict(blurred)
    assert res.status == "out_of_focus" and res.prediction is None
    assert res.probabilities  # still shown for reference


def test_unreadable_inputs_come_back_as_errors(predictor, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    res = predictor.predict_batch([str(bad), tissue(), np.zeros((5, 5, 7), np.uint8)])
    assert [r.status for r in res] == ["error", "ok", "error"]
    assert "bad.png" in res[0].reason


def test_region_mode_tiles_stitches_and_summarises(predictor):
    img = tissue(300, 500)
    img[:, 400:] = 246  # a strip of glass: its tiles are skipped
    res = predictor.predict(img)
    assert res.mode == "region"
    assert res.label_map.shape == (300, 500)
    assert res.tiles and all(
        0 <= t["y0"] <= 300 - SIZE and 0 <= t["x0"] <= 500 - SIZE for t in res.tiles
    )
    skipped = [t for t in res.tiles if t["status"] == "no_tissue"]
    assert skipped and all(t["x0"] >= 400 for t in skipped)
    used = [t for t in res.tiles if t["status"] == "ok"]
    assert sum(res.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    # The tissue-weighted mean of the tiles' probabilities is kept for reference ...
    w = np.array([t["tissue_fraction"] for t in used])
    mean = (
        sum(
            wi * np.array([t[f"p_{c}"] for c in CLASS_NAMES]) for wi, t in zip(w, used, strict=True)
        )
        / w.sum()
    )
    tile_mean = res.region["tile_mean_probabilities"]
    np.testing.assert_allclose([tile_mean[c] for c in CLASS_NAMES], mean, atol=1e-6)
    # ... but the call and its probabilities come from the lesions found (lesions.py).
    from calcinosis.inference.lesions import region_call

    call = region_call(
        res.lesions,
        tile_mean,
        CLASS_NAMES,
        indeterminate_threshold=predictor.indeterminate_threshold,
    )
    assert res.prediction == call["prediction"] and res.probabilities == call["probabilities"]
    assert res.region["call_basis"] == call["basis"]
    assert res.region["lesions_found"] == len(res.lesions)
    assert all(les["area_um2"] >= 100.0 for les in res.lesions)
    summary = res.region
    assert summary["tiles"] == len(res.tiles) and summary["tissue_tiles"] == len(used)
    assert set(summary["deposit_burden"]) == {"calcium", "bone", "urate", "amyloid"}
    assert 0.7 < res.tissue_fraction < 0.85
    # Pixels no used tile reached (the last tile column, x >= 448) get no deposits.
    assert max(t["x0"] for t in used) + SIZE <= 448
    assert (res.label_map[:, 448:] == 0).all()


def test_mpp_resamples_and_maps_back(predictor):
    img = tissue(60, 60)
    res = predictor.predict(img, mpp=1.0)  # twice as coarse as the model: worked on at 120 px
    assert res.mode == "region" and res.label_map.shape == (60, 60)
    assert res.region["tile_size_px"] == SIZE // 2  # tiles reported in the image's own pixels
    assert res.mpp == 1.0 and not res.mpp_assumed
    assert res.deposit_area_um2["bone"] == pytest.approx(res.deposit_area_px["bone"] * 1.0)
    same = predictor.predict(img, mpp=0.5)
    assert same.mode == "patch" and same.mpp == 0.5


# --------------------------------------------------------------------------- names and inputs


def test_safe_and_unique_names_never_escape():
    names = unique_names(
        [
            "a/x.png",
            "b/x.png",
            "B/X.png",
            "../../etc/passwd.png",
            "..png",
            "c/épreuve ü.tif",
            "CON.png",
            "a/....png",
        ]
    )
    assert names[:3] == ["x", "x-2", "X-3"]
    assert names[3] == "passwd" and names[4] == "image" and names[5] == "epreuve_u"
    assert names[6] == "_CON"
    assert len({n.lower() for n in names}) == len(names)
    for n in names:
        assert "/" not in n and "\\" not in n and not n.startswith(".")
    assert safe_stem("a" * 300 + ".png") == "a" * 80


def test_collect_inputs_folders_manifests_and_missing(tmp_path):
    from calcinosis.model.imageio import write_png

    (tmp_path / "d" / "sub").mkdir(parents=True)
    write_png(tmp_path / "d" / "sub" / "one.PNG", tissue())
    write_png(tmp_path / "d" / "two.jpg.png", tissue())
    (tmp_path / "d" / "notes.txt").write_text("x")
    out = tmp_path / "d" / "out"
    out.mkdir()
    write_png(out / "old_overlay.png", tissue())  # a previous run's output: skipped
    man = tmp_path / "m.csv"
    man.write_text("path,mpp\nd/sub/one.PNG,0.25\nmissing.png,\n", encoding="utf-8")
    items = collect_inputs([tmp_path / "d", man, tmp_path / "nope.png"], exclude=out)
    paths = [i.path.name for i in items]
    assert paths == ["one.PNG", "two.jpg.png", "missing.png", "nope.png"]  # one.PNG listed once
    assert items[2].error and items[3].error and items[0].error is None


# --------------------------------------------------------------------------- CLI


def test_predict_cli_bad_files_odd_names_and_outputs(predict_checkpoint, tmp_path, capsys):
    from calcinosis.model.imageio import write_png

    src = tmp_path / "in"
    for sub in ("a", "b", "we ird"):
        (src / sub).mkdir(parents=True)
    write_png(src / "a" / "x.png", tissue(seed=1))
    write_png(src / "b" / "x.png", tissue(seed=2))
    write_png(src / "we ird" / "épreuve ü.PNG", tissue(seed=3))
    write_png(src / "a" / "..png", tissue(seed=4))
    write_png(src / "b" / "blank.png", np.full((SIZE, SIZE, 3), 247, np.uint8))
    write_png(src / "b" / "region.png", tissue(150, 220, seed=5))
    (src / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = tmp_path / "out"
    rc = cli_main(
        [
            "predict",
            str(src),
            "--checkpoint",
            str(predict_checkpoint),
            "--out",
            str(out),
            "--quiet",
            "--workers",
            "2",
        ]
    )
    assert rc == 3
    printed = capsys.readouterr().out
    assert str(out / "predictions.csv") in printed
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        assert reader.fieldnames == csv_columns(
            CLASS_NAMES, ["tissue", "calcium", "bone", "urate", "amyloid"]
        )
    assert len(rows) == 7
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["corrupt.png"]["status"] == "error" and by_name["corrupt.png"]["reason"]
    assert by_name["blank.png"]["status"] == "no_tissue"
    assert by_name["region.png"]["mode"] == "region" and by_name["region.png"]["tiles"]
    for name in ("x.png", "épreuve ü.PNG", "..png"):
        assert by_name[name]["status"] == "ok" and by_name[name]["p_normal"]
    # Every written file lies inside OUT, and the two x.png did not collide.
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(overlays) == 6 and {"x.png", "x-2.png"} <= set(overlays)
    for f in out.rglob("*"):
        assert f.resolve().is_relative_to(out.resolve())
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "image.png").exists()
    data = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    assert len(data["results"]) == 7 and data["class_names"] == list(CLASS_NAMES)
    region = next(r for r in data["results"] if r["mode"] == "region" and r["status"] != "error")
    assert region["region"]["tiles"] > 1
    gj = json.loads((out / region["outputs"]["geojson"]).read_text(encoding="utf-8"))
    assert gj["type"] == "FeatureCollection"
    with open(out / region["outputs"]["tiles"], newline="") as fh:
        assert len(list(csv.DictReader(fh))) == region["region"]["tiles"]


def test_predict_cli_all_good_exits_zero(predict_checkpoint, tmp_path):
    from calcinosis.model.imageio import write_png

    write_png(tmp_path / "p.png", tissue())
    rc = cli_main(
        [
            "predict",
            str(tmp_path / "p.png"),
            "--checkpoint",
            str(predict_checkpoint),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
            "--no-overlays",
            "--no-geojson",
        ]
    )
    assert rc == 0
    assert not (tmp_path / "o" / "overlays").exists()


# --------------------------------------------------------------------------- ONNX


@pytest.mark.slow
def test_onnx_export_matches_torch_and_is_self_describing(predict_checkpoint, tmp_path):
    from calcinosis.inference.export import check_parity, export_onnx, read_onnx_metadata

    onnx_path = export_onnx(predict_checkpoint, tmp_path / "m.onnx")
    fixtures = sorted(Path(__file__).parent.joinpath("fixtures", "images").rglob("*.png"))[:8]
    images = None
    if fixtures:
        from calcinosis.model.imageio import read_rgb

        images = [read_rgb(f) for f in fixtures]
    diffs = check_parity(predict_checkpoint, onnx_path, images=images)
    assert max(diffs.values()) < 1e-3, diffs
    meta = read_onnx_metadata(onnx_path)
    assert meta["class_names"] == list(CLASS_NAMES) and meta["input_size"] == SIZE
    assert meta["temperature"] == 1.5 and len(meta["source_checkpoint_sha256"]) == 64
    # The ONNX predictor (from the file alone) agrees with the torch one.
    po = Predictor.from_checkpoint(onnx_path, backend="onnx")
    pt = Predictor.from_checkpoint(predict_checkpoint)
    imgs = [tissue(seed=s) for s in range(3)] + [tissue(200, 130, seed=9)]
    for a, b in zip(po.predict_batch(imgs), pt.predict_batch(imgs), strict=True):
        assert a.prediction == b.prediction and a.status == b.status
        np.testing.assert_allclose(
            list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-4
        )
        assert (a.label_map != b.label_map).mean() < 0.001


def test_onnx_cache_is_reused(predict_checkpoint, tmp_path):
    import shutil

    ck = Path(shutil.copy(predict_checkpoint, tmp_path / "c.safetensors"))
    p = Predictor.from_checkpoint(ck, backend="onnx")
    cache = tmp_path / "c.onnx"
    assert cache.is_file() and p.predict(tissue()).status == "ok"
    mtime = cache.stat().st_mtime_ns
    Predictor.from_checkpoint(ck, backend="onnx")
    assert cache.stat().st_mtime_ns == mtime


def test_patch_result_to_dict_round_trips():
    r = PatchResult(path="x", probabilities={"a": 0.5}, tiles=[{"y0": 0}])
    assert "tiles" not in r.to_dict() and r.to_dict(include_tiles=True)["tiles"] == [{"y0": 0}]
    assert r.tiles == [{"y0": 0}]


@pytest.mark.slow
def test_bench_smoke(predict_checkpoint, tmp_path, capsys):
    """Two backends in fresh processes, agreement computed, one table printed."""
    out = tmp_path / "bench.json"
    patches = tmp_path / "patches.npy"
    np.save(patches, np.stack([tissue(seed=s) for s in range(6)]))
    rc = cli_main(
        [
            "bench",
            "--checkpoint",
            str(predict_checkpoint),
            "--backends",
            "torch-eager,onnx",
            "--iters",
            "1",
            "--images",
            str(patches),
            "--n-images",
            "4",
            "--batch-size",
            "4",
            "--no-e2e",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "torch-eager" in text and "1.0x" in text and f"4 patches of {patches}" in text
    data = json.loads(out.read_text())
    for b in ("torch-eager", "onnx"):
        r = data["backends"][b]
        assert r["throughput"] > 0 and r["agree_class"] == 1.0
        assert r["peak_rss_mb"] is None or r["peak_rss_mb"] > 10


def test_region_deposits_are_cleared_on_the_glass_around_the_section(predict_checkpoint):
    # A network that calls every pixel amyloid: on the glass around the section
    # the call is cleared, inside the section it stays, and so does a pale
    # enclosed area (where unstained urate or amyloid would be).
    p = Predictor.from_checkpoint(predict_checkpoint)
    real = p.engine

    def amyloid_everywhere(nhwc):
        cls_l, stain_l, dep_l = real(nhwc)
        dep_l = np.zeros_like(dep_l)
        dep_l[:, AMYLOID] = 10.0
        return cls_l, stain_l, dep_l

    p.engine = amyloid_everywhere
    img = np.full((400, 400, 3), 246, np.uint8)  # glass
    img[100:300, 100:300] = tissue(200, 200)  # the section
    img[180:220, 180:220] = 240  # a pale area enclosed by tissue
    res = p.predict(img)
    assert res.mode == "region"
    lm = res.label_map
    assert (lm[:60] == 0).all() and (lm[:, :60] == 0).all() and (lm[340:] == 0).all()
    assert (lm[120:280, 120:280] == AMYLOID).mean() > 0.95
    assert (lm[185:215, 185:215] == AMYLOID).all()
    assert res.deposit_area_px["amyloid"] == int((lm == AMYLOID).sum())
