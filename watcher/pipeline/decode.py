"""Read, verify and decode one image file into a model-ready RGB picture (runs on CPU threads).

`prepare` reads the file's bytes exactly once (one open), hashes them, and decodes from memory,
so the model worker never touches the file. Every failure is a `DecodeError` whose `reason` is a
short sentence for `watcher status`; `transient` says whether a retry may succeed and `vanished`
that the file is gone (the job is to be forgotten, not failed).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import time
from pathlib import Path
from typing import cast

from PIL import Image, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from watcher.messages import Job, Prepared

# Pillow's own bomb guard (MAX_IMAGE_PIXELS) warns above 89 Mpx and raises above 179 Mpx, fixed
# and process-wide, whatever `max_pixels` says. It is switched off once, here, at import (before
# any decode thread starts, and never touched again); `prepare` checks width*height from the
# header against the configured `max_pixels` before any pixel data is decoded.
Image.MAX_IMAGE_PIXELS = None

try:  # HEIC/HEIF (iPhone photos) need the optional pillow-heif plugin.
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_AVAILABLE = True
except Exception:  # not installed, or a broken install: HEIC files get a clear reason instead
    HEIF_AVAILABLE = False

HEIF_MISSING = (
    "HEIC/HEIF needs the optional pillow-heif package: pip install 'moondream-watcher[heif]'"
)

try:  # AVIF: Pillow >= 11.2 built with libavif (its wheels are) decodes it itself.
    from PIL import features

    AVIF_AVAILABLE = bool(features.check_module("avif"))
except Exception:  # an older Pillow has no such feature
    AVIF_AVAILABLE = False

AVIF_MISSING = (
    "AVIF needs a Pillow built with AVIF support (Pillow >= 11.2 wheels are): "
    "pip install -U 'pillow>=11.2'"
)

# A truncated or empty file modified this recently may still be being written (a slow copy that
# stalled past the settle time): that failure is transient and retried; once the file is older
# the same failure is permanent.
RECENT_SECONDS = 10.0

# Formats Pillow may open. EPS is left out: Pillow decodes it by running Ghostscript on the
# file, which is no thing to do to whatever lands in a watched folder (a .jpg can hold anything).
Image.init()
_FORMATS = tuple(f for f in Image.OPEN if f not in ("EPS",))

_TRANSPOSE = {  # EXIF orientation -> the transpose that makes the picture upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_SIGNATURES = (  # magic bytes -> format, to tell "not an image" from "an image cut short"
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_HEIF_BRANDS = {
    b"heic",
    b"heix",
    b"heim",
    b"heis",
    b"hevc",
    b"hevx",
    b"hevm",
    b"hevs",
    b"mif1",
    b"mif2",
    b"msf1",
}
_AVIF_BRANDS = {b"avif", b"avis"}
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


class DecodeError(Exception):
    """Why a file could not be prepared, worded for the user."""

    def __init__(self, reason: str, *, transient: bool = False, vanished: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.vanished = vanished  # the file is gone: forget the job

    def __str__(self) -> str:
        return self.reason

    def __repr__(self) -> str:
        return f"DecodeError({self.reason!r}, transient={self.transient}, vanished={self.vanished})"


def file_identity(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of `path` as os.stat sees it now."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def prepare(job: Job, *, max_pixels: int, max_side: int, now: float | None = None) -> Prepared:
    """Read, hash and decode `job.path`. Raises DecodeError."""
    now = time.time() if now is None else now
    data, st = _read_file(_confined(Path(job.path), Path(job.root)), max_pixels)
    recent = abs(now - st.st_mtime_ns / 1e9) <= RECENT_SECONDS
    if not data:
        raise DecodeError("empty file (0 bytes)", transient=recent)
    digest = hashlib.sha256(data).hexdigest()
    image, width, height = _decode(data, max_pixels=max_pixels, max_side=max_side, recent=recent)
    return Prepared(
        job=job,
        image=image,
        sha256=digest,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        width=width,
        height=height,
        dev=st.st_dev,
        ino=st.st_ino,
    )


def decode_image(data: bytes, *, max_pixels: int, max_side: int) -> Image.Image:
    """Bytes from elsewhere than a watched file (an upload to the web API) decoded exactly as
    `prepare` decodes a file: the same formats, bomb guard and downscaling. Raises
    DecodeError."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    return _decode(data, max_pixels=max_pixels, max_side=max_side, recent=False)[0]


