"""Procedural skin histology with exact deposit labels.

No public dataset of calcinosis cutis and its mimics exists, so the project
renders its own: patches of epidermis, dermis and subcutis in which the
deposit of each class is drawn with the structure a pathologist uses to tell
them apart (amorphous cracked calcium, lamellar bone with osteocytes, feathery
urate with needle clefts and a histiocyte palisade, homogeneous fissured
amyloid), together with the pixel label map. Two independently written
renderers draw the same tissue model, so a model can be trained and measured
across rendering styles.

How the package is laid out (each module's docstring says more):

* ``contract``: the arguments every patch renderer accepts, ``NOMINAL_MPP``,
  ``GENERATOR_VERSION``.
* Style A, stained components seen through Beer-Lambert optics: ``optics``
  (components, dyes, stains, lab and scanner settings), ``scene`` (the
  component maps and drawing primitives), ``tissue`` (ordinary skin),
  ``lesions`` and ``bone`` (the deposits), ``style_a`` (``render_patch``).
* ``style_b``: the painted RGB renderer (``render_patch_b``), in modules of
  its own.
* ``patches``: one patch of a dataset in either style (seed, supersampling).
* ``dataset``: ``generate_dataset`` (images, masks, manifest with splits,
  ``synthetic.json``); ``sheet``: the contact sheet.
* ``region_plan`` and ``region``: a large region cut out of one section,
  rendered tile by tile and cross-faded.
* ``workers``: worker processes with OpenCV on one thread; ``cli``:
  ``calcinosis synth``.

Determinism: a patch depends only on its arguments and the renderer's version;
datasets and regions are byte-identical whatever the number of workers.
"""

from __future__ import annotations

from .cli import parse_region_size, run_synth
from .contract import GENERATOR_VERSION, NOMINAL_MPP, check_patch_args
from .dataset import (
    MANIFEST_COLUMNS,
    STAMP_NAME,
    assign_synthetic_splits,
    dataset_is_current,
    dataset_stamp,
    generate_dataset,
    make_fixtures,
)
from .patches import STYLES, patch_seed, patch_style, render_supersampled, supersample_factor
from .region import region_metadata, render_plan, render_region
from .region_plan import DEPOSIT_CLASSES, GLASS, RegionPlan, plan_region
from .sheet import contact_sheet
from .style_a import render_patch
from .style_b import STYLE_B_VERSION, render_patch_b

__all__ = [
    "NOMINAL_MPP",
    "GENERATOR_VERSION",
    "STYLE_B_VERSION",
    "STYLES",
    "MANIFEST_COLUMNS",
    "STAMP_NAME",
    "render_patch",
    "render_patch_b",
    "check_patch_args",
    "render_supersampled",
    "supersample_factor",
    "patch_seed",
    "patch_style",
    "generate_dataset",
    "assign_synthetic_splits",
    "dataset_stamp",
    "dataset_is_current",
    "contact_sheet",
    "make_fixtures",
    "DEPOSIT_CLASSES",
    "GLASS",
    "RegionPlan",
    "plan_region",
    "render_plan",
    "render_region",
    "region_metadata",
    "parse_region_size",
    "run_synth",
]
