"""INT8 (dynamic, static QDQ) and FP16 conversion with ONNX Runtime's tools, and a fidelity check.

Defaults keep transformer accuracy:

* ``dynamic`` quantizes the weights of ``MatMul``/``Gemm`` whose B input is a constant (ORT's
  ``MatMulConstBOnly``); ``Conv`` is left out by default because ORT runs a dynamically
  quantized Conv as ``ConvInteger``, which has no fast CPU kernel (often slower than float).
* ``static`` writes QDQ, calibrated on real images, for ``Conv``/``MatMul``/``Gemm`` (and the
  ``Relu``/``Clip`` that ORT folds into their ranges). Softmax, LayerNormalization, GELU/Erf,
  the ops of a decomposed LayerNorm (ReduceMean/Pow/Sqrt/Div), residual Adds and attention
  MatMuls between two activations (``Q·Kᵀ``, ``P·V``) stay in float.
* ``fp16`` converts with ``onnxruntime.transformers.float16`` keeping float32 inputs/outputs
  and ORT's block list of ops without FP16 kernels.

The result is written through :func:`foldonnx.onnx_file.save_model` (atomic, never over the
input; external data above ~1.8 GB) and checked against the input model on real images.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from foldonnx.errors import DataError, ModelFileError, PassError, RuntimeBackendError, UsageError
from foldonnx.onnx_file import load_model, save_model
from foldonnx.runtime.results import FidelityReport, QuantizeResult
from foldonnx.runtime.session import create_session

__all__ = [
    "QUANT_MODES",
    "DYNAMIC_OP_TYPES",
    "STATIC_OP_TYPES",
    "FLOAT_OP_TYPES",
    "FP16_BLOCK_OP_TYPES",
    "quantize",
    "fidelity",
    "model_inputs_from_source",
    "preprocess_for",
    "cosine_rows",
    "cpu_has_vnni",
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


# ---------------------------------------------------------------------------------------------
# data


def _image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if not inputs:
        raise DataError("model has no inputs to feed")
    return inputs[0]


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def preprocess_for(model: onnx.ModelProto) -> Any:
    """The preprocessing for ``model``: from its ``foldonnx.preprocess`` metadata when the
    registry can read it, else ImageNet mean/std at the model's input size (224 if dynamic)."""
    from foldonnx.data.sources import Preprocess

    try:
        from foldonnx.models.registry import read_preprocess  # written by the exporter module
    except ImportError:
        read_preprocess = None
    if read_preprocess is not None:
        try:
            pre = read_preprocess(model)
        except Exception as exc:  # noqa: BLE001 - malformed metadata: fall back, say so
            logger.warning("cannot read preprocessing metadata (%s); using ImageNet defaults", exc)
            pre = None
        if isinstance(pre, Preprocess):
            return pre
        if isinstance(pre, dict):
            keys = {k: pre[k] for k in ("size", "mean", "std", "resize") if k in pre}
            for k in ("mean", "std"):
                if k in keys:
                    keys[k] = tuple(float(x) for x in keys[k])
            return Preprocess(**keys)
    dims = _dims(_image_input(model))
    size = dims[-1] if len(dims) == 4 and dims[-1] else 224
    return Preprocess(size=int(size))


def model_inputs_from_source(
    model: onnx.ModelProto, source: str, limit: int | None = None, preprocess: Any = None, seed: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Real inputs for ``model`` from a data SOURCE (built-in name, image folder or .npz):
    ``({input name: [N, ...]}, labels or None)``."""
    from foldonnx.data.sources import ImageSet, load_source

    data = load_source(source, limit=limit, seed=seed)
    first = _image_input(model)
    if isinstance(data, ImageSet):
        pre = preprocess if preprocess is not None else preprocess_for(model)
        arrays = {first.name: pre(data)}
    else:
        arrays = {(first.name if k == "" else k): v for k, v in data.arrays.items()}
    want = onnx.helper.tensor_dtype_to_np_dtype(first.type.tensor_type.elem_type)
    arrays = {k: (v.astype(want) if k == first.name and v.dtype != want else v) for k, v in arrays.items()}
    if len(next(iter(arrays.values()))) == 0:
        raise DataError(f"data source {source!r} gave no samples")
    return arrays, data.labels


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


# ---------------------------------------------------------------------------------------------
# fidelity


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` and ``b`` flattened per sample (pure numpy)."""
    x = np.asarray(a, np.float64).reshape(len(a), -1)
    y = np.asarray(b, np.float64).reshape(len(b), -1)
    num = (x * y).sum(1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num == 0, 1.0, 0.0))
    return cos


