"""ONNX Runtime sessions whose execution provider is checked, and synthetic inputs.

``onnxruntime-gpu`` silently falls back to the CPU when the CUDA libraries are missing, so a
session is only handed out after :func:`create_session` has read back
``session.get_providers()`` and found the provider that was asked for; otherwise it raises a
one-line :class:`~foldonnx.errors.RuntimeBackendError`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from foldonnx.errors import RuntimeBackendError, UsageError

__all__ = [
    "PROVIDERS",
    "InputSpec",
    "RuntimeSession",
    "BatchSizeError",
    "available_providers",
    "resolve_providers",
    "create_session",
    "input_specs",
    "make_inputs",
    "model_label",
]

logger = logging.getLogger(__name__)

PROVIDERS: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_AUTO_ORDER = ("tensorrt", "cuda", "cpu")
_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
_PROTO_LIMIT = 2**31 - 1 - 2**20


class BatchSizeError(RuntimeBackendError):
    """The model's inputs cannot take the requested batch size (e.g. batch fixed at 1)."""


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeBackendError(
            "onnxruntime is not installed (pip install 'fold-onnx[cpu]' or 'fold-onnx[gpu]')"
        ) from None
    return onnxruntime


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    return list(_ort().get_available_providers())


def resolve_providers(provider: str, available: list[str] | None = None) -> list[str]:
    """The provider list to give ORT for ``auto|cuda|tensorrt|cpu``.

    ``auto`` picks the best available (TensorRT > CUDA > CPU). An accelerator that this build
    does not offer at all is an error here, before any session is made.
    """
    avail = available_providers() if available is None else available
    key = provider.lower()
    if key == "auto":
        key = next(k for k in _AUTO_ORDER if PROVIDERS[k] in avail or k == "cpu")
    if key not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r} (choose auto, cuda, tensorrt or cpu)")
    wanted = PROVIDERS[key]
    if wanted not in avail:
        hint = " (install onnxruntime-gpu instead of onnxruntime)" if key != "cpu" else ""
        raise RuntimeBackendError(
            f"provider '{key}' requested but this onnxruntime build offers only {', '.join(avail)}{hint}"
        )
    # fall back explicitly along the chain for nodes the accelerator cannot run
    chain = [PROVIDERS[k] for k in _AUTO_ORDER[_AUTO_ORDER.index(key) :] if PROVIDERS[k] in avail]
    return chain


