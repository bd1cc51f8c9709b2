"""Checkpoint -> one self-describing single-patch ONNX denoiser (the contract in DESIGN.md)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch

from patchgen.models.checkpoint import load_checkpoint, model_from_checkpoint
from patchgen.models.diffusion import EpsDenoiser
from patchgen.models.unet import PatchUNet
from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.files import (as_utf8, check_free_space, check_writable_folder, claim, remove_stale_temporaries,
                                    temporary_prefix)
from patchgen.runtime.metadata import spec_to_metadata
from patchgen.runtime.schedule import Schedule, alphas_cumprod
from patchgen.runtime.session import check_openable, open_session
from patchgen.runtime.spec import example_feeds

from .onnx_file import staged

# Opset 18: the lowest the torch.export-based exporter emits, and read by onnxruntime >= 1.14, which covers
# the older builds shipped for Jetson and Raspberry Pi. GroupNorm lowers to InstanceNormalization + Reshape.
OPSET = 18
# Max fp32 error of the graph against torch, in the units of what the network predicts (see parity_scale).
PARITY_TOLERANCE = 1e-4
PARITY_TIMESTEPS = 9  # checked timesteps, evenly spread over [0, T) from 0 to T-1


def patchgen_version() -> str:
    try:
        return version("patchgen")
    except PackageNotFoundError:
        return "unknown"


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
        raise PatchgenError("onnxsim could not validate the simplified graph; export with --no-simplify")
    return simplified


def eps_gain(prediction: str, schedule: Schedule) -> np.ndarray:
    """|d eps / d prediction| per timestep [T], float64: how much the graph's conversion to eps scales an
    error in the network's own output (a = sqrt(abar_t), s = sqrt(1 - abar_t))."""
    abar = alphas_cumprod(schedule)
    if prediction == "x0":
        # eps = (x_t - a x0) / s: gain a/s, largest at t = 0 (cosine, T = 1000: ~156).
        return np.sqrt(abar) / np.sqrt(1 - abar)
    if prediction == "v":
        # eps = a v + s x_t: gain a <= 1.
        return np.sqrt(abar)
    return np.ones_like(abar)


def parity_scale(prediction: str, schedule: Schedule) -> np.ndarray:
    """max(eps_gain, 1) per timestep [T]: the divisor that turns |delta eps| into the parity error.

    Gain > 1 (x0 at low t): the conversion multiplies the network's fp32 rounding by the gain (and that of
    x_t - a x0 by 1/s), so dividing it out gives the error in the network's own units. Gain < 1 (v at all t,
    x0 at high t): dividing would magnify the rounding of the conversion itself (s x_t, the 1/s), which is
    no fault of the graph, so the error stays in eps units, what the sampler consumes. A wrong graph is
    wrong at every t and shows at full size where the gain is about 1 (v at low t, x0 at mid t)."""
    return np.maximum(eps_gain(prediction, schedule), 1.0)


def parity_timesteps(num_timesteps: int, count: int = PARITY_TIMESTEPS) -> np.ndarray:
    """The timesteps the parity check runs at: `count` evenly spread over [0, T), always 0 and T-1."""
    # t_k = floor(k (T-1) / (count-1)), k = 0 .. count-1: exact integers, t_0 = 0, t_last = T-1.
    k = np.arange(count, dtype=np.int64)
    return np.unique(k * (num_timesteps - 1) // (count - 1))


def max_parity_error(net: PatchUNet, model_path, batches=(1, 3), seed: int = 0) -> float:
    """max over samples of |eps_onnxruntime - eps_torch| / parity_scale(t): the graph's error in the
    model's own parametrisation. Every batch size runs every parity timestep (deterministic, t = 0 and
    T-1 included), and every patch position is run at least once (positions in turn, then more batches of
    random t until all G*G were seen); x and gcc are drawn from `seed`."""
    c = net.config
    session = open_session(model_path)
    module = EpsDenoiser(net).eval()
    scale = parity_scale(c.prediction, c.schedule)
    rng = np.random.default_rng(seed)
    errors, position = [], 0

    def check(t: np.ndarray) -> None:
        nonlocal position
        feeds = example_inputs(net, len(t), rng, t=t, first_position=position)
        position += len(t)
        with torch.no_grad():
            ref = module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        out = session.run(["eps"], feeds)[0]
        errors.append(np.abs(out - ref).reshape(len(t), -1).max(axis=1) / scale[t])

    ts = parity_timesteps(c.schedule.num_timesteps)
    for b in batches:
        for start in range(0, len(ts), b):
            check(np.resize(ts[start:start + b], b))  # the last batch wraps around to stay b long
    while position < c.grid**2:
        check(rng.integers(0, c.schedule.num_timesteps, max(batches)))
    return float(np.max(np.concatenate(errors)))  # NaN propagates, and fails the check


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
    parity_error: Optional[float]  # max_parity_error (see parity_scale); None when the check was skipped
    weights: str = "fp32"  # fp32, fp16 or int8
    reduced_parity: Optional[float] = None  # fp16/int8: quantize.parity_rms on fresh realistic windows
    data_path: Optional[Path] = None  # the external-data file beside `path` (a large model), else None


def describe(values) -> list:
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, dims(v))
            for v in values]


# Scratch space an export needs beside its output, in multiples of the fp32 weights: the staged file, or
# int8's scratch (the fp32, pre-processed, calibration-augmented and quantized graphs) and its staged file.
SCRATCH_FACTOR = {"fp32": 1, "fp16": 2, "int8": 5}


