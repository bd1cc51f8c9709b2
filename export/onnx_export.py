"""Checkpoint -> one self-describing single-patch ONNX denoiser (the contract in DESIGN.md)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch

from patchgen.models.checkpoint import load_checkpoint, model_from_checkpoint
from patchgen.models.data import DataSource
from patchgen.models.diffusion import EpsDenoiser
from patchgen.models.unet import PatchUNet
from patchgen.runtime.errors import ArgumentError, Phrase
from patchgen.runtime.files import (as_utf8, check_free_space, check_writable_folder, claim, remove_stale_temporaries,
                                    temporary_prefix)
from patchgen.runtime.metadata import patchgen_version, spec_to_metadata
from patchgen.runtime.session import check_openable
from patchgen.runtime.spec import example_feeds

from . import parity, quantize
from .onnx_file import Staged, staged

# Opset 18: the lowest the torch.export-based exporter emits, and read by onnxruntime >= 1.14, which covers
# the older builds shipped for Jetson and Raspberry Pi. GroupNorm lowers to InstanceNormalization + Reshape.
OPSET = 18


def example_inputs(net: PatchUNet, batch: int, rng: np.random.Generator, t: Optional[np.ndarray] = None,
                   first_position: int = 0) -> dict[str, np.ndarray]:
    """Inputs per the contract (`graph_inputs`): x, gcc ~ N(0, 1), pos one-hot from first_position on in turn,
    t as given or uniform in [0, T)."""
    if t is None:
        t = rng.integers(0, net.config.schedule.num_timesteps, batch)
    return example_feeds(net.config.spec, np.asarray(t).reshape(batch), rng, first_position)


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the block ends, then act as usual: torch's exporter catches a
    KeyboardInterrupt raised inside it (even mid-import) and reports it as its own failure, a page long."""
    held, previous = [], {}

    def hold(signum, frame):
        held.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, hold)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


def to_onnx(net: PatchUNet) -> onnx.ModelProto:
    """Export with the torch.export-based exporter (dynamo=True): the maintained path in torch 2.x, where
    the TorchScript exporter is deprecated; it needs no tracing of Python control flow and names the
    inputs after forward()'s arguments. The batch dimension is dynamic."""
    module = EpsDenoiser(net).eval()
    feeds = {k: torch.from_numpy(v) for k, v in example_inputs(net, 2, np.random.default_rng(0)).items()}
    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: {0: batch} for name in feeds}
    x, t = feeds.pop("x"), feeds.pop("t")
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    with _signals_held(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        onnx_logger.setLevel(logging.ERROR)  # e.g. "torchvision is not installed": noise for this model
        try:
            program = torch.onnx.export(module, (x, t), kwargs=feeds, dynamo=True, opset_version=OPSET,
                                        dynamic_shapes=dynamic, output_names=["eps"], verbose=False)
        finally:
            onnx_logger.setLevel(level)
    return program.model_proto


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise ArgumentError("onnxsim could not validate the simplified graph; ", "export with {simplify_graph}",
                            simplify_graph=False)
    return simplified


def _text(value) -> str:
    """A metadata value, valid UTF-8 (`as_utf8`): "" for one the data source does not have (None)."""
    return "" if value is None else as_utf8(str(value))


def metadata(ckpt: dict, ema: bool, weights: str = "fp32") -> dict[str, str]:
    """The file's patchgen.* metadata from a loaded checkpoint (load_checkpoint: configs and DataSource)."""
    config = ckpt["model_config"]
    data = ckpt["data"]
    return {
        **spec_to_metadata(config.spec),
        "patchgen.version": patchgen_version(),
        "patchgen.global_context": str(config.global_context),
        "patchgen.model_config": json.dumps(config.to_dict(), sort_keys=True),
        # how it was trained: lr, loss, batch, and the --recipe the run started from ("" before recipes)
        **({"patchgen.train_config": json.dumps(ckpt["train_config"].to_dict(), sort_keys=True),
            "patchgen.training.recipe": ckpt["train_config"].recipe} if ckpt.get("train_config") else {}),
        "patchgen.weights": "ema" if ema else "raw",
        "patchgen.weights_dtype": weights,  # fp32, fp16 or int8 (export/quantize.py); inputs stay float32
        "patchgen.training.steps": str(ckpt.get("step", 0)),
        "patchgen.data.name": _text(data.name),
        "patchgen.data.num_train": _text(data.num_train),
        "patchgen.data.holdout_fraction": _text(data.holdout_fraction),
        "patchgen.data.holdout_seed": _text(data.holdout_seed),
        "patchgen.data.attribution": _text(data.attribution),
        "patchgen.data.license": _text(data.license),
        "patchgen.opset": str(OPSET),
    }


@dataclass(frozen=True)
class ExportReport:
    path: Path
    inputs: list  # [(name, dtype, shape)] with "batch" for the dynamic dimension
    outputs: list
    parameters: int
    file_bytes: int  # the .onnx file and its external data
    prediction: str  # what the network predicts: "eps", "v" or "x0"
    parity_error: Optional[float]  # parity.max_parity_error; None when the check was skipped
    weights: str = "fp32"  # fp32, fp16 or int8
    reduced_parity: Optional[float] = None  # fp16/int8: parity.parity_rms on fresh realistic windows
    data_path: Optional[Path] = None  # the external-data file beside `path` (a large model), else None


def describe(values) -> list:
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, dims(v))
            for v in values]


