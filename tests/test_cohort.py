"""``calcinosis predict-cohort``: one folder per slide, done-markers, reruns, Dask vs in-process.

The slides are small pyramidal TIFFs written here (``helpers.write_pyramid``);
the model is the tiny 64 px checkpoint of conftest.py.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import mosaic, write_pyramid

pytest.importorskip("tifffile")
pytest.importorskip("tiffslide")

from calcinosis.inference import cohort  # noqa: E402
from calcinosis.model.cli import main  # noqa: E402
from calcinosis.model.errors import CalcinosisError  # noqa: E402
from calcinosis.model.fileio import file_digest  # noqa: E402

#: (file name, mosaic columns, rows, margin) of the good slides.
SLIDES = [("a", 3, 2, 16), ("b", 2, 2, 40), ("c", 4, 1, 8), ("d", 2, 3, 24), ("e", 3, 3, 0)]


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory) -> Path:
    """Five good slides (read at level 0) and one corrupt file, listed in a cohort CSV."""
    folder = tmp_path_factory.mktemp("cohort")
    (folder / "slides").mkdir()
    rows = []
    for name, c, r, m in SLIDES:
        write_pyramid(folder / "slides" / f"{name}.tif", mosaic(c, r, margin=m), mpp=0.5)
        rows.append({"path": f"slides/{name}.tif", "case_id": f"case-{name}", "level": "0"})
    (folder / "slides" / "broken.svs").write_bytes(b"II*\x00" + os.urandom(500))
    rows.insert(2, {"path": "slides/broken.svs", "case_id": "case-broken", "level": ""})
    # One slide listed with a region and its own mpp column.
    rows[-1]["region"] = "0,0,160,128"
    rows[-1]["mpp"] = "0.5"
    path = folder / "cohort.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "case_id", "level", "region", "mpp"])
        w.writeheader()
        w.writerows(rows)
    return path


def predict_cohort(csv_path: Path, ckpt: Path, out: Path, *extra: str) -> int:
    return main(
        ["predict-cohort", str(csv_path), "--checkpoint", str(ckpt), "--out", str(out), *extra]
    )


def summary(out: Path) -> list[dict[str, str]]:
    with open(out / "cohort.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def marker_mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "slides").glob("*/done.json")}


def slide_rows(out: Path) -> dict[str, dict[str, str]]:
    """Each slide's predictions.csv row, without its absolute path."""
    rows = {}
    for f in sorted((out / "slides").glob("*/predictions.csv")):
        with open(f, newline="") as fh:
            (row,) = list(csv.DictReader(fh))
        row.pop("path")
        rows[f.parent.name] = row
    return rows


