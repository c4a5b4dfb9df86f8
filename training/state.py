"""The run folder: where a run is, what it has written, and how it resumes exactly.

Files in the run folder (``cfg.output_dir``):
    config.yaml          the resolved config (a run can be repeated from its folder)
    metrics.csv          one row per epoch
    last.safetensors     weights + metadata after the latest epoch (or mid-epoch save)
    best.safetensors     the epoch with the best validation macro-F1 (ties: lower loss)
    state.pt             everything needed to resume exactly (weights_only loadable)
    calibration.json     the fitted softmax temperature and ECE before/after
    ddp_check.json       under torchrun: every rank's parameter checksum at the end
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from calcinosis.model import CHECKPOINT_FORMAT_VERSION, ConfigError, save_checkpoint
from calcinosis.model.checkpoint import unwrap_model
from calcinosis.model.fileio import atomic_write_bytes

from . import __version__
from .config import Config, config_to_dict
from .losses import LOSS_PARTS
from .metrics import to_jsonable

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
LAST_CHECKPOINT = "last.safetensors"
BEST_CHECKPOINT = "best.safetensors"
STATE_FILE = "state.pt"
CALIBRATION_FILE = "calibration.json"
DDP_CHECK_FILE = "ddp_check.json"

#: Config keys that may differ on --resume: more epochs extend the run; the
#: worker count and the folder's own path do not change any result.
RESUME_MAY_CHANGE = frozenset({"train.epochs", "data.num_workers", "data.cache_mb", "output_dir"})

METRICS_COLUMNS = (
    "epoch",
    "train_loss",
    "train_loss_class",
    "train_loss_stain",
    "train_loss_deposit",
    "val_loss",
    "val_acc",
    "val_macro_f1",
    "val_calcium_dice",
    "val_stain_acc",
    "lr",
    "images_per_s",
    "seconds",
)


@dataclasses.dataclass
class RunState:
    """Where the run is; saved in state.pt, so resume continues from exactly here."""

    epoch: int = 0  # the epoch in progress (0-based) = epochs completed
    step_in_epoch: int = 0  # optimizer steps done in it
    global_step: int = 0
    best_macro_f1: float | None = None
    best_val_loss: float | None = None
    best_epoch: int | None = None
    # sums over the epoch so far: loss and its parts times batch size, and the count
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sums:
            self.reset_sums()

    def reset_sums(self) -> None:
        self.sums = {"loss": 0.0, **{k: 0.0 for k in LOSS_PARTS}, "n": 0.0}

    def improves(self, val: dict[str, Any]) -> bool:
        """Better validation macro-F1, or equal with a lower validation loss."""
        if not val:
            return True  # no validation split: the latest weights are the best we know
        f1, loss = val.get("val_macro_f1"), val.get("val_loss")
        if f1 is None:
            return False
        if self.best_macro_f1 is None or f1 > self.best_macro_f1:
            return True
        return f1 == self.best_macro_f1 and loss < (self.best_val_loss or math.inf)

    def end_epoch(self, row: dict[str, Any], improved: bool) -> None:
        """The epoch is complete: record its row, move to the next one."""
        if improved:
            self.best_macro_f1 = row.get("val_macro_f1")
            self.best_val_loss = row.get("val_loss")
            self.best_epoch = self.epoch + 1
        self.history.append(to_jsonable(row))
        self.last_metrics = to_jsonable({k: v for k, v in row.items() if k != "epoch"})
        self.epoch += 1
        self.step_in_epoch = 0
        self.reset_sums()


# --------------------------------------------------------------------------- writing


def checkpoint_metadata(
    cfg: Config, model: nn.Module, run: RunState, temperature: float = 1.0
) -> dict[str, Any]:
    """Everything inference needs besides the weights (see calcinosis.model.checkpoint)."""
    net = unwrap_model(model)
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "package_version": __version__,
        "model": dataclasses.asdict(net.config),
        "config": config_to_dict(cfg),
        "class_names": list(cfg.model.class_names),
        "stain_names": list(cfg.model.stain_names),
        "deposit_labels": list(cfg.model.deposit_labels),
        "input_size": cfg.data.image_size,
        "mean": [float(v) for v in net.data_config["mean"]],
        "std": [float(v) for v in net.data_config["std"]],
        # The starting weights (name/package/version/file/sha256, or path/sha256; None =
        # from scratch), recorded by load_init_weights; mean/std above follow them.
        "init_weights": getattr(net, "init_weights_source", None),
        "mpp": cfg.data.mpp,
        "temperature": float(temperature),
        "indeterminate_threshold": cfg.inference.indeterminate_threshold,
        "min_tissue_fraction": cfg.inference.min_tissue_fraction,
        "epoch": run.epoch,
        "step_in_epoch": run.step_in_epoch,
        "global_step": run.global_step,
        "metrics": to_jsonable(run.last_metrics),
    }


def _cpu_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_resume_point(
    run_dir: Path,
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run: RunState,
    ema: Any | None,
    *,
    rng: list[dict[str, Any]],
) -> None:
    """Write last.safetensors, then state.pt (both atomic).

    state.pt carries its own copy of the weights: if the process dies between
    the two renames, state.pt still holds a weights/optimizer pair that
    belongs together, and resume never mixes steps. With an EMA, the
    checkpoint holds the averaged weights (what inference should use) and
    state.pt both. ``rng`` holds every rank's generator states
    (seeding.rng_state), rank 0 first.
    """
    net = unwrap_model(model)
    export = ema.module if ema is not None else net
    save_checkpoint(run_dir / LAST_CHECKPOINT, export, checkpoint_metadata(cfg, export, run))
    state = {
        "format_version": 1,
        "run": dataclasses.asdict(run),
        "model": _cpu_tensors(net),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
    }
    if ema is not None:
        state["ema"] = _cpu_tensors(ema.module)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(run_dir / STATE_FILE, buf.getvalue())


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv from the history kept in state.pt (so it never loses or repeats rows)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt_csv(row.get(k)) for k in METRICS_COLUMNS})
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _fmt_csv(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# --------------------------------------------------------------------------- resuming


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def check_resume_config(cfg: Config, saved_path: Path, completed_epochs: int) -> None:
    """A resumed run must use the config it was started with (epochs may grow)."""
    if not saved_path.is_file():
        raise ConfigError(f"cannot resume: {saved_path} is missing")
    saved = _flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    now = _flatten(config_to_dict(cfg))
    diff = sorted(
        k
        for k in set(saved) | set(now)
        if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)
    )
    if diff:
        lines = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise ConfigError(
            f"cannot resume {saved_path.parent}: the config differs from the one it was started "
            f"with ({lines}). Resume with the run's own config (--config {saved_path}), "
            "changing at most train.epochs, or start a new run in another output_dir."
        )
    if cfg.train.epochs < completed_epochs:
        raise ConfigError(
            f"cannot resume {saved_path.parent} with train.epochs={cfg.train.epochs}: "
            f"{completed_epochs} epochs are already done (epochs can only be extended)"
        )


def load_resume_state(run_dir: Path) -> dict[str, Any]:
    """state.pt of ``run_dir``, loaded with ``weights_only`` (never unpickles code).

    Files written before the loss-scaler slot was dropped carry
    ``"scaler": None`` as well; it is ignored.
    """
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise ConfigError(
            f"nothing to resume in {run_dir}: no {STATE_FILE} there. Start a new run without "
            "--resume, or point output_dir at the run to continue."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot resume: {path} is unreadable ({exc}); start a new run") from exc


def check_new_run_folder(run_dir: Path) -> None:
    """A new run must not overwrite one."""
    if (run_dir / LAST_CHECKPOINT).exists() or (run_dir / STATE_FILE).exists():
        raise ConfigError(
            f"{run_dir} already holds a training run ({LAST_CHECKPOINT}). Pass --resume to "
            f"continue it, or choose another output_dir (for example output_dir={run_dir}-2)."
        )


def restore(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: Any | None,
    state_path: Path,
) -> RunState:
    """Load a state.pt's weights, optimizer, schedule and EMA; return its RunState.

    The generators are restored separately (seeding.rank_rng_state): each
    rank takes its own.
    """
    model.load_state_dict(state["model"])
    if ema is not None:
        if "ema" not in state:
            raise ConfigError(
                f"{state_path} has no weight average (EMA), but the config "
                "asks for train.ema_decay > 0; resume with the run's own config.yaml"
            )
        ema.module.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return RunState(**state["run"])
