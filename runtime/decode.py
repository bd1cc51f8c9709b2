"""Input images as a viewer shows them: EXIF orientation, high bit depths, ICC colour, transparency on white.

Training (`patchgen.models.decoding`) and the runtime's image editing (`--init-img`, `--mask`) decode files through
these same functions, so an image means the same pixels to both.
"""
from __future__ import annotations

import functools
import io
import struct

import numpy as np
from PIL import Image, ImageCms, ImageOps

# The most pixels an image may have, as it will be decoded (after `draft`), to be decoded for training at side S:
# max((MAX_DECODE_SCALE * S)**2, MIN_DECODE_PIXELS) (`max_decode_pixels`); larger images are skipped and counted
# before any pixel is decoded. Peak memory = pixels x bytes a pixel of the decode path (display_rgb,
# prepare_image), which holds a few full-size copies at once: Pillow keeps 8-bit RGB(A) at 4 bytes a pixel,
# about 20 in all; 16-bit and float images also pass through numpy float64, about 36 (measured by maxrss).
# At the floor that is about 320 to 580 MiB per decoder process, instead of gigabytes.
# The floor: 16.8 MP, e.g. 4096 x 4096, above 4K UHD (8.3 MP) and a 12 MP photo kept as PNG.
MIN_DECODE_PIXELS = 2**24
# The scale: each output pixel then averages 16 x 16 = 256 source pixels; a larger source only adds detail the
# resize throws away. It lifts the bound above the floor only for S > 256 (S = 512: 67 MP).
MAX_DECODE_SCALE = 16

class UnfaithfulImage(ValueError):
    """A file that opens but has no faithful 8-bit RGB form (e.g. float samples outside [0, 1])."""


def _full_scale(img: Image.Image) -> float | None:
    """The sample value a viewer shows as white for a high-bit-depth mode, or None for 8-bit modes.

    Read from the opened file itself: TIFF declares its sample size; Pillow's other "I" images (PGM/PPM
    with maxval > 255, ...) hold 16-bit samples. Float images are taken as [0, 1], as TIFF viewers do.
    """
    if img.mode.startswith("I;16"):
        return 65535
    if img.mode == "I":
        tags = getattr(img, "tag_v2", None)
        if tags is None:
            return 65535
        bits, signed = tags.get(258, (32,))[0], tags.get(339, (1,))[0] == 2  # BitsPerSample, SampleFormat
        return 2 ** (bits - signed) - 1
    if img.mode == "F":
        return 1.0
    return None


def _to_8bit(img: Image.Image, full: float) -> Image.Image:
    """High-bit-depth grey [0, full] -> 8-bit "L" (or "LA" under a tRNS grey value); Pillow's convert would clip."""
    samples = np.asarray(img)
    level = samples.astype(np.float64) / full
    if not np.all((level >= 0) & (level <= 1)):  # NaN fails too
        raise UnfaithfulImage(f"{img.mode} samples outside [0, {full}]")
    grey = np.round(level * 255).astype(np.uint8)
    info = {k: v for k, v in img.info.items() if k != "transparency"}
    if "transparency" in img.info:  # PNG tRNS: this one grey value is fully transparent
        alpha = np.where(samples == img.info["transparency"], 0, 255).astype(np.uint8)
        out = Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
    else:
        out = Image.fromarray(grey, "L")
    out.info = info  # the colour profile still applies
    return out


# Which 8-bit modes an embedded ICC profile can describe, by the profile's colour space.
_PROFILE_MODES = {"RGB": ("RGB", ("RGB", "RGBA", "RGBX", "P", "PA")), "GRAY": ("L", ("1", "L", "LA")),
                  "CMYK": ("CMYK", ("CMYK",))}


def _colour_managed(img: Image.Image) -> Image.Image:
    """Apply the embedded ICC profile, mapping the colours to sRGB as a colour-managed viewer does.

    A profile that is unreadable or does not fit the image's mode is ignored, as viewers ignore it.
    """
    icc = img.info.get("icc_profile")
    if not icc:
        return img
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        mode, fits = _PROFILE_MODES.get(profile.profile.xcolor_space.strip(), (None, ()))
        if img.mode not in fits:
            return img
        rgba = img.convert("RGBA")  # the alpha, whichever way the file stores it
        base = rgba.convert("RGB") if mode == "RGB" else img.convert(mode)
        out = ImageCms.profileToProfile(base, profile, _srgb(), outputMode="RGB")
    except (OSError, ValueError, ImageCms.PyCMSError):
        return img
    out.putalpha(rgba.getchannel("A"))
    return out


@functools.cache
def _srgb():
    return ImageCms.createProfile("sRGB")


def display_rgb(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it, as 8-bit RGB: the (first) frame Pillow opened, turned by its EXIF
    orientation, high bit depths scaled to 8 bits, colours mapped to sRGB by its ICC profile, transparency
    composited onto white. Raises UnfaithfulImage when that cannot be done faithfully."""
    full = _full_scale(img)  # before any transform replaces the opened file and its header
    if img.mode == "RGB" and any(v > 255 for v in np.ravel(img.info.get("transparency", ()))):
        # a 16-bit PNG's transparent colour: Pillow decoded the pixels to 8 bits and can no longer match it
        raise UnfaithfulImage("16-bit transparent colour")
    img = ImageOps.exif_transpose(img)
    if full is not None:
        img = _to_8bit(img, full)
    img = _colour_managed(img).convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, img).convert("RGB")


def prepare_image(img: Image.Image, size: int) -> np.ndarray:
    """The image as a viewer shows it (`display_rgb`), centre-cropped to a square, resized to size x size:
    uint8 [H, W, 3]."""
    img = display_rgb(img)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


# What a file that cannot be used raises: unreadable, truncated, a decoder missing, or no faithful RGB form.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def max_decode_pixels(size: int) -> int:
    """The most pixels (width x height) an image may have to be decoded for training at size x size."""
    return max((MAX_DECODE_SCALE * size) ** 2, MIN_DECODE_PIXELS)
