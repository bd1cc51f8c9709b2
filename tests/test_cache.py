"""The image cache: built once and mapped read-only, rebuilt when the folder changes or the entry is damaged,
decoded in worker processes with the same result as in this one, which end when this one is killed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import patchgen.models.data as data
from patchgen.models.cache import CACHE_ENV, MIN_PARALLEL, default_cache_dir
from patchgen.models.data import ImageSubset, load_folder
from patchgen.models.decoding import Decoding
from patchgen.runtime.errors import PatchgenError

from conftest import blob_images


def write_folder(folder, n, size=8, broken=()):
    """n PNGs of blobs (and a broken file at each index in `broken`), named so they sort in order."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(blob_images(n, size, seed=n)):
        if i in broken:
            (folder / f"{i:05d}.png").write_bytes(b"not a png")
        else:
            Image.fromarray(img).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture
def counted(monkeypatch):
    """How many images decode_one (decoding.py, as data.py calls it) decodes in this process."""
    calls = []
    real = data.decode_one

    def decode_one(source, size):
        calls.append(source)
        return real(source, size)
    monkeypatch.setattr(data, "decode_one", decode_one)
    return calls


@pytest.mark.quick
def test_built_once_then_mapped(tmp_path, counted):
    folder = write_folder(tmp_path / "images", 6, broken=(2,))
    notes = []
    decoding = Decoding(tmp_path / "cache", note=notes.append)
    first = load_folder(folder, 8, decoding)
    assert len(counted) == 6 and first.source.skipped == 1 and len(first.images) == 5
    second = load_folder(folder, 8, decoding)
    assert len(counted) == 6  # the second load decodes nothing
    assert isinstance(second.images.base, np.memmap) or isinstance(second.images, np.memmap)
    assert not second.images.flags.writeable
    assert second.source == first.source
    np.testing.assert_array_equal(second.images, load_folder(folder, 8).images)  # as decoded into memory
    assert notes[0].startswith("decoding 6 images into the cache") and notes[1].startswith("images from the cache")
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npy"]  # nothing else


@pytest.mark.parametrize("change", ["add", "touch", "size"])
def test_changed_folder_rebuilds(tmp_path, counted, change):
    folder = write_folder(tmp_path / "images", 4)
    decoding = Decoding(tmp_path / "cache")
    load_folder(folder, 8, decoding)
    if change == "add":
        Image.fromarray(blob_images(1, 8, seed=9)[0]).save(folder / "extra.png")
    elif change == "touch":  # same bytes, new modification time: the content may have changed
        os.utime(folder / "00001.png", ns=(1, 1))
    counted.clear()
    images = load_folder(folder, 8 if change != "size" else 4, decoding).images
    assert len(counted) == len(images) == (5 if change == "add" else 4)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # a new entry beside the old one


@pytest.mark.parametrize("damage", ["truncate", "garbage", "record", "shape", "no-array"])
def test_damaged_entry_is_rebuilt(tmp_path, counted, damage):
    folder = write_folder(tmp_path / "images", 4)
    notes = []
    decoding = Decoding(tmp_path / "cache", note=notes.append)
    expected = np.array(load_folder(folder, 8, decoding).images)
    array, = (tmp_path / "cache").glob("*.npy")
    record = array.with_suffix(".json")
    if damage == "truncate":
        array.write_bytes(array.read_bytes()[:-100])
    elif damage == "garbage":
        array.write_bytes(b"\x00" * 300)
    elif damage == "record":
        record.write_text("{not json")
    elif damage == "shape":
        record.write_text(json.dumps({**json.loads(record.read_text()), "shape": [9, 8, 8, 3]}))
    else:
        array.unlink()
    counted.clear()
    again = load_folder(folder, 8, decoding)
    assert len(counted) == 4
    np.testing.assert_array_equal(again.images, expected)
    assert "is unreadable" in notes[1] and "decoding the images again" in notes[1]
    assert load_folder(folder, 8, decoding).images.shape == expected.shape and len(counted) == 4  # fixed


def test_workers_decode_the_same_images(tmp_path):
    """Worker processes give the same images, in the same order, with the same broken files skipped."""
    folder = write_folder(tmp_path / "images", MIN_PARALLEL + 3, broken=(0, 70, MIN_PARALLEL + 2))
    progress = []
    parallel = load_folder(folder, 8, Decoding(tmp_path / "cache", workers=2,
                                               progress=lambda done, total: progress.append((done, total))))
    serial = load_folder(folder, 8)
    np.testing.assert_array_equal(parallel.images, serial.images)
    assert parallel.source.skipped == serial.source.skipped == 3
    assert progress[-1] == (MIN_PARALLEL + 3, MIN_PARALLEL + 3) and len(progress) > 1


def test_killed_build_leaves_nothing_behind(tmp_path, counted):
    """A build killed mid-write leaves a temporary named after a dead process; the next build removes it."""
    folder = write_folder(tmp_path / "images", 3)
    cache = tmp_path / "cache"
    load_folder(folder, 8, Decoding(cache))
    array, = cache.glob("*.npy")
    for path in (array, array.with_suffix(".json")):
        path.unlink()
        (cache / f".{path.name}.p999999999.abc.tmp").write_bytes(b"half")
    load_folder(folder, 8, Decoding(cache))
    assert sorted(p.name for p in cache.iterdir()) == sorted([array.name, array.with_suffix(".json").name])


