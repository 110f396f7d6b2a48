"""The one place where ONNX files are read and every output file is written.

* Reading: checks the file exists and parses, loads external data, and remembers how the
  weights were laid out (single file or external data) so a rewrite can keep that layout.
* Writing models: never over the input file, atomically (write to a temporary file in the
  target folder, then rename), with external data automatically when the model is over 2 GB or
  the source used external data; node metadata survives because we write the ``ModelProto`` we
  were given, not a graphsurgeon round trip.
* :class:`OutputGuard`: a command claims every file it will write (model, ``--json``,
  reports, plots, folders) *before* any work starts; a claim is refused when the path is an
  input model or one of its external data files, another output of the same run, a folder, or
  in a missing or read-only folder. Text outputs are written atomically too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from foldonnx.errors import ModelFileError

__all__ = [
    "LoadedModel",
    "load_model",
    "save_model",
    "model_byte_size",
    "external_data_files",
    "check_model_file",
    "OutputGuard",
    "check_output_path",
    "write_text_atomic",
    "make_temp_dir",
    "remove_stale_temp",
    "TWO_GB",
]

logger = logging.getLogger(__name__)

TWO_GB = 2**31 - 1  # protobuf's hard limit for one serialized message
# Leave headroom for the graph structure around the weights.
_EXTERNAL_THRESHOLD = int(1.8 * 2**30)


@dataclass
class LoadedModel:
    """A model and where it came from."""

    model: onnx.ModelProto
    path: Path | None
    external_data: bool  # the source file kept its weights in external data files

    @property
    def file_size(self) -> int:
        """Bytes on disk: the .onnx file plus its external data files."""
        if self.path is None:
            return model_byte_size(self.model)
        if not self.external_data:
            return self.path.stat().st_size
        return _files_size(self.path)


def _files_size(path: Path) -> int:
    total = path.stat().st_size
    seen: set[str] = set()
    # loading external data clears the references from the in-memory model: read them again
    shallow = onnx.load(str(path), load_external_data=False)
    for init in shallow.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                loc = path.parent / entry.value
                if loc.exists():
                    total += loc.stat().st_size
    return total


def load_model(path: str | os.PathLike, *, load_weights: bool = True) -> LoadedModel:
    """Load an ONNX file with its external data; one-line :class:`ModelFileError` on failure."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelFileError(f"model path is a directory, not an ONNX file: {p}")
    if p.stat().st_size == 0:
        raise ModelFileError(f"model file is empty: {p}")
    # parse once; then pull in external data (if any) from beside the file
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelFileError(f"cannot read ONNX model {p} (truncated or not ONNX?): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - protobuf/onnx raise assorted types
        raise ModelFileError(f"cannot read ONNX model {p}: {type(exc).__name__}: {exc}") from None
    external = any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    if external and load_weights:
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelFileError(f"cannot read the external data of {p}: {exc}") from None
    if not model.graph.node and not model.graph.output:
        raise ModelFileError(f"{p} parsed but holds no graph (truncated or not an ONNX model?)")
    logger.debug("loaded %s (%d nodes, external data: %s)", p, len(model.graph.node), external)
    return LoadedModel(model=model, path=p, external_data=external)


def model_byte_size(model: onnx.ModelProto) -> int:
    """Size of the model if serialized in one piece (weights included)."""
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) if init.HasField("raw_data") else _tensor_nbytes(init)
    # graph structure is small next to weights; count it roughly without serializing twice
    return total + 64 * len(model.graph.node)


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    try:
        item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # noqa: BLE001
        item = 4
    return n * item


TEMP_PREFIX = ".foldonnx-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temp(parent: str | os.PathLike) -> int:
    """Remove the temporary folders and files an earlier run left in *parent* when it was
    killed (SIGKILL, power loss): their names carry the writing process's pid, and a pid that is
    no longer alive means nothing will finish them. Returns how many were removed."""
    removed = 0
    folder = Path(parent) if str(parent) else Path(".")
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not name.startswith(TEMP_PREFIX) and ".foldonnx-" not in name:
            continue
        tail = name.split(".foldonnx-", 1)[1]
        pid_text = tail.split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        logger.info("removed %s, left by a killed run (pid %s)", entry, pid_text)
        removed += 1
    return removed


