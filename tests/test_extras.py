"""A torch-free install (``pip install fold-onnx[cpu]``): inspect, fold (with the data-free
repair), compress, quantize, bench and eval on an .npz run; what needs another extra says which,
in one line. Simulated by hiding the packages the ``cpu`` extra does not install from the
interpreter that runs the CLI (a real fresh venv was checked by hand: see README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# what `pip install fold-onnx[cpu]` does not bring
HIDDEN = ("torch", "torchvision", "timm", "open_clip", "segment_anything", "matplotlib", "skimage", "foolbox")

_RUNNER = """
import importlib.abc, sys
HIDDEN = {hidden!r}
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Hide())
import importlib.util
_find = importlib.util.find_spec
def find_spec(name, package=None):
    if name.split(".")[0] in HIDDEN:
        return None
    return _find(name, package)
importlib.util.find_spec = find_spec
from foldonnx.cli import main
rc = main(sys.argv[1:])
sys.exit(rc)
"""


def cli(*argv: str, cwd: Path, hidden: tuple[str, ...] = HIDDEN) -> subprocess.CompletedProcess:
    code = _RUNNER.format(hidden=hidden)
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, tiny_vit_onnx: Path) -> Path:
    d = tmp_path_factory.mktemp("torchfree")
    (d / "vit.onnx").write_bytes(tiny_vit_onnx.read_bytes())
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    np.savez(d / "d.npz", image=x)
    return d


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "vit.onnx", "-q", "--json", "i.json"],
        ["fold", "vit.onnx", "f.onnx", "--target-params", "0.2", "--groups", "mlp,heads", "--round-to", "1"],
        [
            "fold",
            "vit.onnx",
            "ar.onnx",
            "--ratio",
            "0.25",
            "--groups",
            "mlp",
            "--repair",
            "ar",
            "--round-to",
            "1",
        ],
        [
            "compress",
            "vit.onnx",
            "c.onnx",
            "--recipe",
            "[{prune-l1: {ratio: 0.25}}, quantize]",
            "--check",
            "d.npz",
        ],
        ["quantize", "vit.onnx", "q.onnx", "--no-check"],
        ["bench", "vit.onnx", "--iters", "3", "--warmup", "1"],
        ["eval", "vit.onnx", "vit.onnx", "--data", "d.npz", "--no-progress"],
    ],
)
def test_cpu_only_install_runs_the_main_commands(work: Path, argv: list[str]) -> None:
    proc = cli(*argv, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    if "--json" in argv:
        assert json.loads((work / argv[argv.index("--json") + 1]).read_text())["params"] > 0


@pytest.mark.parametrize(
    "argv, extra",
    [
        (["export", "timm:resnet18", "r.onnx"], "fold-onnx[export]"),
        (["eval", "vit.onnx", "vit.onnx", "--data", "imagenet20"], "fold-onnx[data]"),
        (["eval", "vit.onnx", "vit.onnx", "--data", "photos"], "fold-onnx[data]"),
        (["quantize", "vit.onnx", "q2.onnx"], "fold-onnx[data]"),  # the default check data is imagenet20
        (["sweep", "vit.onnx", "--methods", "fold", "--ratios", "0.2", "--out", "sw"], "fold-onnx[plots]"),
    ],
)
def test_what_needs_an_extra_says_which(work: Path, argv: list[str], extra: str) -> None:
    before = sorted(p.name for p in work.iterdir())
    proc = cli(*argv, cwd=work)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert err[-1].startswith("error: ") and extra in err[-1], proc.stderr
    assert sorted(p.name for p in work.iterdir()) == before  # nothing written


def test_images_without_pillow_say_which_extra(work: Path) -> None:
    proc = cli(
        "fold", "vit.onnx", "x.onnx", "--ratio", "0.25", "--repair", "ar", cwd=work, hidden=(*HIDDEN, "PIL")
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "pillow" in proc.stderr and "fold-onnx[cpu]" in proc.stderr
    assert not (work / "x.onnx").exists()
