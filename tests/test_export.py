"""patchgen-export: contract, dynamic batch, parity, metadata round trip, and every bad input."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from patchgen.export.onnx_export import example_inputs, export_onnx
from patchgen.export.parity import (PARITY_TIMESTEPS, PARITY_TOLERANCE, eps_gain, max_parity_error, parity_scale,
                                    spread_timesteps)
from patchgen.models.checkpoint import load_checkpoint, model_from_checkpoint
from patchgen.models.config import ModelConfig
from patchgen.models.diffusion import EpsDenoiser, eps_from_prediction, schedule_coefficients
from patchgen.models.train import train
from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.metadata import spec_from_metadata
from patchgen.runtime.schedule import Schedule
from patchgen.runtime.session import open_session
from patchgen.runtime.spec import graph_inputs

from conftest import BLOCK_TORCH, sample_cli, tiny_config, write_checkpoint

CONFIGS = {
    "g1-baseline": dict(grid=1, use_position=False, use_gcc=False),
    "g1-gcc": dict(grid=1, use_position=False, use_gcc=True),
    "g2-pos-gcc": dict(grid=2),
    "g2-no-gcc": dict(grid=2, use_gcc=False),
    "g2-no-pos": dict(grid=2, use_position=False),
    "g2-neither": dict(grid=2, use_position=False, use_gcc=False),
    "g4-pos-gcc": dict(grid=4, image_size=32),
    "g2-levers": dict(grid=2, prediction="v", global_context=2, gcc_source="x0"),
    "g2-x0": dict(grid=2, prediction="x0"),  # eps = (x_t - a x0)/s magnifies fp32 rounding ~156x at t = 0
    "g2-halo": dict(grid=2, halo=2),
    "g4-halo-mask-x0": dict(grid=4, image_size=32, halo=4, edge_mask=True, prediction="x0", global_context=2),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each config exported once per test module: name -> (config, checkpoint path, onnx path)."""
    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            config = tiny_config(**CONFIGS[name])
            ckpt = write_checkpoint(d / "checkpoint.pt", config, step=7)
            export_onnx(ckpt, d / "model.onnx")
            cache[name] = (config, ckpt, d / "model.onnx")
        return cache[name]
    return get


def meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("name", CONFIGS)
def test_contract_batch_parity_and_metadata(exported, name):
    config, ckpt, path = exported(name)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    contract = graph_inputs(config.spec)
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert shapes == {name: ["batch", *shape] for name, (_, shape) in contract.items()}
    w, p, c = config.window_size, config.patch_size, config.channels
    assert shapes["x"] == ["batch", c, w, w] and shapes.get("gcc", ["batch", c, p, p]) == ["batch", c, p, p]
    types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name for i in model.graph.input}
    assert types == {name: dtype for name, (dtype, _) in contract.items()}
    assert [o.name for o in model.graph.output] == ["eps"]
    out = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out] == ["batch", c, p, p]

    net = model_from_checkpoint(load_checkpoint(ckpt))
    assert max_parity_error(net, path, batches=(1, 2, 3, 4, 5), seed=1) <= PARITY_TOLERANCE

    m = meta(path)
    assert spec_from_metadata(m) == config.spec
    assert ModelConfig.from_dict(json.loads(m["patchgen.model_config"])) == config
    assert m["patchgen.training.steps"] == "7" and m["patchgen.data.license"] == "CC0"
    assert m["patchgen.weights"] == "ema" and m["patchgen.output"] == "eps"


