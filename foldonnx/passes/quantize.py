"""Quantization with ONNX Runtime's tools as a pass: INT8 dynamic, INT8 static (QDQ) and FP16.

Defaults keep transformer accuracy:

* ``dynamic`` quantizes the weights of ``MatMul``/``Gemm`` whose B input is a constant (ORT's
  ``MatMulConstBOnly``); ``Conv`` is left out by default because ORT runs a dynamically
  quantized Conv as ``ConvInteger``, which has no fast CPU kernel (often slower than float).
* ``static`` writes QDQ, calibrated on real images (the context's calibration data, else the
  scikit-image photos), for ``Conv``/``MatMul``/``Gemm`` (and the ``Relu``/``Clip`` that ORT
  folds into their ranges). Softmax, LayerNormalization, GELU/Erf, the ops of a decomposed
  LayerNorm (ReduceMean/Pow/Sqrt/Div), residual Adds and attention MatMuls between two
  activations (``Q·Kᵀ``, ``P·V``) stay in float.
* ``fp16`` converts with ``onnxruntime.transformers.float16`` keeping float32 inputs/outputs
  and ORT's block list of ops without FP16 kernels.

ORT's quantizers work on files: :class:`QuantizePass` writes its input to a private temporary
folder, quantizes there and reads the result back into memory. ORT's tools also write into the
*working* folder (symbolic shape inference leaves ``sym_shape_infer_temp.onnx`` when it cannot
finish; older calibrators an ``augmented_model.onnx``), so all of their work runs with that
temporary folder as the working folder.

A model ONNX Runtime cannot load (an op of a custom domain, bfloat16 tensors, an opset newer
than ORT knows) is refused by :meth:`QuantizePass.requires` with the reason, before any work.
:func:`quantize_file` is the file-to-file form behind ``fold-onnx quantize``: it checks the
fidelity data before any work, runs the pass, measures fidelity to the input on real images and
writes the output last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from foldonnx.errors import PassError, UsageError
from foldonnx.onnx_file import load_model, model_byte_size, save_model
from foldonnx.passes.base import Change, Pass, PassContext, PassReport
from foldonnx.passes.config import PassConfig, option
from foldonnx.passes.registry import register_pass
from foldonnx.runtime.results import QuantizeResult

__all__ = [
    "QUANT_MODES",
    "DYNAMIC_OP_TYPES",
    "STATIC_OP_TYPES",
    "FLOAT_OP_TYPES",
    "FP16_BLOCK_OP_TYPES",
    "QuantizeConfig",
    "QuantizePass",
    "QuantizeReport",
    "quantize_file",
    "cpu_has_vnni",
    "runtime_refusal",
]

logger = logging.getLogger(__name__)

QUANT_MODES = ("dynamic", "static", "fp16")
DYNAMIC_OP_TYPES = ("MatMul", "Gemm")
STATIC_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Relu", "Clip")
# kept in float in every mode unless the user quantizes them explicitly
FLOAT_OP_TYPES = (
    "LayerNormalization",
    "Softmax",
    "Gelu",
    "Erf",
    "ReduceMean",
    "Pow",
    "Sqrt",
    "Div",
)
# beside ORT's own block list: Resize/Upsample stay FP32 (ORT's CPU optimisations mishandle FP16
# Resize around layout changes)
FP16_BLOCK_OP_TYPES = ("Resize", "Upsample")
_TWO_GB_MARGIN = int(1.8 * 2**30)


def _op_list(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _ops_text(value: Any) -> str:
    """A recipe's op list (``[Conv, MatMul]`` or ``"Conv,MatMul"``) as the CLI's text."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    """Options of ``quantize`` (see :mod:`foldonnx.passes.quantize`)."""

    mode: str = option("dynamic", "dynamic INT8, static INT8 (QDQ, calibrated) or fp16", choices=QUANT_MODES)
    per_channel: bool = option(False, "per-channel weight scales")
    reduce_range: bool | None = option(
        None, "7-bit weights (default: on for static on x86 CPUs without VNNI, where 8-bit products saturate)"
    )
    exclude: str = option("", "op types to keep in float", metavar="OP,...", parse=_ops_text)
    op_types: str | None = option(
        None, "op types to quantize (replaces the default)", metavar="OP,...", parse=_ops_text
    )
    calibrate_method: str = option("minmax", "static only", choices=("minmax", "entropy", "percentile"))
    quantize_attention: bool = option(False, "also quantize MatMuls between two activations")
    pre_process: bool = option(True, "run ORT's quant_pre_process (shape inference + optimisation) first")
    calib_limit: int = option(64, "calibration samples for static", metavar="N")

    def validate(self) -> None:
        if self.calib_limit < 1:
            raise UsageError(f"calib-limit must be positive, got {self.calib_limit}")
        if self.op_types is not None and not _op_list(self.op_types):
            raise UsageError("op-types is empty")


@dataclass
class QuantizeReport(PassReport):
    """What quantization did: op types quantized, nodes kept in float, calibration."""

    mode: str = "dynamic"
    per_channel: bool = False
    op_types: list[str] = field(default_factory=list)
    excluded_ops: list[str] = field(default_factory=list)
    excluded_nodes: int = 0
    calib_source: str = ""
    calib_count: int = 0
    preprocessed: bool = False

    def changes(self) -> list[Change]:
        to = "float16" if self.mode == "fp16" else f"int8 ({self.mode})"
        return [Change(what=op, kind="quantize", before="float32", after=to) for op in self.op_types]


class QuantizePass(Pass):
    """Quantize with ONNX Runtime (``mode``: dynamic | static | fp16); see module docstring."""

    name = "quantize"
    summary = "ONNX Runtime INT8 (dynamic, static QDQ) or FP16; attention/LayerNorm kept in float"
    Config = QuantizeConfig
    Report = QuantizeReport
    budget: ClassVar[Mapping[str, str]] = {}

    def requires(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        why = runtime_refusal(model)
        if why is not None:
            raise PassError(f"cannot quantize: {why}")

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, QuantizeReport]:
        c = self.config
        empty = self.new_report()
        report = QuantizeReport(**{k: getattr(empty, k) for k in ("name", "config", "before", "after")})
        report.mode, report.per_channel = c.mode, c.per_channel
        exclude = _op_list(c.exclude)
        op_types = _op_list(c.op_types) or None
        reduce_range = c.reduce_range
        if reduce_range is None:
            reduce_range = c.mode == "static" and not cpu_has_vnni()
            if reduce_range:
                report.notes.append("7-bit weights (reduce_range): this x86 CPU has no VNNI")
        big = model_byte_size(model) > _TWO_GB_MARGIN
        arrays = None
        if c.mode == "static":
            arrays = ctx.calibration(model, limit=c.calib_limit, default="photos")
            report.calib_source = (
                ctx.calib if isinstance(ctx.calib, str) else ("photos" if ctx.calib is None else "given")
            )
            report.calib_count = len(next(iter(arrays.values())))
        with tempfile.TemporaryDirectory(prefix="foldonnx-quant-") as tmp, _working_folder(tmp):
            tmpdir = Path(tmp)
            if c.mode == "fp16":
                out = _to_fp16(model, exclude, report)
            else:
                src = tmpdir / "input.onnx"
                save_model(model, src, external_data=big, check=False)
                model_in = _pre_process(src, tmpdir, big, report) if c.pre_process else load_model(src).model
                _ensure_node_names(model_in)
                work = tmpdir / "named.onnx"
                save_model(model_in, work, external_data=big, check=False)
                q_path = tmpdir / "quantized.onnx"
                if c.mode == "dynamic":
                    _dynamic(
                        model_in, work, q_path, c.per_channel, exclude, op_types, reduce_range, big, report
                    )
                else:
                    assert arrays is not None
                    _static(
                        model_in, work, q_path, arrays, c.per_channel, exclude, op_types, reduce_range,
                        c.calibrate_method, c.quantize_attention, big, report,
                    )  # fmt: skip
                out = load_model(q_path).model
        _copy_metadata(model, out)
        return out, report


register_pass(QuantizePass)


def quantize_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    mode: str = "dynamic",
    calib: str | None = "photos",
    *,
    limit: int | None = 64,
    preprocess: Any = None,
    check_source: str | None = "imagenet20",
    check_limit: int | None = 20,
    threads: int | None = None,
    **options: Any,
) -> QuantizeResult:
    """Quantize ``input_path`` to ``output_path`` and compare it to the input on real images.

    ``mode``: ``dynamic`` | ``static`` | ``fp16``; ``calib``: calibration SOURCE for static
    (default ``photos``; ignored by the other modes); other options are
    :class:`QuantizeConfig`'s (``per_channel``, ``exclude``, ``op_types``…).
    ``check_source=None`` skips the fidelity check. Everything is validated (paths, options, the
    check data) before any work; the output is written last.
    """
    from foldonnx.evaluate.fidelity import FidelityCheck

    t0 = time.perf_counter()
    for key in ("exclude", "op_types"):
        if key in options and isinstance(options[key], (list, tuple)):
            options[key] = ",".join(options[key])
    config = QuantizeConfig.from_options(
        {"mode": mode, "calib_limit": limit or 64, **options}, owner="quantize"
    )
    if config.mode == "static" and not calib:
        raise UsageError("static quantization needs calibration data: --calib SOURCE")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be >= 1, got {threads}")
    src, out = Path(input_path), Path(output_path)
    from foldonnx.onnx_file import check_output_path

    check_output_path(out, inputs=[src])
    loaded = load_model(src)
    ctx = PassContext(calib=calib if config.mode == "static" else None, preprocess=preprocess, verify=True)
    QuantizePass(config).requires(loaded.model, ctx)  # a model ORT cannot load: refused first
    check = (
        FidelityCheck(loaded.model, check_source, limit=check_limit, preprocess=preprocess, threads=threads)
        if check_source
        else None
    )
    if config.mode == "static":  # calibration data checked against the model before the work
        ctx.calibration(loaded.model, limit=config.calib_limit, default="photos")
    res = QuantizePass(config).run(loaded.model, ctx)
    rep: QuantizeReport = res.report  # type: ignore[assignment]
    fid = check.compare(res.model) if check is not None else None
    big = loaded.file_size > _TWO_GB_MARGIN
    save_model(res.model, out, source=src, external_data=True if big else None)
    result = QuantizeResult(
        input=str(src),
        output=str(out),
        mode=config.mode,
        size_before=loaded.file_size,
        size_after=load_model(out, load_weights=False).file_size,
        per_channel=config.per_channel,
        op_types=rep.op_types,
        excluded_ops=rep.excluded_ops,
        excluded_nodes=rep.excluded_nodes,
        calib_source=rep.calib_source,
        calib_count=rep.calib_count,
        preprocessed=rep.preprocessed,
        fidelity=fid,
        notes=rep.notes,
        seconds=time.perf_counter() - t0,
    )
    logger.info(
        "quantized %s -> %s (%s): %.1f MB -> %.1f MB",
        src, out, config.mode, result.size_before / 1e6, result.size_after / 1e6,
    )  # fmt: skip
    return result


# op domains ONNX Runtime's CPU build has kernels for
_ORT_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc")


def runtime_refusal(model: onnx.ModelProto) -> str | None:
    """Why ONNX Runtime (and so its quantizers) cannot work on *model*, in one line; None when it
    loads. Checks bfloat16 tensors, ops of custom domains and the opset first (clear reasons),
    then creates a CPU session on the model's weightless skeleton (no weights copied)."""
    from foldonnx.graph.verify import shape_model

    g = model.graph
    bf16 = [
        vi.name
        for vi in [*g.input, *g.output]
        if vi.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    ] + [t.name for t in g.initializer if t.data_type == onnx.TensorProto.BFLOAT16]
    if bf16:
        more = f" and {len(bf16) - 3} more" if len(bf16) > 3 else ""
        return (
            f"bfloat16 tensors ({', '.join(bf16[:3])}{more}): ONNX Runtime's quantizers and CPU kernels "
            "need float32 (convert the model to float32 first)"
        )
    functions = {(f.domain, f.name) for f in model.functions}
    custom = sorted(
        {
            f"{n.domain}.{n.op_type}"
            for n in g.node
            if n.domain not in _ORT_DOMAINS and (n.domain, n.op_type) not in functions
        }
    )
    if custom:
        return f"op {', '.join(custom[:3])} of a custom domain: ONNX Runtime has no kernel for it"
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > onnx.defs.onnx_opset_version():
        return f"opset {opset} is newer than this onnx package knows ({onnx.defs.onnx_opset_version()})"
    import onnxruntime as ort

    skel, _ = shape_model(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(skel.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure is the reason
        return f"ONNX Runtime cannot load it: {_ort_message(exc)}"
    return None


def _ort_message(exc: BaseException) -> str:
    """ORT's error without its code prefix, file paths and C++ signatures, on one line."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Load model from \S+ failed:", "", text)
    text = re.sub(r"/\S+:\d+ (\S+ )*?\S+\(.*?\)( const)? ", "", text)  # src/file.h:46 void f(...)
    text = text.strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def _working_folder(path: str | os.PathLike) -> Iterator[None]:
    """Run ORT's tools with *path* as the working folder (they leave files in it)."""
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)


def _samples(arrays: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    for i in range(n):
        yield {k: v[i : i + 1] for k, v in arrays.items()}


def _calibration_reader(arrays: dict[str, np.ndarray]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """One real sample per call, batch 1 (works with batch-fixed models)."""

        def __init__(self) -> None:
            self._it = _samples(arrays)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = _samples(arrays)

    return _Reader()


def _activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose two inputs are both computed (attention Q·Kᵀ and P·V)."""
    consts = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts.update(n.output)
    return [
        n.name for n in model.graph.node if n.op_type == "MatMul" and not any(x in consts for x in n.input)
    ]


def _ensure_node_names(model: onnx.ModelProto) -> None:
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}_foldonnx"
        seen.add(n.name)


def cpu_has_vnni() -> bool:
    """True unless this is an x86 CPU without AVX-VNNI/AVX512-VNNI (Linux ``/proc/cpuinfo``)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown: keep full-range weights
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    have = {p.key for p in dst.metadata_props}
    for p in src.metadata_props:
        if p.key not in have:
            dst.metadata_props.add(key=p.key, value=p.value)


def _pre_process(src: Path, tmpdir: Path, big: bool, report: QuantizeReport) -> onnx.ModelProto:
    """ORT's ``quant_pre_process`` (symbolic shape inference + graph optimisation) where it works."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmpdir / "pre.onnx"
    try:
        quant_pre_process(str(src), str(pre), save_as_external_data=big, all_tensors_to_one_file=True)
        model = load_model(pre).model
        report.preprocessed = True
        return model
    except Exception as exc:  # noqa: BLE001 - third-party tool failing on an unusual graph
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning("quant_pre_process failed (%s); quantizing the model as it is", first)
        report.notes.append(f"quant_pre_process skipped: {first}")
        return load_model(src).model


def _dynamic(
    model: onnx.ModelProto,
    work: Path,
    q_path: Path,
    per_channel: bool,
    exclude: list[str],
    op_types: Sequence[str] | None,
    reduce_range: bool,
    big: bool,
    report: QuantizeReport,
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    types = [t for t in (op_types or DYNAMIC_OP_TYPES) if t not in exclude]
    if not types:
        raise PassError("nothing left to quantize: every op type is excluded")
    skip = [n.name for n in model.graph.node if n.op_type in exclude]
    report.op_types, report.excluded_ops, report.excluded_nodes = types, sorted(set(exclude)), len(skip)
    try:
        quantize_dynamic(
            str(work),
            str(q_path),
            op_types_to_quantize=types,
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=skip,
            use_external_data_format=big,
            extra_options={"MatMulConstBOnly": True},
        )
    except Exception as exc:  # noqa: BLE001 - the third-party quantizer failing on this graph
        raise PassError(f"ONNX Runtime's dynamic quantizer failed: {_ort_message(exc)}") from None


def _static(
    model: onnx.ModelProto,
    work: Path,
    q_path: Path,
    arrays: dict[str, np.ndarray],
    per_channel: bool,
    exclude: list[str],
    op_types: Sequence[str] | None,
    reduce_range: bool,
    calibrate_method: str,
    quantize_attention: bool,
    big: bool,
    report: QuantizeReport,
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if calibrate_method not in methods:
        raise UsageError(f"unknown calibration method {calibrate_method!r} ({', '.join(methods)})")
    types = [t for t in (op_types or STATIC_OP_TYPES) if t not in exclude]
    if not types:
        raise PassError("nothing left to quantize: every op type is excluded")
    float_ops = set(exclude) | ({*FLOAT_OP_TYPES} - set(op_types or ()))
    skip = [n.name for n in model.graph.node if n.op_type in float_ops]
    if not quantize_attention and "MatMul" in types:
        skip += _activation_matmuls(model)
    report.op_types, report.excluded_ops, report.excluded_nodes = types, sorted(float_ops), len(skip)
    try:  # in the pass's temporary working folder: ORT may write its augmented model there
        quantize_static(
            str(work),
            str(q_path),
            _calibration_reader(arrays),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=types,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=skip,
            use_external_data_format=big,
            calibrate_method=methods[calibrate_method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    except (PassError, UsageError):
        raise
    except Exception as exc:  # noqa: BLE001 - the third-party quantizer failing on this graph
        raise PassError(f"ONNX Runtime's static quantizer failed: {_ort_message(exc)}") from None


def _shape_arithmetic_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that compute only from shapes and small constants (sizes, reshape targets, Resize
    scales): they stay in FP32, since FP16 rounding there changes integer results (e.g.
    ``Cast(Pow(N, 0.5))`` in DINOv2's position-embedding interpolation)."""
    derived: set[str] = set()
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        if n <= 8:
            derived.add(init.name)
    keep: list[str] = []
    for node in model.graph.node:  # graph nodes are in topological order
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            small = value is not None and int(np.prod(value.dims, dtype=np.int64)) <= 8
            if small or value is None:
                derived.update(node.output)
            continue
        if node.op_type in ("Shape", "Size") or (
            node.input and all((not t) or t in derived for t in node.input)
        ):
            derived.update(node.output)
            keep.append(node.name)
    return keep


def _to_fp16(model: onnx.ModelProto, exclude: list[str], report: QuantizeReport) -> onnx.ModelProto:
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError:
        raise PassError("fp16 needs onnxruntime.transformers (part of the onnxruntime wheel)") from None
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_BLOCK_OP_TYPES) | set(exclude))
    report.op_types, report.excluded_ops = ["all float ops"], sorted(set(exclude))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _ensure_node_names(m)
    keep_nodes = _shape_arithmetic_nodes(m)
    report.excluded_nodes = len(keep_nodes)
    converted = convert_float_to_float16(
        m,
        keep_io_types=True,
        op_block_list=block,
        node_block_list=keep_nodes,
        disable_shape_infer=model.ByteSize() > _TWO_GB_MARGIN,
    )
    # the converter appends the input casts after their consumers: restore topological order
    from onnxruntime.transformers.onnx_model import OnnxModel

    OnnxModel(converted).topological_sort()
    return converted
