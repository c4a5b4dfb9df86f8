"""The page as a pathologist uses it, in headless Chromium (Debian's ``chromium``, driven by Playwright).

A real server (uvicorn on a free loopback port) runs the model as
``calcinosis serve`` loads it; the browser drops a fixture patch and a small
region, and the probabilities shown must be ``calcinosis predict``'s for the
same files; a label is toggled off and disappears from the deposit layer; the
GeoJSON is downloaded and equals predict's; a text file shows its error; a
small pyramidal TIFF opens in the viewer, a region is typed, another drawn
with the mouse, and both come back as layers.

Playwright drives the system browser (``executable_path``); nothing is
downloaded at run time. Without chromium these tests skip, except in CI
(``CI`` set), where they must run: ``.ci/run`` installs chromium.
Screenshots go to a temporary folder, and also to ``$CALCINOSIS_SCREENSHOT_DIR``
when set (``make screenshots`` writes docs/ with the demo model,
``$CALCINOSIS_SERVE_CHECKPOINT``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import PATCH

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require_browser() -> None:
    missing = []
    if CHROMIUM is None:
        missing.append("Debian's chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[dev]'; never `playwright install`)")
    if missing:
        what = " and ".join(missing)
        if IN_CI:
            pytest.fail(f"the browser tests must run in CI, but {what} is missing")
        pytest.skip(f"browser tests need {what}")


@pytest.fixture(scope="module")
def ui_checkpoint(robust_checkpoint) -> Path:
    """The tiny test model, or ``$CALCINOSIS_SERVE_CHECKPOINT`` (the demo model, for screenshots)."""
    env = os.environ.get("CALCINOSIS_SERVE_CHECKPOINT")
    return Path(env) if env else robust_checkpoint


@pytest.fixture(scope="module")
def ui_files(ui_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The inputs: a fixture patch, a 256 x 256 region, a slide at the model's mpp, a text file."""
    from helpers import write_pyramid

    from calcinosis.inference.predictor import Predictor
    from calcinosis.training.synthetic import render_region

    mpp = Predictor.from_checkpoint(ui_checkpoint).model_mpp or 0.5
    root = tmp_path_factory.mktemp("ui_files")
    rgb, labels = render_region(768, 512, seed=3, tile=128, mpp=mpp, workers=1)
    region = root / "region_256.png"
    cv2.imwrite(str(region), cv2.cvtColor(rgb[128:384, 256:512], cv2.COLOR_RGB2BGR))
    slides = root / "slides"
    slides.mkdir()
    write_pyramid(slides / "case_7.tif", rgb, mpp=mpp)
    notes = root / "notes.png"
    notes.write_text("Biopsy 7, left shin: firm white nodules\n")
    glass = root / "glass.png"
    cv2.imwrite(str(glass), np.full((64, 64, 3), 248, np.uint8))
    return {
        "patch": PATCH,
        "region": region,
        "slides": slides,
        "notes": notes,
        "glass": glass,
        "typed_region": _deposit_window(labels, 448, 320),
    }


def _deposit_window(labels: np.ndarray, w: int, h: int, step: int = 32) -> str:
    """``x,y,w,h`` of the w x h window holding the most deposit pixels of the drawn slide.

    Where the generator puts its nodules depends on the mpp it draws at (the
    model's), so a fixed box can miss them all; this one holds deposits at any.
    """
    integ = cv2.integral((labels > 0).astype(np.uint8))  # as TissueMap counts tissue
    ys = np.arange(0, labels.shape[0] - h + 1, step)[:, None]
    xs = np.arange(0, labels.shape[1] - w + 1, step)[None, :]
    counts = integ[ys + h, xs + w] - integ[ys, xs + w] - integ[ys + h, xs] + integ[ys, xs]
    iy, ix = np.unravel_index(np.argmax(counts), counts.shape)  # the first best, row by row
    assert counts[iy, ix] > 0, "the fixture slide has no deposits"
    return f"{xs[0, ix]},{ys[iy, 0]},{w},{h}"


