"""File names as stored in SQLite (`encode`/`decode`, exact and reversible) and as shown (`shown`).

A file name on Linux is bytes; Python hands us a str in which every byte that is not valid
UTF-8 is a lone surrogate U+DC80..U+DCFF (PEP 383, os.fsdecode). SQLite text must be valid
UTF-8, so such a str cannot be stored as it is (sqlite3 raises UnicodeEncodeError). We
store each such byte as ESC followed by two hex digits, and a literal ESC as ESC ESC.

ESC is U+FDD0, a Unicode noncharacter: reserved for a program's internal use and never
meant to appear in text, so names that do not contain undecodable bytes (all but a hostile
few) are stored unchanged, and existing databases stay valid. The mapping works one
character at a time, so it commutes with concatenation and keeps '/' as it is:
encode(root + "/" + rel) == encode(root) + "/" + encode(rel), which keeps the
`prefix_range` subtree query exact.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ESC = "\ufdd0"
_NEEDS_ENCODING = re.compile("[\udc80-\udcff\ufdd0]")
_ENCODED = re.compile(ESC + "(" + ESC + "|[0-9a-f]{2})")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NEEDS_SHOWING = re.compile(r"[\\\udc80-\udcff]|[^\w\s!-~]|[^\S ]", re.UNICODE)


def _encode_char(m: re.Match[str]) -> str:
    c = m.group(0)
    return ESC + ESC if c == ESC else ESC + f"{ord(c) - 0xDC00:02x}"


def encode(path: str | os.PathLike[str]) -> str:
    """The text stored in the database for `path` (valid UTF-8, reversible by `decode`)."""
    s = os.fspath(path)
    if not _NEEDS_ENCODING.search(s):  # the common case: stored as it is
        return s
    return _NEEDS_ENCODING.sub(_encode_char, s)


def _decode_char(m: re.Match[str]) -> str:
    g = m.group(1)
    return ESC if g == ESC else chr(0xDC00 + int(g, 16))


def decode(stored: str) -> str:
    """The path (a str that os functions turn back into the exact bytes) for stored text."""
    if ESC not in stored:
        return stored
    return _ENCODED.sub(_decode_char, stored)


def decode_path(stored: str) -> Path:
    return Path(decode(stored))


def shown(path: str | os.PathLike[str]) -> str:
    """A path for people (terminal lines, logs, status): printable as it is, except that an
    undecodable byte is written `\\xe9`, a control character (a newline in a file name)
    `\\x0a`, other unprintable characters `\\uXXXX`, and a backslash `\\\\` (so a name that
    contains the text `\\xe9` cannot pass for one that contains the byte). One entry stays
    on one line and the output can always be encoded. --json output keeps the exact path."""
    s = os.fspath(path)
    if not _NEEDS_SHOWING.search(s):
        return s
    out = []
    for c in s:
        o = ord(c)
        if c == "\\":
            out.append("\\\\")
        elif 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif c == " " or c.isprintable():
            out.append(c)
        elif o <= 0xFF:
            out.append(f"\\x{o:02x}")
        else:
            out.append(f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
    return "".join(out)


def safe_text(text: str) -> str:
    """Any message (an error that quotes a file name) as text SQLite and a strict UTF-8
    stream accept: undecodable bytes written as `\\xe9`."""
    if not _SURROGATE.search(text):
        return text
    return _SURROGATE.sub(lambda m: shown(m.group(0)), text)
