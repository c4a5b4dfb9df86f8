"""Checkpoints: one safetensors file holding the weights and everything else.

A checkpoint is self-describing, nanoGPT-style: the header carries the
model's own arguments (``ModelConfig``), the vocabularies, the preprocessing
and the calibration, as JSON under the key ``"calcinosis"``. Inference needs
nothing but this file. Nothing is ever unpickled: safetensors stores raw
tensors and a JSON header, so a checkpoint from a stranger cannot run code.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .fileio import atomic_path
from .metadata import require_known_keys
from .network import CalcinosisNet
from .preprocess import PREPROCESSING_KEY, Preprocessing

#: Bumped when the layout of the header or of the state dict changes in a way
#: an older reader would misunderstand.
CHECKPOINT_FORMAT_VERSION = 1

#: The safetensors header key under which our metadata JSON lives.
METADATA_KEY = "calcinosis"

# A real header is a few tens of kilobytes; anything huge is not ours.
_MAX_HEADER_BYTES = 64 * 1024 * 1024
# How many offending keys an error message lists before "...".
_SHOW = 8

PathLike = str | os.PathLike


def save_checkpoint(path: PathLike, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``metadata`` to ``path`` atomically.

    The file appears complete or not at all: it is written to a temporary
    file in the same folder, flushed to disk, then renamed over ``path``. A
    run killed mid-save therefore keeps its previous ``last.safetensors``.
    ``metadata["model"]`` is always taken from the model itself so that the
    checkpoint rebuilds the network that produced the weights.
    """
    path = Path(path)
    net = unwrap_model(model)
    if not isinstance(net, CalcinosisNet):
        raise TypeError(f"save_checkpoint expects a CalcinosisNet, got {type(net).__name__}")

    meta = dict(metadata)
    meta["model"] = asdict(net.config)
    meta.setdefault("format_version", CHECKPOINT_FORMAT_VERSION)
    meta.setdefault("class_names", list(net.config.class_names))
    meta.setdefault("stain_names", list(net.config.stain_names))
    meta.setdefault("deposit_labels", list(net.config.deposit_labels))
    meta.setdefault("mean", list(net.data_config["mean"]))
    meta.setdefault("std", list(net.data_config["std"]))
    meta.setdefault("init_weights", getattr(net, "init_weights_source", None))
    # The one preprocessing section inference reads (see model/preprocess.py);
    # without it in ``metadata``, it is made from the keys older writers set.
    meta[PREPROCESSING_KEY] = Preprocessing.from_metadata(meta).to_dict()
    try:
        header = {METADATA_KEY: json.dumps(meta), "format": "pt"}
    except TypeError as exc:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {exc}") from exc

    tensors = _state_tensors(net)
    with atomic_path(path) as tmp:
        _write_tensors(tensors, tmp, header)
    return path


def read_checkpoint_metadata(path: PathLike) -> dict[str, Any]:
    """Only the metadata, from the header: cheap enough for listing many runs."""
    path = Path(path)
    header = read_safetensors_header(path)
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(
            f"{path} is a safetensors file but not a calcinosis checkpoint (its header has no "
            f"{METADATA_KEY!r} metadata). Plain backbone weights go in model.init_weights instead."
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path}: the {METADATA_KEY!r} metadata is not valid JSON ({exc})"
        ) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the {METADATA_KEY!r} metadata is not a JSON object")
    return meta


def load_checkpoint(
    path: PathLike, device: str | torch.device = "cpu"
) -> tuple[CalcinosisNet, dict]:
    """Rebuild the saved network from its own config and load its weights strictly.

    The model comes back in eval mode on ``device``; call ``.train()`` to
    resume training. ``data_config`` mean/std are set from the metadata's
    preprocessing so inference normalises exactly as training did.
    """
    from .factory import create_model  # the factory imports nothing from here

    path = Path(path)
    meta = read_checkpoint_metadata(path)
    version = meta.get("format_version", CHECKPOINT_FORMAT_VERSION)
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this calcinosis reads up to "
            f"{CHECKPOINT_FORMAT_VERSION}. Upgrade the package to load it."
        )
    cfg = model_config_from_metadata(meta, path)
    try:
        model = create_model(cfg)
    except ConfigError as exc:
        raise CheckpointError(
            f"{path}: cannot rebuild the network it was saved from: {exc}"
        ) from exc

    tensors = load_safetensors(path)
    check_state_dict(model, tensors, path)
    model.load_state_dict(tensors, strict=True)
    prep = Preprocessing.from_metadata(meta)
    if len(prep.mean) == cfg.in_chans:
        model.data_config["mean"], model.data_config["std"] = prep.mean, prep.std
    return model.to(device).eval(), meta


def model_config_from_metadata(meta: dict[str, Any], path: PathLike) -> ModelConfig:
    """``ModelConfig`` from ``meta["model"]``, without ``init_weights``.

    The checkpoint's own weights replace whatever the run started from, and
    that file may not exist on the machine that loads the checkpoint.
    """
    stored = meta.get("model")
    if not isinstance(stored, dict):
        raise CheckpointError(
            f"{path}: metadata has no 'model' section to rebuild the network from"
        )
    require_known_keys(stored, ModelConfig, "model", f"{path}: ")
    kwargs = {k: v for k, v in stored.items() if k != "init_weights"}
    try:
        return ModelConfig(**kwargs)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: metadata 'model' is invalid: {exc}") from exc


def check_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], path: PathLike) -> None:
    """Raise a CheckpointError naming every missing, unexpected or misshapen key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{k} (file {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_examples(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_examples(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_examples(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{path} does not match the network described by its own metadata: "
            + "; ".join(problems)
            + ". The file is damaged or was edited; re-save it from the training run."
        )


def read_safetensors_header(path: PathLike) -> dict[str, Any]:
    """The parsed JSON header of a safetensors file, read without touching the tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        if not 2 <= length <= min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(_not_safetensors(path, prefix))
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(_not_safetensors(path, prefix)) from None
    if not isinstance(header, dict):
        raise CheckpointError(_not_safetensors(path, prefix))
    return header


def load_safetensors(path: PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, errors turned into CheckpointError."""
    try:
        return safetensors.torch.load_file(str(path), device=device)
    except Exception as exc:  # SafetensorError, OSError: all mean an unusable file
        raise CheckpointError(f"{path} could not be read as safetensors: {exc}") from exc


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare network inside DistributedDataParallel and/or torch.compile."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-disjoint tensors: what safetensors can write.

    channels_last parameters are not contiguous, and tied weights share one
    storage; safetensors refuses both, so copy where needed.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out[name] = t
    return out


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> None:
    # Its own function so tests can simulate a crash halfway through a save.
    safetensors.torch.save_file(tensors, str(path), metadata=header)


def _not_safetensors(path: Path, prefix: bytes) -> str:
    if prefix[:2] == b"PK" or prefix[:1] == b"\x80":
        kind = (
            " It looks like a pickled torch file (.pt/.pth), which is never loaded as a checkpoint"
        )
        kind += "; backbone weights of that kind go in model.init_weights."
    else:
        kind = ""
    return f"{path} is not a safetensors checkpoint (no valid safetensors header).{kind}"


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    more = f", ... ({len(items)} in all)" if len(items) > _SHOW else ""
    return f"[{shown}{more}]"
