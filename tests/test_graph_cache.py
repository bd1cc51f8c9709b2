"""The weights' load path: graphs optimised once per device and cached, weights memory-mapped and held once."""
import errno
import json
import os
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import patchgen.runtime.graph_cache as graph_cache
from patchgen.export.onnx_export import export_onnx
from patchgen.runtime.files import CACHE_ENV
from patchgen.runtime.generate import generate
from patchgen.runtime.graph_cache import BUILD_FACTOR, ENTRY, GRAPH
from patchgen.runtime.memory import MIB
from patchgen.runtime.model import load_model
from patchgen.runtime.onnxfile import model_sha256
from patchgen.runtime.session import open_session
from patchgen.runtime.spec import example_feeds

from conftest import REPORTING_PEAK, sample_cli, sample_peak, tiny_config, write_checkpoint
from weighty import write_weighty


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A graph cache of this test's own, for this process and the ones it starts."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "graphs"


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """A real (tiny) patch U-Net, exported."""
    d = tmp_path_factory.mktemp("unet")
    export_onnx(write_checkpoint(d / "c.pt", tiny_config(), seed=4), d / "m.onnx")
    return d / "m.onnx"


def entries(cache):
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def outputs(session, spec):
    feeds = example_feeds(spec, np.array([0, 500, 999]), np.random.default_rng(0))
    return session.run(["eps"], {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def test_built_once_then_opened_with_optimisation_off(cache, unet):
    first = load_model(unet, threads=1)
    assert first.graph == "built" and first.notes == ()
    [entry] = entries(cache)
    files = {p.name: p.stat() for p in entry.iterdir()}
    assert set(files) == {GRAPH, GRAPH + ".data", ENTRY}
    second = load_model(unet, threads=1)
    assert second.graph == "cached" and second.notes == ()
    assert {p.name: p.stat() for p in entry.iterdir()} == files  # nothing written again
    options = second.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert first.sha256 == second.sha256 == model_sha256(unet)  # the PNGs' hash, from the entry's record
    assert json.loads((entry / ENTRY).read_text())["model"] == str(unet.resolve())


def test_weights_are_external_and_page_aligned_in_the_cached_graph(cache, tmp_path):
    """onnxruntime's writer aligns every initializer above 1 MiB to 4 KiB (ModelSavingOptions), so those map."""
    load_model(write_weighty(tmp_path / "m.onnx", width=256, depth=2), threads=1)
    [entry] = entries(cache)
    graph = onnx.load(str(entry / GRAPH), load_external_data=False)
    placed = [{e.key: int(e.value) for e in t.external_data if e.key != "location"} for t in graph.graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL]
    large = [p["offset"] for p in placed if p["length"] > MIB]
    assert len(large) >= 2 and all(offset % 4096 == 0 for offset in large)


def test_output_is_identical_with_and_without_the_cache(cache, unet):
    model = load_model(unet, threads=1)
    cached = load_model(unet, threads=1)
    assert cached.graph == "cached"
    uncached = open_session(unet, threads=1)  # onnxruntime's default optimisation, as before the cache
    assert np.array_equal(outputs(cached.session, cached.spec), outputs(uncached, cached.spec))
    assert np.array_equal(generate(model, 2, steps=3), generate(cached, 2, steps=3))


def test_a_changed_model_or_onnxruntime_rebuilds(cache, tmp_path, monkeypatch):
    path = write_weighty(tmp_path / "m.onnx", width=32, depth=2, seed=1)
    first = load_model(path, threads=1)
    assert load_model(path, threads=1).graph == "cached"
    write_weighty(tmp_path / "new.onnx", width=32, depth=2, seed=2)
    os.replace(tmp_path / "new.onnx", path)  # another model under the same name
    changed = load_model(path, threads=1)
    assert changed.graph == "built" and changed.sha256 != first.sha256
    assert len(entries(cache)) == 1  # rebuilt in place: one entry per model file and device
    monkeypatch.setattr(ort, "__version__", ort.__version__ + ".post1")
    assert load_model(path, threads=1).graph == "built"
    assert len(entries(cache)) == 2  # each onnxruntime its own entry
    monkeypatch.undo()
    monkeypatch.setenv(CACHE_ENV, str(cache.parent))
    assert load_model(path, threads=1).graph == "cached"


def _overwrite_start(path):
    with open(path, "r+b") as f:
        f.write(b"\x13" * 64)


DAMAGE = {
    "weights truncated": lambda e: os.truncate(e / (GRAPH + ".data"), 4096),
    "weights overwritten in place": lambda e: _overwrite_start(e / (GRAPH + ".data")),
    "graph overwritten in place": lambda e: _overwrite_start(e / GRAPH),
    "record garbage": lambda e: (e / ENTRY).write_text("{not json"),
    "record removed": lambda e: (e / ENTRY).unlink(),
    "graph removed": lambda e: (e / GRAPH).unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_rebuilt(cache, tmp_path, damage):
    path = write_weighty(tmp_path / "m.onnx", width=32, depth=2)
    expected = outputs(load_model(path, threads=1).session, load_model(path, threads=1).spec)
    [entry] = entries(cache)
    time.sleep(0.05)  # the kernel's file times tick every few ms: a write this close to the build could hide
    DAMAGE[damage](entry)
    model = load_model(path, threads=1)
    assert model.graph == "built" and "rebuilt the cached graph" in model.notes[0]
    assert np.array_equal(outputs(model.session, model.spec), expected)
    assert load_model(path, threads=1).graph == "cached"


def test_a_graph_onnxruntime_refuses_is_rebuilt_even_when_its_record_matches(cache, tmp_path):
    path = write_weighty(tmp_path / "m.onnx", width=32, depth=2)
    load_model(path, threads=1)
    [entry] = entries(cache)
    (entry / GRAPH).write_bytes(b"\x08\x07garbage that is not a graph")
    record = json.loads((entry / ENTRY).read_text())
    st = (entry / GRAPH).stat()
    record["files"][GRAPH] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]  # a lying record
    (entry / ENTRY).write_text(json.dumps(record))
    model = load_model(path, threads=1)
    assert model.graph == "built"
    assert load_model(path, threads=1).graph == "cached"


def test_two_processes_starting_at_once_both_succeed(cache, tmp_path):
    path = write_weighty(tmp_path / "m.onnx", width=256, depth=6)  # ~14 MB: builds long enough to overlap
    code = REPORTING_PEAK
    runs = [subprocess.Popen([sys.executable, "-c", code, "--model", path, "-n", "1", "--steps", "2", "--threads", "1",
                              "--out", tmp_path / f"out{k}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for k in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert [rc for rc, _ in results] == [0, 0], results
    assert not any("note:" in err for _, err in results), results
    assert len(entries(cache)) == 1 and [p.name for p in cache.iterdir()] == [entries(cache)[0].name]  # no temporaries
    assert (tmp_path / "out0" / "seed0_00000.png").read_bytes() == (tmp_path / "out1" / "seed0_00000.png").read_bytes()


def test_an_unwritable_cache_still_samples_and_says_so_once(tmp_path, monkeypatch, unet):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "cache"))  # under a file: no folder can be made
    r = sample_cli("--model", unet, "-n", "2", "--steps", "2", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("note:") == 1 and "not cached (cannot write the graph cache" in r.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def test_a_full_cache_disk_still_samples(cache, unet, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(graph_cache, "_build", full)
    model = load_model(unet, threads=1)
    assert model.graph == "direct" and "No space left on device" in model.notes[0]
    assert model.session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert generate(model, 1, steps=2).shape == (1, 16, 16, 3)


def test_a_read_only_cache_with_its_entry_is_used(cache, unet):
    if os.geteuid() == 0:
        pytest.skip("root writes through read-only permissions")
    load_model(unet, threads=1)
    os.chmod(cache, 0o555)
    try:
        assert load_model(unet, threads=1).graph == "cached"
    finally:
        os.chmod(cache, 0o755)


def test_a_build_that_would_not_fit_the_budget_is_skipped(cache, tmp_path):
    path = write_weighty(tmp_path / "m.onnx", width=256, depth=4)
    weights = path.stat().st_size
    budget = int(graph_cache.current_rss() + 1.1 * weights)  # holds the weights, not a build's second copy
    model = load_model(path, threads=1, memory_budget=budget)
    assert model.graph == "direct" and "above the" in model.notes[0]
    assert not cache.exists() or entries(cache) == []


def test_a_budget_below_the_weights_is_refused_up_front(cache, tmp_path):
    path = write_weighty(tmp_path / "m.onnx", width=256, depth=6)
    r = sample_cli("--model", path, "--memory-budget", "20M", "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("Error: memory budget 20.0M is below this model's minimum of ")
    assert f"{path.stat().st_size / MIB:.1f}M of weights" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and not cache.exists()  # refused before anything was opened


def test_a_weighty_models_peak_is_its_weights_once(cache, tmp_path):
    """Fresh processes: the floor (a model of almost no weights), then a model of ~64 MB of Conv weights,
    its first run (which builds the cached graph) and a later one."""
    small = write_weighty(tmp_path / "small.onnx", width=8, depth=1)
    large = write_weighty(tmp_path / "large.onnx", width=384, depth=12)
    args = ("-n", "1", "--steps", "1", "--threads", "1", "--out", tmp_path / "out", "--memory-budget", "min", "--force")
    _, floor = sample_peak("--model", small, *args)
    first, first_peak = sample_peak("--model", large, *args)
    later, later_peak = sample_peak("--model", large, *args)
    assert first.returncode == later.returncode == 0, first.stderr + later.stderr
    weights = large.stat().st_size
    report = f"floor {floor / MIB:.1f}, weights {weights / MIB:.1f}, first {first_peak / MIB:.1f}, later {later_peak / MIB:.1f} MiB"
    assert later_peak <= floor + 1.2 * weights, report
    assert first_peak <= floor + BUILD_FACTOR["inline"] * weights, report


def test_a_cache_disk_without_room_for_the_weights_is_not_written(cache, unet, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(graph_cache.shutil, "disk_usage", lambda path: usage(10 * MIB, 9 * MIB, MIB))
    model = load_model(unet, threads=1)
    assert model.graph == "direct" and "1.0M free in" in model.notes[0] and "needs about" in model.notes[0]
    assert entries(cache) == []
