"""Sessions with provider checks and the interleaved benchmark (CPU only, tiny graphs)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import onnxruntime
import pytest

from foldonnx.cli import main
from foldonnx.errors import RuntimeBackendError, UsageError
from foldonnx.runtime import (
    BenchResult,
    bench,
    create_session,
    dump_json,
    load_json,
    make_inputs,
    resolve_providers,
)
from foldonnx.runtime.bench import interleaved_order, paired_ratios
from foldonnx.runtime.results import latency_stats


def mlp(hidden: int, batch: str | int = "N", d_in: int = 256, seed: int = 0) -> onnx.ModelProto:
    """x[B, d_in] -> MatMul/Add/Relu -> MatMul -> y[B, 10]."""
    model = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        mlp (float[{batch}, {d_in}] x) => (float[{batch}, 10] y) {{
            h1 = MatMul(x, W1)
            h2 = Add(h1, b1)
            h3 = Relu(h2)
            y = MatMul(h3, W2)
        }}
        """
    )
    rng = np.random.default_rng(seed)
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.standard_normal((d_in, hidden)).astype(np.float32), "W1"),
            onnx.numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
            onnx.numpy_helper.from_array(rng.standard_normal((hidden, 10)).astype(np.float32), "W2"),
        ]
    )
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("runtime_bench")
    files = {"small": mlp(32, d_in=512), "wide": mlp(4096, d_in=512), "fixed1": mlp(32, batch=1, d_in=512)}
    out = {}
    for name, m in files.items():
        path = d / f"{name}.onnx"
        onnx.save(m, str(path))
        out[name] = str(path)
    return out


# ------------------------------------------------------------------------------ providers


def test_auto_resolves_to_cpu_on_this_build() -> None:
    assert resolve_providers("auto") == ["CPUExecutionProvider"]
    assert resolve_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    trt = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("tensorrt", trt) == trt
    assert resolve_providers("cuda", trt) == trt[1:]


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_accelerator_missing_from_build_is_one_line_error(provider: str) -> None:
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a GPU build of onnxruntime is installed")
    with pytest.raises(RuntimeBackendError) as info:
        create_session(mlp(8), provider)
    msg = str(info.value)
    assert "\n" not in msg and provider in msg and "CPUExecutionProvider" in msg


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_silent_cpu_fallback_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that claims CUDA but whose session lands on CPU (missing CUDA libraries) is an error."""
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a GPU build of onnxruntime is installed")
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.raises(RuntimeBackendError) as info:
        create_session(mlp(8), "cuda")
    msg = str(info.value)
    assert "\n" not in msg
    assert "CUDAExecutionProvider requested" in msg and "runs on CPUExecutionProvider" in msg
    # "auto" takes what really runs, and says so
    rs = create_session(mlp(8), "auto")
    assert rs.providers[0] == "CPUExecutionProvider" and rs.requested == "auto"


def test_unknown_provider_is_usage_error() -> None:
    with pytest.raises(UsageError):
        resolve_providers("metal")


def test_session_reads_back_providers_and_runs() -> None:
    rs = create_session(mlp(16), "cpu", threads=1)
    assert rs.providers == ["CPUExecutionProvider"] and rs.device == "cpu"
    assert rs.create_s > 0
    feeds = make_inputs(rs.inputs, 3)
    (y,) = rs.run(feeds)
    assert y.shape == (3, 10)


# ------------------------------------------------------------------------------ inputs


def test_inputs_seeded_typed_and_batch_checked() -> None:
    rs = create_session(mlp(16), "cpu")
    a, b = make_inputs(rs.inputs, 4, seed=1), make_inputs(rs.inputs, 4, seed=1)
    assert a["x"].dtype == np.float32 and a["x"].shape == (4, 256)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], make_inputs(rs.inputs, 4, seed=2)["x"])
    fixed = create_session(mlp(16, batch=1), "cpu")
    assert make_inputs(fixed.inputs, 1)["x"].shape == (1, 256)
    with pytest.raises(RuntimeBackendError, match="fixed batch of 1"):
        make_inputs(fixed.inputs, 8)


def test_other_dynamic_dims_need_a_size() -> None:
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        seq (float[N, S, 8] x, int64[N, S] ids) => (float[N, S, 8] y) { y = Relu(x) }
        """
    )
    rs = create_session(model, "cpu")
    with pytest.raises(UsageError, match="--dim S=N"):
        make_inputs(rs.inputs, 2)
    feeds = make_inputs(rs.inputs, 2, dims={"S": 5})
    assert feeds["x"].shape == (2, 5, 8) and feeds["ids"].shape == (2, 5) and feeds["ids"].dtype == np.int64
    by_axis = make_inputs(rs.inputs, 2, dims={"x:1": 3, "ids:1": 3})
    assert by_axis["x"].shape == (2, 3, 8)


