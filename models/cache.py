"""The image cache: a data set decoded once into a uint8 array file that every rank and every resume maps
read-only (`numpy.load(mmap_mode="r")`), so no process holds its own copy of the images.

An entry is two files in the cache folder:
- `<key>.npy`: the images, uint8 [N, S, S, 3], one row per source in order (rows of sources that did not
  decode are left as zeros at the end and not used);
- `<key>.json`, written last, which commits the entry: how many rows are images, how many sources were
  skipped, the shape, and what the key was made from.
The key hashes everything that decides the pixels: the sources' identity (for files: their paths, sizes and
modification times; for a font: its file and glyphs), the image side, the decoder's FORMAT and Pillow's
version. A changed folder gets a new entry; old entries stay until the folder is removed by hand.
A missing, truncated or otherwise unreadable entry is rebuilt, with a note that says so.
The sources' identity alone, hashed (`data_identity`), names the data set in checkpoints.

Decoder processes end with the process that started them, however it ends (`_die_with_parent`).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import PIL

from patchgen.runtime.errors import ArgumentError, Phrase
from patchgen.runtime.files import (CACHE_ENV, atomic_output, cache_root, check_free_space,
                                    remove_stale_temporaries, write_error)

from .decoding import Decoding

# How to put the cache elsewhere, naming Decoding's cache_dir (errors.Phrase): the fix of this module's errors
# and of runtime/files.py's.
ELSEWHERE = Phrase("choose another cache folder ({cache_dir}, or $" + CACHE_ENV + ")", cache_dir=None)
FORMAT = 2  # bump when decoding changes the pixels a source gives (2: JPEGs decoded at a reduced scale)
CHUNK = 64  # sources per task sent to a worker process
MIN_PARALLEL = 2 * CHUNK  # fewer sources are decoded in this process: starting workers would cost more
PR_SET_PDEATHSIG = 1  # prctl(2) option (linux/prctl.h): the signal a process gets when its parent dies
PARENT_POLL_S = 0.5  # how often a decoder process checks that its parent is alive, seconds


def default_cache_dir() -> Path:
    """images/ in patchgen's cache root: $PATCHGEN_CACHE_DIR, else $XDG_CACHE_HOME/patchgen, else ~/.cache/patchgen
    (the sampler's graph cache is graphs/ beside it)."""
    return cache_root() / "images"


# decode_one(source, size) -> uint8 [size, size, 3], or None for a source that cannot be used.
Decoder = Callable[[object, int], Optional[np.ndarray]]


def decode_images(sources: Sequence, size: int, decode_one: Decoder, decoding: Decoding,
                  identity: dict) -> tuple[np.ndarray, int]:
    """(uint8 [N, size, size, 3] of the sources that decode, in order; how many did not).

    With a cache folder, the images come from its entry for (identity, size), built first when there is none:
    a read-only memory map. `identity` is JSON-able and must change whenever the sources' content may
    have (e.g. file sizes and modification times). `decode_one` must be a module-level function (worker
    processes receive it by name) and the sources picklable (paths, bytes)."""
    if decoding.cache_dir is None:
        rows, skipped = [], 0
        for image in _decoded(sources, size, decode_one, decoding):
            skipped += image is None
            if image is not None:
                rows.append(image)
        return (np.stack(rows) if rows else np.zeros((0, size, size, 3), np.uint8)), skipped
    folder = Path(decoding.cache_dir)
    key = cache_key(identity, size)
    cached = read_entry(folder, key, decoding)
    if cached is not None:
        decoding.say(f"images from the cache {folder / key}.npy")
        return cached
    if build_entry(folder, key, sources, size, decode_one, decoding, identity) == 0:
        for suffix in (".json", ".npy"):  # nothing to keep: the caller reports the empty set
            (folder / f"{key}{suffix}").unlink(missing_ok=True)
        return np.zeros((0, size, size, 3), np.uint8), len(sources)
    cached = read_entry(folder, key, decoding)
    if cached is None:
        raise ArgumentError(f"the image cache {folder / key}.npy cannot be read back right after writing it; ",
                            "check the disk, or " + ELSEWHERE.text, **ELSEWHERE.arguments)
    return cached


def cache_key(identity: dict, size: int) -> str:
    """The entry's name: 32 hex digits over the sources' identity and everything else that decides the pixels."""
    return _digest({"format": FORMAT, "pillow": PIL.__version__, "size": size, **identity}, 32)


def data_identity(identity: dict) -> str:
    """16 hex digits naming a data set by a record of its sources (JSON-able, such as the dict `decode_images`
    takes): equal for an equal record, whatever the image side, FORMAT or Pillow's version, so a resume after
    a Pillow upgrade still recognises its data."""
    return _digest(identity, 16)


def _digest(record: dict, digits: int) -> str:
    """The first `digits` hex digits of SHA-256 over `record` as JSON with sorted keys."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:digits]


def read_entry(folder: Path, key: str, decoding: Decoding) -> Optional[tuple[np.ndarray, int]]:
    """The entry's (images as a read-only memory map, skipped), or None when it is missing or unreadable."""
    meta_path, array_path = folder / f"{key}.json", folder / f"{key}.npy"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(array_path, mmap_mode="r")
        if (meta["format"] != FORMAT or images.dtype != np.uint8 or list(images.shape) != meta["shape"]
                or not 0 <= meta["count"] <= images.shape[0]):
            raise ValueError("its array does not match its record")
        return images[: meta["count"]], int(meta["skipped"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # json's errors are ValueErrors
        decoding.say(f"the image cache entry {folder / key} (.npy, .json) is unreadable ({e}); decoding the "
                     "images again")
        return None


def build_entry(folder: Path, key: str, sources: Sequence, size: int, decode_one: Decoder, decoding: Decoding,
                identity: dict) -> int:
    """Decode the sources into `<key>.npy`, then commit it with `<key>.json`; both written atomically.
    Returns how many images it holds."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArgumentError(f"cannot create the image cache folder {folder}: {e.strerror}; ",
                            ELSEWHERE.text + ", a writable one", **ELSEWHERE.arguments) from None
    for pattern in (f"{key}.npy", f"{key}.json"):
        remove_stale_temporaries(folder, pattern)
    shape = (len(sources), size, size, 3)
    need = int(np.prod(shape))
    check_free_space(folder, need, "the image cache", Phrase(ELSEWHERE.text + ", on a larger disk",
                                                             **ELSEWHERE.arguments))
    decoding.say(f"decoding {len(sources)} images into the cache {folder / key}.npy")
    count = 0
    try:
        with atomic_output(folder / f"{key}.npy", elsewhere=ELSEWHERE) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            start = f.tell()
            for image in _decoded(sources, size, decode_one, decoding):
                if image is not None:
                    f.write(np.ascontiguousarray(image, np.uint8).tobytes())
                    count += 1
            f.truncate(start + need)  # the unused rows: zeros, a hole in the file on most file systems
        meta = {"format": FORMAT, "shape": list(shape), "count": count, "skipped": len(sources) - count,
                "identity": {k: v for k, v in identity.items() if isinstance(v, (str, int, float))}}
        with atomic_output(folder / f"{key}.json", elsewhere=ELSEWHERE) as f:
            f.write((json.dumps(meta, indent=1) + "\n").encode())
    except OSError as e:  # a folder gone, a write atomic_output did not word: nothing half-written stays
        raise write_error(e, f"the image cache in {folder}", ELSEWHERE) from None
    return count


def _decoded(sources: Sequence, size: int, decode_one: Decoder, decoding: Decoding):
    """decode_one of every source, in order; in worker processes when there are enough sources."""
    total = len(sources)
    decode = functools.partial(decode_one, size=size)
    if decoding.workers > 1 and total >= MIN_PARALLEL:
        # spawn: the workers import only numpy and Pillow, never inherit a parent's threads (torch's)
        context = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(decoding.workers, mp_context=context,
                                                      initializer=_start_decoder, initargs=(os.getpid(),))
        try:
            yield from _counted(pool.map(decode, sources, chunksize=CHUNK), total, decoding)
        except concurrent.futures.process.BrokenProcessPool:
            raise ArgumentError(f"a decoder process died (out of memory?) while decoding {total} images; ",
                                "try again with fewer ({workers})", workers=None) from None
        finally:  # on Ctrl-C or an error, the chunks not yet started are dropped, not decoded
            pool.shutdown(cancel_futures=True)
    else:
        yield from _counted(map(decode, sources), total, decoding)


def _start_decoder(parent: int) -> None:
    """A decoder process's initializer. Ctrl-C is the parent's to handle (it stops the pool), not a traceback
    per worker; and the process ends with its parent (pid `parent`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """End this process when its parent (pid `parent`) dies, even by SIGKILL, which runs no cleanup. Else it
    is orphaned for good: it blocks reading the task queue, whose write end it holds itself.

    On Linux the kernel sends SIGKILL at once (PR_SET_PDEATHSIG; strictly, when the thread that started this
    process exits: `_decoded` starts, uses and shuts down its pool in one call). A daemon thread that notices
    the reparenting covers other systems and a refused prctl."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no libc or no prctl: the thread below still watches
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect: no signal will come
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="patchgen-watch-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    """Exit this process, with no cleanup to run, once it is no longer `parent`'s child (reparented: the parent
    is gone); checked every PARENT_POLL_S seconds."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _counted(images, total: int, decoding: Decoding):
    for done, image in enumerate(images, 1):
        if decoding.progress is not None and (done % CHUNK == 0 or done == total):
            decoding.progress(done, total)
        yield image
