"""``calcinosis serve``: every endpoint and every bad input, through FastAPI's TestClient.

The app runs the tiny random-weight checkpoint of conftest (64 px, 0.5 um/px,
threshold 0: every patch is called). Slides are small pyramidal TIFFs made
here from the fixture patches; the slides folder also holds things that must
never be served: a link out of it, a damaged slide, a text file.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import PATCH, follow, huge_png, mosaic, png_bytes, write_pyramid

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from calcinosis.inference.cli import main as cli_main  # noqa: E402
from calcinosis.inference.serve.app import VENDOR_OSD, ServeConfig, create_app  # noqa: E402
from calcinosis.inference.serve.jobs import Job  # noqa: E402
from calcinosis.model.imageio import read_rgb  # noqa: E402

BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def serve_slides(tmp_path_factory) -> Path:
    """slides/case.tif (512 x 384 at 0.5 um/px), sub/small.tif, plus things to refuse."""
    root = tmp_path_factory.mktemp("serve_slides")
    slides = root / "slides"
    (slides / "sub").mkdir(parents=True)
    write_pyramid(slides / "case.tif", mosaic(7, 5, margin=32), mpp=0.5)
    write_pyramid(slides / "sub" / "small.tif", mosaic(3, 2, margin=16), mpp=0.5)
    (slides / "damaged.svs").write_text("this is not a slide\n")
    (slides / "notes.txt").write_text("case notes\n")
    outside = write_pyramid(root / "outside.tif", mosaic(2, 2), mpp=0.5)
    (slides / "link_out.tif").symlink_to(outside)
    (slides / "link_in.tif").symlink_to(slides / "sub" / "small.tif")
    return slides


@pytest.fixture(scope="module")
def serve_client(robust_predictor, robust_checkpoint, serve_slides, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve_work")
    config = ServeConfig(checkpoint=robust_checkpoint, work_dir=work, slides_dir=serve_slides)
    app = create_app(robust_predictor, config)
    with TestClient(app, base_url=BASE) as client:
        client.work_dir = work
        yield client


def post_image(client, data: bytes, name: str = "patch.png", **form) -> tuple[int, dict]:
    r = client.post("/api/predict", files={"file": (name, data, "image/png")}, data=form)
    return r.status_code, r.json()


def predict_done(client, data: bytes, name: str = "patch.png") -> dict:
    status, job = post_image(client, data, name)
    assert status == 202, job
    done = follow(client, job)
    assert done["state"] == "done", done
    return done


# --------------------------------------------------------------------------- page and card


def test_page_and_static_files(serve_client):
    r = serve_client.get("/")
    assert r.status_code == 200 and "Model card" in r.text and "/static/app.js" in r.text
    assert serve_client.get("/static/app.js").status_code == 200
    assert serve_client.get("/static/style.css").status_code == 200
    assert serve_client.get("/static/../app.py").status_code == 404
    if VENDOR_OSD.is_dir():
        r = serve_client.get("/vendor/openseadragon/openseadragon.min.js")
        assert r.status_code == 200 and "OpenSeadragon" in r.text[:2000]


def test_model_card(serve_client, robust_predictor):
    body = serve_client.get("/api/model").json()
    card = body["card"]
    assert card["notice"] == "For research use; not a diagnosis."
    assert card["classes"] == robust_predictor.class_names
    assert card["stains"] == robust_predictor.stain_names
    assert card["mpp"] == 0.5 and card["input_size"] == 64
    assert card["temperature"] == 1.0 and card["indeterminate_threshold"] == 0.0
    assert card["checkpoint"] == "tiny.safetensors" and len(card["checkpoint_sha256"]) == 12
    # The tiny checkpoint records configs/ci.yaml's training data: generated on the fly.
    assert card["trained_on"]["synthetic"] is True
    assert "4 per class and stain" in card["trained_on"]["text"]
    assert body["slides_enabled"] is True
    assert body["deposit_names"]["1"] == "Calcium deposit"


def test_unknown_host_is_refused(serve_client):
    """A page elsewhere that rebinds its DNS name to 127.0.0.1 gets nothing."""
    r = serve_client.get("/api/model", headers={"Host": "attacker.example"})
    assert r.status_code == 400


# --------------------------------------------------------------------------- images


def test_patch_prediction_and_downloads(serve_client, robust_predictor):
    done = predict_done(serve_client, PATCH.read_bytes(), PATCH.name)
    res = done["result"]
    rec = res["record"]
    want = robust_predictor.predict(read_rgb(PATCH))
    assert rec["prediction"] == want.prediction and rec["status"] == want.status
    assert rec["probabilities"] == pytest.approx(want.probabilities, abs=1e-6)
    assert rec["stain"] == want.stain and rec["mode"] == "patch"
    assert rec["name"] == "he_0000" and rec["path"] == PATCH.name
    assert set(res["files"]) == {"csv", "json", "overlay", "geojson"}
    jid = done["id"]
    r = serve_client.get(f"/api/jobs/{jid}/files/csv")
    assert r.status_code == 200 and "he_0000.predictions.csv" in r.headers["content-disposition"]
    row = next(csv.DictReader(io.StringIO(r.text)))
    assert float(row["p_calcinosis_cutis"]) == pytest.approx(
        want.probabilities["calcinosis_cutis"], abs=1e-4
    )
    gj = serve_client.get(f"/api/jobs/{jid}/files/geojson").json()
    assert gj["type"] == "FeatureCollection"
    assert len(gj["features"]) == len(rec["lesions"])
    overlay = serve_client.get(f"/api/jobs/{jid}/files/overlay")
    assert overlay.headers["content-type"] == "image/png"
    assert cv2.imdecode(np.frombuffer(overlay.content, np.uint8), cv2.IMREAD_COLOR) is not None
    assert serve_client.get(f"/api/jobs/{jid}/files/json").json()["results"][0]["name"] == "he_0000"
    # The picture the page shows, and the deposit layer with only the labels asked for.
    img = serve_client.get(f"/api/jobs/{jid}/image")
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    present = res["display"]["labels_present"]
    assert present, "the random tiny model paints some deposit labels"
    lab = present[0]
    layer = decode_rgba(serve_client.get(f"/api/jobs/{jid}/deposits", params={"labels": lab}))
    lm = cv2.resize(
        want.label_map, (layer.shape[1], layer.shape[0]), interpolation=cv2.INTER_NEAREST
    )
    assert ((layer[..., 3] > 0) == (lm == lab)).all()
    none = decode_rgba(serve_client.get(f"/api/jobs/{jid}/deposits", params={"labels": ""}))
    assert not none[..., 3].any()


def decode_rgba(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    bgra = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA)


def test_blank_and_blurred_images_say_why_there_is_no_call(serve_client, robust_predictor):
    white = png_bytes(np.full((64, 64, 3), 250, np.uint8))
    rec = predict_done(serve_client, white, "glass.png")["result"]["record"]
    assert rec["status"] == "no_tissue" and "blank glass" in rec["reason"]
    assert rec["prediction"] is None and rec["probabilities"] == {}
    sharp = read_rgb(PATCH)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 3)
    want = robust_predictor.predict(blurred)
    assert want.status == "out_of_focus"
    rec = predict_done(serve_client, png_bytes(blurred), "blurred.png")["result"]["record"]
    assert rec["status"] == "out_of_focus" and rec["reason"] == want.reason
    assert "refocus" in rec["reason"]


def test_bad_job_requests(serve_client):
    assert serve_client.get("/api/jobs/nope").status_code == 404
    done = predict_done(serve_client, PATCH.read_bytes())
    jid = done["id"]
    r = serve_client.get(f"/api/jobs/{jid}/files/tiles")
    assert r.status_code == 404 and "has no 'tiles' file" in r.json()["detail"]
    assert serve_client.get(f"/api/jobs/{jid}/files/..%2F..%2Fetc%2Fpasswd").status_code == 404
    r = serve_client.get(f"/api/jobs/{jid}/deposits", params={"labels": "1,9"})
    assert r.status_code == 400 and "unknown deposit label '9'" in r.json()["detail"]
    listed = serve_client.get("/api/jobs").json()
    assert any(j["id"] == jid for j in listed) and all(j["result"] is None for j in listed)


def test_mpp_is_taken_and_checked(serve_client, robust_predictor):
    status, body = post_image(serve_client, PATCH.read_bytes(), mpp="fine")
    assert status == 400 and "not a number" in body["detail"]
    status, body = post_image(serve_client, PATCH.read_bytes(), mpp="-1")
    assert status == 400 and "plausible" in body["detail"]
    status, job = post_image(serve_client, PATCH.read_bytes(), mpp="0.25")
    done = follow(serve_client, job)
    want = robust_predictor.predict(read_rgb(PATCH), mpp=0.25)
    rec = done["result"]["record"]
    assert rec["mpp"] == 0.25 and not rec["mpp_assumed"]
    assert rec["probabilities"] == pytest.approx(want.probabilities, abs=1e-6)


@pytest.fixture(scope="module")
def serve_bad_uploads() -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, expected HTTP status, words the message must contain)."""
    patch = PATCH.read_bytes()
    _, gif = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
    return {
        "text.png": (
            b"Patient 12, left shin: nodules\n" * 20,
            415,
            "content is text, not an image",
        ),
        "truncated.png": (patch[: len(patch) // 2], 422, "truncated"),
        "huge.png": (huge_png(20000, 20000), 413, "20000 x 20000"),
        "empty.png": (b"", 400, "empty"),
        "anim.gif": (b"GIF89a" + bytes(64), 415, "a GIF image"),
        "report.pdf": (b"%PDF-1.7\n" + bytes(64), 415, "a PDF document"),
        "header_only.png": (patch[:40], 422, "its header is damaged"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "text.png",
        "truncated.png",
        "huge.png",
        "empty.png",
        "anim.gif",
        "report.pdf",
        "header_only.png",
    ],
)
def test_bad_upload_is_a_clear_4xx_and_the_server_keeps_serving(
    serve_client, serve_bad_uploads, name
):
    data, status, words = serve_bad_uploads[name]
    got, body = post_image(serve_client, data, name)
    assert got == status, body
    assert body["detail"].startswith(f"{name}: ") and words in body["detail"], body
    # Nothing of the refused upload is left behind, and the next image is predicted.
    assert predict_done(serve_client, PATCH.read_bytes())["result"]["record"]["status"] == "ok"


def test_form_without_a_file(serve_client):
    r = serve_client.post("/api/predict", data={"mpp": "0.5"})
    assert r.status_code == 400 and "form field named 'file'" in r.json()["detail"]
    r = serve_client.post(
        "/api/predict", content=b"garbage", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 400


def test_client_file_name_cannot_leave_the_job_folder(serve_client):
    done = predict_done(serve_client, PATCH.read_bytes(), "../../../../tmp/evil/passwd.png")
    rec = done["result"]["record"]
    assert rec["name"] == "passwd" and rec["path"] == "passwd.png"
    work = serve_client.work_dir.resolve()
    for p in work.rglob("*"):
        assert p.resolve().is_relative_to(work)
    assert not Path("/tmp/evil").exists()


def test_sniffed_by_content_not_by_name(serve_client):
    """A PNG named .jpg is read as the PNG it is; a JPEG named .png as a JPEG."""
    done = predict_done(serve_client, PATCH.read_bytes(), "really_a_png.jpg")
    assert done["result"]["record"]["status"] == "ok"
    ok, jpg = cv2.imencode(".jpg", cv2.imread(str(PATCH)))
    done = predict_done(serve_client, jpg.tobytes(), "really_a_jpeg.png")
    assert done["result"]["record"]["status"] == "ok"
    assert list(serve_client.work_dir.glob(f"{done['id']}/input/upload.jpg"))


def test_upload_size_limit(robust_predictor, robust_checkpoint, tmp_path):
    app = create_app(
        robust_predictor,
        ServeConfig(checkpoint=robust_checkpoint, work_dir=tmp_path, max_upload_bytes=20_000),
    )
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8))
    assert len(big) > 100_000
    with TestClient(app, base_url=BASE) as client:
        r = client.post("/api/predict", files={"file": ("big.png", big, "image/png")})
        assert r.status_code == 413 and "over this server's limit" in r.json()["detail"]
        # Without a Content-Length (chunked), the limit holds as the bytes arrive.
        head = (
            b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )
        r = client.post(
            "/api/predict",
            content=iter([head] + [big[:50_000]] * 6),
            headers={"content-type": "multipart/form-data; boundary=zz"},
        )
        assert r.status_code == 413
        # Under the limit, a patch still goes through.
        status, job = post_image(client, PATCH.read_bytes())
        assert status == 202 and follow(client, job)["state"] == "done"


# --------------------------------------------------------------------------- the same files as predict


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def serve_default_client(robust_checkpoint, tmp_path_factory):
    """The app with the predictor exactly as ``calcinosis serve --checkpoint X`` loads it."""
    from calcinosis.inference.serve.command import load_predictor
    from calcinosis.model.cli import build_parser

    args = build_parser().parse_args(["serve", "--checkpoint", str(robust_checkpoint)])
    config = ServeConfig(checkpoint=robust_checkpoint, work_dir=tmp_path_factory.mktemp("work"))
    with TestClient(create_app(load_predictor(args), config), base_url=BASE) as client:
        yield client


@pytest.mark.parametrize("kind", ["patch", "region"])
def test_downloads_are_the_files_calcinosis_predict_writes(
    serve_default_client, robust_checkpoint, tmp_path, kind
):
    """One code path: the page's CSV, JSON, GeoJSON, overlay and tables equal predict's."""
    serve_client = serve_default_client
    if kind == "patch":
        src = PATCH
    else:  # 320 x 256 px: tiled (region mode), with a tile and a lesion table
        src = tmp_path / "region.png"
        src.write_bytes(png_bytes(mosaic(5, 4)))
    out = tmp_path / "cli"
    rc = cli_main(
        ["predict", str(src), "--checkpoint", str(robust_checkpoint), "--out", str(out)]
        + ["--quiet", "--workers", "1"]
    )
    assert rc == 0
    done = predict_done(serve_client, src.read_bytes(), src.name)
    files = done["result"]["files"]
    cli = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    cli_rec = cli["results"][0]
    expect = {"csv", "json", *cli_rec["outputs"]}
    assert set(files) == expect
    if kind == "region":
        assert {"tiles", "lesions"} <= set(files)

    def get(key: str):
        r = serve_client.get(f"/api/jobs/{done['id']}/files/{key}")
        assert r.status_code == 200
        return r

    # predictions.csv: the same row but for the path (the server never sees the client's).
    row = next(csv.DictReader(io.StringIO(get("csv").text)))
    cli_row = _rows(out / "predictions.csv")[0]
    assert row.keys() == cli_row.keys()
    assert row.pop("path") == src.name and cli_row.pop("path") == str(src)
    assert row == cli_row
    # predictions.json: the same record, and the same run header but for timings.
    page = get("json").json()
    rec = page["results"][0]
    for r in (rec, cli_rec):
        r.pop("path")
        r.pop("source")
    assert rec == cli_rec
    assert page.keys() == cli.keys()
    for k in cli:
        if k not in (
            "created",
            "seconds",
            "seconds_after_load",
            "cpu_seconds_after_load",
            "results",
        ):
            assert page[k] == cli[k], k
    # GeoJSON, overlay PNG and the tables: byte for byte (the GeoJSON but for its image path).
    gj, cli_gj = (
        get("geojson").json(),
        json.loads((out / cli_rec["outputs"]["geojson"]).read_text()),
    )
    assert gj["properties"].pop("image") == src.name
    cli_gj["properties"].pop("image")
    assert gj == cli_gj
    assert get("overlay").content == (out / cli_rec["outputs"]["overlay"]).read_bytes()
    for key in ("tiles", "lesions"):
        if key in files:
            assert get(key).content == (out / cli_rec["outputs"][key]).read_bytes()


# --------------------------------------------------------------------------- queue, progress, cancel


def test_second_request_is_queued_not_lost_and_a_queued_job_can_be_cancelled(serve_client):
    queue = serve_client.app.state.queue
    gate = threading.Event()
    started = threading.Event()

    def hold(job):
        started.set()
        assert gate.wait(30)
        return {}

    blocker = queue.submit(
        Job(kind="image", name="blocker", folder=Path("/nonexistent"), work=hold)
    )
    assert started.wait(30)
    try:
        s1, first = post_image(serve_client, PATCH.read_bytes(), "first.png")
        s2, second = post_image(serve_client, PATCH.read_bytes(), "second.png")
        s3, third = post_image(serve_client, PATCH.read_bytes(), "third.png")
        assert (s1, s2, s3) == (202, 202, 202)
        assert [first["state"], second["state"], third["state"]] == ["queued"] * 3
        assert [first["position"], second["position"], third["position"]] == [1, 2, 3]
        r = serve_client.post(f"/api/jobs/{second['id']}/cancel")
        assert r.json()["state"] == "cancelled"
        now = serve_client.get(f"/api/jobs/{third['id']}").json()
        assert now["position"] == 2
        # A long poll returns when something changes, not only at its timeout.
        r = serve_client.get(f"/api/jobs/{first['id']}", params={"since": 10**9, "wait": 0.2})
        assert r.json()["state"] == "queued"
    finally:
        gate.set()
    assert follow(serve_client, first)["state"] == "done"
    assert follow(serve_client, third)["state"] == "done"
    assert (
        follow(serve_client, {"id": blocker.id, "state": "queued", "version": 0})["state"] == "done"
    )
    again = serve_client.get(f"/api/jobs/{second['id']}").json()
    assert again["state"] == "cancelled" and again["result"] is None


def test_region_progress_is_reported_and_a_running_job_can_be_cancelled(serve_client):
    big = png_bytes(mosaic(24, 24))  # 1536 x 1536 px: 1000+ tiles of the tiny model
    status, job = post_image(serve_client, big, "large_region.png")
    assert status == 202
    snap = job
    while not (snap["state"] == "running" and snap["progress"] > 0):
        assert snap["state"] in ("queued", "running"), snap
        snap = serve_client.get(
            f"/api/jobs/{job['id']}", params={"since": snap["version"], "wait": 5}
        ).json()
    assert "predicting tiles" in snap["message"] and snap["progress"] < 1
    serve_client.post(f"/api/jobs/{job['id']}/cancel")
    final = follow(serve_client, snap)
    assert final["state"] == "cancelled" and final["result"] is None
    # The worker is free again.
    assert predict_done(serve_client, PATCH.read_bytes())["state"] == "done"


# --------------------------------------------------------------------------- slides


def test_slide_list_shows_only_slides_inside_the_folder(serve_client):
    body = serve_client.get("/api/slides").json()
    assert body["enabled"] is True
    paths = [s["path"] for s in body["slides"]]
    assert paths == ["case.tif", "damaged.svs", "link_in.tif", "sub/small.tif"]


def test_slide_info_and_tiles(serve_client):
    info = serve_client.get("/api/slides/info", params={"path": "case.tif"}).json()
    assert (info["width"], info["height"]) == (7 * 64 + 64, 5 * 64 + 64)
    assert info["mpp"] == pytest.approx(0.5) and info["reader"] == "tiffslide"
    assert info["max_level"] == 9 and info["tile_size"] == 256
    top = serve_client.get(
        "/api/slides/tile", params={"path": "case.tif", "level": 9, "col": 1, "row": 0}
    )
    assert top.status_code == 200 and top.headers["content-type"] == "image/jpeg"
    px = cv2.imdecode(np.frombuffer(top.content, np.uint8), cv2.IMREAD_COLOR)
    assert px.shape == (256, 256, 3)
    low = serve_client.get(
        "/api/slides/tile", params={"path": "case.tif", "level": 1, "col": 0, "row": 0}
    )
    assert cv2.imdecode(np.frombuffer(low.content, np.uint8), cv2.IMREAD_COLOR).shape == (2, 2, 3)
    for params in ({"level": 10}, {"level": 9, "col": 2}, {"level": 9, "row": -1}):
        r = serve_client.get("/api/slides/tile", params={"path": "case.tif", **params})
        assert r.status_code == 404, params


ESCAPES = [
    ("../outside.tif", 400, "contains '..'"),
    ("sub/../../outside.tif", 400, "contains '..'"),
    ("/etc/passwd.tif", 400, "is absolute"),
    ("link_out.tif", 403, "outside the slides folder"),
    ("missing.tif", 404, "no slide"),
    ("notes.txt", 400, "not a whole-slide file type"),
    ("sub", 400, "not a whole-slide file type"),
    ("sub\\small.tif", 400, "backslash"),
    ("", 400, "no slide path"),
    ("damaged.svs", 422, "cannot read slide"),
]


@pytest.mark.parametrize("path,status,words", ESCAPES)
@pytest.mark.parametrize("endpoint", ["info", "tile", "predict"])
def test_slide_paths_outside_or_bad_are_refused(serve_client, endpoint, path, status, words):
    if endpoint == "predict":
        r = serve_client.post("/api/slides/predict", json={"path": path, "region": None})
    else:
        params = {"path": path, "level": 0, "col": 0, "row": 0}
        r = serve_client.get(f"/api/slides/{endpoint}", params=params)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert "/serve_slides" not in r.json()["detail"]  # no server paths in messages


def test_linked_slide_inside_the_folder_is_served(serve_client):
    r = serve_client.get("/api/slides/info", params={"path": "link_in.tif"})
    assert r.status_code == 200 and r.json()["width"] == 3 * 64 + 32


def test_slide_region_prediction(serve_client):
    r = serve_client.post(
        "/api/slides/predict", json={"path": "case.tif", "region": "32,32,256,192"}
    )
    assert r.status_code == 202, r.text
    done = follow(serve_client, r.json())
    assert done["state"] == "done", done
    assert done["slide"] == "case.tif" and done["region"] == [32, 32, 256, 192]
    res = done["result"]
    rec = res["record"]
    assert rec["mode"] == "region" and rec["slide"]["region"] == [32, 32, 256, 192]
    assert res["layer"] == {"x": 32.0, "y": 32.0, "width": 256.0, "height": 192.0}
    assert {"csv", "json", "overlay", "geojson", "tiles", "lesions"} <= set(res["files"])
    gj = serve_client.get(f"/api/jobs/{done['id']}/files/geojson").json()
    pts = np.array(
        [pt for f in gj["features"] for ring in _rings(f["geometry"]) for pt in ring], float
    )
    assert len(pts) and (pts[:, 0] >= 32).all() and (pts[:, 0] <= 32 + 256).all()
    assert (pts[:, 1] >= 32).all() and (pts[:, 1] <= 32 + 192).all()
    layer = decode_rgba(
        serve_client.get(
            f"/api/jobs/{done['id']}/deposits",
            params={"labels": ",".join(map(str, res["display"]["labels_present"]))},
        )
    )
    assert layer.shape[:2] == (192, 256) and layer[..., 3].any()
    # The result stays: the slide's info lists it for the viewer.
    info = serve_client.get("/api/slides/info", params={"path": "case.tif"}).json()
    assert done["id"] in [j["id"] for j in info["jobs"]]


def _rings(geom: dict):
    if geom["type"] == "Polygon":
        yield from geom["coordinates"]
    else:
        for poly in geom["coordinates"]:
            yield from poly


def test_whole_slide_prediction(serve_client):
    r = serve_client.post("/api/slides/predict", json={"path": "sub/small.tif"})
    done = follow(serve_client, r.json())
    assert done["state"] == "done" and done["region"] == [0, 0, 3 * 64 + 32, 2 * 64 + 32]


@pytest.mark.parametrize(
    "body,words",
    [
        ({"path": "case.tif", "region": "1,2,3"}, "X,Y,W,H"),
        ({"path": "case.tif", "region": "0,0,0,10"}, "X,Y,W,H"),
        ({"path": "case.tif", "region": "400,300,200,200"}, "does not lie inside"),
        (["case.tif"], "JSON object"),
    ],
)
def test_bad_slide_regions(serve_client, body, words):
    r = serve_client.post("/api/slides/predict", json=body)
    assert r.status_code == 400 and words in r.json()["detail"], r.text
    r = serve_client.post("/api/slides/predict", content=b"{not json")
    assert r.status_code == 400


def test_no_slides_folder(robust_predictor, robust_checkpoint, tmp_path):
    app = create_app(robust_predictor, ServeConfig(checkpoint=robust_checkpoint, work_dir=tmp_path))
    with TestClient(app, base_url=BASE) as client:
        assert client.get("/api/slides").json() == {"enabled": False, "slides": []}
        r = client.get("/api/slides/info", params={"path": "case.tif"})
        assert r.status_code == 404 and "--slides DIR" in r.json()["detail"]
        assert client.get("/api/model").json()["slides_enabled"] is False
