"""Smaller weights under the same ONNX contract: fp16 weights, or static int8 (QDQ) quantization.

Both keep the graph's inputs (x, t, pos, gcc) and output (eps) float32 as exported, so the runtime runs them
unchanged; the file says which it is in `patchgen.weights_dtype`.

- fp16: onnxconverter-common's float16 conversion with float32 inputs and outputs (Cast nodes at the
  edges). onnxruntime's CPU provider has few fp16 kernels, so on a CPU it casts back around most nodes:
  the file halves, the arithmetic does not get faster (benchmarks/precision.py measures it).
- int8: onnxruntime.quantization's static QDQ quantization, per-channel signed int8 weights, MinMax ranges,
  and unsigned (U8S8, the default) or signed (S8S8) int8 activations. On x86, onnxruntime fuses every
  U8S8 convolution into QLinearConv, but leaves some S8S8 ones in float32 between Q/DQ pairs
  (benchmarks/results/precision.md: 62 of 62 against 49, and U8S8 is the faster); with VNNI, U8S8 has no
  saturation problem. On ARM64 both have int8 dot-product kernels; try S8S8 there
  (--int8-activations int8). Only the weight-carrying ops (Conv, MatMul, Gemm) are quantized: the schedule
  lookup and the conversion of the network's prediction to eps (a division by sqrt(1 - abar_t), large near
  t = 0) stay float32. Dynamic quantization is not offered: onnxruntime's dynamic path
  quantizes MatMul only and leaves convolutions, nearly all of this U-Net, in float32.

The ranges are calibrated on what the network sees while sampling: training images noised at timesteps
spread over the whole schedule, cut into windows at every patch position, with their GCC and one-hot
positions, exactly as in training (`patchgen.models.diffusion.gcc_input` and `patch_inputs`).
"""
from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import onnx
import torch

from patchgen.models.data import DATA_SETS, DataSource, holdout_split, load_data, load_named, to_model_range
from patchgen.models.diffusion import draw_self_condition, gcc_input, patch_inputs, q_sample, schedule_coefficients
from patchgen.models.unet import PatchUNet
from patchgen.runtime.errors import ArgumentError, PatchgenError

WEIGHT_DTYPES = ("fp32", "fp16", "int8")
INT8_ACTIVATIONS = ("uint8", "int8")  # U8S8 (default) or S8S8
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]
CALIBRATION_IMAGES = 16  # training images; each is noised at every calibration timestep
CALIBRATION_TIMESTEPS = 16  # parity.spread_timesteps over [0, T)
CALIBRATION_POSITIONS = 4  # windows per (image, timestep), at random positions: 1024 windows in all
PARITY_IMAGES = 8  # other training images (another seed), for the parity check of the reduced file (parity.py)
CALIBRATION_BATCH = 16  # windows per calibration call (bounds the calibrator's memory)


def check_choices(weights: str, int8_activations: str = "uint8") -> None:
    """Refuse, with one PatchgenError line, `weights` not in WEIGHT_DTYPES or `int8_activations` not in
    INT8_ACTIVATIONS."""
    if weights not in WEIGHT_DTYPES:
        raise PatchgenError(f"weights must be one of {', '.join(WEIGHT_DTYPES)}, got {weights!r}")
    if int8_activations not in INT8_ACTIVATIONS:
        raise PatchgenError(f"int8 activations must be one of {', '.join(INT8_ACTIVATIONS)}, "
                            f"got {int8_activations!r}")


def calibration_images(data: DataSource, image_size: int, calibration_data: Optional[str], count: int,
                       seed: int) -> np.ndarray:
    """float32 [count, C, H, W] in [-1, 1]: training images of the checkpoint's data set (its training split),
    or of `calibration_data` (a built-in data set such as emoji-faces, or a folder) when given. The same `seed` picks the same
    images; when a data set has fewer than `count`, all of them."""
    try:
        if calibration_data is not None:
            images = load_data(calibration_data, image_size).images
        else:
            images = load_named(data.name, image_size).images
            if data.holdout_fraction is not None:
                train, _ = holdout_split(len(images), data.holdout_fraction, data.holdout_seed)
                images = images[train]
    except (PatchgenError, OSError, ValueError) as e:
        why = e if isinstance(e, ArgumentError) else ArgumentError(str(e), "")  # its arguments stay arguments
        raise ArgumentError(f"cannot load calibration images ({why.problem}", why.fix + "); pass {calibration_data} "
                            f"with one of {', '.join(DATA_SETS)} or a folder of images", **why.arguments,
                            calibration_data=None) from None
    if len(images) == 0:
        raise ArgumentError("no calibration images; ", "pass {calibration_data} with a folder of images",
                            calibration_data=None)
    pick = np.random.default_rng(seed).choice(len(images), min(count, len(images)), replace=False)
    return to_model_range(images[np.sort(pick)])


