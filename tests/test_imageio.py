"""Robust image reading: every odd file a scanner or export script produces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calcinosis.model import imageio
from calcinosis.model.errors import ImageReadError
from calcinosis.model.imageio import (
    IMAGE_EXTENSIONS,
    image_size,
    is_image_file,
    read_mask,
    read_rgb,
    write_png,
)


def _rgb(h: int = 16, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_bytes(tmp_path: Path) -> bytes:
    p = tmp_path / "src.png"
    Image.fromarray(_rgb(32, 32)).save(p)
    return p.read_bytes()


# --------------------------------------------------------------------------- bad files


def _truncated_png(tmp_path: Path) -> Path:
    data = _png_bytes(tmp_path)
    p = tmp_path / "truncated.png"
    p.write_bytes(data[: len(data) * 2 // 3])
    return p


def _truncated_jpeg(tmp_path: Path) -> Path:
    src = tmp_path / "src.jpg"
    Image.fromarray(_rgb(64, 64)).save(src, quality=90)
    data = src.read_bytes()
    p = tmp_path / "truncated.jpg"
    p.write_bytes(data[: int(len(data) * 0.8)])
    return p


def _zero_bytes(tmp_path: Path) -> Path:
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    return p


def _text_png(tmp_path: Path) -> Path:
    p = tmp_path / "notes.png"
    p.write_text("this is a text file with an image suffix\n")
    return p


def _directory(tmp_path: Path) -> Path:
    p = tmp_path / "folder.png"
    p.mkdir()
    return p


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "does_not_exist.png"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_truncated_png, "truncated"),
        (_truncated_jpeg, "truncated"),
        (_zero_bytes, "empty"),
        (_text_png, "not an image"),
        (_directory, "folder"),
        (_missing, "not found"),
    ],
)
def test_bad_files_raise_image_read_error_naming_path_and_reason(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageReadError) as info:
        read_rgb(path)
    msg = str(info.value)
    assert str(path) in msg
    assert reason in msg
    # The same contract holds for masks and for header-only size queries.
    with pytest.raises(ImageReadError, match="cannot read image"):
        read_mask(path)
    if make is not _truncated_png and make is not _truncated_jpeg:  # headers are intact there
        with pytest.raises(ImageReadError):
            image_size(path)


def test_truncated_is_not_loaded_as_partial_image(tmp_path):
    # PIL's global LOAD_TRUNCATED_IMAGES must stay off: a half image is a bad sample.
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageReadError):
        read_rgb(_truncated_jpeg(tmp_path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pixel_limit_names_the_limit_and_how_to_lift_it(tmp_path):
    p = tmp_path / "big.png"
    Image.fromarray(_rgb(40, 50)).save(p)
    with pytest.raises(ImageReadError) as info:
        read_rgb(p, max_pixels=1000)
    msg = str(info.value)
    assert str(p) in msg and "1,000" in msg and "2,000" in msg
    assert "max_pixels" in msg and imageio.MAX_PIXELS_ENV in msg
    assert read_rgb(p, max_pixels=2000).shape == (40, 50, 3)
    assert read_rgb(p, max_pixels=0).shape == (40, 50, 3)  # 0 = no limit


def test_pil_decompression_bomb_error_never_escapes(tmp_path, monkeypatch):
    p = tmp_path / "img.png"
    Image.fromarray(_rgb(64, 64)).save(p)
    # Another library lowered PIL's global guard far below this image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert read_rgb(p, max_pixels=0).shape == (64, 64, 3)
    assert image_size(p) == (64, 64)
    with pytest.raises(ImageReadError, match="1,000"):
        read_rgb(p, max_pixels=1000)


def test_default_limit_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(imageio.MAX_PIXELS_ENV, "12345")
    assert imageio._default_max_pixels() == 12345
    monkeypatch.delenv(imageio.MAX_PIXELS_ENV)
    assert imageio._default_max_pixels() == 100_000_000


# --------------------------------------------------------------------------- odd but valid files


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    p = tmp_path / "gray.png"
    Image.fromarray(g, mode="L").save(p)
    out = read_rgb(p)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 20, 40)
    rgba[0, 0, 3] = 0  # fully transparent: glass, white
    rgba[0, 1, 3] = 255  # opaque: the colour itself
    rgba[0, 2, 3] = 128  # half: halfway to white
    p = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(p)
    out = read_rgb(p)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (200, 20, 40)
    np.testing.assert_allclose(out[0, 2], [228, 137, 147], atol=1)


def test_la_is_composited_on_white(tmp_path):
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[..., 0] = 50
    la[..., 1] = 255
    la[0, 0, 1] = 0
    p = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(p)
    out = read_rgb(p)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (50, 50, 50)


def test_palette_with_and_without_transparency(tmp_path):
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    plain = tmp_path / "pal.png"
    im.save(plain)
    out = read_rgb(plain)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 0]) == (0, 0, 255)
    transp = tmp_path / "pal_t.png"
    im.save(transp, transparency=1)  # index 1 (green) is transparent
    out = read_rgb(transp)
    assert tuple(out[0, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_16_bit_is_scaled_by_bit_depth(tmp_path, suffix):
    g = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    p = tmp_path / f"deep{suffix}"
    Image.fromarray(g).save(p)
    assert Image.open(p).mode.startswith("I")  # really 16-bit on disk
    out = read_rgb(p)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255, 128])


def test_float_tiff(tmp_path):
    f = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    p = tmp_path / "float.tif"
    Image.fromarray(f, mode="F").save(p)
    np.testing.assert_array_equal(read_rgb(p)[0, :, 0], [0, 128, 255])


def test_cmyk_jpeg(tmp_path):
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[...] = (180, 60, 90)
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = read_rgb(p)
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), (180, 60, 90), atol=8)


def test_tiny_uppercase_suffix_and_unicode_path_with_spaces(tmp_path):
    folder = tmp_path / "Fälle mit Leerzeichen"
    folder.mkdir()
    p = folder / "Kalzinose Ω 01.PNG"
    arr = _rgb(8, 8)
    Image.fromarray(arr).save(p, format="PNG")
    assert is_image_file(p) and ".png" in IMAGE_EXTENSIONS
    np.testing.assert_array_equal(read_rgb(p), arr)
    assert image_size(p) == (8, 8)


def test_image_size_is_width_height(tmp_path):
    p = tmp_path / "wide.jpg"
    Image.fromarray(_rgb(10, 30)).save(p)
    assert image_size(p) == (30, 10)


# --------------------------------------------------------------------------- masks and writing


def test_read_mask_returns_label_values(tmp_path):
    labels = np.array([[0, 1, 2], [3, 4, 0]], dtype=np.uint8)
    pal = Image.fromarray(labels, mode="P")
    pal.putpalette(list(range(256)) * 3)
    p = tmp_path / "pal_mask.png"
    pal.save(p)
    np.testing.assert_array_equal(read_mask(p), labels)  # indices, not colours
    p16 = tmp_path / "mask16.png"
    Image.fromarray(labels.astype(np.uint16)).save(p16)
    np.testing.assert_array_equal(read_mask(p16), labels)


def test_read_mask_rejects_colour_and_out_of_range(tmp_path):
    colour = tmp_path / "colour.png"
    Image.fromarray(_rgb(4, 4)).save(colour)
    with pytest.raises(ImageReadError, match="single-channel"):
        read_mask(colour)
    wide = tmp_path / "wide16.png"
    Image.fromarray(np.array([[0, 1000]], dtype=np.uint16)).save(wide)
    with pytest.raises(ImageReadError, match="1000"):
        read_mask(wide)


def test_write_png_round_trip_is_atomic(tmp_path):
    rgb, mask = _rgb(12, 7), (np.arange(84, dtype=np.uint8) % 5).reshape(12, 7)
    out = write_png(tmp_path / "new" / "dir" / "a.png", rgb)
    write_png(tmp_path / "new" / "dir" / "m.png", mask)
    np.testing.assert_array_equal(read_rgb(out), rgb)
    np.testing.assert_array_equal(read_mask(tmp_path / "new" / "dir" / "m.png"), mask)
    write_png(out, rgb[::-1])  # overwrite in place
    np.testing.assert_array_equal(read_rgb(out), rgb[::-1])
    assert sorted(x.name for x in out.parent.iterdir()) == ["a.png", "m.png"]  # no temp files
    with pytest.raises(ValueError):
        write_png(tmp_path / "bad.png", np.zeros((4, 4), dtype=np.float32))
    assert not (tmp_path / "bad.png").exists()
