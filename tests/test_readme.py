"""Every command shown in README.md runs, as written (documentation that cannot rot).

``make test`` is the command running this suite; ``make demo`` and every line of the README's
usage block are run here, in order, through a shell, in an empty scratch folder that holds
nothing the README does not create itself (as in a fresh clone, with the environment of
``make setup`` activated). The Python examples run the same way.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _sh_blocks() -> list[list[str]]:
    text = README.read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    lines = [[ln.strip() for ln in b.splitlines()] for b in blocks]
    return [[ln for ln in block if ln and not ln.startswith("#")] for block in lines]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_readme_has_the_two_commands():
    first = _sh_blocks()[0]
    assert [ln.split("#")[0].strip() for ln in first] == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M), ".ci/run must call exactly the README's test command"


def _usage_commands() -> list[str]:
    """Every line of the sh blocks that use fold-onnx (the two-commands block is run by CI)."""
    blocks = [b for b in _sh_blocks() if any(ln.startswith("fold-onnx ") for ln in b)]
    cmds = [ln for block in blocks for ln in block]
    assert sum(c.startswith("fold-onnx ") for c in cmds) >= 8, "the README usage block went missing"
    return cmds


@pytest.mark.slow
def test_readme_usage_commands_run(tmp_path):
    assert not list(tmp_path.iterdir())  # nothing prepared: the README makes what it needs
    for cmd in _usage_commands():
        proc = subprocess.run(
            cmd, shell=True, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"README command failed: {cmd}\n{proc.stderr[-2000:]}"
    out = tmp_path / "out"
    for name in ("lite0.onnx", "lite0_fold.onnx", "lite0_prune.onnx", "lite0_fold_int8.onnx"):
        onnx.checker.check_model(str(out / name))
    folded = onnx.load(str(out / "lite0_fold.onnx"))
    original = onnx.load(str(out / "lite0.onnx"))
    assert sum(t.ByteSize() for t in folded.graph.initializer) < sum(
        t.ByteSize() for t in original.graph.initializer
    )
    with Image.open(out / "sweep" / "pareto.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


@pytest.mark.slow
def test_make_demo(tmp_path):
    proc = subprocess.run(
        ["make", "-s", "-C", str(REPO), "demo", f"OUT={tmp_path}"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "dinov2_s_folded.onnx").exists()
    assert "parameters" in proc.stdout and "-20.0%" in proc.stdout
    assert "cls_cosine" in proc.stdout or "cosine" in proc.stdout


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
    """The Python API examples, run as written, beside the files they name."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README's Python example went missing"
    for code in blocks:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, f"README Python block failed:\n{code}\n{proc.stderr[-2000:]}"
        assert "removed" in proc.stdout
