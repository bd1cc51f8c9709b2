"""Self-describing checkpoints: config beside the weights, loadable with torch.load(weights_only=True)."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.files import atomic_output

from .config import ModelConfig, TrainConfig
from .data import DataSource
from .unet import PatchUNet

FORMAT = "patchgen-checkpoint"
VERSION = 1


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
        raise PatchgenError(f"{path} has checkpoint version {ckpt.get('version')}; this patchgen reads version {VERSION}")
    try:
        ckpt["model_config"] = ModelConfig.from_dict(ckpt["model_config"])
        ckpt["train_config"] = TrainConfig.from_dict(ckpt["train_config"])
        ckpt["data"] = DataSource.from_dict(ckpt.get("data") or {})  # stored as a dict
    except (KeyError, TypeError, ValueError) as e:
        raise PatchgenError(f"{path} holds a config this patchgen cannot build: {e}") from None
    return ckpt


def model_from_checkpoint(ckpt: dict, ema: bool = True) -> PatchUNet:
    """The U-Net with the checkpoint's EMA weights (default) or raw weights, in eval mode."""
    net = PatchUNet(ckpt["model_config"])
    try:
        net.load_state_dict(ckpt["ema" if ema else "model"])
    except (KeyError, RuntimeError) as e:
        raise PatchgenError(f"checkpoint weights do not match its config: {str(e).splitlines()[0]}") from None
    return net.eval()
