"""How training turns image sources into pixels: which files are images (`image_suffixes`), one source to
uint8 [S, S, 3] (`decode_one`, through the viewer-faithful functions of patchgen.runtime.decode that the
runtime's image editing also uses), and the settings of a data set's decoding (`Decoding`: the image cache
and the decoder processes, which cache.py runs)."""
from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from patchgen.runtime.decode import DECODE_ERRORS, max_decode_pixels, prepare_image


@functools.cache
def image_suffixes() -> tuple[str, ...]:
    """The file name suffixes of every format this Pillow can open (".jpg", ".gif", ".tiff", ...), sorted."""
    return tuple(sorted(s for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def decode_one(source, size: int) -> Optional[np.ndarray]:
    """uint8 [size, size, 3] of one image source (a path, or the file's bytes) by `prepare_image`, or None when
    it cannot be used (`DECODE_ERRORS`) or has more than `max_decode_pixels(size)` pixels as it would be
    decoded; that is decided from the header, before any pixel is decoded."""
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning (89 MP): such images are over our bound anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with img:
            img.draft("RGB", (size, size))  # JPEG: decoded at 1/2, 1/4 or 1/8 scale, each side still >= size
            if img.width * img.height > max_decode_pixels(size):
                return None
            return prepare_image(img, size)
    except DECODE_ERRORS:
        return None


@dataclass(frozen=True)
class Decoding:
    """How a data set's sources become images.

    cache_dir: the image cache's folder (created when missing), or None to decode into memory every time.
    workers: decoder processes (1: decode in this process). They are spawned, so a script that asks for
    more than one must guard its top level with `if __name__ == "__main__":`, as multiprocessing requires.
    progress: called as progress(done, total) while decoding; note: called with one-line messages (cache
    built, reused, rebuilt)."""
    cache_dir: Optional[Path] = None
    workers: int = 1
    progress: Optional[Callable[[int, int], None]] = None
    note: Optional[Callable[[str], None]] = None

    def say(self, message: str) -> None:
        if self.note is not None:
            self.note(message)
