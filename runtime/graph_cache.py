"""Graphs optimised once per device, cached, and opened with their weights memory-mapped.

Why. onnxruntime optimises a graph every time it opens it. On x86 its layout pass (NCHWc, part of the
default ORT_ENABLE_ALL) holds a reordered copy of every Conv weight beside the original while it runs, so
opening a model peaks at about twice its weights, and takes seconds for a large one. Here the optimisation
runs once: the optimised graph is saved with its weights as external data at page-aligned offsets, and
every later open reads that graph with optimisation off. onnxruntime then memory-maps the weights: they are
clean file pages, held once, that fault in on the first call (benchmarks/model_scale.py measures it; its
results are in benchmarks/results/model_scale.md).

The cache. One folder per (model file, device) under `graph_cache_dir()`:

    graphs/<key>/model.onnx        the graph optimised for this CPU by this onnxruntime
    graphs/<key>/model.onnx.data   its weights, page-aligned
    graphs/<key>/entry.json        what it was built from: the model's file identity and SHA-256

key = SHA-256 of (FORMAT, the model's real path, `device()`): the onnxruntime version, the machine and
its CPU's instruction-set flags, and the provider. Another CPU, onnxruntime or model file gets a folder of
its own; a changed model file (its size, modification or change time, inode) rebuilds its folder.

Trust. An entry is used only when entry.json parses, names the model file as it is now (`identity`), and
the two graph files are the very files that were written (inode, size, mtime and ctime as recorded: any
write to them, even one that keeps their size, changes the ctime). Anything else, or a graph onnxruntime
will not open, is rebuilt, with a note. A build writes into a temporary folder beside the entry and
renames it into place as the last step, so a killed build leaves no entry, only its temporary folder,
which the next build removes once its process is gone.

Two processes. A build holds an exclusive `flock` on the graphs folder; a process that finds no valid
entry takes the lock, looks again, and builds only if it still has to. A process that has a graph open
keeps its mapping when another one replaces the entry (the old files are unlinked, not overwritten).

When there is no cache. A cache folder that cannot be created or written, a full disk, or a build that
would not fit the memory given (`build_limit`) never fails the run: the model is opened directly with the
"extended" optimisation level (no layout pass, so no doubling; a few per cent slower per call, more for
wide convolutions), and the run says so once in a note. Providers other than the CPU's are opened
directly as they always were: their weights live in device memory.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import onnxruntime as ort

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no flock, so no shared cache; models open directly
    fcntl = None

from .errors import PatchgenError
from .files import CACHE_ENV, cache_root, remove_stale_temporaries, temporary_prefix
from .memory import current_rss, format_size
from .onnxfile import external_data_files, model_sha256, referenced_bytes
from .session import open_session

FORMAT = 2  # bump when what an entry holds, or how it is built, changes (2: model_sha256 hashes used ranges)
GRAPH, ENTRY = "model.onnx", "entry.json"
# The peak of a build, as a multiple of the weights over the resident size before it, charged with a margin
# (benchmarks/results/model_scale.md, "cold" rows; up to 1.15x and 2.15x measured): with external data the
# layout pass's reordered copy replaces each mapped original as it goes; weights inside the .onnx are parsed
# into memory and held beside the copy until the session is built.
BUILD_FACTOR = {"external": 1.2, "inline": 2.3}


def graph_cache_dir() -> Path:
    return cache_root() / "graphs"


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> str:
    """The CPU's instruction-set flags (x86 "flags", ARM "Features"), sorted; "" when not readable."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("flags", "Features"):
                return " ".join(sorted(value.split()))
    return ""


def device(provider: str = "cpu") -> dict:
    """What an optimised graph depends on besides the model: onnxruntime, the machine, its CPU, the provider."""
    return {"onnxruntime": ort.__version__, "machine": platform.machine(), "provider": provider,
            "cpu_flags": hashlib.sha256(_cpu_flags().encode()).hexdigest()[:16]}


