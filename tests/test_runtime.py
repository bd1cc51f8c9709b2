"""The edge runtime and patchgen-sample: torch-free, torch parity, determinism, flat memory, bad input."""
import re

import numpy as np
import onnx
import pytest
from PIL import Image

from patchgen.export.onnx_export import export_onnx
from patchgen.models.checkpoint import load_checkpoint, model_from_checkpoint
from patchgen.models.sample import sample_torch
from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.generate import generate, make_plan
from patchgen.runtime.loop import sample_images
from patchgen.runtime.memory import MemoryModel, parse_size, plan_patch_batch
from patchgen.runtime.model import load_model

from conftest import sample_cli, tiny_config, write_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (checkpoint, onnx) for a 2x2 position+GCC model and a 1x1 baseline."""
    out = {}
    for name, overrides in {"g2": {}, "g1": dict(grid=1, use_position=False, use_gcc=False),
                            "g2-x0": dict(gcc_source="x0", prediction="v")}.items():
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
    assert img.text["patchgen:sampler"] == "ddim" and img.text["patchgen:steps"] == "4"
    assert len(img.text["patchgen:model_sha256"]) == 64
    assert Image.open(tmp_path / "grid.png").size == (2 * 18 + 2, 18 + 2)
    assert re.search(r"s/image, peak RSS \d+\.\dM", r.stderr)


@pytest.mark.parametrize("name", ["g1", "g2", "g2-x0"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 25), ("dpm++", 8)])
def test_runtime_matches_torch_reference(models, name, sampler, steps):
    ckpt, onnx_path = models[name]
    net = model_from_checkpoint(load_checkpoint(ckpt))
    reference = sample_torch(net, 2, seed=5, steps=steps, sampler=sampler)
    model = load_model(onnx_path)
    runtime = sample_images(model, model.spec, num_images=2, seed=5, steps=steps, sampler=sampler, patch_batch=1)
    assert np.abs(runtime - reference).max() <= 1e-4


def test_same_seed_same_bytes_whatever_the_batch(models, tmp_path):
    _, onnx_path = models["g2"]
    runs = {}
    for name, extra in {"pb1": ["--patch-batch", "1"], "pb3": ["--patch-batch", "3"], "all": ["--patch-batch", "12"],
                        "again": ["--patch-batch", "1"]}.items():
        r = sample_cli("--model", onnx_path, "-n", "3", "--steps", "5", "--sampler", "ddim", "--eta", "1",
                       "--seed", "11", "--out", tmp_path / name, *extra)
        assert r.returncode == 0, r.stderr
        runs[name] = [p.read_bytes() for p in sorted((tmp_path / name).glob("*.png"))]
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
        r = sample_cli("--model", onnx_path, "-n", n, "--steps", "3", "--out", tmp_path / str(n), "--threads", "1")
        assert r.returncode == 0, r.stderr
        peaks[n] = float(PEAK.search(r.stderr).group(1))
    assert peaks[20] <= 1.05 * peaks[1], peaks


def test_budget_plans_and_minimum(models):
    _, onnx_path = models["g2"]
    model = load_model(onnx_path)
    with pytest.raises(PatchgenError, match=r"below this model's minimum of \d+\.\dM .*--memory-budget \d+M"):
        make_plan(model, 1, memory_budget="10M")
    plan = make_plan(model, 2, memory_budget="4G")
    assert plan.patch_batch == 8 and plan.images_per_run == 2  # everything fits: all patches of both images
    with pytest.raises(PatchgenError, match="not both"):
        make_plan(model, 1, memory_budget="1G", patch_batch=2)


def test_plan_arithmetic():
    mem = MemoryModel(floor=100, fixed=10, per_patch=5)
    assert plan_patch_batch(mem, 200, 64, margin=0) == 18  # 100 + 10 + 18 * 5 = 200
    assert plan_patch_batch(mem, 200, 4, margin=0) == 4
    with pytest.raises(PatchgenError, match="minimum"):
        plan_patch_batch(mem, 114, 4, margin=0)


@pytest.mark.parametrize("text,expected", [("200M", 200 * 2**20), ("1.5G", int(1.5 * 2**30)), ("512MiB", 512 * 2**20),
                                           ("1000", 1000), ("64k", 64 * 1024)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


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
])
def test_sample_bad_input(models, tmp_path, args, message):
    (tmp_path / "corrupt.onnx").write_bytes(models["g2"][1].read_bytes()[:3000])
    _foreign(tmp_path)
    args = [a.format(tmp=tmp_path, g2=models["g2"][1]) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    if "--steps" not in args:
        args += ["--steps", "2"]
    r = sample_cli(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.rglob("*.png"))


def test_no_default_model_message(tmp_path, monkeypatch):
    import patchgen.cli.sample as cli
    import patchgen.runtime.pretrained as pretrained

    monkeypatch.setattr(pretrained, "DEFAULT_MODEL", "no-such-model")
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path)])
    assert e.value.code == 2
