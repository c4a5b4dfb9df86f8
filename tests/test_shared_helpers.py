"""One copy of what training and inference both need: the bf16 probe, CPU time, JSON, softmax."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from calcinosis.model import hardware
from calcinosis.model.fileio import to_jsonable
from calcinosis.model.probability import softmax


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "native"),
    [(True, False, True), (False, True, True), (False, False, False)],
)
def test_bf16_probe_is_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, native):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert hardware.cpu_has_native_bf16() is native


def test_bf16_probe_survives_a_torch_without_the_probes(monkeypatch):
    torch = pytest.importorskip("torch")

    def broken() -> bool:
        raise RuntimeError("not in this build")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    assert hardware.cpu_has_native_bf16() is False


def test_training_and_inference_ask_the_same_probe():
    """The bf16 warning of torch-bf16 follows the probe training's precision uses."""
    pytest.importorskip("torch")
    from calcinosis.inference import engines
    from calcinosis.training import distributed

    assert distributed.cpu_has_native_bf16 is hardware.cpu_has_native_bf16
    assert engines.cpu_has_native_bf16 is hardware.cpu_has_native_bf16


def test_cpu_seconds_count_this_process_work():
    before = hardware.cpu_seconds()
    x = 0.0
    for i in range(300_000):
        x += math.sqrt(i)
    after = hardware.cpu_seconds()
    assert after >= before and x > 0


def test_to_jsonable_turns_numpy_nan_and_paths_into_json():
    data = {
        "nan32": np.float32("nan"),
        "inf": float("inf"),
        "f": np.float64(0.25),
        "i": np.int64(3),
        "b": np.bool_(True),
        "arr": np.array([[1, 2], [3, 4]], np.uint8),
        "path": Path("runs") / "demo",
        "tuple": (1, np.float16(0.5)),
        7: None,
    }
    got = to_jsonable(data)
    assert got == {
        "nan32": None,
        "inf": None,
        "f": 0.25,
        "i": 3,
        "b": True,
        "arr": [[1, 2], [3, 4]],
        "path": str(Path("runs") / "demo"),
        "tuple": [1, 0.5],
        "7": None,
    }
    json.dumps(got, allow_nan=False)  # strict JSON


def test_results_and_metrics_use_the_same_sanitiser():
    """A NaN numpy scalar in a result (e.g. a focus measure) is null in predictions.json."""
    from calcinosis.inference.result import PatchResult
    from calcinosis.training import metrics

    assert metrics.to_jsonable is to_jsonable
    res = PatchResult(focus=np.float32("nan"), probabilities={"normal": np.float32(1.0)})
    d = res.to_dict()
    assert d["focus"] is None and d["probabilities"] == {"normal": 1.0}
    json.dumps(d, allow_nan=False)


def test_softmax_keeps_float32_is_stable_and_leaves_its_input():
    logits = np.array([[1e4, -1e4, 0.0], [1.0, 2.0, 3.0]], np.float32)
    kept = logits.copy()
    p = softmax(logits)
    assert p.dtype == np.float32 and np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(logits, kept)
    assert p[0].argmax() == 0 and p[0, 0] == pytest.approx(1.0)
    cols = softmax(logits.T, axis=0)
    np.testing.assert_allclose(cols.T, p, rtol=1e-6)
    assert softmax(np.array([1, 2, 3])).dtype == np.float64
    assert softmax(np.zeros((0, 5))).shape == (0, 5)


def test_metrics_softmax_is_the_shared_one_with_a_temperature():
    from calcinosis.training import metrics

    z = np.random.default_rng(0).normal(size=(6, 5)) * 4
    np.testing.assert_array_equal(metrics.softmax(z, 2.0), softmax(z / 2.0))
    with pytest.raises(ValueError, match="temperature"):
        metrics.softmax(z, 0.0)