def test_unusable_cache_folder_is_one_clear_error(tmp_path):
    folder = write_folder(tmp_path / "images", 2)
    (tmp_path / "file").write_text("")
    with pytest.raises(PatchgenError, match=f"cannot create the image cache folder .*cache_dir, or \\${CACHE_ENV}"):
        load_folder(folder, 8, Decoding(tmp_path / "file" / "cache"))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" / "images"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "patchgen" / "images"


def test_built_in_sets_go_through_the_cache(tmp_path):
    decoding = Decoding(tmp_path / "cache")
    faces = data.load_data("emoji-faces", 8, decoding=decoding)
    assert isinstance(faces.images.base, np.memmap) and len(list((tmp_path / "cache").glob("*.npy"))) == 1
    np.testing.assert_array_equal(faces.images, data.load_data("emoji-faces", 8).images)


@pytest.mark.quick
def test_image_subset_gathers_rows():
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    subset = ImageSubset(images, np.array([4, 1, 3]))
    assert len(subset) == 3
    np.testing.assert_array_equal(subset[np.array([2, 0, 0])], images[[3, 4, 4]])


def test_no_entry_for_a_set_without_images(tmp_path):
    """A folder whose every file is broken leaves no cache entry behind: the caller reports the empty set."""
    folder = write_folder(tmp_path / "images", 2, broken=(0, 1))
    with pytest.raises(PatchgenError, match="no usable images"):
        load_folder(folder, 8, Decoding(tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []


LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes in /proc")
# A process that decodes a folder into the cache in two worker processes, as patchgen-train does.
DECODE_FOLDER = """
import sys
from patchgen.models.data import load_folder
from patchgen.models.decoding import Decoding
load_folder(sys.argv[1], 8, Decoding(cache_dir=sys.argv[2], workers=2))
"""


def slow_folder(folder, n):
    """n names for one 1024 x 1024 noise PNG (hard links: no disk space), each tens of milliseconds to decode."""
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), np.uint8)
    Image.fromarray(noise).save(folder / "00000.png", compress_level=0)
    for i in range(1, n):
        os.link(folder / "00000.png", folder / f"{i:05d}.png")
    return folder


def stat(pid) -> list[str]:
    """/proc/<pid>/stat's fields after the command name ([state, ppid, ...]), or [] for no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def alive(pid) -> bool:
    return stat(pid)[:1] not in ([], ["Z"])  # a zombie has ended; only its exit status waits to be collected


def decoders(parent) -> list[int]:
    """`parent`'s children that have loaded Pillow's decoder (its worker processes, not the resource tracker)."""
    pids = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]
    children = [pid for pid in pids if stat(pid)[1:2] == [str(parent)]]
    return [pid for pid in children if "_imaging" in _read(f"/proc/{pid}/maps")]


def _read(path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def wait_for(condition, timeout_s):
    """condition()'s first true value within timeout_s seconds (polled every 20 ms), else its last value."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


@LINUX_PROC
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=lambda sig: sig.name)
def test_decoder_processes_end_with_their_parent(tmp_path, sig):
    """Killed while it builds the cache, the decoding process takes its workers with it: none is left blocked
    on a pipe under PID 1 (issue 31, kind 6)."""
    folder = slow_folder(tmp_path / "images", MIN_PARALLEL + 72)  # about 4 s of decoding for 2 workers
    parent = subprocess.Popen([sys.executable, "-c", DECODE_FOLDER, str(folder), str(tmp_path / "cache")])
    workers = []
    try:
        workers = wait_for(lambda: len(found := decoders(parent.pid)) == 2 and found, 30)
        assert workers and parent.poll() is None, "the workers must be decoding when their parent is killed"
        parent.send_signal(sig)
        assert parent.wait(10) == -sig
        assert wait_for(lambda: not any(map(alive, workers)), 3), f"{[p for p in workers if alive(p)]} outlived it"
    finally:
        for pid in workers or []:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


# A process whose parent (pid on its first line) starts a grandchild that runs only the parent watch, then waits.
WATCHED = ("import os; from patchgen.models.cache import _watch_parent; parent = os.getppid(); "
           "print(os.getpid(), flush=True); _watch_parent(parent)")
STARTS_WATCHED = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]]); time.sleep(60)"


@LINUX_PROC
def test_parent_watch_alone_ends_an_orphan():
    """Without prctl (other systems, or prctl refused), the polling thread's check ends the orphan."""
    parent = subprocess.Popen([sys.executable, "-c", STARTS_WATCHED, WATCHED], stdout=subprocess.PIPE, text=True)
    watched = None
    try:
        watched = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        assert wait_for(lambda: not alive(watched), 3)
    finally:
        if watched is not None and alive(watched):
            os.kill(watched, signal.SIGKILL)
        parent.kill()
        parent.wait()
        parent.stdout.close()
