"""Train and eval transform presets, HED stain jitter and the Macenko transform.

Scale policy: a patch keeps its magnification. PatchDataset has already
rescaled it to ``data.mpp``; here it is cropped (random in training, centre in
evaluation) or reflect-padded to ``image_size``, never squashed, so the model
sees tissue at the same microns per pixel as the slide tiles it will meet at
inference. The only resizing is the random zoom of ``augment.scale``.

The evaluation preset is the model's preprocessing contract
(:class:`calcinosis.model.preprocess.Preprocessing`), the same function the
Predictor applies; the optical-density and Macenko arithmetic lives in
:mod:`calcinosis.model.stain`, shared with inference.

Each preset returns a picklable callable
``f(image=uint8 HWC, mask=uint8 HW | None, *, seed=int | None)`` ->
``{"image": float32 tensor (3, H, W) normalised, "mask": int64 tensor (H, W) | None}``;
``seed`` fixes one call's augmentation (the evaluation preset ignores it).
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

from calcinosis.model.preprocess import Preprocessing
from calcinosis.model.stain import (
    MACENKO_REF_MAX_CONC,
    MACENKO_REF_STAINS,
    apply_3x3,
    macenko_normalize,
    macenko_stains,
    od_to_rgb,
    rgb_to_od,
)

from .threads import set_cv2_threads

__all__ = [
    "EvalTransform",
    "FibreTexture",
    "HEDJitter",
    "MacenkoNormalizer",
    "Pipeline",
    "RandConv",
    "RandomStainMatrix",
    "ReferenceFDA",
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
        out = apply_3x3(od, scale)
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
        out = apply_3x3(rgb_to_od(img), matrix)
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


class FibreTexture(ImageOnlyTransform):
    """Fine fibrillar texture laid over every stained structure, in optical density.

    Real tissue is never a flat fill: collagen, bone matrix, cartilage and
    deposits all carry fine streaks (fibrils, lamellae, knife chatter) and
    density grain, while a renderer draws smooth areas inside crisp outlines.
    A model trained on the flat fills can take texture itself as a sign of one
    class and meet it in every real patch. Here white noise is smeared along
    two random directions by thin anisotropic Gaussians (``sigma_along`` by
    ``sigma_across`` px), blended by a smooth random mask so the grain bends
    from one direction to the other, and each pixel's optical density is
    scaled by ``exp(strength * noise)``: stained areas get streaks, glass
    (zero density) stays white, outlines and the label map stay where they
    are, and since every class gets the same texture it tells none apart.
    """

    def __init__(
        self,
        strength: tuple[float, float] = (0.1, 0.45),
        sigma_along: tuple[float, float] = (2.0, 8.0),
        sigma_across: tuple[float, float] = (0.4, 1.2),
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        self.strength = (float(strength[0]), float(strength[1]))
        self.sigma_along = (float(sigma_along[0]), float(sigma_along[1]))
        self.sigma_across = (float(sigma_across[0]), float(sigma_across[1]))

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        h, w = params["shape"][:2]
        rng = self.random_generator
        along = float(rng.uniform(*self.sigma_along))
        across = float(rng.uniform(*self.sigma_across))
        theta = float(rng.uniform(0.0, math.pi))
        fields = []
        for angle in (theta, theta + float(rng.uniform(-0.8, 0.8))):
            noise = rng.standard_normal((h, w)).astype(np.float32)
            k = _streak_kernel(along, across, angle)
            fields.append(cv2.filter2D(noise, -1, k, borderType=cv2.BORDER_REFLECT))
        # a smooth blend between the two directions (about a fifth of the patch)
        mask = rng.standard_normal((h, w)).astype(np.float32)
        mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=max(h, w) / 5.0)
        mask = 1.0 / (1.0 + np.exp(-mask / (float(mask.std()) + 1e-6) * 2.0))
        tex = mask * fields[0] + (1.0 - mask) * fields[1]
        tex -= float(tex.mean())
        tex /= float(tex.std()) + 1e-6
        return {"texture": tex * float(rng.uniform(*self.strength))}

    def apply(self, img: np.ndarray, texture: np.ndarray | None = None, **_: Any) -> np.ndarray:
        if texture is None:
            return img
        od = rgb_to_od(img)
        od *= np.exp(texture)[:, :, None]
        return od_to_rgb(od)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("strength", "sigma_along", "sigma_across")


def _streak_kernel(along: float, across: float, angle: float) -> np.ndarray:
    """A normalised Gaussian kernel ``along`` x ``across`` px (sigmas), long axis at ``angle``."""
    r = int(math.ceil(3.0 * along))
    y, x = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    k = np.exp(-0.5 * ((u / along) ** 2 + (v / across) ** 2))
    return (k / k.sum()).astype(np.float32)


# --------------------------------------------------------------------------- Macenko


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
        return macenko_normalize(
            img, self.reference_stains, self.reference_max_conc, self.beta, self.alpha
        )

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("reference_stains", "reference_max_conc", "beta", "alpha")


# --------------------------------------------------------------------------- pipeline


def make_fork_safe() -> None:
    """Shut OpenCV's thread pool down in this process before DataLoader workers fork.

    A child forked while the pool is running can hang on its first call into
    OpenCV (see :mod:`calcinosis.training.threads`); the parent does no image
    work while workers exist, so one thread costs nothing.
    """
    set_cv2_threads(1)


def reseed(compose: A.BaseCompose, seed: int | None) -> None:
    """Seed an albumentations pipeline with ONE pair of generators that all its
    transforms draw from in turn (albumentations' public ``set_random_state``).

    ``Compose.set_random_seed(seed)`` (and ``Compose(seed=...)``) gives every
    transform its own generator seeded with the same number, so their draws
    coincide: the first draw of each decides whether it applies, so every
    p=0.5 transform fired together with every other (brightness/contrast
    always with hue/saturation, blur only when JPEG did; measured over 400
    seeds). Sharing one stream makes the transforms independent, as their
    probabilities promise, and costs one generator per item instead of one
    per transform (0.21 -> 0.015 ms).
    """
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))


FDA_KEY = "fda_metadata"


class ReferenceFDA(A.FDA):
    """albumentations' ``FDA``, doing nothing for a call whose reference list is empty.

    A call without a reference (a stain outside ``augment.fda_stains``) leaves
    the patch as it is and skips the Fourier transforms, instead of swapping
    the patch's spectrum with its own to no effect.
    """

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        if not data.get(self.metadata_key):
            return {"target_image": None, "beta": 0.0}
        return super().get_params_dependent_on_data(params, data)

    def apply(
        self, img: np.ndarray, target_image: np.ndarray | None, beta: float, **params: Any
    ) -> np.ndarray:
        return img if target_image is None else super().apply(img, target_image, beta, **params)


class Pipeline:
    """Callable wrapper: albumentations in, torch tensors out, seeded per call or per process.

    A pipeline with a Fourier domain adaptation step (``augment.fda_prob``)
    has ``wants_reference`` set: its caller passes ``reference=`` (another
    uint8 patch, any size) with each call for a patch of a stain in
    ``reference_stains``; without one the step leaves the patch unchanged.

    ``pipeline(image, mask, seed=s)`` augments with generators seeded with
    ``s`` for that call alone: the same seed gives the same augmentation
    whatever ran before, in whichever process. The training loader passes
    each item's seed (:class:`~calcinosis.training.loaders.SeededDataset`).

    Without a seed the pipeline draws on from its generators: seeded with
    ``seed`` at construction, or else from torch's initial seed; inside a
    DataLoader worker it first re-seeds from the worker's seed (which torch
    derives from the main process's seed, per epoch and per worker), so
    workers do not repeat one another's augmentations, and turns OpenCV's
    own threads off there (two worker processes on two cores are enough).
    """

    def __init__(
        self,
        compose: A.Compose,
        seed: int | None = None,
        reference_stains: Sequence[str] = (),
    ) -> None:
        self.compose = compose
        self.reference_stains = tuple(reference_stains)
        self.seed = seed
        self._seeded_for: tuple[int, int | None] | None = None
        self.wants_reference = any(isinstance(t, ReferenceFDA) for t in compose.transforms)
        if seed is not None:
            reseed(self.compose, seed)

    def set_seed(self, seed: int | None) -> None:
        self.seed = seed
        reseed(self.compose, seed)
        self._seeded_for = (os.getpid(), None)

    def _seed_for_process(self) -> None:
        """Re-seed once per process (and per DataLoader worker seed) for unseeded calls."""
        info = torch.utils.data.get_worker_info()
        key = (os.getpid(), None if info is None else int(info.seed))
        if key == self._seeded_for:
            return
        if info is not None:
            set_cv2_threads(1)
            reseed(self.compose, int(info.seed) % 2**32)
        elif self.seed is None:
            reseed(self.compose, int(torch.initial_seed()) % 2**32)
        self._seeded_for = key

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray | None = None,
        *,
        seed: int | None = None,
        reference: np.ndarray | None = None,
    ) -> dict[str, Any]:
        image, mask = _check_input(image, mask)
        if seed is None:
            self._seed_for_process()
        else:
            reseed(self.compose, seed)
        extra: dict[str, Any] = {}
        if self.wants_reference:  # albumentations wants the key; empty = no reference
            extra[FDA_KEY] = [] if reference is None else [_check_input(reference, None)[0]]
        if mask is None:
            out = self.compose(image=image, **extra)
            mask_t = None
        else:
            out = self.compose(image=image, mask=mask, **extra)
            mask_t = torch.from_numpy(np.ascontiguousarray(out["mask"]).astype(np.int64))
        img = np.ascontiguousarray(out["image"].transpose(2, 0, 1), dtype=np.float32)
        return {"image": torch.from_numpy(img), "mask": mask_t}

    def __repr__(self) -> str:
        return f"Pipeline({self.compose!r})"


class EvalTransform:
    """The deterministic evaluation preset: :meth:`Preprocessing.apply`, as tensors.

    Optional Macenko, reflect-pad / centre-crop to the input size, normalise:
    the very function the ``Predictor`` applies to a patch at the model's mpp,
    so an evaluation report measures what ``calcinosis predict`` returns.
    """

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None = None, *, seed: int | None = None
    ) -> dict[str, Any]:
        """``seed`` is accepted, as the training preset's, and unused: nothing here is random."""
        image, mask = _check_input(image, mask)
        x, fitted_mask, _ = self.preprocessing.apply(image, mask)
        img = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        mask_t = None if fitted_mask is None else torch.from_numpy(fitted_mask.astype(np.int64))
        return {"image": img, "mask": mask_t}

    def __repr__(self) -> str:
        return f"EvalTransform({self.preprocessing!r})"


def build_eval_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    stain_normalize: str = "none",
) -> EvalTransform:
    """Deterministic: optional Macenko, centre crop / reflect pad, normalise.

    A checkpoint's own preprocessing gives the same transform as
    ``EvalTransform(Preprocessing.from_metadata(meta))``.
    """
    return EvalTransform(
        Preprocessing(input_size=image_size, mean=mean, std=std, stain_normalize=stain_normalize)
    )


