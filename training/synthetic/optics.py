"""Style A's chemistry and optics: tissue components, dyes, stains, and the scanner.

Every tissue component is a concentration map; each stain binds dyes to
components (haematoxylin/eosin; silver + nuclear fast red; alizarin + a light
haematoxylin counterstain) and light passes through by Beer-Lambert,
``I = I0 * exp(-sum_k c_k * OD_k)``. Each patch also draws how it is drawn
(:func:`style_settings`) and how its lab stained and scanned it
(:func:`lab_settings`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import cv2
import numpy as np

from calcinosis.model.labels import STAIN_NAMES

from .codec import scanner_jpeg

if TYPE_CHECKING:
    from .scene import Scene, TileContext

COMPONENTS = (
    "nuclei",  # chromatin
    "stroma",  # collagen and ordinary cytoplasm
    "keratin",
    "rbc",
    "calcium",  # calcium phosphate / carbonate salts
    "bone",  # mineralised bone matrix
    "cement",  # cement / reversal lines in bone (mineralised, basophilic)
    "osteoid",  # unmineralised bone matrix seam
    "urate",
    "amyloid",
    "histio",  # histiocyte and giant-cell cytoplasm
    "debris",  # dust, precipitate, bubble rims
)
(
    NUC,
    STROMA,
    KERATIN,
    RBC,
    CALC,
    BONEM,
    CEMENT,
    OSTEOID,
    URATEM,
    AMYL,
    HISTIO,
    DEBRIS,
) = range(len(COMPONENTS))

# RGB optical density of one unit of each dye. Haematoxylin absorbs red and
# green (blue-purple), eosin mostly green (pink), silver everything (brown-black,
# red passing a little more), alizarin-calcium green and blue (orange-red).
DYES = ("haematoxylin", "eosin", "haemoglobin", "nuclear_fast_red", "silver", "alizarin", "neutral")
_DYE_OD = np.array(
    [
        [0.62, 0.80, 0.30],  # haematoxylin
        [0.07, 0.90, 0.40],  # eosin
        [0.06, 0.95, 0.85],  # haemoglobin (red cells)
        [0.10, 0.90, 0.62],  # nuclear fast red
        [0.85, 0.98, 1.10],  # reduced silver (brown-black)
        [0.04, 0.80, 1.05],  # alizarin red S calcium chelate
        [0.60, 0.60, 0.60],  # neutral grey (debris, unstained density)
    ],
    dtype=np.float64,
)
_H, _E, _HB, _NFR, _AG, _AR, _GREY = range(len(DYES))

# Which dyes each component binds, per stain: {component: {dye: amount}}.
_BINDING: dict[str, dict[int, dict[int, float]]] = {
    "he": {
        NUC: {_H: 1.55, _E: 0.10},
        STROMA: {_E: 0.55, _H: 0.03},
        KERATIN: {_E: 0.45, _GREY: 0.04},
        RBC: {_HB: 1.10},
        CALC: {_H: 1.45, _E: 0.22, _GREY: 0.12},  # deeply basophilic
        BONEM: {_E: 1.00, _H: 0.05},  # strongly eosinophilic
        CEMENT: {_H: 0.90, _E: 0.4},
        OSTEOID: {_E: 0.62},
        URATEM: {_E: 0.17, _H: 0.06, _GREY: 0.11},  # pale pink-grey
        AMYL: {_E: 0.28, _H: 0.05, _GREY: 0.10},  # pale, greyer than collagen, waxy
        HISTIO: {_E: 0.33, _H: 0.06},
        DEBRIS: {_GREY: 1.0},
    },
    "von_kossa": {
        NUC: {_NFR: 1.25},
        STROMA: {_NFR: 0.20, _GREY: 0.03},
        KERATIN: {_NFR: 0.14, _GREY: 0.06},
        RBC: {_HB: 0.35, _NFR: 0.05},
        CALC: {_AG: 2.10},  # black
        BONEM: {_AG: 1.85},  # mineralised bone is black too
        CEMENT: {_AG: 2.10},
        OSTEOID: {_NFR: 0.30},  # unmineralised: counterstain only
        URATEM: {_GREY: 0.13},  # negative / faint grey
        AMYL: {_NFR: 0.10, _GREY: 0.08},  # negative: pale grey-pink, glassy
        HISTIO: {_NFR: 0.15},
        DEBRIS: {_AG: 0.7},  # silver precipitate
    },
    "alizarin_red": {
        NUC: {_H: 0.45},  # light counterstain
        STROMA: {_AR: 0.05, _H: 0.05, _GREY: 0.07},
        KERATIN: {_AR: 0.04, _GREY: 0.06},
        RBC: {_HB: 0.35},
        CALC: {_AR: 1.85},  # orange-red
        BONEM: {_AR: 1.45},  # bone red as well
        CEMENT: {_AR: 1.85},
        OSTEOID: {_AR: 0.08, _GREY: 0.06},
        URATEM: {_GREY: 0.11},  # negative: unstained grey, texture only
        AMYL: {_GREY: 0.10, _H: 0.03, _AR: 0.02},  # negative: glassy, unstained
        HISTIO: {_AR: 0.04, _GREY: 0.05},
        DEBRIS: {_GREY: 0.8},
    },
}


def _binding_matrix(stain: str) -> np.ndarray:
    w = np.zeros((len(COMPONENTS), len(DYES)), np.float64)
    for comp, dyes in _BINDING[stain].items():
        for dye, amount in dyes.items():
            w[comp, dye] = amount
    return w


_BINDING_MATRICES = {s: _binding_matrix(s) for s in STAIN_NAMES}


def rotate_hue(od: np.ndarray, angle: float) -> np.ndarray:
    """Rotate OD vectors about the grey axis: a hue change that keeps density."""
    k = np.full(3, 1.0 / math.sqrt(3.0))
    c, s = math.cos(angle), math.sin(angle)
    rot = (
        c * np.eye(3)
        + s * np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        + (1 - c) * np.outer(k, k)
    )
    return np.clip(od @ rot.T, 0.0, None)


#: The drawing style of a patch with every randomised knob at its middle.
NEUTRAL_STYLE: dict[str, float] = {
    "coll_density": 1.0,
    "coll_period": 1.0,
    "coll_warp": 1.0,
    "nuc_size": 1.0,
    "nuc_aspect": 1.0,
    "nuc_blur": 0.6,
    "nuc_texture": 0.2,
    "edge_blur": 0.0,
    "dye_amount_sd": 0.12,
    "dye_hue_deg": 3.0,
}


def style_settings(rng: np.random.Generator) -> dict[str, float]:
    """Domain randomisation: how this patch is drawn, independently of its class.

    A model trained on one fixed rendering learns the renderer's signature
    (its fibre width, its nuclear outline, its exact dye colours) as readily
    as the morphology. Every patch therefore draws its own collagen density
    (loose papillary to sclerotic: dense collagen is as pink as bone in every
    class), bundle width and waviness, nuclear size, shape and sharpness,
    edge softness of everything painted, and how far its dyes stray from the
    reference colours, so that only the structure that defines a class is
    common to all its patches.
    """
    return {
        "coll_density": float(np.exp(rng.uniform(np.log(0.5), np.log(1.6)))),
        "coll_period": float(rng.uniform(0.5, 1.8)),
        "coll_warp": float(rng.uniform(0.3, 1.8)),
        "nuc_size": float(rng.uniform(0.8, 1.25)),
        "nuc_aspect": float(rng.uniform(0.8, 1.3)),
        "nuc_blur": float(rng.uniform(0.3, 1.2)),
        "nuc_texture": float(rng.uniform(0.05, 0.45)),
        "edge_blur": float(rng.uniform(0.3, 1.3)) if rng.random() < 0.4 else 0.0,
        "dye_amount_sd": float(rng.uniform(0.08, 0.3)),
        "dye_hue_deg": float(rng.uniform(2.0, 7.0)),
    }


def lab_settings(
    rng: np.random.Generator, shift: float, style: dict[str, float] = NEUTRAL_STYLE
) -> dict:
    """Per-patch staining and scanner settings; shift pushes them outside training."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return {
        "amount": np.exp(
            rng.normal(0, style["dye_amount_sd"], len(DYES))
            + sign * 0.45 * shift
            + rng.normal(0, 0.1 * shift, len(DYES))
        ),
        "hue": np.radians(
            rng.normal(0, style["dye_hue_deg"], len(DYES))
            + (1 if rng.random() < 0.5 else -1) * 12.0 * shift
        ),
        "thickness": rng.uniform(0.8, 1.2),
        "background": rng.uniform(232, 252) - 10 * shift * rng.random(),
        "tint": rng.normal(0, 0.02, 3) + shift * 0.06 * rng.normal(0, 1, 3),
        "vignette": rng.uniform(0, 0.08) + 0.12 * shift,
        "blur": rng.uniform(0.0, 1.1) + shift * rng.uniform(0.6, 1.3),
        "noise": rng.uniform(0.5, 3.5) + 3.0 * shift,
        "jpeg": int(np.clip(rng.integers(70, 96) - 45 * shift, 15, 100))
        if rng.random() < 0.8
        else 0,
        "fold": rng.random() < 0.06 + 0.1 * shift,
        "bubble": rng.random() < 0.04 + 0.1 * shift,
        "debris": rng.random() < 0.12,
    }


