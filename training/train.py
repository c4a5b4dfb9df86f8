"""Training, read top to bottom: ``train(cfg)`` is the whole story.

    calcinosis train --config configs/demo.yaml            # one process
    torchrun --nproc_per_node=4 -m calcinosis.inference.cli train --config configs/default.yaml

1. open the run folder (a new run must not overwrite one; a resumed run must
   use the config it was started with) and write the resolved config;
2. load and validate the data (rank 0 first: the generator may write it);
3. build the network, loaders, loss, optimizer, schedule and weight average
   (:class:`~calcinosis.training.engine.TrainContext`), and restore them from
   state.pt on ``--resume``;
4. run the epochs: ``train_one_epoch``, ``evaluate`` on the validation split,
   keep the best checkpoint, save a resume point (also every
   ``train.checkpoint_every_steps`` and on Ctrl-C);
5. check that DDP ranks agree, fit the softmax temperature.

The pieces live in modules of their own: ``losses``, ``optim``, ``loaders``,
``engine`` (the epoch loop), ``state`` (the run folder and resume),
``seeding`` (why resume is exact), ``distributed`` and ``calibration``. The
names tests and tools used to import from here still import from here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch

from calcinosis.model import ConfigError, create_model, save_checkpoint

from .calibration import calibrate, describe
from .config import Config, load_config, save_config
from .distributed import (
    DistInfo,
    any_rank,
    barrier,
    check_ranks_in_sync,
    cpu_has_native_bf16,
    gather_objects,
    parameter_checksum,
    resolve_amp_dtype,
    setup_distributed,
    sum_over_ranks,
    teardown_distributed,
    wrap_ddp,
)
from .engine import (
    GracefulStop,
    StopRequested,
    TrainContext,
    collect_outputs,
    evaluate,
    train_one_epoch,
)
from .loaders import EpochSampler, SeededDataset, build_loaders
from .losses import LOSS_PARTS, MultiTaskLoss, class_weights, masked_cross_entropy, soft_dice_loss
from .metrics import IGNORE_INDEX
from .mixstyle import attach_mixstyle
from .optim import LR_FLOOR, build_optimizer, build_scheduler, frozen_then, warmup_cosine
from .seeding import (
    derive_seed,
    rank_rng_state,
    rng_state,
    seed_dropout,
    seed_everything,
    set_rng_state,
)
from .state import (
    BEST_CHECKPOINT,
    CALIBRATION_FILE,
    CONFIG_FILE,
    DDP_CHECK_FILE,
    LAST_CHECKPOINT,
    METRICS_COLUMNS,
    METRICS_FILE,
    RESUME_MAY_CHANGE,
    STATE_FILE,
    RunState,
    check_new_run_folder,
    check_resume_config,
    checkpoint_metadata,
    load_resume_state,
    restore,
    save_resume_point,
    write_metrics_csv,
)

__all__ = [
    # the story
    "train",
    "run_train",
    "build_context",
    # re-exported from the modules that own them
    "BEST_CHECKPOINT",
    "CALIBRATION_FILE",
    "CONFIG_FILE",
    "DDP_CHECK_FILE",
    "IGNORE_INDEX",
    "LAST_CHECKPOINT",
    "LOSS_PARTS",
    "LR_FLOOR",
    "METRICS_COLUMNS",
    "METRICS_FILE",
    "RESUME_MAY_CHANGE",
    "STATE_FILE",
    "DistInfo",
    "EpochSampler",
    "GracefulStop",
    "MultiTaskLoss",
    "RunState",
    "SeededDataset",
    "StopRequested",
    "TrainContext",
    "build_loaders",
    "build_optimizer",
    "calibrate",
    "check_resume_config",
    "checkpoint_metadata",
    "class_weights",
    "collect_outputs",
    "cpu_has_native_bf16",
    "derive_seed",
    "evaluate",
    "frozen_then",
    "load_resume_state",
    "masked_cross_entropy",
    "parameter_checksum",
    "resolve_amp_dtype",
    "rng_state",
    "save_resume_point",
    "seed_everything",
    "set_rng_state",
    "setup_distributed",
    "soft_dice_loss",
    "train_one_epoch",
    "warmup_cosine",
    "write_metrics_csv",
]


def train(cfg: Config, resume: bool = False) -> Path:
    """Train per ``cfg``; return the run folder (its files: see calcinosis.training.state)."""
    dist_info, device = setup_distributed(cfg.train.device)
    try:
        run_dir = Path(cfg.output_dir)
        state = _open_run_folder(cfg, run_dir, resume, dist_info)
        samples = _load_samples(cfg, dist_info)
        _check_readout_has_masks(cfg, samples)
        ctx = build_context(cfg, samples, dist_info, device)
        run = RunState()
        if state is not None:
            run = _resume(ctx, state, run_dir / STATE_FILE)
        already_done = run.epoch >= cfg.train.epochs
        ctx.model = wrap_ddp(ctx.model, dist_info, device)
        if dist_info.is_main:
            _print_start(ctx, run, samples, run_dir, resumed=state is not None)
        _fit(ctx, run, run_dir)
        _finish(ctx, run, run_dir, already_done, samples)
        return run_dir
    finally:
        teardown_distributed(dist_info)


def run_train(args: Any) -> int:
    """``calcinosis train --config X [key=value ...] [--resume]``."""
    cfg = load_config(args.config, list(getattr(args, "overrides", None) or []))
    train(cfg, resume=bool(getattr(args, "resume", False)))
    return 0


# --------------------------------------------------------------------------- 1-3: set up


def _open_run_folder(
    cfg: Config, run_dir: Path, resume: bool, dist_info: DistInfo
) -> dict[str, Any] | None:
    """Check the folder, write the resolved config; return the state.pt to resume, if any."""
    state = None
    if resume:
        state = load_resume_state(run_dir)
        check_resume_config(cfg, run_dir / CONFIG_FILE, int(state["run"]["epoch"]))
    else:
        check_new_run_folder(run_dir)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
    barrier(dist_info)
    return state


def _check_readout_has_masks(cfg: Config, samples: list) -> None:
    """deposit_readout reads the diagnosis from the decoder, which learns from masks."""
    if not cfg.deposit_readout:
        return
    train = [s for s in samples if s.split == "train"]
    if train and not any(s.mask_path is not None for s in train):
        raise ConfigError(
            f"config key 'deposit_readout' is true, but none of the {len(train)} training "
            "patches has a deposit mask (a mask_path column in the manifest, or masks/ beside "
            "the class folders): the readout reads the diagnosis from the deposit map, which "
            "learns from masks. Add masks, or set deposit_readout: false"
        )


def _load_samples(cfg: Config, dist_info: DistInfo) -> list:
    """Rank 0 prepares the data first (the generator writes files); the others then read it."""
    from .data import load_samples

    samples = load_samples(cfg) if dist_info.is_main else None
    barrier(dist_info)
    return samples if samples is not None else load_samples(cfg)


def build_context(
    cfg: Config, samples: list, dist_info: DistInfo, device: torch.device
) -> TrainContext:
    """Network, loaders, loss, optimizer, schedule and weight average of a fresh run."""
    seed_everything(cfg.seed)  # after the data: generating it must not change the init
    model = create_model(cfg.model)
    train_loader, val_loader, sampler, steps = build_loaders(
        cfg, samples, model.data_config, dist_info
    )
    model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cw = None
    if cfg.train.balance == "loss":
        cw = class_weights(sampler.labels, len(cfg.model.class_names)).to(device)
    optimizer = build_optimizer(
        model, cfg.train.lr, cfg.train.weight_decay, cfg.train.encoder_lr_scale
    )
    ema = None
    if cfg.train.ema_decay > 0:
        from timm.utils import ModelEmaV3

        # use_warmup: the decay grows with the step count (1 - (1 + step)^-2/3),
        # capped at ema_decay, so early weights do not linger in a short run.
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True)
    mixer = None
    if cfg.train.mixstyle_prob > 0:
        mixer, _ = attach_mixstyle(
            model.encoder,
            cfg.train.mixstyle_levels,
            cfg.train.mixstyle_prob,
            cfg.train.mixstyle_alpha,
        )
    seed_dropout(cfg.seed, dist_info.rank)
    return TrainContext(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(
            optimizer,
            cfg.train.epochs,
            steps,
            cfg.train.warmup_epochs,
            cfg.train.freeze_encoder_epochs,
        ),
        criterion=MultiTaskLoss(cfg.train.loss_weights, cw).to(device),
        loader=train_loader,
        steps=steps,
        cfg=cfg,
        device=device,
        amp_dtype=resolve_amp_dtype(cfg.train.precision, device),
        dist_info=dist_info,
        ema=ema,
        val_loader=val_loader,
        mixstyle=mixer,
    )


def _resume(ctx: TrainContext, state: dict[str, Any], state_path: Path) -> RunState:
    """Weights, optimizer, schedule, EMA and this rank's generators from state.pt."""
    run = restore(state, ctx.net, ctx.optimizer, ctx.scheduler, ctx.ema, state_path)
    set_rng_state(rank_rng_state(state["rng"], ctx.dist_info.rank))
    if not ctx.dist_info.is_main:  # the saved partial sums are already global; count them once
        run.reset_sums()
    return run


