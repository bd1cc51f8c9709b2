"""The edge runtime and patchgen-sample: torch-free, torch parity, determinism, flat memory, bad input."""
import os
import re

import numpy as np
import onnx
import pytest
from PIL import Image

from patchgen.export.onnx_export import export_onnx
from patchgen.models.checkpoint import load_checkpoint, model_from_checkpoint
from patchgen.models.sample import sample_torch
from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.generate import generate, iter_samples, make_plan
from patchgen.runtime.loop import sample_images
from patchgen.runtime.memory import Calibration, parse_size, plan_patch_batch
from patchgen.runtime.limits import available_cpus
from patchgen.runtime.model import default_threads, load_model, thread_candidates
from patchgen.runtime.onnxfile import external_data_files
from patchgen.runtime.schedule import Schedule

from conftest import sample_cli, tiny_config, write_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (checkpoint, onnx) for a 2x2 position+GCC model and a 1x1 baseline."""
    out = {}
    for name, overrides in {"g2": {}, "g1": dict(grid=1, use_position=False, use_gcc=False),
                            "g2-x0": dict(gcc_source="x0", prediction="v"),
                            "g2-T100": dict(schedule=Schedule(kind="linear", num_timesteps=100)),
                            "g2-halo": dict(halo=2, edge_mask=True, prediction="x0", global_context=2)}.items():
        d = tmp_path_factory.mktemp(name)
        ckpt = write_checkpoint(d / "c.pt", tiny_config(**overrides), seed=3)
        export_onnx(ckpt, d / "m.onnx")
        out[name] = (ckpt, d / "m.onnx")
    return out


def test_sample_runs_with_torch_blocked(models, tmp_path):
    _, onnx_path = models["g2"]
    r = sample_cli("--model", onnx_path, "-n", "2", "--steps", "4", "--out", tmp_path / "out",
                   "--grid-image", tmp_path / "grid.png", block_torch=True)
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["seed0_00000.png", "seed0_00001.png"]
    img = Image.open(files[0])
    assert img.size == (16, 16) and img.mode == "RGB"
    assert img.text["patchgen:sampler"] == "dpm++" and img.text["patchgen:steps"] == "4"
    assert len(img.text["patchgen:model_sha256"]) == 64
    assert Image.open(tmp_path / "grid.png").size == (2 * 18 + 2, 18 + 2)
    assert re.search(r"s/image, peak RSS \d+\.\dM", r.stderr)


@pytest.mark.parametrize("name", ["g1", "g2", "g2-x0", "g2-halo"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 25), ("dpm++", 8)])
def test_runtime_matches_torch_reference(models, name, sampler, steps):
    ckpt, onnx_path = models[name]
    net = model_from_checkpoint(load_checkpoint(ckpt))
    reference = sample_torch(net, 2, seed=5, steps=steps, sampler=sampler)
    model = load_model(onnx_path)
    runtime = sample_images(model, model.spec, num_images=2, seed=5, steps=steps, sampler=sampler, patch_batch=1)
    assert np.abs(runtime - reference).max() <= 1e-4


@pytest.mark.parametrize("name", ["g2", "g2-halo"])
def test_same_seed_same_bytes_whatever_the_batch(models, tmp_path, name):
    _, onnx_path = models[name]
    runs = {}
    for run, extra in {"pb1": ["--patch-batch", "1"], "pb3": ["--patch-batch", "3"], "all": ["--patch-batch", "12"],
                       "again": ["--patch-batch", "1"]}.items():
        r = sample_cli("--model", onnx_path, "-n", "3", "--steps", "5", "--sampler", "ddim", "--eta", "1",
                       "--seed", "11", "--out", tmp_path / run, *extra)
        assert r.returncode == 0, r.stderr
        runs[run] = [p.read_bytes() for p in sorted((tmp_path / run).glob("*.png"))]
    assert len(runs["pb1"]) == 3 and len(set(runs["pb1"])) == 3
    assert runs["pb1"] == runs["pb3"] == runs["all"] == runs["again"]


def test_generate_api_and_image_independence(models):
    _, onnx_path = models["g2"]
    four = generate(str(onnx_path), num_images=4, seed=2, steps=3, patch_batch=16)
    assert four.shape == (4, 16, 16, 3) and four.dtype == np.uint8
    np.testing.assert_array_equal(generate(str(onnx_path), num_images=2, seed=2, steps=3), four[:2])


PEAK = re.compile(r"peak RSS (\d+\.\d)M")


def test_peak_memory_does_not_grow_with_image_count(models, tmp_path):
    _, onnx_path = models["g2"]
    peaks = {}
    for n in (1, 20):
        r = sample_cli("--model", onnx_path, "-n", n, "--steps", "3", "--out", tmp_path / str(n), "--threads", "1",
                       "--memory-budget", "min")
        assert r.returncode == 0, r.stderr
        peaks[n] = float(PEAK.search(r.stderr).group(1))
    assert peaks[20] <= 1.05 * peaks[1], peaks


def test_budget_plans_and_minimum(models):
    _, onnx_path = models["g2"]
    model = load_model(onnx_path)
    with pytest.raises(PatchgenError, match=r"below this model's minimum of \d+\.\dM .*memory_budget='\d+M'"):
        make_plan(model, 1, memory_budget="10M")
    # The default budget (75% of this machine's memory): everything fits, the fastest batch measured runs. (A
    # tight budget in a process whose mark is far above its RSS, as a test process's is, charges the hidden
    # one-patch call at that gap and stays memory-first: safe, and what a fresh process never sees.)
    plan = make_plan(model, 2)
    assert plan.allocation == model.allocation == "arena" and plan.patch_batch in (1, 2, 4, 8)
    assert plan.images_per_run == max(1, plan.patch_batch // 4) and plan.predicted_peak <= plan.budget
    assert plan.seconds_per_patch > 0 and model.threads in thread_candidates(available_cpus())
    chosen = load_model(onnx_path, threads=1)
    assert make_plan(chosen, 2).allocation == "arena" and chosen.threads == 1  # as asked
    plan = make_plan(model, 2, memory_budget="min")  # the same model, planned again: back to its lean session
    assert (plan.allocation, plan.patch_batch, plan.images_per_run, plan.predicted_peak) == ("lean", 1, 1, None)
    assert model.allocation == "lean" and model.threads == default_threads()
    with pytest.raises(PatchgenError, match="not both"):
        make_plan(model, 1, memory_budget="1G", patch_batch=2)


@pytest.mark.quick
def test_thread_candidates():
    assert [thread_candidates(n) for n in (1, 2, 4, 6, 8)] == [[1], [1, 2], [1, 2, 4], [1, 2, 4, 6], [1, 2, 4, 8]]


@pytest.mark.quick
def test_plan_arithmetic():
    mem = Calibration(reached=110, floor=100, calls=((1, 5), (2, 10), (4, 22)))  # bytes; calls: (batch, added)
    batches, no_extra = [1, 2, 3, 4, 8], lambda b: 0
    assert plan_patch_batch(mem, 121, batches, no_extra) == 2  # 3 is charged the 22 bytes measured at 4
    assert plan_patch_batch(mem, 10**6, batches, no_extra) == 4  # never beyond the largest batch measured
    with pytest.raises(PatchgenError, match="minimum"):
        plan_patch_batch(mem, 109, batches, no_extra)  # below the high-water mark already reached


@pytest.mark.quick
@pytest.mark.parametrize("text,expected", [("200M", 200 * 2**20), ("1.5G", int(1.5 * 2**30)), ("512MiB", 512 * 2**20),
                                           ("1000", 1000), ("64k", 64 * 1024)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.quick
def test_parse_size_rejects():
    with pytest.raises(PatchgenError, match="like 200M"):
        parse_size("lots")


def _foreign(tmp_path):
    x = onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["a"], ["b"])], "g", [x], [y])
    path = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("args,message", [
    (["--model", "{tmp}/missing.onnx"], "does not exist"),
    (["--model", "no_such_shipped_model"], "does not exist"),
    (["--model", "{tmp}/corrupt.onnx"], "not a readable ONNX model"),
    (["--model", "{tmp}/foreign.onnx"], "not a patchgen model"),
    (["--model", "{g2}", "--steps", "0"], "--steps"),
    (["--model", "{g2}", "--steps", "1001"], "steps must be between 1 and 1000"),
    (["--model", "{g2}", "-n", "0"], "--num-images"),
    (["--model", "{g2}", "--memory-budget", "10M"], "minimum"),
    (["--model", "{g2}", "--memory-budget", "a lot"], "like 200M"),
    (["--model", "{g2}", "--memory-budget", "1G", "--patch-batch", "2"], "not both"),
    (["--model", "{g2}", "--out", "/proc/samples"], "cannot"),
    (["--model", "{g2}", "--seed", "-1"], "--seed"),
    (["--model", "{g2}", "--seed", "4294967296"], "--seed"),
    (["--model", "{g2}", "--threads", "1000"], "--threads"),
    (["--model", "{g2}", "--memory-budget", "0"], "must be positive"),
    (["--model", "{g2}", "--sampler", "dpm++", "--eta", "0.7"], "eta applies to the ddim sampler only"),
    (["--model", "{g2}", "--sampler", "ddpm", "--eta", "1"], "eta applies to the ddim sampler only"),
    (["--model", "{g2}", "--eta", "nan"], "eta"),
    (["--model", "{t100}", "--steps", "101"], "steps must be between 1 and 100"),
    (["--model", "{g2}", "--provider", "rknpu"], "not available in this onnxruntime build (onnxruntime"),
    (["--model", "{g2}", "--provider", "gpu"], "'gpu' is not an onnxruntime execution provider"),
    (["--model", "{g2}", "-n", "10000000", "--grid-image", "{tmp}/grid.png"], "leave out --grid-image"),
    (["--model", "{g2}", "--grid-image", "{g2}"], "is the model file"),
])
def test_sample_bad_input(models, tmp_path, args, message):
    (tmp_path / "corrupt.onnx").write_bytes(models["g2"][1].read_bytes()[:3000])
    _foreign(tmp_path)
    args = [a.format(tmp=tmp_path, g2=models["g2"][1], t100=models["g2-T100"][1]) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out" / "new")]
    if "--steps" not in args:
        args += ["--steps", "2"]
    r = sample_cli(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.rglob("*.png")) and not (tmp_path / "out").exists()  # refused before creating anything


@pytest.mark.quick
def test_no_default_model_message(tmp_path, monkeypatch, capsys):
    import patchgen.cli.sample as cli
    import patchgen.runtime.pretrained as pretrained

    monkeypatch.setattr(pretrained, "DEFAULT_MODEL", "no-such-model")
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model no-such-model does not exist" in err, err
    assert all(name in err for name in pretrained.shipped_models()), err  # the names that would work


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "ddpm"])
def test_step_counts_that_used_to_crash(models, tmp_path, sampler):
    """61 steps at T = 1000 made 62 timesteps ending at -1 (DDIM: math domain error; DPM++: noise)."""
    model = load_model(models["g2"][1])
    plan = make_plan(model, 1, sampler=sampler, steps=61)
    seen = []
    images = [img for _, img in iter_samples(model, plan, callback=lambda i, t: seen.append(t))]
    assert len(seen) == 61 and min(seen) >= 0 and seen[0] == 999
    ckpt, onnx_path = models["g2"]
    reference = sample_torch(model_from_checkpoint(load_checkpoint(ckpt)), 1, seed=0, steps=61, sampler=sampler)
    runtime = sample_images(model, model.spec, num_images=1, seed=0, steps=61, sampler=sampler)
    assert np.abs(runtime - reference).max() <= 1e-4 and images[0].dtype == np.uint8


def test_defaults_follow_the_models_T(models, tmp_path):
    """A T = 100 model: ddpm with no --steps runs its 100 timesteps, not 1000; odd step counts work."""
    _, onnx_path = models["g2-T100"]
    r = sample_cli("--model", onnx_path, "-n", "1", "--sampler", "ddpm", "--out", tmp_path / "a", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "a" / "seed0_00000.png").text["patchgen:steps"] == "100"
    model = load_model(onnx_path)
    for steps in (29, 31, 97):
        seen = []
        images = list(iter_samples(model, make_plan(model, 1, sampler="dpm++", steps=steps),
                                   callback=lambda i, t: seen.append(t)))
        assert len(images) == 1 and len(seen) == steps and seen[0] == 99 and min(seen) >= 0


def test_out_of_range_timesteps_are_refused(models):
    model = load_model(models["g2"][1])
    x = np.zeros((1, 3, 8, 8), np.float32)
    for t in (-1, 1000):
        with pytest.raises(ValueError, match=r"timesteps must be in \[0, 999\]"):
            model(x, np.array([t], np.int64), np.eye(4, dtype=np.float32)[:1], x)


@pytest.mark.parametrize("args,eta,sampler", [([], None, "dpm++"), (["--eta", "0.5"], "0.5", "ddim"),
                                              (["--sampler", "ddim"], "0.0", "ddim"),
                                              (["--sampler", "ddpm"], None, "ddpm")])
def test_png_text_states_what_ran(models, tmp_path, args, eta, sampler):
    """No --sampler: dpm++, or ddim when --eta asks for DDIM's noise."""
    r = sample_cli("--model", models["g2"][1], "-n", "1", "--steps", "3", "--out", tmp_path, *args)
    assert r.returncode == 0, r.stderr
    text = Image.open(tmp_path / "seed0_00000.png").text
    assert text.get("patchgen:eta") == eta and text["patchgen:steps"] == "3"
    assert text["patchgen:sampler"] == sampler


