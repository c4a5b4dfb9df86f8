"""Style A: one patch drawn as stained tissue components seen through Beer-Lambert optics.

How a patch is made:

1. *Tissue components.* Every component (chromatin, collagen/cytoplasm,
   keratin, red cells, calcium salt, bone matrix, cement lines, osteoid,
   urate, amyloid, histiocyte cytoplasm, debris) is a float32 concentration
   map (:class:`.scene.Scene`): ordinary skin (:mod:`.tissue`), then the
   class's deposit (:mod:`.lesions`, :mod:`.bone`).
2. *Staining.* Each stain binds dyes to components; dye optical densities are
   jittered per patch (amount and hue), as labs do (:mod:`.optics`).
3. *Optics (Beer-Lambert).* ``I = I0 * exp(-sum_k c_k * OD_k)`` with an
   unevenly lit background ``I0``, then folds/bubbles, blur, sensor noise and
   JPEG compression.

Colour alone never gives the class: calcium and bone are both black in von
Kossa and red in Alizarin, urate and amyloid are both pale pink in H&E, and
the amount of epidermis, dermis and fat varies independently of the class.
``shift`` > 0 moves the staining and scanner settings outside the training
range (another lab). A patch depends only on ``(label, stain, seed, size,
shift, mpp)`` and :data:`GENERATOR_VERSION`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .contract import GENERATOR_VERSION, NOMINAL_MPP, check_patch_args
from .lesions import DEPOSITS, lesion_room
from .optics import (
    COMPONENTS,
    DEBRIS,
    NEUTRAL_STYLE,
    NUC,
    lab_settings,
    style_settings,
    transmitted_light,
)
from .scene import Scene, TileContext, smoothstep
from .tissue import Layout, base_tissue


def render_patch(
    label: str,
    stain: str,
    seed: int,
    size: int = 128,
    shift: float = 0.0,
    *,
    mpp: float = NOMINAL_MPP,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic patch: (RGB uint8 HxWx3, deposit labels uint8 HxW).

    Deterministic in its arguments. ``shift`` 0 is the training lab; 1 looks
    like a clearly different lab (stain strength and hue, blur, compression,
    tinted light) with the same morphology.
    """
    ci, si = check_patch_args(label, stain, size, shift, mpp)
    return render_scene(label, stain, ci, si, seed, int(size), float(shift), float(mpp), None)


