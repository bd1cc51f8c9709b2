"""Editing inputs: the image an img2img, inpainting or outpainting run starts from, and which pixels it keeps.

`make_edit` turns what a user gives (paths or arrays, a strength, a mask, an outpaint shift) into an `Edit`
at the model's size, or one PatchgenError line. Its errors and notes name generate()'s arguments (init_image,
mask, strength, outpaint, repaint_jumps) as {fields} (errors.ArgumentError, errors.Phrase; in an f-string,
{{mask}}), which a CLI words as its options. The sampling itself is `loop.sample_images(init=, keep=,
strength=)`.
"""
from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from . import memory
from .decode import DECODE_ERRORS, UnfaithfulImage, display_rgb, max_decode_pixels
from .errors import ArgumentError, PatchgenError, Phrase, field
from .spec import ModelSpec

IMG2IMG_STRENGTH = 0.75  # img2img's default, as stable-diffusion.cpp's --strength and diffusers' pipeline
# What decoding holds per pixel of the image as decoded (after JPEG draft): Pillow's 8-bit RGBA copies, about
# 20 bytes, and 36 for 16-bit and float images, which pass through numpy float64 (models/data.py measured it).
DECODE_BYTES_PER_PIXEL = 36
OUTPAINT_SIDES = ("left", "right", "up", "down")
MAX_JUMPS = 100  # RePaint's resamplings per step (its paper uses 10): each one costs a whole step's calls

ImageInput = Union[str, Path, Image.Image, np.ndarray]


@dataclass(frozen=True, eq=False)
class Edit:
    """What an edited run starts from. init: float32 [C, H, W] in [-1, 1] at the model's size; keep: bool [H, W],
    True where the input's pixel is kept (None: img2img, nothing kept); strength in (0, 1]: the share of the
    sampler's steps run (`loop.edit_timesteps`); outpaint: the shift that made keep, as given ("right:1");
    jumps: RePaint's resamplings per step (`samplers.sample_ddim`), with keep only."""
    init: np.ndarray
    keep: Optional[np.ndarray] = None
    strength: float = 1.0
    outpaint: Optional[str] = None
    jumps: int = 0

    @property
    def kind(self) -> str:
        return "img2img" if self.keep is None else "outpainting" if self.outpaint else "inpainting"

    def masked_patches(self, grid: int) -> int:
        """Patches of one image with at least one pixel to make: the network calls per image and step."""
        if self.keep is None:
            return grid * grid
        h, w = self.keep.shape
        blocks = self.keep.reshape(grid, h // grid, grid, w // grid)
        return int((~blocks.all(axis=(1, 3))).sum())


def _path(source) -> Optional[str]:
    """An image argument's value as a message shows it: its path, or None (the argument alone) for an image or
    array."""
    return str(source) if isinstance(source, (str, Path)) else None


def _image_error(what: str, source, problem: str, fix: str = "") -> ArgumentError:
    """An ArgumentError whose problem and fix name the image argument `what` ("init_image", "mask") as
    field(what), with `source`'s path where it is one."""
    return ArgumentError(problem, fix, **{what: _path(source)})


def _open(source, what: str, size: int, budget: Optional[int]) -> Image.Image:
    """Open the image argument `what` (a file, lazily, or an open PIL image), refusing one whose decoding could
    not fit before any pixel is decoded."""
    name = field(what)
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (str, Path)):
        try:
            with warnings.catch_warnings():  # Pillow's bomb warning: such images are over our bound anyway
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(source)
        except FileNotFoundError:
            raise _image_error(what, source, f"{name}: no such file") from None
        except IsADirectoryError:
            raise _image_error(what, source, f"{name} is a folder; ", "give an image file") from None
        except Image.DecompressionBombError:
            bound = 2 * Image.MAX_IMAGE_PIXELS
            raise _image_error(what, source, f"{name} has more pixels than Pillow will decode ({bound}, its "
                               "decompression-bomb bound); ", "resize it first") from None
        except DECODE_ERRORS as e:
            raise _image_error(what, source, f"cannot read {name} ({e}); ", "give a PNG or JPEG image") from None
    else:
        raise _image_error(what, source, f"{name} must be a file's path, a PIL image or a uint8 array, not "
                           f"{type(source).__name__}")
    try:
        _check_decoding(img, source, what, size, budget)
    except PatchgenError:
        if img is not source:
            img.close()
        raise
    return img


