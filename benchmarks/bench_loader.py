"""Training data loading: milliseconds per patch, with and without the decoded cache.

    .venv/bin/python benchmarks/bench_loader.py                       # demo config, 20/class-stain
    .venv/bin/python benchmarks/bench_loader.py data.manifest=runs/demo/data/manifest.csv

Serves the training split exactly as the training loop does (per-item
seeding, decoding, rescaling, the config's augmentation, collation) in the
main process, for ``--epochs`` epochs, with ``data.cache_mb`` off and on. The
first epoch reads every file; later ones show what the cache saves. On 2
cores loading shares the CPU with the model, so each millisecond per patch
here is a millisecond per patch of training (bench_train.py gives the
model's own time per patch: 1000 / images per second).

Without ``data.manifest`` (or with data.source=synthetic) it first renders a
small synthetic set with the config's size and mpp into a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from calcinosis.model.network import IMAGENET_MEAN, IMAGENET_STD
from calcinosis.training.config import load_config
from calcinosis.training.data import load_samples
from calcinosis.training.synthetic import generate_dataset
from calcinosis.training.train import DistInfo, build_loaders


def epoch_ms(loader, sampler, epoch: int) -> float:
    sampler.set_epoch(epoch)
    n, start = 0, time.perf_counter()
    for batch in loader:
        n += batch["image"].shape[0]
    return (time.perf_counter() - start) / max(n, 1) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--epochs", type=int, default=3, help="epochs per variant (first is cold)")
    p.add_argument(
        "--n", type=int, default=20, help="patches per class and stain when generating data"
    )
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = list(args.overrides)
        cfg = load_config(args.config, overrides)
        if cfg.data.source == "synthetic" or not (
            cfg.data.manifest and Path(cfg.data.manifest).is_file()
        ):
            generate_dataset(tmp, args.n, size=cfg.data.image_size, mpp=cfg.data.mpp, seed=0)
            overrides += ["data.source=manifest", f"data.manifest={tmp}/manifest.csv"]
        overrides.append("data.num_workers=0")
        mean_std = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}  # normalising costs the same
        print(f"config {args.config}: {cfg.data.image_size} px, batch {cfg.train.batch_size}")
        print(
            f"{'cache_mb':<10}"
            + "".join(f"{'epoch ' + str(e + 1):>10}" for e in range(args.epochs))
        )
        for cache_mb in (0, cfg.data.cache_mb or 1024):
            run_cfg = load_config(args.config, [*overrides, f"data.cache_mb={cache_mb}"])
            samples = load_samples(run_cfg)
            loader, _, sampler, _ = build_loaders(run_cfg, samples, mean_std, DistInfo())
            times = [epoch_ms(loader, sampler, e) for e in range(args.epochs)]
            print(f"{cache_mb:<10}" + "".join(f"{t:>8.3f}ms" for t in times), flush=True)
        print(f"({len([s for s in samples if s.split == 'train'])} training patches, ms per patch)")


if __name__ == "__main__":
    main()
