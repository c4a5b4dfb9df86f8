"""Typed config: loading, validation messages, key=value overrides, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from calcinosis.model import ConfigError
from calcinosis.training.config import (
    Config,
    apply_override,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, data: object, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.train.lr > 0 and cfg.model.backbone and cfg.data.source == "synthetic"


def test_unknown_key_names_it_and_suggests_the_spelling(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*'train\.lr'"):
        load_config(write(tmp_path, {"train": {"lrr": 0.1}}))
    with pytest.raises(ConfigError, match=r"'data\.synthetic\.n_per_class'.*n_per_class_stain"):
        load_config(write(tmp_path, {"data": {"synthetic": {"n_per_class": 3}}}))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"epochs": "ten"}}, r"train\.epochs' must be an integer"),
        ({"train": {"epochs": 2.5}}, r"train\.epochs' must be an integer"),
        ({"train": {"channels_last": "yes"}}, r"train\.channels_last' must be true or false"),
        ({"train": {"lr": "fast"}}, r"train\.lr' must be a number"),
        ({"train": {"precision": "fp16"}}, r"train\.precision' must be one of auto, bf16, fp32"),
        ({"inference": {"tta": "flips"}}, r"inference\.tta' must be one of none, d4; got 'flips'"),
        ({"augment": {"scale": [0.9]}}, r"augment\.scale' must be a list of 2 values"),
        ({"train": 3}, r"'train' must be a section"),
        ({"seed": None, "model": {"backbone": 18}}, r"model\.backbone' must be a string"),
    ],
)
def test_wrong_types_name_the_key(tmp_path: Path, raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, raw))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-0.001", r"train\.lr' must be > 0"),
        ("train.lr=0", r"train\.lr' must be > 0"),
        ("train.epochs=0", r"train\.epochs' must be >= 1"),
        ("data.val_fraction=1.5", r"data\.val_fraction' must be in \[0, 1\)"),
        ("data.image_size=16", r"data\.image_size' must be >= 32"),
        ("augment.scale=[1.2, 0.8]", r"augment\.scale' must be \[low, high\]"),
        ("augment.blur_sigma=[2.0, 1.0]", r"augment\.blur_sigma' must be \[low, high\]"),
        ("augment.jpeg_quality=[0, 95]", r"augment\.jpeg_quality' must be \[low, high\]"),
        ("augment.noise_std=[0.1, 0.05]", r"augment\.noise_std' must be \[low, high\]"),
        ("augment.noise_prob=2", r"augment\.noise_prob' must be in \[0, 1\]"),
        ("model.drop_rate=1.0", r"model\.drop_rate must be in \[0, 1\)"),
        ("train.ema_decay=1.0", r"train\.ema_decay' must be in \[0, 1\)"),
        ("train.encoder_lr_scale=0", r"train\.encoder_lr_scale' must be in \(0, 1\]"),
        ("train.encoder_lr_scale=2", r"train\.encoder_lr_scale' must be in \(0, 1\]"),
        ("train.freeze_encoder_epochs=-1", r"train\.freeze_encoder_epochs' must be in \[0, "),
        ("train.mixstyle_prob=1.5", r"train\.mixstyle_prob' must be in \[0, 1\]"),
        ("train.mixstyle_alpha=0", r"train\.mixstyle_alpha' must be > 0"),
        ("train.mixstyle_levels=[-1]", r"train\.mixstyle_levels' must list feature levels"),
    ],
)
def test_out_of_range_values_are_rejected(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_manifest_source_requires_a_manifest() -> None:
    with pytest.raises(
        ConfigError, match=r"data\.manifest' is required when data\.source=manifest"
    ):
        load_config(None, ["data.source=manifest"])
    with pytest.raises(ConfigError, match=r"data\.root' is required when data\.source=folders"):
        load_config(None, ["data.source=folders"])
    cfg = load_config(None, ["data.source=manifest", "data.manifest=some/manifest.csv"])
    assert cfg.data.manifest == "some/manifest.csv"


def test_overrides_parse_values_as_yaml() -> None:
    cfg = load_config(
        None,
        [
            "train.lr=3e-4",
            "data.synthetic.n_per_class_stain=7",
            "train.channels_last=false",
            "augment.scale=[0.9, 1.1]",
            "model.init_weights=null",
            "output_dir=runs/x",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.synthetic.n_per_class_stain == 7
    assert cfg.train.channels_last is False
    assert cfg.augment.scale == (0.9, 1.1)
    assert cfg.model.init_weights is None and cfg.output_dir == "runs/x"


def test_override_beats_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"lr": 0.1, "epochs": 3}})
    cfg = load_config(path, ["train.lr=0.01"])
    assert cfg.train.lr == pytest.approx(0.01) and cfg.train.epochs == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr", r"must look like key=value"),
        ("seed.value=1", r"'seed' must be an integer"),
        ("train.nope=1", r"unknown config key 'train\.nope'"),
        ("data.cache_mb=-1", r"data\.cache_mb.*must be >= 0"),
    ],
)
def test_bad_overrides_are_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_override_into_a_plain_value_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'seed' is not a section"):
        load_config(write(tmp_path, {"seed": 3}), ["seed.value=1"])


def test_apply_override_builds_missing_sections() -> None:
    raw: dict = {}
    apply_override(raw, "train.loss_weights.stain=0.5")
    assert raw == {"train": {"loss_weights": {"stain": 0.5}}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "top level must be a mapping"),
        ("just a string\n", "top level must be a mapping"),
        ("train: {lr: [1, 2\n", "not valid YAML"),
    ],
)
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=2e-4", "augment.scale=[0.8, 1.25]", "seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.output_dir.startswith("runs/")
    # every key in the file is one the config knows (no silently ignored typos)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(raw) <= set(config_to_dict(cfg))


def test_expected_configs_are_shipped() -> None:
    assert {p.name for p in SHIPPED} >= {"ci.yaml", "demo.yaml", "default.yaml", "my_data.yaml"}


def _makefile_variables() -> dict[str, str]:
    """The `NAME := value` assignments of the Makefile, as written."""
    variables = {}
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        name, sep, value = line.partition(":=")
        if sep and name.strip().isidentifier():
            variables[name.strip()] = value.strip()
    return variables


def test_makefile_demo_data_matches_demo_config() -> None:
    # `make demo` synthesises its data with DEMO_SIZE/DEMO_MPP and trains with
    # configs/demo.yaml; if they drift apart the model is trained at one
    # resolution and told it is another.
    variables = _makefile_variables()
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert int(variables["DEMO_SIZE"]) == cfg.data.image_size
    assert float(variables["DEMO_MPP"]) == pytest.approx(cfg.data.mpp)
    assert "$(DEMO_SIZE)" in variables["SYNTH"] and "$(DEMO_MPP)" in variables["SYNTH"]


def test_save_config_replaces_the_file_rather_than_rewriting_it(tmp_path):
    """Ranks of a resumed DDP run read config.yaml while rank 0 rewrites it: the
    write must be a rename of a finished file (a new inode), never a truncate and
    refill that a reader can catch half done."""
    from calcinosis.training.config import config_from_dict, load_config, save_config

    path = tmp_path / "config.yaml"
    cfg = config_from_dict({"train": {"epochs": 3}})
    save_config(cfg, path)
    reader = path.open()  # a rank reading the old file keeps reading the old file
    before = path.stat().st_ino
    save_config(config_from_dict({"train": {"epochs": 4}}), path)
    assert path.stat().st_ino != before
    assert "epochs: 3" in reader.read()
    reader.close()
    assert load_config(path).train.epochs == 4
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left