def check_output_path(path: Path, force: bool, checkpoint=None) -> None:
    """Refuse, before any work, an output that exists (without force), that is the input checkpoint
    itself (even with force), or whose folder cannot be written."""
    if checkpoint is not None and path.exists() and Path(checkpoint).exists() and path.samefile(checkpoint):
        raise PatchgenError(f"{path} is the checkpoint being exported; choose another -o")
    check_openable(path)  # the written file is checked by opening it in onnxruntime
    if path.exists() and not force:
        raise PatchgenError(f"{path} exists; pass --force to overwrite it")
    check_writable_folder(path.parent)


def export_onnx(checkpoint_path, output_path, *, ema: bool = True, simplify_graph: bool = True,
                check: bool = True, force: bool = False, weights: str = "fp32",
                calibration_data: Optional[str] = None, int8_activations: str = "uint8") -> ExportReport:
    """Export, simplify, write beside the target, verify the written file against torch, then commit it in one
    rename (onnx_file.py: a large model's weights go to an external-data file). On failure no file is left.

    weights: "fp32", or "fp16" / "int8" for a smaller file under the same contract (export/quantize.py);
    the float32 graph is verified first, then the reduced one on held-out realistic windows against
    quantize.PARITY_RMS_TOLERANCE. calibration_data: the images for int8's calibration and that check (a
    load_data name: a built-in data set or a folder) instead of the checkpoint's own data set. int8_activations:
    "uint8" (U8S8, fastest on x86) or "int8" (S8S8), see quantize.py."""
    from . import quantize

    if weights not in quantize.WEIGHT_DTYPES:
        raise PatchgenError(f"weights must be one of {', '.join(quantize.WEIGHT_DTYPES)}, got {weights!r}")
    if int8_activations not in quantize.INT8_ACTIVATIONS:
        raise PatchgenError(f"int8 activations must be one of {', '.join(quantize.INT8_ACTIVATIONS)}, "
                            f"got {int8_activations!r}")
    output_path = Path(output_path)
    check_output_path(output_path, force, checkpoint_path)
    folder = output_path.parent
    with claim(folder / f".{output_path.name}.lock", f"{output_path}",
               "another export is writing it: wait for it to end, or choose another -o"):
        check_output_path(output_path, force, checkpoint_path)  # again, under the claim
        for pattern in (output_path.name, output_path.name + ".data"):  # a killed export's, int8 scratch included
            remove_stale_temporaries(folder, pattern)
        ckpt = load_checkpoint(checkpoint_path)
        net = model_from_checkpoint(ckpt, ema=ema)
        config = net.config
        fp32_bytes = sum(p.numel() * 4 for p in net.parameters())
        check_free_space(folder, SCRATCH_FACTOR[weights] * fp32_bytes + 16 * 2**20, f"a {weights} export of this "
                         f"model", "choose another -o")
        if weights != "fp32":  # the images are loaded first: a data set that cannot be found fails before any work
            def images(seed: int, count: int) -> np.ndarray:
                return quantize.calibration_images(ckpt["data"], config.image_size, calibration_data, count, seed)
            calibration = images(0, quantize.CALIBRATION_IMAGES) if weights == "int8" else None
            parity_images = images(1, quantize.PARITY_IMAGES) if check else None
        model = to_onnx(net)
        if simplify_graph:
            model = simplify(model)
        onnx.helper.set_model_props(model, metadata(ckpt, ema))
        onnx.checker.check_model(model)
        error = reduced = None
        prediction = config.prediction
        if weights == "fp32" or check:
            with staged(model, output_path) as fp32:  # checked from a file, as the runtime opens it
                if check:
                    error = max_parity_error(net, fp32.onnx)
                    if not error <= PARITY_TOLERANCE:  # also catches NaN
                        raise PatchgenError(f"parity check failed: max error in the model's own parametrisation "
                                            f"({prediction}) = {error:.3g} > {PARITY_TOLERANCE:g}; "
                                            f"no file written (--skip-check writes it anyway)")
                if weights == "fp32":
                    fp32.commit()
                    final = fp32
        if weights != "fp32":
            if weights == "fp16":
                model = quantize.to_fp16(model)
            else:
                feeds = list(quantize.realistic_feeds(
                    net, calibration, quantize.spread_timesteps(config.schedule.num_timesteps,
                                                                quantize.CALIBRATION_TIMESTEPS), seed=0))
                # in the output folder (not $TMPDIR), named as a temporary that the next export removes if killed
                model = quantize.to_int8(model, feeds, int8_activations, work_dir=output_path.parent,
                                         prefix=temporary_prefix(output_path.name))
            onnx.helper.set_model_props(model, metadata(ckpt, ema, weights))
            onnx.checker.check_model(model)
            with staged(model, output_path) as final:
                if check:
                    held_out = list(quantize.realistic_feeds(net, parity_images,
                                                             parity_timesteps(config.schedule.num_timesteps), seed=1))
                    reduced = quantize.parity_rms(net, final.onnx, held_out)
                    limit = quantize.PARITY_RMS_TOLERANCE[weights]
                    if not reduced <= limit:
                        raise PatchgenError(f"{weights} parity check failed: RMS error in the model's own "
                                            f"parametrisation ({prediction}) = {reduced:.3g} > {limit:g}; no file "
                                            f"written (--skip-check writes it anyway)")
                final.commit()
        return ExportReport(output_path, describe(model.graph.input), describe(model.graph.output),
                            sum(p.numel() for p in net.parameters()), final.file_bytes, prediction, error, weights,
                            reduced, final.data)