# --- reading ----------------------------------------------------------------------------


def _confined(path: Path, root: Path) -> Path:
    """`path` with symlinks resolved, refused if that leads out of the watched `root`: nothing
    outside the watched folders is ever opened. (The scan and the file events already skip
    such links; this is the last check, right before the open.)"""
    real = os.path.realpath(path)
    top = os.path.realpath(root)
    if real != top and not real.startswith(top.rstrip(os.sep) + os.sep):
        raise DecodeError("symbolic link points outside the watched folder; not followed")
    return Path(real)


def _read_file(path: Path, max_pixels: int) -> tuple[bytes, os.stat_result]:
    """All bytes of the regular file `path`, read through one open, and its stat. The file must
    look the same (size, mtime, inode) before and after the read."""
    try:
        before = os.stat(path)
    except OSError as e:
        raise _os_error(e) from None
    _require_regular(before)
    # An image within max_pixels is at most 8 bytes a pixel (16-bit RGBA) plus headroom for
    # metadata and extra frames; anything bigger would only be read into memory to be refused.
    limit = max_pixels * 8 + 256 * 2**20
    if before.st_size > limit:
        raise DecodeError(
            f"file too large: {before.st_size / 2**20:,.0f} MiB "
            f"(the limit for max_pixels is {limit / 2**20:,.0f} MiB)"
        )
    # O_NONBLOCK: should the path have become a FIFO since the stat, the open must not hang.
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_NOCTTY", 0)
        | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(path, flags)
        try:
            opened = os.fstat(fd)
            _require_regular(opened)
            if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
                raise DecodeError("file changed while being read", transient=True)
            data = _read_all(fd)
        finally:
            os.close(fd)
        after = os.stat(path)
    except OSError as e:
        raise _os_error(e) from None
    except MemoryError:
        raise DecodeError("not enough memory to read the file", transient=True) from None
    if len(data) != before.st_size or _identity(after) != _identity(before):
        raise DecodeError("file changed while being read", transient=True)
    return data, before


