"""The preprocessing contract: what happens to a patch between its pixels and the network.

timm keeps a model's preprocessing (input size, mean, std, crop) in its
``pretrained_cfg`` so that inference never guesses it. :class:`Preprocessing`
is that record here. It travels as one section of every checkpoint's metadata
(``metadata["preprocessing"]``, written by ``save_checkpoint``), and everything
that feeds the network reads it from there and applies it with
:meth:`Preprocessing.apply`: the evaluation transform
(``training/transforms.py``), the ``Predictor``, the ONNX export (int8
calibration) and the benchmarks. So the report of ``calcinosis evaluate``
measures what ``calcinosis predict`` returns.

The steps, in order:

1. resample to ``mpp`` when the patch's own mpp differs by more than
   ``mpp_tolerance`` (relative): :func:`resample_to_mpp`, called by whoever
   knows the patch's mpp (the dataset, the predictor) before ``apply``;
2. stain normalisation, ``none`` or ``macenko`` (:mod:`calcinosis.model.stain`),
   on the whole patch;
3. fitting to ``input_size`` x ``input_size`` at native scale: a side shorter
   than the input is reflect-padded (centred), a longer one centre-cropped; the
   patch is never resized, so the network sees tissue at its training scale;
4. normalisation: ``(pixel / 255 - mean) / std``, float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from .errors import CheckpointError, ConfigError
from .metadata import require_known_keys, setting

__all__ = [
    "FIT_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MPP_TOLERANCE",
    "PREPROCESSING_KEY",
    "STAIN_NORMALIZATIONS",
    "Placement",
    "Preprocessing",
    "resample_factor",
    "resample_to_mpp",
]

#: The metadata section :class:`Preprocessing` is stored under.
PREPROCESSING_KEY = "preprocessing"

#: Patches whose mpp differs from the model's by at most this (relative) are
#: used as they are: 5 % is below what a pathologist or the network can tell
#: apart, and resampling costs a little sharpness.
MPP_TOLERANCE = 0.05

#: ``none``, or Macenko's H&E normalisation onto a fixed reference.
STAIN_NORMALIZATIONS = ("none", "macenko")

#: How a patch of another size is fitted to the input: reflect-pad (centred)
#: what is too short, centre-crop what is too long, at native scale.
FIT_MODES = ("reflect-pad-or-centre-crop",)

#: ImageNet statistics: what almost every timm backbone was trained with, and
#: the fallback when a backbone carries no pretrained config.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Checkpoints written before the section existed that name no input size were all 128 px.
_LEGACY_INPUT_SIZE = 128


@dataclass(frozen=True)
class Placement:
    """Where a patch lies in its fitted input: ``patch[src] == fitted[dst]``.

    ``patch[src_y:src_y+h, src_x:src_x+w]`` (what survives the crop) is
    ``fitted[dst_y:dst_y+h, dst_x:dst_x+w]`` (the rest of the fitted input is
    reflected padding). A dense output of the network maps back with
    :meth:`to_patch`.
    """

    #: The patch's own size.
    height: int
    width: int
    src_y: int
    src_x: int
    dst_y: int
    dst_x: int
    h: int
    w: int

    @property
    def cropped(self) -> bool:
        """Whether part of the patch was cut off (a side longer than the input)."""
        return self.h < self.height or self.w < self.width

    def to_patch(self, dense: np.ndarray) -> np.ndarray:
        """The part of an ``(input, input, ...)`` map that covers the patch (padding dropped)."""
        return dense[self.dst_y : self.dst_y + self.h, self.dst_x : self.dst_x + self.w]


@dataclass(frozen=True)
class Preprocessing:
    """Input size, mpp, mean/std, stain normalisation and fitting of one model."""

    # Side of the square network input, in pixels.
    input_size: int = _LEGACY_INPUT_SIZE
    # Microns per pixel the model works at (None: unknown, patches are used as given).
    mpp: float | None = None
    # Relative mpp difference below which a patch is not resampled.
    mpp_tolerance: float = MPP_TOLERANCE
    # Per-channel statistics of the starting weights, on [0, 1] pixels.
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # Stain normalisation applied to every patch before fitting (train and inference).
    stain_normalize: str = "none"
    # How a patch of another size becomes input_size x input_size.
    fit: str = FIT_MODES[0]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int):
            raise ConfigError(
                f"preprocessing input_size must be an integer, got {self.input_size!r}"
            )
        if self.input_size < 1:
            raise ConfigError(f"preprocessing input_size must be >= 1, got {self.input_size}")
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ConfigError(
                f"preprocessing mpp must be a positive number of microns per pixel, got {self.mpp}"
            )
        if not (math.isfinite(self.mpp_tolerance) and self.mpp_tolerance >= 0):
            raise ConfigError(f"preprocessing mpp_tolerance must be >= 0, got {self.mpp_tolerance}")
        if not self.mean or len(self.mean) != len(self.std):
            raise ConfigError(
                f"preprocessing mean {list(self.mean)} and std {list(self.std)} must have one "
                "value per channel each"
            )
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ConfigError(f"preprocessing std values must be > 0, got {list(self.std)}")
        if self.stain_normalize not in STAIN_NORMALIZATIONS:
            raise ConfigError(
                f"stain_normalize must be one of {', '.join(STAIN_NORMALIZATIONS)}, "
                f"got {self.stain_normalize!r}"
            )
        if self.fit not in FIT_MODES:
            raise ConfigError(
                f"preprocessing fit must be one of {', '.join(FIT_MODES)}, got {self.fit!r}"
            )

    # ------------------------------------------------------------------ metadata

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready ``metadata["preprocessing"]`` section."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, section: dict[str, Any]) -> Preprocessing:
        """Rebuild from :meth:`to_dict`'s output; unknown keys are an error (a newer writer)."""
        require_known_keys(section, cls, PREPROCESSING_KEY)
        try:
            return cls(**section)
        except (ConfigError, TypeError, ValueError) as exc:
            raise CheckpointError(f"metadata '{PREPROCESSING_KEY}' is invalid: {exc}") from None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Preprocessing:
        """The preprocessing of a checkpoint (or exported ONNX file) from its metadata.

        The ``"preprocessing"`` section when there is one; checkpoints written
        before it existed are read from where they kept each value: the top
        level (``input_size``, ``mpp``, ``mean``, ``std``), else the saved
        training config (``data.image_size``, ``data.mpp``,
        ``augment.stain_normalize``), else the defaults they were trained with.
        """
        section = meta.get(PREPROCESSING_KEY)
        if isinstance(section, dict):
            return cls.from_dict(section)
        if section is not None:
            raise CheckpointError(
                f"metadata '{PREPROCESSING_KEY}' must be a JSON object, got {type(section).__name__}"
            )
        size = meta.get("input_size")
        if isinstance(size, list | tuple):  # (C, H, W) as timm writes it
            size = size[-1]
        if size is None:
            size = setting(meta, None, ("data", "image_size"), _LEGACY_INPUT_SIZE)
        mpp = setting(meta, "mpp", ("data", "mpp"), None)
        try:
            return cls(
                input_size=int(size),
                mpp=None if mpp is None else float(mpp),
                mean=tuple(meta.get("mean") or IMAGENET_MEAN),
                std=tuple(meta.get("std") or IMAGENET_STD),
                stain_normalize=setting(meta, None, ("augment", "stain_normalize"), "none"),
            )
        except (ConfigError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint metadata has unusable preprocessing: {exc}"
            ) from None

    # ------------------------------------------------------------------ applying it

    def resample_factor(self, image_mpp: float | None) -> float:
        """Scale factor from an image at ``image_mpp`` to this model's mpp (1.0: leave it)."""
        return resample_factor(image_mpp, self.mpp, self.mpp_tolerance)

    def normalize_stain(self, image: np.ndarray) -> np.ndarray:
        """Step 2: the configured stain normalisation of a uint8 RGB patch."""
        if self.stain_normalize == "macenko":
            from .stain import macenko_normalize

            return macenko_normalize(image)
        return image

    def placement(self, height: int, width: int) -> Placement:
        """Where a ``height`` x ``width`` patch lands in the fitted input (see :class:`Placement`)."""
        s = self.input_size
        src_y, dst_y, h = _axis_fit(height, s)
        src_x, dst_x, w = _axis_fit(width, s)
        return Placement(height, width, src_y, src_x, dst_y, dst_x, h, w)

    def fit_to_input(
        self, image: np.ndarray, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, Placement]:
        """Step 3: ``image`` (and ``mask``) reflect-padded / centre-cropped to the input size."""
        place = self.placement(*image.shape[:2])
        return (
            _fit(image, place, self.input_size),
            (None if mask is None else _fit(mask, place, self.input_size)),
            place,
        )

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """Step 4: uint8 ``(..., H, W, C)`` -> float32 ``(pixel / 255 - mean) / std``."""
        std = np.asarray(self.std, np.float32)
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        bias = (-np.asarray(self.mean, np.float32) / std).astype(np.float32)
        x = np.asarray(image).astype(np.float32)
        x *= scale
        x += bias
        return x

    def apply(
        self, image: np.ndarray, mask: np.ndarray | None = None, *, stain: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None, Placement]:
        """Steps 2-4 on a uint8 RGB patch already at the model's mpp.

        Returns the float32 ``(input_size, input_size, 3)`` network input, the
        mask fitted the same way (None without one), and where the patch lies
        in the input. ``stain=False`` skips step 2 for a caller that has
        already normalised the whole image the patch was cut from.
        """
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != len(self.mean):
            raise ValueError(
                f"preprocessing expects a uint8 (H, W, {len(self.mean)}) image, got "
                f"{image.dtype} {image.shape}"
            )
        if stain:
            image = self.normalize_stain(image)
        fitted, mask, place = self.fit_to_input(image, mask)
        return self.normalize(fitted), mask, place


