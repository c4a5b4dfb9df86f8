"""The model card the page always shows: what the model is, what it was trained on, its limits.

Everything comes from the checkpoint's own metadata (the resolved training
config, the calibration, the classes) and, for the training data, from the
manifest it names when that is still on disk: a manifest written by
``calcinosis synth`` has a ``synthetic.json`` beside it, and then the card says
plainly that the model has seen synthetic patches only. When the checkpoint
does not say, the card says that it does not say.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from calcinosis.inference.predictor import Predictor
from calcinosis.model.cli import package_version
from calcinosis.model.fileio import file_digest
from calcinosis.model.metadata import checkpoint_tta

RESEARCH_ONLY = "For research use; not a diagnosis."


def training_data(metadata: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """``{"synthetic": True/False/None, "text": ..., "manifest": ...}`` for the card."""
    cfg = metadata.get("config") or {}
    data = cfg.get("data") or {}
    source = data.get("source")
    if source == "synthetic":
        syn = data.get("synthetic") or {}
        return {
            "synthetic": True,
            "manifest": None,
            "text": "Synthetic patches only (generated on the fly by the project's renderer"
            + (
                f", {syn['n_per_class_stain']} per class and stain"
                if "n_per_class_stain" in syn
                else ""
            )
            + "). It has never seen a real slide.",
        }
    manifest = data.get("manifest")
    if source != "manifest" or not manifest:
        return {
            "synthetic": None,
            "manifest": None,
            "text": "Not recorded in the checkpoint: what this model was trained on is unknown.",
        }
    found = _find_manifest(str(manifest), checkpoint, cfg.get("output_dir"))
    if found is None:
        return {
            "synthetic": None,
            "manifest": str(manifest),
            "text": f"Manifest {manifest} (not found on this computer, so whether its patches "
            "are real or synthetic cannot be checked).",
        }
    n = _count_rows(found)
    side = found.parent / "synthetic.json"
    if side.is_file():
        try:
            settings = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            settings = {}
        bits = [f"style {settings['style']}" if "style" in settings else ""]
        if "mpp" in settings:
            bits.append(f"{settings['mpp']} µm/px")
        detail = ", ".join(b for b in bits if b)
        return {
            "synthetic": True,
            "manifest": str(manifest),
            "text": f"Synthetic patches only: {n} patches written by calcinosis synth"
            + (f" ({detail})" if detail else "")
            + ". It has never seen a real slide.",
        }
    return {
        "synthetic": False,
        "manifest": str(manifest),
        "text": f"Manifest {manifest}: {n} patches (not written by calcinosis synth).",
    }


def model_card(predictor: Predictor, checkpoint: Path, digest: bool = True) -> dict[str, Any]:
    """The card's fields, JSON-ready."""
    meta = predictor.metadata
    model = meta.get("model") or {}
    calib = meta.get("calibration") or {}
    metrics = meta.get("metrics") or {}
    card: dict[str, Any] = {
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_digest(checkpoint)[:12]
        if digest and checkpoint.is_file()
        else None,
        "package_version": meta.get("package_version"),
        "server_version": package_version(),
        "backbone": model.get("backbone"),
        "backend": predictor.backend,
        "classes": predictor.class_names,
        "stains": predictor.stain_names,
        "deposit_labels": predictor.deposit_labels,
        "mpp": predictor.model_mpp,
        "input_size": predictor.input_size,
        "temperature": predictor.temperature,
        # Test-time augmentation of patches and of tiled regions and slides (one pass unless
        # --tta says otherwise), and the temperature each of them is calibrated with.
        "tta": predictor.tta,
        "region_tta": predictor.region_tta,
        "temperatures": dict(predictor.temperatures),
        # Set when the server runs a TTA mode the checkpoint has no temperature for.
        "tta_warning": tta_warning(predictor),
        "calibration": {k: calib.get(k) for k in ("tta", "samples", "ece_before", "ece_after")}
        if calib
        else None,
        "indeterminate_threshold": predictor.indeterminate_threshold,
        "lesion_threshold": predictor.lesion_threshold,
        "min_lesion_area_um2": predictor.min_lesion_area_um2,
        "min_tissue_fraction": predictor.min_tissue_fraction,
        "focus_threshold": predictor.focus_threshold,
        "epoch": meta.get("epoch"),
        "validation": {
            k: metrics.get(k)
            for k in ("val_acc", "val_macro_f1", "val_calcium_dice", "val_samples")
        }
        if metrics
        else None,
        "trained_on": training_data(meta, checkpoint),
        "notice": RESEARCH_ONLY,
    }
    return card


def tta_warning(predictor: Predictor) -> str | None:
    """What the card warns about the test-time augmentation, or None when every mode run
    here has a temperature fitted in it (``calibration.temperatures``)."""
    kinds = [("patches", predictor.tta), ("tiled regions and slides", predictor.region_tta)]
    if predictor.tta == predictor.region_tta:
        kinds = [("", predictor.tta)]
    notes = []
    for what, mode in kinds:
        if mode in predictor.uncalibrated_modes:
            warning = checkpoint_tta(predictor.metadata, mode)[1]
            if warning:
                notes.append(f"{what}: {warning}" if what else warning)
    return "; ".join(notes) or None


def _find_manifest(manifest: str, checkpoint: Path, output_dir: Any) -> Path | None:
    """The training manifest on disk: absolute, from the run's working folder, or the cwd.

    The config's ``output_dir`` (e.g. ``runs/demo/train``) is the checkpoint's
    folder as seen from where training ran, so stripping as many parents from
    the checkpoint's folder gives that working folder.
    """
    m = Path(manifest)
    candidates = [m] if m.is_absolute() else []
    if not m.is_absolute():
        run_dir = checkpoint.resolve().parent
        if output_dir:
            depth = len(Path(str(output_dir)).parts)
            if 0 < depth < len(run_dir.parts):
                candidates.append(run_dir.parents[depth - 1] / m)
        candidates.append(Path.cwd() / m)
    for c in candidates:
        if c.is_file():
            return c
    return None


def _count_rows(path: Path) -> int:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return sum(1 for _ in csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return 0
