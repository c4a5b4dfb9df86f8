"""The local web page's server: a FastAPI app around one loaded :class:`Predictor`.

Endpoints (all JSON unless said; every refusal is a 4xx with ``{"detail": message}``):

``GET /``                          the page (``static/index.html``)
``GET /api/model``                 the model card and the server's limits
``POST /api/predict``              multipart ``file`` (+ optional ``mpp``): queue an image; 202
``GET /api/jobs``                  every job the server knows, newest last (no results)
``GET /api/jobs/{id}``             one job; ``?since=V&wait=S`` long-polls for a change
``POST /api/jobs/{id}/cancel``     cancel a queued or running job
``GET /api/jobs/{id}/files/{key}`` a download: csv, json, overlay, geojson, tiles, lesions
``GET /api/jobs/{id}/image``       the uploaded image as PNG (shrunk for the page)
``GET /api/jobs/{id}/deposits``    the deposit map as a transparent PNG; ``?labels=1,3``
``GET /api/slides``                the slides under ``--slides``
``GET /api/slides/info?path=``     one slide's size, levels, deep-zoom layout and past jobs
``GET /api/slides/tile?path=&level=&col=&row=``  a deep-zoom JPEG tile
``POST /api/slides/predict``       JSON ``{"path", "region": "x,y,w,h" | null}``: queue; 202

Safety: the server binds to 127.0.0.1 unless told otherwise and answers only
requests addressed to the host it was started on (a web page elsewhere cannot
reach it by DNS rebinding); request bodies over the upload limit are refused
while they arrive (413); uploads are sniffed by content (:mod:`.uploads`);
slide paths never leave ``--slides`` (:mod:`.paths`); downloads are looked up
by key in the job's own file list, never by a path from the client.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from calcinosis.inference.predictor import Predictor
from calcinosis.inference.region import predict_slide, predict_source
from calcinosis.inference.slide import Slide, open_slide, parse_region, region_thumbnail
from calcinosis.inference.tiling import ArraySource
from calcinosis.model.errors import CalcinosisError
from calcinosis.model.imageio import DEFAULT_MAX_PIXELS
from calcinosis.model.labels import DEPOSIT_COLORS, DEPOSIT_DISPLAY

from . import tiles as tiles_mod
from .card import model_card
from .jobs import Job, JobQueue, QueueFull
from .outputs import SLIDE_OVERLAY_SIDE, download_files, output_name, write_prediction
from .paths import SlidePathError, list_slides, resolve_slide
from .progress import Cancelled, ProgressSource
from .uploads import MAX_UPLOAD_BYTES, UploadError, accept_upload

STATIC = Path(__file__).resolve().parent / "static"
#: Where ``npm ci`` (the Makefile) puts OpenSeadragon's build.
VENDOR_OSD = (
    Path(__file__).resolve().parent / "node_modules" / "openseadragon" / "build" / "openseadragon"
)
#: Longest a client may long-poll one request, seconds.
MAX_WAIT = 20.0
#: Open slides kept for tile serving.
SLIDE_CACHE = 8
#: Media types of the downloads, by key.
_MEDIA = {
    "csv": "text/csv",
    "json": "application/json",
    "overlay": "image/png",
    "geojson": "application/geo+json",
    "tiles": "text/csv",
    "lesions": "text/csv",
}


@dataclass
class ServeConfig:
    """Everything the app needs besides the predictor."""

    checkpoint: Path
    work_dir: Path
    slides_dir: Path | None = None
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int | None = None  # None: imageio.DEFAULT_MAX_PIXELS, as predict
    allowed_hosts: list[str] = field(default_factory=lambda: ["127.0.0.1", "localhost", "[::1]"])


class _SlideCache:
    """A few open slides for tile reads, each with its own lock (readers are not thread-safe)."""

    def __init__(self, size: int = SLIDE_CACHE) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._open: OrderedDict[tuple[str, float], tuple[Slide, threading.Lock]] = OrderedDict()

    def get(self, path: Path) -> tuple[Slide, threading.Lock]:
        key = (str(path), path.stat().st_mtime)
        with self._lock:
            hit = self._open.get(key)
            if hit is not None:
                self._open.move_to_end(key)
                return hit
        slide = open_slide(path)
        entry = (slide, threading.Lock())
        with self._lock:
            self._open[key] = entry
            while len(self._open) > self.size:
                _, (old, lock) = self._open.popitem(last=False)
                with lock:
                    old.close()
        return entry

    def close(self) -> None:
        with self._lock:
            for slide, lock in self._open.values():
                with lock:
                    slide.close()
            self._open.clear()


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, as they arrive."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = int(limit)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        # Multipart framing adds a few hundred bytes around the file itself.
        limit = self.limit + 64 * 1024
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, int(declared))
            return
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return msg

        async def tracked(msg: dict) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send, seen)

    async def _refuse(self, send: Any, size: int) -> None:
        body = json.dumps(
            {
                "detail": f"the upload ({size / 2**20:.1f} MB so far) is over this server's limit of "
                f"{self.limit / 2**20:.1f} MB (calcinosis serve --max-upload-mb); export a smaller "
                "region, or put whole slides in the slides folder (--slides DIR)"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(predictor: Predictor, config: ServeConfig) -> FastAPI:
    """The app; its worker thread starts now and stops with the app's lifespan (or ``app.state.close``)."""
    config.work_dir.mkdir(parents=True, exist_ok=True)
    queue = JobQueue()
    slides = _SlideCache()
    card = model_card(predictor, config.checkpoint)
    closed = threading.Event()

    def close() -> None:
        if not closed.is_set():
            closed.set()
            queue.close()
            slides.close()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Iterator[None]:
        yield
        close()

    app = FastAPI(title="calcinosis", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.queue = queue
    app.state.close = close
    app.state.config = config
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)
    if "*" not in config.allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=config.allowed_hosts)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if VENDOR_OSD.is_dir():
        app.mount("/vendor/openseadragon", StaticFiles(directory=VENDOR_OSD), name="osd")

    def job_or_404(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept only for a while)")
        return job

    # ------------------------------------------------------------------ page and card

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/model")
    def get_model() -> dict[str, Any]:
        return {
            "card": card,
            "limits": {
                "max_upload_bytes": config.max_upload_bytes,
                "max_pixels": _max_pixels(config),
            },
            "slides_enabled": config.slides_dir is not None,
            "viewer_available": VENDOR_OSD.is_dir(),
            "deposit_colors": {str(k): list(v) for k, v in DEPOSIT_COLORS.items()},
            "deposit_names": {str(k): v for k, v in DEPOSIT_DISPLAY.items()},
        }

    # ------------------------------------------------------------------ images

    @app.post("/api/predict", status_code=202)
    async def post_predict(request: Request) -> dict[str, Any]:
        try:
            form = await request.form()
        except HTTPException as exc:  # starlette's answer to malformed multipart
            raise HTTPException(
                400, f"the upload could not be parsed as a form ({exc.detail})"
            ) from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(
                400, "no file in the upload: send the image in a form field named 'file'"
            )
        mpp = _parse_mpp(form.get("mpp"))
        data = await upload.read()
        await upload.close()
        job = Job(kind="image", name="", folder=Path(), work=lambda j: {})
        job.folder = config.work_dir / job.id
        try:
            up = await run_in_threadpool(
                accept_upload,
                data,
                upload.filename,
                job.folder / "input",
                "upload",
                max_bytes=config.max_upload_bytes,
                max_pixels=config.max_pixels,
            )
        except UploadError as exc:
            _remove(job.folder)
            raise HTTPException(exc.status, exc.message) from None
        del data
        job.name = up.name
        job.work = lambda j: _predict_image(predictor, config, j, up.rgb, up.name, mpp)
        return _submit(queue, job)

    # ------------------------------------------------------------------ jobs

    @app.get("/api/jobs")
    def get_jobs() -> list[dict[str, Any]]:
        out = []
        for job in queue.jobs():
            snap = queue.snapshot(job)
            snap["result"] = None
            out.append(snap)
        return out

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: str, since: int = -1, wait: float = 0.0) -> dict[str, Any]:
        job = job_or_404(job_id)
        if wait > 0:
            queue.wait(job, since, min(float(wait), MAX_WAIT))
        return queue.snapshot(job)

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict[str, Any]:
        job = job_or_404(job_id)
        queue.cancel(job)
        return queue.snapshot(job)

    @app.get("/api/jobs/{job_id}/files/{key}")
    def get_file(job_id: str, key: str) -> FileResponse:
        job = job_or_404(job_id)
        files = (job.result or {}).get("files") or {}
        if key not in files:
            known = ", ".join(sorted(files)) or "none yet"
            raise HTTPException(404, f"job {job_id} has no {key!r} file (it has: {known})")
        path = job.folder / "out" / files[key]
        # Tables get the image's name in front, so several downloads do not clash.
        stem = (job.result or {}).get("record", {}).get("name") or "result"
        name = path.name if key not in ("csv", "json") else f"{stem}.{path.name}"
        return FileResponse(path, media_type=_MEDIA.get(key), filename=name)

    @app.get("/api/jobs/{job_id}/image")
    def get_image(job_id: str) -> FileResponse:
        job = job_or_404(job_id)
        path = job.folder / "display" / "image.png"
        if job.kind != "image" or not path.is_file():
            raise HTTPException(404, f"job {job_id} has no picture to show (yet)")
        return FileResponse(path, media_type="image/png")

    @app.get("/api/jobs/{job_id}/deposits")
    def get_deposits(job_id: str, labels: str = "") -> Response:
        job = job_or_404(job_id)
        path = job.folder / "display" / "labels.png"
        if not path.is_file():
            raise HTTPException(404, f"job {job_id} has no deposit map (yet)")
        chosen = _parse_labels(labels)
        lm = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        png = tiles_mod.encode_png_rgba(tiles_mod.deposit_layer(lm, chosen))
        return Response(
            png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
        )

    # ------------------------------------------------------------------ slides

    def slide_path(rel: str) -> Path:
        if config.slides_dir is None:
            raise HTTPException(
                404, "this server has no slides folder; start it with calcinosis serve --slides DIR"
            )
        try:
            return resolve_slide(config.slides_dir, rel)
        except SlidePathError as exc:
            raise HTTPException(exc.status, exc.message) from None

    def open_cached(path: Path, rel: str) -> tuple[Slide, threading.Lock]:
        try:
            return slides.get(path)
        except CalcinosisError as exc:
            raise HTTPException(422, _rel_message(str(exc), path, rel)) from None

    @app.get("/api/slides")
    def get_slides() -> dict[str, Any]:
        if config.slides_dir is None:
            return {"enabled": False, "slides": []}
        return {"enabled": True, "slides": list_slides(config.slides_dir)}

    @app.get("/api/slides/info")
    def get_slide_info(path: str = "") -> dict[str, Any]:
        real = slide_path(path)
        slide, lock = open_cached(real, path)
        with lock:
            desc = slide.describe()
            w, h = slide.size
        past = [
            queue.snapshot(j)
            for j in queue.jobs()
            if j.kind == "slide" and j.slide == path and j.state == "done"
        ]
        return {
            "path": path,
            "name": real.name,
            "width": w,
            "height": h,
            "mpp": desc["mpp"],
            "levels": desc["levels"],
            "reader": desc["reader"],
            "tile_size": tiles_mod.TILE,
            "max_level": tiles_mod.max_level(w, h),
            "version": int(real.stat().st_mtime),
            "jobs": past,
        }

    @app.get("/api/slides/tile")
    def get_tile(path: str = "", level: int = 0, col: int = 0, row: int = 0) -> Response:
        real = slide_path(path)
        slide, lock = open_cached(real, path)
        try:
            with lock:
                px = tiles_mod.render_tile(slide, level, col, row)
        except tiles_mod.TileError as exc:
            raise HTTPException(404, str(exc)) from None
        except CalcinosisError as exc:
            raise HTTPException(422, _rel_message(str(exc), real, path)) from None
        return Response(
            tiles_mod.encode_jpeg(px),
            media_type="image/jpeg",
            headers={"Cache-Control": "private, max-age=3600"},
        )

    @app.post("/api/slides/predict", status_code=202)
    async def post_slide_predict(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise HTTPException(
                400, 'send JSON: {"path": "slide.svs", "region": "x,y,w,h" or null}'
            ) from None
        if not isinstance(body, dict):
            raise HTTPException(400, 'send a JSON object: {"path": ..., "region": ...}')
        rel = str(body.get("path") or "")
        real = slide_path(rel)
        region = None
        raw = body.get("region")
        if raw not in (None, ""):
            try:
                region = parse_region(str(raw))
            except CalcinosisError as exc:
                raise HTTPException(400, str(exc).replace("--region", "the region")) from None
        slide, lock = await run_in_threadpool(open_cached, real, rel)
        try:
            with lock:
                region = slide.check_region(region)
        except CalcinosisError as exc:
            raise HTTPException(
                400, _rel_message(str(exc), real, rel).replace("give --region", "give a region")
            ) from None
        job = Job(
            kind="slide",
            name=f"{real.name} [{','.join(map(str, region))}]",
            folder=Path(),
            work=lambda j: {},
        )
        job.folder = config.work_dir / job.id
        job.slide, job.region = rel, list(region)
        job.work = lambda j: _predict_slide(predictor, config, j, real, rel, region)
        return _submit(queue, job)

    return app


# --------------------------------------------------------------------------- the work


def _predict_image(
    predictor: Predictor,
    config: ServeConfig,
    job: Job,
    rgb: np.ndarray,
    name: str,
    mpp: float | None,
) -> dict[str, Any]:
    """Predict one uploaded image and write predict's files; the page's result."""
    t0 = time.perf_counter()
    # Within the checkpoint's mpp tolerance the image is used as it is (predict's rule).
    same_res = predictor.preprocessing.resample_factor(mpp) == 1.0
    if same_res:
        # predict_source routes a patch to predict_batch and tiles a region straight
        # from the array, as predict does; the wrapper only watches the reads.
        source = ProgressSource(ArraySource(rgb), job.report, job.cancel)
        res = predict_source(predictor, source, mpp=mpp, name=name)
    else:
        job.report(0.0, "resampling to the model's resolution, then predicting")
        res = predictor.predict_batch([rgb], mpp=[mpp], names=[name])[0]
    if job.cancel.is_set():
        raise Cancelled("cancelled")
    res.path = name
    job.report(0.95, "writing the overlay, GeoJSON and tables")
    display = job.folder / "display"
    display.mkdir(parents=True, exist_ok=True)
    shown = tiles_mod.shrink_to(rgb, tiles_mod.DISPLAY_SIDE, nearest=False)
    _write_png(display / "image.png", shown)
    present: list[int] = []
    if res.label_map is not None:
        lm = cv2.resize(
            res.label_map, (shown.shape[1], shown.shape[0]), interpolation=cv2.INTER_NEAREST
        )
        _write_png(display / "labels.png", lm)
        present = [int(v) for v in np.unique(res.label_map) if int(v) in DEPOSIT_COLORS]
    out = job.folder / "out"
    rec = write_prediction(
        out,
        predictor,
        res,
        rgb,
        output_name(name),
        source="upload",
        checkpoint=str(config.checkpoint),
        seconds=time.perf_counter() - t0,
    )
    return {
        "record": rec,
        "files": download_files(out, rec),
        "display": {
            "width": int(shown.shape[1]),
            "height": int(shown.shape[0]),
            "scale": shown.shape[1] / max(1, rgb.shape[1]),
            "labels_present": present,
        },
    }


def _predict_slide(
    predictor: Predictor,
    config: ServeConfig,
    job: Job,
    path: Path,
    rel: str,
    region: tuple[int, int, int, int],
) -> dict[str, Any]:
    """Predict a region of a slide with predict's slide reader and writers; the page's result."""
    t0 = time.perf_counter()
    try:
        res = predict_slide(
            predictor,
            path,
            region=region,
            wrap_source=lambda s: ProgressSource(s, job.report, job.cancel),
        )
        thumb = None
        if res.status != "error" and res.slide:
            # The overlay's background, as predict makes it (slide.region_thumbnail).
            thumb = region_thumbnail(path, res.slide, SLIDE_OVERLAY_SIDE)
    except CalcinosisError as exc:  # a damaged tile: name the slide as the page lists it
        raise CalcinosisError(_rel_message(str(exc), path, rel)) from None
    if job.cancel.is_set():
        raise Cancelled("cancelled")
    res.path = rel
    job.report(0.95, "writing the overlay, GeoJSON and tables")
    info = res.slide or {}
    ds = float(info.get("level_downsample", 1.0))
    ox, oy = (float(v) for v in info.get("origin", (0.0, 0.0)))
    layer: dict[str, Any] | None = None
    present: list[int] = []
    # A large region's map is on disk (``bigmap``): its subsampled copy makes the layer.
    small = res.label_map if res.label_file is None else res.label_file.thumbnail
    if small is not None:
        lm = tiles_mod.shrink_to(small, tiles_mod.LAYER_SIDE, nearest=True)
        display = job.folder / "display"
        display.mkdir(parents=True, exist_ok=True)
        _write_png(display / "labels.png", lm)
        lh, lw = (res.height, res.width) if res.label_file is not None else small.shape[:2]
        layer = {"x": ox, "y": oy, "width": lw * ds, "height": lh * ds}
        present = [int(v) for v in np.unique(lm) if int(v) in DEPOSIT_COLORS]
    out = job.folder / "out"
    rec = write_prediction(
        out,
        predictor,
        res,
        thumb,
        output_name(path.name),
        source=rel,
        checkpoint=str(config.checkpoint),
        seconds=time.perf_counter() - t0,
        max_side=SLIDE_OVERLAY_SIDE,
    )
    return {
        "record": rec,
        "files": download_files(out, rec),
        "layer": layer,
        "display": {"labels_present": present},
    }


# --------------------------------------------------------------------------- helpers


def _submit(queue: JobQueue, job: Job) -> dict[str, Any]:
    try:
        queue.submit(job)
    except QueueFull as exc:
        _remove(job.folder)
        raise HTTPException(429, str(exc)) from None
    return queue.snapshot(job)


def _parse_mpp(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        raise HTTPException(
            400, f"mpp {value!r} is not a number (microns per pixel, e.g. 0.5)"
        ) from None
    if not (0.01 <= mpp <= 100.0):
        raise HTTPException(400, f"mpp {mpp} is not a plausible resolution (0.01 to 100 µm/px)")
    return mpp


def _parse_labels(text: str) -> list[int]:
    if not text.strip():
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) not in DEPOSIT_COLORS:
            valid = ", ".join(f"{k} ({v})" for k, v in DEPOSIT_DISPLAY.items())
            raise HTTPException(400, f"unknown deposit label {part!r}; valid: {valid}")
        out.append(int(part))
    return out


def _max_pixels(config: ServeConfig) -> int:
    return DEFAULT_MAX_PIXELS if config.max_pixels is None else int(config.max_pixels)


def _rel_message(text: str, real: Path, rel: str) -> str:
    """A reader's message with the server's absolute path replaced by the slide's name in the list."""
    return text.replace(str(real), rel)


def _write_png(path: Path, arr: np.ndarray) -> None:
    img = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"could not write {path}")


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
