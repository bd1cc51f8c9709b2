"""Loading a patchgen ONNX file: validate it, read its metadata, open the session, call it on patches."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnxruntime as ort

from .errors import PatchgenError
from .limits import available_cpus
from .metadata import spec_from_metadata
from .onnxfile import model_sha256
from .pretrained import resolve_model
from .session import DEFAULT_PROVIDER, open_session, short_name
from .spec import ModelSpec, graph_inputs

MAX_DEFAULT_THREADS = 4  # small patches leave little to split across more (benchmarks/threads.py)


def default_threads() -> int:
    """onnxruntime intra-op threads when none are asked for: the CPUs this process may use, at most 4."""
    return min(available_cpus(), MAX_DEFAULT_THREADS)


@dataclass
class OnnxModel:
    """A single-patch denoiser session and what it says about itself. Callable as a runtime PatchNet."""

    path: Path
    session: ort.InferenceSession
    spec: ModelSpec
    metadata: dict
    sha256: str  # of the file and its external data, if any (onnxfile.model_sha256)
    input_names: tuple[str, ...] = ()  # the graph's inputs, as graph_inputs(spec) names them and load_model checked

    @property
    def provider(self) -> str:
        """The execution provider the session runs on first (short name, e.g. "cpu", "cuda")."""
        return short_name(self.session.get_providers()[0])

    def __call__(self, x: np.ndarray, t: np.ndarray, pos: Optional[np.ndarray], gcc: Optional[np.ndarray]):
        # The graph gathers schedule values at t, and ONNX Gather wraps negative indices: refuse them here.
        T = self.spec.schedule.num_timesteps
        if t.size and (t.min() < 0 or t.max() >= T):
            raise ValueError(f"timesteps must be in [0, {T - 1}], got {t.min()} .. {t.max()}")
        given = {"x": x, "t": t, "pos": pos, "gcc": gcc}
        return self.session.run(["eps"], {name: given[name] for name in self.input_names})[0]


def expected_inputs(spec: ModelSpec) -> dict[str, list]:
    """Input name -> shape after the batch dimension, as onnxruntime lists a graph's inputs."""
    return {name: list(shape) for name, (_, shape) in graph_inputs(spec).items()}


def load_model(model: Union[str, Path, None] = None, threads: Optional[int] = None,
               provider: str = DEFAULT_PROVIDER) -> OnnxModel:
    """Open a patchgen ONNX file, or a shipped model by name (`faces64_2x2`; None: the default one).

    threads: onnxruntime intra-op threads, 1 .. the CPUs this process may use (None: `default_threads()`).
    provider: an execution provider's short name (`session.available_providers()`), "cpu" by default.
    Anything wrong (missing, corrupt, foreign, mismatched, too many threads, provider not available) is a
    PatchgenError."""
    path = resolve_model(model)
    cpus = available_cpus()
    threads = default_threads() if threads is None else threads
    if not 1 <= threads <= cpus:
        raise PatchgenError(f"threads must be between 1 and {cpus} (the CPUs this process may use), got {threads}")
    if not path.is_file():
        raise PatchgenError(f"model {path} is not a file; pass an .onnx file written by patchgen-export")
    try:
        session = open_session(str(path), threads, provider)
    except PatchgenError:
        raise
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
    try:
        sha256 = model_sha256(path)
    except (OSError, ValueError) as e:
        raise PatchgenError(f"{path}: cannot read it or its external data: {e}") from None
    return OnnxModel(path, session, spec, meta, sha256, tuple(want))
