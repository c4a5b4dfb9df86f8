"""Training throughput (images/s) by precision and memory layout on this machine.

    .venv/bin/python benchmarks/bench_train.py                      # demo model and size
    .venv/bin/python benchmarks/bench_train.py --config configs/default.yaml --device cuda

Times full optimizer steps (forward, the three-task loss, backward, AdamW) of
the config's model at its image size on random batches, so data loading is
left out: the figure is the ceiling the loop can reach. Each variant gets
warm-up steps first (oneDNN and cuDNN pick kernels on first use). The
``auto`` column of the config (train.precision) resolves to the row marked
with an arrow.
"""

from __future__ import annotations

import argparse
import time

import torch

from calcinosis.model import create_model
from calcinosis.training.config import load_config
from calcinosis.training.distributed import resolve_amp_dtype
from calcinosis.training.engine import autocast
from calcinosis.training.losses import MultiTaskLoss
from calcinosis.training.optim import build_optimizer


def bench(
    cfg,
    device: torch.device,
    amp_dtype,
    channels_last: bool,
    steps: int,
    warmup: int,
    budget: float,
) -> float:
    """Images/s over up to ``steps`` timed steps, stopping early once ``budget`` seconds pass."""
    torch.manual_seed(0)
    model = create_model(cfg.model).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = MultiTaskLoss(cfg.train.loss_weights).to(device)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    b, s = cfg.train.batch_size, cfg.data.image_size
    x = torch.randn(b, 3, s, s, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    batch = {
        "image": x,
        "label": torch.randint(0, len(cfg.model.class_names), (b,), device=device),
        "stain": torch.randint(0, len(cfg.model.stain_names), (b,), device=device),
        "mask": torch.randint(0, len(cfg.model.deposit_labels), (b, s, s), device=device),
    }

    def step() -> None:
        with autocast(device, amp_dtype):
            out = model(batch["image"])
        loss, _ = criterion(out, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    done = 0
    while done < steps and (done == 0 or time.perf_counter() - start < budget):
        step()
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done * b / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="stop timing a variant after this many seconds (emulated bf16 is very slow)",
    )
    args = p.parse_args()

    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    auto = resolve_amp_dtype("auto", device)
    print(
        f"{cfg.model.backbone} at {cfg.data.image_size} px, batch {cfg.train.batch_size}, "
        f"{device} ({torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    print(f"{'precision':<10}{'channels_last':<15}{'images/s':>10}")
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for cl in (False, True):
            warmup = args.warmup if dtype is None or dtype == auto else 1
            ips = bench(cfg, device, dtype, cl, args.steps, warmup, args.budget)
            mark = "  <- auto" if dtype == auto and cl == cfg.train.channels_last else ""
            print(f"{name:<10}{str(cl):<15}{ips:>10.1f}{mark}", flush=True)


if __name__ == "__main__":
    main()