def realistic_feeds(net: PatchUNet, images: np.ndarray, timesteps: np.ndarray, seed: int,
                    positions: int = CALIBRATION_POSITIONS,
                    batch: int = CALIBRATION_BATCH) -> Iterator[dict[str, np.ndarray]]:
    """Graph inputs as sampling meets them: each image noised to x_t at each timestep (fresh noise from
    `seed`), GCC as in training, then `positions` of its windows (random, without repeats; all of them
    when the grid has no more) with their one-hot positions; `batch` windows per dict."""
    config = net.config
    gen = torch.Generator().manual_seed(seed)
    sqrt_abar, sqrt_1m_abar = schedule_coefficients(config.schedule)
    x0 = torch.from_numpy(images)
    g2 = config.grid**2
    for t_value in timesteps:
        t = torch.full((len(x0),), int(t_value), dtype=torch.long)
        x_t = q_sample(x0, t, torch.randn(x0.shape, generator=gen), sqrt_abar, sqrt_1m_abar)
        with torch.no_grad():
            gcc = gcc_input(net, x_t, t, draw_self_condition(config, gen))
        k = min(positions, g2)
        index = torch.rand(len(x0), g2, generator=gen).argsort(dim=1)[:, :k]
        windows, pos, gcc_p = patch_inputs(config, x_t, gcc, index)
        tp = t.repeat_interleave(k)
        for start in range(0, len(tp), batch):
            part = slice(start, start + batch)
            feeds = {"x": windows[part], "t": tp[part], "pos": pos[part] if pos is not None else None,
                     "gcc": gcc_p[part] if gcc_p is not None else None}
            yield {k: v.numpy().astype(np.int64 if k == "t" else np.float32) for k, v in feeds.items()
                   if v is not None}


def timestep_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes computed from `t` and constants alone: the timestep embedding, its MLP and the
    schedule lookups. In fp16 the embedding's sin(t * f) would be lost (t up to 999 is spaced 0.5 apart
    there); these nodes act on one vector per patch, so keeping them float32 costs nothing."""
    derived = {"t"} | {i.name for i in model.graph.initializer}
    names = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if all(not i or i in derived for i in node.input):
            derived.update(node.output)
            names.append(node.name)
    return names


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and arithmetic, float32 inputs and outputs and timestep path (onnxconverter-common)."""
    from onnxconverter_common import float16

    with warnings.catch_warnings():  # "the float32 number -5.96e-08 will be truncated to -1e-07": harmless here
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=timestep_nodes(model))


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


@contextlib.contextmanager
def _temporaries_in(folder: str) -> Iterator[None]:
    """Point `tempfile` (onnxruntime.quantization makes its own temporary folders with it) into `folder`
    for the block, so that everything int8 writes is inside one temporary that the next export removes if
    this one is killed (`files.remove_stale_temporaries`), never left in $TMPDIR."""
    previous = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield
    finally:
        tempfile.tempdir = previous


def to_int8(model: onnx.ModelProto, feeds: list[dict], activations: str = "uint8", work_dir: Optional[Path] = None,
            prefix: str = "patchgen-int8-") -> onnx.ModelProto:
    """Static QDQ int8 (per-channel int8 weights, MinMax) of the weight-carrying ops, calibrated on `feeds`;
    `activations` "uint8" (U8S8) or "int8" (S8S8). Its intermediate files go to a temporary folder in
    `work_dir` (None: the system's), named `prefix`..."""
    check_choices("int8", activations)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix=prefix, suffix=".tmp", dir=work_dir) as tmp, _temporaries_in(tmp):
        plain, prepared, quantized = (Path(tmp) / n for n in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        onnx.save(model, str(plain))
        quant_pre_process(str(plain), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), _Reader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
                        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        # Not CalibMaxIntermediateOutputs: in onnxruntime 1.32 MinMaxCalibrater.collect_data clears each full
        # chunk without folding it into the ranges. MinMax keeps only per-tensor min/max per call, so all
        # 64 calls fit in memory anyway.
        return onnx.load(str(quantized))
