"""``calcinosis export --wsinfer DIR``: a model ``wsinfer run`` and QuPath's WSInfer extension take.

The fast tests load the TorchScript file here and compare it with the
Predictor. The slow ones install ``wsinfer`` 0.6.1 in a virtual environment of
its own (its pins clash with ours), validate ``config.json`` against the
schemas that ship inside ``wsinfer`` and ``wsinfer-zoo``, and run ``wsinfer
run`` on a small pyramidal TIFF: the per-tile probabilities it writes must be
our Predictor's on the same tiles within 1e-3.

That environment is kept in ``.cache/wsinfer-venv-0.6.1`` (or
``$CALCINOSIS_WSINFER_VENV``) and rebuilt when its requirements change. It is
installed from the package registry with the torch and torchvision builds that
lie on this project's machines, named explicitly so pip fetches no other.
``wsinfer``'s command line downloads its model-zoo registry when it starts;
the test hands it an empty local registry instead, so it runs offline.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from calcinosis.inference.cli import main as cli_main
from calcinosis.model.labels import CLASS_NAMES

REPO = Path(__file__).resolve().parents[1]
WSINFER_VERSION = "0.6.1"
#: What the separate environment holds. wsinfer 0.6.1 needs zarr < 3 (tiffslide's zarr
#: store) and reads slides with OpenSlide (wheels: openslide-python + openslide-bin).
WSINFER_REQUIREMENTS = (
    "torch==2.14.1",
    "torchvision==0.29.1",
    f"wsinfer=={WSINFER_VERSION}",
    "zarr<3",
    "openslide-python==1.4.7",
    "openslide-bin==4.0.1.2",
    "jsonschema",
)
#: Free disk the environment needs: torch's wheel (a CUDA build) unpacks to about 5.5 GB.
WSINFER_VENV_BYTES = 7 * 2**30
MPP = 0.5  # the tiny checkpoint's microns per pixel
SIZE = 64  # and its input side
#: A low temperature spreads the random network's probabilities far from uniform,
#: so a missing division by it, or any preprocessing slip, shows.
TEMPERATURE = 0.1


@pytest.fixture(scope="module")
def ws_checkpoint(tmp_path_factory, tiny_checkpoint_factory) -> Path:
    path = tmp_path_factory.mktemp("ws_ckpt") / "tiny.safetensors"
    return tiny_checkpoint_factory(path, SIZE, TEMPERATURE)


@pytest.fixture(scope="module")
def ws_model(ws_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ws_model") / "calcinosis-tiny"
    rc = cli_main(["export", "--checkpoint", str(ws_checkpoint), "--wsinfer", str(out)])
    assert rc == 0
    return out


def _load(path: Path):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def _as_wsinfer_feeds(patches: np.ndarray):
    """uint8 NHWC -> what torchvision's ToTensor makes of each patch, stacked."""
    import torch

    return torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0


def _patches(n: int, seed: int) -> np.ndarray:
    from calcinosis.training.synthetic import render_patch

    classes = [CLASS_NAMES[i % len(CLASS_NAMES)] for i in range(n)]
    return np.stack([render_patch(c, "he", seed + i, size=SIZE)[0] for i, c in enumerate(classes)])


def _predictor_probs(checkpoint: Path, patches: np.ndarray, tta: str = "none") -> np.ndarray:
    from calcinosis.inference.predictor import Predictor

    pred = Predictor.from_checkpoint(checkpoint, min_tissue_fraction=0.0, tta=tta)
    res = pred.predict_batch(list(patches), mpp=MPP)
    return np.array([[r.probabilities[c] for c in CLASS_NAMES] for r in res])


# --------------------------------------------------------------------------- fast


def test_export_writes_the_files_qupath_and_wsinfer_look_for(ws_model, ws_checkpoint):
    assert sorted(p.name for p in ws_model.iterdir()) == ["config.json", "torchscript_model.pt"]
    cfg = json.loads((ws_model / "config.json").read_text(encoding="utf-8"))
    assert cfg["spec_version"] == "1.0" and cfg["architecture"] == "resnet10t"
    assert cfg["num_classes"] == len(CLASS_NAMES) and cfg["class_names"] == list(CLASS_NAMES)
    assert cfg["patch_size_pixels"] == SIZE and cfg["spacing_um_px"] == MPP
    # QuPath's extension reads Resize's size as a number; the normalisation is in the model.
    assert cfg["transform"] == [
        {"name": "Resize", "arguments": {"size": SIZE}},
        {"name": "ToTensor"},
    ]
    info = cfg["calcinosis"]
    assert info["temperature"] == TEMPERATURE and info["tta"] == "none"
    assert (
        info["source_checkpoint"] == ws_checkpoint.name
        and len(info["source_checkpoint_sha256"]) == 64
    )