def fidelity(
    reference: str | os.PathLike | onnx.ModelProto,
    candidate: str | os.PathLike | onnx.ModelProto,
    source: str = "imagenet20",
    limit: int | None = 20,
    preprocess: Any = None,
    provider: str = "cpu",
    threads: int | None = None,
    output: str | None = None,
) -> FidelityReport:
    """Run both models on real inputs (one at a time) and compare one output (the first by default).

    Cosine of the outputs per sample; when the output is ``[N, C]`` with ``C > 1`` also top-1
    agreement, and top-1 accuracy of both when the source's labels fall in ``[0, C)`` — unless
    the model's ``foldonnx.task`` metadata says it is not a classifier (e.g. CLIP embeddings).
    """
    ref_model = reference if isinstance(reference, onnx.ModelProto) else load_model(reference).model
    arrays, labels = model_inputs_from_source(ref_model, source, limit=limit, preprocess=preprocess)
    ref = create_session(reference, provider, threads=threads, label="reference")
    cand = create_session(candidate, provider, threads=threads, label="candidate")
    name = output or ref.output_names[0]
    if name not in ref.output_names or name not in cand.output_names:
        raise UsageError(f"output {name!r} is not an output of both models")
    ri, ci = ref.output_names.index(name), cand.output_names.index(name)
    outs_r, outs_c = [], []
    for feed in _samples(arrays):
        for rs, idx, outs in ((ref, ri, outs_r), (cand, ci, outs_c)):
            try:
                outs.append(np.asarray(rs.run(feed)[idx], np.float64))
            except Exception as exc:  # noqa: BLE001 - ORT run failures come as assorted types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise RuntimeBackendError(
                    f"the {rs.label} model fails to run on real inputs: {first}"
                ) from None
    r, c = np.concatenate(outs_r), np.concatenate(outs_c)
    cos = cosine_rows(r, c)
    report = FidelityReport(
        source=source,
        n=len(r),
        output=name,
        cosine_mean=float(cos.mean()),
        cosine_min=float(cos.min()),
        max_abs_diff=float(np.abs(r - c).max()),
    )
    task = {p.key: p.value for p in ref_model.metadata_props}.get("foldonnx.task")
    if r.ndim == 2 and r.shape[1] > 1 and task in (None, "classifier"):  # not for embeddings
        top_r, top_c = r.argmax(1), c.argmax(1)
        report.top1_agreement = float((top_r == top_c).mean())
        if labels is not None and len(labels) == len(r) and labels.min() >= 0 and labels.max() < r.shape[1]:
            report.top1_acc_reference = float((top_r == labels).mean())
            report.top1_acc_candidate = float((top_c == labels).mean())
    return report


# ---------------------------------------------------------------------------------------------
# quantization


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


def _files_size(path: Path) -> int:
    return load_model(path, load_weights=False).file_size


