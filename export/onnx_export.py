"""Checkpoint -> one self-describing single-patch ONNX denoiser (the contract in DESIGN.md)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
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
from patchgen.runtime.files import atomic_output, check_writable_folder
from patchgen.runtime.metadata import spec_to_metadata
from patchgen.runtime.session import open_session

# Opset 18: the lowest the torch.export-based exporter emits, and read by onnxruntime >= 1.14, which covers
# the older builds shipped for Jetson and Raspberry Pi. GroupNorm lowers to InstanceNormalization + Reshape.
OPSET = 18
PARITY_TOLERANCE = 1e-4  # max |eps_onnx - eps_torch| in fp32


def patchgen_version() -> str:
    try:
        return version("patchgen")
    except PackageNotFoundError:
        return "unknown"


def input_names(net: PatchUNet) -> list[str]:
    """The graph inputs, in order: x and t always, pos and gcc only when the model has them."""
    c = net.config
    return ["x", "t"] + (["pos"] if c.use_position else []) + (["gcc"] if c.use_gcc else [])


def example_inputs(net: PatchUNet, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs per the contract: x, gcc ~ N(0, 1), t uniform in [0, T), pos one-hot."""
    c = net.config
    p, g2 = c.patch_size, c.grid**2
    feeds = {"x": rng.standard_normal((batch, c.channels, p, p), dtype=np.float32),
             "t": rng.integers(0, c.schedule.num_timesteps, batch).astype(np.int64)}
    if c.use_position:
        feeds["pos"] = np.eye(g2, dtype=np.float32)[rng.integers(0, g2, batch)]
    if c.use_gcc:
        feeds["gcc"] = rng.standard_normal((batch, c.channels, p, p), dtype=np.float32)
    return feeds


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
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
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


def max_parity_error(net: PatchUNet, model_bytes: bytes, batches=(1, 3), seed: int = 0) -> float:
    """max |eps_onnxruntime - eps_torch| over random inputs at each batch size."""
    session = open_session(model_bytes)
    module = EpsDenoiser(net).eval()
    rng = np.random.default_rng(seed)
    worst = 0.0
    for b in batches:
        feeds = example_inputs(net, b, rng)
        with torch.no_grad():
            ref = module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        out = session.run(["eps"], feeds)[0]
        worst = max(worst, float(np.abs(out - ref).max()))
    return worst


def metadata(ckpt: dict, ema: bool) -> dict[str, str]:
    config = ckpt["model_config"]
    data = ckpt.get("data", {})
    return {
        **spec_to_metadata(config.spec),
        "patchgen.version": patchgen_version(),
        "patchgen.global_context": str(config.global_context),
        "patchgen.model_config": json.dumps(config.to_dict(), sort_keys=True),
        "patchgen.weights": "ema" if ema else "raw",
        "patchgen.training.steps": str(ckpt.get("step", 0)),
        "patchgen.data.name": str(data.get("name", "")),
        "patchgen.data.num_train": str(data.get("num_train", "")),
        "patchgen.data.holdout_fraction": str(data.get("holdout_fraction", "")),
        "patchgen.data.holdout_seed": str(data.get("holdout_seed", "")),
        "patchgen.data.attribution": str(data.get("attribution", "")),
        "patchgen.data.license": str(data.get("license", "")),
        "patchgen.opset": str(OPSET),
    }


@dataclass(frozen=True)
class ExportReport:
    path: Path
    inputs: list  # [(name, dtype, shape)] with "batch" for the dynamic dimension
    outputs: list
    parameters: int
    file_bytes: int
    max_abs_diff: Optional[float]  # None when the check was skipped


def describe(values) -> list:
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, dims(v))
            for v in values]


def check_output_path(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise PatchgenError(f"{path} exists; pass --force to overwrite it")
    check_writable_folder(path.parent)


def export_onnx(checkpoint_path, output_path, *, ema: bool = True, simplify_graph: bool = True,
                check: bool = True, force: bool = False) -> ExportReport:
    """Export, simplify, verify against torch, then write atomically. On failure no file is left."""
    output_path = Path(output_path)
    check_output_path(output_path, force)
    ckpt = load_checkpoint(checkpoint_path)
    net = model_from_checkpoint(ckpt, ema=ema)
    model = to_onnx(net)
    if simplify_graph:
        model = simplify(model)
    onnx.helper.set_model_props(model, metadata(ckpt, ema))
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    diff = None
    if check:
        diff = max_parity_error(net, data)
        if not diff <= PARITY_TOLERANCE:
            raise PatchgenError(f"parity check failed: max |eps_onnx - eps_torch| = {diff:.3g} > {PARITY_TOLERANCE:g}; "
                                f"no file written (--skip-check writes it anyway)")
    with atomic_output(output_path) as f:
        f.write(data)
    return ExportReport(output_path, describe(model.graph.input), describe(model.graph.output),
                        sum(p.numel() for p in net.parameters()), len(data), diff)