def test_torchscript_gives_calibrated_logits_for_any_batch(ws_model, ws_checkpoint):
    import torch

    from calcinosis.model import load_checkpoint

    ts = _load(ws_model / "torchscript_model.pt")
    patches = _patches(7, seed=100)
    x = _as_wsinfer_feeds(patches)
    with torch.no_grad():
        logits = ts(x)
        singles = torch.cat([ts(x[i : i + 1]) for i in range(len(x))])
    assert logits.shape == (7, len(CLASS_NAMES)) and logits.dtype == torch.float32
    torch.testing.assert_close(singles, logits, atol=1e-5, rtol=0)
    # Calibrated: the raw class logits of the network divided by the temperature.
    net, meta = load_checkpoint(ws_checkpoint, device="cpu")
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        raw = net.eval()((x - mean) / std)["class_logits"]
    torch.testing.assert_close(logits, raw / TEMPERATURE, atol=1e-4, rtol=1e-5)
    # What WSInfer and QuPath then show (softmax) is what predict reports.
    probs = logits.softmax(1).numpy()
    ours = _predictor_probs(ws_checkpoint, patches)
    assert np.abs(probs - ours).max() < 1e-5
    assert np.abs(raw.softmax(1).numpy() - ours).max() > 0.05  # the temperature matters here


def test_d4_test_time_augmentation_travels_inside_the_model(ws_checkpoint, tmp_path, capsys):
    import torch

    out = tmp_path / "d4"
    rc = cli_main(
        ["export", "--checkpoint", str(ws_checkpoint), "--wsinfer", str(out), "--wsinfer-tta", "d4"]
    )
    assert rc == 0
    assert "tta d4" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert cfg["calcinosis"]["tta"] == "d4"
    patches = _patches(3, seed=200)
    with torch.no_grad():
        probs = _load(out / "torchscript_model.pt")(_as_wsinfer_feeds(patches)).softmax(1).numpy()
    assert np.abs(probs - _predictor_probs(ws_checkpoint, patches, tta="d4")).max() < 1e-5
    assert np.abs(probs - _predictor_probs(ws_checkpoint, patches, tta="none")).max() > 1e-3


def test_the_model_divides_by_the_temperature_of_its_own_tta_mode(ws_checkpoint, tmp_path):
    """Calibration fits one temperature per mode (calibration.temperatures): a d4 model is
    divided by the d4 temperature, a one-pass model by the one-pass one, as Predictor does."""
    import torch

    from calcinosis.inference.predictor import Predictor
    from calcinosis.model import load_checkpoint, save_checkpoint

    net, meta = load_checkpoint(ws_checkpoint, device="cpu")
    temps = {"none": 0.1, "d4": 0.25}
    meta["calibration"] = {**meta["calibration"], "temperatures": temps}
    ckpt = save_checkpoint(tmp_path / "per_mode.safetensors", net, meta)
    patches = _patches(3, seed=300)
    x = _as_wsinfer_feeds(patches)
    for mode in ("none", "d4"):
        out = tmp_path / mode
        rc = cli_main(
            ["export", "--checkpoint", str(ckpt), "--wsinfer", str(out), "--wsinfer-tta", mode]
        )
        assert rc == 0
        cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
        pred = Predictor.from_checkpoint(ckpt, min_tissue_fraction=0.0, tta=mode)
        assert cfg["calcinosis"]["temperature"] == pred.temperatures[mode] == temps[mode]
        with torch.no_grad():
            probs = _load(out / "torchscript_model.pt")(x).softmax(1).numpy()
        res = pred.predict_batch(list(patches), mpp=MPP)
        ours = np.array([[r.probabilities[c] for c in CLASS_NAMES] for r in res])
        assert np.abs(probs - ours).max() < 1e-5


