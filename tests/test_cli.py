"""The ``calcinosis`` dispatcher: commands found through entry points, help, exit codes."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
from helpers import tissue

from calcinosis.model import cli

ORDER = [
    "synth",
    "train",
    "evaluate",
    "predict",
    "predict-cohort",
    "export",
    "bench",
    "robustness",
    "serve",
]


def test_every_command_is_registered_once_in_story_order():
    assert [c.name for c in cli.commands()] == ORDER
    eps = {ep.name: ep.value for ep in entry_points(group=cli.ENTRY_POINT_GROUP)}
    assert set(eps) == set(ORDER)
    # each side declares its own commands
    assert all(v.startswith("calcinosis.training.cli:") for k, v in eps.items() if k in ORDER[:3])
    assert all(v.startswith("calcinosis.inference.cli:") for k, v in eps.items() if k in ORDER[3:])


def test_backend_choices_of_the_parsers_are_the_engines_backends():
    from calcinosis.inference import cli as inference_cli
    from calcinosis.inference.engines import BACKENDS

    assert sorted(inference_cli.BACKEND_CHOICES) == sorted(BACKENDS)
    parser = cli.build_parser()
    for command in ("predict", "predict-cohort"):
        argv = [command, "x", "--checkpoint", "c", "--out", "o", "--backend", "onnx-int8"]
        sub = parser.parse_args(argv)
        assert sub.backend == "onnx-int8"


def test_top_level_help_lists_the_commands_and_each_has_its_own(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    positions = [text.index(f"    {name}") for name in ORDER]
    assert positions == sorted(positions)
    for name in ORDER:
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        assert f"usage: calcinosis {name}" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    for argv in (["nope"], [], ["predict", "x.png"], ["evaluate", "--checkpoint", "c"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def _interrupted(args) -> int:
    raise KeyboardInterrupt


def test_errors_the_user_can_fix_are_one_line_and_ctrl_c_is_130(monkeypatch, capsys, tmp_path):
    rc = cli.main(["export", "--checkpoint", str(tmp_path / "c.safetensors"), "--onnx", "x.txt"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("calcinosis export: error: --onnx must end in .onnx")
    assert "Traceback" not in err
    fake = cli.Command("sleep", 1, lambda p: None, f"{__name__}:_interrupted", help="sleeps")
    monkeypatch.setattr(cli, "commands", lambda: [fake])
    assert cli.main(["sleep"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_int8_and_bench_need_images_from_the_caller(predict_checkpoint_64, tmp_path, capsys):
    ck = str(predict_checkpoint_64)
    assert (
        cli.main(["export", "--checkpoint", ck, "--onnx", str(tmp_path / "m.onnx"), "--int8"]) == 2
    )
    assert "--int8-calibration DIR" in capsys.readouterr().err
    argv = ["export", "--checkpoint", ck, "--onnx", str(tmp_path / "m.onnx")]
    assert cli.main([*argv, "--int8-calibration", str(tmp_path)]) == 2
    assert "only used with --int8" in capsys.readouterr().err
    assert cli.main(["bench", "--checkpoint", ck]) == 2
    assert "--images DIR" in capsys.readouterr().err
    assert cli.main(["bench", "--checkpoint", ck, "--images", "64"]) == 2
    assert "--n-images 64" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["bench", "--checkpoint", ck, "--images", str(empty)]) == 2
    assert "no images found" in capsys.readouterr().err
    # the predictor's int8 backend says how to make the file instead of inventing images
    from calcinosis.inference.predictor import Predictor
    from calcinosis.model import CalcinosisError

    with pytest.raises(CalcinosisError, match="calcinosis export --checkpoint .* --int8"):
        Predictor.from_checkpoint(ck, backend="onnx-int8", onnx_path=tmp_path / "q.int8.onnx")


@pytest.mark.slow
def test_export_int8_calibrates_on_the_given_folder(predict_checkpoint_64, tmp_path, capsys):
    from calcinosis.model.imageio import write_png

    folder = tmp_path / "cal"
    folder.mkdir()
    for s in range(4):
        write_png(folder / f"p{s}.png", tissue(80, 50, seed=s))
    out = tmp_path / "m.onnx"
    argv = ["export", "--checkpoint", str(predict_checkpoint_64), "--onnx", str(out)]
    assert cli.main([*argv, "--int8", "--int8-calibration", str(folder), "--no-check"]) == 0
    assert "calibrated on 4 images" in capsys.readouterr().out
    from calcinosis.inference.export import read_onnx_metadata

    meta = read_onnx_metadata(out.with_name("m.int8.onnx"))
    assert meta["calibration_images"] == 4 and meta["preprocessing"]["input_size"] == 64
    np.testing.assert_array_equal(meta["preprocessing"]["mean"], meta["mean"])


def test_module_entry_points_still_dispatch_every_command():
    for module in ("calcinosis.model.cli", "calcinosis.inference.cli"):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert all(name in proc.stdout for name in ORDER)


@pytest.fixture(scope="module")
def predict_checkpoint_64(tmp_path_factory, tiny_checkpoint_factory):
    return tiny_checkpoint_factory(tmp_path_factory.mktemp("cli") / "t.safetensors", 64, 1.0)
