"""Style B's colours: one display colour per material and stain, jittered per patch."""

from __future__ import annotations

import cv2
import numpy as np

from calcinosis.model.labels import STAIN_NAMES

MATERIALS = (
    "glass",
    "lumen",  # empty space inside tissue (vessel lumens, fat cells, lacunae)
    "ground",  # loose dermal ground substance
    "collagen",
    "sclerotic",  # dense, hyalinised collagen: as pink as bone in H&E
    "cytoplasm",  # keratinocytes
    "keratin",
    "nucleus",
    "nucleus_pale",
    "rbc",
    "membrane",  # adipocyte membranes
    "calcium",
    "calcium_dark",
    "bone",
    "bone_alt",  # alternate lamellae
    "cement",
    "osteoid",
    "urate",
    "urate_streak",
    "amyloid",
    "histiocyte",
    "gland",
)
MATERIAL = {name: i for i, name in enumerate(MATERIALS)}

# Groups share one strength/hue/saturation jitter per patch (like one dye).
_CLEAR, _NUCLEAR, _TISSUE, _MINERAL, _BLOOD = range(5)

_PALETTES: dict[str, dict[str, tuple[tuple[int, int, int], int]]] = {
    "he": {
        "glass": ((243, 240, 244), _CLEAR),
        "lumen": ((240, 233, 240), _CLEAR),
        "ground": ((238, 212, 228), _TISSUE),
        "collagen": ((231, 160, 198), _TISSUE),
        "sclerotic": ((212, 98, 158), _TISSUE),
        "cytoplasm": ((206, 140, 190), _TISSUE),
        "keratin": ((238, 176, 204), _TISSUE),
        "nucleus": ((64, 40, 118), _NUCLEAR),
        "nucleus_pale": ((120, 92, 170), _NUCLEAR),
        "rbc": ((220, 58, 84), _BLOOD),
        "membrane": ((222, 146, 190), _TISSUE),
        "calcium": ((86, 64, 152), _NUCLEAR),
        "calcium_dark": ((44, 28, 104), _NUCLEAR),
        "bone": ((222, 104, 164), _TISSUE),
        "bone_alt": ((236, 146, 192), _TISSUE),
        "cement": ((96, 66, 150), _NUCLEAR),
        "osteoid": ((236, 166, 198), _TISSUE),
        "urate": ((214, 198, 214), _CLEAR),
        "urate_streak": ((190, 170, 196), _CLEAR),
        "amyloid": ((234, 180, 196), _TISSUE),
        "histiocyte": ((226, 182, 210), _TISSUE),
        "gland": ((204, 158, 206), _TISSUE),
    },
    "von_kossa": {  # silver black on mineral; nuclear fast red counterstain
        "glass": ((244, 241, 239), _CLEAR),
        "lumen": ((241, 234, 233), _CLEAR),
        "ground": ((241, 220, 220), _TISSUE),
        "collagen": ((234, 184, 188), _TISSUE),
        "sclerotic": ((222, 150, 162), _TISSUE),
        "cytoplasm": ((226, 170, 180), _TISSUE),
        "keratin": ((236, 198, 192), _TISSUE),
        "nucleus": ((182, 46, 78), _NUCLEAR),
        "nucleus_pale": ((204, 98, 118), _NUCLEAR),
        "rbc": ((214, 128, 96), _BLOOD),
        "membrane": ((230, 178, 186), _TISSUE),
        "calcium": ((28, 23, 20), _MINERAL),
        "calcium_dark": ((16, 12, 10), _MINERAL),
        "bone": ((34, 28, 25), _MINERAL),
        "bone_alt": ((62, 50, 44), _MINERAL),
        "cement": ((12, 10, 9), _MINERAL),
        "osteoid": ((228, 164, 176), _TISSUE),
        "urate": ((212, 207, 205), _CLEAR),
        "urate_streak": ((192, 187, 186), _CLEAR),
        "amyloid": ((232, 210, 212), _TISSUE),
        "histiocyte": ((234, 196, 200), _TISSUE),
        "gland": ((226, 180, 190), _TISSUE),
    },
    "alizarin_red": {  # calcium chelate orange-red; the rest pale, light counterstain
        "glass": ((245, 243, 240), _CLEAR),
        "lumen": ((241, 238, 234), _CLEAR),
        "ground": ((239, 232, 228), _TISSUE),
        "collagen": ((229, 215, 211), _TISSUE),
        "sclerotic": ((216, 197, 193), _TISSUE),
        "cytoplasm": ((219, 205, 207), _TISSUE),
        "keratin": ((233, 221, 208), _TISSUE),
        "nucleus": ((128, 124, 166), _NUCLEAR),
        "nucleus_pale": ((166, 160, 192), _NUCLEAR),
        "rbc": ((216, 176, 150), _BLOOD),
        "membrane": ((226, 212, 208), _TISSUE),
        "calcium": ((214, 64, 36), _MINERAL),
        "calcium_dark": ((178, 34, 24), _MINERAL),
        "bone": ((204, 56, 54), _MINERAL),
        "bone_alt": ((218, 88, 76), _MINERAL),
        "cement": ((160, 28, 30), _MINERAL),
        "osteoid": ((226, 202, 196), _TISSUE),
        "urate": ((216, 213, 206), _CLEAR),
        "urate_streak": ((200, 198, 191), _CLEAR),
        "amyloid": ((227, 221, 214), _TISSUE),
        "histiocyte": ((228, 215, 212), _TISSUE),
        "gland": ((221, 208, 210), _TISSUE),
    },
}
_BASE = {s: np.array([_PALETTES[s][m][0] for m in MATERIALS], np.float32) for s in STAIN_NAMES}
_GROUP = {s: np.array([_PALETTES[s][m][1] for m in MATERIALS], np.int64) for s in STAIN_NAMES}