def test_simplified_graph_gives_same_outputs(exported, tmp_path):
    config, ckpt, simplified = exported("g2-pos-gcc")
    plain = tmp_path / "plain.onnx"
    export_onnx(ckpt, plain, simplify_graph=False)
    assert len(onnx.load(str(simplified)).graph.node) < len(onnx.load(str(plain)).graph.node)
    feeds = example_inputs(model_from_checkpoint(load_checkpoint(ckpt)), 3, np.random.default_rng(5))
    a = open_session(str(simplified)).run(["eps"], feeds)[0]
    b = open_session(str(plain)).run(["eps"], feeds)[0]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_export_removes_a_killed_exports_temporary(exported, tmp_path):
    _, ckpt, _ = exported("g2-pos-gcc")
    stale = tmp_path / ".m.onnx.p999999999.abc123.tmp"  # a kill -9 mid-write left it (no such pid)
    stale.write_bytes(b"partial")
    export_onnx(ckpt, tmp_path / "m.onnx", check=False)
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_raw_weights_differ_from_ema(tmp_path):
    config = tiny_config()
    ckpt = write_checkpoint(tmp_path / "c.pt", config)
    state = torch.load(ckpt, weights_only=True)
    state["ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["ema"].items()}
    torch.save(state, ckpt)
    export_onnx(ckpt, tmp_path / "raw.onnx", ema=False, check=False)
    export_onnx(ckpt, tmp_path / "ema.onnx", check=False)
    feeds = example_inputs(model_from_checkpoint(load_checkpoint(ckpt)), 2, np.random.default_rng(0))
    raw = open_session(str(tmp_path / "raw.onnx")).run(["eps"], feeds)[0]
    ema = open_session(str(tmp_path / "ema.onnx")).run(["eps"], feeds)[0]
    assert meta(tmp_path / "raw.onnx")["patchgen.weights"] == "raw"
    assert np.abs(raw - ema).max() > 1e-3


@pytest.mark.quick
def test_eps_gain_is_the_derivative_of_the_conversion():
    """d eps / d pred of the graph's own conversion, by autograd, at low, mid and high t."""
    schedule = Schedule()
    t = torch.tensor([0, 1, 500, 999])
    a, s = schedule_coefficients(schedule)
    x_t = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    for kind in ("eps", "v", "x0"):
        pred = torch.zeros(4, 3, 2, 2, requires_grad=True)
        eps_from_prediction(kind, pred, x_t, t, a, s).sum().backward()
        grad = pred.grad.abs().amax(dim=(1, 2, 3)).double().numpy()
        np.testing.assert_allclose(grad, eps_gain(kind, schedule)[t.numpy()], rtol=1e-5)


@pytest.mark.quick
def test_x0_gain_at_t0_for_the_default_cosine_schedule():
    gain = eps_gain("x0", Schedule())
    assert gain[0] == pytest.approx(155.63, abs=0.01) and gain.argmax() == 0  # sqrt(abar_0 / (1 - abar_0))
    assert eps_gain("v", Schedule()).max() <= 1 and np.all(eps_gain("eps", Schedule()) == 1)
    np.testing.assert_array_equal(parity_scale("x0", Schedule()), np.maximum(gain, 1))
    assert np.all(parity_scale("v", Schedule()) == 1)


@pytest.mark.quick
@pytest.mark.parametrize("num_timesteps", [2, 3, 10, 1000, 4000])
def test_parity_timesteps_are_fixed_and_span_the_schedule(num_timesteps):
    ts = spread_timesteps(num_timesteps, PARITY_TIMESTEPS)
    assert ts.dtype == np.int64 and ts[0] == 0 and ts[-1] == num_timesteps - 1
    assert np.all(np.diff(ts) > 0) and len(ts) == min(9, num_timesteps)
    assert np.diff(ts).max() - np.diff(ts).min() <= 1  # evenly spread
    np.testing.assert_array_equal(ts, spread_timesteps(num_timesteps, PARITY_TIMESTEPS))


def test_x0_model_passes_a_deterministic_check_that_includes_t0(exported):
    config, ckpt, path = exported("g2-x0")  # export_onnx ran the check: it passed
    net = model_from_checkpoint(load_checkpoint(ckpt))
    error = max_parity_error(net, path)
    assert error <= PARITY_TOLERANCE and error == max_parity_error(net, path)
    # At t = 0 the eps difference is the x0 one times ~156; in x0 units it is within the limit.
    feeds = example_inputs(net, 3, np.random.default_rng(0), t=np.zeros(3, np.int64))
    with torch.no_grad():
        ref = EpsDenoiser(net).eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    eps_diff = np.abs(open_session(str(path)).run(["eps"], feeds)[0] - ref).max()
    assert eps_diff / eps_gain("x0", config.schedule)[0] <= PARITY_TOLERANCE


def test_wrong_graph_fails_the_check_and_leaves_no_file(tmp_path, monkeypatch):
    """A graph whose x0 output is off by 3x the limit (a shifted output bias) is caught, though the check
    divides the t = 0 eps difference by ~156."""
    import patchgen.export.onnx_export as ex

    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config(prediction="x0"))
    simplify = ex.simplify

    def corrupt(model):
        model = simplify(model)
        bias = next(i for i in model.graph.initializer if i.name.endswith("conv_out.bias"))
        bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 3 * PARITY_TOLERANCE,
                                                   bias.name))
        return model
    monkeypatch.setattr(ex, "simplify", corrupt)
    with pytest.raises(PatchgenError, match=r"parity check failed: max error in the model's own "
                                            r"parametrisation \(x0\) = 0.000[23]\d* > 0.0001") as e:
        ex.export_onnx(ckpt, tmp_path / "m.onnx")
    assert "\n" not in str(e.value) and "no file written" in str(e.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "c.pt"]


