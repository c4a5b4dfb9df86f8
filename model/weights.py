"""Starting weights from a local file: a timm/torchvision backbone or one of ours.

Two kinds of file are accepted:

* a backbone state dict as saved from a plain timm or torchvision classifier
  (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
  ``torch.load(weights_only=True)``, which refuses arbitrary pickles). Its
  classifier keys are dropped and the rest is mapped onto the encoder;
* one of our checkpoints, for fine-tuning: everything whose shape fits is
  loaded, so a run with other class names keeps the encoder and decoder and
  starts its heads afresh.

A file made for another architecture is refused loudly rather than half-loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from timm.models import adapt_input_conv

from .checkpoint import METADATA_KEY, PathLike, load_safetensors, read_safetensors_header
from .errors import CheckpointError
from .network import CalcinosisNet

log = logging.getLogger(__name__)

#: Wrappers other tools put around backbone keys (DDP, Lightning, our encoder).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.", "backbone.")
#: Top-level module names of classifier heads (and the head-side layers that
#: ``features_only`` drops), ignored when mapping a classifier onto an encoder.
HEAD_MODULES = frozenset(
    {"fc", "classifier", "head", "head_drop", "last_linear", "conv_head", "bn2", "norm_head"}
)
#: At least this share of the encoder must be found in the file.
MIN_MATCHED = 0.5
#: At most this share of the file's backbone tensors may go unused: more means
#: the file is a bigger relative (resnet34 weights for a resnet18, say).
MAX_UNUSED = 0.1
_SHOW = 6


def load_init_weights(model: CalcinosisNet, path: PathLike) -> dict[str, list[str]]:
    """Load starting weights from ``path`` into ``model`` in place.

    Returns ``missing`` (model keys left at their initial values: for a bare
    backbone file that is the decoder and the heads) and ``unexpected`` (file
    keys that were not used, classifier keys excluded). Raises CheckpointError
    when the file is missing, unreadable or made for another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"init weights file {path} does not exist; model.init_weights must name a local "
            "file (nothing is downloaded)"
        )
    tensors, ours = _read_weights(path)
    model_state = model.state_dict()
    if ours:
        enc_src = {k[len("encoder.") :]: v for k, v in tensors.items() if k.startswith("encoder.")}
        rest_src = {k: v for k, v in tensors.items() if not k.startswith("encoder.")}
    else:
        enc_src = {_strip_wrappers(k): v for k, v in tensors.items()}
        rest_src = {}

    enc_state = {
        k[len("encoder.") :]: v for k, v in model_state.items() if k.startswith("encoder.")
    }
    loaded, used = _match_encoder(model, enc_state, enc_src, path)
    new_state = {f"encoder.{k}": v for k, v in loaded.items()}

    unexpected = [k for k in enc_src if k not in used and not _is_head_key(model, k)]
    if ours:
        unexpected = [f"encoder.{k}" for k in unexpected]
        for key, value in rest_src.items():
            target = model_state.get(key)
            if target is not None and target.shape == value.shape:
                new_state[key] = value
            elif target is None:
                unexpected.append(key)
            # same name, other shape: a head for other class names; left at init

    model.load_state_dict(new_state, strict=False)
    missing = sorted(k for k in model_state if k not in new_state)
    log.info("init weights %s: loaded %d of %d tensors", path, len(new_state), len(model_state))
    return {"missing": missing, "unexpected": sorted(unexpected)}


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors of ``path`` and whether it is one of our checkpoints."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        header = read_safetensors_header(path)
        ours = METADATA_KEY in (header.get("__metadata__") or {})
        tensors = load_safetensors(path)
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything but plain tensors
            raise CheckpointError(
                f"{path} could not be read as a weights-only torch file: {exc}. Only plain state "
                "dicts of tensors are accepted (nothing is unpickled); convert the file with "
                "safetensors.torch.save_file(state_dict, 'weights.safetensors')."
            ) from exc
        tensors = _unwrap_state_dict(obj, path)
        ours = False
    else:
        raise CheckpointError(
            f"{path}: unsupported weights file type {suffix!r}; use .safetensors, .pth, .pt or .bin"
        )
    if not ours:
        # A .pth saved from our model's state_dict() is ours too.
        ours = any(k.startswith("encoder.") for k in tensors) and any(
            k.startswith("classification_head.") for k in tensors
        )
    return tensors, ours


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside the usual training-script wrappers."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path} holds no state dict of tensors (found {type(obj).__name__})")


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _candidates(encoder_key: str) -> list[str]:
    """Names a features_only key may have had in the classifier model.

    timm's FeatureListNet flattens sequential stems, so ``stem.0`` becomes
    ``stem_0``; feature wrappers built on hooks keep the model as ``model.``.
    """
    bases = [encoder_key]
    if encoder_key.startswith("model."):
        bases.append(encoder_key[len("model.") :])
    out: list[str] = []
    for base in bases:
        out.append(base)
        first, dot, rest = base.partition(".")
        for i, ch in enumerate(first):
            if ch == "_":
                out.append(first[:i] + "." + first[i + 1 :] + dot + rest)
    return out