@pytest.fixture(scope="module")
def ui_predict(ui_checkpoint, ui_files, tmp_path_factory) -> Path:
    """``calcinosis predict`` on the patch and the region: what the page must show."""
    from calcinosis.inference.cli import main

    out = tmp_path_factory.mktemp("ui_predict")
    args = ["predict", str(ui_files["patch"]), str(ui_files["region"])]
    rc = main(args + ["--checkpoint", str(ui_checkpoint), "--out", str(out), "--quiet"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def ui_server(ui_checkpoint, ui_files, tmp_path_factory):
    _require_browser()
    from calcinosis.inference.serve.app import ServeConfig, create_app
    from calcinosis.inference.serve.command import BackgroundServer, load_predictor
    from calcinosis.model.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--checkpoint", str(ui_checkpoint), "--slides", str(ui_files["slides"])]
    )
    config = ServeConfig(
        checkpoint=ui_checkpoint,
        work_dir=tmp_path_factory.mktemp("ui_work"),
        slides_dir=ui_files["slides"],
    )
    app = create_app(load_predictor(args), config)
    try:
        with BackgroundServer(app) as srv:
            yield srv.url
    finally:
        app.state.close()


@pytest.fixture(scope="module")
def ui_browser(ui_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def ui_shots(tmp_path_factory) -> list[Path]:
    """Where screenshots go: a temporary folder, and $CALCINOSIS_SCREENSHOT_DIR when set."""
    dirs = [tmp_path_factory.mktemp("screens")]
    extra = os.environ.get("CALCINOSIS_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        dirs.append(Path(extra))
    return dirs


@pytest.fixture
def page(ui_browser, ui_server):
    context = ui_browser.new_context(
        viewport={"width": 1440, "height": 1000}, accept_downloads=True
    )
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(ui_server)
    pg.wait_for_selector("body[data-ready='1']", timeout=20000)
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shoot(pg, dirs: list[Path], name: str, full_page: bool = False) -> None:
    for d in dirs:
        pg.screenshot(path=str(d / name), full_page=full_page)


def drop(pg, paths: list[Path]) -> None:
    """Drop files onto the drop zone as a browser does (a DataTransfer on drag events)."""
    files = [[p.name, base64.b64encode(p.read_bytes()).decode()] for p in paths]
    pg.evaluate(
        """(files) => {
            const dt = new DataTransfer();
            for (const [name, b64] of files) {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                dt.items.add(new File([bytes], name, { type: "image/png" }));
            }
            const zone = document.getElementById("drop");
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
            }
        }""",
        files,
    )


def result_card(pg, name: str):
    card = pg.locator(f"article.result[data-name='{name}']")
    card.locator(".call, .error").first.wait_for(timeout=60000)
    return card


def _records(out: Path) -> dict[str, dict]:
    """predict's records by file name, full precision (the table rounds to 4 digits)."""
    data = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    return {Path(r["path"]).name: r for r in data["results"]}


def test_drop_patches_and_see_predicts_probabilities(page, ui_files, ui_predict, ui_shots):
    card_text = page.locator("#model-card").inner_text()
    assert "For research use; not a diagnosis." in card_text
    assert "Trained on" in card_text and "Calibration" in card_text
    drop(page, [ui_files["patch"], ui_files["region"]])
    records = _records(ui_predict)
    threshold = page.evaluate("state.threshold")
    for name in (ui_files["patch"].name, ui_files["region"].name):
        card = result_card(page, name)
        want = records[name]
        shown = {
            r.get_attribute("data-class"): r.locator(".pval").inner_text()
            for r in card.locator(".prow").all()
        }
        assert shown, f"no probabilities shown for {name}"
        for cls, text in shown.items():
            assert text == f"{100 * want['probabilities'][cls]:.1f}%", (name, cls)
        assert set(shown) == set(want["probabilities"])
        call = card.locator(".call-text").inner_text()
        assert call.lower() == want["prediction"].replace("_", " ").lower()
        # The indeterminate threshold is drawn on every bar, where it lies.
        marks = card.locator(".thr")
        assert marks.count() == len(shown)
        assert marks.first.get_attribute("style") == f"left:{100 * threshold:.2f}%"
        assert card.locator(".stain strong").inner_text()
        assert card.locator("a.dl[data-key='geojson']").count() == 1
    shoot(page, ui_shots, "serve_patches.png", full_page=True)


def _layer_pixels(pg, name: str, rgb: list[int]) -> int:
    """Pixels of one colour in the deposit layer drawn over the picture."""
    return pg.evaluate(
        """([name, rgb]) => {
            const img = document.querySelector(`article.result[data-name="${name}"] img.layer`);
            const c = document.createElement("canvas");
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            const ctx = c.getContext("2d");
            ctx.drawImage(img, 0, 0);
            const d = ctx.getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) {
                if (d[i + 3] > 0 && d[i] === rgb[0] && d[i + 1] === rgb[1] && d[i + 2] === rgb[2]) n++;
            }
            return n;
        }""",
        [name, rgb],
    )


def _wait_layer(pg, name: str, labels: str) -> None:
    pg.wait_for_function(
        """([name, labels]) => {
            const img = document.querySelector(`article.result[data-name="${name}"] img.layer`);
            return img && img.src.endsWith("labels=" + labels) && img.complete && img.naturalWidth > 0;
        }""",
        arg=[name, labels],
        timeout=20000,
    )


def test_toggle_a_label_pick_a_deposit_and_download_the_geojson(
    page, ui_files, ui_predict, ui_shots, tmp_path
):
    name = ui_files["patch"].name
    drop(page, [ui_files["patch"]])
    card = result_card(page, name)
    toggles = card.locator(".toggles input[type=checkbox]")
    labels = [toggles.nth(i).get_attribute("data-label") for i in range(toggles.count())]
    assert labels, "the patch has deposit labels to toggle"
    colors = page.evaluate("state.colors")
    _wait_layer(page, name, ",".join(labels))
    first = labels[0]
    assert _layer_pixels(page, name, colors[first]) > 0
    toggles.first.uncheck()
    _wait_layer(page, name, ",".join(labels[1:]))
    assert _layer_pixels(page, name, colors[first]) == 0
    for other in labels[1:]:
        assert _layer_pixels(page, name, colors[other]) > 0
    # Opacity is the slider's.
    card.locator("input.opacity").fill("20")
    assert card.locator("img.layer").evaluate("(e) => e.style.opacity") == "0.2"
    # Clicking a deposit in the list shows where it is.
    card.locator("table.lesions tbody tr").first.click()
    assert card.locator(".pick-box").is_visible()
    with page.expect_download() as info:
        card.locator("a.dl[data-key='geojson']").click()
    saved = tmp_path / info.value.suggested_filename
    info.value.save_as(saved)
    assert saved.name == "he_0000.geojson"
    got = json.loads(saved.read_text(encoding="utf-8"))
    want = json.loads((ui_predict / "geojson" / "he_0000.geojson").read_text(encoding="utf-8"))
    assert got["properties"].pop("image") == name
    want["properties"].pop("image")
    assert got == want


def test_a_text_file_shows_its_error_and_the_page_goes_on(page, ui_files, ui_shots):
    drop(page, [ui_files["notes"], ui_files["glass"]])
    card = result_card(page, "notes.png")
    assert "refused (HTTP 415)" in card.locator(".badge").inner_text()
    msg = card.locator(".error").inner_text()
    assert "content is text, not an image" in msg and "PNG, JPEG, TIFF" in msg
    # Blank glass is no error: it is read, and the page says why there is no call.
    glass = result_card(page, "glass.png")
    assert glass.locator(".call-text").inner_text() == "no tissue"
    assert "blank glass or background" in glass.locator(".reason").inner_text()
    assert glass.locator(".prow").count() == 0
    shoot(page, ui_shots, "serve_refused.png")
    drop(page, [ui_files["patch"]])
    assert result_card(page, ui_files["patch"].name).locator(".call").count() == 1


def test_open_a_slide_predict_typed_and_drawn_regions(page, ui_files, ui_shots):
    tiles: list[int] = []
    page.on("response", lambda r: tiles.append(r.status) if "/api/slides/tile" in r.url else None)
    page.click("#tab-slides")
    page.click("button.slide-link[data-path='case_7.tif']")
    page.wait_for_selector("#viewer[data-open='1']", timeout=20000)
    page.wait_for_function("state.base && state.base.getFullyLoaded()", timeout=30000)
    assert tiles and all(s == 200 for s in tiles)
    assert "768 × 512 px" in page.locator("#slide-meta").inner_text()
    # A typed region.
    typed = ui_files["typed_region"]  # the window with the most deposit pixels
    page.fill("#region", typed)
    page.click("#predict-region")
    page.wait_for_selector("article.slide-result", timeout=120000)
    # The map is a PNG that OpenSeadragon loads after the card is drawn: wait for it
    # (the slide and its map).
    page.wait_for_function("state.viewer.world.getItemCount() == 2", timeout=20000)
    first = page.locator("article.slide-result").first
    assert first.locator(".prow").count() == 5
    assert f"Region {typed}" in first.locator("h3").inner_text()
    # A region drawn with the mouse fills the box in level-0 pixels.
    page.click("#draw")
    box = page.locator("#viewer").bounding_box()
    x0, y0 = box["x"] + box["width"] * 0.30, box["y"] + box["height"] * 0.35
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + 120, y0 + 90, steps=8)
    page.mouse.up()
    drawn = page.input_value("#region")
    parts = [int(v) for v in drawn.split(",")]
    assert len(parts) == 4 and parts[2] > 20 and parts[3] > 20, drawn
    page.click("#predict-region")
    page.wait_for_function("document.querySelectorAll('article.slide-result').length == 2")
    page.wait_for_function("state.viewer.world.getItemCount() == 3", timeout=20000)
    page.evaluate("state.viewer.viewport.goHome(true)")
    page.wait_for_timeout(800)
    page.wait_for_function("state.viewer.world.getItemAt(0).getFullyLoaded()", timeout=30000)
    shoot(page, ui_shots, "serve_slide_overview.png")
    # Fade the maps, pick a deposit: the viewer zooms to it.
    page.locator("#slide-opacity").fill("70")
    assert page.evaluate("state.viewer.world.getItemAt(1).getOpacity()") == pytest.approx(0.7)
    rows = page.locator("article.slide-result table.lesions tbody tr")
    assert rows.count() > 0, "the regions have deposits to pick"
    rows.first.click()
    page.wait_for_selector(".pick-rect")
    page.wait_for_timeout(1500)
    page.wait_for_function("state.viewer.world.getItemAt(0).getFullyLoaded()", timeout=30000)
    shoot(page, ui_shots, "serve_slide.png")
