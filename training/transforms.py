"""Train and eval transform presets, HED stain jitter and Macenko stain normalisation.

Scale policy: a patch keeps its magnification. PatchDataset has already
rescaled it to ``data.mpp``; here it is cropped (random in training, centre in
evaluation) or reflect-padded to ``image_size``, never squashed, so the model
sees tissue at the same microns per pixel as the slide tiles it will meet at
inference. The only resizing is the random zoom of ``augment.scale``.

Each preset returns a picklable callable ``f(image=uint8 HWC, mask=uint8 HW | None)``
-> ``{"image": float32 tensor (3, H, W) normalised, "mask": int64 tensor (H, W) | None}``.
Masks go through the same geometry with nearest-neighbour interpolation, so
their values are always a subset of the input's.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import ImageOnlyTransform

__all__ = [
    "HEDJitter",
    "MacenkoNormalizer",
    "Pipeline",
    "RandConv",
    "RandomStainMatrix",
    "build_eval_transform",
    "build_train_transform",
    "reseed",
    "rgb_to_od",
]

# --------------------------------------------------------------------------- colour spaces

# Ruifrok & Johnston's haematoxylin, eosin and DAB optical-density vectors (the
# rows scikit-image's rgb2hed uses). With the third (DAB / residual) channel the
# 3x3 matrix is invertible, so any RGB colour round-trips exactly: the silver
# black of von Kossa and the orange-red of Alizarin survive HED jitter instead
# of being projected onto two H&E stains.
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32
)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)

# Optical density of each uint8 level: -ln((v + 1) / 256); 255 (white) -> 0.
_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def rgb_to_od(image: np.ndarray) -> np.ndarray:
    """Per-pixel optical density, ``(H, W, 3)`` float32, via a lookup table (cheap)."""
    return cv2.LUT(np.ascontiguousarray(image, dtype=np.uint8), _OD_LUT)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`, clipped to uint8."""
    rgb = cv2.exp(-np.asarray(od, dtype=np.float32))
    # 256 * exp(-od) - 1, rounded and saturated to 0..255 in one OpenCV call.
    return cv2.convertScaleAbs(np.maximum(rgb, 1.0 / 256.0, out=rgb), alpha=256.0, beta=-1.0)


