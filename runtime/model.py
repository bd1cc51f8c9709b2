"""Loading a patchgen ONNX file: validate it, read its metadata, open the session, call it on patches."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort

from .errors import PatchgenError
from .metadata import spec_from_metadata
from .session import open_session
from .spec import ModelSpec


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class OnnxModel:
    """A single-patch denoiser session and what it says about itself. Callable as a runtime PatchNet."""

    path: Path
    session: ort.InferenceSession
    spec: ModelSpec
    metadata: dict
    sha256: str

    def __call__(self, x: np.ndarray, t: np.ndarray, pos: Optional[np.ndarray], gcc: Optional[np.ndarray]):
        feeds = {"x": x, "t": t}
        if pos is not None:
            feeds["pos"] = pos
        if gcc is not None:
            feeds["gcc"] = gcc
        return self.session.run(["eps"], feeds)[0]


def expected_inputs(spec: ModelSpec) -> dict[str, list]:
    p, c = spec.patch_size, spec.channels
    inputs = {"x": [c, p, p], "t": []}
    if spec.use_position:
        inputs["pos"] = [spec.grid**2]
    if spec.use_gcc:
        inputs["gcc"] = [c, p, p]
    return inputs


def load_model(path, threads: int = 1) -> OnnxModel:
    """Open a patchgen ONNX file; anything else (missing, corrupt, foreign, mismatched) is a PatchgenError."""
    path = Path(path)
    if not path.is_file():
        raise PatchgenError(f"model {path} does not exist; pass an .onnx file written by patchgen-export")
    try:
        session = open_session(str(path), threads)
    except Exception as e:  # onnxruntime raises its own types for bad protobufs and graphs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PatchgenError(f"{path} is not a readable ONNX model (corrupt or truncated?): {first[:160]}") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    spec = spec_from_metadata(meta, source=str(path))
    have = {i.name: list(i.shape[1:]) for i in session.get_inputs()}
    want = expected_inputs(spec)
    if have != want or [o.name for o in session.get_outputs()] != ["eps"]:
        raise PatchgenError(f"{path}: graph inputs {have} do not match its metadata (expected {want} and output "
                            f"eps); re-export it with patchgen-export")
    return OnnxModel(path, session, spec, meta, file_sha256(path))
