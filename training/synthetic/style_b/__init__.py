"""Style B: a second, independently built renderer of the same skin histology.

A model trained on one procedural generator can learn that generator's
signature (its noise, its exact colours, how sharp its edges are) instead of
the morphology that separates the classes. Style B draws the same tissue model
as style A (:mod:`calcinosis.training.synthetic.style_a`) with other primitives,
textures and rendering, so cross-style transfer can be measured (train on one
style, test on the other) and models can be trained on both.

How style B differs from style A:

* *Rendering.* A painter's algorithm in display RGB: the patch starts as a
  glass colour and coloured layers are composited over it, one alpha map at a
  time (``rgb += alpha * (colour - rgb)``). There are no component
  concentration maps and no optical densities; colours come from per-stain
  palettes (one RGB colour per material), jittered per patch in HSV, with a
  per-group "staining strength" that moves each colour towards or away from
  the glass.
* *Geometry.* Everything is vector drawing with OpenCV: collagen is hundreds
  of stroked spline curves (``cv2.polylines``) of 2-8 um width, nuclei are
  irregular filled polygons, fat is a packing of overlapping ellipses whose
  outlines are the membranes, keratinocytes are polygon tiles laid out in
  rows that follow the skin surface, lesion outlines are star-shaped polygons
  with harmonic lobulation. Trabecular bone is a network of struts between
  nodes plus lobulated plates; its lamellae are the struts stroked again at
  decreasing widths and the plates refilled with shrunken copies of their
  outline, so they run parallel to the bone surface.
* *Layout.* Depth below the surface comes from 1-D profiles (sums of sines
  along the surface) of the skin surface, the rete ridges of the
  dermo-epidermal junction and the subcutis boundary, in a randomly rotated
  frame.
* *Texture.* Sums of oriented plane waves (spectral synthesis, computed as a
  separable product) and cellular (Worley, distance-to-nearest-seed) noise;
  no upsampled lattice noise.
* *Slide and scanner.* Section thickness and fine grain, knife chatter,
  folds, bubbles; a linear illumination ramp and colour cast, box or
  Gaussian blur, optional down/up-resampling, signal-dependent noise, JPEG.

Geometry is designed in microns and converted with ``mpp``. ``shift`` >= 0
moves the palette strength and hue, blur, noise and compression outside the
usual range (another lab). A patch depends only on its arguments and
:data:`STYLE_B_VERSION`.
"""

from __future__ import annotations

import numpy as np

from calcinosis.model.labels import BACKGROUND

from ..contract import NOMINAL_MPP, check_patch_args
from .canvas import Canvas
from .layout import Layout
from .lesions import LESIONS
from .palette import sample_palette
from .scanner import finish, scanner_settings
from .tissue import base_tissue

__all__ = ["STYLE_B_VERSION", "render_patch_b"]

#: Bumped whenever style B's rendering changes, so cached datasets can be told apart.
STYLE_B_VERSION = 2

_SALT = 0x5B  # keeps style B's random streams apart from style A's


def render_patch_b(
    label: str,
    stain: str,
    seed: int,
    size: int = 128,
    shift: float = 0.0,
    *,
    mpp: float = NOMINAL_MPP,
) -> tuple[np.ndarray, np.ndarray]:
    """One style-B patch: (RGB uint8 (size, size, 3), deposit labels uint8 (size, size)).

    Same contract as :func:`calcinosis.training.synthetic.render_patch`:
    deterministic in its arguments, geometry in microns at ``mpp``, ``shift``
    0 for the training lab and 1 for a clearly different one. A lesion patch
    has at least ~6% of its pixels labelled with its deposit; ``normal`` has
    none.
    """
    ci, si = check_patch_args(label, stain, int(size), float(shift), float(mpp))
    n = int(size)
    shift = float(shift)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, ci, si, STYLE_B_VERSION, _SALT])
    pal = sample_palette(rng, stain, shift)
    cv = Canvas(rng, n, float(mpp), pal, stain)
    lay = Layout(cv, label)
    base_tissue(cv, lay)
    if label in LESIONS:
        need = 0.06 * n * n
        draw = LESIONS[label]
        scale = 1.0
        for _ in range(6):
            draw(cv, lay, scale)
            if np.count_nonzero(cv.labels) >= need:
                break
            scale *= 1.3
        cv.labels[lay.glass] = BACKGROUND
    sc = scanner_settings(rng, shift)
    rgb = finish(cv, lay, sc, shift)
    return rgb, cv.labels
