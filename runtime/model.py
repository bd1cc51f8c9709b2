"""Loading a patchgen ONNX file: validate it, read its metadata, open the session, call it on patches."""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnxruntime as ort

from .errors import ArgumentError, PatchgenError
from .graph_cache import Opened, open_model_session, weights_bytes
from .limits import available_cpus, available_memory
from .memory import checked_budget, current_rss, format_size, wants_minimum
from .metadata import spec_from_metadata
from .onnxfile import metadata_props
from .pretrained import resolve_model
from .session import DEFAULT_PROVIDER, open_session, short_name
from .spec import ModelSpec, graph_inputs

MAX_DEFAULT_THREADS = 4  # small patches leave little to split across more (benchmarks/threads.py)


def default_threads() -> int:
    """onnxruntime intra-op threads when none are asked for: the CPUs this process may use, at most 4."""
    return min(available_cpus(), MAX_DEFAULT_THREADS)


def thread_candidates(cpus: int) -> list[int]:
    """Intra-op thread counts the planner may measure: 1, 2, 4, ... below `cpus`, and `cpus`."""
    return sorted({*(2**k for k in range(cpus.bit_length()) if 2**k < cpus), cpus})


@dataclass
class OnnxModel:
    """A single-patch denoiser session and what it says about itself. Callable as a runtime PatchNet."""

    path: Path
    session: ort.InferenceSession
    spec: ModelSpec
    metadata: dict
    sha256: str  # of the file and its external data, if any (onnxfile.model_sha256)
    input_names: tuple[str, ...] = ()  # the graph's inputs, as graph_inputs(spec) names them and load_model checked
    weights_bytes: int = 0  # the model file and its external data (graph_cache.weights_bytes)
    resident_before: int = 0  # bytes of RSS before the session opened: the floor its weights come on top of
    graph: str = "direct"  # how the session was opened: "cached", "built" or "direct" (graph_cache.Opened)
    notes: tuple[str, ...] = ()  # what the run should be told about opening it (e.g. no graph cache)
    threads: int = 1  # onnxruntime intra-op threads of the session
    threads_chosen: bool = False  # the caller chose `threads`; else the planner may try others (make_plan)
    allocation: str = "lean"  # the session's allocation mode (session.ALLOCATIONS); `reopen` changes it
    opened: Optional[Path] = None  # the file the session was opened from, and at which optimisation level:
    optimization: str = "none"  # a reopen opens the same graph the same way

    def reopen(self, allocation: Optional[str] = None, threads: Optional[int] = None, fresh: bool = False) -> None:
        """Replace the session by one of the same graph with another allocation mode (session.ALLOCATIONS)
        and/or intra-op thread count (None: as now); fresh: even when both stay (an arena's blocks go).

        The old session is released first, so that its mapped weights and blocks are gone before the new one
        maps them again: the two are never resident together."""
        allocation = self.allocation if allocation is None else allocation
        threads = self.threads if threads is None else threads
        if (allocation, threads) == (self.allocation, self.threads) and not fresh:
            return
        provider = self.provider
        self.session = None
        gc.collect()
        try:
            self.session = open_session(self.opened or self.path, threads, provider,
                                        optimization=self.optimization, allocation=allocation)
        except PatchgenError:
            raise
        except Exception as e:  # the cached graph replaced by another process in between: rare
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PatchgenError(f"cannot reopen {self.opened or self.path} ({first[:160]}); run again") from None
        self.allocation, self.threads = allocation, threads

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
        eps = self.session.run(["eps"], {name: given[name] for name in self.input_names})[0]
        if not np.isfinite(eps).all():  # broken weights (an export with --skip-check): say so, not black PNGs
            raise ArgumentError(f"{self.path.name} predicts NaN or infinite noise at timestep {int(t.max())}: its "
                                "weights are broken; ", "re-export it from a good checkpoint (without {check})",
                                check=False)
        return eps


def expected_inputs(spec: ModelSpec) -> dict[str, list]:
    """Input name -> shape after the batch dimension, as onnxruntime lists a graph's inputs."""
    return {name: list(shape) for name, (_, shape) in graph_inputs(spec).items()}