def transmitted_light(
    sc: Scene, stain: str, lab: dict, ctx: TileContext | None = None
) -> np.ndarray:
    """Beer-Lambert: transmitted light through the stained section, then the scanner.

    A region tile (``ctx``) takes section thickness and illumination from the
    region, so they run on smoothly from one tile to the next.
    """
    rng = sc.rng
    n = sc.n
    od_dyes = _DYE_OD * lab["amount"][:, None]
    od_dyes = np.stack([rotate_hue(od_dyes[i], lab["hue"][i]) for i in range(len(DYES))])
    comp_od = (_BINDING_MATRICES[stain] @ od_dyes).astype(np.float32)  # (K, 3)
    np.maximum(sc.c, 0, out=sc.c)
    # sum_k c_k * OD_k, one channel at a time (plain numpy: a BLAS call here
    # would start threads that fight the worker processes for the cores)
    used = [k for k in range(len(COMPONENTS)) if comp_od[k].any() and sc.c[k].any()]
    planes = []
    for ch in range(3):
        acc = np.zeros((n, n), np.float32)
        for k in used:
            acc += sc.c[k] * comp_od[k, ch]
        planes.append(acc)
    if ctx is None:
        thick = lab["thickness"] * (1 + 0.07 * sc.noise(30))
    else:
        thick = ctx.thickness
    od = cv2.merge(planes) * thick[:, :, None]
    # unevenly lit, slightly tinted background
    if ctx is None:
        cx, cy = rng.uniform(-0.3, 1.3, 2) * n
        r2 = ((sc.xx - cx) ** 2 + (sc.yy - cy) ** 2) / (n * n)
        light = lab["background"] * (1 - lab["vignette"] * r2 / 2) * (1 + 0.01 * sc.noise(40))
    else:
        light = ctx.light
    tint = np.exp(-np.asarray(lab["tint"], np.float32))
    img = np.exp(-od) * light[:, :, None] * tint
    if lab["blur"] > 0.15:
        img = cv2.GaussianBlur(img, (0, 0), lab["blur"])
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(lab["noise"])
    return scanner_jpeg(np.clip(img + 0.5, 0, 255).astype(np.uint8), lab["jpeg"])
