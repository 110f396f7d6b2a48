"""``fold-onnx sweep`` with toy methods registered here, on a tiny MLP classifier."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import foldonnx.cli
from foldonnx.errors import PassError, UsageError
from foldonnx.evaluate.sweep import SweepReport
from foldonnx.graph.stats import model_stats
from foldonnx.passes.base import Pass, PassContext, PassReport
from foldonnx.passes.config import PassConfig, option
from foldonnx.passes.registry import get_pass, list_passes, make_pass, register_pass

H, FEAT, C = 32, 48, 10


def main(argv: list[str]) -> int:
    saved = list(foldonnx.cli.COMMANDS)
    foldonnx.cli.COMMANDS[:] = ["sweep"]
    try:
        return foldonnx.cli.main(argv)
    finally:
        foldonnx.cli.COMMANDS[:] = saved


def mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["f"], axis=1),
            helper.make_node("Gemm", ["f", "W1", "B1"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "W2", "B2"], ["logits"], transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", C])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _toy_prune(model: onnx.ModelProto, ratio: float) -> tuple[onnx.ModelProto, int]:
    w = _weights(model)
    k = int(round(H * (1 - ratio)))
    keep = np.sort(np.argsort(-np.abs(w["W1"]).sum(axis=1))[:k])
    return mlp(w["W1"][keep], w["B1"][keep], w["W2"][:, keep], w["B2"]), k


@dataclass(frozen=True)
class ToyConfig(PassConfig):
    ratio: float = option(0.0, "fraction of the hidden units removed")


class ToyPrunePass(Pass):
    name = "toy-prune"
    summary = "test: keep the hidden units of largest L1 norm"
    Config = ToyConfig
    budget = {"channels": "ratio", "params": "ratio"}

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, PassReport]:
        new, k = _toy_prune(model, self.config.ratio)
        return new, self.new_report(notes=[f"kept {k}"])


class ToyIdentityPass(ToyPrunePass):
    name = "toy-identity"
    summary = "test: returns a copy of the model"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, PassReport]:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out, self.new_report()


class ToyFailsPass(ToyIdentityPass):
    name = "toy-fails"
    summary = "test: refuses ratios above 0.3"

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, PassReport]:
        if self.config.ratio > 0.3:
            raise PassError(f"cannot remove {self.config.ratio:.0%} of the channels")
        return super().apply(model, ctx)


for _cls in (ToyPrunePass, ToyIdentityPass, ToyFailsPass):
    register_pass(_cls, replace=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(H, FEAT)), rng.normal(size=H) * 0.1
    w2, b2 = rng.normal(size=(C, H)), np.zeros(C)
    onnx.save(mlp(w1, b1, w2, b2), str(d / "mlp.onnx"))
    x = rng.normal(size=(40, 3, 4, 4)).astype(np.float32)
    logits = np.maximum(x.reshape(40, -1) @ w1.T + b1, 0) @ w2.T + b2
    np.savez(d / "data.npz", x=x, labels=logits.argmax(axis=1))
    return {"dir": d, "model": d / "mlp.onnx", "npz": d / "data.npz"}


def test_registry_lists_builtins_and_rejects_unknown() -> None:
    assert {"fold", "prune-l1", "prune-l2", "quantize", "toy-prune"} <= set(list_passes())
    assert get_pass("toy-prune").summary.startswith("test: keep")
    with pytest.raises(UsageError, match="unknown pass 'nope'"):
        get_pass("nope")
    with pytest.raises(ValueError):
        register_pass(ToyPrunePass)


def test_stats_count_params_and_macs() -> None:
    rng = np.random.default_rng(1)
    m = mlp(rng.normal(size=(H, FEAT)), np.zeros(H), rng.normal(size=(C, H)), np.zeros(C))
    st = model_stats(m)
    assert st.params == H * FEAT + H + C * H + C
    assert st.macs == FEAT * H + H * C and st.unknown_mac_nodes == 0
    res = make_pass("toy-prune", {"ratio": 0.25}).run(m)
    assert res.report.notes == ["kept 24"] and res.report.after.params == 24 * FEAT + 24 + C * 24 + C
    assert model_stats(res.model).params == 24 * FEAT + 24 + C * 24 + C


def test_sweep_writes_table_json_and_png(setup: dict[str, Path]) -> None:
    out = setup["dir"] / "out"
    rc = main(
        ["sweep", str(setup["model"]), "--ratios", "0.25,0.5", "--methods", "toy-prune,toy-identity",
         "--data", str(setup["npz"]), "--task", "classifier", "--out", str(out), "--bench-iters", "5",
         "--bench-warmup", "1", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    rep = SweepReport.from_dict(json.loads((out / "sweep.json").read_text()))
    names = [p.name for p in rep.points]
    assert names == [
        "original",
        "toy-prune-r0.25",
        "toy-prune-r0.5",
        "toy-identity-r0.25",
        "toy-identity-r0.5",
    ]
    assert all(p.ok for p in rep.points)
    by = {p.name: p for p in rep.points}
    orig = by["original"]
    assert orig.params == H * FEAT + H + C * H + C and orig.macs == FEAT * H + H * C
    assert by["toy-prune-r0.25"].params == 24 * FEAT + 24 + C * 24 + C
    assert by["toy-prune-r0.5"].macs == FEAT * 16 + 16 * C
    assert by["toy-prune-r0.5"].bytes < orig.bytes
    mr = by["toy-prune-r0.5"].method_report
    assert mr["name"] == "toy-prune" and mr["params_removed"] == pytest.approx(
        1 - by["toy-prune-r0.5"].params / orig.params
    )
    # the unchanged model is a perfect copy; the original scores itself perfectly
    for n in ("original", "toy-identity-r0.5"):
        assert by[n].metrics["top1_agreement"] == 1.0 and by[n].metrics["kl_div"] == pytest.approx(
            0, abs=1e-9
        )
        assert by[n].accuracy == 1.0
    assert by["toy-prune-r0.5"].metrics["top1_agreement"] < 1.0
    assert rep.reference_accuracy == 1.0 and rep.task == "classifier" and rep.n_samples == 40
    # latency measured interleaved for every variant, as ratios to the original
    assert all(p.latency_ms is not None and p.latency_ms > 0 for p in rep.points)
    assert orig.latency_ratio == pytest.approx(1.0)
    md = (out / "sweep.md").read_text()
    assert md.count("\n| toy-") == 4 and "| original |" in md
    assert "- ratio 0.5: toy-prune does **not** beat toy-identity (0.3500 vs 1.0000); top1_agreement" in md
    from PIL import Image

    with Image.open(out / "pareto.png") as im:
        im.verify()
    with Image.open(out / "pareto.png") as im:
        assert im.format == "PNG" and im.size == (1800, 504)


def test_sweep_records_failed_points_and_quantizes(setup: dict[str, Path]) -> None:
    out = setup["dir"] / "q"
    rc = main(
        ["sweep", str(setup["model"]), "--ratios", "0.2,0.4", "--methods", "toy-fails", "--quantize", "int8",
         "--out", str(out), "--bench-iters", "0"]
    )  # fmt: skip
    assert rc == 0  # one point worked
    rep = SweepReport.from_dict(json.loads((out / "sweep.json").read_text()))
    by = {p.name: p for p in rep.points}
    assert set(by) == {"original", "toy-fails-r0.2", "toy-fails-r0.4", "original+int8", "toy-fails-r0.2+int8",
                       "toy-fails-r0.4+int8"}  # fmt: skip
    assert by["toy-fails-r0.4"].error == "cannot remove 40% of the channels"
    assert by["toy-fails-r0.4+int8"].error == by["toy-fails-r0.4"].error
    q = by["original+int8"]
    assert q.ok and Path(q.path).is_file() and q.bytes < by["original"].bytes
    # int8 weights are still parameters; the scale and zero point the quantizer adds per weight count too
    assert q.params == by["original"].params + 4
    assert q.metrics == {} and q.latency_ms is None  # no data, no bench asked
    assert "failed: cannot remove 40% of the channels" in (out / "sweep.md").read_text()


def test_sweep_bad_input_one_line(setup: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    rc = main(["sweep", str(setup["model"]), "--methods", "nope", "--out", str(setup["dir"] / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: unknown pass 'nope'") and "\n" not in err
    rc = main(["sweep", str(setup["model"]), "--ratios", "0.5,1.2", "--methods", "toy-identity"])
    assert rc == 2 and "ratios must be in (0, 1)" in capsys.readouterr().err
    rc = main(["sweep", str(setup["dir"] / "missing.onnx"), "--methods", "toy-identity"])
    assert rc == 1 and "model file not found" in capsys.readouterr().err


def test_compress_variants_reuses_earlier_files(setup: dict[str, Path]) -> None:
    from foldonnx.evaluate.sweep import compress_variants

    calls: list[float] = []

    class Counted(ToyPrunePass):
        name = "toy-counted"

        def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, PassReport]:
            calls.append(self.config.ratio)
            return super().apply(model, ctx)

    register_pass(Counted, replace=True)

    out = setup["dir"] / "reuse"
    kw = dict(ratios=[0.25], methods=["toy-counted"], out_dir=out, reuse=True)
    first = compress_variants(setup["model"], **kw)
    second = compress_variants(setup["model"], **kw)
    assert calls == [0.25]  # the second run took the file written by the first
    assert second[1].path == first[1].path and second[1].method_report == first[1].method_report
    assert first[1].method_report["name"] == "toy-counted"


def test_macs_fall_back_to_onnx_runtime_when_inference_cannot_tell() -> None:
    from foldonnx.graph.stats import _partial_dims, _skeleton

    nodes = [  # a reshape target computed through float ops: data propagation gives up
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["sf"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Sqrt", ["sf"], ["sq"]),
        helper.make_node("Mul", ["sq", "sq"], ["sq2"]),
        helper.make_node("Cast", ["sq2"], ["si"], to=onnx.TensorProto.INT64),
        helper.make_node("Reshape", ["x", "si"], ["y"]),
        helper.make_node("MatMul", ["y", "W"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((16, 8), np.float32), "W")],
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inferred = onnx.shape_inference.infer_shapes(_skeleton(m), data_prop=True)
    y = next(v for v in inferred.graph.value_info if v.name == "y")
    assert None in _partial_dims(y)  # the case the fallback exists for
    st = model_stats(m)
    assert (st.macs, st.unknown_mac_nodes, st.params) == (16 * 8, 0, 16 * 8)


def test_make_results_summary_redraws_from_json(tmp_path: Path) -> None:
    import importlib.util
    import sys

    from foldonnx.evaluate.sweep import SweepPoint

    pts = [SweepPoint("original", "original", 0.0, params=100, macs=1000, bytes=400, latency_ratio=1.0,
                      accuracy=0.9, metrics={"top1_agreement": 1.0, "kl_div": 0.0})]  # fmt: skip
    for r, acc, agree in ((0.2, 0.8, 0.9), (0.4, 0.5, 0.6)):
        metrics = {"top1_agreement": agree, "kl_div": r}
        pts.append(SweepPoint(f"m-r{r}", "m", r, params=int(100 * (1 - r)), macs=500, bytes=300,
                              latency_ratio=1 - r, accuracy=acc, metrics=metrics))  # fmt: skip
    rep = SweepReport(model="tiny.onnx", methods=["m"], ratios=[0.2, 0.4], quantize=None, data="d",
                      task="classifier", reference_accuracy=0.9, points=pts)  # fmt: skip
    results = tmp_path / "results"
    results.mkdir()
    (results / "tiny.json").write_text(json.dumps({**rep.to_dict(), "meta": {"command": "x", "git": "g"}}))
    spec = importlib.util.spec_from_file_location(
        "make_results", Path(__file__).parent.parent / "tools" / "make_results.py"
    )
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    sys.modules["make_results"] = tool  # dataclasses look their module up
    try:
        spec.loader.exec_module(tool)
        assert tool.main(["--summary-only", "--out", str(results)]) == 0
    finally:
        del sys.modules["make_results"]
    readme = (results / "README.md").read_text()
    assert "## tiny" in readme and "| m-r0.4 |" in readme and "![tiny](tiny.png)" in readme
    assert "Produced by `x` (git g" in readme
    from PIL import Image

    with Image.open(results / "tiny.png") as im:
        assert im.size == (1800, 504)
    assert (results / "tiny_top1_agreement.png").is_file()  # fidelity plot beside the accuracy one


def test_sweep_along_the_parameter_axis_uses_the_allocation(tmp_path: Path) -> None:
    """``axis="params"``: each point removes that fraction of the model's parameters (the fold
    method allocates it over its groups), and the names say so."""
    from test_fold_cli import _chain_mlp

    from foldonnx.evaluate.sweep import run_sweep

    src = tmp_path / "chain.onnx"
    onnx.save(_chain_mlp(np.random.default_rng(0)), str(src))
    rep = run_sweep(
        src, ratios=[0.3, 0.5], methods=["fold", "prune-l1"], out_dir=tmp_path / "out", axis="params",
        bench_iters=0, method_options={"groups": "mlp", "round_to": 1},
    )  # fmt: skip
    assert rep.axis == "params"
    by = {p.name: p for p in rep.points}
    assert sorted(by) == ["fold-p0.3", "fold-p0.5", "original", "prune-l1-p0.3", "prune-l1-p0.5"]
    orig = by["original"].params
    one_channel = (6 + 32 + 32 + 4) / orig
    for name, p in by.items():
        if name != "original":
            assert abs(1 - p.params / orig - p.ratio) <= one_channel / 2 + 1e-9, (name, p.params)
    assert "fractions of the parameters removed" in rep.to_markdown()
    with pytest.raises(UsageError, match="unknown sweep axis"):
        run_sweep(src, ratios=[0.3], methods=["fold"], out_dir=tmp_path / "o2", axis="heads")