def _check_decoding(img: Image.Image, source, what: str, size: int, budget: Optional[int]) -> None:
    """Refuse an opened image whose decoding could not fit: over the decode bound, the budget or the memory."""
    img.draft("RGB", (size, size))  # JPEG: decoded at 1/2, 1/4 or 1/8 scale, each side still >= size
    pixels, name = img.width * img.height, field(what)
    if pixels > max_decode_pixels(size):
        raise _image_error(what, source, f"{name} is {img.width}x{img.height}, over the {max_decode_pixels(size)} "
                           f"pixels this {size}x{size} model decodes; ", "resize it first")
    resident, need = memory.current_rss(), pixels * DECODE_BYTES_PER_PIXEL
    why = f"decoding {name} ({img.width}x{img.height}) needs about {memory.format_size(need)} beside the " \
          f"{memory.format_size(resident)} this process holds"
    if budget is not None and resident + need > budget:
        least = math.ceil((resident + need + memory.RERUN_MARGIN) / memory.MIB)
        raise memory.BudgetTooSmall(f"memory budget {memory.format_size(budget)} is below this run's minimum ({why})",
                                    least * memory.MIB, "resize the image", **{what: _path(source)})
    limit, limited_by = memory.available_memory(resident)
    if budget is None and limit is not None and resident + need > limit:
        raise _image_error(what, source, f"{why}, but this process can have only {memory.format_size(limit)} "
                           f"({limited_by}); ", "resize the image first")


def _decoded(source, what: str, size: int, budget: Optional[int]) -> Image.Image:
    """The image argument `what` as a viewer shows it, 8-bit RGB (`decode.display_rgb`), from a path or a PIL
    image."""
    img = _open(source, what, size, budget)
    try:
        try:
            return display_rgb(img)
        finally:
            if img is not source:
                img.close()
    except UnfaithfulImage as e:
        why = f"cannot use {field(what)} ({e}); "
        raise _image_error(what, source, why, "save it as an 8-bit PNG or JPEG") from None
    except DECODE_ERRORS as e:
        raise _image_error(what, source, f"cannot read {field(what)} ({e}); ", "give a PNG or JPEG image") from None


def _square(img: Image.Image, size: int, resample) -> Image.Image:
    """Centre-cropped to a square, resized to size x size (as training prepares its images)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), resample)


def read_image(source: ImageInput, spec: ModelSpec, what: str = "init_image",
               budget: Optional[int] = None) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 [H, W, C] at the model's size, the (width, height) it was shown at before cropping and resizing);
    errors name it as the argument `what`.

    A file or PIL image is decoded as training decodes images (`decode.display_rgb`: as a viewer shows it),
    centre-cropped to a square and resized with Lanczos (`decode.prepare_image`); an array must already be
    uint8 [H, W, C] at the model's size."""
    size, c = spec.image_size, spec.channels
    if isinstance(source, np.ndarray):
        image = source[:, :, None] if source.ndim == 2 else source
        if image.dtype != np.uint8 or image.shape != (size, size, c):
            raise _image_error(what, source, f"{field(what)} must be uint8 [{size}, {size}, {c}] for this model, "
                               f"got {source.dtype} {list(source.shape)}")
        return image, (size, size)
    if c not in (1, 3):
        raise PatchgenError(f"this model has {c} channels; images can be edited with 1 (grey) or 3 (RGB) only")
    shown = _decoded(source, what, size, budget)
    image = np.asarray(_square(shown, size, Image.Resampling.LANCZOS), dtype=np.uint8)
    if c == 1:
        image = np.asarray(Image.fromarray(image).convert("L"))[:, :, None]
    return image, shown.size


# Grey level of an RGB(A) mask array: ITU-R 601 luma, the weights of Pillow's convert("L") for mask files.
LUMA = np.array([0.299, 0.587, 0.114])