def _apply_3x3(od: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Per-pixel ``od @ matrix`` for an (H, W, 3) array; cv2.transform is SIMD and fast."""
    return cv2.transform(od, np.ascontiguousarray(matrix.T, dtype=np.float32))


class HEDJitter(ImageOnlyTransform):
    """Stain-concentration jitter in HED space (Tellez et al. 2018).

    Colour deconvolution into haematoxylin, eosin and residual (DAB) channels;
    each channel is scaled by ``N(1, sigma)`` and shifted by ``N(0, sigma)``,
    then recomposed. The shift is faded out on near-white pixels (low optical
    density) so empty glass stays white, as it does between real labs.

    albumentations' ``HEStain`` was considered: it projects onto two stains and
    drops the residual, which recolours von Kossa and Alizarin red even at zero
    jitter, so this project keeps its own three-channel version.
    """

    def __init__(
        self,
        sigma: float = 0.05,
        background_od: float = 0.15,
        strength_sigma: float = 0.0,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.sigma = float(sigma)
        self.background_od = float(background_od)
        self.strength_sigma = float(strength_sigma)

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        alpha = rng.normal(1.0, self.sigma, size=3)
        if self.strength_sigma > 0:
            # One factor for all stains: section thickness and staining time
            # scale every dye's optical density together (log-normal, so a
            # 0.64x and a 1.57x lab are equally likely at sigma 0.45).
            alpha = alpha * np.exp(rng.normal(0.0, self.strength_sigma))
        return {
            "alpha": alpha.astype(np.float32),
            "beta": rng.normal(0.0, self.sigma, size=3).astype(np.float32),
        }

    def apply(
        self,
        img: np.ndarray,
        alpha: np.ndarray | None = None,
        beta: np.ndarray | None = None,
        **_: Any,
    ) -> np.ndarray:
        if alpha is None or beta is None or (self.sigma == 0 and self.strength_sigma == 0):
            return img
        od = rgb_to_od(img)
        # conc' = conc * alpha + w * beta with conc = od @ HED_FROM_RGB; back to OD
        # through RGB_FROM_HED. Folded into one 3x3 matrix plus a per-pixel offset.
        scale = (HED_FROM_RGB * alpha[None, :]) @ RGB_FROM_HED
        offset = (beta @ RGB_FROM_HED).astype(np.float32)
        out = _apply_3x3(od, scale)
        # Weight of the shift: 0 on glass, 1 on tissue (total OD above background_od).
        weight = cv2.transform(od, np.full((1, 3), 1.0 / self.background_od, np.float32))
        np.minimum(weight, 1.0, out=weight)  # OD is >= 0, so only the top needs clipping
        out += weight[..., None] * offset
        return od_to_rgb(out)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma", "background_od", "strength_sigma")


class RandomStainMatrix(ImageOnlyTransform):
    """A random dye basis: optical density re-mixed through ``I + N(0, sigma)`` (3x3).

    Each channel's optical density becomes a random combination of all three,
    so every dye is recoloured to a neighbouring but arbitrary hue while the
    density of each structure, and so its shape, is kept: a colour shortcut
    (pink means bone) stops paying off, the morphology does not. Glass (zero
    density) stays white.
    """

    def __init__(self, sigma: float = 0.25, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.sigma = float(sigma)

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        m = np.eye(3) + rng.normal(0.0, self.sigma, size=(3, 3))
        # overall density scale kept near 1: the stain's strength is HEDJitter's job
        m *= 3.0 / max(float(np.abs(m).sum(axis=0).mean() * 3.0), 1e-3)
        return {"matrix": m.astype(np.float32)}

    def apply(self, img: np.ndarray, matrix: np.ndarray | None = None, **_: Any) -> np.ndarray:
        if matrix is None:
            return img
        out = _apply_3x3(rgb_to_od(img), matrix)
        np.maximum(out, 0.0, out=out)
        return od_to_rgb(out)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma",)


class RandConv(ImageOnlyTransform):
    """Random convolution (Xu et al., ICLR 2021): texture and colour changed, shape kept.

    A random 3 -> 3 channel filter of size 1, 3 or 5 (weights ``N(0, 1/(3 k^2))``)
    is applied, its output rescaled to the input's mean and spread, and mixed
    with the input by a random ``alpha``: local textures and colours the
    renderer of the training data happened to draw are scrambled, outlines
    stay where they are.
    """

    def __init__(self, kernel_sizes: Sequence[int] = (1, 3, 5), p: float = 0.5) -> None:
        super().__init__(p=p)
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        k = int(rng.choice(self.kernel_sizes))
        w = rng.normal(0.0, 1.0 / math.sqrt(3 * k * k), size=(3, 3, k, k))
        return {"weights": w.astype(np.float32), "alpha": float(rng.uniform(0.0, 1.0))}

    def apply(
        self,
        img: np.ndarray,
        weights: np.ndarray | None = None,
        alpha: float = 1.0,
        **_: Any,
    ) -> np.ndarray:
        if weights is None:
            return img
        x = img.astype(np.float32) * (1.0 / 255.0)
        planes = [x[:, :, c] for c in range(3)]
        out = np.zeros_like(x)
        for o in range(3):
            acc = out[:, :, o]
            for c in range(3):
                acc += cv2.filter2D(planes[c], -1, weights[o, c], borderType=cv2.BORDER_REFLECT)
        # back to the input's brightness and contrast, then blended with it
        mu, sd = float(x.mean()), float(x.std()) + 1e-4
        out = (out - out.mean(axis=(0, 1))) / (out.std(axis=(0, 1)) + 1e-4) * sd + mu
        out = alpha * x + (1.0 - alpha) * out
        return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("kernel_sizes",)


# --------------------------------------------------------------------------- Macenko

# Reference H&E stain vectors (columns: haematoxylin, eosin; rows: R, G, B OD)
# and 99th-percentile concentrations, the values of Macenko et al.'s reference
# slide as circulated with the common reference implementation.
MACENKO_REF_STAINS = np.array(
    [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]], dtype=np.float32
)
MACENKO_REF_MAX_CONC = np.array([1.9705, 1.0308], dtype=np.float32)


def macenko_stains(
    image: np.ndarray,
    beta: float = 0.15,
    alpha: float = 1.0,
    min_pixels: int = 100,
    max_samples: int = 8192,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Estimate the H&E stain matrix (3x2, unit columns) and 99th-percentile concentrations.

    Macenko et al. 2009: optical density, drop transparent pixels (any channel OD
    < ``beta``), project onto the plane of the two largest eigenvectors, take the
    ``alpha`` / ``100 - alpha`` percentile angles as the stain vectors. At most
    ``max_samples`` evenly strided tissue pixels enter the percentiles (the
    estimate barely moves, the cost halves). Returns None when there is too
    little tissue or the estimate degenerates.
    """
    od = rgb_to_od(image).reshape(-1, 3)
    tissue = od[np.all(od >= beta, axis=1)]
    if tissue.shape[0] < min_pixels:
        return None
    if tissue.shape[0] > max_samples:
        tissue = tissue[:: -(-tissue.shape[0] // max_samples)]
    cov = np.cov(tissue.T.astype(np.float64))
    if not np.all(np.isfinite(cov)):
        return None
    _, vecs = np.linalg.eigh(cov)
    plane = vecs[:, 1:3]  # two largest eigenvalues (eigh sorts ascending)
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Orient to positive OD and put haematoxylin (larger red OD) first.
    v1, v2 = v1 * np.sign(v1.sum() or 1.0), v2 * np.sign(v2.sum() or 1.0)
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    norms = np.linalg.norm(stains, axis=0)
    if np.any(norms < 1e-6):
        return None
    stains = stains / norms
    if abs(float(stains[:, 0] @ stains[:, 1])) > 0.999:  # one colour only: no plane
        return None
    stains = stains.astype(np.float32)
    # Background pixels have zero concentration, so the tissue sample gives the
    # same upper percentile as the whole image would, without its dilution.
    conc = tissue @ np.linalg.pinv(stains).T
    max_conc = np.percentile(conc, 99, axis=0).astype(np.float32)
    if np.any(~np.isfinite(max_conc)) or np.any(max_conc < 1e-3):
        return None
    return stains, max_conc


class MacenkoNormalizer(ImageOnlyTransform):
    """Map an image's H&E stains onto a reference (Macenko et al. 2009), deterministic.

    Caution: the method models two stains, haematoxylin and eosin. Applied to
    von Kossa or Alizarin red it re-expresses their black / orange-red deposits
    as H&E-like colours; enable it (``augment.stain_normalize: macenko``) for
    H&E-only data. Images with too little tissue (blank, white) come back
    unchanged.
    """

    def __init__(
        self,
        reference_stains: np.ndarray | None = None,
        reference_max_conc: np.ndarray | None = None,
        beta: float = 0.15,
        alpha: float = 1.0,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.reference_stains = np.asarray(
            MACENKO_REF_STAINS if reference_stains is None else reference_stains, dtype=np.float32
        )
        self.reference_max_conc = np.asarray(
            MACENKO_REF_MAX_CONC if reference_max_conc is None else reference_max_conc,
            dtype=np.float32,
        )
        self.beta = float(beta)
        self.alpha = float(alpha)

    def fit(self, image: np.ndarray) -> MacenkoNormalizer:
        """Use ``image`` (a well-stained H&E patch) as the reference."""
        est = macenko_stains(image, self.beta, self.alpha)
        if est is None:
            raise ValueError("the reference image has too little stained tissue for Macenko")
        self.reference_stains, self.reference_max_conc = est
        return self

    def apply(self, img: np.ndarray, **_: Any) -> np.ndarray:
        est = macenko_stains(img, self.beta, self.alpha)
        if est is None:
            return img
        stains, max_conc = est
        # od -> concentrations (pinv) -> rescaled to the reference maxima -> reference
        # stains: one 3x3 matrix per image.
        matrix = (
            np.linalg.pinv(stains).T * (self.reference_max_conc / max_conc)[None, :]
        ) @ self.reference_stains.T
        return od_to_rgb(_apply_3x3(rgb_to_od(img), matrix))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("reference_stains", "reference_max_conc", "beta", "alpha")


# --------------------------------------------------------------------------- pipeline


def make_fork_safe() -> None:
    """Shut OpenCV's thread pool down in this process before DataLoader workers fork.

    A child forked while the pool is running inherits its locks but not its
    threads, and its first call into OpenCV (even ``setNumThreads``) can wait
    forever: the hang seen in the test suite and in the generator's pool. The
    parent does no image work while workers exist, so one thread costs nothing.
    """
    cv2.setNumThreads(1)


def reseed(compose: A.BaseCompose, seed: int | None) -> None:
    """Seed an albumentations pipeline with ONE pair of generators that all its
    transforms draw from in turn.

    ``Compose.set_random_seed(seed)`` gives every transform its own generator
    seeded with the same number, so their draws coincide: the first draw of
    each decides whether it applies, so every p=0.5 transform fired together
    with every other (brightness/contrast always with hue/saturation, blur
    only when JPEG did; measured over 400 seeds). Sharing one stream makes
    the transforms independent, as their probabilities promise, and costs one
    generator per item instead of one per transform (0.21 -> 0.015 ms).
    """
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))


class Pipeline:
    """Callable wrapper: albumentations in, torch tensors out, worker-aware seeding.

    Inside a DataLoader worker it re-seeds itself from the worker's seed (which
    torch derives from the main process's seed, per epoch and per worker) so
    workers do not repeat one another's augmentations, and it turns OpenCV's
    own threads off there (two worker processes on two cores are enough).
    """

    def __init__(self, compose: A.Compose, seed: int | None = None) -> None:
        self.compose = compose
        self.seed = seed
        self._seeded_for: tuple[int, int | None] | None = None
        if seed is not None:
            reseed(self.compose, seed)

    def set_seed(self, seed: int | None) -> None:
        self.seed = seed
        reseed(self.compose, seed)
        self._seeded_for = (os.getpid(), None)

    def _maybe_reseed(self) -> None:
        info = torch.utils.data.get_worker_info()
        key = (os.getpid(), None if info is None else int(info.seed))
        if key == self._seeded_for:
            return
        if info is not None:
            cv2.setNumThreads(1)
            reseed(self.compose, int(info.seed) % 2**32)
        elif self.seed is None:
            reseed(self.compose, int(torch.initial_seed()) % 2**32)
        self._seeded_for = key

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise TypeError(f"transform expects a uint8 image, got {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"transform expects an (H, W, 3) image, got shape {image.shape}")
        self._maybe_reseed()
        if mask is None:
            out = self.compose(image=image)
            mask_t = None
        else:
            mask = np.asarray(mask)
            if mask.shape != image.shape[:2]:
                raise ValueError(f"mask shape {mask.shape} differs from image {image.shape[:2]}")
            out = self.compose(image=image, mask=np.ascontiguousarray(mask, dtype=np.uint8))
            mask_t = torch.from_numpy(np.ascontiguousarray(out["mask"]).astype(np.int64))
        img = np.ascontiguousarray(out["image"].transpose(2, 0, 1), dtype=np.float32)
        return {"image": torch.from_numpy(img), "mask": mask_t}

    def __repr__(self) -> str:
        return f"Pipeline({self.compose!r})"


def _size_ops(image_size: int, train: bool) -> list[A.BasicTransform]:
    """Pad (reflect) small patches and crop large ones to image_size, keeping scale."""
    return [
        A.PadIfNeeded(
            min_height=image_size,
            min_width=image_size,
            position="random" if train else "center",
            border_mode=cv2.BORDER_REFLECT_101,
        ),
        (A.RandomCrop if train else A.CenterCrop)(height=image_size, width=image_size),
    ]


def _tail(mean: Sequence[float], std: Sequence[float]) -> list[A.BasicTransform]:
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)]


def build_eval_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    stain_normalize: str = "none",
) -> Pipeline:
    """Deterministic: optional Macenko, centre crop / reflect pad, normalise."""
    ops: list[A.BasicTransform] = []
    if stain_normalize == "macenko":
        ops.append(MacenkoNormalizer())
    elif stain_normalize != "none":
        raise ValueError(f"stain_normalize must be 'none' or 'macenko', got {stain_normalize!r}")
    ops += _size_ops(image_size, train=False)
    ops += _tail(mean, std)
    return Pipeline(A.Compose(ops), seed=0)


