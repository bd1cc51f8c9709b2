"""What an ONNX file's output depends on: the file itself and the external-data files its tensors name.

The edge path has no `onnx` package, so this reads the few protobuf fields it needs straight from the
file (onnx.proto: ModelProto.graph = 7; GraphProto.node = 1, initializer = 5, sparse_initializer = 15;
NodeProto.attribute = 5; AttributeProto.t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor = 22,
sparse_tensors = 23; SparseTensorProto.values = 1, indices = 2; TensorProto.external_data = 13, a
StringStringEntryProto with key = 1, value = 2; ModelProto.metadata_props = 14). The file is memory-mapped and every other field,
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


def _locations(buf, kind: str, start: int, end: int, out: list) -> None:
    """Append {"location", "offset", "length"} (as strings) of every tensor with external data."""
    children = _FIELDS[kind]
    if kind == "tensor":
        entries = {}
        for number, a, b in _fields(buf, start, end):
            if number == 13:
                entry = {n: bytes(buf[x:y]).decode("utf-8", "replace") for n, x, y in _fields(buf, a, b) if n in (1, 2)}
                entries[entry.get(1, "")] = entry.get(2, "")
        if "location" in entries:
            out.append(entries)
        return
    for number, a, b in _fields(buf, start, end):
        if number in children:
            _locations(buf, children[number], a, b, out)


def external_data_ranges(path) -> dict[str, list[tuple[int, int]]]:
    """location -> the (offset, length) byte ranges its tensors use, merged and sorted; length -1 runs to
    the end of the file (no length given). Raises ValueError when the file is not a readable protobuf or
    an offset or length is not a number."""
    tensors: list = []
    _mapped(Path(path), lambda view: _locations(view, "model", 0, len(view), tensors))
    ranges: dict = {}
    for t in tensors:
        try:
            offset, length = int(t.get("offset") or 0), int(t.get("length") or -1)
        except ValueError:
            raise ValueError(f"{path}: external data offset {t.get('offset')!r} or length {t.get('length')!r} "
                             "is not a number") from None
        if offset < 0 or length < -1:
            raise ValueError(f"{path}: external data offset {offset} or length {length} is negative")
        ranges.setdefault(t["location"], []).append((offset, length))
    return {loc: _merged(spans) for loc, spans in sorted(ranges.items())}


def _merged(spans: list) -> list[tuple[int, int]]:
    if any(length == -1 for _, length in spans):  # one tensor runs to the end: from the first offset on
        return [(min(o for o, _ in spans), -1)]
    out: list = []
    for offset, length in sorted(spans):
        if out and offset <= out[-1][0] + out[-1][1]:
            start, size = out[-1]
            out[-1] = (start, max(size, offset + length - start))
        else:
            out.append((offset, length))
    return out


def referenced_bytes(path) -> int:
    """Bytes of the model file plus the external-data bytes its tensors use (a data file's unused tail,
    sparse or not, is not counted). Raises ValueError as `external_data_ranges`, OSError for a missing file."""
    path = Path(path)
    total = path.stat().st_size
    for location, spans in external_data_ranges(path).items():
        size = (path.parent / location).stat().st_size
        total += sum((size - o if n == -1 else min(n, max(size - o, 0))) for o, n in spans)
    return total


def external_data_files(path) -> list[str]:
    """The external-data locations (relative to the file's folder) that `path`'s tensors name, sorted.

    Raises ValueError when the file is not a readable protobuf."""
    return sorted(external_data_ranges(path))


def _mapped(path: Path, read) -> object:
    """read(view) on the file memory-mapped; ValueError when it is empty or not a readable protobuf."""
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            error = result = None
            with memoryview(m) as view:  # released before the map closes, also when parsing fails
                try:
                    result = read(view)
                except _Corrupt as e:
                    error = str(e)
            if error is not None:
                raise ValueError(f"{path} is not a valid ONNX protobuf: {error}")
    return result


def metadata_props(path) -> dict[str, str]:
    """The model's metadata_props (ModelProto field 14, key = 1, value = 2) as a dict, read from the file
    without onnxruntime or loading any weight: what a runtime checks before opening a session.
    Raises ValueError when the file is not a readable protobuf."""
    def read(view) -> dict:
        out = {}
        for number, a, b in _fields(view, 0, len(view)):
            if number == 14:
                entry = {n: bytes(view[x:y]).decode("utf-8", "replace") for n, x, y in _fields(view, a, b)}
                out[entry.get(1, "")] = entry.get(2, "")
        return out
    return _mapped(Path(path), read)


def model_sha256(path) -> str:
    """SHA-256 of everything that determines the model's output: the .onnx file's bytes, then, for each
    external-data file it names (sorted), a header with its name and the byte ranges its tensors use,
    followed by those bytes only (so a data file's unused tail, however large, costs nothing to hash).
    Without external data this is the plain SHA-256 of the file (`sha256sum` gives the same)."""
    path = Path(path)
    h = hashlib.sha256()

    def add(p: Path, offset: int = 0, length: int = -1) -> None:
        with open(p, "rb") as f:
            f.seek(offset)
            left = length if length >= 0 else float("inf")
            while left > 0:
                block = f.read(int(min(1 << 20, left)))
                if not block:
                    break
                h.update(block)
                left -= len(block)

    add(path)
    for location, spans in external_data_ranges(path).items():
        data = path.parent / location
        h.update(f"\0patchgen-external-data\0{location}\0{spans}\0".encode())
        for offset, length in spans:
            add(data, offset, length)
    return h.hexdigest()