def resample_factor(
    image_mpp: float | None, model_mpp: float | None, tolerance: float = MPP_TOLERANCE
) -> float:
    """``image_mpp / model_mpp``, or 1.0 when either is unknown or they agree within ``tolerance``.

    Above 1 the image is coarser than the model's resolution and is enlarged.
    """
    if not image_mpp or not model_mpp:
        return 1.0
    factor = float(image_mpp) / float(model_mpp)
    return 1.0 if abs(factor - 1.0) <= tolerance else factor


def resample_to_mpp(
    image: np.ndarray, factor: float, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Step 1: rescale by ``factor`` (:func:`resample_factor`); area when shrinking, linear when
    enlarging, nearest neighbour for the mask."""
    if factor == 1.0:
        return image, mask
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    image = cv2.resize(image, size, interpolation=interp)
    if mask is not None:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    return image, mask


def _axis_fit(n: int, s: int) -> tuple[int, int, int]:
    """(first source index kept, where it lands, how many kept) along one axis of length n."""
    if n >= s:
        return (n - s) // 2, 0, s  # centre crop
    return 0, (s - n) // 2, n  # centred reflect padding: the extra pixel goes after


def _fit(a: np.ndarray, place: Placement, s: int) -> np.ndarray:
    crop = a[place.src_y : place.src_y + place.h, place.src_x : place.src_x + place.w]
    top, left = place.dst_y, place.dst_x
    bottom, right = s - place.h - top, s - place.w - left
    if top == left == bottom == right == 0:
        return np.ascontiguousarray(crop)
    return cv2.copyMakeBorder(
        np.ascontiguousarray(crop), top, bottom, left, right, cv2.BORDER_REFLECT_101
    )
