"""Training data: every image kind Pillow opens arrives as a viewer shows it; data sets round-trip by name."""
import io
import re
import struct
import time
import zlib

import numpy as np
import pytest
import PIL
from PIL import Image, ImageCms, ImageFile

import patchgen.runtime.decode as decode_module
import tinyfont
from patchgen.models.data import (NOTO_FONT_ENV, DataSource, holdout_split, load_data, load_emoji, load_folder,
                                  load_named)
from patchgen.models.decoding import Decoding, image_suffixes
from patchgen.runtime.decode import max_decode_pixels, prepare_image
from patchgen.runtime.errors import PatchgenError

SIZE = 16  # the files are SIZE x SIZE and load at SIZE: no resampling, so pixels compare one to one

# Four flat 8x8 quadrants (JPEG blocks): every flip and rotation of it is a different picture.
QUAD = np.zeros((SIZE, SIZE, 3), np.uint8)
QUAD[:8, :8], QUAD[:8, 8:], QUAD[8:, :8], QUAD[8:, 8:] = (220, 30, 40), (30, 160, 60), (40, 50, 200), (240, 220, 30)
GREY = np.arange(256, dtype=np.uint8).reshape(SIZE, SIZE)  # every 8-bit level once
GREY16 = np.round(np.linspace(0, 65535, 256)).astype(np.uint16).reshape(SIZE, SIZE)  # a full-range 16-bit ramp
LEFT_HALF = (slice(None), slice(0, 8))


def rgb(grey):
    return np.repeat(np.asarray(grey, np.uint8)[..., None], 3, axis=-1)


def with_white(image, where):
    out = image.copy()
    out[where] = 255
    return out


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(path, samples: np.ndarray, trns=None):
    """A 16-bit-per-sample RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = samples.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)
    body = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    body += png_chunk(b"tRNS", struct.pack(">HHH", *trns)) if trns is not None else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def bomb_png(path, side: int):
    """A valid 1-bit white PNG of side x side pixels in a few kilobytes: at 13000, a decompression bomb below
    Pillow's threshold (169 MP: gigabytes to decode, issue 31)."""
    raw = (b"\x00" + b"\xff" * ((side + 7) // 8)) * side  # filter byte 0, then the row's bits
    body = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b""))


