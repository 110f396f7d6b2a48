"""Exception types of fold-onnx.

Every error a user can cause (bad path, bad model, bad option) is a :class:`FoldOnnxError`
whose message is one line; the CLI prints ``error: <message>`` and exits non-zero.
"""

from __future__ import annotations

__all__ = [
    "FoldOnnxError",
    "ModelFileError",
    "ExportError",
    "ParityError",
    "AnalysisError",
    "PassError",
    "RuntimeBackendError",
    "DataError",
    "UsageError",
    "MissingDependencyError",
]


class FoldOnnxError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    exit_code: int = 1

    def __str__(self) -> str:  # keep messages on one line whatever the cause
        return " ".join(super().__str__().split())


class UsageError(FoldOnnxError):
    """A bad option or option combination (exit code 2, like argparse)."""

    exit_code = 2


class ModelFileError(FoldOnnxError):
    """An ONNX file cannot be read or written (missing, truncated, unwritable, same as input)."""


class ExportError(FoldOnnxError):
    """A model cannot be built or exported (unknown name, bad checkpoint, no network for weights)."""


class ParityError(ExportError):
    """The exported graph disagrees with torch beyond the tolerance."""


class AnalysisError(FoldOnnxError):
    """The graph cannot be analysed at all (as opposed to single groups being blocked)."""


class PassError(FoldOnnxError):
    """A pass cannot run with the given options on this model (e.g. impossible ratio)."""


class RuntimeBackendError(FoldOnnxError):
    """ONNX Runtime cannot create the requested session (e.g. CUDA asked for, CPU given)."""


class DataError(FoldOnnxError):
    """A data source is missing, empty or malformed."""


class MissingDependencyError(UsageError):
    """An optional package a command needs is not installed (the message names the extra)."""
