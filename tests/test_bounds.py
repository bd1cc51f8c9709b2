"""Untrusted sizes: ONNX metadata and checkpoint configs out of range are one clear error line (exit code 2 from
the CLIs), refused before anything is allocated at the size they claim."""
from __future__ import annotations

import contextlib
import copy
import math
import resource
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import sample_cli, tiny_config, write_checkpoint
from patchgen.models.checkpoint import load_checkpoint, load_weights, model_from_checkpoint
from patchgen.models.config import MAX_BASE_WIDTH, MAX_BATCH_SIZE, ModelConfig, TrainConfig
from patchgen.models.unet import PatchUNet
from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.metadata import spec_from_metadata, spec_to_metadata
from patchgen.runtime.schedule import MAX_TIMESTEPS, Schedule
from patchgen.runtime.spec import MAX_IMAGE_SIZE, ModelSpec, example_feeds

VALID = spec_to_metadata(ModelSpec(image_size=16, channels=3, grid=2, use_position=True, use_gcc=True))


def one_line(message: str) -> str:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message


# --- ONNX metadata -------------------------------------------------------------------------------------------

def metadata(**overrides) -> dict[str, str]:
    """The valid metadata of a 16x16, 2x2-grid model with keys (without "patchgen.", dots as "__") replaced."""
    return {**VALID, **{"patchgen." + k.replace("__", "."): str(v) for k, v in overrides.items()}}


def write_tiny_onnx(path, meta: dict[str, str]):
    """A graph with the contract's inputs (x [B,C,W,W], t [B], pos [B,G*G], gcc [B,C,P,P]) as `meta` claims
    them, eps = gcc, and `meta` as its metadata. Shapes are only declared: nothing of their size exists."""
    def number(key, default):
        try:
            return max(int(meta["patchgen." + key]), 0)
        except ValueError:
            return default
    image, c, grid, halo = number("image_size", 16), number("channels", 3), number("grid", 2), number("halo", 0)
    p = image // grid if grid else 1
    w = p + 2 * halo
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", f, ["batch", c, w, w]),
              helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"]),
              helper.make_tensor_value_info("pos", f, ["batch", grid * grid]),
              helper.make_tensor_value_info("gcc", f, ["batch", c, p, p])]
    graph = helper.make_graph([helper.make_node("Identity", ["gcc"], ["eps"])], "tiny", inputs,
                              [helper.make_tensor_value_info("eps", f, ["batch", c, p, p])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, meta)
    onnx.save(model, str(path))
    return path


BAD_METADATA = [  # (id, overrides, the key the error names, what it says)
    ("image 10^6 grid 62500", dict(image_size=10**6, grid=62500, patch_size=16), "patchgen.image_size",
     f"between 1 and {MAX_IMAGE_SIZE}"),
    ("halo 10^5", dict(halo=10**5), "patchgen.halo", "at most the patch size 8"),
    ("halo -1", dict(halo=-1), "patchgen.halo", ">= 0"),
    ("T 10^9", dict(schedule__num_timesteps=10**9), "patchgen.schedule.num_timesteps", f"at most {MAX_TIMESTEPS}"),
    ("T 1", dict(schedule__num_timesteps=1), "patchgen.schedule.num_timesteps", "at least 2"),
    ("T abc", dict(schedule__num_timesteps="abc"), "patchgen.schedule.num_timesteps", "must be an integer"),
    ("T 1000.0", dict(schedule__num_timesteps="1000.0"), "patchgen.schedule.num_timesteps", "must be an integer"),
    ("channels 0", dict(channels=0), "patchgen.channels", "between 1 and 4"),
    ("channels 5", dict(channels=5), "patchgen.channels", "between 1 and 4"),
    ("image 1e3", dict(image_size="1e3"), "patchgen.image_size", "must be an integer"),
    ("image 1_6", dict(image_size="1_6"), "patchgen.image_size", "must be an integer"),
    ("image empty", dict(image_size=""), "patchgen.image_size", "must be an integer"),
    ("grid 0", dict(grid=0), "patchgen.grid", ">= 1"),
    ("grid 3", dict(grid=3), "patchgen.grid", "does not divide"),
    ("grid 62500", dict(grid=62500), "patchgen.grid", "at most the image size"),
    ("patch size", dict(patch_size=4), "patchgen.patch_size", "does not agree"),
    ("cosine_s nan", dict(schedule__cosine_s="nan"), "patchgen.schedule.cosine_s", "finite number"),
    ("max_beta inf", dict(schedule__max_beta="inf"), "patchgen.schedule.max_beta", "finite number"),
    ("beta_end abc", dict(schedule__beta_end="abc"), "patchgen.schedule.beta_end", "finite number"),
    ("beta_start 0", dict(schedule__beta_start="0"), "patchgen.schedule.beta_start", "(0, 1)"),
    ("kind", dict(schedule__kind="sigmoid"), "patchgen.schedule.kind", "one of cosine, linear"),
    ("gcc flag", dict(gcc="1"), "patchgen.gcc", "true or false"),
    ("gcc source", dict(gcc_source="noise"), "patchgen.gcc_source", "one of xt, x0"),
    ("prediction", dict(prediction="score"), "patchgen.prediction", "one of eps, v, x0"),
    ("long value", dict(image_size="9" * 5000), "patchgen.image_size", "..."),
]


@pytest.mark.quick
@pytest.mark.parametrize("overrides,key,text", [case[1:] for case in BAD_METADATA],
                         ids=[case[0] for case in BAD_METADATA])
def test_spec_from_metadata_refuses(overrides, key, text):
    with pytest.raises(PatchgenError) as e:
        spec_from_metadata(metadata(**overrides), source="m.onnx")
    message = one_line(str(e.value))
    assert message.startswith("m.onnx ") and key in message and text in message and len(message) < 300, message


@pytest.mark.quick
def test_spec_from_metadata_reads_what_it_wrote():
    spec = ModelSpec(image_size=64, channels=4, grid=4, use_position=True, use_gcc=False, halo=16,
                     schedule=Schedule(kind="linear", num_timesteps=MAX_TIMESTEPS))
    assert spec_from_metadata(spec_to_metadata(spec)) == spec
    assert spec_from_metadata(metadata(channels=1)).channels == 1


def test_a_schedule_past_max_timesteps_is_refused_before_any_array():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"num_timesteps must be at most {MAX_TIMESTEPS}"):
        Schedule(num_timesteps=10**9)
    assert time.perf_counter() - t0 < 0.1


