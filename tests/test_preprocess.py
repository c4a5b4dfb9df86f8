"""The preprocessing contract: one record in the checkpoint, one function applying it."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest

from calcinosis.model import CheckpointError, ConfigError, read_checkpoint_metadata
from calcinosis.model.preprocess import (
    MPP_TOLERANCE,
    PREPROCESSING_KEY,
    Preprocessing,
    resample_factor,
    resample_to_mpp,
)
from calcinosis.training.transforms import MacenkoNormalizer

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _albumentations_eval(size: int, macenko: bool = False) -> A.Compose:
    """The evaluation pipeline as it was built before the contract existed."""
    ops: list = []
    if macenko:
        ops.append(MacenkoNormalizer())
    ops += [
        A.PadIfNeeded(
            min_height=size, min_width=size, position="center", border_mode=cv2.BORDER_REFLECT_101
        ),
        A.CenterCrop(height=size, width=size),
        A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0),
    ]
    return A.Compose(ops)


def _he(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal((200, 120, 180), 30, (h, w, 3)), 0, 255).astype(np.uint8)
    img[: h // 3] = np.clip(rng.normal((90, 50, 150), 20, (h // 3, w, 3)), 0, 255)
    return img


@pytest.mark.parametrize("hw", [(32, 32), (40, 50), (1, 7), (31, 70), (80, 33), (100, 100)])
@pytest.mark.parametrize("macenko", [False, True])
def test_apply_is_the_evaluation_pipeline_it_replaced(hw, macenko):
    h, w = hw
    img = _he(h, w, seed=h * w)
    mask = (np.arange(h * w).reshape(h, w) % 5).astype(np.uint8)
    spec = Preprocessing(
        input_size=32, mean=MEAN, std=STD, stain_normalize="macenko" if macenko else "none"
    )
    x, m, place = spec.apply(img, mask)
    ref = _albumentations_eval(32, macenko)(image=img, mask=mask)
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x, ref["image"], atol=1e-5)
    assert np.array_equal(m, ref["mask"])
    # The placement says where the patch's own pixels went.
    fitted, _, _ = spec.fit_to_input(spec.normalize_stain(img))
    src = img if not macenko else spec.normalize_stain(img)
    kept = src[place.src_y : place.src_y + place.h, place.src_x : place.src_x + place.w]
    assert np.array_equal(place.to_patch(fitted), kept)
    assert place.cropped == (h > 32 or w > 32)


def test_normalize_works_on_batches_and_matches_the_formula():
    spec = Preprocessing(input_size=8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    batch = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    want = (batch / 255.0 - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(spec.normalize(batch), want, atol=1e-5)


def test_section_round_trips_and_rejects_what_it_does_not_know():
    spec = Preprocessing(input_size=96, mpp=1.0, mean=MEAN, std=STD, stain_normalize="macenko")
    d = spec.to_dict()
    assert d == {
        "input_size": 96,
        "mpp": 1.0,
        "mpp_tolerance": MPP_TOLERANCE,
        "mean": list(MEAN),
        "std": list(STD),
        "stain_normalize": "macenko",
        "fit": "reflect-pad-or-centre-crop",
    }
    assert Preprocessing.from_metadata({PREPROCESSING_KEY: d, "input_size": 5}) == spec
    with pytest.raises(CheckpointError, match="newer calcinosis"):
        Preprocessing.from_dict({**d, "crop_pct": 0.9})
    with pytest.raises(CheckpointError, match="fit"):
        Preprocessing.from_dict({**d, "fit": "resize"})
    with pytest.raises(ConfigError, match="stain_normalize"):
        Preprocessing(stain_normalize="reinhard")
    with pytest.raises(ConfigError, match="mpp"):
        Preprocessing(mpp=0.0)


def test_older_checkpoints_are_read_from_where_they_kept_each_value():
    top = {"input_size": 64, "mpp": 2.0, "mean": [0.5] * 3, "std": [0.5] * 3}
    spec = Preprocessing.from_metadata(top)
    assert (spec.input_size, spec.mpp, spec.mean, spec.stain_normalize) == (
        64,
        2.0,
        (0.5, 0.5, 0.5),
        "none",
    )
    nested = {
        "input_size": [3, 48, 48],
        "config": {
            "data": {"image_size": 99, "mpp": 0.5},
            "augment": {"stain_normalize": "macenko"},
        },
    }
    spec = Preprocessing.from_metadata(nested)
    assert (spec.input_size, spec.mpp, spec.stain_normalize) == (48, 0.5, "macenko")
    assert Preprocessing.from_metadata({"config": {"data": {"image_size": 80}}}).input_size == 80
    assert Preprocessing.from_metadata({}) == Preprocessing()  # 128 px, ImageNet statistics
    with pytest.raises(CheckpointError, match="input_size"):
        Preprocessing.from_metadata({"input_size": 0})


def test_save_checkpoint_writes_the_section(robust_checkpoint):
    meta = read_checkpoint_metadata(robust_checkpoint)
    section = meta[PREPROCESSING_KEY]
    assert section["input_size"] == 64 and section["mpp"] == 0.5
    assert section["mean"] == meta["mean"] and section["stain_normalize"] == "none"
    assert Preprocessing.from_metadata(meta) == Preprocessing.from_dict(section)


def test_resampling_is_skipped_within_the_tolerance():
    assert resample_factor(0.51, 0.5) == 1.0  # 2 %: the same resolution
    assert resample_factor(0.53, 0.5) == pytest.approx(1.06)
    assert resample_factor(None, 0.5) == resample_factor(0.5, None) == 1.0
    img = np.zeros((10, 20, 3), np.uint8)
    mask = np.zeros((10, 20), np.uint8)
    out, m = resample_to_mpp(img, 2.0, mask)
    assert out.shape == (20, 40, 3) and m.shape == (20, 40)
    assert resample_to_mpp(img, 1.0)[0] is img
    spec = Preprocessing(mpp=0.5)
    assert spec.resample_factor(1.0) == 2.0 and spec.resample_factor(0.5) == 1.0
