"""fp16 and int8 exports: the same contract and metadata as fp32, parity within the stated bounds, and a runtime
that runs them with no special case."""
import subprocess
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from patchgen.export.onnx_export import export_onnx
from patchgen.export.parity import PARITY_RMS_TOLERANCE, PARITY_TIMESTEPS, parity_rms, spread_timesteps
from patchgen.export.quantize import calibration_images, realistic_feeds, timestep_nodes
from patchgen.models.checkpoint import load_checkpoint, model_from_checkpoint
from patchgen.models.data import DataSource
from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.generate import generate
from patchgen.runtime.model import load_model

from conftest import blob_images, sample_cli, tiny_config, write_checkpoint

CONFIGS = {  # between them: halo, edge mask, 4x4 positions, global vector, x0 and v, GCC from x_t and from x0_hat
    "g4-halo-mask-x0": dict(grid=4, image_size=32, halo=4, edge_mask=True, prediction="x0", global_context=2),
    "g2-v-selfcond": dict(grid=2, prediction="v", gcc_source="x0"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder of 24 disc images, the calibration data of the tests' random-weight checkpoints."""
    d = tmp_path_factory.mktemp("discs")
    for k, img in enumerate(blob_images(24, 32, seed=4)):
        Image.fromarray(img).save(d / f"{k:02d}.png")
    return d


@pytest.fixture(scope="module")
def exports(tmp_path_factory, folder):
    """(config name, weights) -> (checkpoint, onnx path); fp32 beside each for comparison."""
    cache = {}

    def get(name, weights):
        if (name, weights) not in cache:
            d = tmp_path_factory.mktemp(f"{name}-{weights}")
            ckpt = write_checkpoint(d / "c.pt", tiny_config(**CONFIGS[name]), seed=2)
            export_onnx(ckpt, d / "m.onnx", weights=weights, calibration_data=str(folder))
            cache[name, weights] = (ckpt, d / "m.onnx")
        return cache[name, weights]
    return get


def signature(model: onnx.ModelProto) -> list:
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in [*model.graph.input, *model.graph.output]]


def initializer_types(model: onnx.ModelProto) -> set:
    return {onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in model.graph.initializer}


@pytest.mark.parametrize("weights", ["fp16", "int8"])
@pytest.mark.parametrize("name", CONFIGS)
def test_same_contract_and_metadata_parity_in_bounds(exports, folder, name, weights):
    ckpt, fp32_path = exports(name, "fp32")
    _, path = exports(name, weights)
    fp32, reduced = onnx.load(str(fp32_path)), onnx.load(str(path))
    assert signature(reduced) == signature(fp32)  # float32 x, pos, gcc and eps, int64 t, dynamic batch
    meta = {p.key: p.value for p in reduced.metadata_props}
    assert meta.pop("patchgen.weights_dtype") == weights
    assert meta == {p.key: p.value for p in fp32.metadata_props if p.key != "patchgen.weights_dtype"}
    ops = {n.op_type for n in reduced.graph.node}
    if weights == "int8":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "int8" in initializer_types(reduced)
        assert "uint8" in initializer_types(reduced)  # U8S8 by default: the activations' zero points are uint8
    else:
        assert "float16" in initializer_types(reduced)
        kept = set(timestep_nodes(fp32))  # sin(t f) of t up to 999 would be lost in fp16
        assert {n.op_type for n in reduced.graph.node if n.name in kept} >= {"Sin", "Cos"}
        assert all(n.output and reduced_type(reduced, n.output[0]) != "float16" for n in reduced.graph.node
                   if n.name in kept and n.op_type in ("Sin", "Cos"))
    # The export checked parity on its own fresh windows; this checks it again on others.
    net = model_from_checkpoint(load_checkpoint(ckpt))
    images = calibration_images(DataSource(""), net.config.image_size, str(folder), 4, seed=9)
    feeds = list(realistic_feeds(net, images, spread_timesteps(net.config.schedule.num_timesteps, PARITY_TIMESTEPS), seed=9))
    assert parity_rms(net, path, feeds) <= PARITY_RMS_TOLERANCE[weights]
    assert parity_rms(net, fp32_path, feeds) <= 1e-5
    # The runtime needs no special case: same loader, same sampler, images of the same shape.
    model = load_model(path)
    assert model.spec == load_model(fp32_path).spec
    assert generate(model, 1, steps=2).shape == generate(fp32_path, 1, steps=2).shape


def reduced_type(model: onnx.ModelProto, name: str) -> str:
    inferred = onnx.shape_inference.infer_shapes(model)
    for v in [*inferred.graph.value_info, *inferred.graph.output]:
        if v.name == name:
            return onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
    return "unknown"


def test_smaller_weights(exports):
    """Weight bytes: fp16 half of fp32, int8 a quarter plus per-channel scales and the float32 biases (a tiny
    model's file is mostly graph; the shipped models' file sizes are in benchmarks/results/precision.md)."""
    def weight_bytes(weights):
        model = onnx.load(str(exports("g4-halo-mask-x0", weights)[1]))
        return sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    sizes = {w: weight_bytes(w) for w in ("fp32", "fp16", "int8")}
    assert sizes["fp16"] <= 0.55 * sizes["fp32"] and sizes["int8"] <= 0.4 * sizes["fp32"], sizes  # tiny: 0.35


@pytest.mark.quick
def test_calibration_windows_cover_the_schedule_and_positions(folder, tmp_path):
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config(**CONFIGS["g4-halo-mask-x0"]))
    net = model_from_checkpoint(load_checkpoint(ckpt))
    images = calibration_images(DataSource(""), 32, str(folder), 16, seed=0)
    feeds = list(realistic_feeds(net, images, np.array([0, 500, 999]), seed=0))
    t = np.concatenate([f["t"] for f in feeds])
    pos = np.concatenate([f["pos"] for f in feeds]).argmax(axis=1)
    assert set(t) == {0, 500, 999} and set(pos) == set(range(16))
    x = np.concatenate([f["x"] for f in feeds])
    assert x.shape[1:] == (3, 16, 16)  # 8 px patches seen through 16 px windows (halo 4)


