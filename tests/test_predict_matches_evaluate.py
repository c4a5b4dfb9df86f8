"""``calcinosis evaluate`` measures what ``calcinosis predict`` returns.

The same patches, of odd sizes and at another mpp, go through the evaluation
path (manifest -> PatchDataset -> eval transform -> model) and the prediction
path (Predictor); their calibrated class probabilities must be the same.
Before the preprocessing contract, a 40 x 50 patch was reflect-padded by the
one and enlarged 1.6x by the other.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from helpers import tissue

from calcinosis.inference.predictor import Predictor
from calcinosis.model import read_checkpoint_metadata
from calcinosis.model.imageio import write_png
from calcinosis.model.preprocess import Preprocessing

SIZE = 64

#: (height, width, mpp) of the patches: padded, exact, cropped, and one at half the
#: model's mpp (resampled to 50 x 40 first, then padded).
PATCHES = [(40, 50, 0.5), (SIZE, SIZE, 0.5), (80, 70, 0.5), (100, 80, 0.25)]


def _checkpoint(path: Path, stain_normalize: str) -> Path:
    import torch

    from calcinosis.model import ModelConfig, create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="resnet10t", decoder_channels=16))
    meta = {
        "input_size": SIZE,
        "mpp": 0.5,
        "temperature": 1.5,
        "indeterminate_threshold": 0.0,
        "min_tissue_fraction": 0.1,
        # where a training run records it
        "config": {"augment": {"stain_normalize": stain_normalize}},
    }
    return save_checkpoint(path, model, meta)


def _manifest(folder: Path) -> tuple[Path, list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, lines = [], ["path,label,split,mpp"]
    for k, (h, w, mpp) in enumerate(PATCHES):
        p = write_png(folder / f"p{k}_{h}x{w}.png", tissue(h, w, seed=10 + k))
        paths.append(p)
        lines.append(f"{p.name},calcinosis_cutis,test,{mpp}")
    man = folder / "manifest.csv"
    man.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return man, paths


def _evaluate_probabilities(ckpt: Path, manifest: Path, out: Path, monkeypatch) -> np.ndarray:
    """Calibrated probabilities ``calcinosis evaluate`` computes its report from.

    They are what it hands to ``write_report`` (logits and temperature), caught
    on the way through whichever module evaluate calls it on.
    """
    from calcinosis.training import evaluate

    holder = next(
        m
        for m in vars(evaluate).values()
        if isinstance(m, types.ModuleType) and hasattr(m, "write_report")
    )
    seen: dict = {}
    real = holder.write_report

    def spy(out_dir, **kwargs):
        seen.update(kwargs)
        return real(out_dir, **kwargs)

    monkeypatch.setattr(holder, "write_report", spy)
    evaluate.evaluate_checkpoint(
        ckpt, manifest, out_dir=out, baseline=False, device="cpu", batch_size=8
    )
    z = np.asarray(seen["logits"], np.float64) / seen["temperature"]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("stain_normalize", ["none", "macenko"])
def test_evaluate_and_predict_give_the_same_probabilities(tmp_path, monkeypatch, stain_normalize):
    ckpt = _checkpoint(tmp_path / "m.safetensors", stain_normalize)
    assert Preprocessing.from_metadata(read_checkpoint_metadata(ckpt)).stain_normalize == (
        stain_normalize
    )
    manifest, paths = _manifest(tmp_path / "data")
    evaluated = _evaluate_probabilities(ckpt, manifest, tmp_path / "report", monkeypatch)

    predictor = Predictor.from_checkpoint(ckpt)
    results = predictor.predict_batch([str(p) for p in paths], mpp=[m for _, _, m in PATCHES])
    assert [r.mode for r in results] == ["patch"] * len(PATCHES)
    predicted = np.array([list(r.probabilities.values()) for r in results])
    np.testing.assert_allclose(predicted, evaluated, atol=2e-5)
    # Every patch still gets a deposit map over all of its own pixels.
    assert [r.label_map.shape for r in results] == [(h, w) for h, w, _ in PATCHES]


def test_macenko_from_the_checkpoint_changes_what_predict_sees(tmp_path):
    plain = Predictor.from_checkpoint(_checkpoint(tmp_path / "a.safetensors", "none"))
    macenko = Predictor.from_checkpoint(_checkpoint(tmp_path / "b.safetensors", "macenko"))
    assert macenko.preprocessing.stain_normalize == "macenko"
    img = tissue(SIZE, SIZE, seed=3)
    a, b = plain.predict(img), macenko.predict(img)
    assert (
        np.abs(
            np.array(list(a.probabilities.values())) - np.array(list(b.probabilities.values()))
        ).max()
        > 1e-4
    )
