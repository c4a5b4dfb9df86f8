"""Test-time augmentation (D4): views turned back correctly, invariance, calibration mode."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tissue

from calcinosis.inference.predictor import Predictor
from calcinosis.model import load_checkpoint, read_checkpoint_metadata
from calcinosis.model.metadata import checkpoint_tta
from calcinosis.model.tta import numpy_d4, resolve_tta, torch_d4

SIZE = 64  # the input side of conftest's robust_checkpoint


def _echo(nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stand-in engine whose deposit 'logits' are the input itself (NCHW)."""
    return nhwc.mean(axis=(1, 2)), nhwc[:, 0, 0, :], nhwc.transpose(0, 3, 1, 2)


def test_numpy_d4_turns_every_view_back() -> None:
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    cls, corner, dense = numpy_d4(_echo, x)
    # Each view's map, turned back, is the input: their mean is the input exactly.
    np.testing.assert_allclose(dense, x.transpose(0, 3, 1, 2), atol=1e-6)
    np.testing.assert_allclose(cls, x.mean(axis=(1, 2)), atol=1e-6)
    # The top-left pixel of the 8 views visits each corner twice: a real average.
    corners = x[:, [0, 0, -1, -1], [0, -1, 0, -1], :].mean(axis=1)
    np.testing.assert_allclose(corner, corners, atol=1e-6)


def test_torch_and_numpy_d4_agree(robust_checkpoint: Path) -> None:
    model, _ = load_checkpoint(robust_checkpoint)
    model.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        ref = torch_d4(model, x)

        def engine(nhwc: np.ndarray):
            out = model(torch.from_numpy(nhwc).permute(0, 3, 1, 2))
            return tuple(out[k].numpy() for k in ("class_logits", "stain_logits", "deposit_logits"))

        got = numpy_d4(engine, x.permute(0, 2, 3, 1).numpy())
    for k, arr in zip(("class_logits", "stain_logits", "deposit_logits"), got, strict=True):
        np.testing.assert_allclose(arr, ref[k].numpy(), atol=1e-4, err_msg=k)


def _probs(result) -> np.ndarray:
    return np.array(list(result.probabilities.values()))


def test_d4_answer_does_not_depend_on_orientation(robust_checkpoint: Path) -> None:
    pred = Predictor.from_checkpoint(robust_checkpoint, tta="d4")
    single = Predictor.from_checkpoint(robust_checkpoint, tta="none")
    img = tissue(SIZE, SIZE, seed=3)
    turned = np.ascontiguousarray(np.rot90(img, 1))
    a, b = pred.predict(img, mpp=0.5), pred.predict(turned, mpp=0.5)
    tta_gap = np.abs(_probs(a) - _probs(b)).max()
    assert tta_gap < 1e-6  # the same eight views, summed in another order
    assert (np.rot90(a.label_map, 1) == b.label_map).mean() > 0.99  # the map turns with it
    # without TTA the (random-weight, near-uniform) network does see the turn
    c, d = single.predict(img, mpp=0.5), single.predict(turned, mpp=0.5)
    assert np.abs(_probs(c) - _probs(d)).max() > 100 * max(tta_gap, 1e-7)


def test_d4_region_mode(robust_checkpoint: Path) -> None:
    pred = Predictor.from_checkpoint(robust_checkpoint, tta="d4", batch_size=4)
    res = pred.predict(tissue(3 * SIZE, 2 * SIZE, seed=4), mpp=0.5)
    assert res.mode == "region" and res.status == "ok"
    assert res.label_map.shape == (3 * SIZE, 2 * SIZE)
    assert sum(_probs(res)) == pytest.approx(1.0, abs=1e-4)


def test_default_mode_comes_from_the_checkpoint_and_mismatch_warns() -> None:
    meta = {"config": {"inference": {"tta": "d4"}}, "temperature": 1.2}
    mode, warning = checkpoint_tta(meta)
    assert mode == "d4" and "fitted with 'none'" in warning
    meta["calibration"] = {"tta": "d4"}
    assert checkpoint_tta(meta) == ("d4", None)
    mode, warning = checkpoint_tta(meta, "none")
    assert mode == "none" and "inference.tta: none" in warning
    assert checkpoint_tta({}) == ("none", None)  # older checkpoints: one pass, no warning
    with pytest.raises(ValueError, match="d4"):
        checkpoint_tta({}, "flips")


def test_resolve_tta_takes_resolved_values_not_a_config_layout() -> None:
    assert resolve_tta("d4") == ("d4", None)  # no temperature fitted: nothing to warn about
    assert resolve_tta("none", "d4", fitted="d4", calibrated=True) == ("d4", None)
    mode, warning = resolve_tta("d4", None, fitted="none", calibrated=True)
    assert mode == "d4" and "fitted with 'none'" in warning
    with pytest.raises(ValueError, match="d4"):
        resolve_tta("none", "flips")


def test_calibration_is_fitted_in_the_configured_mode(
    train_manifest: Path, train_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from calcinosis.training import train as T
    from calcinosis.training.evaluate import evaluate_checkpoint

    run = T.train(train_cfg(train_manifest, tmp_path / "run", "train.max_steps_per_epoch=1",
                            "inference.tta=d4"))  # fmt: skip
    cal = json.loads((run / "calibration.json").read_text())
    meta = read_checkpoint_metadata(run / "best.safetensors")
    assert cal["tta"] == "d4" and meta["calibration"]["tta"] == "d4"
    assert meta["config"]["inference"]["tta"] == "d4"

    with caplog.at_level(logging.WARNING):
        m = evaluate_checkpoint(run / "best.safetensors", train_manifest, out_dir=tmp_path / "r",
                                baseline=False)  # fmt: skip
    assert "test-time augmentation: d4" in (tmp_path / "r" / "report.md").read_text()
    assert not [r for r in caplog.records if "test-time augmentation" in r.getMessage()]
    m1 = evaluate_checkpoint(run / "best.safetensors", train_manifest, out_dir=tmp_path / "r1",
                             baseline=False, tta="none")  # fmt: skip
    # calibration fitted a one-pass temperature too, so evaluating in that mode is calibrated
    assert "fitted with" not in caplog.text
    assert m["n_samples"] == m1["n_samples"]


def test_predict_records_the_mode_it_ran(robust_checkpoint: Path, tmp_path: Path) -> None:
    from calcinosis.inference.cli import main
    from calcinosis.model.imageio import write_png

    write_png(tmp_path / "a.png", tissue(SIZE, SIZE, seed=5))
    for mode in ("d4", "none"):
        out = tmp_path / mode
        rc = main(["predict", str(tmp_path / "a.png"), "--checkpoint", str(robust_checkpoint),
                   "--out", str(out), "--tta", mode, "--quiet", "--no-overlays"])  # fmt: skip
        assert rc == 0
        assert json.loads((out / "predictions.json").read_text())["tta"] == mode