def _check_input(image: Any, mask: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """A uint8 (H, W, 3) image (grey is repeated) and a matching uint8 mask, or an error."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"transform expects a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"transform expects an (H, W, 3) image, got shape {image.shape}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} differs from image {image.shape[:2]}")
        mask = np.ascontiguousarray(mask, dtype=np.uint8)
    return image, mask


def _size_ops(image_size: int) -> list[A.BasicTransform]:
    """Pad (reflect) small patches and crop large ones to image_size at random, keeping scale."""
    return [
        A.PadIfNeeded(
            min_height=image_size,
            min_width=image_size,
            position="random",
            border_mode=cv2.BORDER_REFLECT_101,
        ),
        A.RandomCrop(height=image_size, width=image_size),
    ]


def _tail(mean: Sequence[float], std: Sequence[float]) -> list[A.BasicTransform]:
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)]


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
    ``seed`` fixes the sequence of unseeded calls in the main process;
    DataLoader workers re-seed from torch, and a call's own ``seed`` fixes
    that call (see :class:`Pipeline`).
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
    ops += _size_ops(image_size)
    if aug.flips:
        ops.append(A.D4(p=1.0))  # all 8 flips / quarter turns, identity included
    if aug.hed_sigma > 0 or aug.stain_strength > 0:
        ops.append(HEDJitter(sigma=aug.hed_sigma, strength_sigma=aug.stain_strength, p=1.0))
    if aug.random_stain_prob > 0:
        ops.append(RandomStainMatrix(sigma=0.25, p=aug.random_stain_prob))
    if aug.randconv_prob > 0:
        ops.append(RandConv(p=aug.randconv_prob))
    if aug.texture_prob > 0:
        ops.append(FibreTexture(p=aug.texture_prob))
    if aug.grayscale_prob > 0:
        ops.append(A.ToGray(num_output_channels=3, p=aug.grayscale_prob))
    if aug.fda_prob > 0:
        # the reference comes with each call (Pipeline's ``reference``, chosen by PatchDataset)
        ops.append(
            ReferenceFDA(beta_limit=(0.0, aug.fda_beta), metadata_key=FDA_KEY, p=aug.fda_prob)
        )
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
        lo, hi = aug.blur_sigma
        # a 3-5 px kernel holds sigma up to 1.2; wider blur gets its kernel from sigma
        kernel = (3, 5) if hi <= 1.2 else 0
        ops.append(A.GaussianBlur(blur_limit=kernel, sigma_limit=(lo, hi), p=aug.blur_prob))
    if aug.noise_prob > 0:
        ops.append(A.GaussNoise(std_range=tuple(aug.noise_std), p=aug.noise_prob))
    if aug.jpeg_prob > 0:
        ops.append(A.ImageCompression(quality_range=tuple(aug.jpeg_quality), p=aug.jpeg_prob))
    ops += _tail(mean, std)
    return Pipeline(A.Compose(ops), seed=seed, reference_stains=aug.fda_stains)
