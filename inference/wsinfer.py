"""A checkpoint as a WSInfer model: TorchScript plus ``config.json``.

``calcinosis export --checkpoint best.safetensors --wsinfer DIR`` writes

- ``DIR/torchscript_model.pt``: the network traced with ``torch.jit.trace``.
  Input: a float batch ``[N, 3, S, S]`` of RGB patches in ``[0, 1]`` (what
  torchvision's ``ToTensor`` and Deep Java Library's ``ToTensor`` make of
  8-bit pixels), ``S`` = ``patch_size_pixels``. Output: *calibrated* class
  logits ``[N, C]``, i.e. the class logits divided by the temperature of the
  test-time augmentation mode inside the model (``model.metadata.temperature_for``,
  the one ``Predictor.temperatures`` holds for that mode), so the softmax
  that WSInfer and QuPath apply gives the calibrated probabilities
  ``calcinosis predict`` reports for a patch. The checkpoint's mean/std
  normalisation (its ``preprocessing`` section) is inside the model, and so is
  the test-time augmentation ``predict`` uses for patches by default (the
  checkpoint's ``inference.tta``; ``d4`` averages the logits of the eight
  rotations/reflections). A checkpoint that normalises stains (Macenko)
  before the network cannot be exported: the TorchScript model would not.
- ``DIR/config.json``: WSInfer's model configuration (``spec_version``,
  ``architecture``, ``num_classes``, ``class_names``, ``patch_size_pixels``,
  ``spacing_um_px``, ``transform`` = ``Resize`` to the patch size then
  ``ToTensor``), valid against the schema that ``wsinfer`` and ``wsinfer-zoo``
  ship, plus a ``calcinosis`` block saying where the model came from (the two
  readers ignore keys they do not know).

The file names are the ones both consumers look for: ``wsinfer run --config
DIR/config.json --model-path DIR/torchscript_model.pt``, and QuPath's WSInfer
extension, which lists every folder of its models directory's ``local`` (or
``user``) subfolder that holds ``torchscript_model.pt`` and ``config.json``
(the folder's name is the model's name there).

What a WSInfer model cannot carry: the "indeterminate" rule (a call needs a
top calibrated probability of at least the checkpoint's threshold), the stain
head, the deposit map and the tissue and focus checks. WSInfer tiles a slide
into non-overlapping patches at ``spacing_um_px`` and classifies each; use
``calcinosis predict`` for the deposit outlines and region calls.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from calcinosis.model.errors import CalcinosisError, CheckpointError
from calcinosis.model.fileio import atomic_path, atomic_write_text
from calcinosis.model.metadata import checkpoint_tta, setting, temperature_for
from calcinosis.model.preprocess import Preprocessing

log = logging.getLogger(__name__)

#: File names QuPath's WSInfer extension requires in a local model folder.
TORCHSCRIPT_NAME = "torchscript_model.pt"
CONFIG_NAME = "config.json"
#: The only model-config spec version wsinfer-zoo 0.6 accepts.
SPEC_VERSION = "1.0"
#: TorchScript and eager PyTorch may differ by float rounding; more is an export fault.
PARITY_TOLERANCE = 1e-4


def wsinfer_config(meta: dict[str, Any], size: int, extra: dict[str, Any]) -> dict[str, Any]:
    """WSInfer's ``config.json`` for a checkpoint's metadata and input side ``size``."""
    class_names = [str(c) for c in meta.get("class_names") or []]
    if not class_names:
        raise CheckpointError("the checkpoint names no classes (metadata 'class_names')")
    mpp = Preprocessing.from_metadata(meta).mpp
    if mpp is None or not float(mpp) > 0:
        raise CheckpointError(
            "the checkpoint records no microns per pixel ('mpp'): WSInfer needs the spacing "
            "its patches are read at (spacing_um_px)"
        )
    for c in class_names:
        # QuPath's extension turns each class into a PathClass and a measurement name;
        # ':' would make a derived class ("a: b"), so it is not a class name there.
        if ":" in c or c != c.strip() or not c:
            raise CheckpointError(f"class name {c!r} cannot be a QuPath classification")
    return {
        "spec_version": SPEC_VERSION,
        "architecture": str((meta.get("model") or {}).get("backbone") or "unknown"),
        "num_classes": len(class_names),
        "class_names": class_names,
        "patch_size_pixels": int(size),
        "spacing_um_px": float(mpp),
        # QuPath reads Resize's "size" as a number; torchvision's Resize(int) keeps a
        # square patch square and leaves one already of that size untouched.
        "transform": [{"name": "Resize", "arguments": {"size": int(size)}}, {"name": "ToTensor"}],
        "calcinosis": extra,
    }


def mode_temperature(meta: dict[str, Any], tta: str) -> float:
    """The temperature ``Predictor`` divides mode ``tta``'s logits by (``Predictor.temperatures``).

    The one fitted in that mode (``calibration.temperatures``), else the main
    one (older checkpoints; ``checkpoint_tta`` then warns), else 1.
    """
    fitted = temperature_for(meta, tta)
    return float(fitted if fitted is not None else meta.get("temperature") or 1.0)


def calibrated_classifier(model: Any, meta: dict[str, Any], tta: str) -> Any:
    """A module: ``[N, 3, S, S]`` RGB in [0, 1] -> class logits / temperature, ``[N, C]``."""
    import torch

    from calcinosis.model.tta import torch_d4

    spec = Preprocessing.from_metadata(meta)
    mean, std = spec.mean, spec.std
    temperature = mode_temperature(meta, tta)
    if not temperature > 0:
        raise CheckpointError(f"the checkpoint's temperature must be > 0; got {temperature}")

    class CalibratedClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x - self.mean) / self.std
            if tta == "d4":
                logits = torch_d4(self.net, x)["class_logits"]
            else:
                logits = self.net(x)["class_logits"]
            return logits / temperature

    return CalibratedClassifier().eval()


def export_wsinfer(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tta: str | None = None,
    check_images: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Write ``torchscript_model.pt`` and ``config.json`` for ``checkpoint`` into ``out_dir``.

    ``tta``: ``none`` or ``d4`` (default: the checkpoint's ``inference.tta``, as
    ``calcinosis predict``). The traced model is loaded back and compared with
    :class:`~calcinosis.inference.predictor.Predictor` on ``check_images`` (uint8
    RGB patches of the input size; default: :func:`_check_images`, stained
    fields, gradients and noise); returns the paths, the config and
    ``max_abs_diff``, the largest difference of a calibrated probability.
    """
    import torch

    from calcinosis.model import load_checkpoint
    from calcinosis.model.cli import package_version
    from calcinosis.model.fileio import file_digest

    checkpoint = Path(checkpoint)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CalcinosisError(f"--wsinfer {out} exists and is not a folder")
    model, meta = load_checkpoint(checkpoint, device="cpu")
    if int(model.config.in_chans) != 3:
        raise CheckpointError(
            f"the checkpoint takes {model.config.in_chans}-channel input; WSInfer and QuPath "
            "feed RGB patches"
        )
    spec = Preprocessing.from_metadata(meta)
    if spec.stain_normalize != "none":
        raise CheckpointError(
            f"the checkpoint normalises stains ({spec.stain_normalize}) before the network; a "
            "WSInfer model gets WSInfer's pixels as they are, so it would not: use calcinosis "
            "predict for this model"
        )
    mode, tta_warning = checkpoint_tta(meta, tta)
    if tta_warning:
        log.warning(tta_warning)
    size = spec.input_size
    extra = {
        "version": package_version(),
        "source_checkpoint": checkpoint.name,
        "source_checkpoint_sha256": file_digest(checkpoint),
        # The temperature of the TTA mode inside the model (Predictor.temperatures[tta]).
        "temperature": mode_temperature(meta, mode),
        "tta": mode,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "indeterminate_threshold": setting(
            meta, "indeterminate_threshold", ("inference", "indeterminate_threshold"), None
        ),
        "output": "class logits divided by the temperature; softmax gives calibrated "
        "probabilities. Input: RGB in [0, 1], normalisation inside the model.",
    }
    config = wsinfer_config(meta, size, extra)
    module = calibrated_classifier(model, meta, mode)
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, size, size, generator=gen)
    out.mkdir(parents=True, exist_ok=True)
    ts_path = out / TORCHSCRIPT_NAME
    with warnings.catch_warnings():
        # torch marks TorchScript deprecated; WSInfer and QuPath's extension load nothing else.
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(module, example)
        with atomic_path(ts_path) as tmp:
            torch.jit.save(traced, str(tmp))
    cfg_path = atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")

    images = check_images if check_images else _check_images(size)
    diff = _parity(ts_path, checkpoint, images, mode, config["class_names"])
    return {"model": ts_path, "config": cfg_path, "settings": config, "max_abs_diff": diff}


