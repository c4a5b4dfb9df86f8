"""Transform presets, HED jitter and Macenko normalisation."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from calcinosis.training import transforms as tr
from calcinosis.training.config import AugmentConfig
from calcinosis.training.transforms import (
    MACENKO_REF_STAINS,
    FibreTexture,
    HEDJitter,
    MacenkoNormalizer,
    RandConv,
    RandomStainMatrix,
    build_eval_transform,
    build_train_transform,
    macenko_stains,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _he_image(size: int = 64, seed: int = 0, stains: np.ndarray | None = None) -> np.ndarray:
    """H&E-like patch from known stain vectors: white glass, pink stroma, purple nuclei."""
    rng = np.random.default_rng(seed)
    stains = MACENKO_REF_STAINS if stains is None else stains
    conc = np.zeros((size, size, 2), dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    tissue = xx > size // 4  # left quarter is glass
    conc[..., 1] = np.where(tissue, rng.uniform(0.3, 0.9, (size, size)), 0)
    for _ in range(size // 4):
        cy, cx = rng.integers(0, size, 2)
        nucleus = ((yy - cy) ** 2 + (xx - cx) ** 2 < 9) & tissue
        conc[..., 0] = np.where(nucleus, rng.uniform(0.8, 1.6), conc[..., 0])
    od = conc @ stains.T
    return np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)


def _mask(size: int = 64) -> np.ndarray:
    m = np.zeros((size, size), dtype=np.uint8)
    m[10:30, 20:50] = 1
    m[40:60, 5:25] = 3
    return m


def _quiet_aug(**kw) -> AugmentConfig:
    base = dict(blur_prob=0.0, jpeg_prob=0.0, hed_sigma=0.0, brightness_contrast=0.0, hue_shift=0)
    base.update(kw)
    return AugmentConfig(**base)


# --------------------------------------------------------------------------- presets


def test_train_and_eval_output_shapes_and_dtypes():
    img, mask = _he_image(), _mask()
    for f in (
        build_train_transform(AugmentConfig(), 48, MEAN, STD, seed=0),
        build_eval_transform(48, MEAN, STD),
    ):
        out = f(image=img, mask=mask)
        assert out["image"].shape == (3, 48, 48) and out["image"].dtype == torch.float32
        assert out["mask"].shape == (48, 48) and out["mask"].dtype == torch.int64
        assert out["image"].is_contiguous()
        assert f(image=img)["mask"] is None
        assert f(image=img, mask=None)["image"].shape == (3, 48, 48)


def test_eval_normalises_with_given_mean_std_and_is_deterministic():
    img = np.full((32, 32, 3), 255, dtype=np.uint8)
    out = build_eval_transform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(image=img)["image"]
    assert torch.allclose(out, torch.full_like(out, 2.0))
    f = build_eval_transform(32, MEAN, STD)
    a, b = f(image=_he_image(40)), f(image=_he_image(40))
    assert torch.equal(a["image"], b["image"])


def test_eval_keeps_scale_centre_crops_and_pads():
    img = np.zeros((40, 60, 3), dtype=np.uint8)
    img[:, 29:31] = 255  # a bright line at the centre column
    out = build_eval_transform(32, (0, 0, 0), (1, 1, 1))(image=img)["image"]
    assert out.shape == (3, 32, 32)
    assert out[0, :, 15:17].min() == 1.0 and out[0, :, :14].max() == 0.0  # cropped, not resized
    small = build_eval_transform(32, MEAN, STD)(image=_he_image(20), mask=_mask(20))
    assert small["image"].shape == (3, 32, 32) and small["mask"].shape == (32, 32)


@pytest.mark.parametrize("size", [48, 64, 80])
def test_train_mask_values_are_a_subset_and_stay_aligned(size):
    # Colour augmentations off: image pixels must sit exactly where their labels sit.
    mask = _mask(size)
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    img[mask == 1] = (0, 0, 0)
    img[mask == 3] = (0, 0, 255)
    f = build_train_transform(_quiet_aug(scale=(0.8, 1.25)), 64, (0, 0, 0), (1, 1, 1), seed=1)
    for _ in range(20):
        out = f(image=img, mask=mask)
        m, x = out["mask"].numpy(), out["image"].numpy()
        assert set(np.unique(m)) <= {0, 1, 3}
        # Label pixels away from edges (which interpolation blends) have their colour.
        kernel = np.ones((5, 5), np.uint8)
        inner = cv2.erode((m == 1).astype(np.uint8), kernel).astype(bool)
        if inner.any():
            assert x[0][inner].max() < 0.2
        # Unlabelled pixels far from labels are white. The outermost row and
        # column are left out: there OpenCV's linear (image) and nearest (mask)
        # resizing sample the edge differently, and reflect padding mirrors that
        # edge row onto the border; a shifted label would show inside as well.
        far = ~cv2.dilate((m != 0).astype(np.uint8), kernel).astype(bool)
        far[[0, -1], :] = far[:, [0, -1]] = False
        assert x[0][far].min() > 0.8


def test_train_mask_values_subset_with_all_augmentations():
    f = build_train_transform(AugmentConfig(blur_prob=1.0, jpeg_prob=1.0), 64, MEAN, STD, seed=3)
    for _ in range(10):
        assert set(f(image=_he_image(), mask=_mask())["mask"].unique().tolist()) <= {0, 1, 3}


def test_train_pipeline_never_writes_into_its_input():
    # The decoded-patch cache hands out read-only arrays: every augmentation
    # must copy rather than write in place (it raises if one does not).
    img, mask = _he_image(), _mask()
    img.flags.writeable = mask.flags.writeable = False
    aug = AugmentConfig(
        blur_prob=1.0,
        jpeg_prob=1.0,
        brightness_contrast=0.2,
        hue_shift=10,
        random_stain_prob=1.0,
        randconv_prob=1.0,
        grayscale_prob=1.0,
    )
    for stain_normalize in ("none", "macenko"):
        aug.stain_normalize = stain_normalize
        f = build_train_transform(aug, 48, MEAN, STD, seed=0)
        for _ in range(10):
            assert f(image=img, mask=mask)["image"].shape == (3, 48, 48)
        build_eval_transform(48, MEAN, STD, stain_normalize=stain_normalize)(image=img, mask=mask)


def test_train_seed_makes_it_repeatable():
    img, mask = _he_image(), _mask()
    a = build_train_transform(AugmentConfig(), 64, MEAN, STD, seed=11)
    b = build_train_transform(AugmentConfig(), 64, MEAN, STD, seed=11)
    c = build_train_transform(AugmentConfig(), 64, MEAN, STD, seed=12)
    outs_a = [a(image=img, mask=mask) for _ in range(5)]
    outs_b = [b(image=img, mask=mask) for _ in range(5)]
    outs_c = [c(image=img, mask=mask) for _ in range(5)]
    for x, y in zip(outs_a, outs_b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert any(not torch.equal(x["image"], z["image"]) for x, z in zip(outs_a, outs_c, strict=True))


def test_reseed_draws_each_transform_independently():
    # Seeded per item as the training loop does, two p=0.5 transforms must fire
    # apart as often as together (Compose.set_random_seed gave them identical
    # streams, so they always fired together).
    import albumentations as A

    compose = A.Compose(
        [A.RandomBrightnessContrast(p=0.5), A.HueSaturationValue(p=0.5)],
        save_applied_params=True,
    )
    img = _he_image()
    combos = []
    for seed in range(200):
        tr.reseed(compose, seed)
        applied = {name for name, _ in compose(image=img)["applied_transforms"]}
        combos.append(tuple(sorted(applied)))
    alone = sum(len(c) == 1 for c in combos)
    assert 60 <= alone <= 140, combos  # ~100 expected of independent coin flips
    tr.reseed(compose, 7)
    first = compose(image=img)["image"]
    tr.reseed(compose, 7)
    assert np.array_equal(compose(image=img)["image"], first)  # and still repeatable


def test_a_call_seed_fixes_that_call_whatever_ran_before(monkeypatch):
    # What the training loader relies on: item (index, seed) is augmented the
    # same in any process, after any history of seeded or unseeded calls.
    img, mask = _he_image(), _mask()
    f = build_train_transform(AugmentConfig(), 64, MEAN, STD, seed=0)
    first = f(image=img, mask=mask, seed=5)
    for _ in range(3):
        f(image=img)  # unseeded calls move the pipeline's own stream on
    again = f(image=img, mask=mask, seed=5)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    assert not torch.equal(f(image=img, seed=6)["image"], first["image"])
    # in a DataLoader worker, whose own reseeding must not override the call's seed
    g = pickle.loads(pickle.dumps(f))
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(seed=99))
    assert torch.equal(g(image=img, mask=mask, seed=5)["image"], first["image"])


def test_eval_transform_accepts_a_seed_and_ignores_it():
    f = build_eval_transform(48, MEAN, STD)
    img, mask = _he_image(), _mask()
    plain, seeded = f(image=img, mask=mask), f(image=img, mask=mask, seed=3)
    for key in ("image", "mask"):
        assert torch.equal(plain[key], seeded[key]), key


def test_workers_reseed_from_their_torch_seed(monkeypatch):
    img = _he_image()
    f = build_train_transform(AugmentConfig(), 64, MEAN, STD, seed=0)
    g = pickle.loads(pickle.dumps(f))  # what a DataLoader worker receives

    def run(pipe, seed):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(seed=seed))
        pipe._seeded_for = None  # as in a fresh worker process
        return pipe(image=img)["image"]

    assert torch.equal(run(f, 100), run(g, 100))
    assert not torch.equal(run(f, 100), run(g, 101))


# --------------------------------------------------------------------------- HED jitter


def test_hed_round_trip_is_exact_for_any_colour():
    # Identity parameters: even von Kossa black and Alizarin orange-red survive.
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img[0, 0], img[0, 1] = (20, 20, 20), (230, 90, 40)
    t = HEDJitter(sigma=0.05)
    out = t.apply(img, alpha=np.ones(3, np.float32), beta=np.zeros(3, np.float32))
    assert np.abs(out.astype(int) - img.astype(int)).max() <= 1


def test_hed_jitter_changes_stain_but_keeps_glass_white():
    img = _he_image(64)
    t = HEDJitter(sigma=0.15, p=1.0)
    t.set_random_seed(0)
    changed = 0
    for _ in range(8):
        out = t(image=img)["image"]
        glass = out[:, :12]
        assert glass.min() >= 250  # empty glass stays (near) white
        tissue_diff = np.abs(out[:, 24:].astype(int) - img[:, 24:].astype(int)).mean()
        changed += tissue_diff > 2.0
    assert changed >= 6


def test_hed_jitter_zero_sigma_is_identity():
    img = _he_image(32)
    t = HEDJitter(sigma=0.0, p=1.0)
    assert np.array_equal(t(image=img)["image"], img)


def test_stain_strength_scales_every_dye_together():
    # sigma 0, strength only: each pixel's optical density is multiplied by one
    # factor per image, so hue is kept and the patch gets darker or paler as a whole.
    from calcinosis.training.transforms import rgb_to_od

    img = _he_image(64)
    t = HEDJitter(sigma=0.0, strength_sigma=0.4, p=1.0)
    t.set_random_seed(1)
    factors = []
    for _ in range(6):
        out = t(image=img)["image"]
        od_in, od_out = rgb_to_od(img)[:, 24:], rgb_to_od(out)[:, 24:]
        dense = od_in > 0.3
        ratio = od_out[dense] / od_in[dense]
        assert ratio.std() < 0.05 * ratio.mean()  # one factor for R, G, B and all pixels
        factors.append(float(np.median(ratio)))
    assert max(factors) / min(factors) > 1.3, factors  # and it does vary


# --------------------------------------------------------------------------- Macenko


@pytest.mark.parametrize(
    "blank",
    [
        np.full((32, 32, 3), 255, np.uint8),
        np.full((32, 32, 3), 240, np.uint8),
        np.full((32, 32, 3), (150, 60, 140), np.uint8),  # one flat colour: degenerate plane
        np.zeros((32, 32, 3), np.uint8),
    ],
)
def test_macenko_returns_blank_or_degenerate_images_unchanged(blank):
    out = MacenkoNormalizer()(image=blank.copy())["image"]
    assert np.array_equal(out, blank)


def test_macenko_maps_stains_toward_the_reference():
    # Source lab: haematoxylin bluer, eosin more orange than the reference.
    src = np.array([[0.40, 0.10], [0.70, 0.85], [0.59, 0.52]], dtype=np.float32)
    src /= np.linalg.norm(src, axis=0)
    img = _he_image(96, seed=4, stains=src)
    norm = MacenkoNormalizer()
    out = norm(image=img)["image"]
    before, _ = macenko_stains(img)
    after, _ = macenko_stains(out)
    ref = MACENKO_REF_STAINS / np.linalg.norm(MACENKO_REF_STAINS, axis=0)

    def cos(a, b):
        return float((a * b).sum(axis=0).min())

    assert cos(after, ref) > cos(before, ref)
    assert cos(after, ref) > 0.99
    assert out[:, :20].min() >= 250  # glass stays white
    # Deterministic, and usable inside the eval preset.
    assert np.array_equal(norm(image=img)["image"], out)
    assert build_eval_transform(64, MEAN, STD, "macenko")(image=img)["image"].shape == (3, 64, 64)


def test_macenko_fit_uses_a_reference_image():
    ref_img = _he_image(64, seed=1)
    norm = MacenkoNormalizer().fit(ref_img)
    assert norm.reference_stains.shape == (3, 2)
    with pytest.raises(ValueError):
        MacenkoNormalizer().fit(np.full((16, 16, 3), 255, np.uint8))


def test_bad_inputs_are_rejected_clearly():
    f = build_eval_transform(32, MEAN, STD)
    with pytest.raises(TypeError):
        f(image=np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError):
        f(image=np.zeros((8, 8, 3), np.uint8), mask=np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        build_eval_transform(32, MEAN, STD, stain_normalize="reinhard")
    assert tr.od_to_rgb(tr.rgb_to_od(np.arange(256, dtype=np.uint8))).tolist() == list(range(256))


# --------------------------------------------------------------------------- style randomisation


def test_random_stain_matrix_recolours_tissue_and_keeps_glass_white():
    img = _he_image()
    t = RandomStainMatrix(sigma=0.25, p=1.0)
    hues = []
    for seed in range(6):
        t.set_random_seed(seed)
        out = t(image=img)["image"]
        assert out.shape == img.shape and out.dtype == np.uint8
        assert out[:, :8].min() >= 250  # glass (zero density) stays white
        hues.append(out[:, 32:].reshape(-1, 3).mean(axis=0))
    # a new dye basis for every draw: the tissue colour moves between draws
    assert np.ptp(np.stack(hues), axis=0).max() > 10
    # the density map, hence the structure, is kept: darkness ranks the same pixels
    od_in = tr.rgb_to_od(img).sum(axis=2).ravel()
    od_out = tr.rgb_to_od(out).sum(axis=2).ravel()
    assert np.corrcoef(od_in, od_out)[0, 1] > 0.8


def test_randconv_keeps_outlines_and_range():
    img = _he_image()
    t = RandConv(p=1.0)
    for seed in range(6):
        t.set_random_seed(seed)
        params = t.get_params()
        out = t.apply(img, **params)
        assert out.shape == img.shape and out.dtype == np.uint8
        # edges stay where they were: the glass/tissue border is still the strongest step
        grey_in = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
        grey_out = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY).astype(np.float32)
        ein = np.abs(np.diff(grey_in, axis=1)).mean(axis=0)
        eout = np.abs(np.diff(grey_out, axis=1)).mean(axis=0)
        assert abs(int(np.argmax(ein)) - int(np.argmax(eout))) <= 2 or eout.max() < 1
    # alpha 1 gives the input back
    w = np.zeros((3, 3, 1, 1), np.float32)
    assert np.array_equal(t.apply(img, weights=w, alpha=1.0), img)


def test_fibre_texture_streaks_stained_areas_along_one_direction_and_keeps_glass():
    # a flat pink fill (no structure of its own) with glass on the left quarter
    img = np.zeros((96, 96, 3), np.uint8)
    img[:] = 255
    img[:, 24:] = (230, 150, 190)
    t = FibreTexture(strength=(0.4, 0.4), sigma_along=(6.0, 6.0), sigma_across=(0.6, 0.6), p=1.0)
    outs = []
    for seed in range(4):
        t.set_random_seed(seed)
        out = t(image=img)["image"]
        assert out.shape == img.shape and out.dtype == np.uint8
        assert (out[:, :24] == 255).all()  # glass has no density to texture
        od = tr.rgb_to_od(out)[:, 30:].sum(axis=2)
        assert od.std() > 0.05 * od.mean()  # the flat fill now has grain
        # streaks: the density correlates far more along some direction than
        # across it (a flat field, or isotropic noise, would not)
        corr = []
        for dy, dx in ((0, 3), (3, 0), (3, 3), (3, -3)):
            a = od[6:-6, 6:-6]
            b = np.roll(np.roll(od, -dy, 0), -dx, 1)[6:-6, 6:-6]
            corr.append(np.corrcoef(a.ravel(), b.ravel())[0, 1])
        assert max(corr) - min(corr) > 0.3
        outs.append(out)
    assert not np.array_equal(outs[0], outs[1])
    t.set_random_seed(2)
    assert np.array_equal(t(image=img)["image"], outs[2])  # seeded: repeatable
    # the mask rides through the training pipeline untouched
    f = build_train_transform(
        _quiet_aug(texture_prob=1.0, flips=False, scale=(1.0, 1.0)), 64, MEAN, STD, seed=1
    )
    assert any(type(op).__name__ == "FibreTexture" for op in f.compose.transforms)
    assert torch.equal(f(image=_he_image(), mask=_mask())["mask"], torch.from_numpy(_mask()).long())


def test_style_randomisation_keys_are_checked():
    from calcinosis.model.errors import ConfigError

    for key in ("random_stain_prob", "randconv_prob", "grayscale_prob", "texture_prob"):
        with pytest.raises(ConfigError, match=f"augment.{key}"):
            AugmentConfig(**{key: 1.5})


def test_scanner_ranges_reach_the_pipeline():
    """Blur sigma, JPEG quality and sensor noise come from the config, not constants."""
    default = tr.build_train_transform(
        AugmentConfig(blur_prob=1.0, jpeg_prob=1.0), 64, (0.5,) * 3, (0.5,) * 3, seed=0
    )
    ops = {type(op).__name__: op for op in default.compose.transforms}
    assert "GaussNoise" not in ops  # noise is off unless asked for
    blur = ops["GaussianBlur"]
    assert tuple(blur.sigma_limit) == (0.3, 1.2) and tuple(blur.blur_limit) == (3, 5)
    wide = AugmentConfig(
        blur_prob=1.0,
        blur_sigma=(0.3, 2.2),
        jpeg_prob=1.0,
        jpeg_quality=(25, 95),
        noise_prob=1.0,
        noise_std=(0.01, 0.02),
    )
    pipe = tr.build_train_transform(wide, 64, (0.5,) * 3, (0.5,) * 3, seed=0)
    ops = {type(op).__name__: op for op in pipe.compose.transforms}
    assert tuple(ops["GaussianBlur"].sigma_limit) == (0.3, 2.2)
    assert tuple(ops["ImageCompression"].quality_range) == (25, 95)
    assert tuple(ops["GaussNoise"].std_range) == (0.01, 0.02)
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    out = pipe(image=img, mask=np.zeros((64, 64), np.uint8))
    assert out["image"].shape == (3, 64, 64) and torch.isfinite(out["image"]).all()


# --------------------------------------------------------------------------- Fourier domain adaptation


def test_fda_takes_low_frequencies_from_the_reference_and_keeps_outlines():
    img = _he_image(seed=0)
    # a reference of another colour entirely: a flat blue-grey field with one dark band
    ref = np.full((96, 96, 3), (120, 140, 190), np.uint8)
    ref[40:56] = (40, 50, 90)
    f = build_train_transform(
        _quiet_aug(flips=False, scale=(1.0, 1.0), fda_prob=1.0, fda_beta=0.05), 64, MEAN, STD
    )
    assert f.wants_reference and f.reference_stains == ("he",)
    plain = build_train_transform(_quiet_aug(flips=False, scale=(1.0, 1.0)), 64, MEAN, STD)(
        image=img
    )["image"]
    own = f(image=img, seed=0)["image"]  # no reference: nothing changes
    assert torch.equal(own, plain)
    moved = [f(image=img, seed=s, reference=ref)["image"] for s in range(4)]
    # a DataLoader worker's copy does the same with the same seed and reference
    g = pickle.loads(pickle.dumps(f))
    assert torch.equal(g(image=img, seed=0, reference=ref)["image"], moved[0])
    assert max(float((m - plain).abs().mean()) for m in moved) > 0.1
    # phase is kept: the glass/tissue border stays where it was
    for m in moved:
        step = (m[:, :, 1:] - m[:, :, :-1]).abs().mean(dim=(0, 1))
        assert abs(int(step.argmax()) - (64 // 4 - 1)) <= 2


def test_fda_keys_are_checked():
    from calcinosis.model.errors import ConfigError

    with pytest.raises(ConfigError, match="augment.fda_prob"):
        AugmentConfig(fda_prob=2.0)
    with pytest.raises(ConfigError, match="augment.fda_beta"):
        AugmentConfig(fda_beta=0.0)
    with pytest.raises(ConfigError, match="augment.fda_stains.*masson"):
        AugmentConfig(fda_stains=("he", "masson"))
