"""Tests for calcinosis.model: network, factory, init weights, checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from calcinosis.model import (
    CHECKPOINT_FORMAT_VERSION,
    CalcinosisNet,
    CheckpointError,
    ConfigError,
    ModelConfig,
    create_model,
    load_checkpoint,
    load_init_weights,
    read_checkpoint_metadata,
    save_checkpoint,
)
from calcinosis.model import checkpoint as checkpoint_module

# resnet18 is the default; convnext_atto is a non-resnet whose feature pyramid
# starts at stride 4 and whose features_only module names are flattened.
BACKBONES = ["resnet18", "convnext_atto"]
SIZE = 64
OUTPUT_KEYS = {"class_logits", "stain_logits", "deposit_logits"}


def _build(backbone: str, **kwargs) -> CalcinosisNet:
    torch.manual_seed(0)
    return create_model(ModelConfig(backbone=backbone, **kwargs))


@pytest.fixture(scope="module")
def built_models() -> dict[str, CalcinosisNet]:
    """One model per backbone, in eval mode; tests that change weights copy it."""
    return {name: _build(name).eval() for name in BACKBONES}


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _metadata() -> dict:
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "input_size": SIZE,
        "temperature": 1.5,
        "epoch": 3,
        "metrics": {"macro_f1": 0.75},
    }


# ---------------------------------------------------------------- network


@pytest.mark.parametrize("backbone", BACKBONES)
def test_forward_shapes(built_models, batch, backbone):
    model = built_models[backbone]
    cfg = model.config
    with torch.no_grad():
        out = model(batch)
    assert set(out) == OUTPUT_KEYS
    assert out["class_logits"].shape == (2, len(cfg.class_names))
    assert out["stain_logits"].shape == (2, len(cfg.stain_names))
    assert out["deposit_logits"].shape == (2, len(cfg.deposit_labels), SIZE, SIZE)
    # A non-square input: the deposit map follows the input size exactly.
    with torch.no_grad():
        rect = model(torch.randn(1, 3, 96, 64))["deposit_logits"]
    assert rect.shape == (1, len(cfg.deposit_labels), 96, 64)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_backward_gives_finite_grads_in_every_part(built_models, batch, backbone):
    model = copy.deepcopy(built_models[backbone]).train()
    out = model(batch)
    labels = torch.tensor([0, 1])
    mask = torch.randint(0, 5, (2, SIZE, SIZE), generator=torch.Generator().manual_seed(2))
    loss = (
        F.cross_entropy(out["class_logits"], labels)
        + F.cross_entropy(out["stain_logits"], labels)
        + F.cross_entropy(out["deposit_logits"], mask)
    )
    loss.backward()
    for part in ("encoder", "decoder", "segmentation_head", "classification_head", "stain_head"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert any(g.abs().sum() > 0 for g in grads), part


def test_bf16_autocast_on_cpu(built_models, batch):
    model = built_models["resnet18"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out["deposit_logits"].shape == (2, 5, SIZE, SIZE)
    for value in out.values():
        assert value.dtype == torch.bfloat16
        assert torch.isfinite(value.float()).all()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_channels_last_matches_contiguous(built_models, batch, backbone):
    model = built_models[backbone]
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(batch)
        out = fast(batch.contiguous(memory_format=torch.channels_last))
    for key in OUTPUT_KEYS:
        torch.testing.assert_close(out[key], ref[key], atol=1e-4, rtol=1e-4)


def test_predict_runs_in_eval_without_autograd(batch):
    model = _build("resnet18").train()
    out = model.predict(batch)
    assert not model.training
    assert set(out) == OUTPUT_KEYS
    assert all(torch.is_inference(v) and not v.requires_grad for v in out.values())


def test_data_config_travels_with_model(built_models):
    cfg = built_models["resnet18"].data_config
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert cfg["std"] == pytest.approx((0.229, 0.224, 0.225))
    assert isinstance(cfg["mean"], tuple) and isinstance(cfg["std"], tuple)
    assert cfg["input_size"][0] == 3


def test_decoder_is_cheap_next_to_encoder(built_models):
    # The deposit decoder and heads must not dominate the parameter budget.
    model = built_models["resnet18"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    extra = count(model) - count(model.encoder)
    assert extra < 0.05 * count(model.encoder)


def test_unknown_backbone_is_a_config_error_with_hints():
    with pytest.raises(ConfigError) as info:
        create_model(ModelConfig(backbone="resnett18"))
    message = str(info.value)
    assert "resnett18" in message
    assert "list_models" in message
    assert "resnet18" in message  # a close match is suggested


# ---------------------------------------------------------------- checkpoints


def test_save_load_round_trip(built_models, batch, tmp_path):
    model = built_models["resnet18"]
    path = save_checkpoint(tmp_path / "best.safetensors", model, _metadata())
    assert path == tmp_path / "best.safetensors"

    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    with torch.no_grad():
        ref, out = model(batch), loaded(batch)
    for key in OUTPUT_KEYS:
        assert torch.equal(out[key], ref[key]), key
    assert meta["temperature"] == 1.5 and meta["metrics"] == {"macro_f1": 0.75}
    assert meta["model"]["backbone"] == "resnet18"
    assert meta["class_names"] == list(model.config.class_names)
    assert read_checkpoint_metadata(path) == meta
    assert loaded.config == model.config
    assert loaded.data_config["mean"] == model.data_config["mean"]


def test_deposit_only_class_head_reads_the_deposit_map_alone(batch, tmp_path):
    """model.class_head: deposits: the diagnosis is a function of the deposit logits only.

    Changing the deepest features while holding the deposit logits fixed must not
    move the class logits (it does with the default head), and the head's width is
    the deposit statistics' (mean and max per label); the choice survives a
    checkpoint round trip.
    """
    model = _build("resnet18", class_head="deposits").eval()
    head = model.classification_head
    labels = len(model.config.deposit_labels)
    assert head.fc.in_features == 2 * labels
    deepest = torch.randn(2, 512, 2, 2, generator=torch.Generator().manual_seed(3))
    deposit = torch.randn(2, labels, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(head(deepest, deposit), head(5 * deepest + 1, deposit))
        assert not torch.equal(head(deepest, deposit), head(deepest, deposit.flip(1)))
    default = _build("resnet18").eval().classification_head
    with torch.no_grad():
        assert not torch.allclose(default(deepest, deposit), default(5 * deepest + 1, deposit))
    path = save_checkpoint(tmp_path / "d.safetensors", model, _metadata())
    loaded, meta = load_checkpoint(path)
    assert meta["model"]["class_head"] == "deposits"
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch))


def test_unknown_class_head_is_a_config_error():
    with pytest.raises(ConfigError, match="model.class_head must be one of features"):
        ModelConfig(class_head="pixels")


def test_round_trip_of_channels_last_model(built_models, batch, tmp_path):
    # channels_last weights are not contiguous; safetensors needs them to be.
    model = copy.deepcopy(built_models["resnet18"]).to(memory_format=torch.channels_last)
    path = save_checkpoint(tmp_path / "cl.safetensors", model, _metadata())
    loaded, _ = load_checkpoint(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), built_models["resnet18"](batch))


def test_checkpoint_file_is_pure_safetensors(built_models, tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", built_models["resnet18"], _metadata())
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    meta = json.loads(header["__metadata__"]["calcinosis"])
    assert meta["format_version"] == CHECKPOINT_FORMAT_VERSION
    # Header plus raw tensor bytes account for the whole file: no room for a pickle.
    data_end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert len(raw) == 8 + length + data_end


def test_failed_save_keeps_previous_checkpoint(built_models, tmp_path, monkeypatch):
    model = built_models["resnet18"]
    path = save_checkpoint(tmp_path / "last.safetensors", model, {**_metadata(), "epoch": 1})
    before = path.read_bytes()

    def crash(tensors, tmp, header):
        tmp.write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # a kill arrives mid-write

    monkeypatch.setattr(checkpoint_module, "_write_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, {**_metadata(), "epoch": 2})
    assert path.read_bytes() == before
    assert read_checkpoint_metadata(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_missing_key_is_named(built_models, tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", built_models["resnet18"], _metadata())
    header = checkpoint_module.read_safetensors_header(path)["__metadata__"]
    tensors = safetensors.torch.load_file(path)
    del tensors["classification_head.fc.weight"]
    tensors["stain_head.3.bias"] = torch.zeros(7)
    broken = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(tensors, broken, metadata=header)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(broken)
    message = str(info.value)
    assert "broken.safetensors" in message
    assert "classification_head.fc.weight" in message
    assert "stain_head.3.bias" in message and "(7,)" in message


def test_unreadable_checkpoints_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nothing_here.safetensors"):
        load_checkpoint(tmp_path / "nothing_here.safetensors")

    pickled = tmp_path / "weights.safetensors"
    torch.save({"a": torch.zeros(2)}, pickled)
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        read_checkpoint_metadata(pickled)

    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a calcinosis checkpoint"):
        load_checkpoint(plain)


def test_load_ignores_stored_init_weights(tmp_path):
    init = tmp_path / "backbone.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet18").state_dict(), init)
    model = create_model(ModelConfig(backbone="resnet18", init_weights=str(init)))
    path = save_checkpoint(tmp_path / "c.safetensors", model, _metadata())
    init.unlink()  # the machine that loads the checkpoint need not have it
    loaded, meta = load_checkpoint(path)
    assert meta["model"]["init_weights"] == str(init)
    assert loaded.config.init_weights is None


# ---------------------------------------------------------------- init weights


def _timm_classifier_state(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return timm.create_model(name, pretrained=False).state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_init_weights_from_timm_classifier(tmp_path, suffix):
    state = _timm_classifier_state("resnet18")
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:  # a DDP-style prefix and a training-script wrapper, as found in the wild
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)

    model = _build("resnet18")
    result = load_init_weights(model, path)
    encoder = model.encoder.state_dict()
    assert set(encoder) == set(state) - {"fc.weight", "fc.bias"}
    for key, value in encoder.items():
        assert torch.equal(value, state[key]), key
    assert result["unexpected"] == []
    assert result["missing"] and not any(k.startswith("encoder.") for k in result["missing"])


def test_init_weights_adapt_rgb_stem_to_one_channel(tmp_path):
    state = _timm_classifier_state("resnet18")
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(state, path)
    model = _build("resnet18", in_chans=1)
    load_init_weights(model, path)
    # timm's rule for grey input: the RGB filters summed over colour.
    expected = state["conv1.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(model.encoder.conv1.weight, expected)
    assert torch.equal(model.encoder.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_init_weights_maps_flattened_names(tmp_path):
    # convnext's ``stem.0`` is ``stem_0`` in the features_only encoder.
    state = _timm_classifier_state("convnext_atto")
    path = tmp_path / "convnext.safetensors"
    safetensors.torch.save_file(state, path)
    model = _build("convnext_atto")
    load_init_weights(model, path)
    assert torch.equal(model.encoder.stem_0.weight, state["stem.0.weight"])
    assert torch.equal(
        model.encoder.stages_3.blocks[1].mlp.fc2.weight, state["stages.3.blocks.1.mlp.fc2.weight"]
    )


def test_init_weights_from_own_checkpoint_with_other_classes(built_models, tmp_path):
    source = built_models["resnet18"]
    path = save_checkpoint(tmp_path / "c.safetensors", source, _metadata())
    model = _build("resnet18", class_names=["calcinosis_cutis", "other"])
    before = model.classification_head.fc.weight.clone()
    result = load_init_weights(model, path)
    assert torch.equal(model.encoder.layer4[1].conv2.weight, source.encoder.layer4[1].conv2.weight)
    assert torch.equal(model.stain_head[3].weight, source.stain_head[3].weight)
    assert torch.equal(model.decoder.fuse[0].weight, source.decoder.fuse[0].weight)
    assert torch.equal(model.classification_head.fc.weight, before)
    assert set(result["missing"]) == {
        "classification_head.fc.weight",
        "classification_head.fc.bias",
    }


@pytest.mark.parametrize(
    ("other", "expected"),
    [("mobilenetv3_small_050", "only 0 of"), ("resnet34", "lacks"), ("resnet10t", "other shapes")],
)
def test_init_weights_from_other_architecture_is_refused(tmp_path, other, expected):
    path = tmp_path / f"{other}.safetensors"
    safetensors.torch.save_file(_timm_classifier_state(other), path)
    model = _build("resnet18")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError) as info:
        load_init_weights(model, path)
    message = str(info.value)
    assert path.name in message and "resnet18" in message and expected in message
    assert "(" in message  # example keys come with their shapes
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_init_weights_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="absent.pth"):
        create_model(ModelConfig(init_weights=str(tmp_path / "absent.pth")))
