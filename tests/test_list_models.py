"""``fold-onnx list-models PATTERN``: a pattern that matches nothing is an answer (exit 0)."""

from __future__ import annotations

import pytest

from foldonnx.cli import main


def test_no_match_says_so_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list-models", "--builtin", "nothing*"]) == 0
    cap = capsys.readouterr()
    assert cap.out == ""  # stdout stays a plain list of names
    assert cap.err.strip() == "no models match nothing*"


def test_matches_are_listed_one_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list-models", "--builtin", "sam:*"]) == 0
    cap = capsys.readouterr()
    assert [line.split()[0] for line in cap.out.splitlines()] == ["sam:vit_b", "sam:vit_h", "sam:vit_l"]
    assert cap.err == ""