# --------------------------------------------------------------------------- 4: the epochs


def _fit(ctx: TrainContext, run: RunState, run_dir: Path) -> None:
    """Run the remaining epochs; Ctrl-C saves at a step boundary, then KeyboardInterrupt."""
    main = ctx.dist_info.is_main
    writer = _tensorboard(run_dir) if main else None
    stop = GracefulStop()

    def on_step() -> None:
        every = ctx.cfg.train.checkpoint_every_steps
        if every and run.global_step % every == 0 and run.step_in_epoch < ctx.steps:
            _save_resume_point(ctx, run, run_dir)

    try:
        with stop:
            while run.epoch < ctx.cfg.train.epochs:
                _run_epoch(ctx, run, run_dir, stop, on_step, writer)
                if any_rank(stop.requested, ctx.dist_info, ctx.device):
                    _print_resume_hint(run_dir, run, main)
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if main and not stop.requested:
            print(
                "interrupted; resume from the last saved point with:\n"
                f"  calcinosis train --config {run_dir / CONFIG_FILE} --resume",
                file=sys.stderr,
                flush=True,
            )
        raise
    finally:
        if writer is not None:
            writer.close()


def _run_epoch(
    ctx: TrainContext,
    run: RunState,
    run_dir: Path,
    stop: GracefulStop,
    on_step: Any,
    writer: Any,
) -> None:
    """Train (the rest of) one epoch, validate, save; rank 0 logs."""
    main = ctx.dist_info.is_main
    epoch_start = time.perf_counter()
    ctx.loader.sampler.set_epoch(run.epoch, start=run.step_in_epoch * ctx.cfg.train.batch_size)
    try:
        stats = train_one_epoch(ctx, run, stop, on_step)
    except StopRequested:
        _save_resume_point(ctx, run, run_dir)
        _print_resume_hint(run_dir, run, main)
        raise KeyboardInterrupt from None

    val: dict[str, Any] = {}
    if main and ctx.val_loader is not None:
        val = evaluate(
            ctx.eval_net,
            ctx.val_loader,
            device=ctx.device,
            amp_dtype=ctx.amp_dtype,
            criterion=ctx.criterion,
            cfg=ctx.cfg,
        )
    row = {
        "epoch": run.epoch + 1,
        **{k: v for k, v in stats.items() if k != "train_seconds"},
        **val,
        "lr": ctx.scheduler.get_last_lr()[0],
        "seconds": time.perf_counter() - epoch_start,
    }
    improved = main and run.improves(val)
    run.end_epoch(row, improved)
    if improved:
        meta = checkpoint_metadata(ctx.cfg, ctx.eval_net, run)
        save_checkpoint(run_dir / BEST_CHECKPOINT, ctx.eval_net, meta)
    _save_resume_point(ctx, run, run_dir)
    if main:
        write_metrics_csv(run_dir / METRICS_FILE, run.history)
        _print_epoch(row, ctx.cfg, improved)
        if writer is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, row["epoch"])


