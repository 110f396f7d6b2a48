"""No command destroys a file, leaves a partial output behind, or prints a traceback for a user
mistake: the output guard, validation before writing, SIGTERM / SIGKILL during a fold, stale
temporary folders, and a table of bad inputs across every command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldonnx.cli import main


def mlp_model(width: int = 16, depth: int = 1, seed: int = 0, batch: str | int = "N") -> onnx.ModelProto:
    """x [N, 8] -> (MatMul W_i -> Relu)*depth -> MatMul -> y [N, 4]: MLP groups to fold."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev, d_in = [], [], "x", 8
    for i in range(depth):
        inits.append(numpy_helper.from_array(rng.normal(size=(d_in, width)).astype(np.float32), f"w{i}"))
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        prev, d_in = f"r{i}", width
    inits.append(numpy_helper.from_array(rng.normal(size=(d_in, 4)).astype(np.float32), "wo"))
    nodes.append(helper.make_node("MatMul", [prev, "wo"], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], inits,
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model(), str(path))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _err(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "{m}", "--json", "{m}"],
        ["fold", "{m}", "{o}", "--ratio", "0.5", "--json", "{m}"],
        ["fold", "{m}", "{o}", "--ratio", "0.5", "--report", "{m}"],
        ["quantize", "{m}", "{o}", "--no-check", "--json", "{m}"],
        ["bench", "{m}", "--iters", "2", "--json", "{m}"],
        ["profile", "{m}", "--iters", "2", "--json", "{m}"],
        ["eval", "{m}", "{m}", "--data", "{npz}", "--json", "{m}"],
        ["compress", "{m}", "{o}", "--recipe", "[{fold: {ratio: 0.5}}]", "--json", "{m}"],
        ["sweep", "{m}", "--methods", "fold", "--ratios", "0.5", "--out", "{m}"],
        ["profile", "{m}", "--trace-dir", "{m}"],
    ],
)
def test_no_command_writes_over_its_input(model_file: Path, tmp_path: Path, capsys, argv) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 8), np.float32))
    before = _snapshot(tmp_path)
    subst = {"{m}": str(model_file), "{o}": str(tmp_path / "out.onnx"), "{npz}": str(tmp_path / "d.npz")}
    rc = main([subst.get(a, a) for a in argv])
    err = _err(capsys)
    assert rc != 0 and ("input file" in err or "is not a folder" in err), err
    assert _snapshot(tmp_path) == before  # nothing written, nothing modified


