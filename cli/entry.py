"""The console scripts. `patchgen-train` and `patchgen-export` need the `train` and `export` extras (torch,
onnx, ...); an edge install has only what `patchgen-sample` needs, so they check for their extra first and say
how to install it, in one line with exit code 2, instead of a ModuleNotFoundError traceback."""
from __future__ import annotations

import importlib.util
import sys

# What each command imports beyond the edge install, and the extra that brings it (pyproject.toml).
NEEDS = {"patchgen-train": ("train", ("torch",)), "patchgen-export": ("export", ("torch", "onnx"))}


def missing(modules) -> list[str]:
    """The modules of `modules` that cannot be imported here."""
    gone = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            gone.append(name)
    return gone


def _require(command: str) -> None:
    extra, modules = NEEDS[command]
    gone = missing(modules)
    if gone:
        print(f"Error: {command} needs the {extra} extra ({', '.join(gone)} not installed): "
              f"pip install 'patchgen[{extra}]'", file=sys.stderr)
        raise SystemExit(2)


def train() -> None:
    _require("patchgen-train")
    from .train import main

    main()


def export() -> None:
    _require("patchgen-export")
    from .export import main

    main()
