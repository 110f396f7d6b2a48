"""ORT profiler tables: parsing, sums, warm-up dropping, before/after comparison (CPU only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from foldonnx.cli import main
from foldonnx.errors import RuntimeBackendError
from foldonnx.runtime import ProfileComparison, dump_json, load_json, parse_trace, profile, profile_compare


def convnet(width: int) -> onnx.ModelProto:
    """x[N,3,16,16] -> Conv(width) -> Relu -> Conv(width) -> GlobalAveragePool -> Flatten -> Softmax."""
    model = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[N, 3, 16, 16] x) => (float[N, {width}] y) {{
            c1 = Conv <pads = [1, 1, 1, 1]> (x, W1)
            r1 = Relu(c1)
            c2 = Conv <pads = [1, 1, 1, 1]> (r1, W2)
            p = GlobalAveragePool(c2)
            f = Flatten(p)
            y = Softmax(f)
        }}
        """
    )
    rng = np.random.default_rng(0)
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.standard_normal((width, 3, 3, 3)).astype(np.float32), "W1"),
            onnx.numpy_helper.from_array(
                rng.standard_normal((width, width, 3, 3)).astype(np.float32) * 0.1, "W2"
            ),
        ]
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _event(cat: str, name: str, ts: float, dur: float, op: str | None = None) -> dict:
    e = {"cat": cat, "name": name, "ts": ts, "dur": dur, "ph": "X"}
    if op:
        e["args"] = {"op_name": op}
    return e


def test_parse_trace_known_numbers_and_warmup_dropped() -> None:
    events = [
        _event("Session", "session_initialization", 0, 500),
        # warm-up run: must not count
        _event("Session", "model_run", 1000, 100),
        _event("Node", "a_kernel_time", 1010, 50, "Conv"),
        _event("Node", "a_fence_before", 1009, 1, "Conv"),
        # two kept runs
        _event("Session", "model_run", 2000, 100),
        _event("Node", "a_kernel_time", 2010, 40, "Conv"),
        _event("Node", "b_kernel_time", 2060, 20, "Relu"),
        _event("Session", "model_run", 3000, 80),
        _event("Node", "a_kernel_time", 3010, 30, "Conv"),
        _event("Node", "b_kernel_time", 3050, 10, "Relu"),
    ]
    t = parse_trace(events, iters=2)
    assert t.runs == 2
    assert t.run_ms == pytest.approx(0.180) and t.kernel_ms == pytest.approx(0.100)
    ops = {s.op_type: s for s in t.op_types}
    assert ops["Conv"].total_ms == pytest.approx(0.070) and ops["Conv"].count == 2
    assert ops["Conv"].avg_ms == pytest.approx(0.035) and ops["Conv"].per_run_ms == pytest.approx(0.035)
    assert ops["Relu"].share == pytest.approx(0.3) and ops["Conv"].share == pytest.approx(0.7)
    assert [n.node for n in t.nodes] == ["a", "b"]  # sorted by time
    # all runs: the warm-up's 50 us come in
    assert parse_trace(events).kernel_ms == pytest.approx(0.150)
    with pytest.raises(RuntimeBackendError):
        parse_trace([_event("Session", "session_initialization", 0, 5)])


def test_profile_tables_sum_to_measured_total() -> None:
    iters = 8
    r = profile(convnet(16), provider="cpu", batch=2, iters=iters, warmup=3, threads=1, top=100)
    assert r.providers == ["CPUExecutionProvider"] and r.iters == iters
    # op-type table and the full node table both sum to the kernel total
    assert sum(s.total_ms for s in r.op_types) == pytest.approx(r.kernel_ms, rel=1e-9)
    assert r.node_count == len(r.top_nodes)  # top=100 > nodes: the node table is complete
    assert sum(s.total_ms for s in r.top_nodes) == pytest.approx(r.kernel_ms, rel=1e-9)
    assert sum(s.share for s in r.op_types) == pytest.approx(1.0)
    # kernels + overhead == ORT's measured run time; ORT's run time fits inside the wall clock
    assert r.kernel_ms + r.overhead_ms == pytest.approx(r.run_ms)
    assert 0 < r.kernel_ms <= r.run_ms <= r.wall_ms * 1.02
    # the warm-up runs were dropped: every node ran exactly `iters` times
    assert all(s.count == iters for s in r.top_nodes)
    assert {s.op_type for s in r.op_types} >= {"Softmax", "GlobalAveragePool"}
    assert any("Conv" in s.op_type for s in r.op_types)  # Conv or ORT's FusedConv


def test_profile_top_n_is_the_head_of_the_node_table() -> None:
    full = profile(convnet(8), provider="cpu", iters=3, warmup=1, threads=1, top=100)
    head = profile(convnet(8), provider="cpu", iters=3, warmup=1, threads=1, top=2)
    assert len(head.top_nodes) == 2 and head.node_count == full.node_count > 2
    assert head.top_nodes[0].total_ms >= head.top_nodes[1].total_ms


def test_profile_compare_ratios(tmp_path) -> None:  # noqa: ANN001
    # ~250x the conv MACs and 20 runs: a few ms of preemption (busy machine) cannot hide it
    c = profile_compare(convnet(8), convnet(128), provider="cpu", batch=4, iters=20, warmup=2, threads=1,
                        labels=["narrow", "wide"])  # fmt: skip
    assert c.before.model == "narrow" and c.after.model == "wide"
    rows = {row.op_type: row for row in c.rows}
    for row in c.rows:
        if row.ratio is not None:
            assert row.ratio == pytest.approx(row.after_ms / row.before_ms)
    assert sum(row.before_ms for row in c.rows) == pytest.approx(c.before.kernel_ms / c.before.iters)
    assert c.kernel_ratio == pytest.approx(c.after.kernel_ms / c.before.kernel_ms)
    # conv time must grow clearly
    conv = [row for op, row in rows.items() if "Conv" in op]
    assert conv and sum(r.after_ms for r in conv) > 3 * sum(r.before_ms for r in conv)
    path = dump_json(c, tmp_path / "c.json")
    (again,) = load_json(path)
    assert isinstance(again, ProfileComparison) and again == c


def test_profile_keeps_trace_when_asked(tmp_path) -> None:  # noqa: ANN001
    r = profile(convnet(8), provider="cpu", iters=2, warmup=1, threads=1, trace_dir=tmp_path / "traces")
    events = json.loads(Path(r.trace_file).read_text())
    assert any(e.get("name") == "model_run" for e in events)


def test_cli_profile_two_models(tmp_path, capsys) -> None:  # noqa: ANN001
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(convnet(8), str(a))
    onnx.save(convnet(32), str(b))
    out = tmp_path / "p.json"
    rc = main(["profile", str(a), str(b), "--provider", "cpu", "--iters", "3", "--warmup", "1", "--threads",
               "1", "--top", "3", "--json", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "per op type" in printed and "ratio" in printed and "top 3 of" in printed
    assert json.loads(out.read_text())[0]["type"] == "ProfileComparison"


def test_cli_profile_cuda_on_cpu_build(tmp_path, capsys) -> None:  # noqa: ANN001
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a GPU build of onnxruntime is installed")
    a = tmp_path / "a.onnx"
    onnx.save(convnet(8), str(a))
    rc = main(["profile", str(a), "--provider", "cuda"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: ") and len(err.splitlines()) == 1


def test_cli_profile_corrupt_file_one_line(tmp_path, capsys) -> None:  # noqa: ANN001
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    rc = main(["profile", str(bad), "--provider", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: ") and len(err.splitlines()) == 1 and "bad.onnx" in err
