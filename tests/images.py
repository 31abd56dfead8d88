"""Real test images, written to disk: the ordinary kinds and the awkward ones (CMYK, 16-bit,
transparency, animations, EXIF rotation, truncated, decompression bombs, not-images).

Every `write_*` function writes `path` (creating parent folders) and returns it.
"""

from __future__ import annotations

import colorsys
import functools
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

RED = (200, 30, 30)
GREEN = (30, 200, 30)
BLUE = (30, 30, 200)


def _parent(path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_jpeg(
    path: Path | str,
    size: tuple[int, int] = (64, 48),
    color: tuple[int, int, int] = RED,
    exif_orientation: int | None = None,
    *,
    marker: bool = False,
    quality: int = 90,
) -> Path:
    """A solid-colour JPEG. `exif_orientation` sets the EXIF Orientation tag (the pixels are
    stored as given). `marker` puts a black square in the stored top-left corner, so a test can
    see where the image's corner ended up."""
    path = _parent(path)
    im = Image.new("RGB", size, color)
    if marker:
        ImageDraw.Draw(im).rectangle((0, 0, size[0] // 4, size[1] // 4), fill=(0, 0, 0))
    kw: dict = {"quality": quality}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif.tobytes()
    im.save(path, "JPEG", **kw)
    return path


def write_png(
    path: Path | str,
    size: tuple[int, int] = (64, 48),
    color: tuple[int, ...] = GREEN,
    mode: str = "RGB",
) -> Path:
    """A solid PNG in `mode` (RGB, RGBA, L, LA, P, 1, ...); `color` is given in that mode."""
    path = _parent(path)
    Image.new(mode, size, color).save(path, "PNG")
    return path


def write_cmyk_jpeg(
    path: Path | str,
    size: tuple[int, int] = (64, 48),
    cmyk: tuple[int, int, int, int] = (0, 255, 255, 0),
) -> Path:
    """A CMYK JPEG (as print workflows write them); the default ink is pure red."""
    path = _parent(path)
    Image.new("CMYK", size, cmyk).save(path, "JPEG", quality=95)
    return path


def write_png16(path: Path | str, size: tuple[int, int] = (256, 32)) -> Path:
    """A 16-bit greyscale PNG (mode I;16): a left-to-right gradient from 0 to 65535."""
    path = _parent(path)
    w, h = size
    row = b"".join(struct.pack("<H", x * 65535 // max(1, w - 1)) for x in range(w))
    Image.frombytes("I;16", size, row * h).save(path, "PNG")
    return path


def write_palette_png_transparent(path: Path | str, size: tuple[int, int] = (64, 48)) -> Path:
    """A palette PNG whose background (index 0, black in the palette) is fully transparent,
    with an opaque red square in the middle. A naive conversion shows the background black."""
    path = _parent(path)
    im = Image.new("P", size, 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    w, h = size
    ImageDraw.Draw(im).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=1)
    im.save(path, "PNG", transparency=0)
    return path


def write_rgba_png(path: Path | str, size: tuple[int, int] = (64, 48)) -> Path:
    """An RGBA PNG: left half fully transparent black (0,0,0,0), right half opaque blue."""
    path = _parent(path)
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle((size[0] // 2, 0, size[0], size[1]), fill=(*BLUE, 255))
    im.save(path, "PNG")
    return path


def write_la_png(path: Path | str, size: tuple[int, int] = (64, 48)) -> Path:
    """A grey+alpha PNG: left half transparent black, right half opaque dark grey (60)."""
    path = _parent(path)
    im = Image.new("LA", size, (0, 0))
    ImageDraw.Draw(im).rectangle((size[0] // 2, 0, size[0], size[1]), fill=(60, 255))
    im.save(path, "PNG")
    return path


def _frames(size: tuple[int, int], colors) -> list[Image.Image]:
    return [Image.new("RGB", size, c) for c in colors]


def write_animated_gif(
    path: Path | str, size: tuple[int, int] = (64, 48), colors=(RED, GREEN, BLUE)
) -> Path:
    """An animated GIF, one solid frame per colour (the first frame is `colors[0]`)."""
    path = _parent(path)
    first, *rest = _frames(size, colors)
    first.save(path, "GIF", save_all=True, append_images=rest, duration=100, loop=0)
    return path


def write_animated_webp(
    path: Path | str, size: tuple[int, int] = (64, 48), colors=(RED, GREEN, BLUE)
) -> Path:
    """An animated WebP, one solid frame per colour (the first frame is `colors[0]`)."""
    path = _parent(path)
    first, *rest = _frames(size, colors)
    first.save(path, "WEBP", save_all=True, append_images=rest, duration=100, loop=0, lossless=True)
    return path


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


@functools.lru_cache(maxsize=4)
def _bomb_png_bytes(width: int, height: int) -> bytes:
    # 1-bit greyscale, all rows zero: (1 filter byte + width/8 bytes) per row, compressed in
    # pieces so the raw 100+ MB never exists in memory at once. Deflate tops out near 1000:1,
    # so 30000x30000 is about 110 KB on disk and 900 MB once Pillow loads it (1 byte/pixel).
    row = bytes(1 + (width + 7) // 8)
    rows_per_piece = max(1, (4 << 20) // len(row))
    piece = row * rows_per_piece
    z = zlib.compressobj(9)
    out = []
    left = height
    while left:
        n = min(left, rows_per_piece)
        out.append(z.compress(piece if n == rows_per_piece else row * n))
        left -= n
    out.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", b"".join(out))
        + _chunk(b"IEND", b"")
    )


def write_bomb_png(path: Path | str, size: tuple[int, int] = (30000, 30000)) -> Path:
    """A decompression bomb: a valid black 1-bit PNG of `size` (900 Mpx by default) that is
    only ~110 KB on disk. Generated without ever holding the pixels."""
    path = _parent(path)
    path.write_bytes(_bomb_png_bytes(*size))
    return path


def write_big_jpeg(path: Path | str, size: tuple[int, int] = (8000, 6000)) -> Path:
    """A large photo-sized JPEG (48 Mpx by default), ~0.5 s to make: a smooth gradient, red
    rising from top to bottom, green falling, blue constant 128."""
    path = _parent(path)
    g = Image.linear_gradient("L").resize(size, Image.Resampling.BILINEAR)  # 0 top, 255 bottom
    im = Image.merge(
        "RGB", (g, g.transpose(Image.Transpose.FLIP_TOP_BOTTOM), Image.new("L", size, 128))
    )
    im.save(path, "JPEG", quality=70)
    return path


def write_truncated_jpeg(path: Path | str, size: tuple[int, int] = (256, 192)) -> Path:
    """A detailed JPEG cut to its first half, as a copy interrupted mid-way leaves it."""
    path = _parent(path)
    im = Image.merge("RGB", [Image.effect_noise(size, 60 + 20 * i) for i in range(3)])
    buf = _jpeg_bytes(im)
    path.write_bytes(buf[: len(buf) // 2])
    return path


def _jpeg_bytes(im: Image.Image) -> bytes:
    import io

    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_text_as_png(path: Path | str, text: str = "this is not an image\n") -> Path:
    """A text file (typically named .png)."""
    path = _parent(path)
    path.write_text(text, encoding="utf-8")
    return path


def write_empty(path: Path | str) -> Path:
    """A zero-byte file (typically named .jpg)."""
    path = _parent(path)
    path.write_bytes(b"")
    return path


def write_fake_heic(path: Path | str) -> Path:
    """The start of a HEIC file as an iPhone writes it (an ISO-BMFF `ftyp` box with the heic
    brand), followed by filler. Enough to be recognised as HEIC; not decodable."""
    path = _parent(path)
    ftyp = b"ftyp" + b"heic" + struct.pack(">I", 0) + b"mif1heicmiaf"
    path.write_bytes(struct.pack(">I", 4 + len(ftyp)) + ftyp + bytes(200))
    return path


def distinct_color(i: int) -> tuple[int, int, int]:
    """A saturated colour for index `i`; neighbouring indices differ strongly (golden-ratio
    hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def distinct_pil(i: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """An RGB picture for index `i`: its own background colour, one of four shapes (circle,
    square, triangle, stripes) in a contrasting colour at a position that moves with `i`."""
    w, h = size
    bg = distinct_color(i)
    fg = distinct_color(i + 7)
    if sum(abs(a - b) for a, b in zip(bg, fg, strict=True)) < 150:
        fg = tuple(255 - c for c in bg)
    im = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(im)
    s = min(w, h) // 2
    x = (i * 13) % max(1, w - s)
    y = (i * 7) % max(1, h - s)
    shape = i % 4
    if shape == 0:
        d.ellipse((x, y, x + s, y + s), fill=fg)
    elif shape == 1:
        d.rectangle((x, y, x + s, y + s), fill=fg)
    elif shape == 2:
        d.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=fg)
    else:
        for k in range(0, w, 8):
            d.rectangle((k, 0, k + 3, h), fill=fg)
    return im


def distinct_image(i: int, path: Path | str, size: tuple[int, int] = (96, 72)) -> Path:
    """Write `distinct_pil(i)` to `path`, in the format its suffix names (.jpg, .png, .webp,
    .gif, .bmp, .tif, ...). Different `i` give visually different images and different bytes."""
    path = _parent(path)
    im = distinct_pil(i, size)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: no image format for suffix {path.suffix!r}")
    im.save(path, fmt)
    return path