def _read_all(fd: int) -> bytes:
    """The bytes from `fd` to its end (a seam for tests that change the file mid-read)."""
    with open(fd, "rb", closefd=False) as f:
        return f.read()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def _require_regular(st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    m = st.st_mode
    kind = (
        "a directory"
        if stat.S_ISDIR(m)
        else "a named pipe"
        if stat.S_ISFIFO(m)
        else "a socket"
        if stat.S_ISSOCK(m)
        else "a device"
        if stat.S_ISCHR(m) or stat.S_ISBLK(m)
        else "a special file"
    )
    raise DecodeError(f"not a regular file ({kind})")


def _os_error(e: OSError) -> DecodeError:
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return DecodeError("file disappeared before it could be read", vanished=True)
    if isinstance(e, PermissionError):
        return DecodeError("permission denied reading the file", transient=True)
    if e.errno == errno.ELOOP:
        return DecodeError("cannot read the file: too many levels of symbolic links")
    if e.errno == errno.ENAMETOOLONG:
        return DecodeError("cannot read the file: file name too long")
    if e.errno == errno.ENOMEM:
        return DecodeError("not enough memory to read the file", transient=True)
    # EBUSY, EAGAIN, EINTR, EIO, ESTALE (network shares), ...: may pass; retries are bounded.
    return DecodeError(f"cannot read the file right now: {e.strerror or e}", transient=True)


# --- decoding ---------------------------------------------------------------------------


def _corrupt(detail: str, recent: bool) -> DecodeError:
    return DecodeError(f"truncated or corrupt image: {detail}", transient=recent)


def _mpx(n: int) -> str:
    return f"{n / 1e6:.1f} Mpx"


def _decode(
    data: bytes, *, max_pixels: int, max_side: int, recent: bool
) -> tuple[Image.Image, int, int]:
    try:
        im = Image.open(io.BytesIO(data), formats=_FORMATS)  # lazy: reads the header only
    except UnidentifiedImageError:
        raise _unidentified(data, recent) from None
    except MemoryError:
        raise DecodeError("not enough memory to decode the image", transient=True) from None
    except Exception as e:  # a known header cut short or malformed
        fmt = _signature(data)
        raise _corrupt(f"{fmt} header could not be read" if fmt else _message(e), recent) from None
    with im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise _corrupt(f"image has no pixels ({w}x{h})", recent)
        if w * h > max_pixels:  # before any pixel data is decoded
            raise DecodeError(
                f"image too large: {w}x{h} = {_mpx(w * h)} exceeds max_pixels ({_mpx(max_pixels)})"
            )
        try:
            return _load(im, max_side)
        except DecodeError:
            raise
        except MemoryError:
            raise DecodeError("not enough memory to decode the image", transient=True) from None
        except Exception as e:
            raise _corrupt(_message(e), recent) from None


def _load(im: Image.Image, max_side: int) -> tuple[Image.Image, int, int]:
    w, h = im.size
    scale = max_side / max(w, h)
    if isinstance(im, JpegImageFile) and scale < 1:
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, no smaller than the final size.
        im.draft("RGB", (max(1, int(w * scale + 1)), max(1, int(h * scale + 1))))
    im.load()  # the first frame of an animation
    orientation = _orientation(im)  # after load: PNG keeps EXIF after the pixel data
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    out = _normalize_mode(im)
    if max(out.size) > max_side:
        out.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    if orientation in _TRANSPOSE:
        out = out.transpose(_TRANSPOSE[orientation])
    if out.mode == "RGBA":  # transparent areas become white, as viewers show them
        background = Image.new("RGBA", out.size, (255, 255, 255, 255))
        background.alpha_composite(out)
        out = background
    # Always a new, plain Image: nothing refers back to the file object.
    return out.convert("RGB"), w, h


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if int(value) in _TRANSPOSE else 1
    except Exception:  # unreadable EXIF never fails an image that decodes
        return 1


def _normalize_mode(im: Image.Image) -> Image.Image:
    """`im` as RGB, RGBA (when it has any transparency) or L, scaled to 8 bits."""
    mode = im.mode
    if mode in ("RGB", "RGBA", "L") and "transparency" not in im.info:
        return im
    if mode in _ALPHA_MODES or "transparency" in im.info:
        if mode.startswith("I") or mode == "F":
            return _to_8bit(im)
        return im.convert("RGBA")
    if mode.startswith("I") or mode == "F":
        return _to_8bit(im)
    if mode in ("1", "L"):
        return im.convert("L")
    try:
        return im.convert("RGB")  # P, CMYK, YCbCr, ...
    except ValueError:
        raise DecodeError(f"unsupported image mode {mode}") from None


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey to L, scaled (Pillow's own conversion clips: all white)."""
    lo: float
    hi: float
    if im.mode.startswith("I;16"):
        im, lo, hi = im.convert("I"), 0, 65535
    else:
        lo, hi = cast("tuple[float, float]", im.getextrema())  # one band: (min, max)
    if im.mode == "F" and 0 <= lo and hi <= 1:
        scale, offset = 255.0, 0.0
    elif 0 <= lo and hi <= 255:
        scale, offset = 1.0, 0.0
    elif 0 <= lo and hi <= 65535:
        scale, offset = 1 / 256, 0.0
    else:
        scale = 255 / (hi - lo)
        offset = -lo * scale
    return im.point(lambda v: v * scale + offset).convert("L")


def _unidentified(data: bytes, recent: bool) -> DecodeError:
    if data[4:8] == b"ftyp":
        brands = {data[i : i + 4] for i in range(8, min(len(data), 64), 4)}
        if brands & _HEIF_BRANDS and not brands & _AVIF_BRANDS and not HEIF_AVAILABLE:
            return DecodeError(HEIF_MISSING)
        if brands & _AVIF_BRANDS:
            if AVIF_AVAILABLE:
                return _corrupt("AVIF data could not be read", recent)
            return DecodeError(AVIF_MISSING)
    fmt = _signature(data)
    if fmt:
        return _corrupt(f"{fmt} header could not be read", recent)
    return DecodeError("not an image (cannot identify image file)")


def image_format(head: bytes) -> str | None:
    """The image format the first bytes of a file announce (JPEG, PNG, GIF, TIFF, WEBP,
    HEIF, AVIF), or None: a cheap look, for files whose name says nothing."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AVIF_BRANDS:
            return "AVIF"
        if brand in _HEIF_BRANDS:
            return "HEIF"
    return _signature(head)


def _signature(data: bytes) -> str | None:
    """The format whose magic bytes `data` starts with, if one of the common ones."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    return None


def _message(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if not text:
        text = type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
