"""Peak memory and speed of ``calcinosis predict SLIDE --level 0`` on one large region.

    python benchmarks/bench_region_memory.py                    # 40000 x 40000 px at 2 um/px
    python benchmarks/bench_region_memory.py --side 12000 --keep /tmp/bench-region
    python benchmarks/bench_region_memory.py --checkpoint runs/demo/best.safetensors
    python benchmarks/bench_region_memory.py --side 40000 --tissue-every 4   # quicker
    python benchmarks/bench_region_memory.py --side 4096 --serial            # no reader thread

The slide is a pyramidal tiled TIFF made here: one synthetic region
(``training.synthetic.render_region``, ``--block`` px a side, tissue, deposits
and glass) repeated over ``--side`` x ``--side`` px, written tile by tile, so
making it holds one block, never the slide. Its level 0 is declared at the
model's microns per pixel (2 um/px by default), so ``--level 0`` is predicted
at full resolution without resampling. Without ``--checkpoint`` a random-weight
resnet10t checkpoint (the tests' tiny model, at 2 um/px and ``--input-size``)
is written: the network's weights do not change the memory or the tile count.

``predict`` runs in a child process, so its peak RSS is its own
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``). Printed: the region,
tiles (all / through the network), seconds, network tiles per second, peak
RSS. No speed is asserted: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

#: Pixel size of the benchmark slide's level 0 and of the made-up checkpoint.
MPP = 2.0
#: Slide file tile side.
TILE = 256


def make_checkpoint(path: Path, input_size: int, mpp: float = MPP) -> Path:
    """The tests' tiny random-weight checkpoint (configs/ci.yaml's resnet10t) at ``mpp``."""
    import torch

    from calcinosis.model import create_model, save_checkpoint
    from calcinosis.training.config import load_config
    from calcinosis.training.state import RunState, checkpoint_metadata

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(
        repo / "configs" / "ci.yaml",
        [
            f"output_dir={path.parent}",
            f"data.image_size={input_size}",
            f"data.mpp={mpp}",
            "inference.indeterminate_threshold=0.0",
        ],
    )
    torch.manual_seed(0)
    model = create_model(cfg.model)
    meta = checkpoint_metadata(cfg, model, RunState(epoch=1, global_step=1), 1.0)
    return save_checkpoint(path, model, meta)


def _tiles(block: np.ndarray, side: int, every: int) -> Iterator[np.ndarray]:
    """The slide's tiles, row-major: the block repeated, on glass but every ``every``-th block."""
    b = block.shape[0]
    glass = np.full((TILE, TILE, 3), 255, np.uint8)
    for y in range(0, side, TILE):
        for x in range(0, side, TILE):
            tissue = (y // b) % every == 0 and (x // b) % every == 0
            yield block[y % b : y % b + TILE, x % b : x % b + TILE] if tissue else glass


def make_slide(path: Path, side: int, block_side: int, every: int = 1, seed: int = 3) -> Path:
    """A ``side``-px square pyramidal TIFF (levels /4, /16, ... in SubIFDs) at :data:`MPP`.

    With ``every`` > 1 only one block in ``every`` x ``every`` is tissue, the
    rest glass (never sent to the network): the maps stay full-size while the
    network's share of the run shrinks, for a quick memory check.
    """
    import cv2
    import tifffile

    from calcinosis.training.synthetic import render_region

    block, _ = render_region(block_side, block_side, seed=seed, tile=256, workers=1)
    blocks, sides = [block], [side]
    while sides[-1] > 2048:
        b = blocks[-1]
        blocks.append(cv2.resize(b, (b.shape[1] // 4,) * 2, interpolation=cv2.INTER_AREA))
        sides.append(sides[-1] // 4)
    opts = {"photometric": "rgb", "compression": "zlib", "compressionargs": {"level": 1}}
    opts["metadata"] = None
    opts.update(tile=(TILE, TILE), dtype=np.uint8)
    res = 1e4 / MPP  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(
            _tiles(blocks[0], side, every),
            shape=(side, side, 3),
            subifds=len(blocks) - 1,
            resolution=(res, res),
            resolutionunit="CENTIMETER",
            **opts,
        )
        for b, s in zip(blocks[1:], sides[1:], strict=True):
            cell = np.full((b.shape[0] * every, b.shape[1] * every, 3), 255, np.uint8)
            cell[: b.shape[0], : b.shape[1]] = b
            tiled = np.tile(cell, (-(-s // cell.shape[0]), -(-s // cell.shape[1]), 1))[:s, :s]
            tw.write(tiled, subfiletype=1, **opts)
    return path


def predict(
    slide: Path, ckpt: Path, out: Path, extra: list[str], prefetch: bool = True
) -> tuple[float, int, dict]:
    """``calcinosis predict`` in a child: seconds, the child's peak RSS (bytes), its record.

    ``prefetch=False`` reads the tiles in turn (``region.PREFETCH``), for comparison.
    """
    code = (
        "import sys; import calcinosis.inference.region as r; "
        f"r.PREFETCH = {bool(prefetch)}; "
        "from calcinosis.model.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    cmd = [sys.executable, "-c", code, "predict", str(slide), "--checkpoint", str(ckpt),
           "--out", str(out), "--level", "0", "--quiet", *extra]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    rec = json.loads((out / "predictions.json").read_text())["results"][0]
    return secs, rss, rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=40000, help="region side, px (default 40000)")
    ap.add_argument("--block", type=int, default=2048, help="side of the repeated synthetic block")
    ap.add_argument("--tissue-every", type=int, default=1, help="tissue in 1 block of N x N")
    ap.add_argument("--checkpoint", type=Path, help="default: a tiny random resnet10t at 2 um/px")
    ap.add_argument("--input-size", type=int, default=256, help="the made-up checkpoint's input")
    ap.add_argument("--keep", type=Path, help="work folder kept between runs (slide reused)")
    ap.add_argument("--serial", action="store_true", help="read tiles in turn (no reader thread)")
    ap.add_argument("predict_args", nargs="*", help="more `calcinosis predict` options, after --")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-region-") as td:
        work = args.keep or Path(td)
        work.mkdir(parents=True, exist_ok=True)
        slide = work / f"slide-{args.side}-{args.block}-{args.tissue_every}.tif"
        if not slide.exists():
            t0 = time.perf_counter()
            part = slide.with_suffix(".part.tif")
            make_slide(part, args.side, args.block, args.tissue_every).rename(slide)
            print(f"slide: {slide} written in {time.perf_counter() - t0:.0f} s", flush=True)
        ckpt = args.checkpoint or work / f"tiny-{args.input_size}.safetensors"
        if not ckpt.exists():
            make_checkpoint(ckpt, args.input_size)
        out = work / f"out-{args.side}-{time.strftime('%H%M%S')}"
        secs, rss, rec = predict(slide, ckpt, out, args.predict_args, not args.serial)
    region = rec.get("region") or {}
    net = int(region.get("tissue_tiles", 0))
    how = "tiles read in turn" if args.serial else "tiles read by a reader thread"
    print(f"region {args.side} x {args.side} px at {MPP} um/px, level 0; {how}")
    print(f"tiles: {region.get('tiles')} in all, {net} through the network")
    print(f"seconds: {secs:.1f}   network tiles/s: {net / secs:.1f}")
    print(f"peak RSS: {rss / 2**20:.0f} MiB")
    print(f"lesions: {region.get('lesions_found')}   prediction: {rec.get('prediction')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
