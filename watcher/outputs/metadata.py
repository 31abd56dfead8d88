"""Captions into XMP/EXIF metadata through ExifTool, merging, each field with its ownership rule."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher.messages import SidecarState
from watcher.outputs.base import Content, Record
from watcher.outputs.sidecar import NOT_A_FILE, _open_regular

CONFIG = Path(__file__).with_name("exiftool.config")
NOT_INSTALLED = (
    "exiftool is not installed (Debian/Ubuntu: apt install libimage-exiftool-perl; "
    "macOS: brew install exiftool; it must be on the daemon's PATH)"
)
TOO_BIG = "too big"

# (tag we fill, the tag in our namespace that records what we wrote there)
DESCRIPTION = ("XMP-dc:Description", "XMP-mdwatcher:Description")
ALT_TEXT = ("XMP-iptcCore:AltTextAccessibility", "XMP-mdwatcher:AltText")
IMAGE_DESCRIPTION = ("IFD0:ImageDescription", "XMP-mdwatcher:ImageDescription")
SUBJECT, OUR_KEYWORDS = "XMP-dc:Subject", "XMP-mdwatcher:Keywords"
_PROVENANCE = ("XMP-mdwatcher:Model", "XMP-mdwatcher:Revision", "XMP-mdwatcher:Task")


def available() -> bool:
    return shutil.which("exiftool") is not None


def one_line(text: str) -> str:
    """Metadata values are one line (ExifTool's argument channel is line-based; photo
    managers show descriptions as one paragraph)."""
    return " ".join(text.split())


@dataclass(frozen=True)
class Merge:
    """What merging our fields into a file did: `changed` (something to write), and per
    field whether it is ours now (written, or already holding our text) or kept."""

    changed: bool
    fields: dict[str, str]

    @property
    def kept(self) -> list[str]:
        return [f for f, state in self.fields.items() if state == "kept"]


class _Sessions(threading.local):
    tool: Any = None


_sessions = _Sessions()
_all: list[Any] = []
_all_lock = threading.Lock()


def _tool() -> Any:
    """This thread's ExifTool process (`-stay_open`: one Perl start per thread, not per
    image), started on first use with our namespace's config."""
    if _sessions.tool is None:
        import exiftool

        tool = exiftool.ExifToolHelper(
            config_file=str(CONFIG), common_args=["-G1", "-struct", "-charset", "utf8"]
        )
        # ExifTool leaves a value that looks like a number unquoted in its JSON ("1.50"
        # comes out as 1.50): parsed as text, it stays exactly what the file holds, so a
        # caption such as "1.50" is still recognised as the one we wrote.
        tool.set_json_loads(json.loads, parse_float=str, parse_int=str)
        tool.run()
        _sessions.tool = tool
        with _all_lock:
            _all.append(tool)
    return _sessions.tool