@pytest.mark.quick
@pytest.mark.parametrize("kwargs,message", [
    (dict(num_timesteps=1000.0), "num_timesteps must be an integer"),
    (dict(num_timesteps=True), "num_timesteps must be an integer"),
    (dict(num_timesteps="1000"), "num_timesteps must be an integer"),
    (dict(cosine_s=math.nan), "cosine_s must be a finite number"),
    (dict(max_beta=math.inf), "max_beta must be a finite number"),
    (dict(kind="linear", beta_end=-0.5), r"beta_end must be in \(0, 1\)"),
    (dict(kind=3), "unknown schedule kind"),
])
def test_schedule_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


@pytest.mark.quick
def test_one_hot_positions_take_one_row_per_patch():
    """A 256x256 grid: the probe's pos rows are [b, 65536], never a 65536^2 identity (16 GiB)."""
    spec = ModelSpec(image_size=256, channels=1, grid=256, use_position=True, use_gcc=False)
    pos = example_feeds(spec, np.zeros(3), np.random.default_rng(0), first_position=65535)["pos"]
    assert pos.shape == (3, 65536) and pos.sum() == 3 and pos[0, 65535] == pos[1, 0] == pos[2, 1] == 1


@pytest.mark.parametrize("overrides,key,text", [
    case[1:] for case in BAD_METADATA if case[0] in ("image 10^6 grid 62500", "halo 10^5", "T 10^9", "channels 0",
                                                     "channels 5", "T abc", "image 1e3", "cosine_s nan")])