# ------------------------------------------------------------------------------ numerics


def test_latency_stats_and_paired_ratios_pure() -> None:
    s = latency_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.n == 5 and s.p50_ms == 3.0 and s.min_ms == 1.0 and s.max_ms == 100.0
    assert s.mean_ms == pytest.approx(22.0) and s.p50_ms <= s.p90_ms <= s.p99_ms <= s.max_ms
    per_round = np.array([[2.0, 1.0, 4.0], [4.0, 2.0, 8.0]])
    np.testing.assert_allclose(paired_ratios(per_round), [[1.0, 0.5, 2.0], [1.0, 0.5, 2.0]])


def test_interleaved_order_rotates() -> None:
    assert interleaved_order(3, 4) == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert interleaved_order(2, 2, rotate=False) == [[0, 1], [0, 1]]


# ------------------------------------------------------------------------------ bench


def _check_sane(r: BenchResult) -> None:
    assert r.ok, r.reason
    assert r.providers == ["CPUExecutionProvider"]
    lat = r.latency
    assert lat is not None and lat.n == r.iters * r.block
    assert 0 < lat.min_ms <= lat.p50_ms <= lat.p90_ms <= lat.p99_ms <= lat.max_ms
    assert lat.min_ms <= lat.mean_ms <= lat.max_ms and lat.std_ms >= 0
    assert r.throughput == pytest.approx(r.batch * 1e3 / lat.mean_ms)
    assert r.session_create_s is not None and 0 < r.session_create_s < 60
    assert r.memory_mb is not None and r.memory_mb >= 0 and r.memory_method
    assert r.latency_ratio is not None and r.speedup == pytest.approx(1 / r.latency_ratio)
    assert r.latency_ratio_p25 <= r.latency_ratio <= r.latency_ratio_p75


def test_bench_two_models_fields_ratios_and_interleaving(model_files: dict[str, str]) -> None:
    iters, block = 15, 2
    results = bench(
        [model_files["small"], model_files["wide"]], provider="cpu", batches=[1, 4], warmup=2,
        iters=iters, threads=1, block=block,
    )  # fmt: skip
    assert [(r.model_index, r.batch) for r in results] == [(0, 1), (1, 1), (0, 4), (1, 4)]
    for r in results:
        _check_sane(r)
        assert r.reference == model_files["small"] and r.spinning is False and r.io_binding is False
    small, wide = results[2], results[3]
    # the reference's own ratio is exactly 1; the wide model (~250x the MACs) is clearly slower
    assert small.latency_ratio == 1.0 and small.speedup == 1.0
    assert wide.latency_ratio > 1.5
    # interleaving: the recorded order is the rotating round-robin, each model `block` calls a turn
    for r in results:
        expected = [m for rnd in interleaved_order(2, iters) for m in rnd for _ in range(block)]
        assert r.order == expected
        runs = [len(list(g)) for _, g in itertools.groupby(r.order)]
        assert max(runs) <= 2 * block  # never more than two turns of one model in a row
        assert r.order.count(0) == r.order.count(1) == iters * block


def test_bench_fixed_batch_model_skips_not_crashes(model_files: dict[str, str]) -> None:
    results = bench([model_files["fixed1"], model_files["small"]], provider="cpu", batches=[1, 8],
                    warmup=1, iters=5, threads=1)  # fmt: skip
    by = {(r.model_index, r.batch): r for r in results}
    assert by[(0, 1)].ok and by[(1, 1)].ok
    assert by[(0, 8)].status == "skipped" and "fixed batch of 1" in by[(0, 8)].reason
    assert by[(0, 8)].latency is None
    assert by[(1, 8)].ok and by[(1, 8)].latency is not None
    assert by[(1, 8)].latency_ratio is None and "did not run" in by[(1, 8)].reason  # no reference


