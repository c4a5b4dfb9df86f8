"""Throughput of the synthetic generator, PNG writing included.

    /work/main/.venv/bin/python benchmarks/bench_synth.py --n 20 --size 128 --workers 0

Generates 5 classes x 3 stains x n patches into a temporary folder with
``generate_dataset`` (all cores by default) and prints patches per second.
The number matters because training on the default synthetic source starts by
generating its data.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from calcinosis.model.labels import CLASS_NAMES, STAIN_NAMES
from calcinosis.training.synthetic import generate_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20, help="patches per class and stain")
    p.add_argument("--size", type=int, default=128, help="patch side in pixels")
    p.add_argument("--workers", type=int, default=0, help="0 = all cores")
    p.add_argument("--repeat", type=int, default=2, help="timed runs (best and all reported)")
    args = p.parse_args()
    total = args.n * len(CLASS_NAMES) * len(STAIN_NAMES)
    rates = []
    for r in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            generate_dataset(tmp, args.n, size=args.size, seed=r, workers=args.workers)
            dt = time.perf_counter() - t0
        rates.append(total / dt)
        print(
            f"run {r}: {total} patches at {args.size} px in {dt:.2f} s = {total / dt:.1f} patches/s"
        )
    workers = args.workers or os.cpu_count()
    print(
        f"generate_dataset: best {max(rates):.1f} patches/s "
        f"({args.size} px, {workers} workers, {os.cpu_count()} cores)"
    )


if __name__ == "__main__":
    main()