def identity(path: Path) -> list:
    """The model file and the external-data files it names, each as (name, inode, size, mtime_ns, ctime_ns):
    what changes when any of them is replaced or written. Raises OSError or ValueError (not a protobuf)."""
    files = [path.name, *external_data_files(path)]
    out = []
    for name in files:
        st = (path.parent / name).stat()
        out.append([name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return out


def weights_bytes(path: Path) -> int:
    """Bytes of the model file and the external data its tensors use (`onnxfile.referenced_bytes`): its
    weights, give or take the small graph."""
    with contextlib.suppress(OSError, ValueError):
        return referenced_bytes(path)
    return path.stat().st_size


def _stat(path: Path) -> list:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


@dataclass(frozen=True)
class Opened:
    """A session, how it was opened, and what the run should be told."""

    session: ort.InferenceSession
    sha256: str  # of the model file and its external data (onnxfile.model_sha256)
    graph: str  # "cached" (optimised graph, weights mapped), "built" (the same, built by this run), "direct"
    notes: tuple[str, ...] = ()
    opened: Optional[Path] = None  # the file the session was opened from (the cached graph, or the model)
    optimization: str = "none"  # the level it was opened with (session.OPTIMIZATION): a reopen uses both


class _NoCache(Exception):
    """The cache cannot serve this run; the message says why, for a note."""


def _key(path: Path, provider: str) -> str:
    what = {"format": FORMAT, "model": str(path.resolve()), "device": device(provider)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def _valid(folder: Path, source: list) -> Optional[dict]:
    """The entry's record when the entry can be trusted for a model whose identity is `source`; else None."""
    try:
        record = json.loads((folder / ENTRY).read_text())
        files = record["files"]
        ok = (record.get("format") == FORMAT and record.get("source") == source and isinstance(files, dict)
              and set(files) == {GRAPH, GRAPH + ".data"}
              and all(_stat(folder / name) == stats for name, stats in files.items()))
        return record if ok and isinstance(record.get("sha256"), str) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive flock on `folder` itself (nothing is created for it), released on exit or death."""
    if fcntl is None:
        raise OSError("no file locking (flock) on this system")
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build(path: Path, source: list, folder: Path, provider: str, threads: int) -> None:
    """Optimise `path` for this device into `folder` (replacing it), via a temporary folder renamed last."""
    parent = folder.parent
    remove_stale_temporaries(parent, "*")  # killed builds' temporary folders, of any model
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(folder.name), suffix=".tmp", dir=parent))
    try:
        sha256 = model_sha256(path)
        session = open_session(path, threads, provider, optimization="all", save_optimized=tmp / GRAPH)
        del session
        files = {}
        for name in (GRAPH, GRAPH + ".data"):
            if not (tmp / name).is_file():  # a model with no initializer of 1 KiB or more: give it an empty file
                (tmp / name).touch()
            _fsync(tmp / name)
            files[name] = _stat(tmp / name)
        record = {"format": FORMAT, "model": str(path.resolve()), "source": source, "sha256": sha256,
                  "device": device(provider), "files": files}
        (tmp / ENTRY).write_text(json.dumps(record, indent=1))
        _fsync(tmp / ENTRY)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _open_cached(path: Path, threads: int, provider: str, build_limit: Optional[int]) -> Opened:
    """Open through the cache, building the entry first when there is no valid one. Raises _NoCache."""
    try:
        source = identity(path)
    except (OSError, ValueError) as e:  # load_model words an unreadable model; here it just skips the cache
        raise _NoCache(f"cannot read {path}: {_why(e)}") from None
    try:
        cache = graph_cache_dir()
    except (OSError, RuntimeError) as e:  # no home folder to put it in
        raise _NoCache(f"no cache folder: {_why(e)}; set ${CACHE_ENV}") from None
    folder = cache / _key(path, provider)
    failed = _valid(folder, source)
    if failed is not None:
        try:
            session = open_session(folder / GRAPH, threads, provider, optimization="none")
            return Opened(session, failed["sha256"], "cached", (), folder / GRAPH)
        except PatchgenError:
            raise
        except Exception:  # replaced under us, or damaged in a way the stats missed: rebuild below
            pass
    record, built, notes = _built_entry(path, source, folder, failed, threads, provider, build_limit)
    try:
        session = open_session(folder / GRAPH, threads, provider, optimization="none")
    except PatchgenError:
        raise
    except Exception as e:
        raise _NoCache(f"onnxruntime cannot open the graph it optimised in {folder}: {_why(e)}") from None
    return Opened(session, record["sha256"], built, notes, folder / GRAPH)


def _built_entry(path: Path, source: list, folder: Path, failed: Optional[dict], threads: int, provider: str,
                 build_limit: Optional[int]) -> tuple[dict, str, tuple[str, ...]]:
    """(the valid record of `folder`, "built" or "cached", notes) once the entry is there: built under the
    cache's lock, unless another process built it meanwhile (a record other than `failed`, the one that
    would not open). Raises _NoCache when a build would not fit `build_limit` or the disk, or fails."""
    cache = folder.parent
    weights = weights_bytes(path)  # what its tensors use of the files
    if build_limit is not None:
        need = current_rss() + BUILD_FACTOR["external" if len(source) > 1 else "inline"] * weights
        if need > build_limit:
            raise _NoCache(f"building it would peak near {format_size(need)}, above the {format_size(build_limit)} "
                           f"this run may use")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        free, need = shutil.disk_usage(cache).free, 1.1 * weights + 16 * 2**20  # the graph and its weights
        if free < need:
            raise _NoCache(f"{format_size(free)} free in {cache}, and the optimised graph needs about {format_size(need)}")
        with _locked(cache):
            record = _valid(folder, source)  # another process may have built it while this one waited
            if record is not None and record != failed:
                return record, "cached", ()
            notes = (f"rebuilt the cached graph in {folder}: it did not match the model file or was damaged",) \
                if folder.exists() else ()
            _build(path, source, folder, provider, threads)
            record = _valid(folder, source)
    except (PatchgenError, _NoCache):
        raise
    except OSError as e:
        raise _NoCache(f"cannot write the graph cache {cache}: {_why(e)}") from None
    except Exception as e:  # onnxruntime's own error types, e.g. when writing the optimised graph fails
        raise _NoCache(f"onnxruntime could not write the optimised graph in {cache} (a full disk?): "
                       f"{_why(e).split(' : ')[-1]}") from None
    if record is None:
        raise _NoCache(f"the graph built in {folder} does not verify")
    return record, "built", notes


def open_model_session(path: Path, threads: int, provider: str, build_limit: Optional[int] = None) -> Opened:
    """Open the patchgen model at `path`: through the graph cache on the CPU provider, else directly.

    build_limit: the peak RSS (bytes) a build of the cached graph may reach; a build predicted to go above it
    is skipped for this run (None: no limit). Errors of the model itself (unreadable, corrupt, provider not
    available) propagate as onnxruntime or PatchgenError exceptions; problems of the cache never do."""
    notes: tuple[str, ...] = ()
    if provider == "cpu":
        try:
            return _open_cached(path, threads, provider, build_limit)
        except _NoCache as e:
            notes = (f"the optimised graph for this CPU is not cached ({e}); running with onnxruntime's "
                     f"\"extended\" optimisation instead, a little slower per call",)
    optimization = "extended" if provider == "cpu" else "all"
    session = open_session(path, threads, provider, optimization=optimization)
    try:
        sha256 = model_sha256(path)
    except (OSError, ValueError) as e:
        raise PatchgenError(f"{path}: cannot read it or its external data: {e}") from None
    return Opened(session, sha256, "direct", notes, path, optimization)
