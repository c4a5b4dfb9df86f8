"""Static int8 quantisation records, and warns about, its agreement with fp32."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx

from calcinosis.inference import export


def test_int8_records_agreement_and_warns_when_classes_change(
    tmp_path, robust_checkpoint, monkeypatch, caplog
):
    fp32 = export.export_onnx(robust_checkpoint, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    images = [rng.integers(120, 255, (64, 64, 3), dtype=np.uint8) for _ in range(16)]
    out = export.quantize_onnx(fp32, tmp_path / "m.int8.onnx", calibration=images)
    meta = json.loads(export._get_metadata(onnx.load(str(out))))
    assert 0.0 <= meta["int8_class_agreement"] <= 1.0
    # a network that does not survive quantisation is flagged, not silently used
    monkeypatch.setattr(export, "_class_agreement", lambda *a: 0.6)
    with caplog.at_level(logging.WARNING, logger="calcinosis.inference.export"):
        export.quantize_onnx(fp32, tmp_path / "bad.int8.onnx", calibration=images)
    assert any("does not quantise well" in r.getMessage() for r in caplog.records)