@pytest.fixture(scope="module")
def in_process(cohort_csv, robust_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort_out") / "run"
    assert predict_cohort(cohort_csv, robust_checkpoint, out, "--no-dask") == 3
    return out


# --------------------------------------------------------------------------- CSV


def test_read_cohort_names_options_and_bad_rows(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text(
        'path,case_id,level,region,mpp\nx/one.svs,A 1,1,,0.25\ny/one.svs,,,"10,20,30,40",\n'
        "z.svs,,-1,,\nw.svs,A 1,,,abc\n"
    )
    slides = cohort.read_cohort(p)
    assert [s.name for s in slides] == ["A_1", "one", "z", "A_1-2"]
    assert slides[0].path == tmp_path / "x" / "one.svs"
    assert (slides[0].level, slides[0].mpp, slides[0].error) == (1, 0.25, None)
    assert slides[1].region == (10, 20, 30, 40) and slides[1].error is None
    assert "level '-1'" in slides[2].error
    assert "mpp" in slides[3].error
    (tmp_path / "bad.csv").write_text("file\na.svs\n")
    with pytest.raises(CalcinosisError, match="'path' column"):
        cohort.read_cohort(tmp_path / "bad.csv")


# --------------------------------------------------------------------------- in-process


@pytest.mark.slow
def test_every_slide_gets_its_folder_and_the_corrupt_one_is_reported(in_process):
    rows = summary(in_process)
    assert [r["case_id"] for r in rows] == [
        "case-a",
        "case-b",
        "case-broken",
        "case-c",
        "case-d",
        "case-e",
    ]
    by = {r["case_id"]: r for r in rows}
    assert by["case-broken"]["status"] == "error" and by["case-broken"]["reason"]
    good = [r for r in rows if r["case_id"] != "case-broken"]
    assert all(r["status"] != "error" and r["prediction"] for r in good), good
    assert all(float(r["seconds"]) > 0 for r in good)
    for r in good:
        folder = in_process / "slides" / r["name"]
        assert (folder / "predictions.json").is_file()
        assert (folder / "overlays" / f"{Path(r['path']).stem}.png").is_file()
        assert (folder / "geojson" / f"{Path(r['path']).stem}.geojson").is_file()
        marker = json.loads((folder / "done.json").read_text())
        assert (
            marker["checkpoint_sha256"]
            == json.loads((in_process / "cohort.json").read_text())["checkpoint_sha256"]
        )
    # The region listed for slide e was honoured.
    rec = json.loads((in_process / "slides" / "case-e" / "predictions.json").read_text())
    assert rec["results"][0]["slide"]["region"] == [0, 0, 160, 128]
    # No temporary folders are left behind.
    assert not list((in_process / "slides").glob(".tmp-*"))
    doc = json.loads((in_process / "cohort.json").read_text())
    assert doc["statuses"].get("error") == 1 and doc["model_loads"] == 1


@pytest.mark.slow
def test_rerun_skips_done_slides_and_redoes_failures(
    in_process, cohort_csv, robust_checkpoint, capsys
):
    before = marker_mtimes(in_process)
    capsys.readouterr()
    assert predict_cohort(cohort_csv, robust_checkpoint, in_process, "--no-dask") == 3
    assert "5 already done, 1 to predict" in capsys.readouterr().out
    after = marker_mtimes(in_process)
    assert {k for k in before if before[k] != after[k]} == {"case-broken"}
    # The summary is rebuilt from the folders even when it was lost.
    (in_process / "cohort.csv").unlink()
    (in_process / "cohort.json").unlink()
    assert predict_cohort(cohort_csv, robust_checkpoint, in_process, "--no-dask") == 3
    assert len(summary(in_process)) == 6


@pytest.mark.slow
def test_half_written_folders_are_not_done(in_process, cohort_csv, robust_checkpoint, capsys):
    slides = in_process / "slides"
    # A killed run: slide a's temporary copy (even with a marker) but no folder;
    # slide b's folder without its marker.
    tmp = slides / ".tmp-case-a-deadbeef"
    shutil.copytree(slides / "case-a", tmp)
    shutil.rmtree(slides / "case-a")
    (slides / "case-b" / "done.json").unlink()
    capsys.readouterr()
    predict_cohort(cohort_csv, robust_checkpoint, in_process, "--no-dask")
    # a (only a temporary copy), b (no marker) and the corrupt slide are redone.
    assert "3 already done, 3 to predict" in capsys.readouterr().out
    assert (slides / "case-a" / "done.json").is_file()
    assert (slides / "case-b" / "done.json").is_file()
    assert not tmp.exists()
    assert all(r["status"] != "missing" for r in summary(in_process))


@pytest.mark.slow
def test_changed_checkpoint_or_options_redo_everything(
    in_process, cohort_csv, tiny_checkpoint_factory, tmp_path, capsys
):
    other = tiny_checkpoint_factory(tmp_path / "other.safetensors", 64, 2.0)
    before = marker_mtimes(in_process)
    capsys.readouterr()
    # Another checkpoint, the same options: every slide is redone.
    predict_cohort(cohort_csv, other, in_process, "--no-dask")
    assert "0 already done, 6 to predict" in capsys.readouterr().out
    after = marker_mtimes(in_process)
    assert all(after[k] != before[k] for k in before)
    doc = json.loads((in_process / "cohort.json").read_text())
    assert doc["checkpoint_sha256"] == file_digest(other)
    # The same checkpoint, another option: redone again.
    predict_cohort(cohort_csv, other, in_process, "--no-dask", "--no-overlays")
    assert "0 already done, 6 to predict" in capsys.readouterr().out
    # Without overlays this time: the old overlays went with the old folders.
    assert not list((in_process / "slides").glob("*/overlays/*.png"))


def test_slide_is_done_needs_same_digest_options_and_success(tmp_path):
    (tmp_path / "done.json").write_text(
        json.dumps({"checkpoint_sha256": "abc", "options": {"level": 0}, "status": "ok"})
    )
    assert cohort.slide_is_done(tmp_path, "abc", {"level": 0})
    assert not cohort.slide_is_done(tmp_path, "abd", {"level": 0})
    assert not cohort.slide_is_done(tmp_path, "abc", {"level": 1})
    # The folder of another slide (a reordered CSV with duplicate stems) is not this one's.
    (tmp_path / "done.json").write_text(
        json.dumps({"path": "/a/x.svs", "checkpoint_sha256": "abc", "options": {}, "status": "ok"})
    )
    assert cohort.slide_is_done(tmp_path, "abc", {}, "/a/x.svs")
    assert not cohort.slide_is_done(tmp_path, "abc", {}, "/b/x.svs")
    (tmp_path / "done.json").write_text('{"checkpoint_sha256": "abc", "opt')  # truncated
    assert not cohort.slide_is_done(tmp_path, "abc", {"level": 0})
    assert not cohort.slide_is_done(tmp_path / "nothing", "abc", {"level": 0})


# --------------------------------------------------------------------------- Dask


@pytest.mark.slow
def test_dask_local_cluster_matches_in_process(
    cohort_csv, robust_checkpoint, tmp_path_factory, in_process
):
    pytest.importorskip("distributed")
    # A clean in-process reference (the other tests change in_process's folder).
    ref = tmp_path_factory.mktemp("cohort_ref") / "run"
    assert predict_cohort(cohort_csv, robust_checkpoint, ref, "--no-dask", "--quiet") == 3
    out = tmp_path_factory.mktemp("cohort_dask") / "run"
    assert predict_cohort(cohort_csv, robust_checkpoint, out, "--workers", "2") == 3
    a, b = slide_rows(ref), slide_rows(out)
    assert a.keys() == b.keys() and len(a) == 6
    for name in a:
        for k in a[name]:
            if k.startswith("p_"):
                va, vb = a[name][k], b[name][k]
                assert (va == vb == "") or abs(float(va) - float(vb)) < 1e-3, (name, k)
            else:
                assert a[name][k] == b[name][k], (name, k)
    sa = [{k: v for k, v in r.items() if k != "seconds"} for r in summary(ref)]
    sb = [{k: v for k, v in r.items() if k != "seconds"} for r in summary(out)]
    assert sa == sb
    doc = json.loads((out / "cohort.json").read_text())
    # Each of the two workers loaded the model at most once for its slides.
    assert 1 <= doc["model_loads"] <= 2
    ga = json.loads((ref / "slides" / "case-a" / "geojson" / "a.geojson").read_text())
    gb = json.loads((out / "slides" / "case-a" / "geojson" / "a.geojson").read_text())
    assert len(ga["features"]) == len(gb["features"])
    for fa, fb in zip(ga["features"], gb["features"], strict=True):
        np.testing.assert_allclose(
            np.asarray(fa["geometry"]["coordinates"][0], float),
            np.asarray(fb["geometry"]["coordinates"][0], float),
        )


try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    WorkerPlugin = object


class _DieOnce(WorkerPlugin):
    """A worker plugin: the first worker to start a slide task exits at once (os._exit),
    as a worker killed mid-slide would; a flag file makes it happen once per cohort."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith("slide-"):
            try:
                fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(key).encode())
            os.close(fd)
            os._exit(1)


@pytest.mark.slow
def test_attached_cluster_survives_a_dying_worker(cohort_csv, robust_checkpoint, tmp_path):
    """--scheduler: a worker dies at the start of a slide; the slide is retried elsewhere and
    every slide finishes, with no temporary folder taken as done."""
    distributed = pytest.importorskip("distributed")
    flag = tmp_path / "died"
    out = tmp_path / "run"
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.register_plugin(_DieOnce(str(flag)), name="die-once")
        rc = predict_cohort(
            cohort_csv, robust_checkpoint, out, "--scheduler", cluster.scheduler_address
        )
    assert flag.is_file(), "no worker died: the test did not test anything"
    assert rc == 3  # the corrupt slide only
    rows = summary(out)
    assert [r["status"] == "error" for r in rows] == [r["case_id"] == "case-broken" for r in rows]
    name = flag.read_text().removeprefix("slide-").rsplit("-", 1)[0]  # slide-<name>-<random>
    assert (out / "slides" / name / "done.json").is_file()
    assert not list((out / "slides").glob(".tmp-*"))


# --------------------------------------------------------------------------- killed runs
# predict-cohort as a subprocess in its own process group, on a longer cohort (the five
# good slides three times over, and the corrupt one), killed while slides are running.

CLI = "import sys; from calcinosis.model.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def long_cohort_csv(cohort_csv) -> Path:
    with open(cohort_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    good = [r for r in rows if r["case_id"] != "case-broken"]
    more = [{**r, "case_id": f"{r['case_id']}-{k}"} for k in range(3) for r in good]
    more.insert(4, next(r for r in rows if r["case_id"] == "case-broken"))
    path = cohort_csv.with_name("long.csv")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(more)
    return path


def start_cohort(csv_path: Path, ckpt: Path, out: Path, *extra: str):
    import subprocess
    import sys

    cmd = [sys.executable, "-c", CLI, "predict-cohort", str(csv_path), "--checkpoint", str(ckpt)]
    return subprocess.Popen(
        [*cmd, "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, Dask workers included
    )


def wait_for_markers(proc, out: Path, total: int, timeout: float = 120.0) -> None:
    """Until at least one slide has its done-marker and not all of them do."""
    import time

    deadline = time.monotonic() + timeout
    while not finished_ok(out):
        assert proc.poll() is None, f"the run ended first:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, "no slide finished in time"
        time.sleep(0.01)
    assert len(finished_ok(out)) < total - 1, "every slide finished before the kill"


def finished_ok(out: Path) -> dict[str, int]:
    """The done-markers (mtimes) of slide folders (not temporaries) finished without error;
    safe to call while a run renames folders."""
    done = {}
    for folder in (out / "slides").glob("*") if (out / "slides").is_dir() else []:
        if folder.name.startswith(cohort.TMP_PREFIX):
            continue
        try:
            mtime = (folder / "done.json").stat().st_mtime_ns
            status = json.loads((folder / "done.json").read_text())["status"]
        except (OSError, ValueError):
            continue
        if status != "error":
            done[folder.name] = mtime
    return done


def assert_complete(out: Path, n: int) -> None:
    """Every slide has a whole folder (marker, tables, overlay, outlines); no temporaries."""
    rows = summary(out)
    assert len(rows) == n
    assert not list((out / "slides").glob(".tmp-*"))
    assert sorted(p.name for p in (out / "slides").iterdir()) == sorted(r["name"] for r in rows)
    for r in rows:
        folder, stem = out / "slides" / r["name"], Path(r["path"]).stem
        assert (folder / "done.json").is_file(), r
        if r["case_id"] == "case-broken":
            assert r["status"] == "error", r
            continue
        assert r["status"] not in ("error", "missing") and r["prediction"], r
        for f in ("predictions.csv", "predictions.json", f"overlays/{stem}.png"):
            assert (folder / f).is_file(), (r["name"], f)
        assert json.loads((folder / "geojson" / f"{stem}.geojson").read_text())["features"]


@pytest.mark.slow
def test_sigkilled_run_resumes_without_redoing_finished_slides(
    long_cohort_csv, robust_checkpoint, tmp_path
):
    """The whole run (process group) is SIGKILLed mid-cohort; the rerun finishes the rest."""
    import signal

    out = tmp_path / "run"
    total = len(cohort.read_cohort(long_cohort_csv))
    proc = start_cohort(long_cohort_csv, robust_checkpoint, out, "--no-dask")
    try:
        wait_for_markers(proc, out, total)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = finished_ok(out)
    assert done and not (out / "cohort.csv").exists()
    proc = start_cohort(long_cohort_csv, robust_checkpoint, out, "--no-dask")
    log = proc.communicate()[0]
    assert proc.returncode == 3, log  # the corrupt slide only
    left = total - len(done)
    assert f"{total} slide(s): {len(done)} already done, {left} to predict" in log, log
    after = marker_mtimes(out)
    assert {k: after[k] for k in done} == done  # the finished slides were not redone
    assert_complete(out, total)


def test_local_cluster_workers_keep_glibcs_dynamic_mmap_threshold():
    """Dask's nanny default MALLOC_TRIM_THRESHOLD_ (page faults on every batch) is not passed
    to the LocalCluster's workers; their BLAS/OpenMP threads are the cores per worker."""
    env = cohort._worker_environ(3)
    assert "MALLOC_TRIM_THRESHOLD_" not in env
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == 3


def test_one_local_cluster_worker_per_gpu_each_on_its_own(monkeypatch):
    # No GPU here: the pinning rule is checked with fake Dask workers.
    from types import SimpleNamespace

    import dask.distributed

    assert cohort.cuda_devices("cpu") == 0 and cohort.cuda_devices("cuda:1") == 0
    assert cohort.worker_device("cuda", 4) == "cuda"  # not on a worker (--no-dask)
    names = iter([0, 1, 5, "tcp-worker"])
    monkeypatch.setattr(dask.distributed, "get_worker", lambda: SimpleNamespace(name=next(names)))
    assert [cohort.worker_device("cuda", 4) for _ in range(4)] == [
        "cuda:0",
        "cuda:1",
        "cuda:1",
        "cuda",
    ]
    # asked for one GPU, or a CPU, or an attached cluster (no pinning): as given
    assert cohort.worker_device("cuda:2", 4) == "cuda:2"
    assert cohort.worker_device("cpu", 4) == "cpu"
    assert cohort.worker_device("cuda", 0) == "cuda"