def read_mask(source: ImageInput, size: int, image_size: tuple[int, int],
              budget: Optional[int] = None) -> np.ndarray:
    """bool [size, size], True where the pixel is to be painted (white), False where it is kept (black).

    A file or PIL image as a viewer shows it (`decode.display_rgb`: transparency on white), its grey level
    (luma) thresholded at half of white. It must have the input image's size as shown (`image_size`: it is
    then cropped as the image is) or be square; it is resized to the model's with nearest. An array: at the
    model's size, [H, W] or [H, W, C], bool or numbers on its dtype's scale (uint8 to 255, other integers to
    their maximum, floats to 1), the same luma for 3 or 4 channels."""
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or source.shape[:2] != (size, size) or \
                (source.ndim == 3 and not 1 <= source.shape[2] <= 4):
            raise ArgumentError(f"{{mask}} must be [{size}, {size}] or [{size}, {size}, 1 to 4] for this model, "
                                f"got {list(source.shape)}", "", mask=None)
        if source.dtype == bool:
            level = source.astype(np.float64)
        elif np.issubdtype(source.dtype, np.integer):
            level = source / np.iinfo(source.dtype).max
        elif np.issubdtype(source.dtype, np.floating):
            level = source.astype(np.float64)
        else:
            raise ArgumentError(f"{{mask}} must hold bool or numbers, not {source.dtype}", "", mask=None)
        if level.ndim == 3:
            level = level[:, :, :3] @ LUMA if level.shape[2] >= 3 else level[:, :, 0]
        return level >= 0.5
    shown = _decoded(source, "mask", size, budget)
    if shown.size != image_size and shown.width != shown.height:
        raise ArgumentError(f"{{mask}} is {shown.width}x{shown.height}: ", f"give it the {{init_image}}'s size "
                            f"({image_size[0]}x{image_size[1]}) or a square one, resized to the model's "
                            f"{size}x{size}", mask=_path(source), init_image=None)
    return np.asarray(_square(shown.convert("L"), size, Image.Resampling.NEAREST)) >= 128


def outpaint_shift(text: str, grid: int) -> tuple[str, int]:
    """("right", K) from "right:K": the side where K new columns (or rows) of patches appear, 1 <= K < grid."""
    if not isinstance(text, str):
        raise ArgumentError(f"{{outpaint}} must be text such as right:1, not {type(text).__name__}", "",
                            outpaint=None)
    m = re.fullmatch(r" *(left|right|up|down) *: *([0-9]+) *", text)
    if not m:
        raise ArgumentError(f"cannot read {{outpaint}} {text!r}; ", f"write it as SIDE:K, SIDE one of "
                            f"{', '.join(OUTPAINT_SIDES)} and K the patches to add, e.g. right:1", outpaint=None)
    side, k = m.group(1), int(m.group(2))
    if not 1 <= k < grid:
        if grid == 1:
            raise ArgumentError("{outpaint} needs a model of 2x2 patches or more: a 1x1 model has no patch to keep; ",
                                "use {init_image} with {strength} for img2img", outpaint=None, init_image=None,
                                strength=None)
        allowed = "1" if grid == 2 else f"1 to {grid - 1}"
        raise ArgumentError(f"{{outpaint}} would shift the image off this {grid}x{grid} grid; K must be {allowed}",
                            "", outpaint=f"{side}:{k}")
    return side, k