def test_model_hash_covers_external_data(models, tmp_path):
    import hashlib

    _, onnx_path = models["g2"]
    assert load_model(onnx_path).sha256 == hashlib.sha256(onnx_path.read_bytes()).hexdigest()  # = sha256sum
    onnx.save(onnx.load(onnx_path), tmp_path / "ext.onnx", save_as_external_data=True, location="weights.bin",
              size_threshold=1024)
    assert external_data_files(tmp_path / "ext.onnx") == ["weights.bin"]
    before, graph = load_model(tmp_path / "ext.onnx"), (tmp_path / "ext.onnx").read_bytes()
    weights = bytearray((tmp_path / "weights.bin").read_bytes())
    weights[-1] ^= 0xFF
    (tmp_path / "weights.bin").write_bytes(weights)
    after = load_model(tmp_path / "ext.onnx")
    assert (tmp_path / "ext.onnx").read_bytes() == graph  # only the external weights changed ...
    assert after.sha256 != before.sha256  # ... and the hash saw it
    assert before.sha256 != load_model(onnx_path).sha256


def test_seed_range_maps_one_to_one(models):
    model = load_model(models["g2"][1])
    top = generate(model, num_images=2, seed=2**32 - 1, steps=2)
    assert not np.array_equal(top[0], top[1]) and not np.array_equal(top[0], generate(model, 1, seed=0, steps=2)[0])
    with pytest.raises(PatchgenError, match="seed must be between 0 and 4294967295"):
        make_plan(model, 1, seed=-1)


