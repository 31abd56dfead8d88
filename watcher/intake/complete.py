"""End-marker checks: whether an image file's bytes are all there, from its own structure."""

from __future__ import annotations

import enum
import os
import stat
import struct
from pathlib import Path
from typing import overload

# A TIFF has no end marker: it is checked by decoding it, and only up to this size (a larger
# one waits out settle_seconds like any file without a marker; the settle thread must not
# spend seconds or gigabytes on one file).
TIFF_DECODE_PIXELS = 40_000_000
TIFF_DECODE_FRAMES = 16

_JPEG_SOI = b"\xff\xd8"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # length 0, type, CRC of "IEND"


class _Reader:
    """Reads through a window with pread: no mmap (a file truncated under a mapping kills
    the process with SIGBUS) and no whole-file read. Past the end of the file reads give
    fewer bytes (or none), which the walks take as "not there yet"."""

    WINDOW = 1 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.start = 0
        self.buf = b""

    def read(self, pos: int, n: int) -> bytes:
        end = pos + n
        if not (self.start <= pos and end <= self.start + len(self.buf)):
            self.start = pos
            self.buf = os.pread(self.fd, max(n, self.WINDOW), pos)
        return self.buf[pos - self.start : end - self.start]

    @overload
    def __getitem__(self, key: int) -> int: ...
    @overload
    def __getitem__(self, key: slice) -> bytes: ...
    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, slice):
            start = key.start or 0
            return self.read(start, max(0, key.stop - start))
        b = self.read(key, 1)
        return b[0] if b else -1  # past the end: never a valid byte

    def u16be(self, pos: int) -> int:
        b = self.read(pos, 2)
        return struct.unpack(">H", b)[0] if len(b) == 2 else -1

    def u32(self, pos: int, order: str) -> int:
        b = self.read(pos, 4)
        return struct.unpack(order + "I", b)[0] if len(b) == 4 else -1

    def find(self, needle: bytes, pos: int, size: int) -> int:
        """The first `needle` at or after `pos` (before `size`), read a window at a time."""
        while pos < size:
            chunk = self.read(pos, min(self.WINDOW, size - pos))
            if not chunk:
                return -1
            i = chunk.find(needle)
            if i >= 0:
                return pos + i
            if len(chunk) < len(needle):
                return -1
            pos += len(chunk) - len(needle) + 1
        return -1


class Verdict(enum.Enum):
    """What a file's structure says about whether it is finished."""

    COMPLETE = "complete"  # the format's end is there (and, strictly, nothing but it after)
    PARTIAL = "partial"  # a format with an end marker, and the end is not there (yet)
    UNKNOWN = "unknown"  # no end marker in this format, not an image, or not readable


