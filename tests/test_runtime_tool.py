"""tools/bench_runtime.py end to end on a tiny model file (CPU, seconds)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_runtime_tool", REPO / "tools" / "bench_runtime.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _tiny_cnn(path: Path) -> Path:
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        tiny (float[N, 3, 32, 32] x) => (float[N, 10] logits) {
            c1 = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
            r1 = Relu(c1)
            c2 = Conv <pads = [1, 1, 1, 1]> (r1, W2, B2)
            r2 = Relu(c2)
            p = GlobalAveragePool(r2)
            f = Flatten(p)
            logits = Gemm <transB = 1> (f, Wf, Bf)
        }
        """
    )
    rng = np.random.default_rng(0)
    tensors = {
        "W1": rng.standard_normal((32, 3, 3, 3)) * 0.3, "B1": np.zeros(32),
        "W2": rng.standard_normal((32, 32, 3, 3)) * 0.08, "B2": np.zeros(32),
        "Wf": rng.standard_normal((10, 32)) * 0.2, "Bf": np.zeros(10),
    }  # fmt: skip
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _args(**kw: object) -> argparse.Namespace:
    base = dict(ratio=0.25, batches=[1, 2], provider="cpu", threads=1, warmup=1, iters_scale=1.0,
                fidelity_images=3, no_fidelity=False, no_fold=False, fold_timeout=300)  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def test_tool_runs_case_records_everything_and_renders(tmp_path: Path) -> None:
    tool = _tool()
    src = _tiny_cnn(tmp_path / "tiny.onnx")
    case = tool.Case("tiny", str(src), "dynamic", iters=3, weights="random init")
    args = _args()
    rec = tool.run_case(case, args, tmp_path / "work")

    assert rec["export"]["status"] == "copied"
    fold = rec["fold"]
    # folding either worked (with MACs before/after) or says why not: never silently absent
    assert fold["status"] in ("ok", "failed", "missing")
    if fold["status"] == "ok":
        # the MAC reduction is counted on the files that were timed, not taken from the fold report
        assert "folded" in rec["variants"] and rec["variants"]["folded"]["macs"] == fold["macs_folded_file"]
        assert rec["summary"]["mac_reduction"] == pytest.approx(
            rec["macs_original"] / fold["macs_folded_file"]
        )
    else:
        assert fold["reason"]
    variants = rec["variants"]
    assert {"original", "original+int8"} <= set(variants)
    for name, v in variants.items():
        assert set(v["timing"]) == {"1", "2"}
        for t in v["timing"].values():
            assert t["status"] == "ok" and t["latency"]["p50_ms"] > 0 and t["reference"] == "original"
        if name != "original":
            assert 0.5 < v["fidelity"]["cosine_mean"] <= 1.0 + 1e-9
    assert variants["original"]["timing"]["1"]["speedup"] == 1.0
    # bench kept the interleaving order once per batch
    order = rec["bench"][0]["order"]
    assert sorted(set(order)) == list(range(len(variants)))

    payload = {"environment": tool._environment(args), "models": {"tiny": rec}}
    json.dumps(payload)  # JSON-serialisable as written
    md = tool.render_markdown(payload)
    rows = [line for line in md.splitlines() if line.startswith("| tiny |")]
    assert len(rows) >= 2 * len(variants)
    assert any("original+int8" in r for r in rows)


def test_tool_rejects_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert _tool().main(["--models", "resnet9000", "--out", "/tmp/never"]) == 2
    assert "unknown model" in capsys.readouterr().err
