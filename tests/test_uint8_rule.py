"""One rule turns pixel values into uint8, for image files and in-memory images alike.

Before, a float image above 1 was 16-bit data as a file but rejected as an
array; a 16-bit PIL image in memory was clipped where the same file was scaled.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from calcinosis.model.errors import ImageReadError
from calcinosis.model.imageio import load_image, read_rgb, to_uint8


def _float_tiff(path, values) -> object:
    Image.fromarray(np.asarray(values, np.float32), mode="F").save(path)
    return path


def test_floats_in_unit_range_read_the_same_from_a_file_and_an_array(tmp_path):
    f = np.array([[0.0, 0.25, 0.5, 1.0, 1.02, -0.01]], np.float32)
    from_file = read_rgb(_float_tiff(tmp_path / "f.tif", f))
    from_array = load_image(f)
    np.testing.assert_array_equal(from_file, from_array)
    np.testing.assert_array_equal(from_array[0, :, 0], [0, 64, 128, 255, 255, 0])


@pytest.mark.parametrize("values", [[[0.0, 120.0, 255.0]], [[0.0, 3000.0, 65535.0]]])
def test_floats_outside_unit_range_are_rejected_from_files_and_arrays(tmp_path, values):
    path = _float_tiff(tmp_path / "wide.tif", values)
    with pytest.raises(ImageReadError, match=r"expected floats in \[0, 1\]") as from_file:
        read_rgb(path)
    assert "wide.tif" in str(from_file.value)  # the file is named
    assert "divide 0..255 data by 255" in str(from_file.value)  # and what to do
    with pytest.raises(ImageReadError, match=r"expected floats in \[0, 1\]"):
        load_image(np.asarray(values, np.float32))


def test_nan_is_rejected_from_files_and_arrays(tmp_path):
    path = _float_tiff(tmp_path / "nan.tif", [[0.0, np.nan, 1.0]])
    with pytest.raises(ImageReadError, match="NaN"):
        read_rgb(path)
    with pytest.raises(ImageReadError, match="NaN"):
        load_image(np.array([[0.0, np.nan, 1.0]], np.float32))


def test_16_bit_reads_the_same_from_a_file_a_pil_image_and_an_array(tmp_path):
    g = np.array([[0, 257, 32896, 65535]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(g).save(path)
    want = [0, 1, 128, 255]
    np.testing.assert_array_equal(read_rgb(path)[0, :, 0], want)
    np.testing.assert_array_equal(load_image(g)[0, :, 0], want)
    with Image.open(path) as im:  # the same file, decoded by the caller
        np.testing.assert_array_equal(load_image(im)[0, :, 0], want)


def test_integer_rule_uses_the_declared_bit_depth_else_8_bit_values():
    wide = np.array([[0, 2048, 4095]], np.int32)
    np.testing.assert_array_equal(to_uint8(wide, bits=12), [[0, 128, 255]])
    np.testing.assert_array_equal(to_uint8(np.array([[0, 200]], np.int32)), [[0, 200]])
    with pytest.raises(ImageReadError, match="expected 0..255"):
        to_uint8(wide)  # an array declares no depth: only 0..255 is unambiguous
    np.testing.assert_array_equal(to_uint8(np.array([[-5, 300]], np.int32), bits=8), [[0, 255]])
    np.testing.assert_array_equal(to_uint8(np.array([True, False])), [255, 0])
    with pytest.raises(ImageReadError, match="not supported"):
        to_uint8(np.array([1 + 2j]))
