"""``fold-onnx inspect``: table, totals, JSON, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_analysis_foldcheck import build
from test_analysis_handlers import FUSED_ATTN, SEPARATE_ATTN

from foldonnx.analysis import find_channel_groups
from foldonnx.analysis.channel_groups import groups_from_json
from foldonnx.cli import main


@pytest.fixture
def attn_file(tmp_path: Path) -> Path:
    path = tmp_path / "attn.onnx"
    onnx.save(build(SEPARATE_ATTN), str(path))
    return path


def test_inspect_table_totals_and_json(
    attn_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "groups.json"
    assert main(["inspect", str(attn_file), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "heads" in text and "2 x 4" in text and "foldable" in text
    assert "comes from graph input x" in text  # the residual stream's reason
    assert "1 of 3 groups foldable" in text
    assert "totals by kind" in text
    groups = groups_from_json(out.read_text())
    assert groups == find_channel_groups(onnx.load(str(attn_file)))
    data = json.loads(out.read_text())
    assert [d["kind"] for d in data["groups"]] == ["residual", "heads", "other"]
    assert [d["foldable"] for d in data["groups"]] == [False, True, False]
    # the model's totals beside the groups, named as every command's JSON names them
    model = onnx.load(str(attn_file))
    consts = [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    n_params = sum(int(np.prod(t.dims)) for t in [*model.graph.initializer, *consts])
    assert data["params"] == n_params and data["macs"] > 0 and data["bytes"] == attn_file.stat().st_size


def test_inspect_members_and_blocked_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "fused.onnx"
    onnx.save(build(FUSED_ATTN), str(path))
    assert main(["inspect", str(path), "--members"]) == 0
    text = capsys.readouterr().out
    assert "wqkv[axis 1, offset 8]" in text and "producer weight k" in text
    assert main(["inspect", str(path), "--blocked-only"]) == 0
    text = capsys.readouterr().out
    assert "reaches graph output y" in text and "2 x 4" not in text


def test_inspect_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model file not found") and err.count("\n") == 1
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07 not a model at all" * 10)
    assert main(["inspect", str(junk)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    good = tmp_path / "g.onnx"
    onnx.save(build(FUSED_ATTN), str(good))
    assert main(["inspect", str(good), "--json", str(tmp_path / "no" / "such" / "dir.json")]) == 1
    assert "output folder does not exist" in capsys.readouterr().err