# Scratch space an export needs beside its output, in multiples of the fp32 weights: the staged file, or
# int8's scratch (the fp32, pre-processed, calibration-augmented and quantized graphs) and its staged file.
SCRATCH_FACTOR = {"fp32": 1, "fp16": 2, "int8": 5}
ELSEWHERE = Phrase("choose another {output_path}", output_path=None)  # for runtime/files.py's helpers


def check_output_path(path: Path, force: bool, checkpoint=None) -> None:
    """Refuse, before any work, an output that exists (without force), that is the input checkpoint
    itself (even with force), or whose folder cannot be written."""
    if checkpoint is not None and path.exists() and Path(checkpoint).exists() and path.samefile(checkpoint):
        raise ArgumentError(f"{path} is the checkpoint being exported; ", "choose another {output_path}",
                            output_path=None)
    check_openable(path)  # the written file is checked by opening it in onnxruntime
    if path.exists() and not force:
        raise ArgumentError(f"{path} exists; ", "pass {force} to overwrite it", force=True)
    check_writable_folder(path.parent)


def export_onnx(checkpoint_path, output_path, *, ema: bool = True, simplify_graph: bool = True,
                check: bool = True, force: bool = False, weights: str = "fp32",
                calibration_data: Optional[str] = None, int8_activations: str = "uint8") -> ExportReport:
    """Export, simplify, write beside the target, verify the written file against torch, then commit it in one
    rename (onnx_file.py: a large model's weights go to an external-data file). On failure no file is left.

    weights: "fp32", or "fp16" / "int8" for a smaller file under the same contract (export/quantize.py),
    verified after the float32 graph on held-out realistic windows (parity.py). calibration_data: the images
    for int8's calibration and that check (a load_data name: a built-in data set or a folder) instead of the
    checkpoint's own. int8_activations: "uint8" (U8S8, fastest on x86) or "int8" (S8S8), see quantize.py."""
    quantize.check_choices(weights, int8_activations)
    output_path = Path(output_path)
    check_output_path(output_path, force, checkpoint_path)
    folder = output_path.parent
    with claim(folder / f".{output_path.name}.lock", f"{output_path}",
               Phrase(f"another export is writing it: wait for it to end, or {ELSEWHERE.text}", **ELSEWHERE.arguments)):
        check_output_path(output_path, force, checkpoint_path)  # again, under the claim
        for pattern in (output_path.name, output_path.name + ".data"):  # a killed export's, int8 scratch included
            remove_stale_temporaries(folder, pattern)
        ckpt = load_checkpoint(checkpoint_path)
        net = model_from_checkpoint(ckpt, ema=ema)
        fp32_bytes = sum(p.numel() * 4 for p in net.parameters())
        check_free_space(folder, SCRATCH_FACTOR[weights] * fp32_bytes + 16 * 2**20, f"a {weights} export of this "
                         f"model", ELSEWHERE)
        images = _reduced_images(ckpt["data"], net.config.image_size, weights, calibration_data, check)
        model = to_onnx(net)
        if simplify_graph:
            model = simplify(model)
        onnx.helper.set_model_props(model, metadata(ckpt, ema))
        onnx.checker.check_model(model)
        error, final = _write_fp32(net, model, output_path, check, commit=weights == "fp32")
        reduced = None
        if weights != "fp32":
            model = _reduced(net, model, weights, images[0], int8_activations, output_path)
            onnx.helper.set_model_props(model, metadata(ckpt, ema, weights))
            onnx.checker.check_model(model)
            reduced, final = _write_reduced(net, model, output_path, weights, images[1])
        return ExportReport(output_path, describe(model.graph.input), describe(model.graph.output),
                            sum(p.numel() for p in net.parameters()), final.file_bytes, net.config.prediction, error,
                            weights, reduced, final.data)