def test_patchgen_sample_refuses_bad_metadata(tmp_path, overrides, key, text):
    model = write_tiny_onnx(tmp_path / "m.onnx", metadata(**overrides))
    r = sample_cli("--model", model, "--out", tmp_path / "out", "--steps", 2, timeout=120)
    assert r.returncode == 2, r.stderr
    assert one_line(r.stderr) and key in r.stderr and text in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_tiny_graph_samples_with_valid_metadata(tmp_path):
    """The graph the refusals use is a working model when its metadata is valid."""
    r = sample_cli("--model", write_tiny_onnx(tmp_path / "m.onnx", VALID), "-n", 1, "--out", tmp_path / "out",
                   "--steps", 2, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


@contextlib.contextmanager
def address_space_limit(limit: int):
    """Processes started inside get at most `limit` bytes of address space: a test that fails still fails with
    a MemoryError rather than filling this machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_an_image_no_memory_holds_is_refused_before_sampling(tmp_path):
    """The largest image the bounds allow (a 2x2 grid, no halo, T 1000): valid metadata, but one float32 image
    of it is 48 GiB. The check that the image buffers fit the memory the process can have refuses it
    (generate.check_fits), before any of it is allocated."""
    model = write_tiny_onnx(tmp_path / "m.onnx", metadata(image_size=MAX_IMAGE_SIZE, patch_size=MAX_IMAGE_SIZE // 2))
    with address_space_limit(8 * 2**30):
        r = sample_cli("--model", model, "--out", tmp_path / "out", "--steps", 2, timeout=120)
    assert r.returncode == 2, r.stderr
    assert one_line(r.stderr) and "the image buffers" in r.stderr and not (tmp_path / "out").exists()


# --- Checkpoints ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_dict(tmp_path_factory):
    """A tiny model's checkpoint as torch.load(weights_only=True) reads it."""
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", tiny_config())
    return torch.load(path, weights_only=True)


DELETE = object()


def edited(checkpoint_dict, path, edits) -> str:
    """Save a copy of the checkpoint with each (key path, value) of `edits` set (DELETE: removed)."""
    ckpt = copy.deepcopy(checkpoint_dict)
    for keys, value in edits:
        *parents, last = keys
        table = ckpt
        for k in parents:
            table = table[k]
        if value is DELETE:
            del table[last]
        else:
            table[last] = value
    torch.save(ckpt, path)
    return path


M, TC = "model_config", "train_config"
BAD_CHECKPOINTS = [  # (id, [(key path, value)], what the error says)
    ("dropout 5", [((M, "dropout"), 5)], "dropout must be in [0, 1)"),
    ("dropout nan", [((M, "dropout"), math.nan)], "dropout must be a finite number"),
    ("base_width 10^6", [((M, "base_width"), 10**6)], f"base_width must be between 8 and {MAX_BASE_WIDTH}"),
    ("base_width 12", [((M, "base_width"), 12)], "multiple of 8"),
    ("grid 10^5", [((M, "grid"), 10**5)], "grid must be at most the image size 16"),
    ("halo 10^6", [((M, "halo"), 10**6)], "halo must be at most the patch size 8 (a patch reads at most"),
    ("halo 10^400", [((M, "halo"), 10**400)], "direct neighbours), got an integer of about 401 digits"),
    ("num_res_blocks 10^5", [((M, "num_res_blocks"), 10**5)], "num_res_blocks must be between 1 and 16"),
    ("channel_mults 9 levels", [((M, "channel_mults"), [1] * 9)], "channel_mults must have between 1 and 8"),
    ("channel_mults 10^4", [((M, "channel_mults"), [1, 10**4])], "channel_mults entries must be integers"),
    ("channel_mults int", [((M, "channel_mults"), 2)], "channel_mults must be a list of integers"),
    ("attention_heads 3", [((M, "attention_heads"), 3)], "attention_heads 3 must divide the width"),
    ("attention_heads 0", [((M, "attention_heads"), 0)], "attention_heads must be >= 1"),
    ("channels 5", [((M, "channels"), 5)], "channels must be between 1 and 4"),
    ("image_size float", [((M, "image_size"), 16.0)], "image_size must be an integer, got 16.0"),
    ("grid str", [((M, "grid"), "2")], "grid must be an integer, got '2'"),
    ("use_gcc int", [((M, "use_gcc"), 1)], "use_gcc must be true or false, got 1"),
    ("T 10^9", [((M, "schedule", "num_timesteps"), 10**9)], f"num_timesteps must be at most {MAX_TIMESTEPS}"),
    ("cosine_s inf", [((M, "schedule", "cosine_s"), math.inf)], "cosine_s must be a finite number"),
    ("schedule key", [((M, "schedule", "sigma"), 1.0)], "model_config.schedule: unknown keys 'sigma'"),
    ("model_config key", [((M, "width"), 64)], "model_config: unknown keys 'width'"),
    ("model_config list", [((M,), [1, 2])], "model_config: must be a table"),
    ("no model_config", [((M,), DELETE)], "model_config: must be a table"),
    ("train_config key", [((TC, "momentum"), 0.9)], "train_config: unknown keys 'momentum'"),
    ("lr nan", [((TC, "lr"), math.nan)], "lr must be a finite number"),
    ("lr 0", [((TC, "lr"), 0.0)], "lr must be in (0, 1], got 0"),
    ("lr str", [((TC, "lr"), "2e-4")], "lr must be a finite number, got '2e-4'"),
    ("batch_size 10^9", [((TC, "batch_size"), 10**9)], f"batch_size must be between 1 and {MAX_BATCH_SIZE}"),
    ("batch_size float", [((TC, "batch_size"), 16.0)], "batch_size must be an integer"),
    ("weight_decay -1", [((TC, "weight_decay"), -1.0)], "weight_decay must be in [0, 1]"),
    ("grad_clip 0", [((TC, "grad_clip"), 0)], "grad_clip must be > 0, got 0"),
    ("ema_decay 1.5", [((TC, "ema_decay"), 1.5)], "ema_decay must be in [0, 1]"),
    ("min_snr_gamma inf", [((TC, "min_snr_gamma"), math.inf)], "min_snr_gamma must be a finite number"),
    ("warmup_steps -1", [((TC, "warmup_steps"), -1)], "warmup_steps must be >= 0"),
    ("patches_per_image -1", [((TC, "patches_per_image"), -1)], "patches_per_image must be >= 0"),
    ("seed bool", [((TC, "seed"), True)], "seed must be an integer, got True"),
    ("loss", [((TC, "loss"), "l3")], "loss must be one of l1, l2"),
    ("step -5", [(("step",), -5)], "step must be >= 0, got -5"),
    ("step float", [(("step",), 5.0)], "step must be an integer"),
    ("no step", [(("step",), DELETE)], "step must be an integer, got None"),
    ("cadence 0", [(("cadence", "checkpoint_every"), 0)], "cadence checkpoint_every must be >= 1"),
    ("cadence key", [(("cadence", "eval_every"), 5)], "cadence must be a table of checkpoint_every and"),
    ("no ema", [(("ema",), DELETE)], "ema must be a table of weight tensors"),
    ("model not tensors", [(("model", "conv_in.weight"), [1.0])], "model must be a table of weight tensors"),
    ("optimizer list", [(("optimizer",), [])], "optimizer must be an optimizer state"),
    ("rng short", [(("rng", "generator"), torch.zeros(8, dtype=torch.uint8))], "rng must hold generator and torch"),
    ("no rng", [(("rng",), DELETE)], "rng must hold"),
    ("data image_size", [(("data", "image_size"), 10**6)], "data image_size must be the model's image size 16"),
    ("data holdout", [(("data", "holdout_fraction"), math.nan)], "data holdout_fraction must be a finite number"),
    ("weights of another config", [((M, "base_width"), 16)],
     "checkpoint weights do not match its config (model): size mismatch for"),
    ("a weight missing", [(("ema", "conv_in.weight"), DELETE)],
     "checkpoint weights do not match its config (ema): missing conv_in.weight"),
    ("optimizer moments", [(("optimizer", "state", 0), {"step": torch.tensor(1.0), "exp_avg": torch.zeros(1),
                                                          "exp_avg_sq": torch.zeros(1)})],
     "checkpoint weights do not match its config (optimizer): the state of parameter 0"),
    ("optimizer params", [(("optimizer", "param_groups", 0, "params"), [0, 1])],
     "checkpoint weights do not match its config (optimizer): its param_groups"),
]


@pytest.mark.parametrize("edits,text", [case[1:] for case in BAD_CHECKPOINTS], ids=[c[0] for c in BAD_CHECKPOINTS])
def test_load_checkpoint_refuses(checkpoint_dict, tmp_path, edits, text):
    path = edited(checkpoint_dict, tmp_path / "checkpoint.pt", edits)
    with pytest.raises(PatchgenError) as e:
        load_checkpoint(path)
    message = one_line(str(e.value))
    assert message.startswith(str(path)) and text in message and len(message) < 400, message


@pytest.mark.quick
def test_a_written_checkpoint_loads(checkpoint_dict, tmp_path):
    ckpt = load_checkpoint(edited(checkpoint_dict, tmp_path / "checkpoint.pt", []))
    assert ckpt["model_config"] == tiny_config() and ckpt["step"] == 0
    model_from_checkpoint(ckpt)


@pytest.mark.quick
def test_configs_accept_the_bounds_and_what_the_cli_accepts():
    """The extremes the bounds allow build; so do the CLI's own ranges (cli/train.py) within reason."""
    ModelConfig(image_size=MAX_IMAGE_SIZE, grid=256, base_width=MAX_BASE_WIDTH, channel_mults=(1, 16, 16),
                num_res_blocks=16, attention_heads=8, dropout=0.99, halo=MAX_IMAGE_SIZE // 256)
    ModelConfig(image_size=4, grid=1, use_position=False, channel_mults=(1,), attention_resolutions=(), channels=1)
    ModelConfig(schedule=Schedule(kind="linear", num_timesteps=MAX_TIMESTEPS))
    TrainConfig(batch_size=MAX_BATCH_SIZE, lr=1.0, ema_decay=0.0, warmup_steps=0, patches_per_image=10**6,
                seed=2**32 - 1)
    TrainConfig(ema_decay=1, lr=1, weight_decay=0, grad_clip=1e9, min_snr_gamma=0.5)
    assert ModelConfig.from_dict(tiny_config().to_dict()) == tiny_config()
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


@pytest.mark.quick
def test_load_weights_words_a_mismatch_as_one_line():
    net = PatchUNet(tiny_config())
    other = PatchUNet(tiny_config(base_width=16)).state_dict()
    with pytest.raises(PatchgenError, match=r"^checkpoint weights do not match its config \(ema\): size mismatch "
                                            r"for \S+: copying a param"):
        load_weights(net, other, "ema")
    with pytest.raises(PatchgenError, match=r"^checkpoint weights do not match its config \(model\): Missing"):
        load_weights(net, {k: v for k, v in net.state_dict().items() if k != "conv_in.weight"}, "model")
    optimizer = torch.optim.AdamW(net.parameters())
    with pytest.raises(PatchgenError, match=r"^checkpoint weights do not match its config \(optimizer\): "):
        load_weights(optimizer, torch.optim.AdamW(PatchUNet(tiny_config(num_res_blocks=2)).parameters())
                     .state_dict(), "optimizer")
    load_weights(net, net.state_dict(), "model")


def test_model_from_checkpoint_words_a_mismatch_as_one_line(checkpoint_dict, tmp_path):
    ckpt = load_checkpoint(edited(checkpoint_dict, tmp_path / "checkpoint.pt", []))
    ckpt["ema"] = PatchUNet(tiny_config(base_width=16)).state_dict()  # past load_checkpoint's own check
    with pytest.raises(PatchgenError, match=r"^checkpoint weights do not match its config \(ema\): size mismatch"):
        model_from_checkpoint(ckpt)


@pytest.mark.parametrize("edits", [[((M, "dropout"), 5)], [((M, "base_width"), 10**6)], [(("step",), -5)]],
                         ids=["dropout 5", "base_width 10^6", "step -5"])
def test_patchgen_export_refuses_a_bad_checkpoint(checkpoint_dict, tmp_path, edits):
    path = edited(checkpoint_dict, tmp_path / "checkpoint.pt", edits)
    r = subprocess.run([sys.executable, "-m", "patchgen.cli.export", str(path), "-o", str(tmp_path / "m.onnx")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert one_line(r.stderr).startswith("Error: ") and str(path) in r.stderr
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("channels,mode", [(1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")])
def test_every_channel_count_a_png_holds_samples(tmp_path, channels, mode):
    """The channel counts the metadata may claim are the ones a PNG holds, and each writes one."""
    from PIL import Image

    model = write_tiny_onnx(tmp_path / "m.onnx", metadata(channels=channels))
    r = sample_cli("--model", model, "-n", 2, "--steps", 1, "--out", tmp_path / "out", "--grid-image",
                   tmp_path / "grid.png")
    assert r.returncode == 0, r.stderr
    assert {Image.open(p).mode for p in [*(tmp_path / "out").glob("*.png"), tmp_path / "grid.png"]} == {mode}
