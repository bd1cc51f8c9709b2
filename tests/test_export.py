"""patchgen-export: contract, dynamic batch, parity, metadata round trip, and every bad input."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from patchgen.export.onnx_export import PARITY_TOLERANCE, example_inputs, export_onnx, max_parity_error
from patchgen.models.checkpoint import load_checkpoint, model_from_checkpoint
from patchgen.models.config import ModelConfig
from patchgen.models.train import train
from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.metadata import spec_from_metadata
from patchgen.runtime.session import open_session

from conftest import BLOCK_TORCH, tiny_config, write_checkpoint

CONFIGS = {
    "g1-baseline": dict(grid=1, use_position=False, use_gcc=False),
    "g1-gcc": dict(grid=1, use_position=False, use_gcc=True),
    "g2-pos-gcc": dict(grid=2),
    "g2-no-gcc": dict(grid=2, use_gcc=False),
    "g2-no-pos": dict(grid=2, use_position=False),
    "g2-neither": dict(grid=2, use_position=False, use_gcc=False),
    "g4-pos-gcc": dict(grid=4, image_size=32),
    "g2-levers": dict(grid=2, prediction="v", global_context=2, gcc_source="x0"),
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
    p, c = config.patch_size, config.channels
    expected = {"x": ["batch", c, p, p], "t": ["batch"]}
    if config.use_position:
        expected["pos"] = ["batch", config.grid**2]
    if config.use_gcc:
        expected["gcc"] = ["batch", c, p, p]
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert shapes == expected
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types.pop("t") == onnx.TensorProto.INT64 and set(types.values()) == {onnx.TensorProto.FLOAT}
    assert [o.name for o in model.graph.output] == ["eps"]

    net = model_from_checkpoint(load_checkpoint(ckpt))
    assert max_parity_error(net, path.read_bytes(), batches=(1, 2, 3, 4, 5), seed=1) <= PARITY_TOLERANCE

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


def test_parity_failure_leaves_no_file(tmp_path, monkeypatch):
    import patchgen.export.onnx_export as ex

    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config())
    monkeypatch.setattr(ex, "PARITY_TOLERANCE", 0.0)
    monkeypatch.setattr(ex, "max_parity_error", lambda *a, **k: 1e-3)
    with pytest.raises(PatchgenError, match="parity check failed"):
        ex.export_onnx(ckpt, tmp_path / "m.onnx")
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
    train(tmp_path, 2, data=blobs16, config=tiny_config(), tc=tiny_train_config, preview_every=0)
    ckpt = tmp_path / "checkpoint.pt"
    r = run_export(ckpt, "-o", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert "input  pos" in r.stdout and "output eps" in r.stdout and "parity: max" in r.stdout
    assert meta(tmp_path / "m.onnx")["patchgen.training.steps"] == "2"
    r = run_export(ckpt, "-o", tmp_path / "m.onnx")  # no silent overwrite
    assert r.returncode == 2 and "--force" in r.stderr


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
