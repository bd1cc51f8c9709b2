"""What an ONNX file's output depends on: the file itself and the external-data files its tensors name.

The edge path has no `onnx` package, so this reads the few protobuf fields it needs straight from the
file (onnx.proto: ModelProto.graph = 7; GraphProto.node = 1, initializer = 5, sparse_initializer = 15;
NodeProto.attribute = 5; AttributeProto.t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor = 22,
sparse_tensors = 23; SparseTensorProto.values = 1, indices = 2; TensorProto.external_data = 13, a
StringStringEntryProto with key = 1, value = 2). The file is memory-mapped and every other field,
raw weight bytes included, is skipped by its length, so only the pages of message headers are read.
"""
from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

# message kind -> {field number: kind of the sub-message it holds}; fields not listed are skipped.
_FIELDS = {
    "model": {7: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}


class _Corrupt(ValueError):
    pass


def _varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _Corrupt("truncated varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, start, end) of each length-delimited field in buf[start:end]; others skipped."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _varint(buf, i)
            if i + length > end:
                raise _Corrupt("field runs past its message")
            yield number, i, i + length
            i += length
        else:
            raise _Corrupt(f"unsupported wire type {wire}")


def _locations(buf, kind: str, start: int, end: int, out: set) -> None:
    children = _FIELDS[kind]
    if kind == "entry":
        entry = {n: bytes(buf[a:b]) for n, a, b in _fields(buf, start, end) if n in (1, 2)}
        if entry.get(1) == b"location":
            out.add(entry.get(2, b"").decode("utf-8", "replace"))
        return
    for number, a, b in _fields(buf, start, end):
        if number in children:
            _locations(buf, children[number], a, b, out)


def external_data_files(path) -> list[str]:
    """The external-data locations (relative to the file's folder) that `path`'s tensors name, sorted.

    Raises ValueError when the file is not a readable protobuf."""
    path = Path(path)
    out: set = set()
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            error = None
            with memoryview(m) as view:  # released before the map closes, also when parsing fails
                try:
                    _locations(view, "model", 0, len(m), out)
                except _Corrupt as e:
                    error = str(e)
            if error is not None:
                raise ValueError(f"{path} is not a valid ONNX protobuf: {error}")
    return sorted(out)


def model_sha256(path) -> str:
    """SHA-256 of everything that determines the model's output: the .onnx file's bytes, then, for each
    external-data file it names (sorted), a header with its name and size followed by its bytes.
    Without external data this is the plain SHA-256 of the file (`sha256sum` gives the same)."""
    path = Path(path)
    h = hashlib.sha256()

    def add_file(p: Path) -> None:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)

    add_file(path)
    for location in external_data_files(path):
        data = path.parent / location
        h.update(f"\0patchgen-external-data\0{location}\0{data.stat().st_size}\0".encode())
        add_file(data)
    return h.hexdigest()