def close_session() -> None:
    """Stop this thread's ExifTool process (a thread that ends calls this: the writer)."""
    tool, _sessions.tool = _sessions.tool, None
    if tool is None:
        return
    with _all_lock:
        if tool in _all:
            _all.remove(tool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tool.terminate()
        except Exception:  # it ended already
            pass


@atexit.register
def _stop_all() -> None:
    with _all_lock, warnings.catch_warnings():
        # A process that already ended (its pipe closed first at exit) is not news.
        warnings.simplefilter("ignore")
        for tool in _all:
            try:
                tool.terminate()
            except Exception:  # exiting anyway
                pass
        _all.clear()


def read_fields(path: Path, *, exif: bool) -> dict[str, Any]:
    """The fields we own or track, as ExifTool reads them from `path` (a file of ours in a
    private folder: never a path inside a watched folder)."""
    tags = [DESCRIPTION[0], ALT_TEXT[0], SUBJECT, "XMP-mdwatcher:all"]
    if exif:
        tags.append(IMAGE_DESCRIPTION[0])
    found = _tool().execute_json(*(f"-{t}" for t in tags), str(path))
    return dict(found[0]) if found else {}


def merge(src: Path | None, dest: Path, content: Content, policy: str, *, exif: bool) -> Merge:
    """Merge our fields into `src` (None: a new XMP file), written to `dest` when anything
    changes. Every property we do not own is carried over by ExifTool as it was.

    Ownership, per field: absent, or still exactly the text our namespace says we wrote
    there: ours, replaced. Anything else was written by someone else (a photo manager)
    and is kept (`overwrite: always` replaces it; `never` writes only absent fields).
    Keywords: ours are added to the user's, and those we added before and no longer
    want are removed; the user's are never touched."""
    current = read_fields(src, exif=exif) if src is not None else {}
    text = one_line(content.caption)
    args: list[str] = []
    fields: dict[str, str] = {}
    wanted = [("description", DESCRIPTION), ("alt_text", ALT_TEXT)]
    if exif:
        wanted.append(("image_description", IMAGE_DESCRIPTION))
    for name, (tag, record) in wanted:
        now = _text(current.get(tag))
        ours = now is None or (policy == "ours" and now == _text(current.get(record)))
        if policy == "always" or ours:
            fields[name] = "written"
            if now != text or _text(current.get(record)) != text:
                args += [f"-{tag}={text}", f"-{record}={text}"]
        else:
            fields[name] = "kept"
    subject = _list(current.get(SUBJECT))
    before = _list(current.get(OUR_KEYWORDS))
    want = [one_line(k) for k in content.keywords if one_line(k)]
    # A keyword the user had before we came is theirs, even if we would write it too.
    mine = [k for k in want if k not in subject or k in before]
    for k in before:
        if k not in want and k in subject:
            args.append(f"-{SUBJECT}-={k}")
    for k in want:
        if k not in subject:
            args.append(f"-{SUBJECT}+={k}")
    if mine != before:
        args += [f"-{OUR_KEYWORDS}="] + [f"-{OUR_KEYWORDS}+={k}" for k in mine]
    fields["keywords"] = "written"
    if not args:
        return Merge(False, fields)
    for tag, value in zip(
        _PROVENANCE, (content.model, content.revision or "", content.task), strict=True
    ):
        args.append(f"-{tag}={one_line(value)}")
    tool = _tool()
    if src is None:
        tool.execute(*args, "-o", str(dest))
    else:
        # Edited in place (a copy, in our private folder): ExifTool 12.57 refuses `-o`
        # into a new WebP ("Can't write RIFF files") but rewrites one in place.
        shutil.copyfile(src, dest)
        tool.execute(*args, "-overwrite_original", str(dest))
    return Merge(True, fields)


def merged_record(output: str, target: Path, sha: str | None, merged: Merge) -> Record:
    """The xmp/embed record of a merge: `kept` while someone else's description stands
    (keywords alone kept is still `written`), with which fields were left alone."""
    kept = merged.kept
    state = SidecarState.KEPT if "description" in kept else SidecarState.WRITTEN
    error = (
        f"{' and '.join(kept)} changed by someone else (a photo manager); left alone"
        if kept
        else None
    )
    return Record(output, str(target), sha, state.value, error)


def exiftool_says(e: Exception) -> str:
    """The first line of what ExifTool said when it refused a file."""
    text = str(getattr(e, "stderr", "") or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return one_line(str(value))


def _list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


def read_capped(dir_fd: int, name: str, cap: int) -> tuple[bytes, os.stat_result] | str | None:
    """The bytes and stat of the regular file `name` in `dir_fd` (no link followed, never a
    pipe), None if absent, NOT_A_FILE, or TOO_BIG above `cap` bytes."""
    opened = _open_regular(dir_fd, name)
    if not isinstance(opened, tuple):
        return opened
    fd, st = opened
    try:
        if st.st_size > cap:
            return TOO_BIG
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > cap:
                return TOO_BIG
            chunks.append(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def workdir() -> Path:
    """A private folder for ExifTool's files (never inside a watched folder): removed by
    the caller (shutil.rmtree) after each write. Under the systemd unit /tmp may be
    read-only (ProtectSystem=strict): its CacheDirectory ($CACHE_DIRECTORY) is writable."""
    base = os.environ.get("CACHE_DIRECTORY", "").split(":")[0] or None
    return Path(tempfile.mkdtemp(prefix="watcher-meta-", dir=base))


__all__ = ["NOT_A_FILE", "available", "merge", "read_capped", "workdir"]