def _save_resume_point(ctx: TrainContext, run: RunState, run_dir: Path) -> None:
    """Called on every rank: the partial loss sums are added up across ranks and every
    rank's generator states gathered; rank 0 writes."""
    saved = run
    if ctx.dist_info.enabled:
        keys = ["loss", *LOSS_PARTS, "n"]
        sums = sum_over_ranks([run.sums[k] for k in keys], ctx.dist_info, ctx.device)
        saved = dataclasses.replace(run, sums=dict(zip(keys, sums, strict=True)))
    rng = gather_objects(rng_state(), ctx.dist_info)
    if ctx.dist_info.is_main:
        save_resume_point(
            run_dir, ctx.cfg, ctx.net, ctx.optimizer, ctx.scheduler, saved, ctx.ema, rng=rng
        )


# --------------------------------------------------------------------------- 5: the end


def _finish(
    ctx: TrainContext, run: RunState, run_dir: Path, already_done: bool, samples: list
) -> None:
    """Check that DDP ranks agree, then fit the deposit readout and calibrate on rank 0."""
    cfg, main = ctx.cfg, ctx.dist_info.is_main
    if ctx.dist_info.enabled:
        check_ranks_in_sync(run_dir / DDP_CHECK_FILE, ctx.net, ctx.dist_info)
    finished = already_done and (run_dir / CALIBRATION_FILE).exists()
    if main and cfg.deposit_readout and not finished:
        from .loaders import build_eval_loader
        from .readout import describe as describe_readout
        from .readout import fit_deposit_readout

        loader = build_eval_loader(cfg, samples, ctx.net.data_config, "train")
        assert loader is not None  # build_loaders refused a run without training patches
        info = fit_deposit_readout(
            run_dir, loader, ctx.device, ctx.amp_dtype, cfg.train.channels_last
        )
        print(describe_readout(info), flush=True)
    if main and cfg.calibrate:
        if ctx.val_loader is None:
            print("calibration skipped: no validation split", flush=True)
        elif finished:
            print(f"{run_dir} is complete and calibrated; nothing to do", flush=True)
        else:
            cal = calibrate(
                run_dir,
                ctx.val_loader,
                ctx.device,
                ctx.amp_dtype,
                cfg.train.channels_last,
                tta=cfg.inference.tta,
            )
            print(describe(cal), flush=True)
    if main:
        print(
            f"done: best epoch {run.best_epoch}, val macro-F1 {_fmt(run.best_macro_f1)}; "
            f"checkpoints in {run_dir}",
            flush=True,
        )
    barrier(ctx.dist_info)