def test_onnx_and_wsinfer_in_one_export(ws_checkpoint, tmp_path, capsys):
    onnx = tmp_path / "m.onnx"
    rc = cli_main(
        ["export", "--checkpoint", str(ws_checkpoint), "--onnx", str(onnx), "--no-check"]
        + ["--wsinfer", str(tmp_path / "ws")]
    )
    assert rc == 0
    assert onnx.stat().st_size > 0 and (tmp_path / "ws" / "torchscript_model.pt").is_file()
    text = capsys.readouterr().out
    assert f"wrote {onnx}" in text and "max |TorchScript - predict|" in text


def test_export_errors_are_clear(ws_checkpoint, tmp_path, capsys):
    from calcinosis.model import save_checkpoint
    from calcinosis.model.checkpoint import load_checkpoint

    assert cli_main(["export", "--checkpoint", str(ws_checkpoint)]) == 2
    assert "give --onnx FILE, --wsinfer DIR or both" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli_main(["export", "--checkpoint", str(ws_checkpoint), "--wsinfer", str(a_file)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # A checkpoint without a pixel size cannot tell WSInfer what spacing to read at.
    net, meta = load_checkpoint(ws_checkpoint, device="cpu")
    dropped = ("mpp", "config", "model", "preprocessing")
    meta = {k: v for k, v in meta.items() if k not in dropped}
    no_mpp = save_checkpoint(tmp_path / "no_mpp.safetensors", net, meta)
    assert cli_main(["export", "--checkpoint", str(no_mpp), "--wsinfer", str(tmp_path / "w")]) == 2
    assert "spacing_um_px" in capsys.readouterr().err
    # Macenko runs before the network in predict; a TorchScript model fed by WSInfer would not.
    _, meta = load_checkpoint(ws_checkpoint, device="cpu")
    meta["preprocessing"] = {**meta["preprocessing"], "stain_normalize": "macenko"}
    macenko = save_checkpoint(tmp_path / "macenko.safetensors", net, meta)
    assert cli_main(["export", "--checkpoint", str(macenko), "--wsinfer", str(tmp_path / "m")]) == 2
    assert "normalises stains (macenko)" in capsys.readouterr().err


# --------------------------------------------------------------------------- slow: wsinfer


def _venv_python() -> Path:
    """The wsinfer environment's python, created (or rebuilt) when its stamp is stale."""
    root = Path(
        os.environ.get("CALCINOSIS_WSINFER_VENV")
        or REPO / ".cache" / f"wsinfer-venv-{WSINFER_VERSION}"
    )
    py = root / "bin" / "python"
    stamp = root / "calcinosis-requirements.txt"
    want = "\n".join(WSINFER_REQUIREMENTS) + "\n"
    if py.is_file() and stamp.is_file() and stamp.read_text() == want:
        return py
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < WSINFER_VENV_BYTES:
        # fail before pip fills the disk, which would break every test after this one
        pytest.fail(
            f"wsinfer's environment needs about {WSINFER_VENV_BYTES / 2**30:.0f} GiB free for "
            f"{root}, and {existing} has {free / 2**30:.1f} GiB: free disk space, or set "
            "CALCINOSIS_WSINFER_VENV to a folder on a larger disk"
        )
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", *WSINFER_REQUIREMENTS],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(
            "could not install wsinfer's environment from the package registry "
            f"({' '.join(WSINFER_REQUIREMENTS)}):\n{proc.stderr[-3000:]}"
        )
    stamp.write_text(want)
    return py


@pytest.fixture(scope="module")
def wsinfer_python() -> Path:
    return _venv_python()


def _run(py: Path, code: str, *args: str, cwd: Path, timeout: int = 600) -> str:
    home = cwd / "home"
    home.mkdir(exist_ok=True)  # wsinfer-zoo makes ~/.wsinfer-zoo at import
    env = {
        **os.environ,
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "WSINFER_FORCE_CPU": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [str(py), "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


VALIDATE = """
import json, sys
from pathlib import Path
import jsonschema, wsinfer, wsinfer_zoo
from wsinfer_zoo.client import ModelConfiguration
config = json.loads(Path(sys.argv[1]).read_text())
for pkg in (wsinfer, wsinfer_zoo):
    schema = Path(pkg.__file__).parent / "schemas" / "model-config.schema.json"
    jsonschema.validate(config, json.loads(schema.read_text()))
    print("valid against", schema.relative_to(Path(pkg.__file__).parent.parent))
mc = ModelConfiguration.from_dict(config)
print(mc.patch_size_pixels, mc.spacing_um_px, mc.get_slide_patch_size(float(sys.argv[2])))
"""

#: ``wsinfer`` with an empty model-zoo registry read from a local file (its command
#: line lists the zoo's models in an option's choices, fetched from a hub at import).
WSINFER_CLI = """
import json, sys
from pathlib import Path
import wsinfer_zoo.client as zoo
registry = Path("empty-registry.json")
registry.write_text(json.dumps({"models": {}}))
_load = zoo.load_registry
zoo.load_registry = lambda registry_file=None: _load(registry)
from wsinfer.cli.cli import cli
cli(args=sys.argv[1:], prog_name="wsinfer")
"""


@pytest.mark.slow
def test_config_is_valid_for_wsinfer(wsinfer_python, ws_model, tmp_path):
    out = _run(wsinfer_python, VALIDATE, str(ws_model / "config.json"), str(MPP), cwd=tmp_path)
    assert "valid against wsinfer/schemas/model-config.schema.json" in out
    assert "valid against wsinfer_zoo/schemas/model-config.schema.json" in out
    assert out.strip().splitlines()[-1] == f"{SIZE} {MPP} {SIZE}"


def _write_slide(path: Path) -> np.ndarray:
    """A 1024 x 1024 two-level pyramidal TIFF at 0.5 um/px: a synthetic H&E region on
    the top 768 rows, blank glass below; returns its level-0 pixels."""
    import cv2
    import tifffile

    from calcinosis.training.synthetic import render_region

    rgb, _ = render_region(1024, 768, seed=7, tile=128, workers=1)
    slide = np.full((1024, 1024, 3), 242, np.uint8)
    slide[:768] = rgb
    half = cv2.resize(slide, (512, 512), interpolation=cv2.INTER_AREA)
    res = 1e4 / MPP  # pixels per centimetre
    opts = {"photometric": "rgb", "compression": "zlib", "metadata": None, "tile": (256, 256)}
    with tifffile.TiffWriter(path) as tw:
        tw.write(slide, resolution=(res, res), resolutionunit="CENTIMETER", **opts)
        tw.write(
            half, resolution=(res / 2, res / 2), resolutionunit="CENTIMETER", subfiletype=1, **opts
        )
    return slide


@pytest.mark.slow
def test_wsinfer_run_matches_predict_tile_by_tile(
    wsinfer_python, ws_model, ws_checkpoint, tmp_path
):
    slides = tmp_path / "slides"  # wsinfer wants a folder of slides and nothing else
    slides.mkdir()
    level0 = _write_slide(slides / "case.tif")
    results = tmp_path / "results"
    _run(
        wsinfer_python,
        WSINFER_CLI,
        *("--backend", "openslide", "run", "-i", str(slides), "-o", str(results)),
        *("-c", str(ws_model / "config.json"), "-p", str(ws_model / "torchscript_model.pt")),
        *("-b", "16", "-n", "1"),  # -n 0 fails in wsinfer 0.6.1's GeoJSON step
        cwd=tmp_path,
    )
    with open(results / "model-outputs-csv" / "case.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[4:] == [f"prob_{c}" for c in CLASS_NAMES]
    # The tiles: wsinfer's grid of 64 px patches at level 0 (spacing = the slide's mpp, so
    # no resizing), every one whose centre lies in its tissue mask: the whole region,
    # nothing on the blank glass below it.
    boxes = np.array([[int(r[k]) for k in ("minx", "miny", "width", "height")] for r in rows])
    assert (boxes[:, 2:] == SIZE).all()
    assert (boxes[:, :2] % SIZE == 0).all()
    assert len({(x, y) for x, y, _, _ in boxes}) == len(boxes)
    assert (boxes[:, 1] + SIZE <= 768).all(), "a tile on blank glass"
    assert len(boxes) == (1024 // SIZE) * (768 // SIZE)
    theirs = np.array([[float(r[f"prob_{c}"]) for c in CLASS_NAMES] for r in rows])
    crops = np.stack([level0[y : y + h, x : x + w] for x, y, w, h in boxes])
    ours = _predictor_probs(ws_checkpoint, crops)
    diff = float(np.abs(theirs - ours).max())
    print(f"wsinfer run vs predict on {len(rows)} tiles: max |p| difference {diff:.2e}")
    assert diff < 1e-3
    assert theirs.max() > 0.5  # not a uniform answer that would match anything
    # Its GeoJSON (one tile each) is there for QuPath too.
    gj = json.loads((results / "model-outputs-geojson" / "case.geojson").read_text())
    assert len(gj["features"]) == len(rows)
