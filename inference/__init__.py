"""Prediction for pathologists: tiling, overlays, GeoJSON, export, benchmarks and their commands.

The public names are imported lazily, so ``calcinosis --help`` (which imports
this package for the CLI) stays instant and nothing pulls in torch until a
model is actually loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Predictor": "predictor",
    "PatchResult": "result",
    "BACKENDS": "engines",
    "tile_grid": "tiling",
    "blend_weights": "tiling",
    "Stitcher": "tiling",
    "ArraySource": "tiling",
    "PixelSource": "tiling",
    "ResampledSource": "tiling",
    "open_slide": "slide",
    "is_slide_file": "slide",
    "render_overlay": "overlay",
    "label_map_to_features": "geojson",
    "feature_collection": "geojson",
    "lesion_features": "geojson",
    "find_lesions": "lesions",
    "region_call": "lesions",
    "tissue_mask": "tissue",
    "tissue_fraction": "tissue",
    "focus_measure": "tissue",
    "export_onnx": "export",
    "collect_inputs": "inputs",
    "load_images": "inputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'calcinosis.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
