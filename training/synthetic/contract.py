"""What every patch renderer promises: its arguments, its default scale, its version."""

from __future__ import annotations

import math

import numpy as np

from calcinosis.model.errors import ConfigError
from calcinosis.model.labels import CLASS_NAMES, STAIN_NAMES

#: Microns per pixel of generated patches (a 20x scan).
NOMINAL_MPP = 0.5
#: Bumped whenever style A's rendering changes, so cached datasets can be told apart.
GENERATOR_VERSION = 4


def check_names(label: str, stain: str) -> tuple[int, int]:
    """The class and stain indices, or a ConfigError listing the valid names."""
    if label not in CLASS_NAMES:
        raise ConfigError(f"unknown class {label!r}; choose one of {', '.join(CLASS_NAMES)}")
    if stain not in STAIN_NAMES:
        raise ConfigError(f"unknown stain {stain!r}; choose one of {', '.join(STAIN_NAMES)}")
    return CLASS_NAMES.index(label), STAIN_NAMES.index(stain)


def check_patch_args(
    label: str, stain: str, size: int, shift: float, mpp: float
) -> tuple[int, int]:
    """The class and stain indices, or a ConfigError naming the bad argument.

    The contract of every patch renderer (:func:`render_patch`, style B's
    ``render_patch_b``): a known class and stain, at least 16 pixels, a shift
    of at least 0 and a positive, finite mpp.
    """
    ci, si = check_names(label, stain)
    if size < 16:
        raise ConfigError(f"patch size {size} is too small; use at least 16 pixels")
    if not shift >= 0:
        raise ConfigError(f"shift must be >= 0, got {shift}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ConfigError(f"mpp must be a positive number of microns per pixel, got {mpp}")
    return ci, si


def fibroblast_spacing_um2(rng: np.random.Generator) -> float:
    """Dermis area per fibroblast (µm²), both rendering styles.

    Half the patches draw cellular dermis (one nucleus per 500-1200 µm²); the
    other half paucicellular dermis, log-uniform from 1200 to 12000 µm² (reticular
    and sclerotic dermis: a few nuclei in a 128 µm field). Acellular pale tissue
    is then no sign of amyloid by itself: its globular, fissured shape has to be.
    """
    if rng.random() < 0.5:
        return float(rng.uniform(500, 1200))
    return float(np.exp(rng.uniform(np.log(1200), np.log(12000))))