def _match_encoder(
    model: CalcinosisNet,
    enc_state: dict[str, torch.Tensor],
    src: dict[str, torch.Tensor],
    path: Path,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    loaded: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    mismatched: list[str] = []
    for key, ours in enc_state.items():
        for cand in _candidates(key):
            if cand not in src:
                continue
            used.add(cand)
            theirs = src[cand]
            if theirs.shape == ours.shape:
                loaded[key] = theirs
            elif _is_adaptable_stem(theirs, ours, model.config.in_chans):
                # RGB weights for a grey or multi-channel input, as timm does it.
                loaded[key] = adapt_input_conv(ours.shape[1], theirs.float()).to(ours.dtype)
            else:
                mismatched.append(f"{key} (file {tuple(theirs.shape)}, model {tuple(ours.shape)})")
            break

    countable = [k for k in enc_state if not k.endswith("num_batches_tracked")]
    matched = sum(k in loaded for k in countable)
    unused = [
        k
        for k in src
        if k not in used and not _is_head_key(model, k) and not k.endswith("num_batches_tracked")
    ]
    too_few = matched < MIN_MATCHED * len(countable)
    too_many = len(unused) > MAX_UNUSED * max(len(src), 1)
    if mismatched or too_few or too_many:
        # One message with everything a user needs to see which file fits what.
        backbone = model.config.backbone
        parts = [
            f"only {matched} of {len(countable)} encoder tensors matched"
            if too_few
            else f"{matched} of {len(countable)} encoder tensors matched"
        ]
        if mismatched:
            parts.append(f"{len(mismatched)} have other shapes, e.g. {mismatched[:_SHOW]}")
        if too_few:
            absent = [f"{k} {tuple(enc_state[k].shape)}" for k in countable if k not in loaded]
            parts.append(f"the model expects e.g. {absent[:_SHOW]}")
        if unused:
            extra = [f"{k} {tuple(src[k].shape)}" for k in unused]
            parts.append(
                f"{len(unused)} file tensors that {backbone!r} lacks, e.g. {extra[:_SHOW]}"
            )
        raise CheckpointError(
            f"{path} does not look like weights for backbone {backbone!r} (it was made for "
            f"another architecture): {'; '.join(parts)}. Use weights made for {backbone!r} or "
            "set model.backbone to the architecture of the file."
        )
    return loaded, used


def _is_head_key(model: CalcinosisNet, key: str) -> bool:
    names = set(HEAD_MODULES)
    classifier = (getattr(model.encoder, "pretrained_cfg", None) or {}).get("classifier")
    for name in (classifier,) if isinstance(classifier, str) else classifier or ():
        names.add(name.split(".")[0])
    return key.split(".")[0] in names


def _is_adaptable_stem(theirs: torch.Tensor, ours: torch.Tensor, in_chans: int) -> bool:
    return (
        in_chans != 3
        and ours.ndim == 4
        and ours.shape[1] == in_chans
        and theirs.ndim == 4
        and theirs.shape[1] == 3
        and theirs.shape[0] == ours.shape[0]
        and theirs.shape[2:] == ours.shape[2:]
    )
