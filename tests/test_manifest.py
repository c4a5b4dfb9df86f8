"""model/manifest.py: one CSV reader for labelled training data and for prediction inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calcinosis.inference.inputs import collect_inputs, load_images
from calcinosis.model import DataError
from calcinosis.model.imageio import write_png
from calcinosis.model.manifest import parse_mpp, parse_split, read_manifest, read_rows


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_png(path, np.full((8, 8, 3), 200, np.uint8))


def test_rows_excel_style_with_comments_and_bom(tmp_path):
    _png(tmp_path / "a.png")
    man = tmp_path / "m.csv"
    man.write_bytes("\ufeffPath ; Label\n# a comment\n\na.png;Gout\n".encode())
    rows = read_rows(man, ("path", "label"))
    assert rows.columns == ["path", "label"]
    assert [(r.line, r.number, r.get("label")) for r in rows.rows] == [(4, 1, "Gout")]
    assert rows.resolve("a.png") == tmp_path / "a.png"
    samples = read_manifest(man)
    assert [(s.path.name, s.label) for s in samples] == [("a.png", "gout")]


def test_file_level_problems_name_the_fix(tmp_path):
    man = tmp_path / "m.csv"
    man.write_text("paht,label\nx.png,gout\n", encoding="utf-8")
    with pytest.raises(DataError, match="is 'paht' meant to be 'path'"):
        read_rows(man, ("path", "label"))
    man.write_text("path,path\n", encoding="utf-8")
    with pytest.raises(DataError, match="more than once"):
        read_rows(man)
    man.write_bytes(b"path\n\xff\xfe")
    with pytest.raises(DataError, match="CSV UTF-8"):
        read_rows(man)
    with pytest.raises(DataError, match="name a CSV file with a 'path' column"):
        read_rows(tmp_path / "none.csv", missing_hint="name a CSV file with a 'path' column")


def test_labelled_rows_report_every_problem_at_once(tmp_path):
    _png(tmp_path / "a.png")
    man = tmp_path / "m.csv"
    man.write_text(
        "path,label,split,mpp\na.png,gout,validation,0.5\nb.png,gout,,\na.png,gut,nope,-1\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError) as exc:
        read_manifest(man)
    msg = str(exc.value)
    assert "4 problem(s)" in msg and "line 3 (data row 2): image file not found" in msg
    assert "did you mean 'gout'" in msg and "unknown split 'nope'" in msg and "mpp '-1'" in msg


def test_split_and_mpp_cells():
    assert parse_split("Validation") == "val" and parse_split(" ") is None
    assert parse_mpp("0.25") == 0.25 and parse_mpp("") is None
    for bad in ("0", "nan", "x"):
        with pytest.raises(ValueError):
            parse_mpp(bad)
    with pytest.raises(ValueError):
        parse_split("holdout")


def test_prediction_inputs_keep_going_past_bad_rows(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "c.png")
    man = tmp_path / "m.csv"
    man.write_text(
        "path;mpp;split\na.png;0.5;test\n;;test\nc.png;zero;test\nb.png;;test\nc.png;;train\n",
        encoding="utf-8",
    )
    items = collect_inputs([man], split="test")
    assert [i.path.name for i in items] == ["a.png", "<row 3>", "c.png", "b.png"]
    assert items[0].mpp == 0.5 and items[0].error is None
    assert "empty 'path'" in items[1].error and "not a positive number" in items[2].error
    assert "does not exist" in items[3].error
    with pytest.raises(DataError, match="no 'split' column"):
        collect_inputs([tmp_path / "a.png", _write(tmp_path / "n.csv", "path\na.png\n")], split="x")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_images_from_folders_manifests_and_arrays(tmp_path):
    for k in range(5):
        _png(tmp_path / "d" / f"{k}.png")
    stack = np.zeros((3, 4, 6, 3), np.uint8)
    np.save(tmp_path / "s.npy", stack)
    assert len(load_images([tmp_path / "d"])) == 5
    assert len(load_images([tmp_path / "d"], limit=2)) == 2
    got = load_images([tmp_path / "s.npy", _write(tmp_path / "m.csv", "path\nd/1.png\n")])
    assert [g.shape for g in got] == [(4, 6, 3)] * 3 + [(8, 8, 3)]
    with pytest.raises(DataError, match="does not exist"):
        load_images([_write(tmp_path / "bad.csv", "path\nmissing.png\n")])
