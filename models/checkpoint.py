"""Self-describing checkpoints: config beside the weights, loadable with torch.load(weights_only=True)."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Optional

import torch

from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.files import atomic_output
from patchgen.runtime.checks import Problems, is_int, shown

from .config import ModelConfig, TrainConfig
from .data import DataSource
from .unet import PatchUNet

FORMAT = "patchgen-checkpoint"
VERSION = 1
CADENCE_LOWEST = {"checkpoint_every": 1, "preview_every": 0}  # steps; preview_every 0 = no previews
RNG_STATE_BYTES = torch.Generator().get_state().numel()  # a CPU generator's state (torch.get_rng_state alike)


def save_checkpoint(path, state: dict) -> None:
    """Write `state` (plus the format tag) atomically: a killed run leaves the previous checkpoint intact."""
    with atomic_output(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)


def load_checkpoint(path) -> dict:
    """Load and validate a checkpoint; every problem becomes one PatchgenError line."""
    path = Path(path)
    if not path.is_file():
        raise PatchgenError(f"checkpoint {path} does not exist; pass the checkpoint.pt a patchgen-train run wrote")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PatchgenError(f"{path} is not a readable checkpoint (truncated or corrupt?): {first[:160]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise PatchgenError(f"{path} is not a patchgen checkpoint (no '{FORMAT}' tag)")
    if ckpt.get("version") != VERSION:
        raise PatchgenError(f"{path} has checkpoint version {shown(ckpt.get('version'))}; this patchgen reads "
                            f"version {VERSION}")
    for key, from_dict in (("model_config", ModelConfig.from_dict), ("train_config", TrainConfig.from_dict),
                           ("data", DataSource.from_dict)):  # each stored as a dict
        try:
            ckpt[key] = from_dict((ckpt.get(key) or {}) if key == "data" else ckpt.get(key))  # data: may be absent
        except (KeyError, TypeError, ValueError) as e:
            message = str(e) if str(e).startswith(key) else f"{key}: {e}"
            raise PatchgenError(f"{path} holds a config this patchgen cannot build: {message}; use a checkpoint "
                                f"that this version of patchgen-train wrote") from None
    problems = entry_problems(ckpt)
    if problems:
        raise PatchgenError(f"{path} holds invalid entries: {problems.message()}; it was damaged or edited: use a "
                            f"checkpoint.pt as patchgen-train wrote it")
    for name in ("model", "ema"):  # before anything is built at the config's size, which the file's weights bound
        mismatch = weights_mismatch(ckpt["model_config"], ckpt[name])
        if mismatch:
            raise PatchgenError(f"{path}: {_mismatch(name, mismatch)}")
    mismatch = optimizer_mismatch(ckpt["optimizer"], ckpt["model"]) if "optimizer" in ckpt else None
    if mismatch:
        raise PatchgenError(f"{path}: {_mismatch('optimizer', mismatch)}")
    return ckpt


def entry_problems(ckpt: dict) -> Problems:
    """What is wrong with the step, cadence, weights, optimizer state, RNG states and data source a checkpoint
    holds, by type and range (the configs check themselves; ckpt holds them built)."""
    problems = Problems()
    problems.integer("step", ckpt.get("step"), 0)
    cadence = ckpt.get("cadence", {})
    if not isinstance(cadence, dict) or any(k not in CADENCE_LOWEST for k in cadence):
        problems.add("cadence", f"must be a table of {' and '.join(CADENCE_LOWEST)}, got {shown(cadence)}")
    else:
        for key, value in cadence.items():
            problems.integer(f"cadence {key}", value, CADENCE_LOWEST[key])
    for name in ("model", "ema"):
        if not _is_tensor_table(ckpt.get(name)):
            problems.add(name, "must be a table of weight tensors")
        elif not all(bool(torch.isfinite(v).all()) for v in ckpt[name].values() if v.is_floating_point()):
            problems.add(name, "holds NaN or infinite weights (a run that diverged, or a damaged file)")
    optimizer = ckpt.get("optimizer")  # absent from a slim copy for export (benchmarks/train_gpu.sh)
    if "optimizer" in ckpt and not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])):
        problems.add("optimizer", "must be an optimizer state (a table of state and param_groups)")
    rng = ckpt.get("rng")
    ranks = rng.get("torch_ranks") if isinstance(rng, dict) else None
    if not (isinstance(rng, dict) and _is_rng_state(rng.get("generator")) and _is_rng_state(rng.get("torch"))
            and (ranks is None or (isinstance(ranks, list) and ranks and all(map(_is_rng_state, ranks))))):
        problems.add("rng", f"must hold generator and torch states ({RNG_STATE_BYTES} bytes each)")
    data, size = ckpt["data"], ckpt["model_config"].image_size  # a resumed run decodes its images at data's size
    if data.image_size is not None and data.image_size != size:
        problems.add("data image_size", f"must be the model's image size {size}, got {shown(data.image_size)}")
    if data.holdout_fraction is not None:
        problems.real("data holdout_fraction", data.holdout_fraction, 0.0, 1.0, high_open=True)
    if data.holdout_seed is not None:
        problems.integer("data holdout_seed", data.holdout_seed, 0, 2**32 - 1)
    return problems


def _is_tensor_table(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _is_rng_state(value) -> bool:
    return (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
            and value.numel() == RNG_STATE_BYTES)


def optimizer_mismatch(optimizer: dict, weights: dict) -> Optional[str]:
    """How an AdamW state differs from the parameters `weights` (a matching state_dict) hold, or None: its
    groups must index them 0 .. n-1 and its moments have their shapes, or a resumed run fails in its first step."""
    shapes = [tuple(v.shape) for v in weights.values()]  # the parameters' order (PatchUNet saves no buffers)
    if [i for group in optimizer["param_groups"] for i in group["params"]] != list(range(len(shapes))):
        return f"its param_groups do not index the {len(shapes)} parameters in order"
    for i, state in optimizer["state"].items():
        if not (is_int(i) and 0 <= i < len(shapes) and isinstance(state, dict)) or any(
                not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != shapes[i]
                for k in ("exp_avg", "exp_avg_sq") if k in state):
            return f"the state of parameter {shown(i)} does not fit its shape"
    return None


def weights_mismatch(config: ModelConfig, weights: dict) -> Optional[str]:
    """How `weights` (a state_dict) differ from the ones `config` builds, by names and shapes, or None. The
    network is built on the meta device: nothing of the config's size is allocated."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PatchUNet(config).state_dict().items()}
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        return (f"missing {', '.join(missing[:3])}" if missing else "") + ("; " if missing and unexpected else "") + \
               (f"unexpected {', '.join(unexpected[:3])}" if unexpected else "")
    for k, shape in expected.items():
        if tuple(weights[k].shape) != shape:
            return f"size mismatch for {k}: {list(weights[k].shape)} in the file, {list(shape)} in the config"
    return None


def _mismatch(what: str, detail: str) -> str:
    return f"checkpoint weights do not match its config ({what}): {detail[:200]}"


def load_weights(module, state_dict, what: str) -> None:
    """module.load_state_dict(state_dict) (a module or an optimizer); a mismatch (a missing or unexpected key,
    a shape) is one PatchgenError line. what: the checkpoint entry, e.g. "model", "ema", "optimizer"."""
    try:
        module.load_state_dict(state_dict)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        # torch: "Error(s) in loading state_dict for PatchUNet:" then one line per problem
        raise PatchgenError(_mismatch(what, lines[1] if len(lines) > 1 else lines[0])) from None


def model_from_checkpoint(ckpt: dict, ema: bool = True) -> PatchUNet:
    """The U-Net with the checkpoint's EMA weights (default) or raw weights, in eval mode."""
    net = PatchUNet(ckpt["model_config"])
    load_weights(net, ckpt["ema" if ema else "model"], "ema" if ema else "model")
    return net.eval()
