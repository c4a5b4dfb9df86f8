"""MixStyle: feature statistics mixed within a stain, in training only, weights untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_train_cfg

import calcinosis.training.train as T
from calcinosis.model import ConfigError, create_model, load_checkpoint
from calcinosis.model.config import ModelConfig
from calcinosis.training.mixstyle import MixStyle, attach_mixstyle, shuffle_within_groups


def test_shuffle_within_groups_is_a_permutation_that_keeps_each_group() -> None:
    torch.manual_seed(0)
    groups = torch.tensor([0, 1, 0, 2, 1, 0, -100, 2, 1, 0])
    for _ in range(20):
        perm = shuffle_within_groups(groups)
        assert sorted(perm.tolist()) == list(range(len(groups)))
        assert torch.equal(groups[perm], groups)


def test_mix_keeps_the_normalised_map_and_moves_the_statistics_within_the_group() -> None:
    torch.manual_seed(0)
    # group 0: means near 0, deviations near 1; group 1: means near 100, deviations near 10
    g0 = torch.randn(4, 3, 8, 8)
    g1 = 100 + 10 * torch.randn(4, 3, 8, 8)
    x = torch.cat([g0, g1])
    mixer = MixStyle(prob=1.0, alpha=0.5)
    mixer.groups = torch.tensor([0] * 4 + [1] * 4)
    y = mixer.mix(x)
    assert y.shape == x.shape and y.dtype == x.dtype

    def standardise(t: torch.Tensor) -> torch.Tensor:
        mu = t.mean(dim=(2, 3), keepdim=True)
        return (t - mu) / (t.var(dim=(2, 3), keepdim=True) + 1e-6).sqrt()

    # the content (each channel's standardised map) is unchanged ...
    torch.testing.assert_close(standardise(y), standardise(x), atol=1e-3, rtol=1e-3)
    # ... the statistics are new, and each stays between those of its own group
    means = y.mean(dim=(2, 3))
    assert not torch.allclose(means, x.mean(dim=(2, 3)))
    assert means[:4].abs().max() < 1.0 and (means[4:] - 100).abs().max() < 10.0
    # without groups a batch mixes across them
    mixer.groups = None
    torch.manual_seed(1)
    across = mixer.mix(x).mean(dim=(2, 3))
    assert ((across[:4] > 5) | (across[4:] < 95)).any()


def test_hooks_act_in_training_only_and_leave_the_state_dict_alone() -> None:
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="resnet10t"))
    keys = list(model.state_dict())
    mixer, handles = attach_mixstyle(model.encoder, [0, 1], prob=1.0, alpha=0.1)
    assert len(handles) == 2 and list(model.state_dict()) == keys
    x = torch.randn(6, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        plain = model(x)["class_logits"]
        assert torch.equal(model(x)["class_logits"], plain)  # eval: the hooks do nothing
    model.train()
    with torch.no_grad():
        mixed = model(x)["class_logits"]
    for h in handles:
        h.remove()
    with torch.no_grad():
        unmixed = model(x)["class_logits"]
    assert not torch.allclose(mixed, unmixed)


def test_a_level_the_backbone_lacks_is_a_clear_error() -> None:
    model = create_model(ModelConfig(backbone="resnet10t"))
    with pytest.raises(ConfigError, match=r"train\.mixstyle_levels: level 9 does not exist"):
        attach_mixstyle(model.encoder, [9], prob=0.5, alpha=0.1)


def test_training_mixes_within_the_batch_stains_and_saves_plain_weights(
    tmp_path: Path, train_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[torch.Tensor | None] = []
    original = MixStyle.mix

    def counting_mix(self: MixStyle, x: torch.Tensor) -> torch.Tensor:
        calls.append(None if self.groups is None else self.groups.clone())
        return original(self, x)

    monkeypatch.setattr(MixStyle, "mix", counting_mix)
    out = tmp_path / "run"
    cfg = make_train_cfg(
        train_manifest, out, "train.max_steps_per_epoch=2", "train.mixstyle_prob=1.0"
    )
    T.train(cfg)
    # every training step mixes at each of the two default levels, and is told the stains
    steps = cfg.train.epochs * 2
    assert len(calls) == 2 * steps
    assert all(g is not None and g.min() >= 0 for g in calls)
    model, _ = load_checkpoint(out / "best.safetensors")
    assert not any(m._forward_hooks for m in model.modules())