def test_bench_io_binding_on_cpu_when_asked() -> None:
    (r,) = bench([mlp(16)], provider="cpu", batches=[2], warmup=1, iters=5, io_binding=True, threads=1)
    _check_sane(r)
    assert r.io_binding is True and r.spinning is True  # one model: ORT's default spinning


def _matmul_chain(n: int = 6, d: int = 1448) -> onnx.ModelProto:
    """n MatMuls with [d, d] float32 weights (8 MiB each at d=1448)."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        nodes.append(onnx.helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]))
        inits.append(
            onnx.numpy_helper.from_array((rng.standard_normal((d, d)) * 0.01).astype(np.float32), f"W{i}")
        )
        prev = f"h{i}"
    graph = onnx.helper.make_graph(
        nodes, "chain", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", d])],
        [onnx.helper.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, ["N", d])], inits,
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_bench_memory_counts_weights_even_after_earlier_sessions() -> None:
    """48 MiB of weights: the peak while creating the session holds the serialized model and ORT's
    copy, so >= 2 x 48 MiB, every time, not only in a fresh process. (Without trimming the heap
    freed by earlier sessions first, glibc reuses it and later readings drop to ~48 MiB.)"""
    model = _matmul_chain()
    readings = []
    for _ in range(3):
        (r,) = bench([model], provider="cpu", batches=[1], warmup=1, iters=2, threads=1)
        readings.append(r.memory_mb)
    assert all(m is not None and m >= 2 * 48 for m in readings), readings


def test_bench_bad_options() -> None:
    with pytest.raises(UsageError):
        bench([mlp(8)], provider="cpu", batches=[0])
    with pytest.raises(UsageError):
        bench([mlp(8)], provider="cpu", iters=0)
    with pytest.raises(UsageError):
        bench([], provider="cpu")


def test_bench_results_json_round_trip(tmp_path, model_files: dict[str, str]) -> None:  # noqa: ANN001
    results = bench([model_files["small"], model_files["fixed1"]], provider="cpu", batches=[1, 2],
                    warmup=1, iters=3, threads=1)  # fmt: skip
    path = dump_json(results, tmp_path / "r.json")
    again = load_json(path)
    assert again == results
    assert BenchResult.from_dict(results[0].to_dict()) == results[0]


# ------------------------------------------------------------------------------ CLI


def test_cli_bench_writes_json(tmp_path, model_files: dict[str, str], capsys) -> None:  # noqa: ANN001
    out = tmp_path / "bench.json"
    rc = main(["bench", model_files["small"], model_files["wide"], "--provider", "cpu", "--batch", "1,2",
               "--iters", "4", "--warmup", "1", "--threads", "1", "--json", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "small.onnx" in printed and "ratio" in printed
    payload = json.loads(out.read_text())
    assert [e["type"] for e in payload] == ["BenchResult"] * 4
    assert all(e["data"]["status"] == "ok" for e in payload)


def test_cli_bench_cuda_on_cpu_build_fails_one_line(model_files: dict[str, str], capsys) -> None:  # noqa: ANN001
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a GPU build of onnxruntime is installed")
    rc = main(["bench", model_files["small"], "--provider", "cuda", "--iters", "2"])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "cuda" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--batch", "1,x"], "--batch"),
        (["--dim", "S"], "--dim"),
    ],
)
def test_cli_bench_bad_options(model_files: dict[str, str], capsys, argv: list[str], needle: str) -> None:  # noqa: ANN001
    rc = main(["bench", model_files["small"], "--provider", "cpu", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and needle in err and len(err.splitlines()) == 1


def test_cli_bench_missing_file(tmp_path, capsys) -> None:  # noqa: ANN001
    rc = main(["bench", str(tmp_path / "nope.onnx"), "--provider", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: ") and "not found" in err
