"""The robustness table: report rows, real-patch counts, missing sets, the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calcinosis.inference.cli import main
from calcinosis.inference.robustness import build_table, real_patch_rows, report_row
from calcinosis.model.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"


def _metrics(folder: Path, f1: float, base: float, n: int = 30) -> Path:
    folder.mkdir(parents=True)
    m = {
        "title": "x",
        "n_samples": n,
        "headline": {"macro_f1": f1, "baseline_macro_f1": base, "calcium_dice": 0.9},
    }
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


def test_report_row_reads_metrics_and_gap(tmp_path):
    row = report_row("other lab", _metrics(tmp_path / "r", 0.9, 0.6))
    assert row["status"] == "ok" and row["n"] == 30
    assert row["gap"] == pytest.approx(0.3)
    table = build_table([row])
    assert "| other lab | 30 | macro-F1 0.900 | 0.600 | +0.300 |" in table


def test_missing_report_is_listed_not_fatal(tmp_path):
    row = report_row("style A -> B", tmp_path / "nowhere")
    assert row["status"].startswith("not run")
    assert "not run" in build_table([row])


def _real_manifest(tmp_path: Path) -> Path:
    rows = ["path,label,mpp"]
    for label in ("osteoma_cutis", "normal"):
        for p in sorted((FIXTURES / "images" / label).glob("he_*.png"))[:2]:
            rows.append(f"{p},{label},0.5")
    path = tmp_path / "real" / "manifest.csv"
    path.parent.mkdir()
    path.write_text("\n".join(rows) + "\n")
    return path


def test_real_patch_rows_count_calls_per_label(tmp_path, robust_checkpoint):
    manifest = _real_manifest(tmp_path)
    rows = real_patch_rows(manifest, robust_checkpoint, FIXTURES / "manifest.csv")
    assert [r["label"] for r in rows] == ["osteoma_cutis", "normal"]
    for r in rows:
        assert r["n"] == 2
        assert sum(r["calls"].values()) == 2
        assert r["correct"] == r["calls"].get(r["label"], 0)
        assert r["baseline_correct"] is not None and 0 <= r["baseline_correct"] <= 2
        assert 0.0 <= r["mean_p_true"] <= 1.0
    table = build_table(rows)
    assert "real: osteoma_cutis patches | 2 | called osteoma_cutis" in table
    assert f"mean p(normal) {rows[1]['mean_p_true']:.2f}" in table


def test_real_row_mean_probability_is_printed_and_optional():
    row = {
        "set": "real: normal patches",
        "kind": "real",
        "status": "ok",
        "label": "normal",
        "n": 4,
        "correct": 1,
        "calls": {"normal": 1, "gout": 3},
        "baseline_correct": 2,
        "mean_p_true": 0.4321,
    }
    assert "| called normal 1 of 4, mean p(normal) 0.43 (else: gout 3) | 2 of 4 | -1 |" in (
        build_table([row])
    )
    row["mean_p_true"] = None  # no patch got a call (all unreadable, say)
    assert "| called normal 1 of 4 (else: gout 3) |" in build_table([row])


def test_cli_writes_table_and_skips_absent_real_patches(tmp_path, capsys):
    _metrics(tmp_path / "test", 0.95, 0.7)
    out = tmp_path / "rob"
    code = main(
        [
            "robustness",
            "--out",
            str(out),
            "--report",
            f"in-distribution test={tmp_path / 'test'}",
            "--real-dev",
            str(tmp_path / "absent" / "manifest.csv"),
            "--checkpoint",
            str(tmp_path / "unused.safetensors"),
        ]
    )
    assert code == 0
    md = (out / "robustness.md").read_text()
    assert "in-distribution test" in md and "not run" in md
    rows = json.loads((out / "robustness.json").read_text())
    assert rows[0]["macro_f1"] == 0.95


def test_cli_rejects_bad_report_spec(tmp_path):
    with pytest.raises(ConfigError, match="NAME=PATH"):
        from types import SimpleNamespace

        from calcinosis.inference.robustness import run_robustness

        run_robustness(SimpleNamespace(report=["no-equals-sign"], out=str(tmp_path)))


def test_an_unreadable_real_patch_is_counted_not_fatal(tmp_path, robust_checkpoint):
    manifest = _real_manifest(tmp_path)
    bad = tmp_path / "real" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with manifest.open("a") as fh:
        fh.write(f"{bad},normal,0.5\n")
    rows = real_patch_rows(manifest, robust_checkpoint, FIXTURES / "manifest.csv")
    normal = next(r for r in rows if r["label"] == "normal")
    assert normal["n"] == 3
    assert normal["calls"].get("error") == 1
    assert normal["baseline_correct"] is not None and normal["baseline_correct"] <= 2
    assert "error 1" in build_table(rows)


def test_real_dev_without_checkpoint_is_a_config_error(tmp_path):
    from types import SimpleNamespace

    from calcinosis.inference.robustness import run_robustness

    args = SimpleNamespace(
        report=None, out=str(tmp_path), real_dev="x.csv", checkpoint=None, train_manifest=None
    )
    with pytest.raises(ConfigError, match="--real-dev needs --checkpoint"):
        run_robustness(args)
    with pytest.raises(ConfigError, match="nothing to tabulate"):
        run_robustness(SimpleNamespace(report=None, out=str(tmp_path), real_dev=None))