def swapped_primaries_profile() -> bytes:
    """sRGB with its red and green primaries swapped: a colour-managed viewer shows stored (r, g, b) as (g, r, b)."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", icc[128:132])[0]
    entries = {bytes(icc[132 + 12 * i: 136 + 12 * i]): 132 + 12 * i for i in range(count)}  # signature -> entry
    r, g = entries[b"rXYZ"], entries[b"gXYZ"]
    icc[r + 4: r + 12], icc[g + 4: g + 12] = icc[g + 4: g + 12], icc[r + 4: r + 12]  # swap (offset, size)
    return bytes(icc)


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def save(image, **options):
    return lambda path: image.save(path, **options)


def animated(frames, **options):
    first, *rest = [Image.fromarray(f) for f in frames]
    return lambda path: first.save(path, save_all=True, append_images=rest, duration=100, **options)


def rgba(alpha) -> Image.Image:
    return Image.fromarray(np.dstack([QUAD, np.broadcast_to(np.uint8(alpha), GREY.shape)]), "RGBA")


def over_white(alpha: int) -> np.ndarray:
    return np.round(QUAD * (alpha / 255) + 255 * (1 - alpha / 255)).astype(np.uint8)


def palette(transparent_index=None) -> Image.Image:
    img = Image.fromarray(QUAD).quantize(4)  # 4 colours: an exact palette
    if transparent_index is not None:
        img.info["transparency"] = transparent_index
    return img


def red_is_transparent():
    # PNG/GIF keep the transparent palette index of the colour in the top-left quadrant
    img = palette()
    img.info["transparency"] = img.getpixel((0, 0))
    return img


# What a viewer shows for each kind of file: (file name, how to write it, expected uint8 RGB or None when the
# file has no faithful RGB form and must be skipped and counted, tolerance in levels).
KINDS = {
    # formats
    **{f"RGB {suffix}": (f"a{suffix}", save(Image.fromarray(QUAD)), QUAD, 0)
       for suffix in (".png", ".bmp", ".tif", ".tga", ".ppm", ".qoi", ".pcx", ".sgi", ".dds", ".gif",
                      ".jp2", ".dib", ".apng")},
    "RGB .webp lossless": ("a.webp", save(Image.fromarray(QUAD), lossless=True), QUAD, 0),
    "RGB .jpg": ("a.jpg", save(Image.fromarray(QUAD), quality=95, subsampling=0), QUAD, 8),
    # orientation: EXIF says how to turn the stored pixels for display
    **{f"EXIF orientation {o} .png": ("a.png", save(Image.fromarray(QUAD), exif=exif(o)), shown, 0)
       for o, shown in {1: QUAD, 2: QUAD[:, ::-1], 3: QUAD[::-1, ::-1], 4: QUAD[::-1],
                        5: QUAD.transpose(1, 0, 2), 6: np.rot90(QUAD, -1), 7: QUAD[::-1, ::-1].transpose(1, 0, 2),
                        8: np.rot90(QUAD, 1)}.items()},
    "EXIF orientation 6 .jpg": ("a.jpg", save(Image.fromarray(QUAD), exif=exif(6), quality=95, subsampling=0),
                                np.rot90(QUAD, -1), 8),
    "EXIF orientation 6 .webp": ("a.webp", save(Image.fromarray(QUAD), exif=exif(6), lossless=True),
                                 np.rot90(QUAD, -1), 0),
    "TIFF orientation 8 .tif": ("a.tif", save(Image.fromarray(QUAD), tiffinfo={274: 8}), np.rot90(QUAD, 1), 0),
    # 8-bit modes and transparency (composited onto white)
    "1 .png": ("a.png", save(Image.fromarray(GREY >= 128)), rgb(np.where(GREY >= 128, 255, 0)), 0),
    "1 .bmp": ("a.bmp", save(Image.fromarray(GREY >= 128)), rgb(np.where(GREY >= 128, 255, 0)), 0),
    "L .png": ("a.png", save(Image.fromarray(GREY)), rgb(GREY), 0),
    "L tRNS .png": ("a.png", save(Image.fromarray(GREY), transparency=0), with_white(rgb(GREY), (0, 0)), 0),
    "LA .png": ("a.png", save(Image.fromarray(np.dstack([GREY, np.where(np.arange(SIZE) < 8, 0, 255)
                                                          .astype(np.uint8)[None].repeat(SIZE, 0)]), "LA")),
                with_white(rgb(GREY), LEFT_HALF), 0),
    "P .png": ("a.png", save(palette()), QUAD, 0),
    "P transparent .png": ("a.png", save(red_is_transparent()), with_white(QUAD, (slice(0, 8), slice(0, 8))), 0),
    "P transparent .gif": ("a.gif", save(red_is_transparent()), with_white(QUAD, (slice(0, 8), slice(0, 8))), 0),
    "RGB tRNS .png": ("a.png", save(Image.fromarray(QUAD), transparency=(220, 30, 40)),
                      with_white(QUAD, (slice(0, 8), slice(0, 8))), 0),
    "RGBA .png": ("a.png", save(rgba(100)), over_white(100), 1),
    "RGBA .webp": ("a.webp", save(rgba(100), lossless=True), over_white(100), 1),
    "RGBA .tif": ("a.tif", save(rgba(0)), with_white(QUAD, (slice(None),)), 0),
    "CMYK .tif": ("a.tif", save(Image.fromarray(QUAD).convert("CMYK")), QUAD, 0),
    "CMYK .jpg": ("a.jpg", save(Image.fromarray(QUAD).convert("CMYK"), quality=95), QUAD, 8),
    "YCbCr .tif": ("a.tif", save(Image.fromarray(QUAD).convert("YCbCr")), QUAD, 3),
    "LAB .tif": ("a.tif", save(ImageCms.applyTransform(Image.fromarray(QUAD), ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"))), QUAD, 6),
    # animations: the first frame
    "animated .gif": ("a.gif", animated([QUAD, 255 - QUAD]), QUAD, 0),
    "animated .webp": ("a.webp", animated([QUAD, 255 - QUAD], lossless=True), QUAD, 0),
    "animated .png": ("a.png", animated([QUAD, 255 - QUAD]), QUAD, 0),
    # colour profiles: mapped to sRGB; one that cannot be read is ignored, as viewers do
    "sRGB profile .png": ("a.png", save(Image.fromarray(QUAD),
                                        icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()),
                          QUAD, 1),
    "swapped primaries profile .png": ("a.png", save(Image.fromarray(QUAD), icc_profile=swapped_primaries_profile()),
                                       QUAD[..., [1, 0, 2]], 1),
    "swapped primaries profile .jpg": ("a.jpg", save(Image.fromarray(QUAD), icc_profile=swapped_primaries_profile(),
                                                     quality=95, subsampling=0), QUAD[..., [1, 0, 2]], 8),
    "swapped primaries profile, palette .png": ("a.png", save(palette(), icc_profile=swapped_primaries_profile()),
                                                QUAD[..., [1, 0, 2]], 1),
    "broken profile .png": ("a.png", save(Image.fromarray(QUAD), icc_profile=b"not a profile"), QUAD, 0),
    # high bit depths: scaled by their full range, not clipped
    "I;16 .png": ("a.png", save(Image.fromarray(GREY16)), rgb(np.round(GREY16 / 257)), 0),
    "I;16 .tif": ("a.tif", save(Image.fromarray(GREY16)), rgb(np.round(GREY16 / 257)), 0),
    "I;16 EXIF orientation 6 .png": ("a.png", save(Image.fromarray(GREY16), exif=exif(6)),
                                     rgb(np.rot90(np.round(GREY16 / 257), -1)), 0),
    "I;16 tRNS .png": ("a.png", save(Image.fromarray(GREY16), transparency=int(GREY16[0, 1])),
                       with_white(rgb(np.round(GREY16 / 257)), (0, 1)), 0),
    "I 16-bit .pgm": ("a.pgm", save(Image.fromarray(GREY16.astype(np.int32))), rgb(np.round(GREY16 / 257)), 0),
    "I 32-bit .tif": ("a.tif", save(Image.fromarray(np.round(GREY / 255 * (2**31 - 1)).astype(np.int32))),
                      rgb(GREY), 0),
    "F .tif": ("a.tif", save(Image.fromarray((GREY / 255).astype(np.float32))), rgb(GREY), 0),
    "RGB 16-bit .png": ("a.png", lambda path: png16(path, QUAD.astype(np.uint16) * 257), QUAD, 0),
    # no faithful 8-bit RGB form: skipped and counted
    "F beyond [0, 1] .tif": ("a.tif", save(Image.fromarray((GREY / 100).astype(np.float32))), None, 0),
    "F NaN .tif": ("a.tif", save(Image.fromarray(np.full(GREY.shape, np.nan, np.float32))), None, 0),
    "I negative .tif": ("a.tif", save(Image.fromarray(GREY.astype(np.int32) - 128)), None, 0),
    "RGB 16-bit tRNS .png": ("a.png", lambda path: png16(path, QUAD.astype(np.uint16) * 257,
                                                         trns=(220 * 257, 30 * 257, 40 * 257)), None, 0),
}


@pytest.mark.parametrize("kind", KINDS)
def test_image_kinds_arrive_as_a_viewer_shows_them(tmp_path, kind):
    name, write, expected, tolerance = KINDS[kind]
    write(tmp_path / name)
    if expected is None:
        with pytest.raises(PatchgenError, match=r"\(1 skipped: unreadable, over \d+ pixels, or without a faithful "
                                                r"RGB form\)"):
            load_folder(tmp_path, SIZE)
        return
    data = load_folder(tmp_path, SIZE)
    assert data.source.num_images == 1 and data.source.skipped == 0
    np.testing.assert_allclose(data.images[0].astype(int), expected.astype(int), rtol=0, atol=tolerance)


def test_every_format_pillow_opens_is_used(tmp_path):
    assert {".gif", ".tif", ".tiff", ".jpg", ".png", ".webp", ".bmp", ".qoi", ".ppm"} <= set(image_suffixes())
    assert ".pdf" not in image_suffixes()  # Pillow writes PDF but cannot open it
    for suffix in (".gif", ".tif", ".tga", ".ppm", ".png"):
        Image.fromarray(QUAD).save(tmp_path / f"a{suffix}")
    assert load_folder(tmp_path, SIZE).source.num_images == 5


@pytest.mark.quick
def test_folder_data_skips_unreadable(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGBA", (30, 30), (0, 0, 255, 0)).save(tmp_path / "sub" / "b.webp")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "broken.gif").write_bytes(b"GIF89a")  # truncated
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_folder(tmp_path, 8)
    assert data.images.shape == (2, 8, 8, 3) and data.source.skipped == 2
    assert (data.images[1] == 255).all()  # transparent pixels composite onto white
    (tmp_path / "empty").mkdir()
    with pytest.raises(PatchgenError, match="no usable images.*jpg.*tiff"):
        load_folder(tmp_path / "empty", 8)


@pytest.mark.quick
def test_prepare_image_centre_crops():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 20, 10))  # the centre square is white
    assert (prepare_image(img, 4) == 255).all()


def test_orientation_applies_before_the_centre_crop(tmp_path):
    stored = np.zeros((10, 30, 3), np.uint8)
    stored[:, :10] = 255  # a white left third: displayed turned by 90 degrees, it is the top third, cropped away
    Image.fromarray(stored).save(tmp_path / "a.jpg", exif=exif(6), quality=95)
    assert load_folder(tmp_path, 4).images.max() < 8


@pytest.mark.quick
def test_holdout_split_is_fixed_and_disjoint():
    train_a, held_a = holdout_split(100, 0.1, 0)
    train_b, held_b = holdout_split(100, 0.1, 0)
    assert np.array_equal(held_a, held_b) and len(held_a) == 10
    assert not set(train_a) & set(held_a) and len(train_a) + len(held_a) == 100


def test_emoji_data_ships_with_attribution():
    data = load_emoji(8, skin_tones=False)
    assert 1500 < len(data.images) < 4009 and data.images.dtype == np.uint8
    assert "CC-BY 4.0" in data.source.attribution and data.source.skipped == 0


def test_emoji_faces_subset_round_trips_through_its_name():
    faces = load_data("emoji-faces", 8)
    assert len(faces.images) == 125 and faces.source.name == "twemoji-faces"
    assert "CC-BY 4.0" in faces.source.attribution
    np.testing.assert_array_equal(load_named("twemoji-faces", 8).images, faces.images)
    assert load_named("twemoji-no-skin-tones", 8).source == load_emoji(8, skin_tones=False).source


def test_a_folder_named_like_a_subset_is_a_folder(tmp_path, monkeypatch):
    (tmp_path / "faces").mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "faces" / "a.png")
    monkeypatch.chdir(tmp_path)
    data = load_data("faces", 4)
    assert len(data.images) == 1 and data.source.name.startswith("folder:")


@pytest.mark.quick
@pytest.mark.parametrize("name", ["twemoji-flags", "imagenet"])
def test_unknown_data_name_is_a_clear_error(name):
    with pytest.raises(PatchgenError, match="unknown data set"):
        load_named(name, 8)


@pytest.fixture
def tiny_noto(tmp_path, monkeypatch):
    """$PATCHGEN_NOTO_FONT -> a four-glyph colour-bitmap font (tests/tinyfont.py)."""
    path = tmp_path / "TinyEmoji.ttf"
    tinyfont.write_font(path, tinyfont.GLYPHS, tinyfont.LIGATURES)
    monkeypatch.setenv(NOTO_FONT_ENV, str(path))
    return path


@pytest.mark.quick
@pytest.mark.parametrize("data_name, skin_tones, colours", [
    ("noto-emoji", True, [tinyfont.FACE, tinyfont.THUMBS, tinyfont.TONE, tinyfont.THUMBS_TONE]),
    ("noto-emoji", False, [tinyfont.FACE, tinyfont.THUMBS]),  # the modifier and the ligature through it left out
    ("noto-emoji-faces", True, [tinyfont.FACE]),
    ("noto-emoji-faces", False, [tinyfont.FACE])])
def test_noto_emoji_from_the_fonts_bitmaps(tiny_noto, data_name, skin_tones, colours):
    data = load_data(data_name, 8, skin_tones=skin_tones)
    assert data.images.shape == (len(colours), 8, 8, 3) and data.images.dtype == np.uint8
    expected = np.broadcast_to(np.array(colours, np.uint8)[:, None, None], data.images.shape)
    np.testing.assert_array_equal(data.images, expected)
    assert data.source.license == "Apache-2.0 AND OFL-1.1" and "Noto Color Emoji" in data.source.attribution
    assert data.source.skipped == 0 and data.source.num_images == len(colours)
    again = load_named(data.source.name, 8)  # the name in checkpoints and ONNX metadata rebuilds it
    assert again.source == data.source and np.array_equal(again.images, data.images)


def test_noto_bitmaps_are_centre_cropped_not_squashed(tmp_path, monkeypatch):
    """136x128 glyphs (here 18x16) lose a column at each side instead of being resized to a square."""
    left_edge = np.full((tinyfont.HEIGHT, tinyfont.WIDTH, 4), 255, np.uint8)
    left_edge[:, 0] = (255, 0, 0, 255)  # a red first column: cropped away
    buf = io.BytesIO()
    Image.fromarray(left_edge, "RGBA").save(buf, "PNG")
    tinyfont.write_font(tmp_path / "f.ttf", {"u1F600": (0x1F600, buf.getvalue())})
    monkeypatch.setenv(NOTO_FONT_ENV, str(tmp_path / "f.ttf"))
    data = load_data("noto-emoji", tinyfont.HEIGHT)
    assert data.images.shape == (1, 16, 16, 3) and np.all(data.images == 255)


def test_noto_glyph_that_does_not_decode_is_skipped_and_counted(tmp_path, monkeypatch):
    glyphs = {**tinyfont.GLYPHS, "u1F600": (0x1F600, b"\x89PNG\r\n\x1a\n truncated")}
    tinyfont.write_font(tmp_path / "f.ttf", glyphs)
    monkeypatch.setenv(NOTO_FONT_ENV, str(tmp_path / "f.ttf"))
    data = load_data("noto-emoji", 8)
    assert data.source.skipped == 1 and len(data.images) == 3


def test_missing_noto_font_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr("patchgen.models.data.NOTO_FONT_PATHS", (str(tmp_path / "none.ttf"),))
    monkeypatch.delenv(NOTO_FONT_ENV, raising=False)
    with pytest.raises(PatchgenError, match="apt-get install fonts-noto-color-emoji"):
        load_data("noto-emoji-faces", 8)
    monkeypatch.setenv(NOTO_FONT_ENV, str(tmp_path / "none.ttf"))
    with pytest.raises(PatchgenError, match=f"{NOTO_FONT_ENV}=.* is not a file"):
        load_data("noto-emoji", 8)


@pytest.mark.parametrize("content", [b"not a font at all", b"\x00\x01\x00\x00" + bytes(60)])
def test_unreadable_noto_font_is_a_clear_error(tmp_path, monkeypatch, content):
    (tmp_path / "bad.ttf").write_bytes(content)
    monkeypatch.setenv(NOTO_FONT_ENV, str(tmp_path / "bad.ttf"))
    with pytest.raises(PatchgenError, match="cannot read .* as a colour emoji font|has no colour bitmaps"):
        load_data("noto-emoji", 8)


def test_a_font_without_colour_bitmaps_is_named(tmp_path, monkeypatch):
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen
    fb = FontBuilder(unitsPerEm=128, isTTF=True)
    fb.setupGlyphOrder([".notdef"])
    fb.setupCharacterMap({})
    fb.setupGlyf({".notdef": TTGlyphPen(None).glyph()})
    fb.setupHorizontalMetrics({".notdef": (100, 0)})
    fb.setupHorizontalHeader(ascent=100, descent=-28)
    fb.setupNameTable({"familyName": "Plain", "styleName": "Regular"})
    fb.setupOS2()
    fb.setupPost()
    fb.save(str(tmp_path / "plain.ttf"))
    monkeypatch.setenv(NOTO_FONT_ENV, str(tmp_path / "plain.ttf"))
    with pytest.raises(PatchgenError, match="has no colour bitmaps"):
        load_data("noto-emoji", 8)


@pytest.fixture
def decoded_sizes(monkeypatch):
    """The (width, height) of each image file whose pixels Pillow loads in this process (once or more each);
    loading one with more pixels than the bound at SIZE fails the test instead of taking the memory."""
    sizes = []
    real = ImageFile.ImageFile.load

    def load(self):
        sizes.append(self.size)
        assert self.width * self.height <= max_decode_pixels(SIZE), f"decoded a {self.size} image"
        return real(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


def test_an_image_too_large_to_decode_is_skipped_from_its_header(tmp_path, decoded_sizes):
    """Issue 31, kind 7: a small file that declares 13000 x 13000 is skipped, and counted, before any pixel is
    decoded; the others are used."""
    bomb_png(tmp_path / "bomb.png", 13000)
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    for name in ("a.png", "b.png"):
        Image.fromarray(QUAD).save(tmp_path / name)
    start = time.monotonic()
    data = load_folder(tmp_path, SIZE)
    assert time.monotonic() - start < 2
    assert data.source.num_images == 2 and data.source.skipped == 1
    assert set(decoded_sizes) == {(SIZE, SIZE)}
    for name in ("a.png", "b.png"):
        (tmp_path / name).unlink()
    with pytest.raises(PatchgenError, match=f"1 skipped: unreadable, over {max_decode_pixels(SIZE)} pixels"):
        load_folder(tmp_path, SIZE)


def test_the_decode_bound_grows_with_the_image_side():
    assert max_decode_pixels(16) == decode_module.MIN_DECODE_PIXELS == 2**24  # small sides: the floor
    assert max_decode_pixels(1024) == (decode_module.MAX_DECODE_SCALE * 1024) ** 2 > 2**24


def test_draft_brings_a_large_jpeg_under_the_bound(tmp_path, monkeypatch, decoded_sizes):
    """A JPEG over the bound is decoded at 1/8 scale, under it, and used; a PNG of the same size (no reduced
    decoding) is skipped."""
    monkeypatch.setattr(decode_module, "MIN_DECODE_PIXELS", 0)  # the bound at SIZE: (16 * SIZE)**2, 256 x 256
    big = np.kron(QUAD, np.ones((64, 64, 1), np.uint8))  # 1024 x 1024
    Image.fromarray(big).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(big).save(tmp_path / "b.png")
    data = load_folder(tmp_path, SIZE)
    assert data.source.num_images == 1 and data.source.skipped == 1
    assert set(decoded_sizes) == {(128, 128)}
    np.testing.assert_allclose(data.images[0].astype(int), prepare_image(Image.fromarray(big), SIZE), atol=6)


def test_a_drafted_jpeg_keeps_its_orientation_and_profile(tmp_path, decoded_sizes):
    """EXIF orientation and the ICC profile still apply to a JPEG decoded at a reduced scale."""
    big = np.kron(QUAD, np.ones((8, 8, 1), np.uint8))  # 128 x 128: decoded at 1/8, SIZE x SIZE
    Image.fromarray(big).save(tmp_path / "a.jpg", exif=exif(6), icc_profile=swapped_primaries_profile(),
                              quality=95, subsampling=0)
    data = load_folder(tmp_path, SIZE)
    assert set(decoded_sizes) == {(SIZE, SIZE)}
    np.testing.assert_allclose(data.images[0].astype(int), np.rot90(QUAD, -1)[..., [1, 0, 2]], atol=8)


def write_quads(folder, n):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(QUAD).save(folder / f"{i}.png")
    return folder


@pytest.mark.quick
def test_a_data_set_has_an_identity(tmp_path, monkeypatch):
    """Issue 31, kind 8: the same files give the same identity however they are loaded: in memory or through
    the image cache (built, then mapped), at any image side, under any Pillow version."""
    folder = write_quads(tmp_path / "images", 3)
    identity = load_folder(folder, SIZE).source.identity
    assert re.fullmatch("[0-9a-f]{16}", identity)
    cache = Decoding(tmp_path / "cache")
    assert load_folder(folder, SIZE).source.identity == identity
    assert load_folder(folder, SIZE, cache).source.identity == identity  # building the entry
    assert load_folder(folder, SIZE, cache).source.identity == identity  # mapping it
    assert load_folder(folder, 8, cache).source.identity == identity
    monkeypatch.setattr(PIL, "__version__", "0.0.0")  # a new cache entry, the same data
    assert load_folder(folder, SIZE, cache).source.identity == identity
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


@pytest.mark.parametrize("change", ["add", "remove", "rewrite"])
def test_identity_changes_with_the_files(tmp_path, change):
    folder = write_quads(tmp_path / "images", 3)
    before = load_folder(folder, SIZE).source.identity
    if change == "add":
        Image.fromarray(QUAD).save(folder / "3.png")
    elif change == "remove":
        (folder / "0.png").unlink()
    else:
        Image.fromarray(np.rot90(QUAD)).resize((2 * SIZE, 2 * SIZE)).save(folder / "0.png")
    assert load_folder(folder, SIZE).source.identity != before


def test_identity_travels_in_the_data_source_dict():
    source = DataSource("folder:/data", num_images=3, identity="0123456789abcdef", image_size=16, num_train=2)
    assert DataSource.from_dict(source.to_dict()) == source
    old = {"name": "twemoji-faces", "license": "CC-BY-4.0", "num_train": 113}  # written before the field
    assert DataSource.from_dict(old).identity == ""


def test_built_in_sets_have_an_identity(tiny_noto):
    faces = load_data("emoji-faces", 8).source.identity
    noto, noto_faces = load_data("noto-emoji", 8).source.identity, load_data("noto-emoji-faces", 8).source.identity
    assert all(re.fullmatch("[0-9a-f]{16}", i) for i in (faces, noto, noto_faces))
    assert len({faces, noto, noto_faces}) == 3
    assert load_data("noto-emoji", 4, decoding=Decoding(tiny_noto.parent / "cache")).source.identity == noto


def test_identity_survives_a_copy_and_new_times(tmp_path):
    """What a reinstall or a copy changes (the folder, the files' times) leaves the identity: a resumed run in a
    fresh environment still recognises its data (train.same_data)."""
    import os
    import shutil

    folder = write_quads(tmp_path / "images", 3)
    before = load_folder(folder, SIZE).source.identity
    copy = shutil.copytree(folder, tmp_path / "elsewhere")
    for png in copy.iterdir():
        os.utime(png, (1, 1))
    assert load_folder(copy, SIZE).source.identity == before