def test_onnx_opens_without_torch(exported):
    _, _, path = exported("g2-pos-gcc")
    code = BLOCK_TORCH + f"""
import numpy as np, onnxruntime as ort
s = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
eps = s.run(["eps"], {{"x": np.zeros((2, 3, 8, 8), np.float32), "t": np.array([0, 999]),
                       "pos": np.eye(4, dtype=np.float32)[:2], "gcc": np.zeros((2, 3, 8, 8), np.float32)}})[0]
assert "torch" not in sys.modules and eps.shape == (2, 3, 8, 8)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def run_export(*args):
    return subprocess.run([sys.executable, "-m", "patchgen.cli.export", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_exports_a_trained_checkpoint(tmp_path, blobs16, tiny_train_config):
    train(tmp_path, 2, data=blobs16, config=tiny_config(), train_config=tiny_train_config, preview_every=0)
    ckpt = tmp_path / "checkpoint.pt"
    r = run_export(ckpt, "-o", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert "input  pos" in r.stdout and "output eps" in r.stdout
    assert "parity: max error in the model's own parametrisation (eps) = " in r.stdout
    assert meta(tmp_path / "m.onnx")["patchgen.training.steps"] == "2"
    r = run_export(ckpt, "-o", tmp_path / "m.onnx")  # no silent overwrite
    assert r.returncode == 2 and "--force" in r.stderr


def test_cli_halo_train_export_sample_without_torch(tmp_path, blobs16):
    """patchgen-train --halo -> patchgen-export -> patchgen-sample with torch blocked, as on the device."""
    data = tmp_path / "data"
    data.mkdir()
    for k, img in enumerate(blobs16.images[:8]):
        Image.fromarray(img).save(data / f"{k}.png")
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "patchgen.cli.train", "--data", data, "--image-size", "16", "--grid", "2",
                        "--halo", "2", "--edge-mask", "--base-width", "8", "--channel-mults", "1,2",
                        "--num-res-blocks", "1", "--attention-resolutions", "4", "--batch-size", "2", "--max-steps",
                        "2", "--preview-every", "0", "--out", run], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = run_export(run / "checkpoint.pt", "-o", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert "input  x    float32 [batch, 3, 12, 12]" in r.stdout, r.stdout
    assert meta(tmp_path / "m.onnx")["patchgen.halo"] == "2"
    r = sample_cli("--model", tmp_path / "m.onnx", "-n", "2", "--steps", "3", "--out", tmp_path / "out",
                   block_torch=True)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def _bad_checkpoints(tmp_path):
    good = write_checkpoint(tmp_path / "good.pt", tiny_config())
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:5000])
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    state = torch.load(good, weights_only=True)
    state["model_config"]["grid"] = 3  # 16 px does not split into 3 patches
    torch.save(state, tmp_path / "unbuildable.pt")
    return good


@pytest.mark.parametrize("checkpoint,output,message", [
    ("missing.pt", "m.onnx", "does not exist"),
    ("truncated.pt", "m.onnx", "not a readable checkpoint"),
    ("foreign.pt", "m.onnx", "not a patchgen checkpoint"),
    ("unbuildable.pt", "m.onnx", "cannot build"),
    ("good.pt", "no/such/dir/m.onnx", "does not exist"),
    ("good.pt", "/proc/m.onnx", "cannot write to /proc"),
])
def test_cli_bad_input(tmp_path, checkpoint, output, message):
    _bad_checkpoints(tmp_path)
    before = set(tmp_path.rglob("*"))
    out = output if output.startswith("/") else tmp_path / output
    r = run_export(tmp_path / checkpoint, "-o", out)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert set(tmp_path.rglob("*")) == before  # no partial file


def test_parity_check_runs_every_patch_position(exported, monkeypatch):
    """The export's parity check feeds every one-hot position at least once (16 on a 4x4 grid), not just the
    first few: a wrong position path (the edge mask is built from pos) cannot pass unseen."""
    import patchgen.export.parity as parity

    config, ckpt, path = exported("g4-halo-mask-x0")
    seen = []
    original = parity.example_feeds

    def recording(*args, **kwargs):
        feeds = original(*args, **kwargs)
        seen.extend(np.argmax(feeds["pos"], axis=1).tolist())
        return feeds
    monkeypatch.setattr(parity, "example_feeds", recording)
    assert max_parity_error(model_from_checkpoint(load_checkpoint(ckpt)), path) <= PARITY_TOLERANCE
    assert set(seen) == set(range(config.grid**2))


@pytest.fixture
def external_from_1_kib(monkeypatch):
    """Make the tiny test models "large": every initializer of 1 KiB or more goes to external data."""
    import patchgen.export.onnx_file as onnx_file

    monkeypatch.setattr(onnx_file, "EXTERNAL_DATA_FROM", 1)
    monkeypatch.setattr(onnx_file, "EXTERNAL_TENSOR_FROM", 1024)
    return onnx_file


@pytest.mark.quick
def test_a_staged_model_is_committed_whole_or_left_nowhere(tmp_path, external_from_1_kib):
    """onnx_file.staged on a hand-made graph (no export): a model not committed leaves nothing; a committed
    one is the .onnx plus its external data, and loads with the same weights."""
    weights = np.arange(1024, dtype=np.float32).reshape(1, 1024)  # 4 KiB: external data
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1024])],
                                   [onnx.numpy_helper.from_array(weights, "w")])
    model, out = onnx.helper.make_model(graph), tmp_path / "m.onnx"
    with external_from_1_kib.staged(model, out) as stage:
        assert stage.data is not None and stage.onnx.exists()
    assert list(tmp_path.iterdir()) == []
    with external_from_1_kib.staged(model, out) as stage:
        stage.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", stage.data.name]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(onnx.load(out).graph.initializer[0]), weights)


def test_a_large_model_keeps_its_weights_as_aligned_external_data(exported, tmp_path, external_from_1_kib):
    from patchgen.runtime.generate import generate
    from patchgen.runtime.model import load_model
    from patchgen.runtime.onnxfile import external_data_files

    _, ckpt, single = exported("g2-pos-gcc")
    report = export_onnx(ckpt, tmp_path / "m.onnx")
    [data] = external_data_files(tmp_path / "m.onnx")
    assert report.data_path == tmp_path / data and data.startswith("m.onnx.") and data.endswith(".data")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", data])
    assert report.file_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
    graph = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in graph.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(offsets) > 3 and all(o % external_from_1_kib.ALIGNMENT == 0 for o in offsets)
    assert np.array_equal(generate(load_model(tmp_path / "m.onnx"), 2, steps=3), generate(load_model(single), 2, steps=3))


def test_re_export_replaces_the_data_file_and_a_killed_exports_leftovers_go(tmp_path, external_from_1_kib):
    first = write_checkpoint(tmp_path / "a.pt", tiny_config(), seed=1)
    second = write_checkpoint(tmp_path / "b.pt", tiny_config(), seed=2)
    out = tmp_path / "out"
    out.mkdir()
    old = export_onnx(first, out / "m.onnx").data_path
    (out / "m.onnx.0123456789ab.data").write_bytes(b"a killed export's data, never committed")
    (out / ".m.onnx.p999999999.abc123.tmp").write_bytes(b"a killed export's graph")
    with pytest.raises(PatchgenError, match="exists; pass force=True"):
        export_onnx(second, out / "m.onnx")
    new = export_onnx(second, out / "m.onnx", force=True).data_path
    assert new != old and sorted(p.name for p in out.iterdir()) == sorted(["m.onnx", new.name])


def test_a_failed_check_leaves_no_external_data(tmp_path, external_from_1_kib, monkeypatch):
    import patchgen.export.onnx_export as ex
    import patchgen.export.parity as parity

    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config())
    monkeypatch.setattr(parity, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(PatchgenError, match="parity check failed"):
        ex.export_onnx(ckpt, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_a_full_disk_is_one_line_and_leaves_nothing(exported, tmp_path, monkeypatch):
    import errno

    import patchgen.export.onnx_file as onnx_file

    _, ckpt, _ = exported("g2-pos-gcc")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(onnx_file.os, "fsync", full)
    with pytest.raises(PatchgenError, match=r"^cannot write the model in .*: No space left on device; free some space "
                                            r"there or choose another output folder$"):
        export_onnx(ckpt, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
