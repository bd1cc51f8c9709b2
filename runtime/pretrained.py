"""The models shipped inside the package (`patchgen.models.pretrained`, data only), found by name."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Union

from .errors import PatchgenError

DEFAULT_MODEL = "faces64_2x2"  # what patchgen-sample and generate() use when no model is named


def pretrained_dir() -> Path:
    # Package data of patchgen.models, whose __init__ imports nothing (no torch).
    return Path(str(resources.files("patchgen.models").joinpath("pretrained")))


def shipped_models() -> list[str]:
    """Names of the shipped models, sorted: `faces64_2x2`, ..."""
    return sorted(p.stem for p in pretrained_dir().glob("*.onnx"))


def resolve_model(model: Union[str, Path, None]) -> Path:
    """An .onnx path as given, or a shipped model's file from its name (`faces64_2x2`); None: the default.

    A path that exists wins over a shipped name; anything else is a PatchgenError that lists the names."""
    if model is None:
        model = DEFAULT_MODEL
    path = Path(model)
    if path.exists():
        return path
    name = str(model).removesuffix(".onnx")
    shipped = pretrained_dir() / f"{name}.onnx"
    if path.name == str(model) and shipped.is_file():  # a bare name, not a path to a missing file
        return shipped
    raise PatchgenError(f"model {model} does not exist; pass an .onnx file written by patchgen-export or a "
                        f"shipped model: {', '.join(shipped_models()) or 'none in this install'}")