def _check_images(size: int, n: int = 12) -> list[np.ndarray]:
    """Deterministic RGB patches of the input size for the parity check: tissue-like
    pink and purple fields with blobs, smooth colour gradients and noise (the library
    does not reach for the synthetic generator; any pixels show an export fault)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:  # a stained field with round nuclei-like blobs
            base = np.array([rng.uniform(180, 240), rng.uniform(90, 170), rng.uniform(160, 220)])
            img = np.broadcast_to(base, (size, size, 3)).copy()
            for _ in range(int(rng.integers(3, 12))):
                cy, cx = rng.uniform(0, size, 2)
                r = rng.uniform(2, max(3.0, size / 6))
                blob = (yy * size - cy) ** 2 + (xx * size - cx) ** 2 <= r * r
                img[blob] = rng.uniform(40, 140, 3)
            img += rng.normal(0, 8, img.shape)
        elif kind == 1:  # smooth gradients, a different one per channel
            a, b, c = rng.uniform(0, 255, 3)
            img = np.stack([a * yy + (255 - a) * xx, b * xx, c * (1 - yy)], axis=-1)
        else:  # noise
            img = rng.uniform(0, 256, (size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _parity(
    ts_path: Path, checkpoint: Path, images: list[np.ndarray], tta: str, class_names: list[str]
) -> float:
    """Largest |softmax(TorchScript) - Predictor| over ``images`` and classes.

    The TorchScript model is fed as WSInfer feeds it (``ToTensor``: pixels / 255,
    CHW); the Predictor runs its own preprocessing, every patch through the
    network (no tissue gate), in batches of 5 and 1 (the traced batch was 2).
    """
    import torch

    from .predictor import Predictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(ts_path), map_location="cpu").eval()
    pred = Predictor.from_checkpoint(checkpoint, min_tissue_fraction=0.0, tta=tta, batch_size=5)
    batch = np.stack(images)
    if batch.shape[1:3] != (pred.input_size, pred.input_size):
        raise ValueError(f"check images must be {pred.input_size} px square")
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        probs = torch.cat(
            [ts(x[:5]).softmax(1), *(ts(x[i : i + 1]).softmax(1) for i in range(5, len(x)))]
        )
    ref = np.array([[r.probabilities[c] for c in class_names] for r in pred.predict_batch(images)])
    return float(np.abs(probs.numpy() - ref).max())


def run_export(args: argparse.Namespace) -> int:
    """``calcinosis export``: the ONNX file (``--onnx``) and/or a WSInfer model (``--wsinfer``)."""
    onnx_path = getattr(args, "onnx", None)
    folder = getattr(args, "wsinfer", None)
    if not onnx_path and not folder:
        raise CalcinosisError("nothing to export: give --onnx FILE, --wsinfer DIR or both")
    rc = 0
    if onnx_path:
        from . import export

        rc = export.run_export(args)
    if folder:
        info = export_wsinfer(args.checkpoint, folder, tta=getattr(args, "wsinfer_tta", None))
        s = info["settings"]
        print(
            f"wrote {info['model']} and {info['config']} (WSInfer: {s['num_classes']} classes, "
            f"{s['patch_size_pixels']} px patches at {s['spacing_um_px']:g} um/px, "
            f"tta {s['calcinosis']['tta']})"
        )
        print(f"max |TorchScript - predict| calibrated probability: {info['max_abs_diff']:.2e}")
        if info["max_abs_diff"] > PARITY_TOLERANCE:
            print(
                f"warning: the TorchScript model differs from predict by more than {PARITY_TOLERANCE:g}"
            )
            rc = rc or 1
    return rc