def render_scene(
    label: str,
    stain: str,
    ci: int,
    si: int,
    seed: int,
    size: int,
    shift: float,
    mpp: float,
    ctx: TileContext | None,
) -> tuple[np.ndarray, np.ndarray]:
    """render_patch's body; a region tile passes ``ctx`` (layout, lab and light from the region)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, ci, si, GENERATOR_VERSION])
    sc = Scene(rng, size, mpp)
    if ctx is None:  # a region's tiles share the region's style (one slide, one look)
        style_rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, ci, si, 0x57E])
        sc.style = style_settings(style_rng)
    else:
        sc.style = ctx.lab.get("style", NEUTRAL_STYLE)
    lay = Layout(sc, label, ctx)
    if ctx is None or not lay.glass.all():  # a region's bare-glass tile needs no tissue
        base_tissue(sc, lay)
    if label in DEPOSITS:
        _draw_lesion(sc, lay, label, ctx)
    # the edge of the section: glass beyond it (never hiding the whole lesion);
    # a region tile has its edges drawn by the region instead
    if ctx is None and rng.random() < 0.15:
        _section_edge(sc, lay, label)
    glass = lay.glass.astype(np.float32)
    sc.clear(cv2.GaussianBlur(glass, (0, 0), 0.7))
    sc.labels[lay.glass] = 0
    _soften(sc)
    if ctx is None:
        lab = lab_settings(rng, shift, sc.style)
    else:
        # one lab for the whole slide; folds and bubbles would stop at the tile edge
        lab = dict(ctx.lab, fold=False, bubble=False, debris=bool(rng.random() < 0.12))
    _artefacts(sc, lab)
    if ctx is not None:  # dust only on the tissue: a region's bare glass stays bare
        sc.c[DEBRIS][lay.glass] = 0
    rgb = transmitted_light(sc, stain, lab, ctx)
    return rgb, sc.labels


def _draw_lesion(sc: Scene, lay: Layout, label: str, ctx: TileContext | None) -> None:
    """The class's deposit, redrawn (up to six times) until it covers enough of the patch.

    A lesion patch shows its lesion: a patch labelled osteoma with a sliver of
    bone in a corner teaches nothing but label noise. Patches need 6% of their
    area; a region tile only 1% (its neighbours carry the rest), and keeps its
    lesion off the tile's edges, so it reads as a nodule rather than a square
    cut out of one.
    """
    if ctx is not None:
        full = lay.deep, lay.dermis
        room = lesion_room(sc, ctx.margin)
        lay.deep, lay.dermis = lay.deep & room, lay.dermis & room
    need = (0.06 if ctx is None else 0.01) * sc.n * sc.n
    for _ in range(6):
        DEPOSITS[label](sc, lay)
        if np.count_nonzero(sc.labels) >= need:
            break
    if ctx is not None:
        lay.deep, lay.dermis = full


def _section_edge(sc: Scene, lay: Layout, label: str) -> None:
    """Bare glass beyond a random cut edge of the section, unless it hides most of the lesion."""
    rng = sc.rng
    ang = rng.uniform(0, 2 * math.pi)
    proj = (sc.xx - sc.n / 2) * math.cos(ang) + (sc.yy - sc.n / 2) * math.sin(ang)
    edge = (proj + sc.px(3) * sc.noise(15)) > rng.uniform(0.15, 0.45) * sc.n
    lesion = sc.labels > 0
    if label == "normal" or (lesion & ~edge).sum() >= 0.5 * lesion.sum():
        lay.glass |= edge


def _soften(sc: Scene) -> None:
    """Chromatin texture and blur of the nuclei; soft edges of everything else (per style)."""
    nuc = sc.c[NUC]
    amp = sc.style["nuc_texture"]
    tex = (1 - amp) + amp * sc.fine_noise(0.7)
    sc.c[NUC] = cv2.GaussianBlur(nuc * tex, (0, 0), sc.style["nuc_blur"])
    if sc.style["edge_blur"] > 0:  # soft-edged rendering of everything drawn
        sig = sc.style["edge_blur"]
        for k in range(len(COMPONENTS)):
            if k != NUC and sc.c[k].any():
                sc.c[k] = cv2.GaussianBlur(sc.c[k], (0, 0), sig)


def _artefacts(sc: Scene, lab: dict) -> None:
    """Folds (doubled tissue), bubble rims, dust / silver precipitate."""
    rng = sc.rng
    if lab["fold"]:
        x, y = rng.uniform(0, sc.n, 2)
        ang = rng.uniform(0, math.pi)
        dist = (sc.xx - x) * math.sin(ang) - (sc.yy - y) * math.cos(ang)
        w = sc.px(rng.uniform(3, 12))
        band = smoothstep(w - np.abs(dist + sc.px(2) * sc.noise(15)), -1, 1)
        sc.c *= 1 + 0.9 * band
    if lab["debris"]:
        for x, y in rng.uniform(0, sc.n, (int(rng.integers(1, 6)), 2)):
            r = sc.px(rng.uniform(0.4, 1.5))
            cv2.circle(
                sc.c[DEBRIS],
                (int(x * 16), int(y * 16)),
                max(int(r * 16), 8),
                float(rng.uniform(0.4, 1.0)),
                -1,
                cv2.LINE_8,
                4,
            )
    if lab["bubble"]:
        x, y = rng.uniform(0, sc.n, 2)
        r = sc.px(rng.uniform(10, 40))
        d = np.sqrt((sc.xx - x) ** 2 + (sc.yy - y) ** 2)
        sc.c *= 1 - 0.25 * (d < r)
        ring = np.exp(-(((d - r) / max(sc.px(0.8), 1)) ** 2))
        sc.c[DEBRIS] += 0.7 * ring
