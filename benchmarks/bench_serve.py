"""The page's first response for a 512 x 512 patch: from upload to the result the page draws.

    .venv/bin/python benchmarks/bench_serve.py                       # the demo model
    .venv/bin/python benchmarks/bench_serve.py --checkpoint best.safetensors --tta none

Starts the server as ``calcinosis serve`` does (uvicorn on a free loopback
port, the model loaded with serve's defaults), renders a 512 x 512 synthetic
H&E region at the model's resolution, and times what the page does with a
dropped file over real HTTP: ``POST /api/predict``, then long polls of
``GET /api/jobs/{id}`` until the job is done, which is after the prediction,
the overlay PNG, the GeoJSON and the tables are written. "first" is the
first request after the server started; "then" is the median of the
following ``--repeats``. The target is 1 s with the demo model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from urllib.request import Request, urlopen

import cv2

TARGET_S = 1.0


def post_file(url: str, name: str, data: bytes) -> dict:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = Request(
        url + "api/predict",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        method="POST",
    )
    with urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def until_done(url: str, job: dict) -> dict:
    while job["state"] in ("queued", "running"):
        q = f"api/jobs/{job['id']}?since={job['version']}&wait=10"
        with urlopen(url + q, timeout=60) as r:
            job = json.loads(r.read())
    return job


def one(url: str, data: bytes) -> tuple[float, dict]:
    t0 = time.perf_counter()
    job = until_done(url, post_file(url, "patch_512.png", data))
    return time.perf_counter() - t0, job


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", default="runs/demo/train/best.safetensors")
    p.add_argument("--tta", choices=("none", "d4"), default=None, help="as for serve")
    p.add_argument("--backend", default="torch", help="as for serve (default torch)")
    p.add_argument("--repeats", type=int, default=5, help="timed requests after the first")
    p.add_argument("--size", type=int, default=512, help="patch side in pixels (default 512)")
    args = p.parse_args()

    from calcinosis.inference.serve.app import ServeConfig, create_app
    from calcinosis.inference.serve.command import BackgroundServer, load_predictor
    from calcinosis.model.cli import build_parser
    from calcinosis.training.synthetic import render_region

    argv = ["serve", "--checkpoint", args.checkpoint, "--backend", args.backend]
    if args.tta:
        argv += ["--tta", args.tta]
    serve_args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    predictor = load_predictor(serve_args)
    load_s = time.perf_counter() - t0
    rgb, _ = render_region(
        args.size, args.size, seed=5, tile=128, mpp=predictor.model_mpp or 0.5, workers=1
    )
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    data = buf.tobytes()

    with tempfile.TemporaryDirectory() as work:
        app = create_app(
            predictor, ServeConfig(checkpoint=Path(args.checkpoint), work_dir=Path(work))
        )
        try:
            with BackgroundServer(app) as srv:
                first, job = one(srv.url, data)
                rest = [one(srv.url, data)[0] for _ in range(args.repeats)]
        finally:
            app.state.close()
    rec = job["result"]["record"]
    region = rec.get("region") or {}
    then = statistics.median(rest) if rest else float("nan")
    print(
        f"model {Path(args.checkpoint).name}: {predictor.input_size} px at {predictor.model_mpp} "
        f"um/px, backend {predictor.backend}; {predictor.describe_tta()}; loaded in {load_s:.1f} s"
    )
    print(
        f"{args.size} x {args.size} px patch ({rec['mode']}, {region.get('tissue_tiles', 1)} "
        f"tissue tiles): call {rec['prediction']} ({rec['status']})"
    )
    print(
        f"first response: {first:.2f} s; then median {then:.2f} s over {len(rest)} "
        f"(min {min(rest, default=float('nan')):.2f}, max {max(rest, default=float('nan')):.2f}); "
        f"target <= {TARGET_S:.0f} s: {'met' if max(first, then) <= TARGET_S else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
