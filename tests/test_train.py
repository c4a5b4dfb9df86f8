"""Training loop: run folder, resume (clean and after a kill), NaN, DDP, evaluation.

Runs use the committed 64 px fixture set (5 classes x 3 stains x 2 patches),
timm's resnet10t and one or two optimizer steps per epoch: seconds each.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import CI_CONFIG, make_train_cfg

import calcinosis.training.train as T
from calcinosis.model import (
    ConfigError,
    TrainingError,
    load_checkpoint,
    read_checkpoint_metadata,
)
from calcinosis.model.checkpoint import load_safetensors
from calcinosis.model.fileio import atomic_write_bytes
from calcinosis.training.config import config_to_dict, load_config

METADATA_KEYS = {
    "format_version", "package_version", "model", "config", "class_names", "stain_names",
    "deposit_labels", "input_size", "mean", "std", "mpp", "temperature",
    "indeterminate_threshold", "min_tissue_fraction", "epoch", "metrics",
}  # fmt: skip
TIMING_COLUMNS = {"images_per_s", "seconds"}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=f"{k} differs")


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with open(run / T.METRICS_FILE, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def one_step_run(train_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "one_step"
    cfg = make_train_cfg(train_manifest, out, "train.max_steps_per_epoch=1")
    assert T.train(cfg) == out
    return out


# --------------------------------------------------------------------------- the run folder


def test_one_step_run_writes_complete_run_folder(one_step_run: Path, train_manifest: Path) -> None:
    run = one_step_run
    for name in ("config.yaml", "metrics.csv", "last.safetensors", "best.safetensors", "state.pt",
                 "calibration.json"):  # fmt: skip
        assert (run / name).is_file(), name

    saved = load_config(run / "config.yaml")
    assert saved.output_dir == str(run)
    assert saved.data.manifest == str(train_manifest)

    rows = list(csv.DictReader(open(run / "metrics.csv", newline="")))
    assert len(rows) == 1 and list(rows[0]) == list(T.METRICS_COLUMNS)
    assert rows[0]["epoch"] == "1"
    assert np.isfinite(float(rows[0]["train_loss"])) and float(rows[0]["images_per_s"]) > 0

    cal = json.loads((run / "calibration.json").read_text())
    for name in ("best.safetensors", "last.safetensors"):
        meta = read_checkpoint_metadata(run / name)
        assert METADATA_KEYS <= set(meta)
        assert meta["input_size"] == 64 and meta["mpp"] == 0.5
        assert meta["epoch"] == 1 and meta["model"]["backbone"] == "resnet10t"
        assert meta["config"] == config_to_dict(saved)
        assert meta["class_names"][0] == "calcinosis_cutis" and len(meta["stain_names"]) == 3
        assert meta["temperature"] == pytest.approx(cal["temperature"])
        assert "val_macro_f1" in meta["metrics"]

    state = torch.load(run / "state.pt", map_location="cpu", weights_only=True)
    assert state["run"]["epoch"] == 1 and state["run"]["global_step"] == 1
    model, _ = load_checkpoint(run / "last.safetensors")
    out = model(torch.zeros(1, 3, 64, 64))
    assert out["deposit_logits"].shape == (1, 5, 64, 64)


def test_deposit_readout_diagnoses_from_the_deposit_map(
    train_manifest: Path, tmp_path: Path
) -> None:
    """deposit_readout: best.safetensors gets the readout head, fitted and calibrated.

    Its class logits then follow the deposit statistics alone (the deepest
    features do not move them), the head's inputs are standardised by the
    training split's statistics, calibration is fitted on it, and
    last.safetensors keeps the trained head as the resume point.
    """
    from calcinosis.model.network import deposit_statistics

    out = tmp_path / "readout"
    cfg = make_train_cfg(train_manifest, out, "train.max_steps_per_epoch=1", "deposit_readout=true")
    T.train(cfg)
    best, meta = load_checkpoint(out / "best.safetensors")
    last, last_meta = load_checkpoint(out / "last.safetensors")
    assert meta["model"]["class_head"] == "deposits"
    assert last_meta["model"]["class_head"] == "features+deposits"
    info = meta["deposit_readout"]
    assert info["fitted_on"] == "train" and info["samples"] == 20  # the training split
    cal = json.loads((out / "calibration.json").read_text())
    assert meta["temperature"] == pytest.approx(cal["temperature"])
    head = best.classification_head
    assert head.fc.in_features == 2 * len(best.config.deposit_labels)
    # the readout's standardisation is the training split's statistics, not batch norm's init
    assert not torch.allclose(head.norm.running_mean, torch.zeros_like(head.norm.running_mean))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = best.encoder(x)
        deposit = best.deposit_map(features)
        expected = head.fc(head.norm(deposit_statistics(deposit)))
        torch.testing.assert_close(best(x)["class_logits"], expected)
        # the trunk is the trained one: same deposit maps as last's where weights agree
        for key, value in last.state_dict().items():
            if not key.startswith("classification_head."):
                torch.testing.assert_close(best.state_dict()[key], value)


def test_deposit_readout_without_masks_is_refused_before_training(
    train_manifest: Path, tmp_path: Path
) -> None:
    rows = list(csv.DictReader(open(train_manifest, newline="")))
    manifest = tmp_path / "no_masks.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "stain", "split"])
        for r in rows:
            w.writerow([str(train_manifest.parent / r["path"]), r["label"], r["stain"], r["split"]])
    cfg = make_train_cfg(manifest, tmp_path / "run", "deposit_readout=true")
    with pytest.raises(ConfigError, match="none of the 20 training patches has a deposit mask"):
        T.train(cfg)
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_class_head_is_not_a_training_key(train_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="deposit_readout: true"):
        make_train_cfg(train_manifest, tmp_path / "x", "model.class_head=deposits")


def test_existing_run_needs_resume(one_step_run: Path, train_manifest: Path) -> None:
    cfg = make_train_cfg(train_manifest, one_step_run, "train.max_steps_per_epoch=1")
    with pytest.raises(ConfigError, match="--resume"):
        T.train(cfg)


def test_resume_rejects_a_changed_config(one_step_run: Path, train_manifest: Path) -> None:
    cfg = make_train_cfg(
        train_manifest, one_step_run, "train.max_steps_per_epoch=1", "train.lr=0.5"
    )
    with pytest.raises(ConfigError, match=r"train\.lr"):
        T.train(cfg, resume=True)


def test_resume_with_nothing_to_resume(tmp_path: Path, train_manifest: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to resume"):
        T.train(make_train_cfg(train_manifest, tmp_path / "empty"), resume=True)


# --------------------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def straight(train_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch run, the reference for the resumed ones."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    T.train(make_train_cfg(train_manifest, out, "train.epochs=2"))
    return out


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, phase: str, n: int) -> None:
    """Send ourselves SIGINT (a real Ctrl-C) in the n-th loss computation of a phase."""
    original = T.MultiTaskLoss.forward
    calls = {"train": 0, "val": 0}

    def forward(self, out, batch):
        key = "train" if torch.is_grad_enabled() else "val"
        calls[key] += 1
        if key == phase and calls[key] == n:
            signal.raise_signal(signal.SIGINT)
        return original(self, out, batch)

    monkeypatch.setattr(T.MultiTaskLoss, "forward", forward)


def _train_until_ctrl_c(cfg, monkeypatch: pytest.MonkeyPatch, phase: str, n: int) -> None:
    """Train ``cfg`` until a Ctrl-C in the n-th loss computation of ``phase`` stops it."""
    with monkeypatch.context() as m:
        _interrupt_at(m, phase, n)
        with pytest.raises(KeyboardInterrupt):
            T.train(cfg)


@pytest.mark.parametrize(
    ("phase", "n", "saved_at"),
    [("train", 3, (1, 1, 3)), ("train", 2, (0, 2, 2)), ("val", 1, (1, 0, 2))],
    ids=["mid-epoch", "last-step", "validation"],
)
def test_ctrl_c_then_resume_matches_uninterrupted_run(
    phase: str,
    n: int,
    saved_at: tuple[int, int, int],
    straight: Path,
    tmp_path: Path,
    train_manifest: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2 epochs of 2 steps; the run stops at a step boundary and saves exactly there.
    resumed = tmp_path / "resumed"
    cfg = make_train_cfg(train_manifest, resumed, "train.epochs=2")
    _train_until_ctrl_c(cfg, monkeypatch, phase, n)
    run = torch.load(resumed / "state.pt", weights_only=True)["run"]
    assert (run["epoch"], run["step_in_epoch"], run["global_step"]) == saved_at

    T.train(cfg, resume=True)
    assert_same_weights(straight / "last.safetensors", resumed / "last.safetensors")
    assert_same_weights(straight / "best.safetensors", resumed / "best.safetensors")
    assert metrics_rows(straight) == metrics_rows(resumed)
    assert read_checkpoint_metadata(resumed / "last.safetensors")["epoch"] == 2


def test_weight_average_is_exported_and_resumes_exactly(
    tmp_path: Path, train_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With train.ema_decay the checkpoints hold the averaged weights, not the
    # last step's; Ctrl-C mid-epoch and --resume must give the same average.
    straight = tmp_path / "straight"
    T.train(make_train_cfg(train_manifest, straight, "train.epochs=2", "train.ema_decay=0.9"))
    state = torch.load(straight / "state.pt", weights_only=True)
    last = load_safetensors(straight / "last.safetensors")
    assert all(torch.equal(last[k], v) for k, v in state["ema"].items() if k in last)
    assert any(not torch.equal(last[k], v) for k, v in state["model"].items() if k in last)

    resumed = tmp_path / "resumed"
    cfg = make_train_cfg(train_manifest, resumed, "train.epochs=2", "train.ema_decay=0.9")
    _train_until_ctrl_c(cfg, monkeypatch, "train", 3)
    T.train(cfg, resume=True)
    assert_same_weights(straight / "last.safetensors", resumed / "last.safetensors")
    assert_same_weights(straight / "best.safetensors", resumed / "best.safetensors")
    assert metrics_rows(straight) == metrics_rows(resumed)


def test_dropout_resumes_exactly(
    tmp_path: Path, train_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # configs/ci.yaml has no dropout; with it, the masks after --resume must be the
    # ones the uninterrupted run drew (each rank's generator state is in state.pt).
    extra = ("train.epochs=2", "model.drop_rate=0.5", "calibrate=false")
    straight = tmp_path / "straight"
    T.train(make_train_cfg(train_manifest, straight, *extra))
    state = torch.load(straight / "state.pt", weights_only=True)
    assert "scaler" not in state and len(state["rng"]) == 1  # one generator state per rank

    resumed = tmp_path / "resumed"
    cfg = make_train_cfg(train_manifest, resumed, *extra)
    _train_until_ctrl_c(cfg, monkeypatch, "train", 3)
    T.train(cfg, resume=True)
    assert_same_weights(straight / "last.safetensors", resumed / "last.safetensors")
    assert metrics_rows(straight) == metrics_rows(resumed)


def test_mixstyle_resumes_exactly(
    tmp_path: Path, train_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MixStyle draws whether to mix, the partners and the weights from torch's
    # global generator; after --resume it must draw what the uninterrupted run drew.
    extra = ("train.epochs=2", "train.mixstyle_prob=0.5", "calibrate=false")
    straight = tmp_path / "straight"
    T.train(make_train_cfg(train_manifest, straight, *extra))

    resumed = tmp_path / "resumed"
    cfg = make_train_cfg(train_manifest, resumed, *extra)
    _train_until_ctrl_c(cfg, monkeypatch, "train", 3)
    T.train(cfg, resume=True)
    assert_same_weights(straight / "last.safetensors", resumed / "last.safetensors")
    assert metrics_rows(straight) == metrics_rows(resumed)


def test_state_files_of_older_versions_still_resume(
    straight: Path, tmp_path: Path, train_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Older state.pt files carry an always-None "scaler" and rank 0's generator
    # state alone (not a list per rank); they still resume, and exactly.
    resumed = tmp_path / "resumed"
    cfg = make_train_cfg(train_manifest, resumed, "train.epochs=2")
    _train_until_ctrl_c(cfg, monkeypatch, "train", 3)
    state = torch.load(resumed / "state.pt", weights_only=True)
    state["scaler"] = None
    state["rng"] = state["rng"][0]
    torch.save(state, resumed / "state.pt")

    T.train(cfg, resume=True)
    assert_same_weights(straight / "last.safetensors", resumed / "last.safetensors")
    assert metrics_rows(straight) == metrics_rows(resumed)


def test_an_augmented_item_depends_on_its_key_alone(train_manifest: Path, tmp_path: Path) -> None:
    # The training set's item (index, seed) is the same whatever the process-wide
    # generators hold: nothing in the pipeline draws from them.
    from calcinosis.model.network import IMAGENET_MEAN, IMAGENET_STD
    from calcinosis.training.data import load_samples

    cfg = make_train_cfg(train_manifest, tmp_path / "run")
    data_config = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    loader, _, _, _ = T.build_loaders(cfg, load_samples(cfg), data_config, T.DistInfo())
    dataset = loader.dataset
    items = []
    for global_seed in (1, 2):
        T.seed_everything(global_seed)
        items.append([dataset[(3, 11)], dataset[(3, 12)], dataset[(3, 11)]])
    for a, b in zip(items[0], items[1], strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    first, other, again = items[0]
    assert torch.equal(first["image"], again["image"])
    assert not torch.equal(first["image"], other["image"])  # another seed, another augmentation


@pytest.mark.slow
def test_result_does_not_depend_on_workers_or_cache(tmp_path: Path, train_manifest: Path) -> None:
    runs = {}
    for workers, cache_mb in ((0, 64), (2, 64), (0, 0)):
        out = tmp_path / f"w{workers}c{cache_mb}"
        T.train(
            make_train_cfg(
                train_manifest,
                out,
                f"data.num_workers={workers}",
                f"data.cache_mb={cache_mb}",
                "calibrate=false",
            )
        )
        runs[workers, cache_mb] = out / "last.safetensors"
    assert_same_weights(runs[0, 64], runs[2, 64])
    assert_same_weights(runs[0, 64], runs[0, 0])


# --------------------------------------------------------------------------- failures


def test_nan_loss_stops_without_a_new_checkpoint(
    tmp_path: Path, train_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "nan"
    cfg = make_train_cfg(train_manifest, out, "train.epochs=2")
    original = T.MultiTaskLoss.forward
    calls = {"n": 0}

    def forward(self, out_, batch):
        loss, parts = original(self, out_, batch)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:  # first step of epoch 2
                loss = loss * float("nan")
        return loss, parts

    snapshot = {}

    def remember(path, history):
        atomic_write_bytes(path, b"")
        snapshot.update({p.name: p.read_bytes() for p in out.glob("*.safetensors")})
        snapshot["state.pt"] = (out / "state.pt").read_bytes()

    monkeypatch.setattr(T.MultiTaskLoss, "forward", forward)
    monkeypatch.setattr(T, "write_metrics_csv", remember)
    with pytest.raises(TrainingError, match=r"epoch 2, step 1.*train\.lr"):
        T.train(cfg)
    assert snapshot  # epoch 1 was saved ...
    for name, data in snapshot.items():  # ... and nothing was written after the NaN
        assert (out / name).read_bytes() == data, name
    assert not (out / "calibration.json").exists()


def test_loss_without_any_mask_or_stain_is_zero_not_nan() -> None:
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), T.IGNORE_INDEX)
    ce = T.masked_cross_entropy(logits, target)
    dice = T.soft_dice_loss(logits, target)
    (ce + dice).backward()
    assert ce.item() == 0 and dice.item() == 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_soft_dice_rewards_overlap_and_punishes_false_deposits() -> None:
    def logits(labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).float() * 20

    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, 2:6, 2:6] = 1  # a calcium deposit
    missed = torch.zeros_like(target)
    false_bone = target.clone()
    false_bone[:, 0, :] = 2
    perfect = T.soft_dice_loss(logits(target), target)
    assert perfect < 0.01
    assert T.soft_dice_loss(logits(missed), target) > 0.2  # 1 of 4 deposit labels fully missed
    assert T.soft_dice_loss(logits(false_bone), target) > perfect + 0.2


# --------------------------------------------------------------------------- pieces


def test_epoch_sampler_shards_one_shared_order() -> None:
    labels = [0] * 30 + [1] * 5 + [2] * 5
    kw = dict(weighted=True, seed=3, items_per_epoch=20, world_size=2)
    ranks = [T.EpochSampler(labels, rank=r, **kw) for r in range(2)]
    for s in ranks:
        s.set_epoch(4)
    order = ranks[0].epoch_order(4)
    assert order == ranks[1].epoch_order(4)  # every rank draws the same weighted order
    got = [list(s) for s in ranks]
    assert [i for i, _ in got[0]] == order[0::2] and [i for i, _ in got[1]] == order[1::2]
    assert len({seed for part in got for _, seed in part}) == 40  # one augmentation seed each
    # class balance: the minority classes are drawn far above their 12.5 % share
    assert np.mean(np.asarray(order) >= 30) > 0.4
    ranks[0].set_epoch(4, start=6)
    assert list(ranks[0]) == got[0][6:]
    ranks[0].set_epoch(5)
    assert ranks[0].epoch_order(5) != order


def test_warmup_then_cosine_to_floor() -> None:
    f = T.warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx((1 + T.LR_FLOOR) / 2, abs=1e-6)
    assert f(100) == pytest.approx(T.LR_FLOOR) and f(500) == pytest.approx(T.LR_FLOOR)
    assert all(f(i) >= f(i + 1) for i in range(10, 120))


def test_encoder_learns_at_its_own_rate_and_the_schedule_keeps_the_ratio() -> None:
    cfg = load_config(None, ["model.backbone=resnet18", "model.init_weights=null"])
    model = T.create_model(cfg.model)
    opt = T.build_optimizer(model, 1e-3, 0.05, encoder_lr_scale=0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"encoder", "encoder_no_decay", "heads", "heads_no_decay"}
    assert groups["encoder"]["lr"] == pytest.approx(1e-4)
    assert groups["heads"]["lr"] == pytest.approx(1e-3)
    assert groups["heads_no_decay"]["weight_decay"] == 0.0
    assert groups["encoder"]["weight_decay"] == 0.05
    enc = {id(p) for p in model.encoder.parameters()}
    assert all(id(p) in enc for p in groups["encoder"]["params"])
    assert not any(id(p) in enc for p in groups["heads"]["params"])
    # every trainable parameter is in exactly one group
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T.warmup_cosine(10, 2))
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["encoder"] == pytest.approx(0.1 * lrs["heads"])


def test_frozen_encoder_schedule_holds_zero_then_ramps_into_the_cosine() -> None:
    base = T.warmup_cosine(total_steps=100, warmup_steps=10)
    f = T.frozen_then(base, frozen_steps=20, warmup_steps=10)
    assert all(f(i) == 0.0 for i in range(20))
    assert f(20) == pytest.approx(0.1 * base(20)) and f(29) == pytest.approx(base(29))
    assert all(f(i) == pytest.approx(base(i)) for i in range(29, 120))


def _record_initial_weights(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """A dict that the next training run fills with its weights as its first epoch starts.

    Clear it before each further run to record that run's start.
    """
    first: dict[str, torch.Tensor] = {}
    original = T.train_one_epoch

    def before(ctx, run, stop, on_step=None):  # type: ignore[no-untyped-def]
        if not first:
            first.update({k: v.detach().clone() for k, v in ctx.net.state_dict().items()})
        return original(ctx, run, stop, on_step)

    monkeypatch.setattr("calcinosis.training.train.train_one_epoch", before)
    return first


def test_linear_probing_epochs_leave_the_encoder_as_pretrained(
    tmp_path: Path, train_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Epoch 1 of 2 is linear probing: after it the encoder's weights and its
    # batch-norm statistics are the initial ones while the heads have moved;
    # in epoch 2 the encoder learns. Ctrl-C in epoch 1, then --resume, ends as
    # the run straight through.
    import calcinosis.training.engine as engine

    seen: dict[int, dict[str, torch.Tensor]] = {}
    original = engine._epoch_means

    def snapshot(ctx, run, images, seconds):  # type: ignore[no-untyped-def]
        seen[run.epoch] = {k: v.detach().clone() for k, v in ctx.net.state_dict().items()}
        return original(ctx, run, images, seconds)

    monkeypatch.setattr(engine, "_epoch_means", snapshot)
    first = _record_initial_weights(monkeypatch)
    over = ("train.epochs=2", "train.freeze_encoder_epochs=1", "train.max_steps_per_epoch=3")
    straight = tmp_path / "straight"
    T.train(make_train_cfg(train_manifest, straight, *over))
    enc = [k for k in first if k.startswith("encoder.")]
    heads = [k for k in first if not k.startswith("encoder.") and first[k].is_floating_point()]
    assert any("running_mean" in k for k in enc)
    assert all(torch.equal(seen[0][k], first[k]) for k in enc)
    assert any(not torch.equal(seen[0][k], first[k]) for k in heads)
    assert any(not torch.equal(seen[1][k], first[k]) for k in enc if "weight" in k)

    monkeypatch.undo()
    resumed = tmp_path / "resumed"
    cfg = make_train_cfg(train_manifest, resumed, *over)
    _train_until_ctrl_c(cfg, monkeypatch, "train", 2)
    T.train(cfg, resume=True)
    assert_same_weights(straight / "last.safetensors", resumed / "last.safetensors")


def test_frozen_batchnorm_statistics_stay_pretrained_while_everything_learns(
    tmp_path: Path, train_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # train.freeze_bn_stats: after a run the encoder's batch-norm running means
    # and variances are the initial ones, while its convolutions and the
    # batch-norm scales moved; without the key the statistics move too.
    first = _record_initial_weights(monkeypatch)
    over = ("train.epochs=1", "train.max_steps_per_epoch=2", "train.ema_decay=0")
    starts: dict[bool, dict[str, torch.Tensor]] = {}
    ends: dict[bool, dict[str, torch.Tensor]] = {}
    for frozen in (True, False):
        first.clear()
        out = tmp_path / str(frozen)
        T.train(make_train_cfg(train_manifest, out, *over, f"train.freeze_bn_stats={frozen}"))
        last = load_safetensors(out / "last.safetensors")
        starts[frozen] = dict(first)
        ends[frozen] = {k: last[k] for k in first if k.startswith("encoder.") and k in last}
    stats = [k for k in ends[True] if k.endswith(("running_mean", "running_var"))]
    bn_scales = [k.replace("running_mean", "weight") for k in stats if "running_mean" in k]
    assert stats and bn_scales
    assert all(torch.equal(ends[True][k], starts[True][k]) for k in stats)
    assert any(not torch.equal(ends[True][k], starts[True][k]) for k in bn_scales)
    assert any(not torch.equal(ends[False][k], starts[False][k]) for k in stats)


def test_rng_state_survives_weights_only_round_trip(tmp_path: Path) -> None:
    T.seed_everything(5)
    state = T.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (np.random.rand(), torch.rand(2), __import__("random").random())
    T.seed_everything(99)
    T.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (np.random.rand(), torch.rand(2), __import__("random").random())
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and got[2] == expected[2]


def test_auto_precision_is_fp32_on_cpus_without_native_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from calcinosis.training import distributed

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert T.resolve_amp_dtype("fp32", cpu) is None
    assert T.resolve_amp_dtype("bf16", cpu) is torch.bfloat16
    # both answers of the hardware probe, on the CPU and on a GPU
    for native, expected in ((False, None), (True, torch.bfloat16)):
        monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda native=native: native)
        assert T.resolve_amp_dtype("auto", cpu) is expected
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda native=native: native)
        assert T.resolve_amp_dtype("auto", gpu) is expected
    with pytest.raises(ConfigError, match="auto, bf16 or fp32"):
        T.resolve_amp_dtype("fp16", cpu)


# --------------------------------------------------------------------------- evaluation


def test_evaluate_writes_report_with_baseline_and_comparison(
    one_step_run: Path, train_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from calcinosis.inference.cli import main

    out = tmp_path / "report"
    rc = main(["evaluate", "--checkpoint", str(one_step_run / "best.safetensors"),
               "--data", str(train_manifest), "--out", str(out)])  # fmt: skip
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    n_test = sum(r["split"] == "test" for r in csv.DictReader(open(train_manifest, newline="")))
    assert m["n_samples"] == n_test
    assert m["temperature"] == pytest.approx(
        read_checkpoint_metadata(one_step_run / "best.safetensors")["temperature"]
    )
    assert m["headline"]["baseline_macro_f1"] is not None
    for name in ("report.md", "confusion_matrix.png", "reliability.png", "roc.png"):
        assert (out / name).is_file()
    assert "report:" in capsys.readouterr().out

    shifted = tmp_path / "all"
    rc = main(["evaluate", "--checkpoint", str(one_step_run / "best.safetensors"),
               "--data", str(train_manifest), "--split", "all", "--out", str(shifted),
               "--no-baseline", "--reference", str(out / "metrics.json")])  # fmt: skip
    assert rc == 0
    m2 = json.loads((shifted / "metrics.json").read_text())
    assert m2["n_samples"] == sum(1 for _ in csv.DictReader(open(train_manifest, newline="")))
    assert m2["headline"]["baseline_macro_f1"] is None
    assert "reference" in (shifted / "report.md").read_text()


def test_evaluate_unknown_split_is_a_clear_error(one_step_run: Path, train_manifest: Path) -> None:
    from calcinosis.model import DataError
    from calcinosis.training.evaluate import evaluate_checkpoint

    with pytest.raises(DataError, match="--split all"):
        evaluate_checkpoint(one_step_run / "best.safetensors", train_manifest, split="holdout")


def test_evaluate_baseline_train_fits_on_another_manifest(
    one_step_run: Path, train_manifest: Path, tmp_path: Path
) -> None:
    from calcinosis.model import DataError
    from calcinosis.training.evaluate import evaluate_checkpoint

    # a set without a train split (another lab's patches) gets its baseline from
    # the model's own training manifest
    rows = list(csv.DictReader(open(train_manifest, newline="")))
    other = tmp_path / "other.csv"
    with other.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "stain", "mpp"])
        w.writeheader()
        for r in rows:
            if r["split"] == "test":
                w.writerow({k: r[k] if k != "path" else str(train_manifest.parent / r["path"])
                            for k in ("path", "label", "stain", "mpp")})  # fmt: skip
    ckpt = one_step_run / "best.safetensors"
    alone = evaluate_checkpoint(ckpt, other, split="all", out_dir=tmp_path / "a")
    assert alone["headline"]["baseline_macro_f1"] is None
    fitted = evaluate_checkpoint(
        ckpt, other, split="all", out_dir=tmp_path / "b", baseline_train=train_manifest
    )
    assert fitted["headline"]["baseline_macro_f1"] is not None
    with pytest.raises(DataError, match="nowhere.csv"):
        evaluate_checkpoint(
            ckpt,
            other,
            split="all",
            out_dir=tmp_path / "c",
            baseline_train=tmp_path / "nowhere.csv",
        )


# --------------------------------------------------------------------------- processes


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "calcinosis.inference.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _overrides(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [
        "data.source=manifest", f"data.manifest={manifest}", f"output_dir={out}",
        "train.batch_size=4", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(tmp_path: Path, train_manifest: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "calcinosis.inference.cli", "train", "--config", str(CI_CONFIG),
           *_overrides(train_manifest, out, "train.epochs=2", "train.max_steps_per_epoch=2")]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = json.loads((out / T.DDP_CHECK_FILE).read_text())
    assert check["world_size"] == 2
    rank0, rank1 = check["parameter_sha256"]
    assert rank0 == rank1
    model, _ = load_checkpoint(out / "last.safetensors")
    assert T.parameter_checksum(model) == rank0
    assert "2 processes" in proc.stdout
    assert len(metrics_rows(out)) == 2


def _processes_of_run(run_dir: Path) -> list[int]:
    """Process ids whose command line writes to ``run_dir`` (torchrun and its workers
    start sessions of their own, so a process group does not reach them all)."""
    needle = f"output_dir={run_dir}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def _kill_once_saved_mid_epoch(cmd: list[str], run_dir: Path) -> None:
    """Start ``cmd`` and SIGKILL every process of the run once state.pt holds a
    mid-epoch resume point after at least two steps."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                run = torch.load(run_dir / "state.pt", weights_only=True)["run"]
            except Exception:  # not there yet
                run = None
            if run and run["global_step"] >= 2 and run["step_in_epoch"] > 0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training finished before it could be killed"
    finally:
        for pid in {proc.pid, *_processes_of_run(run_dir)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _processes_of_run(run_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_of_run(run_dir), "a process of the run survived SIGKILL"
    state = torch.load(run_dir / "state.pt", weights_only=True)["run"]
    assert 0 < state["global_step"] < 8


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches(tmp_path: Path, train_manifest: Path) -> None:
    extra = ("train.epochs=2", "train.max_steps_per_epoch=4", "train.batch_size=2",
             "train.checkpoint_every_steps=1", "calibrate=false")  # fmt: skip
    straight = tmp_path / "straight"
    killed = tmp_path / "killed"
    args = ["train", "--config", str(CI_CONFIG)]
    subprocess.run(_cli(*args, *_overrides(train_manifest, straight, *extra)), env=_env(),
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    _kill_once_saved_mid_epoch(_cli(*args, *_overrides(train_manifest, killed, *extra)), killed)

    resumed = subprocess.run(_cli(*args, *_overrides(train_manifest, killed, *extra), "--resume"),
                             env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch" in resumed.stdout and "(global step 8)" not in resumed.stdout
    assert_same_weights(straight / "last.safetensors", killed / "last.safetensors")
    assert metrics_rows(straight) == metrics_rows(killed)


@pytest.mark.slow
def test_ddp_killed_mid_epoch_resumes_exactly_with_dropout(
    tmp_path: Path, train_manifest: Path
) -> None:
    # Each rank draws its own dropout masks; state.pt keeps every rank's generator,
    # so two processes killed mid-epoch and resumed end where an uninterrupted pair does.
    extra = ("train.epochs=2", "train.max_steps_per_epoch=4", "train.batch_size=2",
             "train.checkpoint_every_steps=1", "calibrate=false", "model.drop_rate=0.5")  # fmt: skip

    def torchrun(out: Path, *more: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "calcinosis.inference.cli", "train", "--config",
                str(CI_CONFIG), *_overrides(train_manifest, out, *extra), *more]  # fmt: skip

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = subprocess.run(torchrun(straight), env=_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(torch.load(straight / "state.pt", weights_only=True)["rng"]) == 2
    _kill_once_saved_mid_epoch(torchrun(killed), killed)

    resumed = subprocess.run(torchrun(killed, "--resume"), env=_env(), capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming at epoch" in resumed.stdout and "(global step 8)" not in resumed.stdout
    assert_same_weights(straight / "last.safetensors", killed / "last.safetensors")
    assert metrics_rows(straight) == metrics_rows(killed)
    check = json.loads((killed / T.DDP_CHECK_FILE).read_text())
    assert len(set(check["parameter_sha256"])) == 1


def test_cli_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"lrr": 0.1}}))
    from calcinosis.inference.cli import main

    assert main(["train", "--config", str(bad)]) == 2
