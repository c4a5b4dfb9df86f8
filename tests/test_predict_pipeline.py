"""The predict pipeline's fast path: checks in decoding threads, PNG level, CPU accounting."""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calcinosis.model.errors import CalcinosisError


def _images() -> list[np.ndarray]:
    from calcinosis.training.synthetic import render_patch

    patches = [
        render_patch(c, s, seed=100 + i, size=64)[0]
        for i, (c, s) in enumerate(
            [("calcinosis_cutis", "he"), ("gout", "von_kossa"), ("normal", "alizarin_red")]
        )
    ]
    blank = np.full((64, 64, 3), 247, np.uint8)
    odd = render_patch("osteoma_cutis", "he", seed=7, size=80)[0]  # resized to the input
    region = np.concatenate([patches[0], patches[1]], axis=1)  # 64 x 128: tiled
    return [*patches, blank, odd, region]


def test_prepared_images_give_what_the_images_give(robust_predictor):
    images = _images()
    expected = robust_predictor.predict_batch(images)
    with ThreadPoolExecutor(3) as pool:  # prepare() runs in decoding threads in predict
        preps = list(pool.map(robust_predictor.prepare, images))
    got = robust_predictor.predict_batch(preps)
    assert [r.status for r in got] == [r.status for r in expected]
    assert [r.mode for r in got] == [r.mode for r in expected]
    assert got[3].status == "no_tissue" and got[5].mode == "region"
    for a, b in zip(got, expected, strict=True):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
        assert a.stain == b.stain
        np.testing.assert_array_equal(a.label_map, b.label_map)


def _args(ckpt: Path, src: Path, out: Path, **kw) -> argparse.Namespace:
    base = dict(
        inputs=[str(src)],
        checkpoint=str(ckpt),
        out=str(out),
        backend="torch",
        batch_size=4,
        mpp=None,
        threshold=None,
        tile_overlap=None,
        focus_threshold=None,
        no_overlays=False,
        no_geojson=False,
        workers=2,
        device="cpu",
        quiet=True,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_png_compression_level_and_cpu_seconds(robust_checkpoint, tmp_path, capsys):
    from calcinosis.inference.predict import run_predict
    from calcinosis.model.imageio import write_png

    src = tmp_path / "in"
    src.mkdir()
    for i, img in enumerate(_images()[:3]):
        write_png(src / f"p{i}.png", img)
    outs = {}
    for level in (0, 1):
        out = tmp_path / f"out{level}"
        assert run_predict(_args(robust_checkpoint, src, out, png_compression=level)) == 0
        outs[level] = out
    summary = json.loads((outs[1] / "predictions.json").read_text(encoding="utf-8"))
    assert summary["cpu_seconds_after_load"] >= 0
    for i in range(3):
        a, b = (outs[lv] / "overlays" / f"p{i}.png" for lv in (0, 1))
        assert a.stat().st_size > b.stat().st_size  # level 0 stores the pixels
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        assert (outs[1] / "geojson" / f"p{i}.geojson").is_file()
    with pytest.raises(CalcinosisError, match="0-9"):
        run_predict(_args(robust_checkpoint, src, tmp_path / "bad", png_compression=12))
    capsys.readouterr()
    from calcinosis.model.cli import build_parser

    args = build_parser().parse_args(
        ["predict", str(src), "--checkpoint", "c", "--out", "o", "--png-compression", "6"]
    )
    assert args.png_compression == 6


def test_bench_prints_the_cpu_breakdown(capsys):
    from calcinosis.inference.bench import _print_table

    results = {
        "onnx": {
            "throughput": 200.0,
            "latency_ms_median": 5.0,
            "latency_ms_p95": 6.0,
            "peak_rss_mb": 200.0,
            "cpu_ms_per_patch": 5.0,
        }
    }
    e2e = {
        "backend": "onnx",
        "rate": 80.0,
        "model_rate": 200.0,
        "percent_of_model": 40.0,
        "peak_rss_mb": 250.0,
        "rate_tables_only": 150.0,
        "percent_of_model_tables_only": 75.0,
        "cpu_ms_per_image": 12.5,
        "cpu_ms_per_image_tables_only": 6.5,
        "cores_busy": 1.9,
        "model_cpu_ms_per_patch": 5.0,
    }
    _print_table(results, e2e, 32, 64, "patches.npy")
    text = capsys.readouterr().out
    assert "= 40% of its pure model rate" in text
    assert "12.5 ms end to end, 6.5 ms without overlays, 5.0 ms for the model alone" in text
    assert "= 40% of the model rate)" in text