def quantize(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    mode: str = "dynamic",
    calib: str | None = "photos",
    per_channel: bool = False,
    exclude_ops: Sequence[str] = (),
    op_types: Sequence[str] | None = None,
    limit: int | None = 64,
    preprocess: Any = None,
    calibrate_method: str = "minmax",
    pre_process: bool = True,
    quantize_attention: bool = False,
    reduce_range: bool | None = None,
    check_source: str | None = "imagenet20",
    check_limit: int | None = 20,
    threads: int | None = None,
) -> QuantizeResult:
    """Quantize ``input_path`` to ``output_path`` and check it against the input on real images.

    ``mode``: ``dynamic`` | ``static`` (QDQ, needs ``calib``) | ``fp16``. ``exclude_ops`` keeps
    those op types in float (static/dynamic) or FP32 (fp16). ``op_types`` replaces the default
    list of op types to quantize. ``check_source=None`` skips the fidelity check.
    """
    t0 = time.perf_counter()
    if mode not in QUANT_MODES:
        raise UsageError(f"unknown quantization mode {mode!r} (choose {', '.join(QUANT_MODES)})")
    src, out = Path(input_path), Path(output_path)
    loaded = load_model(src)
    try:
        same = out.exists() and os.path.samefile(src, out)
    except OSError:
        same = False
    if same or src.resolve() == out.resolve():
        raise ModelFileError(f"output path is the input file: {out} (choose another path)")
    if not out.parent.exists():
        raise ModelFileError(f"output folder does not exist: {out.parent}")
    if mode == "static" and not calib:
        raise UsageError("static quantization needs calibration data: --calib SOURCE")
    exclude = [e for e in exclude_ops if e]
    result = QuantizeResult(
        input=str(src),
        output=str(out),
        mode=mode,
        size_before=loaded.file_size,
        size_after=0,
        per_channel=per_channel,
    )
    big = loaded.file_size > _TWO_GB_MARGIN
    if reduce_range is None and mode == "static":
        reduce_range = not cpu_has_vnni()
        if reduce_range:
            result.notes.append("7-bit weights (reduce_range): this x86 CPU has no VNNI")
    reduce_range = bool(reduce_range)

    with tempfile.TemporaryDirectory(prefix="foldonnx-quant-") as tmp:
        tmpdir = Path(tmp)
        if mode == "fp16":
            model = _to_fp16(loaded.model, exclude, result)
        else:
            model_in = _pre_process(src, tmpdir, big, result) if pre_process else loaded.model
            _ensure_node_names(model_in)
            work = tmpdir / "named.onnx"
            save_model(model_in, work, external_data=big, check=False)
            q_path = tmpdir / "quantized.onnx"
            if mode == "dynamic":
                _dynamic(model_in, work, q_path, per_channel, exclude, op_types, reduce_range, big, result)
            else:
                assert calib is not None
                pre = preprocess if preprocess is not None else preprocess_for(loaded.model)
                arrays, _ = model_inputs_from_source(model_in, calib, limit=limit, preprocess=pre)
                result.calib_source, result.calib_count = calib, len(next(iter(arrays.values())))
                _static(
                    model_in,
                    work,
                    q_path,
                    arrays,
                    per_channel,
                    exclude,
                    op_types,
                    reduce_range,
                    calibrate_method,
                    quantize_attention,
                    big,
                    result,
                )
            model = load_model(q_path).model
        _copy_metadata(loaded.model, model)
        save_model(model, out, source=src, external_data=None if not big else True)
    result.size_after = _files_size(out)
    if check_source:
        result.fidelity = fidelity(
            src, out, source=check_source, limit=check_limit, preprocess=preprocess, threads=threads
        )
    result.seconds = time.perf_counter() - t0
    logger.info(
        "quantized %s -> %s (%s): %.1f MB -> %.1f MB",
        src,
        out,
        mode,
        result.size_before / 1e6,
        result.size_after / 1e6,
    )
    return result


def _copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    have = {p.key for p in dst.metadata_props}
    for p in src.metadata_props:
        if p.key not in have:
            dst.metadata_props.add(key=p.key, value=p.value)


def _pre_process(src: Path, tmpdir: Path, big: bool, result: QuantizeResult) -> onnx.ModelProto:
    """ORT's ``quant_pre_process`` (symbolic shape inference + graph optimisation) where it works."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmpdir / "pre.onnx"
    try:
        quant_pre_process(str(src), str(pre), save_as_external_data=big, all_tensors_to_one_file=True)
        model = load_model(pre).model
        result.preprocessed = True
        return model
    except Exception as exc:  # noqa: BLE001 - third-party tool failing on an unusual graph
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning("quant_pre_process failed (%s); quantizing the model as it is", first)
        result.notes.append(f"quant_pre_process skipped: {first}")
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
    result: QuantizeResult,
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    types = [t for t in (op_types or DYNAMIC_OP_TYPES) if t not in exclude]
    if not types:
        raise PassError("nothing left to quantize: every op type is excluded")
    skip = [n.name for n in model.graph.node if n.op_type in exclude]
    result.op_types, result.excluded_ops, result.excluded_nodes = types, sorted(set(exclude)), len(skip)
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
    result: QuantizeResult,
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
    result.op_types, result.excluded_ops, result.excluded_nodes = types, sorted(float_ops), len(skip)
    with tempfile.TemporaryDirectory(prefix="foldonnx-calib-") as aug:
        cwd = os.getcwd()
        os.chdir(aug)  # ORT writes its augmented calibration model into the working folder
        try:
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
        finally:
            os.chdir(cwd)


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


def _to_fp16(model: onnx.ModelProto, exclude: list[str], result: QuantizeResult) -> onnx.ModelProto:
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError:
        raise PassError("fp16 needs onnxruntime.transformers (part of the onnxruntime wheel)") from None
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_BLOCK_OP_TYPES) | set(exclude))
    result.op_types, result.excluded_ops = ["all float ops"], sorted(set(exclude))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _ensure_node_names(m)
    keep_nodes = _shape_arithmetic_nodes(m)
    result.excluded_nodes = len(keep_nodes)
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