def build_train_transform(
    aug: Any,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    seed: int | None = None,
) -> Pipeline:
    """Training augmentation from an :class:`~calcinosis.training.config.AugmentConfig`.

    Order follows the life of a slide: stain chemistry (HED jitter), then the
    scanner (illumination, colour balance, focus), then storage (JPEG).
    ``seed`` fixes the sequence in the main process; DataLoader workers
    re-seed from torch (see :class:`Pipeline`).
    """
    ops: list[A.BasicTransform] = []
    if aug.stain_normalize == "macenko":
        ops.append(MacenkoNormalizer())
    lo, hi = aug.scale
    if (lo, hi) != (1.0, 1.0):
        ops.append(
            A.RandomScale(
                scale_limit=(lo - 1.0, hi - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            )
        )
    ops += _size_ops(image_size, train=True)
    if aug.flips:
        ops.append(A.D4(p=1.0))  # all 8 flips / quarter turns, identity included
    if aug.hed_sigma > 0 or aug.stain_strength > 0:
        ops.append(HEDJitter(sigma=aug.hed_sigma, strength_sigma=aug.stain_strength, p=1.0))
    if aug.random_stain_prob > 0:
        ops.append(RandomStainMatrix(sigma=0.25, p=aug.random_stain_prob))
    if aug.randconv_prob > 0:
        ops.append(RandConv(p=aug.randconv_prob))
    if aug.grayscale_prob > 0:
        ops.append(A.ToGray(num_output_channels=3, p=aug.grayscale_prob))
    if aug.brightness_contrast > 0:
        bc = aug.brightness_contrast
        ops.append(A.RandomBrightnessContrast(brightness_limit=bc, contrast_limit=bc, p=0.5))
    if aug.hue_shift > 0:
        # OpenCV stores hue as degrees / 2; saturation shift is additive on 0..255.
        ops.append(
            A.HueSaturationValue(
                hue_shift_limit=aug.hue_shift / 2.0,
                sat_shift_limit=aug.hue_shift * 2.55,
                val_shift_limit=0,
                p=0.5,
            )
        )
    if aug.blur_prob > 0:
        ops.append(A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.2), p=aug.blur_prob))
    if aug.jpeg_prob > 0:
        ops.append(A.ImageCompression(quality_range=(50, 95), p=aug.jpeg_prob))
    ops += _tail(mean, std)
    return Pipeline(A.Compose(ops), seed=seed)