def _reduced_images(data: DataSource, image_size: int, weights: str, calibration_data: Optional[str],
                    check: bool) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """fp16/int8: (int8's calibration images, the reduced file's parity-check images), each None where not
    needed (`quantize.calibration_images`). Loaded first: a data set that cannot be found fails before any work."""
    if weights == "fp32":
        return None, None

    def images(seed: int, count: int) -> np.ndarray:
        return quantize.calibration_images(data, image_size, calibration_data, count, seed)
    return (images(0, quantize.CALIBRATION_IMAGES) if weights == "int8" else None,
            images(1, quantize.PARITY_IMAGES) if check else None)


def _write_fp32(net: PatchUNet, model: onnx.ModelProto, output_path: Path, check: bool,
                commit: bool) -> tuple[Optional[float], Optional[Staged]]:
    """Stage the float32 graph beside `output_path`, check it against torch from the file, as the runtime opens
    it (`check`: parity.checked_max_error), and commit it (`commit`). (Its parity error, None unchecked; the
    committed Staged, None when not committed.)"""
    error = None
    if check or commit:
        with staged(model, output_path) as fp32:
            if check:
                error = parity.checked_max_error(net, fp32.onnx)
            if commit:
                fp32.commit()
                return error, fp32
    return error, None


def _reduced(net: PatchUNet, model: onnx.ModelProto, weights: str, calibration: Optional[np.ndarray],
             int8_activations: str, output_path: Path) -> onnx.ModelProto:
    """The float32 `model` with fp16 weights, or int8 calibrated on `calibration` images noised at timesteps
    spread over the schedule, its scratch files in the output folder (not $TMPDIR), named as a temporary that
    the next export removes if this one is killed."""
    if weights == "fp16":
        return quantize.to_fp16(model)
    timesteps = parity.spread_timesteps(net.config.schedule.num_timesteps, quantize.CALIBRATION_TIMESTEPS)
    feeds = list(quantize.realistic_feeds(net, calibration, timesteps, seed=0))
    return quantize.to_int8(model, feeds, int8_activations, work_dir=output_path.parent,
                            prefix=temporary_prefix(output_path.name))


def _write_reduced(net: PatchUNet, model: onnx.ModelProto, output_path: Path, weights: str,
                   held_out: Optional[np.ndarray]) -> tuple[Optional[float], Staged]:
    """Stage the fp16/int8 `model`, check it against torch on realistic windows of the `held_out` images (None:
    unchecked; parity.checked_rms), and commit it. (Its RMS parity error or None, the committed Staged.)"""
    error = None
    with staged(model, output_path) as final:
        if held_out is not None:
            timesteps = parity.spread_timesteps(net.config.schedule.num_timesteps, parity.PARITY_TIMESTEPS)
            feeds = list(quantize.realistic_feeds(net, held_out, timesteps, seed=1))
            error = parity.checked_rms(net, final.onnx, weights, feeds)
        final.commit()
    return error, final