def make_temp_dir(parent: str | os.PathLike, tag: str = "") -> Path:
    """A private temporary folder in *parent* (same file system, so the final move is a rename),
    named ``.[tag.]foldonnx-<pid>-XXXX`` so a later run can tell it was abandoned; stale ones
    from killed runs are removed first."""
    folder = Path(parent) if str(parent) else Path(".")
    remove_stale_temp(folder)
    prefix = (f".{tag}" if tag else "") + f"{TEMP_PREFIX}{os.getpid()}-"
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    except OSError as exc:
        raise ModelFileError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    external_data: bool | None = None,
    check: bool = True,
) -> Path:
    """Write *model* to *path* atomically.

    ``source`` is the input file; writing over it (or over its external data) is refused.
    ``external_data=None`` picks external data when the source used it or the model is
    over ~1.8 GB; the data file is ``<name>.data`` beside the output.
    ``check`` runs ``onnx.checker`` first (by path for large models).
    """
    out = Path(path)
    if source is not None and _same_file(Path(source), out):
        raise ModelFileError(f"output path is the input file: {out} (choose another path)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise ModelFileError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise ModelFileError(f"output folder is not writable: {parent}")
    if out.is_dir():
        raise ModelFileError(f"output path is a directory: {out}")

    size = model_byte_size(model)
    if external_data is None:
        external_data = size > _EXTERNAL_THRESHOLD
    data_name = out.name + ".data"
    if external_data and source is not None:
        for src_data in external_data_files(source):
            if _same_file(src_data, parent / data_name):
                raise ModelFileError(
                    f"output would overwrite the input's external data: {parent / data_name}"
                )

    tmpdir = make_temp_dir(parent)
    try:
        tmp_model = tmpdir / out.name
        if external_data:
            onnx.save_model(
                model,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            # save_model with external data rewrites the in-memory initializers to refer to the
            # file; load them back so the caller's model stays usable
            onnx.load_external_data_for_model(model, str(tmpdir))
        else:
            onnx.save_model(model, str(tmp_model))
        if check:
            try:
                onnx.checker.check_model(str(tmp_model))
            except onnx.checker.ValidationError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
                raise ModelFileError(f"refusing to write an invalid model to {out}: {first}") from None
        mode = 0o666 & ~_umask()
        written = [tmpdir / data_name] if external_data and (tmpdir / data_name).exists() else []
        for f in [*written, tmp_model]:
            f.chmod(mode)
        for f in written:
            os.replace(f, parent / f.name)
        os.replace(tmp_model, out)
    except OSError as exc:
        raise ModelFileError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        for f in tmpdir.iterdir() if tmpdir.exists() else ():
            with contextlib.suppress(OSError):
                f.unlink()
        with contextlib.suppress(OSError):
            tmpdir.rmdir()
    logger.info("wrote %s (%.1f MB%s)", out, size / 1e6, ", external data" if external_data else "")
    return out


def check_model_file(path: str | os.PathLike) -> LoadedModel:
    """Read *path* without its weights, and check that every external data file it refers to
    exists and holds the bytes it should (truncated or missing data is a one-line
    :class:`ModelFileError` here, not an ONNX Runtime error later)."""
    loaded = load_model(path, load_weights=False)
    if not loaded.external_data:
        return loaded
    base = Path(path).parent
    for init in loaded.model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        loc = base / info.get("location", "")
        if not loc.is_file():
            raise ModelFileError(f"{path}: external data file {loc} is missing (tensor {init.name!r})")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > loc.stat().st_size:
            raise ModelFileError(f"{path}: external data file {loc} is truncated (tensor {init.name!r})")
    return loaded


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files an ONNX file refers to (empty for a single-file model or a file
    that cannot be read)."""
    p = Path(path)
    try:
        shallow = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - not readable: it refers to nothing we know of
        return []
    out: list[Path] = []
    for init in shallow.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and (p.parent / entry.value) not in out:
                out.append(p.parent / entry.value)
    return out


class OutputGuard:
    """The files one run will write, checked before any work starts (see module docstring).

    ``inputs``: the model files the run reads (their external data files are protected too).
    :meth:`claim` a path for every output; :meth:`save_model` / :meth:`write_text` write only
    claimed paths."""

    def __init__(self, inputs: list[str | os.PathLike] | tuple = ()) -> None:
        self.protected: list[tuple[Path, str]] = []
        for inp in inputs:
            p = Path(inp)
            self.protected.append((p, "the input file"))
            for data in external_data_files(p) if p.is_file() else []:
                self.protected.append((data, f"the external data of the input {p.name}"))
        self.claimed: dict[Path, str] = {}

    def claim(self, path: str | os.PathLike, what: str = "output", *, folder: bool = False) -> Path:
        """Check *path* for *what* (``--json``, ``model``…); returns it. ``folder=True``: an
        output folder (created if missing, refused if it is a file)."""
        out = Path(path)
        if str(path) in ("", "."):
            raise ModelFileError(f"{what}: no path given")
        for prot, desc in self.protected:
            if _same_file(prot, out):
                raise ModelFileError(f"{what} path is {desc}: {out} (choose another path)")
        for other, other_what in self.claimed.items():
            if _same_file(other, out):
                raise ModelFileError(f"{what} path is also the {other_what} of this run: {out}")
        if folder:
            if out.exists() and not out.is_dir():
                raise ModelFileError(f"{what} {out} exists and is not a folder")
            parent = out.parent if str(out.parent) else Path(".")
            if not out.exists() and not parent.exists():
                raise ModelFileError(f"{what}: the folder {parent} does not exist")
        else:
            if out.is_dir():
                raise ModelFileError(f"{what} path {out} is a folder, not a file")
            parent = out.parent if str(out.parent) else Path(".")
            if not parent.exists():
                raise ModelFileError(f"{what}: output folder does not exist: {parent}")
            if not parent.is_dir():
                raise ModelFileError(f"{what}: {parent} is not a folder")
            if not os.access(parent, os.W_OK):
                raise ModelFileError(f"{what}: output folder is not writable: {parent}")
        self.claimed[out] = what
        return out

    def _check_claimed(self, path: Path) -> None:
        if not any(_same_file(c, path) or c == path for c in self.claimed):
            raise ModelFileError(f"internal: {path} was not claimed before writing")

    def write_text(self, path: str | os.PathLike, text: str) -> Path:
        out = Path(path)
        self._check_claimed(out)
        return write_text_atomic(out, text)

    def save_model(self, model: onnx.ModelProto, path: str | os.PathLike, **kwargs: object) -> Path:
        out = Path(path)
        self._check_claimed(out)
        return save_model(model, out, **kwargs)  # type: ignore[arg-type]


def check_output_path(path: str | os.PathLike, *, inputs: list | tuple = (), what: str = "output") -> Path:
    """:meth:`OutputGuard.claim` for a single output of a run reading *inputs*."""
    return OutputGuard(inputs).claim(path, what)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write *text* to *path* through a temporary file in the same folder and a rename, so a
    crash never leaves a half-written file."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        remove_stale_temp(parent)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise ModelFileError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ModelFileError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out