def test_sampling_removes_only_its_own_stale_temporaries(models, tmp_path):
    stale = tmp_path / ".seed0_00003.png.p999999999.abc123.tmp"  # a killed run's (no such pid)
    live = tmp_path / f".seed0_00003.png.p{os.getpid()}.abc123.tmp"  # a running writer's
    other = tmp_path / ".notes.txt.p999999999.abc123.tmp"  # not patchgen-sample's
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    r = sample_cli("--model", models["g2"][1], "-n", "1", "--steps", "1", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and live.exists() and other.exists()


def test_budget_beyond_the_machine_is_capped_and_said(models, tmp_path):
    r = sample_cli("--model", models["g2"][1], "-n", "1", "--steps", "1", "--memory-budget", "99999999G",
                   "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "more than this process can have" in r.stderr


def test_a_format_1_file_samples_unchanged(models, tmp_path):
    """Files written before the halo (format 1: no patchgen.halo, x is the patch) load as halo 0 and sample
    exactly as before."""
    _, onnx_path = models["g2"]
    old = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in old.metadata_props}
    assert props.pop("patchgen.halo") == "0"
    props["patchgen.format_version"] = "1"
    del old.metadata_props[:]
    onnx.helper.set_model_props(old, props)
    onnx.save(old, str(tmp_path / "v1.onnx"))
    model = load_model(tmp_path / "v1.onnx")
    assert model.spec.halo == 0 and model.metadata["patchgen.format_version"] == "1"
    np.testing.assert_array_equal(generate(model, num_images=2, seed=4, steps=3),
                                  generate(str(onnx_path), num_images=2, seed=4, steps=3))
    r = sample_cli("--model", tmp_path / "v1.onnx", "-n", "1", "--steps", "2", "--out", tmp_path / "out",
                   block_torch=True)
    assert r.returncode == 0, r.stderr


def test_provider_selection(models, monkeypatch):
    """cpu by name (any case); a provider onnxruntime lists but cannot start is refused, never run on the CPU."""
    import onnxruntime as ort

    from patchgen.runtime.session import available_providers, open_session

    assert "cpu" in available_providers() and "azure" not in available_providers()
    model = load_model(models["g2"][1], provider="CPU")
    assert model.provider == "cpu"
    assert generate(model, 1, steps=2).shape == (1, 16, 16, 3)
    with pytest.raises(PatchgenError, match=r"available: .*cpu"):
        load_model(models["g2"][1], provider="tensorrt" if "tensorrt" not in available_providers() else "rknpu")
    real = ort.get_available_providers()
    if "CUDAExecutionProvider" not in real:  # pretend the build has it, as a GPU wheel without its drivers would
        monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
        with pytest.raises(PatchgenError, match="could not start the cuda provider.*provider='cpu'"):
            open_session(str(models["g2"][1]), provider="cuda")


def test_help_lists_the_providers():
    r = sample_cli("--help")
    assert r.returncode == 0 and re.search(r"this build\s+has: cpu", r.stderr + r.stdout)