def shifted(image: np.ndarray, side: str, k: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image [H, W, C] moved away from `side` by k patches, the freed pixels 0; keep bool [H, W], False on
    the freed ones): outpainting as inpainting of the freed border."""
    out = np.zeros_like(image)
    keep = np.zeros(image.shape[:2], bool)
    d = k * patch_size
    if side == "right":  # the picture moves left; new pixels on the right
        out[:, :-d], keep[:, :-d] = image[:, d:], True
    elif side == "left":
        out[:, d:], keep[:, d:] = image[:, :-d], True
    elif side == "down":
        out[:-d], keep[:-d] = image[d:], True
    else:  # up
        out[d:], keep[d:] = image[:-d], True
    return out, keep


def make_edit(spec: ModelSpec, init_image: Optional[ImageInput] = None, mask: Optional[ImageInput] = None,
              strength: Optional[float] = None, outpaint: Optional[str] = None, repaint_jumps: int = 0,
              budget: Optional[int] = None) -> tuple[Optional[Edit], tuple[Phrase, ...]]:
    """(the Edit, notes for the user), or (None, ()) when nothing is edited. Refuses in one ArgumentError
    line: a mask, strength, outpaint or repaint_jumps without an image; repaint_jumps without a mask or
    outpaint, or outside 0 .. MAX_JUMPS; a strength outside (0, 1], or below 1 with an outpaint (the freed
    patches have nothing to start from); a mask and an outpaint together; a mask that keeps every pixel; an
    outpaint of the whole grid; a value of the wrong type; a file that cannot be read, or whose decoding would
    not fit `budget` (bytes; None: the memory this process can have).

    strength defaults to IMG2IMG_STRENGTH for img2img and to 1 (every step) for inpainting and outpainting."""
    if init_image is None:
        for name, given in (("mask", mask), ("strength", strength), ("outpaint", outpaint),
                            ("repaint_jumps", repaint_jumps or None)):
            if given is not None:
                raise ArgumentError(field(name) + " needs {init_image}, the image to edit", "", **{name: None},
                                    init_image=None)
        return None, ()
    shift = _checked_request(spec, mask, strength, outpaint, repaint_jumps)  # before decoding anything
    image, shown = read_image(init_image, spec, budget=budget)
    size = spec.image_size
    notes = (Phrase(f"{{init_image}} is {shown[0]}x{shown[1]}: centre-cropped and resized to {size}x{size}",
                    init_image=_path(init_image)),) if shown != (size, size) else ()
    image, keep = _kept_pixels(image, shown, spec, mask, shift, budget)
    init = image.transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - np.float32(1)
    default = IMG2IMG_STRENGTH if keep is None else 1.0
    outpaint = None if shift is None else f"{shift[0]}:{shift[1]}"  # as read: what the PNG's text records
    return Edit(init, keep, default if strength is None else float(strength), outpaint, int(repaint_jumps)), notes


def _checked_request(spec: ModelSpec, mask, strength, outpaint, jumps) -> Optional[tuple[str, int]]:
    """The outpaint's (side, patches) or None, once the edit's values are checked (make_edit's refusals, all
    before any image is decoded; jumps: repaint_jumps)."""
    if not isinstance(jumps, numbers.Integral) or isinstance(jumps, bool):
        raise ArgumentError(f"{{repaint_jumps}} must be a whole number, not {jumps!r}", "", repaint_jumps=None)
    if jumps and mask is None and outpaint is None:
        raise ArgumentError("{repaint_jumps} resamples around kept pixels: it needs {mask} or {outpaint}", "",
                            repaint_jumps=None, mask=None, outpaint=None)
    if not 0 <= jumps <= MAX_JUMPS:
        raise ArgumentError(f"{{repaint_jumps}} must be 0 to {MAX_JUMPS}, got {jumps}", "", repaint_jumps=None)
    if strength is not None:
        if not isinstance(strength, numbers.Real) or isinstance(strength, bool):
            raise ArgumentError(f"{{strength}} must be a number, not {strength!r}", "", strength=None)
        if not 0 < strength <= 1:  # NaN fails too
            raise ArgumentError(f"{{strength}} must be above 0 and at most 1, got {strength}", "", strength=None)
    if mask is not None and outpaint is not None:
        raise ArgumentError("give {mask} or {outpaint}, not both: {outpaint} makes its own mask", "", mask=None,
                            outpaint=None)
    shift = outpaint_shift(outpaint, spec.grid) if outpaint is not None else None
    if shift is not None and strength is not None and strength < 1:
        raise ArgumentError("{outpaint} paints patches that start from nothing, so it runs every step: ",
                            "drop {strength}", outpaint=None, strength=float(strength))
    return shift


def _kept_pixels(image: np.ndarray, shown: tuple[int, int], spec: ModelSpec, mask, shift, budget: Optional[int]):
    """(the image, moved for an outpaint, and keep bool [H, W]: True = keep its pixel, or None for img2img)."""
    size = spec.image_size
    keep = None
    if mask is not None:
        keep = ~read_mask(mask, size, shown, budget)
        if keep.all():
            raise ArgumentError("{mask} keeps every pixel (none is white): nothing to paint; ",
                                "make the area to paint white", mask=_path(mask))
    elif shift is not None:
        image, keep = shifted(image, *shift, spec.patch_size)
    return image, keep
