"""Writing an exported model: one .onnx file, or for a large model the graph plus its weights as external data.

Large models (weights of EXTERNAL_DATA_FROM bytes or more) keep every initializer of EXTERNAL_TENSOR_FROM
bytes or more in `<name>.<content hash>.data` beside `<name>.onnx`, each at an offset that is a multiple of
ALIGNMENT. onnxruntime memory-maps such data instead of copying it, so opening the model (and building its
cached, device-optimised graph, runtime/graph_cache.py) holds the weights once. Below that size a single
file is kept: the cached graph, which every later run opens, has its weights mapped either way, and a
single file costs only its first run's build one extra copy of the weights, at most EXTERNAL_DATA_FROM
(benchmarks/results/model_scale.md has the first-run and cached peaks of both forms).

Atomic and crash-safe. The data file is named after its content, so it never replaces the data of the
model already in place: a model is committed by one rename of its .onnx, after which the previous export's
data file of that name is removed. A killed export leaves at most a temporary .onnx and an unreferenced
data file, which the next export to the same name removes.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import onnx

from patchgen.runtime.files import current_umask, remove_stale_temporaries, temporary_prefix, write_error
from patchgen.runtime.onnxfile import external_data_files

MIB = 2**20
EXTERNAL_DATA_FROM = 16 * MIB  # weights from this size up go to an external-data file
EXTERNAL_TENSOR_FROM = 64 * 1024  # initializers from this size up go there; smaller ones stay in the graph
ALIGNMENT = 64 * 1024  # a multiple of every page size in use (4, 16 and 64 KiB ARM kernels; Windows' granularity)


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def data_name(output: Path, digest: str) -> str:
    return f"{output.name}.{digest[:12]}.data"


@dataclass
class Staged:
    """A model written beside its target under temporary names, to be checked, then committed or dropped."""

    target: Path
    onnx: Path  # the temporary .onnx: open it to check the model
    data: Optional[Path] = None  # its external-data file (final name), None for a single file
    data_is_new: bool = False  # written by this export (dropped with it), not already there
    committed: bool = field(default=False, init=False)

    @property
    def file_bytes(self) -> int:
        return self.onnx.stat().st_size + (self.data.stat().st_size if self.data else 0)

    def commit(self) -> None:
        folder = self.target.parent
        os.replace(self.onnx, self.target)
        self.onnx = self.target
        self.committed = True
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        keep = set(external_data_files(self.target))
        for old in folder.glob(f"{self.target.name}.*.data"):  # a previous export's, or a killed one's
            if old.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()

    def drop(self) -> None:
        for path in (self.onnx, self.data if self.data_is_new else None):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _write_data(model: onnx.ModelProto, folder: Path, output: Path) -> tuple[Path, bool, list]:
    """Write the large initializers' bytes at aligned offsets; (data file, whether new, [(tensor, offset)])."""
    placed, position = [], 0
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(output.name + ".data"), suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for tensor in model.graph.initializer:
                raw = tensor.raw_data
                if tensor.data_location == onnx.TensorProto.EXTERNAL or len(raw) < EXTERNAL_TENSOR_FROM:
                    continue
                padding = b"\0" * (-position % ALIGNMENT)
                for chunk in (padding, raw):
                    f.write(chunk)
                    digest.update(chunk)
                position += len(padding)
                placed.append((tensor, position))
                position += len(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        data = folder / data_name(output, digest.hexdigest())
        if data.exists() and data.stat().st_size == position:  # the same weights, exported before
            os.unlink(tmp)
            return data, False, placed
        os.replace(tmp, data)
        return data, True, placed
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _serialized(model: onnx.ModelProto, placed: list, data: Optional[Path]) -> bytes:
    """The graph's bytes with each `placed` (tensor, offset) referring to its bytes in the data file `data`
    by name, offset and length; the ModelProto is restored afterwards (left unchanged)."""
    raws = [(tensor, tensor.raw_data) for tensor, _ in placed]
    try:
        for tensor, offset in placed:
            length = len(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
        return model.SerializeToString()
    finally:
        for tensor, raw in raws:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw


@contextlib.contextmanager
def staged(model: onnx.ModelProto, output: Path) -> Iterator[Staged]:
    """Write `model` (left unchanged) beside `output` under temporary names and yield them as a Staged; what
    is not committed inside the block is removed on the way out. A write that fails is a PatchgenError."""
    output = Path(output)
    folder = output.parent
    remove_stale_temporaries(folder, output.name)
    remove_stale_temporaries(folder, output.name + ".data")
    stage = None
    try:
        data, data_is_new, placed = (None, False, [])
        if initializer_bytes(model) >= EXTERNAL_DATA_FROM:
            data, data_is_new, placed = _write_data(model, folder, output)
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(output.name), suffix=".tmp", dir=folder)
        stage = Staged(output, Path(tmp), data, data_is_new)
        graph = _serialized(model, placed, data)
        with os.fdopen(fd, "wb") as f:
            f.write(graph)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
    except BaseException as e:  # a full disk, or Ctrl-C / SIGTERM mid-write: nothing is left
        if stage is not None:
            stage.drop()
        elif data_is_new:
            with contextlib.suppress(FileNotFoundError):
                data.unlink()
        if isinstance(e, OSError):
            raise write_error(e, f"the model in {folder}", "choose another output folder") from None
        raise
    try:
        yield stage
    finally:
        if not stage.committed:
            stage.drop()
