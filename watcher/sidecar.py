"""Sidecar files: naming (with stem collisions), the overwrite policy, atomic writes."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watcher import faults

TEMP_SUFFIX = ".watcher-tmp"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# What file_hash says of a symlink, folder or pipe at a sidecar's name: it is never ours
# (so never replaced unless `overwrite: always`), and it is not opened (a FIFO would block
# the writer; a symlink may lead out of the watched folder).
NOT_A_FILE = "not a regular file"


def file_hash(path: Path) -> str | None:
    """sha256 of the regular file at `path`, None if nothing is there, NOT_A_FILE for
    anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return NOT_A_FILE
    flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    with open(fd, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def render(pattern: str, image: Path) -> Path:
    return image.with_name(pattern.format(stem=image.stem, name=image.name))


@dataclass(frozen=True)
class Naming:
    path: Path
    collision: str | None  # the other image whose sidecar name we avoided, if any


def choose_name(
    image: Path,
    pattern: str,
    extensions: tuple[str, ...],
    owner_of: Callable[[str], str | None],  # sidecar path -> owning image, from the index
    current: str | None = None,
) -> Naming:
    """Pick the sidecar path for `image`.

    `photo.jpg` and `photo.png` in one folder would share `photo.txt` under `{stem}.txt`: the
    first one to claim it keeps it (the index records owners); the second gets `{name}.txt`.
    With no owner recorded yet, the sibling whose name sorts first wins, so the choice does
    not depend on which file arrived first.
    """
    if current:
        return Naming(Path(current), None)
    wanted = render(pattern, image)
    if "{stem}" not in pattern:
        return Naming(wanted, None)
    owner = owner_of(str(wanted))
    rival: Path | None = None
    if owner is not None and owner != str(image):
        rival = Path(owner)
    elif owner is None:
        rival = _earlier_sibling(image, extensions)
    if rival is None:
        return Naming(wanted, None)
    return Naming(image.with_name(pattern.replace("{stem}", "{name}").format(
        stem=image.stem, name=image.name)), str(rival))


def _earlier_sibling(image: Path, extensions: tuple[str, ...]) -> Path | None:
    """An image with the same stem whose name sorts before ours (a few stats, no listdir).
    Plain strings and os.stat: this runs for every image the writer handles."""
    name, folder = image.name, os.path.dirname(image)
    stem = name[: len(name) - len(image.suffix)] if image.suffix else name
    mine = None
    seen = set()
    for ext in extensions:
        for variant in (ext, ext.upper()):
            other = stem + variant
            if other >= name or other in seen:
                continue
            seen.add(other)
            path = os.path.join(folder, other)
            try:
                st = os.stat(path)
                if mine is None:
                    mine = os.stat(image)
            except OSError:
                continue
            # samestat: on case-insensitive filesystems `.JPG` may be this very file.
            if not os.path.samestat(st, mine):
                return Path(path)
    return None


def decide(policy: str, sidecar: Path, ours_sha256: str | None, new_text: str) -> str:
    """'write', 'same' (already holds exactly this text) or 'keep' (someone else's file)."""
    on_disk = file_hash(sidecar)
    if on_disk is None:
        return "write"
    new = text_hash(new_text)
    if on_disk == new:
        # Also covers a crash between our rename and our index commit: captions are
        # deterministic, so the file on disk is the one we are about to write.
        return "same"
    if policy == "always":
        return "write"
    if policy == "ours" and ours_sha256 is not None and on_disk == ours_sha256:
        return "write"
    return "keep"


def write_atomic(path: Path, text: str, *, sync_dir: bool = True) -> str:
    """Write via a temp file in the same folder, fsync, rename, fsync the folder.

    A reader sees the old file or the new one, never half. The temp name is short and hidden
    (so 250-byte image names still fit and watchers ignore it) and removed on any failure.
    Returns the sha256 of what was written.
    """
    data = text.encode("utf-8")
    tmp = path.with_name(f".{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the user's umask applies
    try:
        try:
            view = memoryview(data)
            while view:
                faults.hit("sidecar_write", (str(path),))  # test-only seam; no-op normally
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:  # a caller writing many files in one folder syncs it once (fsync_dir)
        fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)


def is_temp(name: str) -> bool:
    return name.endswith(TEMP_SUFFIX)