def test_sampling_cli_runs_an_int8_model_without_torch(exports, tmp_path):
    _, path = exports("g2-v-selfcond", "int8")
    r = sample_cli("--model", path, "-n", "1", "--steps", "2", "--out", tmp_path / "out", block_torch=True)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def run_export(*args):
    return subprocess.run([sys.executable, "-m", "patchgen.cli.export", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--quantize", "int8", "--precision", "fp16"], "exclusive"),
    (["--calibration-data", "emoji"], "applies to --quantize int8 and --precision fp16 only"),
    (["--quantize", "int8"], "cannot load calibration images"),  # the checkpoint's data set is not loadable
    (["--precision", "fp16", "--calibration-data", "{tmp}/no-such-folder"], "cannot load calibration images"),
    (["--quantize", "int4"], "--quantize"),
    (["--int8-activations", "int8"], "applies to --quantize int8 only"),
    (["--quantize", "int8", "--int8-activations", "int4"], "--int8-activations"),
])
def test_cli_bad_input(tmp_path, args, message):
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config())
    before = set(tmp_path.rglob("*"))
    r = run_export(ckpt, "-o", tmp_path / "m.onnx", *[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert set(tmp_path.rglob("*")) == before


def test_signed_int8_activations(tmp_path, folder):
    """--int8-activations int8 (S8S8): int8 zero points throughout, the same parity bound."""
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_config(**CONFIGS["g2-v-selfcond"]), seed=2)
    report = export_onnx(ckpt, tmp_path / "m.onnx", weights="int8", calibration_data=str(folder),
                         int8_activations="int8")
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert "int8" in initializer_types(model) and "uint8" not in initializer_types(model)
    assert report.reduced_parity <= PARITY_RMS_TOLERANCE["int8"]
    with pytest.raises(PatchgenError, match="int8 activations must be one of uint8, int8"):
        export_onnx(ckpt, tmp_path / "n.onnx", weights="int8", calibration_data=str(folder), int8_activations="int4")
    assert not (tmp_path / "n.onnx").exists()


@pytest.mark.quick
def test_unknown_weights_in_the_api(tmp_path):
    with pytest.raises(PatchgenError, match="weights must be one of fp32, fp16, int8"):
        export_onnx(write_checkpoint(tmp_path / "c.pt", tiny_config()), tmp_path / "m.onnx", weights="int4")
