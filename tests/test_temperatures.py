"""One temperature per test-time augmentation mode: patches (d4) and tiles (one pass) each calibrated."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from calcinosis.inference.predictor import Predictor
from calcinosis.model import read_checkpoint_metadata
from calcinosis.model.metadata import checkpoint_tta, temperature_for


def test_temperature_for_reads_the_per_mode_table_then_the_main_temperature() -> None:
    old = {"temperature": 1.3, "calibration": {"tta": "d4"}}
    assert temperature_for(old, "d4") == 1.3
    assert temperature_for(old, "none") is None  # fitted in d4 only
    assert temperature_for({"temperature": 0.9}, "none") == 0.9  # before TTA existed
    assert temperature_for({}, "none") is None
    new = {
        "temperature": 1.3,
        "calibration": {"tta": "d4", "temperatures": {"d4": 1.3, "none": 0.8}},
    }
    assert temperature_for(new, "none") == 0.8
    # a mode with its own temperature is no mismatch
    new["config"] = {"inference": {"tta": "d4"}}
    assert checkpoint_tta(new, "none") == ("none", None)
    mode, warning = checkpoint_tta({**old, "config": new["config"]}, "none")
    assert mode == "none" and "fitted with 'd4'" in warning


def test_training_fits_both_modes_and_predict_and_evaluate_use_each(
    train_manifest: Path, train_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from calcinosis.training import train as T
    from calcinosis.training.evaluate import evaluate_checkpoint

    cfg = train_cfg(
        train_manifest, tmp_path / "run", "train.max_steps_per_epoch=1", "inference.tta=d4"
    )
    run = T.train(cfg)
    cal = json.loads((run / "calibration.json").read_text())
    meta = read_checkpoint_metadata(run / "best.safetensors")
    temps = meta["calibration"]["temperatures"]
    assert set(temps) == {"d4", "none"} and temps == cal["temperatures"]
    assert meta["temperature"] == pytest.approx(temps["d4"])
    assert set(cal["by_mode"]) == {"d4", "none"}

    pred = Predictor.from_checkpoint(run / "best.safetensors")
    assert (pred.tta, pred.region_tta) == ("d4", "none")
    assert pred.temperatures == pytest.approx(temps)
    assert "may be a little" not in pred.describe_tta()  # both modes calibrated
    logits = np.array([[2.0, 0.5, 0.1, -1.0, 0.0]], np.float32)
    for mode in ("d4", "none"):
        z = logits[0] / temps[mode]
        expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(pred.calibrated(logits, mode)[0], expected, rtol=1e-5)

    with caplog.at_level(logging.WARNING):
        m = evaluate_checkpoint(
            run / "best.safetensors", train_manifest, out_dir=tmp_path / "r", baseline=False,
            tta="none",
        )  # fmt: skip
    assert m["temperature"] == pytest.approx(temps["none"])
    assert not [r for r in caplog.records if "fitted with" in r.getMessage()]