def check(path: Path, *, strict: bool) -> Verdict:
    """Look at `path`'s bytes: COMPLETE only when its format's end is structurally there.

    `strict` (the close-write fast path, which skips the settle wait): the end marker must
    also be the end of the file (JPEG: bar zero padding), and a TIFF is decoded in full.
    Not strict (the settle check): trailing bytes after the end are allowed (phones append a
    video after a JPEG's EOI), and TIFF is UNKNOWN. The file is never followed through a
    symbolic link, and only regular files are opened (a named pipe would block)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return Verdict.UNKNOWN
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < 8:
            return Verdict.UNKNOWN
        return _check(_Reader(fd), st.st_size, strict, fd)
    except OSError:  # unreadable now: no verdict
        return Verdict.UNKNOWN
    finally:
        os.close(fd)


def _check(data: _Reader, size: int, strict: bool, fd: int) -> Verdict:
    head = data[:12]
    if head.startswith(_JPEG_SOI):
        return _jpeg(data, size, strict)
    if head.startswith(_PNG_SIGNATURE):
        return _png(data, size, strict)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _gif(data, size, strict)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        declared = struct.unpack_from("<I", head, 4)[0] + 8  # RIFF size excludes its header
        if size < declared:
            return Verdict.PARTIAL
        return Verdict.COMPLETE if size == declared or not strict else Verdict.UNKNOWN
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff(fd) if strict else Verdict.UNKNOWN
    return Verdict.UNKNOWN


def _jpeg(data: _Reader, size: int, strict: bool) -> Verdict:
    """Walk the marker segments by their lengths to the first start-of-scan (so a thumbnail
    inside APP1, with an EOI of its own, is stepped over), then find the EOI after it.
    Entropy-coded data never holds FF D9 (an FF there is always followed by 00 or a restart
    marker), so the first FF D9 after the first scan is the image's end; a progressive JPEG's
    later scans come before it."""
    pos = 2
    while True:
        # Markers may be preceded by any number of FF fill bytes.
        while pos < size and data[pos] == 0xFF and pos + 1 < size and data[pos + 1] == 0xFF:
            pos += 1
        if pos + 4 > size:
            return Verdict.PARTIAL
        if data[pos] != 0xFF:
            return Verdict.PARTIAL  # not a marker where one must be: corrupt or cut
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI before any scan: nothing to show
            return Verdict.PARTIAL
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers, no length
            pos += 2
            continue
        length = data.u16be(pos + 2)
        if length < 2:
            return Verdict.PARTIAL
        pos += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        if pos > size:
            return Verdict.PARTIAL
    if pos > size:
        return Verdict.PARTIAL
    if strict:
        # The last bytes, bar zero padding that some writers add, must be the EOI: nothing
        # else after it (a phone's appended video, a trailer) is proof the writer is done,
        # and settle decides. (No scan of the whole file here: the decode stage's full
        # decode is the check that follows.)
        tail = data[max(pos, size - 4096) : size].rstrip(b"\x00")
        return Verdict.COMPLETE if tail.endswith(b"\xff\xd9") else Verdict.UNKNOWN
    return Verdict.COMPLETE if data.find(b"\xff\xd9", pos, size) >= 0 else Verdict.PARTIAL


def _png(data: _Reader, size: int, strict: bool) -> Verdict:
    """Walk the chunks by their lengths: complete at an IEND chunk with its CRC."""
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= size:
        length = data.u32(pos, ">")
        if not 0 <= length <= 0x7FFFFFFF:  # the format's own limit: this is not a chunk
            return Verdict.PARTIAL
        if data[pos + 4 : pos + 8] == b"IEND":
            if data[pos : pos + 12] != _PNG_IEND:
                return Verdict.PARTIAL
            end = pos + 12
            return Verdict.COMPLETE if end == size or not strict else Verdict.UNKNOWN
        pos += 12 + length
    return Verdict.PARTIAL


def _gif(data: _Reader, size: int, strict: bool) -> Verdict:
    """Walk the block structure (extensions, images, their sub-blocks) to the trailer 0x3B.
    A 0x3B byte inside a frame's data is not the end: only one where a block must start is."""
    if size < 13:
        return Verdict.PARTIAL
    pos = 13
    flags = data[10]
    if flags & 0x80:  # global colour table
        pos += 3 * (2 << (flags & 0x07))
    while pos < size:
        block = data[pos]
        if block == 0x3B:  # trailer
            end = pos + 1
            return Verdict.COMPLETE if end == size or not strict else Verdict.UNKNOWN
        if block == 0x21:  # extension: label, then sub-blocks
            pos = _skip_sub_blocks(data, size, pos + 2)
        elif block == 0x2C:  # image descriptor, local colour table, LZW code size, data
            if pos + 10 > size:
                return Verdict.PARTIAL
            local = data[pos + 9]
            pos += 10
            if local & 0x80:
                pos += 3 * (2 << (local & 0x07))
            pos = _skip_sub_blocks(data, size, pos + 1)
        else:  # not a block: corrupt, or a writer that has not written here yet
            return Verdict.PARTIAL
        if pos < 0:
            return Verdict.PARTIAL
    return Verdict.PARTIAL


def _skip_sub_blocks(data: _Reader, size: int, pos: int) -> int:
    """The position after a chain of sub-blocks ending with a zero-length one; -1 if the
    file ends first."""
    while pos < size:
        n = data[pos]
        pos += 1 + n
        if n == 0:
            return pos
    return -1


def _tiff(fd: int) -> Verdict:
    """No end marker: a full decode of every frame (bounded) is the check."""
    from PIL import Image

    try:
        with os.fdopen(os.dup(fd), "rb") as f, Image.open(f) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > TIFF_DECODE_FRAMES:
                return Verdict.UNKNOWN
            for i in range(frames):
                im.seek(i)
                if im.width * im.height > TIFF_DECODE_PIXELS:
                    return Verdict.UNKNOWN
                im.load()
    except Exception:  # truncated strips, a header not written yet, anything Pillow says
        return Verdict.PARTIAL
    return Verdict.COMPLETE