@dataclass(frozen=True)
class InputSpec:
    """One model input as ORT reports it: dims are ints or symbolic names (``None`` if unnamed)."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: Any  # numpy dtype class


@dataclass
class RuntimeSession:
    """A checked ORT session and what it really runs on."""

    session: Any  # onnxruntime.InferenceSession
    label: str
    requested: str
    providers: list[str]
    create_s: float
    inputs: list[InputSpec] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    threads: int | None = None

    @property
    def device(self) -> str:
        """``cuda`` when the first provider is an NVIDIA one, else ``cpu``."""
        return (
            "cuda"
            if self.providers and self.providers[0] in (PROVIDERS["cuda"], PROVIDERS["tensorrt"])
            else "cpu"
        )

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


def model_label(model: str | os.PathLike | onnx.ModelProto | bytes, index: int = 0) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, onnx.ModelProto) and model.graph.name:
        return f"{model.graph.name}#{index}"
    return f"model#{index}"


def _model_source(model: str | os.PathLike | onnx.ModelProto | bytes, tmpdir: Path | None) -> str | bytes:
    if isinstance(model, bytes):
        return model
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() < _PROTO_LIMIT:
            return model.SerializeToString()
        if tmpdir is None:
            raise RuntimeBackendError("model over 2 GB given in memory: pass a file path instead")
        from foldonnx.onnx_file import save_model

        path = tmpdir / "model.onnx"
        save_model(model, path, external_data=True, check=False)
        return str(path)
    from foldonnx.onnx_file import load_model

    load_model(model, load_weights=False)  # one-line ModelFileError for missing/corrupt files
    return str(model)


def create_session(
    model: str | os.PathLike | onnx.ModelProto | bytes,
    provider: str = "auto",
    threads: int | None = None,
    profile: bool = False,
    profile_prefix: str | os.PathLike | None = None,
    optimization: str = "all",
    label: str | None = None,
    spinning: bool | None = None,
) -> RuntimeSession:
    """Create an ORT session on ``provider`` and check that it really runs there.

    ``threads`` sets intra-op threads (``None``: ORT's default); ``optimization`` is
    ``all|extended|basic|none`` (ORT graph optimisation level). ``spinning=False`` stops idle
    intra-op threads from busy-waiting after a run (``None``: ORT's default, spinning on); several
    sessions timed interleaved need it off, or one session's spinning threads slow the next.
    """
    ort = _ort()
    chain = resolve_providers(provider)
    opts = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise UsageError(f"unknown optimization level {optimization!r} (all, extended, basic, none)")
    opts.graph_optimization_level = levels[optimization]
    opts.log_severity_level = 3
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    if profile:
        opts.enable_profiling = True
        if profile_prefix is not None:
            opts.profile_file_prefix = str(profile_prefix)
    name = label or model_label(model)
    with tempfile.TemporaryDirectory(prefix="foldonnx-session-") as tmp:
        source = _model_source(model, Path(tmp))
        t0 = time.perf_counter()
        try:
            session = ort.InferenceSession(source, sess_options=opts, providers=chain)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeBackendError(f"onnxruntime cannot load {name}: {first}") from None
        create_s = time.perf_counter() - t0
    actual = list(session.get_providers())
    if actual and actual[0] != chain[0] and provider.lower() == "auto":
        # auto = the best provider that really works; what runs is read back and reported
        logger.warning("%s: %s unavailable at run time, running on %s", name, chain[0], actual[0])
    elif not actual or actual[0] != chain[0]:
        raise RuntimeBackendError(
            f"{chain[0]} requested but the session for {name} runs on {actual[0] if actual else 'nothing'} "
            "(CUDA/TensorRT libraries missing or incompatible?)"
        )
    specs = input_specs(session)
    logger.debug("session %s on %s created in %.3f s", name, actual, create_s)
    return RuntimeSession(
        session=session,
        label=name,
        requested=provider,
        providers=actual,
        create_s=create_s,
        inputs=specs,
        output_names=[o.name for o in session.get_outputs()],
        threads=threads,
    )


def input_specs(session: Any) -> list[InputSpec]:
    """Names, shapes and numpy dtypes of the session's inputs."""
    specs = []
    for i in session.get_inputs():
        dtype = _ORT_DTYPES.get(i.type)
        if dtype is None:
            raise RuntimeBackendError(f"input {i.name!r} has unsupported type {i.type}")
        dims = tuple(
            d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None) for d in i.shape
        )
        specs.append(InputSpec(name=i.name, shape=dims, dtype=dtype))
    return specs


def make_inputs(
    specs: list[InputSpec],
    batch: int,
    dims: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded random inputs for ``specs`` at ``batch``.

    The first dimension is the batch: a dynamic one takes ``batch``; a fixed one must equal it
    (else :class:`BatchSizeError`). Other dynamic dims must be named in ``dims`` (by their
    symbolic name, or ``"<input>:<axis>"``).
    """
    if batch < 1:
        raise UsageError(f"batch must be >= 1, got {batch}")
    dims = dims or {}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape: list[int] = []
        for axis, d in enumerate(spec.shape):
            if axis == 0:
                if isinstance(d, int):
                    if d != batch:
                        raise BatchSizeError(
                            f"input '{spec.name}' has a fixed batch of {d}, cannot run batch {batch}"
                        )
                    shape.append(d)
                else:
                    shape.append(batch)
                continue
            if isinstance(d, int):
                shape.append(d)
                continue
            key_axis = f"{spec.name}:{axis}"
            if key_axis in dims:
                shape.append(int(dims[key_axis]))
            elif isinstance(d, str) and d in dims:
                shape.append(int(dims[d]))
            else:
                raise UsageError(
                    f"input '{spec.name}' axis {axis} is dynamic ({d or '?'}): give its size, "
                    f"e.g. --dim {d or key_axis}=N"
                )
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype is np.bool_:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return feeds
