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
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import multiprocessing
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import PIL

from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.files import CACHE_ENV, atomic_output, cache_root, remove_stale_temporaries

ELSEWHERE = f"choose another cache folder (patchgen-train --cache-dir, or ${CACHE_ENV})"
FORMAT = 1  # bump when decoding changes the pixels a source gives
CHUNK = 64  # sources per task sent to a worker process
MIN_PARALLEL = 2 * CHUNK  # fewer sources are decoded in this process: starting workers would cost more


def default_cache_dir() -> Path:
    """images/ in patchgen's cache root: $PATCHGEN_CACHE_DIR, else $XDG_CACHE_HOME/patchgen, else ~/.cache/patchgen
    (the sampler's graph cache is graphs/ beside it)."""
    return cache_root() / "images"


@dataclass(frozen=True)
class Decoding:
    """How a data set's sources become images.

    cache_dir: the image cache's folder (created when missing), or None to decode into memory every time.
    workers: decoder processes (1: decode in this process). They are spawned, so a script that asks for
    more than one must guard its top level with `if __name__ == "__main__":`, as multiprocessing requires.
    progress: called as progress(done, total) while decoding; note: called with one-line messages (cache
    built, reused, rebuilt)."""
    cache_dir: Optional[Path] = None
    workers: int = 1
    progress: Optional[Callable[[int, int], None]] = None
    note: Optional[Callable[[str], None]] = None

    def say(self, message: str) -> None:
        if self.note is not None:
            self.note(message)


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
        raise PatchgenError(f"the image cache {folder / key}.npy cannot be read back right after writing it; "
                            f"check the disk, or {ELSEWHERE}")
    return cached


def cache_key(identity: dict, size: int) -> str:
    text = json.dumps({"format": FORMAT, "pillow": PIL.__version__, "size": size, **identity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


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
        raise PatchgenError(f"cannot create the image cache folder {folder}: {e.strerror}; "
                            f"{ELSEWHERE}, a writable one") from None
    for pattern in (f"{key}.npy", f"{key}.json"):
        remove_stale_temporaries(folder, pattern)
    shape = (len(sources), size, size, 3)
    need, free = int(np.prod(shape)), shutil.disk_usage(folder).free
    if need > free:
        raise PatchgenError(f"the image cache needs {need / 2**30:.2f} GiB but {folder} has {free / 2**30:.2f} GiB "
                            f"free; {ELSEWHERE}, on a larger disk")
    decoding.say(f"decoding {len(sources)} images into the cache {folder / key}.npy")
    count = 0
    try:
        with atomic_output(folder / f"{key}.npy") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            start = f.tell()
            for image in _decoded(sources, size, decode_one, decoding):
                if image is not None:
                    f.write(np.ascontiguousarray(image, np.uint8).tobytes())
                    count += 1
            f.truncate(start + need)  # the unused rows: zeros, a hole in the file on most file systems
        meta = {"format": FORMAT, "shape": list(shape), "count": count, "skipped": len(sources) - count,
                "identity": {k: v for k, v in identity.items() if isinstance(v, (str, int, float))}}
        with atomic_output(folder / f"{key}.json") as f:
            f.write((json.dumps(meta, indent=1) + "\n").encode())
    except OSError as e:  # a full disk, a folder gone: nothing half-written stays (atomic_output)
        raise PatchgenError(f"cannot write the image cache in {folder}: {e.strerror or e}; free some space there "
                            f"or {ELSEWHERE}") from None
    return count


def _decoded(sources: Sequence, size: int, decode_one: Decoder, decoding: Decoding):
    """decode_one of every source, in order; in worker processes when there are enough sources."""
    total = len(sources)
    decode = functools.partial(decode_one, size=size)
    if decoding.workers > 1 and total >= MIN_PARALLEL:
        # spawn: the workers import only numpy and Pillow, never inherit a parent's threads (torch's)
        context = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(decoding.workers, mp_context=context,
                                                      initializer=_ignore_interrupts)
        try:
            yield from _counted(pool.map(decode, sources, chunksize=CHUNK), total, decoding)
        except concurrent.futures.process.BrokenProcessPool:
            raise PatchgenError(f"a decoder process died (out of memory?) while decoding {total} images; "
                                "try again with fewer (patchgen-train --decode-workers)") from None
        finally:  # on Ctrl-C or an error, the chunks not yet started are dropped, not decoded
            pool.shutdown(cancel_futures=True)
    else:
        yield from _counted(map(decode, sources), total, decoding)


def _ignore_interrupts() -> None:
    """In a decoder process: Ctrl-C is the parent's to handle (it stops the pool), not a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _counted(images, total: int, decoding: Decoding):
    for done, image in enumerate(images, 1):
        if decoding.progress is not None and (done % CHUNK == 0 or done == total):
            decoding.progress(done, total)
        yield image
