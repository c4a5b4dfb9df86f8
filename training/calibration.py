"""After training: fit the softmax temperature and write it into the checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from calcinosis.model import load_checkpoint, save_checkpoint
from calcinosis.model.fileio import atomic_write_bytes

from . import metrics
from .engine import collect_outputs
from .state import BEST_CHECKPOINT, CALIBRATION_FILE, LAST_CHECKPOINT


def calibrate(
    run_dir: Path,
    val_loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    tta: str = "none",
) -> dict[str, Any]:
    """Fit a softmax temperature on the validation logits of the best weights.

    The temperature goes into the metadata of best and last checkpoints
    (rewritten atomically) and into calibration.json with the ECE before and
    after, so inference reports calibrated probabilities. It is fitted on the
    outputs of test-time augmentation mode ``tta`` (inference.tta), the mode
    inference then uses for patches; a second temperature is fitted without
    augmentation, the mode of tiled regions and slides (``calibration.temperatures``
    holds both): averaged logits are less extreme than single-pass ones, so
    each mode needs its own temperature.
    """
    model, _ = load_checkpoint(run_dir / BEST_CHECKPOINT, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Every mode gets its own temperature: patches run the configured mode,
    # tiled regions and slides one pass (calcinosis predict's defaults).
    fits: dict[str, dict[str, float]] = {}
    for mode in dict.fromkeys((tta, "none")):
        out = collect_outputs(
            model, val_loader, device, amp_dtype, channels_last=channels_last, tta=mode
        )
        logits, labels = out["class_logits"], out["labels"]
        t = float(metrics.fit_temperature(logits, labels))
        fits[mode] = {
            "temperature": t,
            "ece_before": float(
                metrics.expected_calibration_error(metrics.softmax(logits), labels)
            ),
            "ece_after": float(
                metrics.expected_calibration_error(metrics.softmax(logits, t), labels)
            ),
        }
    result = {
        **fits[tta],
        "fitted_on": "val",
        "tta": tta,
        "samples": int(len(labels)),
        "temperatures": {mode: fit["temperature"] for mode, fit in fits.items()},
        "by_mode": fits,
        "checkpoint": BEST_CHECKPOINT,
    }
    temperature = result["temperature"]
    for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
        net, meta = load_checkpoint(run_dir / name)
        if net.config.class_head != model.config.class_head:
            # last.safetensors after a deposit readout: another class head, whose
            # logits this temperature was not fitted on (it is the resume point).
            continue
        meta["temperature"] = temperature
        meta["calibration"] = {
            k: result[k] for k in ("tta", "samples", "ece_before", "ece_after", "temperatures")
        }
        save_checkpoint(run_dir / name, net, meta)
    atomic_write_bytes(
        run_dir / CALIBRATION_FILE, (json.dumps(result, indent=2) + "\n").encode("utf-8")
    )
    return result


def describe(cal: dict[str, Any]) -> str:
    """One log line for a :func:`calibrate` result."""
    tta = cal["tta"]
    return (
        f"calibration: temperature {cal['temperature']:.3f}, val ECE "
        f"{cal['ece_before']:.4f} -> {cal['ece_after']:.4f}"
        + (
            f" (test-time augmentation {tta}; one pass: temperature "
            f"{cal['temperatures']['none']:.3f})"
            if tta != "none" and "temperatures" in cal
            else (f" (test-time augmentation {tta})" if tta != "none" else "")
        )
    )