def sample_palette(rng: np.random.Generator, stain: str, shift: float) -> np.ndarray:
    """The patch's colours (M, 3) float32 0..255: the stain's palette, jittered per group.

    Strength pulls a colour towards the glass (weak staining) or away from it
    (strong); hue and saturation are jittered in HSV. ``shift`` pushes all of
    them one way, outside the usual spread.
    """
    base = _BASE[stain]
    group = _GROUP[stain]
    glass = base[0]
    g = 5
    sign = 1.0 if rng.random() < 0.5 else -1.0
    sd = np.array([0.0, 0.14, 0.14, 0.07, 0.14])
    strength = np.exp(
        rng.normal(0, 1, g) * sd + sign * 0.38 * shift + rng.normal(0, 0.1 * shift + 1e-9, g)
    )
    strength[_CLEAR] = 1.0
    k = strength[group][:, None].astype(np.float32)
    col = np.clip(glass - (glass - base) * k, 0, 255)
    hsv = cv2.cvtColor(col[None] / 255.0, cv2.COLOR_RGB2HSV)[0]
    hue_sign = 1.0 if rng.random() < 0.5 else -1.0
    dh = rng.normal(0, 4.0, g) + hue_sign * 14.0 * shift
    ds = np.exp(rng.normal(0, 0.1, g) + rng.normal(0, 0.3 * shift + 1e-9))
    m = len(MATERIALS)
    hsv[:, 0] = (hsv[:, 0] + dh[group] + rng.normal(0, 2.0, m)) % 360.0
    hsv[:, 1] = np.clip(hsv[:, 1] * ds[group] * np.exp(rng.normal(0, 0.05, m)), 0, 1)
    hsv[:, 2] = np.clip(hsv[:, 2] * np.exp(rng.normal(0, 0.02, m)), 0, 1)
    out = cv2.cvtColor(hsv[None].astype(np.float32), cv2.COLOR_HSV2RGB)[0] * 255.0
    out[0] = glass
    return out.astype(np.float32)