def load_model(model: Union[str, Path, None] = None, threads: Optional[int] = None,
               provider: str = DEFAULT_PROVIDER, memory_budget: Union[None, int, str] = None) -> OnnxModel:
    """Open a patchgen ONNX file, or a shipped model by name (`faces64_2x2`; None: the default one).

    The CPU provider opens the graph optimised once for this device from the graph cache, its weights
    memory-mapped (graph_cache.py), building the cache entry on first use.
    threads: onnxruntime intra-op threads, 1 .. the CPUs this process may use (None: `default_threads()`, and
    the planner may measure others: generate.make_plan).
    provider: an execution provider's short name (`session.available_providers()`), "cpu" by default.
    memory_budget: the run's peak RSS budget (bytes, or a size such as "500M"; "min" counts as none here),
    when it has one: see `_build_limit`. The metadata (untrusted: spec_from_metadata's bounds) and the
    weights' size are read from the file before the session opens.
    Anything wrong (missing, corrupt, foreign, mismatched, too many threads, provider not available) is a
    PatchgenError."""
    path = resolve_model(model)
    cpus = available_cpus()
    chosen = threads is not None
    threads = default_threads() if threads is None else threads
    if not 1 <= threads <= cpus:
        raise PatchgenError(f"threads must be between 1 and {cpus} (the CPUs this process may use), got {threads}")
    if not path.is_file():
        raise PatchgenError(f"model {path} is not a file; pass an .onnx file written by patchgen-export")
    try:
        early = metadata_props(path)
    except (OSError, ValueError) as e:
        raise PatchgenError(f"{path} is not a readable ONNX model (corrupt or truncated?): {e}") from None
    spec_from_metadata(early, source=str(path))
    resident, weights = current_rss(), weights_bytes(path)
    opened = _open(path, threads, provider, _build_limit(path, weights, resident, memory_budget))
    meta = dict(opened.session.get_modelmeta().custom_metadata_map)
    spec = spec_from_metadata(meta, source=str(path))
    inputs = _checked_graph(path, opened.session, spec)
    return OnnxModel(path, opened.session, spec, meta, opened.sha256, inputs, weights, resident, opened.graph,
                     opened.notes, threads, chosen, "lean", opened.opened, opened.optimization)


def _build_limit(path: Path, weights: int, resident: int, memory_budget: Union[None, int, str]) -> Optional[int]:
    """The peak RSS (bytes) a graph cache build may reach, checked before anything is opened against the
    model's `weights` (bytes) on top of the `resident` bytes this process holds. With a budget: the budget,
    and weights it cannot hold are refused (BudgetTooSmall; a build that would not fit it is skipped, with
    a note). Without one: the memory this process can have, and weights that do not fit it are refused."""
    if memory_budget is not None and not wants_minimum(memory_budget):
        return checked_budget(memory_budget, weights, resident)[0]
    limit, limited_by = available_memory(resident)
    if limit is not None and resident + weights > limit:
        raise PatchgenError(f"{path.name} needs at least {format_size(resident + weights)} ({format_size(weights)} "
                            f"of weights on top of the {format_size(resident)} this process holds), but this "
                            f"process can have only {format_size(limit)} ({limited_by}): free memory or "
                            "raise the memory limit")
    return limit


def _open(path: Path, threads: int, provider: str, build_limit: Optional[int]) -> Opened:
    """`graph_cache.open_model_session`, with onnxruntime's own errors for bad protobufs and graphs as one
    PatchgenError line."""
    try:
        return open_model_session(path, threads, provider, build_limit)
    except PatchgenError:
        raise
    except Exception as e:  # onnxruntime raises its own types for bad protobufs and graphs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PatchgenError(f"{path} is not a readable ONNX model (corrupt or truncated?): {first[:160]}") from None


def _checked_graph(path: Path, session: ort.InferenceSession, spec: ModelSpec) -> tuple[str, ...]:
    """The graph's input names, once its inputs and output are those its metadata promises (`graph_inputs`)."""
    have = {i.name: list(i.shape[1:]) for i in session.get_inputs()}
    want = expected_inputs(spec)
    if have != want or [o.name for o in session.get_outputs()] != ["eps"]:
        raise PatchgenError(f"{path}: graph inputs {have} do not match its metadata (expected {want} and output "
                            f"eps); re-export it with patchgen-export")
    return tuple(want)