def test_report_over_the_output_model_is_refused(model_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.onnx"
    assert main(["fold", str(model_file), str(out), "--ratio", "0.5", "--report", str(out)]) == 1
    assert "also the output of this run" in _err(capsys) and not out.exists()


def test_outputs_are_checked_before_any_work(model_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.onnx"
    missing = tmp_path / "no" / "such" / "r.json"
    assert main(["fold", str(model_file), str(out), "--ratio", "0.5", "--json", str(missing)]) == 1
    assert "does not exist" in _err(capsys) and not out.exists()
    (tmp_path / "folder.onnx").mkdir()
    assert main(["fold", str(model_file), str(tmp_path / "folder.onnx"), "--ratio", "0.5"]) == 1
    assert "is a folder" in _err(capsys)
    # quantize validates the check data before it writes the model
    assert main(["quantize", str(model_file), str(out), "--check", "nosuchsource"]) == 1
    assert "unknown data source" in _err(capsys) and not out.exists()
    assert main(["quantize", str(model_file), str(out), "--threads", "0"]) == 2
    assert ">= 1" in _err(capsys) and not out.exists()


def test_json_to_stdout(model_file: Path, capsys) -> None:
    import json

    assert main(["inspect", str(model_file), "--json", "-", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == 8 * 16 + 16 * 4 and "mlp" in [g["kind"] for g in data["groups"]]


def test_fold_external_data_model_into_its_own_folder(tmp_path: Path, capsys) -> None:
    """The input keeps its weights in a data file of its own name; folding it into the same
    folder writes the output's own data file and leaves the input's untouched."""
    model = mlp_model(width=64)
    src = tmp_path / "ext.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="weights.bin", size_threshold=0)
    before = _snapshot(tmp_path)
    out = tmp_path / "folded.onnx"
    assert main(["fold", str(src), str(out), "--ratio", "0.5", "-q"]) == 0
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in before} == before
    assert (tmp_path / "folded.onnx.data").exists()  # the output keeps the external-data layout
    folded = onnx.load(str(out))
    assert folded.graph.initializer[0].dims == [8, 32]


def test_stale_temp_folder_of_a_killed_run_is_removed(model_file: Path, tmp_path: Path) -> None:
    stale = tmp_path / ".foldonnx-99999999-abcd"
    stale.mkdir()
    (stale / "half.onnx").write_bytes(b"partial")
    live = tmp_path / f".foldonnx-{os.getpid()}-live"  # a running process's folder stays
    live.mkdir()
    assert main(["fold", str(model_file), str(tmp_path / "o.onnx"), "--ratio", "0.5", "-q"]) == 0
    assert not stale.exists() and live.exists()


def _fold_subprocess(src: Path, out: Path) -> subprocess.Popen:
    code = "import sys; from foldonnx.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, "fold", str(src), str(out), "--ratio", "0.5", "--round-to", "1", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_fold_leaves_the_output_absent_or_complete(tmp_path: Path, sig: int) -> None:
    """A fold killed at several points: afterwards OUT is either absent or a complete, valid
    model; SIGTERM also removes its temporary folder (SIGKILL's is removed by the next run)."""
    src = tmp_path / "big.onnx"
    onnx.save(mlp_model(width=512, depth=6), str(src))
    outcomes = set()
    for delay in (0.3, 1.0, 2.0, 3.5, 6.0):
        out = tmp_path / f"out_{delay}.onnx"
        proc = _fold_subprocess(src, out)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if out.exists():
            onnx.checker.check_model(onnx.load(str(out)))  # complete
            outcomes.add("complete")
        else:
            outcomes.add("absent")
        if proc.returncode not in (0, -sig):
            assert b"Traceback" not in err, err.decode()
        if sig == signal.SIGTERM:
            assert not [p for p in tmp_path.iterdir() if ".foldonnx-" in p.name], list(tmp_path.iterdir())
    assert "absent" in outcomes  # at least one kill landed before the write
    # whatever a SIGKILL left behind is gone after the next run
    assert main(["fold", str(src), str(tmp_path / "final.onnx"), "--ratio", "0.5", "-q"]) == 0
    assert not [p for p in tmp_path.iterdir() if ".foldonnx-" in p.name]


BAD_INPUTS = [
    # (argv, exit code, message) — {m} a good model, {o} an output path, {t} the tmp folder
    (["fold", "{t}/missing.onnx", "{o}", "--ratio", "0.5"], 1, "model file not found"),
    (["fold", "{junk}", "{o}", "--ratio", "0.5"], 1, "cannot read ONNX model"),
    (["fold", "{m}", "{o}", "--ratio", "abc"], 2, "expected float"),
    (["fold", "{m}", "{o}", "--ratio", "1.5"], 2, "ratio must be in [0, 1)"),
    (["fold", "{m}", "{o}", "--target-params", "0.99"], 1, "out of reach"),
    (["fold", "{m}", "{o}", "--ratio", "0.5", "--seed", "-1"], 2, "seed must be >= 0"),
    (
        ["fold", "{m}", "{o}", "--ratio", "0.5", "--repair", "data", "--calib", "imagenet20"],
        1,
        "needs an .npz",
    ),
    (["fold", "{m}", "{o}", "--ratio", "0.5", "--repair", "data", "--calib", "{badnpz}"], 1, "needs size 8"),
    (["quantize", "{m}", "{o}", "--mode", "int4"], 2, "'int4' is not one of dynamic, static, fp16"),
    (["quantize", "{m}", "{o}", "--mode", "static", "--calib", "imagenet20"], 1, "needs an .npz"),
    (["quantize", "{m}", "{o}", "--limit", "0"], 2, "calib-limit must be positive"),
    (["eval", "{m}", "{junk}", "--data", "{npz}"], 1, "cannot read ONNX model"),
    (["eval", "{m}", "{m}", "--data", "{npz}", "--batch-size", "0"], 2, "--batch-size must be >= 1"),
    (["eval", "{m}", "{m}", "--data", "{npz}", "--seed", "-3"], 2, "--seed must be >= 0"),
    (["eval", "{m}", "{m}", "--data", "{npz}", "--std", "0,1,1"], 2, "must not contain a zero"),
    (["eval", "{m}", "{m}", "--data", "{npz}", "--image-size", "0"], 2, "--image-size must be >= 1"),
    (["eval", "{m}", "{m}", "--data", "imagenet20"], 1, "needs an .npz"),
    (["eval", "{m}", "{m}", "--data", "{strnpz}"], 1, "not numbers"),
    (["bench", "{m}", "--iters", "0"], 2, "--iters must be >= 1"),
    (
        ["sweep", "{m}", "--methods", "fold", "--ratios", "0.5", "--option", "nope=1"],
        2,
        "no method takes 'nope'",
    ),
    (
        ["sweep", "{m}", "--methods", "fold", "--ratios", "0.5", "--bench-iters", "-1"],
        2,
        "--bench-iters must be >= 0",
    ),
    (
        ["compress", "{m}", "{o}", "--recipe", "[{fold: {ratio: 0.5}}]", "--calib", "{badnpz}"],
        1,
        "needs size 8",
    ),
    (["compress", "{m}", "{o}"], 2, "give exactly one of --recipe"),
]


@pytest.mark.parametrize("argv, code, message", BAD_INPUTS)
def test_bad_inputs_one_line_error_nothing_written(
    model_file: Path, tmp_path: Path, capsys, argv, code, message
) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07 random bytes, not a model " * 20)
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 8), np.float32))
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 5), np.float32))
    np.savez(tmp_path / "str.npz", x=np.array([["a"] * 8] * 2))
    subst = {
        "{m}": str(model_file), "{o}": str(tmp_path / "out.onnx"), "{junk}": str(junk),
        "{npz}": str(tmp_path / "d.npz"), "{badnpz}": str(tmp_path / "bad.npz"),
        "{strnpz}": str(tmp_path / "str.npz"),
    }  # fmt: skip
    before = _snapshot(tmp_path)
    rc = main([subst.get(a, a).replace("{t}", str(tmp_path)) for a in argv])
    err = _err(capsys)
    assert rc == code and message in err, (rc, err)
    assert _snapshot(tmp_path) == before
