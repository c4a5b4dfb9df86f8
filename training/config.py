"""Typed, validated training configuration.

A config is a tree of dataclasses loaded from YAML with ``yaml.safe_load``.
Unknown keys, wrong types and out-of-range values are errors that name the key
(with the closest valid spelling); ``key=value`` overrides from the command
line are applied before validation. The resolved config is written beside
every run (``config.yaml``) and into every checkpoint, so any run can be
reproduced from its own folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from calcinosis.model.config import ModelConfig
from calcinosis.model.errors import ConfigError
from calcinosis.model.fileio import atomic_write_text
from calcinosis.model.labels import STAIN_NAMES


@dataclass
class SyntheticConfig:
    # Patches per (class, stain) pair; 5 classes x 3 stains x n in all.
    n_per_class_stain: int = 40
    # Generated patch side in pixels (the model's input size is data.image_size).
    size: int = 128
    # Generator seed; the same seed gives byte-identical data.
    seed: int = 0
    # 0 = the training lab; > 0 moves staining/scanner variation outside it.
    shift: float = 0.0

    def __post_init__(self) -> None:
        _require(self.n_per_class_stain >= 1, "data.synthetic.n_per_class_stain", "must be >= 1")
        _require(self.size >= 32, "data.synthetic.size", "must be >= 32 pixels")
        _require(self.shift >= 0, "data.synthetic.shift", "must be >= 0")


@dataclass
class DataConfig:
    # Where patches come from: the built-in generator, a CSV manifest
    # (path,label[,stain,mask_path,split]) or class folders (root/<class>/*.png).
    source: Literal["synthetic", "manifest", "folders"] = "synthetic"
    # CSV manifest for source=manifest; paths inside are relative to it.
    manifest: str | None = None
    # Root folder for source=folders.
    root: str | None = None
    # Settings of the generator for source=synthetic (written under the run folder).
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Network input side; patches (after rescaling to data.mpp) are centre/randomly
    # cropped or reflect-padded to it, so magnification matches inference tiles.
    image_size: int = 128
    # Microns per pixel of the training patches; inference rescales to match.
    mpp: float = 0.5
    # Share of samples held out for validation when the data carries no split column.
    val_fraction: float = 0.15
    # Share held out for test when the data carries no split column.
    test_fraction: float = 0.15
    # DataLoader worker processes; 2 matches this project's reference machine.
    num_workers: int = 2
    # Decoded patches kept in memory per loading process (MB; 0: off), shared by
    # the train and val sets: each patch is read and decoded once, not once an
    # epoch. Every worker keeps its own copy, so memory is up to
    # max(num_workers, 1) x cache_mb.
    cache_mb: int = 1024

    def __post_init__(self) -> None:
        if self.source == "manifest":
            _require(bool(self.manifest), "data.manifest", "is required when data.source=manifest")
        if self.source == "folders":
            _require(bool(self.root), "data.root", "is required when data.source=folders")
        _require(self.image_size >= 32, "data.image_size", "must be >= 32 pixels")
        _require(self.mpp > 0, "data.mpp", "must be > 0 (microns per pixel)")
        _require(0 <= self.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")
        _require(0 <= self.test_fraction < 1, "data.test_fraction", "must be in [0, 1)")
        _require(
            self.val_fraction + self.test_fraction < 1,
            "data.val_fraction",
            "plus data.test_fraction must be < 1",
        )
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(self.cache_mb >= 0, "data.cache_mb", "must be >= 0 (0 turns the cache off)")


@dataclass
class AugmentConfig:
    # Flips and 90-degree turns: a section has no preferred orientation.
    flips: bool = True
    # Random rescale range (zoom), for scanners at slightly different resolution.
    scale: tuple[float, float] = (0.85, 1.15)
    # Probability of Gaussian / defocus blur (scanner focus), and its sigma range in pixels.
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    # Probability of JPEG re-compression (slide formats store JPEG tiles), and
    # its quality range (scanners store anywhere from about 30 to 95).
    jpeg_prob: float = 0.3
    jpeg_quality: tuple[int, int] = (50, 95)
    # Probability of sensor noise, and its standard deviation as a fraction of 255.
    noise_prob: float = 0.0
    noise_std: tuple[float, float] = (0.005, 0.02)
    # Std of the per-stain HED jitter (stain concentration); 0 turns it off.
    hed_sigma: float = 0.05
    # Std of the log of one factor scaling all dyes together (section thickness,
    # staining time: a lab whose slides are uniformly darker or paler); 0 = off.
    stain_strength: float = 0.0
    # Brightness/contrast jitter amplitude (illumination, white balance).
    brightness_contrast: float = 0.1
    # Hue/saturation jitter amplitude in degrees / percent.
    hue_shift: int = 6
    # Style randomisation that keeps structure (for models that must transfer to
    # other renderers, labs and real slides): probability of a random dye basis
    # (optical density re-mixed through a random 3x3 matrix), of a random
    # convolution (RandConv: texture and colour scrambled, outlines kept) and of
    # a grey copy. 0 turns each off.
    random_stain_prob: float = 0.0
    randconv_prob: float = 0.0
    grayscale_prob: float = 0.0
    # With this probability a patch's stained areas get a fine fibrillar
    # texture (training/transforms.py FibreTexture): thin random streaks and
    # grain in optical density, as collagen, bone lamellae and section chatter
    # give real tissue; the renderer's flat fills do not. 0 turns it off.
    texture_prob: float = 0.0
    # Fourier domain adaptation (albumentations' FDA, Yang & Soatto 2020): with
    # this probability the lowest frequencies of the patch's amplitude spectrum
    # (a square of side up to fda_beta x the patch) are swapped for those of
    # another training patch of the same stain, any class or style; the phase,
    # and so every outline, stays. Colour, illumination and coarse texture then
    # come from another class. Only patches of fda_stains are changed: in von
    # Kossa and Alizarin red the dye's colour is the histochemical finding
    # (calcium black or red), which the swap would wash out. 0 turns it off.
    fda_prob: float = 0.0
    fda_beta: float = 0.05
    fda_stains: tuple[str, ...] = ("he",)
    # Optional stain normalisation applied to every image (train and inference).
    stain_normalize: Literal["none", "macenko"] = "none"

    def __post_init__(self) -> None:
        lo, hi = self.scale
        _require(0 < lo <= hi, "augment.scale", "must be [low, high] with 0 < low <= high")
        b_lo, b_hi = self.blur_sigma
        _require(0 < b_lo <= b_hi, "augment.blur_sigma", "must be [low, high] with 0 < low <= high")
        q_lo, q_hi = self.jpeg_quality
        _require(
            1 <= q_lo <= q_hi <= 100,
            "augment.jpeg_quality",
            "must be [low, high] with 1 <= low <= high <= 100",
        )
        n_lo, n_hi = self.noise_std
        _require(0 <= n_lo <= n_hi <= 1, "augment.noise_std", "must be [low, high] within [0, 1]")
        for key in (
            "blur_prob",
            "jpeg_prob",
            "noise_prob",
            "random_stain_prob",
            "randconv_prob",
            "grayscale_prob",
            "fda_prob",
            "texture_prob",
        ):
            _require(0 <= getattr(self, key) <= 1, f"augment.{key}", "must be in [0, 1]")
        _require(0 < self.fda_beta <= 0.5, "augment.fda_beta", "must be in (0, 0.5]")
        unknown = sorted(set(self.fda_stains) - set(STAIN_NAMES))
        _require(
            not unknown,
            "augment.fda_stains",
            f"must name stains of {list(STAIN_NAMES)}, got {unknown}",
        )
        _require(self.hed_sigma >= 0, "augment.hed_sigma", "must be >= 0")
        _require(self.stain_strength >= 0, "augment.stain_strength", "must be >= 0")
        _require(self.brightness_contrast >= 0, "augment.brightness_contrast", "must be >= 0")
        _require(self.hue_shift >= 0, "augment.hue_shift", "must be >= 0")


@dataclass
class LossWeights:
    # Diagnosis is the main task.
    classification: float = 1.0
    # Stain recognition is easy; a small weight is enough.
    stain: float = 0.2
    # Deposit map (pixel labels); skipped for samples without a mask.
    deposit: float = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _require(getattr(self, f.name) >= 0, f"train.loss_weights.{f.name}", "must be >= 0")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    # AdamW peak learning rate, reached after warm-up, then cosine decay.
    lr: float = 1e-3
    weight_decay: float = 0.05
    # Linear warm-up length in epochs (fractions allowed) before the cosine decay.
    warmup_epochs: float = 1.0
    # Clip the global gradient norm; 0 disables.
    grad_clip: float = 1.0
    # auto = bf16 autocast where the hardware has it (AMX CPUs, CUDA), else fp32.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # NHWC memory layout: faster convolutions with oneDNN and cuDNN.
    channels_last: bool = True
    # Counter class imbalance: a weighted sampler, loss weights, or nothing.
    balance: Literal["sampler", "loss", "none"] = "sampler"
    loss_weights: LossWeights = field(default_factory=LossWeights)
    # auto = CUDA when available (the local rank's GPU under torchrun), else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Also save a resumable checkpoint every N optimizer steps (0 = epoch ends only).
    checkpoint_every_steps: int = 0
    # Limit steps per epoch (0 = full epoch); for smoke tests.
    max_steps_per_epoch: int = 0
    # Exponential moving average of the weights (timm ModelEmaV3); 0 turns it off.
    # Validation, best/last checkpoints and calibration use the averaged weights,
    # which are steadier than the last step's. Short runs want ~0.99 (an average
    # over ~100 steps), long GPU runs 0.999-0.9998.
    ema_decay: float = 0.0
    # The pretrained encoder's learning rate as a fraction of train.lr (the
    # decoder and heads, new layers, get train.lr itself). Below 1 the ImageNet
    # features are adjusted rather than overwritten (discriminative fine-tuning;
    # Kumar et al. 2022 show full fine-tuning at one rate distorts pretrained
    # features and loses out-of-distribution accuracy).
    encoder_lr_scale: float = 1.0
    # Linear probing, then fine-tuning (LP-FT, Kumar et al. 2022): for this many
    # epochs the pretrained encoder is frozen (learning rate 0, batch-norm
    # statistics kept) while the new decoder and heads learn on its ImageNet
    # features; then the encoder joins in, with a warm-up of its own. Randomly
    # initialised heads otherwise send large gradients into the encoder early
    # and distort the features that transfer. 0 (default) fine-tunes all at once.
    freeze_encoder_epochs: int = 0
    # Keep the pretrained encoder's batch-norm running statistics (its ImageNet
    # means and variances) for the whole run: its batch-norm layers stay in eval
    # mode while their scales and shifts still learn. Fine-tuning otherwise
    # re-estimates them on the training patches, here synthetic ones, so that
    # features of real tissue are normalised by statistics of the generator.
    freeze_bn_stats: bool = False
    # MixStyle (Zhou et al. 2021; training/mixstyle.py): with this probability a
    # batch's per-channel feature means and deviations at each level of
    # mixstyle_levels are mixed with another patch's of the same stain, so the
    # classes cannot rest on a rendering style. Training only; 0 turns it off.
    mixstyle_prob: float = 0.0
    # Beta(alpha, alpha) of the mixing weight (the paper's 0.1).
    mixstyle_alpha: float = 0.1
    # Encoder feature levels (0 = finest) after which the statistics are mixed.
    mixstyle_levels: list[int] = field(default_factory=lambda: [0, 1])

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(self.lr > 0, "train.lr", "must be > 0 (for example 1e-3)")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        _require(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0")
        _require(self.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", "must be >= 0")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1) (0 turns it off)")
        _require(
            0 < self.encoder_lr_scale <= 1,
            "train.encoder_lr_scale",
            "must be in (0, 1] (1 = the encoder learns at train.lr like the heads)",
        )
        _require(
            0 <= self.freeze_encoder_epochs < self.epochs,
            "train.freeze_encoder_epochs",
            f"must be in [0, train.epochs) = [0, {self.epochs}) (0 = never frozen)",
        )
        _require(0 <= self.mixstyle_prob <= 1, "train.mixstyle_prob", "must be in [0, 1]")
        _require(self.mixstyle_alpha > 0, "train.mixstyle_alpha", "must be > 0 (for example 0.1)")
        _require(
            all(level >= 0 for level in self.mixstyle_levels),
            "train.mixstyle_levels",
            "must list feature levels >= 0 (0 = the finest), for example [0, 1]",
        )


@dataclass
class InferenceConfig:
    # Below this calibrated top probability a patch is called "indeterminate".
    indeterminate_threshold: float = 0.6
    # Below this fraction of tissue pixels a patch is "no_tissue", not classified.
    min_tissue_fraction: float = 0.1
    # Test-time augmentation: "d4" averages the outputs over the 8 rotations and
    # reflections of each patch (8x the compute, about +1 point of macro-F1 on
    # the demo); the temperature is fitted in this mode. Override per run with
    # `calcinosis predict/evaluate --tta`.
    tta: Literal["none", "d4"] = "none"

    def __post_init__(self) -> None:
        _require(
            0 <= self.indeterminate_threshold <= 1,
            "inference.indeterminate_threshold",
            "must be in [0, 1]",
        )
        _require(
            0 <= self.min_tissue_fraction <= 1, "inference.min_tissue_fraction", "must be in [0, 1]"
        )


@dataclass
class Config:
    # Seeds Python, NumPy and torch; with the same seed a run is repeatable.
    seed: int = 0
    # Run folder: checkpoints, metrics.csv, config.yaml, report.
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    # Fit a softmax temperature on the validation split after training.
    calibrate: bool = True
    # After training, replace the best checkpoint's class head by a logistic
    # regression on the deposit map's statistics alone, fitted on the training
    # split (training/readout.py): the diagnosis is then what the decoder
    # segmented. Meant for data with deposit masks (a mask column, or synthetic).
    deposit_readout: bool = False

    def __post_init__(self) -> None:
        if self.model.class_head != "features+deposits":
            raise ConfigError(
                f"config key 'model.class_head' is {self.model.class_head!r}: a network trains "
                "with the class head 'features+deposits'; to diagnose from the deposit map, "
                "set deposit_readout: true (the readout is fitted after training)"
            )


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {what}")


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply ``key=value`` overrides, validate, return it."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (pass an existing YAML file)")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}"
            )
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw, source=source)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (for example train.lr=3e-4)")
    dotted, _, text = item.partition("=")
    keys = dotted.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for key in keys[:-1]:
        nxt = node.get(key)
        if nxt is None:
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{item}': '{key}' is not a section")
        node = nxt
    node[keys[-1]] = value


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a :class:`Config` from plain data (YAML or a checkpoint)."""
    try:
        return _build(Config, raw, prefix="")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config (tuples become lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically: a resumed DDP run's other ranks read the file
    (to check the config) while rank 0 rewrites it, and must never see it half written."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config key '{prefix.rstrip('.') or '<top>'}' must be a section (mapping), got {raw!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            valid = sorted(fields)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'.{hint} Valid keys here: {', '.join(valid)}"
            )
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key '{key}' has an invalid value")
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(map(str, args))}; got {value!r}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(
                    f"config key '{key}' must be a list of {len(args)} values, got {value!r}"
                )
            return tuple(
                _coerce(a, v, f"{key}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" as a string; accept plain numeric text.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    return value
