"""The ``fold-onnx`` command line: help, export errors (one line, non-zero exit, nothing
written), list-models, and a real export through the CLI."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from foldonnx.cli import COMMANDS, build_parser, main


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_help_lists_exactly_the_registered_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    shown = set(sub.choices)
    assert "export" in shown
    for name in shown:
        assert name in out
    # every listed module provides a runnable command (register + run)
    for module in COMMANDS:
        mod = importlib.import_module(f"foldonnx.cli.{module}")
        assert callable(mod.register) and callable(mod.run)


def test_export_help_shows_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    for opt in (
        "--opset",
        "--image-size",
        "--batch",
        "--checkpoint",
        "--pretrained",
        "--tolerance",
        "--exporter",
    ):
        assert opt in out


def test_bad_model_name(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(["export", "efficientnet_lite", str(tmp_path / "x.onnx")])
    assert rc == 1
    err = _one_line_error(capsys)
    assert "unknown model 'efficientnet_lite'" in err and "did you mean efficientnet_lite" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoint_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(
        ["export", "efficientnet_lite0", str(tmp_path / "x.onnx"), "--checkpoint", str(tmp_path / "w.pth")]
    )
    assert rc == 1
    assert "checkpoint not found" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    bad = tmp_path / "w.pth"
    bad.write_text("garbage")
    rc = main(["export", "efficientnet_lite0", str(tmp_path / "x.onnx"), "--checkpoint", str(bad)])
    assert rc == 1
    assert "cannot read checkpoint" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]


@pytest.mark.parametrize("where", ["missing_folder", "parent_is_file", "is_directory"])
def test_unwritable_output_path(capsys: pytest.CaptureFixture[str], tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = {
        "missing_folder": tmp_path / "no" / "such" / "x.onnx",
        "parent_is_file": blocker / "x.onnx",
        "is_directory": tmp_path,
    }[where]
    rc = main(["export", "efficientnet_lite0", str(out)])
    assert rc == 1
    err = _one_line_error(capsys)
    assert "output" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_output_over_the_input_file_is_refused(
    capsys: pytest.CaptureFixture[str], dinov2_onnx_path: Path
) -> None:
    before = dinov2_onnx_path.stat().st_mtime_ns
    rc = main(["export", "dinov2_s", str(dinov2_onnx_path)])
    assert rc == 1
    assert "output path is the input file" in _one_line_error(capsys)
    assert dinov2_onnx_path.stat().st_mtime_ns == before


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(
        ["export", "efficientnet_lite0", str(tmp_path / "x.onnx"), "--pretrained", "--checkpoint", "w.pth"]
    )
    assert rc == 2
    assert "exclude each other" in _one_line_error(capsys)
    # argparse's own errors are one line too (no usage block), exit code 2
    rc = main(["export", "efficientnet_lite0", str(tmp_path / "x.onnx"), "--batch", "zero"])
    assert rc == 2
    assert "positive integer or 'dynamic'" in _one_line_error(capsys)


def test_module_entry_point_bad_name(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "foldonnx", "export", "no_such_model", str(tmp_path / "x.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'no_such_model'"), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_list_models_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    if "list_models" not in COMMANDS:
        pytest.skip("list-models not registered in COMMANDS")
    assert main(["list-models", "--builtin"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()]
    assert names == sorted(names) and "efficientnet_lite0" in names and "sam:vit_h" in names
    assert main(["list-models", "--builtin", "nothing*"]) == 0
    assert "no models match" in capsys.readouterr().err


def test_pretrained_offline_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Real library download with the network unreachable (skipped where the hub answers)."""
    pytest.importorskip("timm")
    from foldonnx.models.registry import _hub_reachable

    if _hub_reachable():
        pytest.skip("the Hugging Face hub is reachable here: cannot test the offline message")
    rc = main(["export", "timm:resnet18", str(tmp_path / "r.onnx"), "--pretrained"])
    assert rc == 1
    err = _one_line_error(capsys)
    assert "downloading pretrained weights for timm:resnet18 failed" in err and "--checkpoint PATH" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_export_prints_parity_and_writes_valid_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("timm")
    out = tmp_path / "r18.onnx"
    rc = main(["export", "timm:resnet18", str(out), "--image-size", "64", "--batch", "dynamic", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    onnx.checker.check_model(str(out))
    assert report["model"] == "timm:resnet18" and report["passed"] is True
    assert 0 <= report["max_abs_diff"] <= report["tolerance"] == 1e-3
    assert report["input_shape"] == ["batch", 3, 64, 64] and report["opset"] == 18
    assert report["file_size"] == out.stat().st_size
    # human-readable form
    rc = main(["export", "timm:resnet18", str(out), "--image-size", "64"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "parity   max-abs-diff" in text and ": OK" in text and "11.69 M" in text
