"""ONNX export (calcinosis.inference.export): the project's exporter, checked against torch.

The reference is the checkpoint's own network run by PyTorch, computed here
rather than by ``export.check_parity``, so a bug in either export or its
parity check fails these tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from calcinosis.inference import export
from calcinosis.model import load_checkpoint, read_checkpoint_metadata

SIZE = 64  # conftest's robust_checkpoint


def _onnx_outputs(path: Path, x: torch.Tensor) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(
        zip(names, session.run(None, {session.get_inputs()[0].name: x.numpy()}), strict=True)
    )


def _assert_matches_torch(checkpoint: Path, onnx_path: Path) -> None:
    """Every output, by name, at batch sizes other than the export's example batch."""
    model, _ = load_checkpoint(checkpoint)
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            ref = model(x)
        got = _onnx_outputs(onnx_path, x)
        assert list(got) == list(export.OUTPUT_NAMES)
        for name in export.OUTPUT_NAMES:
            assert got[name].shape == tuple(ref[name].shape), name
            torch.testing.assert_close(
                torch.from_numpy(got[name]), ref[name], atol=1e-3, rtol=1e-3, msg=name
            )


def test_export_matches_torch_and_describes_its_checkpoint(robust_checkpoint, tmp_path):
    onnx_path = export.export_onnx(robust_checkpoint, tmp_path / "m.onnx")
    _assert_matches_torch(robust_checkpoint, onnx_path)
    # the file alone tells inference how to feed it and where it came from
    meta = export.read_onnx_metadata(onnx_path)
    ckpt = read_checkpoint_metadata(robust_checkpoint)
    assert meta["preprocessing"] == ckpt["preprocessing"]
    for key in ("class_names", "stain_names", "deposit_labels", "temperature", "calibration"):
        assert meta[key] == ckpt[key], key
    assert meta["source_checkpoint_sha256"] == export.file_digest(robust_checkpoint)
    assert export.check_parity(robust_checkpoint, onnx_path)["class_logits"] < 1e-3


@pytest.mark.slow
def test_export_falls_back_to_the_dynamo_exporter(robust_checkpoint, tmp_path, monkeypatch):
    # A torch without the TorchScript exporter: export takes its torch.export path.
    real_export = torch.onnx.export
    calls = []

    def export_without_legacy(*args, dynamo=True, **kwargs):
        calls.append(dynamo)
        if not dynamo:
            raise TypeError("the TorchScript-based exporter is gone")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_without_legacy)
    onnx_path = export.export_onnx(robust_checkpoint, tmp_path / "m.onnx")
    assert calls == [False, True]
    _assert_matches_torch(robust_checkpoint, onnx_path)
    assert export.read_onnx_metadata(onnx_path)["input_size"] == SIZE


def test_export_of_a_deposit_readout_checkpoint(robust_checkpoint, tmp_path):
    """A checkpoint whose class head reads the deposit map (deposit_readout) exports too:
    its batch norm's statistics and the linear layer travel into the ONNX graph."""
    import dataclasses

    from calcinosis.model import create_model, save_checkpoint

    model, meta = load_checkpoint(robust_checkpoint)
    readout = create_model(dataclasses.replace(model.config, class_head="deposits"))
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("classification_head.")}
    readout.load_state_dict(kept, strict=False)
    norm = readout.classification_head.norm
    with torch.no_grad():
        norm.running_mean.uniform_(0.0, 0.5, generator=torch.Generator().manual_seed(5))
        norm.running_var.uniform_(0.01, 0.1, generator=torch.Generator().manual_seed(6))
    checkpoint = save_checkpoint(tmp_path / "readout.safetensors", readout.eval(), meta)
    onnx_path = export.export_onnx(checkpoint, tmp_path / "readout.onnx")
    _assert_matches_torch(checkpoint, onnx_path)
    assert export.read_onnx_metadata(onnx_path)["model"]["class_head"] == "deposits"