# --------------------------------------------------------------------------- logging


def _tensorboard(run_dir: Path) -> Any:
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _print_start(
    ctx: TrainContext, run: RunState, samples: list, run_dir: Path, resumed: bool
) -> None:
    cfg, dist_info = ctx.cfg, ctx.dist_info
    n_train = sum(s.split == "train" for s in samples)
    n_val = sum(s.split == "val" for s in samples)
    procs = f"{dist_info.world_size} processes" if dist_info.enabled else "1 process"
    print(
        f"run dir: {run_dir}\n"
        f"data: {n_train} train / {n_val} val patches at {cfg.data.image_size} px; "
        f"{ctx.steps} steps/epoch of {cfg.train.batch_size} per process\n"
        f"model: {cfg.model.backbone} on {ctx.device} ({procs}), "
        f"precision {'bf16' if ctx.amp_dtype is not None else 'fp32'}"
        f"{', channels_last' if cfg.train.channels_last else ''}"
        f"{f', weight EMA {cfg.train.ema_decay:g}' if ctx.ema is not None else ''}",
        flush=True,
    )
    if resumed:
        print(
            f"resuming at epoch {run.epoch + 1}, step {run.step_in_epoch} "
            f"(global step {run.global_step})",
            flush=True,
        )


def _print_resume_hint(run_dir: Path, run: RunState, main: bool) -> None:
    if main:
        print(
            f"interrupted: saved epoch {run.epoch + 1} step {run.step_in_epoch} in "
            f"{run_dir / STATE_FILE}. Resume with:\n"
            f"  calcinosis train --config {run_dir / CONFIG_FILE} --resume",
            file=sys.stderr,
            flush=True,
        )


def _print_epoch(row: dict[str, Any], cfg: Config, improved: bool) -> None:
    print(
        f"epoch {row['epoch']}/{cfg.train.epochs}  loss {row['train_loss']:.4f} "
        f"(class {row['train_loss_class']:.3f} stain {row['train_loss_stain']:.3f} "
        f"deposit {row['train_loss_deposit']:.3f})  val loss {_fmt(row.get('val_loss'), '.4f')} "
        f"acc {_fmt(row.get('val_acc'))} macro-F1 {_fmt(row.get('val_macro_f1'))} "
        f"calcium Dice {_fmt(row.get('val_calcium_dice'))} "
        f"stain acc {_fmt(row.get('val_stain_acc'))}  lr {row['lr']:.2e}  "
        f"{row['images_per_s']:.1f} img/s  {row['seconds']:.1f} s"
        f"{'  *best*' if improved else ''}",
        flush=True,
    )
