"""A tiny colour-bitmap emoji font (CBDT/CBLC, PNG glyphs, GSUB ligatures) built with fontTools, standing in
for Noto Color Emoji in the tests: same tables, same layout (136x128-like glyphs wider than tall), a few glyphs."""
from __future__ import annotations

import io

from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen
from PIL import Image

WIDTH, HEIGHT = 18, 16  # Noto's bitmaps are 136x128: wider than tall, centre-cropped to a square (4 px off each side)
LINE_METRICS = dict(ascender=12, descender=-4, widthMax=WIDTH, caretSlopeNumerator=0, caretSlopeDenominator=0,
                    caretOffset=0, minOriginSB=0, minAdvanceSB=0, maxBeforeBL=0, minAfterBL=0, pad1=0, pad2=0)


def png(rgba: tuple[int, int, int, int], size=(WIDTH, HEIGHT)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, rgba).save(buf, "PNG")
    return buf.getvalue()


def bitmap_tables_xml(order: list[str], bitmaps: dict[str, bytes]) -> str:
    """CBLC (one 16 ppem strike, index format 1) and CBDT (format 17: small metrics + PNG) as TTX XML."""
    line = "".join(f'<{k} value="{v}"/>' for k, v in LINE_METRICS.items())
    locs = "".join(f'<glyphLoc id="{order.index(n)}" name="{n}"/>' for n in bitmaps)
    glyphs = "".join(
        f'<cbdt_bitmap_format_17 name="{n}"><SmallGlyphMetrics><height value="{HEIGHT}"/><width value="{WIDTH}"/>'
        f'<BearingX value="0"/><BearingY value="12"/><Advance value="{WIDTH}"/></SmallGlyphMetrics>'
        f'<rawimagedata>{data.hex()}</rawimagedata></cbdt_bitmap_format_17>' for n, data in bitmaps.items())
    first, last = order.index(next(iter(bitmaps))), order.index(list(bitmaps)[-1])
    return (f'<?xml version="1.0" encoding="UTF-8"?><ttFont sfntVersion="\\x00\\x01\\x00\\x00" ttLibVersion="4.0">'
            f'<CBLC><header version="3.0"/><strike index="0"><bitmapSizeTable>'
            f'<sbitLineMetrics direction="hori">{line}</sbitLineMetrics>'
            f'<sbitLineMetrics direction="vert">{line}</sbitLineMetrics>'
            f'<colorRef value="0"/><startGlyphIndex value="{first}"/><endGlyphIndex value="{last}"/>'
            f'<ppemX value="16"/><ppemY value="16"/><bitDepth value="32"/><flags value="1"/></bitmapSizeTable>'
            f'<eblc_index_sub_table_1 imageFormat="17" firstGlyphIndex="{first}" lastGlyphIndex="{last}">{locs}'
            f'</eblc_index_sub_table_1></strike></CBLC>'
            f'<CBDT><header version="3.0"/><strikedata index="0">{glyphs}</strikedata></CBDT></ttFont>')


def write_font(path, glyphs: dict[str, tuple[int | None, bytes]], ligatures=()) -> None:
    """glyphs: name -> (code point or None for a ligature-only glyph, PNG bytes); ligatures: (input glyph
    names, output glyph name) pairs, compiled into GSUB by feaLib as Noto's skin-tone sequences are."""
    order = [".notdef", *glyphs]
    fb = FontBuilder(unitsPerEm=128, isTTF=True)
    fb.setupGlyphOrder(order)
    fb.setupCharacterMap({cp: n for n, (cp, _) in glyphs.items() if cp is not None})
    fb.setupGlyf({n: TTGlyphPen(None).glyph() for n in order})
    fb.setupHorizontalMetrics({n: (136, 0) for n in order})
    fb.setupHorizontalHeader(ascent=101, descent=-27)
    fb.setupNameTable({"familyName": "Tiny Emoji", "styleName": "Regular"})
    fb.setupOS2()
    fb.setupPost()
    if ligatures:
        rules = "".join(f"  sub {' '.join(seq)} by {out};\n" for seq, out in ligatures)
        fb.addOpenTypeFeatures(f"feature ccmp {{\n{rules}}} ccmp;\n")
    fb.font.importXML(io.StringIO(bitmap_tables_xml(order, {n: data for n, (_, data) in glyphs.items()})))
    fb.save(str(path))


# A face (U+1F600), a thumbs-up, the light skin-tone modifier and the thumbs-up in that tone (a ligature).
FACE, THUMBS, TONE, THUMBS_TONE = (255, 200, 0), (0, 0, 255), (250, 220, 200), (30, 30, 30)
GLYPHS = {"u1F600": (0x1F600, png((*FACE, 255))), "u1F44D": (0x1F44D, png((*THUMBS, 255))),
          "u1F3FB": (0x1F3FB, png((*TONE, 255))), "u1F44D_1F3FB": (None, png((*THUMBS_TONE, 255)))}
LIGATURES = [(["u1F44D", "u1F3FB"], "u1F44D_1F3FB")]
