"""``calcinosis serve``'s parts without the web stack: paths, sniffing, tiles, progress, queue, card."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import PATCH, mosaic, write_pyramid

from calcinosis.inference.region import predict_slide, predict_source
from calcinosis.inference.serve.card import model_card, training_data
from calcinosis.inference.serve.jobs import Job, JobQueue, QueueFull
from calcinosis.inference.serve.paths import SlidePathError, list_slides, resolve_slide
from calcinosis.inference.serve.progress import Cancelled, ProgressSource
from calcinosis.inference.serve.tiles import (
    deposit_layer,
    level_size,
    max_level,
    render_tile,
    shrink_to,
)
from calcinosis.inference.serve.uploads import describe_content, display_name, sniff
from calcinosis.inference.tiling import ArraySource
from calcinosis.model.labels import DEPOSIT_COLORS

# --------------------------------------------------------------------------- paths


def test_resolve_slide_inside_and_refusals(tmp_path):
    root = tmp_path / "slides"
    (root / "a").mkdir(parents=True)
    (root / "a" / "s.svs").write_bytes(b"x")
    (tmp_path / "secret.svs").write_bytes(b"x")
    (root / "out.svs").symlink_to(tmp_path / "secret.svs")
    (root / "dirlink").symlink_to(tmp_path)
    (root / "loop.svs").symlink_to(root / "loop.svs")
    assert resolve_slide(root, "a/s.svs") == (root / "a" / "s.svs").resolve()
    assert resolve_slide(root, "./a/s.svs") == (root / "a" / "s.svs").resolve()
    cases = {
        "out.svs": 403,
        "dirlink/secret.svs": 403,
        "../secret.svs": 400,
        "a/../../secret.svs": 400,
        str(tmp_path / "secret.svs"): 400,
        "~/secret.svs": 400,
        "C:/x.svs": 400,
        "a\x00.svs": 400,
        "a/none.svs": 404,
        "loop.svs": 400,
        "a": 400,
        "  ": 400,
    }
    for rel, status in cases.items():
        with pytest.raises(SlidePathError) as info:
            resolve_slide(root, rel)
        assert info.value.status == status, rel


def test_list_slides_skips_links_out_and_other_files(tmp_path):
    root = tmp_path / "slides"
    (root / "B").mkdir(parents=True)
    (root / "B" / "z.ndpi").write_bytes(b"x")
    (root / "a.SVS").write_bytes(b"x")
    (root / "readme.md").write_text("x")
    (root / ".hidden.svs").write_bytes(b"x")
    (tmp_path / "secret.svs").write_bytes(b"x")
    (root / "out.svs").symlink_to(tmp_path / "secret.svs")
    (root / "dirlink").symlink_to(tmp_path)
    assert [s["path"] for s in list_slides(root)] == ["a.SVS", "B/z.ndpi"]


# --------------------------------------------------------------------------- uploads


def test_sniff_by_content():
    assert sniff(PATCH.read_bytes()[:16]) == ("PNG", ".png")
    assert sniff(b"\xff\xd8\xff\xe0rest") == ("JPEG", ".jpg")
    assert sniff(b"II*\x00....") == ("TIFF", ".tif")
    assert sniff(b"MM\x00*....") == ("TIFF", ".tif")
    assert sniff(b"II+\x00....") == ("TIFF", ".tif")  # BigTIFF
    assert sniff(b"GIF89a") is None and sniff(b"") is None
    assert describe_content(b"hello\nworld\n") == "text"
    assert describe_content(b"%PDF-1.4") == "a PDF document"
    assert describe_content(bytes(range(256))) == "binary data of an unknown kind"


def test_display_name_drops_folders():
    assert display_name("../../etc/x.png") == "x.png"
    assert display_name("C:\\Users\\p\\case 1.png") == "case 1.png"
    assert display_name("") == "upload" and display_name(None) == "upload"


# --------------------------------------------------------------------------- tiles


def test_deep_zoom_levels():
    assert max_level(1, 1) == 0 and max_level(512, 384) == 9 and max_level(513, 10) == 10
    assert level_size(512, 384, 9) == (512, 384)
    assert level_size(512, 384, 8) == (256, 192)
    assert level_size(512, 384, 1) == (2, 2)
    assert level_size(512, 384, 0) == (1, 1)


def test_render_tile_reads_the_right_level_and_pixels(tmp_path):
    from calcinosis.inference.slide import open_slide

    pytest.importorskip("tiffslide")
    rgb = mosaic(8, 6)  # 512 x 384
    with open_slide(write_pyramid(tmp_path / "s.tif", rgb, mpp=0.5)) as slide:
        full = render_tile(slide, 9, 1, 1)  # level-0 pixels [256:512) x [256:384)
        assert np.array_equal(full, rgb[256:384, 256:512])
        half = render_tile(slide, 8, 0, 0)  # the whole image at half size: slide level 1
        want = slide.read_region(1, 0, 0, 256, 192)
        assert np.array_equal(half, want)
        tiny = render_tile(slide, 2, 0, 0)
        assert tiny.shape == (3, 4, 3)
        with pytest.raises(Exception, match="outside level"):
            render_tile(slide, 9, 2, 0)


def test_deposit_layer_colours_only_the_chosen_labels():
    lm = np.zeros((20, 20), np.uint8)
    lm[2:10, 2:10] = 1
    lm[12:18, 12:18] = 3
    layer = deposit_layer(lm, [1])
    assert (layer[..., 3] > 0).sum() == 64 and not layer[12:18, 12:18, 3].any()
    assert tuple(layer[5, 5, :3]) == DEPOSIT_COLORS[1]
    assert tuple(layer[2, 5, :3]) != DEPOSIT_COLORS[1]  # the darker outline
    both = deposit_layer(lm, [1, 3], outline=False)
    assert tuple(both[15, 15, :3]) == DEPOSIT_COLORS[3] and not both[0, 0, 3]
    assert shrink_to(np.zeros((100, 50), np.uint8), 20, nearest=True).shape == (20, 10)
    assert shrink_to(np.zeros((10, 5), np.uint8), 20, nearest=True).shape == (10, 5)


# --------------------------------------------------------------------------- progress


def test_progress_source_reports_and_cancels(robust_predictor):
    rgb = mosaic(8, 8)  # 512 x 512 at the model's mpp: tiled
    reports: list[tuple[float, str]] = []
    cancel = threading.Event()
    src = ProgressSource(ArraySource(rgb), lambda f, m: reports.append((f, m)), cancel)
    res = predict_source(robust_predictor, src, name="m")
    want = robust_predictor.predict(rgb)
    assert res.probabilities == want.probabilities and res.mode == "region"
    assert np.array_equal(res.label_map, want.label_map)
    fractions = [f for f, m in reports if m.startswith("predicting")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 3
    assert reports[0] == (0.0, "reading the image and finding the tissue")

    def stop_half_way(f: float, _m: str) -> None:
        if f >= 0.5:
            cancel.set()

    src = ProgressSource(ArraySource(rgb), stop_half_way, cancel)
    with pytest.raises(Cancelled):
        predict_source(robust_predictor, src, name="m")


def test_slide_prediction_through_the_wrapped_source(robust_predictor, tmp_path):
    pytest.importorskip("tiffslide")
    path = write_pyramid(tmp_path / "s.tif", mosaic(6, 5, margin=16), mpp=0.5)
    seen: list[float] = []
    plain = predict_slide(robust_predictor, path, region=(16, 16, 320, 256))
    wrapped = predict_slide(
        robust_predictor,
        path,
        region=(16, 16, 320, 256),
        wrap_source=lambda s: ProgressSource(s, lambda f, m: seen.append(f), threading.Event()),
    )
    assert wrapped.probabilities == plain.probabilities
    assert np.array_equal(wrapped.label_map, plain.label_map)
    assert seen and seen[-1] == 1.0
    assert wrapped.slide["max_read_px"] == plain.slide["max_read_px"] > 0


# --------------------------------------------------------------------------- queue


def _job(name: str, work) -> Job:
    return Job(kind="image", name=name, folder=Path("/nonexistent"), work=work)


def _wait_for(q: JobQueue, job: Job, *states: str) -> None:
    """Block until ``job`` is in one of ``states`` (the queue wakes waiters on each change)."""
    while job.state not in states:
        q.wait(job, job.version, 5)


def test_queue_runs_in_order_one_at_a_time_and_reports_errors():
    q = JobQueue(max_queued=10)
    order: list[str] = []
    running = []

    def work(job):
        running.append(1)
        assert len(running) == 1, "two jobs ran at once"
        order.append(job.name)
        time.sleep(0.01)
        running.pop()
        if job.name == "bad":
            raise ValueError("this image broke")
        if job.name == "bug":
            raise KeyError("oops")
        return {"name": job.name}

    jobs = [q.submit(_job(n, work)) for n in ("a", "bad", "b", "bug", "c")]
    for j in jobs:
        _wait_for(q, j, "done", "error", "cancelled")
    assert order == ["a", "bad", "b", "bug", "c"]
    assert [j.state for j in jobs] == ["done", "error", "done", "error", "done"]
    assert jobs[1].error == "this image broke"
    assert jobs[3].error.startswith("internal error: KeyError")
    assert jobs[2].result == {"name": "b"} and jobs[2].progress == 1.0
    # A finished job lets go of its work (and so of the decoded upload it closed over).
    assert all(j.work is not work for j in jobs)
    q.close()


def test_queue_full_and_forgetting_old_jobs(tmp_path):
    gate = threading.Event()
    q = JobQueue(max_queued=2, keep_finished=2)
    blocker = q.submit(_job("block", lambda j: gate.wait(10) and {}))
    _wait_for(q, blocker, "running")
    waiting = [q.submit(_job("w1", lambda j: {})), q.submit(_job("w2", lambda j: {}))]
    with pytest.raises(QueueFull, match="already waiting"):
        q.submit(_job("w3", lambda j: {}))
    gate.set()
    # The queue is full until the worker has taken w1 and w2; on a loaded machine that
    # takes a while after the gate opens, so wait for them rather than race the worker.
    for j in waiting:
        _wait_for(q, j, "done")
    folders = []
    for i in range(4):
        f = tmp_path / f"j{i}"
        f.mkdir()
        folders.append(f)
        _wait_for(q, q.submit(Job(kind="image", name=f"k{i}", folder=f, work=lambda j: {})), "done")
    assert q.get(blocker.id) is None and len([j for j in q.jobs() if j.state == "done"]) == 2
    assert not folders[0].exists() and folders[3].exists()
    q.close()


# --------------------------------------------------------------------------- card


def test_training_data_says_what_the_checkpoint_says(tmp_path):
    run = tmp_path / "runs" / "demo" / "train"
    run.mkdir(parents=True)
    ckpt = run / "best.safetensors"
    data = tmp_path / "runs" / "demo" / "data"
    data.mkdir(parents=True)
    (data / "manifest.csv").write_text("path,label\na.png,gout\nb.png,normal\n")

    def meta(source, manifest="runs/demo/data/manifest.csv"):
        return {
            "config": {
                "output_dir": "runs/demo/train",
                "data": {
                    "source": source,
                    "manifest": manifest,
                    "synthetic": {"n_per_class_stain": 40},
                },
            }
        }

    real = training_data(meta("manifest"), ckpt)
    assert real["synthetic"] is False and "2 patches" in real["text"]
    (data / "synthetic.json").write_text(json.dumps({"style": "mix", "mpp": 2.0}))
    syn = training_data(meta("manifest"), ckpt)
    assert syn["synthetic"] is True and syn["text"].startswith("Synthetic patches only: 2 patches")
    assert "style mix, 2.0 µm/px" in syn["text"]
    on_the_fly = training_data(meta("synthetic"), ckpt)
    assert on_the_fly["synthetic"] is True and "40 per class and stain" in on_the_fly["text"]
    gone = training_data(meta("manifest", "elsewhere/manifest.csv"), ckpt)
    assert gone["synthetic"] is None and "not found on this computer" in gone["text"]
    assert training_data({}, ckpt)["synthetic"] is None


def test_model_card_fields(robust_predictor, robust_checkpoint):
    card = model_card(robust_predictor, robust_checkpoint)
    assert card["notice"] == "For research use; not a diagnosis."
    assert card["input_size"] == 64 and card["mpp"] == 0.5 and card["tta"] == "none"
    assert card["region_tta"] == "none" and card["temperatures"] == {"none": 1.0}
    assert card["classes"] == robust_predictor.class_names
    assert card["backbone"] == "resnet10t" and card["tta_warning"] is None


# --------------------------------------------------------------------------- command line


def test_model_card_warns_when_tta_differs_from_the_calibration(tmp_path):
    """A mode run without a temperature fitted in it: the card says so, for which inputs.

    Patches run the checkpoint's mode (d4 here), tiled regions and slides one pass;
    a checkpoint with one temperature per mode (calibration.temperatures) needs no warning.
    """
    import torch

    from calcinosis.inference.predictor import Predictor
    from calcinosis.model import ModelConfig, create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="resnet10t", decoder_channels=16))
    meta = {
        "input_size": 64,
        "mpp": 0.5,
        "temperature": 1.3,
        "calibration": {"tta": "d4"},
        "config": {"inference": {"tta": "d4"}},
    }
    path = save_checkpoint(tmp_path / "d4.safetensors", model, meta)
    default = model_card(Predictor.from_checkpoint(path), path)
    assert default["tta"] == "d4" and default["region_tta"] == "none"
    assert default["temperatures"] == {"d4": 1.3, "none": 1.3}
    warning = default["tta_warning"]
    assert warning.startswith("tiled regions and slides: ") and "fitted with 'd4'" in warning
    assert "patches:" not in warning
    off = model_card(Predictor.from_checkpoint(path, tta="none"), path)
    assert off["tta"] == off["region_tta"] == "none"
    assert off["tta_warning"].startswith("test-time augmentation 'none'")
    assert model_card(Predictor.from_checkpoint(path, tta="d4"), path)["tta_warning"] is None
    meta["calibration"] = {"tta": "d4", "temperatures": {"d4": 1.3, "none": 1.1}}
    per_mode = save_checkpoint(tmp_path / "per_mode.safetensors", model, meta)
    both = model_card(Predictor.from_checkpoint(per_mode), per_mode)
    assert both["tta_warning"] is None and both["temperatures"] == {"d4": 1.3, "none": 1.1}


def test_serve_is_a_subcommand_with_safe_defaults(capsys):
    from calcinosis.model.cli import build_parser

    args = build_parser().parse_args(["serve", "--checkpoint", "m.safetensors"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.slides is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "serve" in capsys.readouterr().out


def test_serve_errors_are_clear(tmp_path, capsys, robust_checkpoint):
    from calcinosis.inference.cli import main

    rc = main(["serve", "--checkpoint", str(robust_checkpoint), "--slides", str(tmp_path / "no")])
    assert rc == 2 and "is not a folder" in capsys.readouterr().err
    rc = main(["serve", "--checkpoint", str(tmp_path / "missing.safetensors")])
    assert rc == 2


def test_bind_socket_and_hosts():
    from calcinosis.inference.serve.command import allowed_hosts, bind_socket
    from calcinosis.model.errors import CalcinosisError

    sock = bind_socket("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with pytest.raises(CalcinosisError, match="pick another with --port"):
            bind_socket("127.0.0.1", port)
    finally:
        sock.close()
    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts("0.0.0.0") == ["*"]
    assert "10.1.2.3" in allowed_hosts("10.1.2.3")


def test_background_server_answers_on_loopback(robust_predictor, robust_checkpoint, tmp_path):
    from urllib.request import urlopen

    from calcinosis.inference.serve.app import ServeConfig, create_app
    from calcinosis.inference.serve.command import BackgroundServer

    app = create_app(robust_predictor, ServeConfig(checkpoint=robust_checkpoint, work_dir=tmp_path))
    try:
        with BackgroundServer(app) as srv:
            assert srv.url.startswith("http://127.0.0.1:")
            body = json.loads(urlopen(srv.url + "api/model", timeout=10).read())
            assert body["card"]["notice"] == "For research use; not a diagnosis."
    finally:
        app.state.close()
