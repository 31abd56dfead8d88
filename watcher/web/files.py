"""An indexed image's bytes, opened only under a watched folder and never through a link."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from watcher.config import Config
from watcher.index import ImageRow
from watcher.outputs.sidecar import FolderMoved, open_folder
from watcher.pipeline.decode import image_format

_READ_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in must not hang the request
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOCTTY", 0)
)
_CHUNK = 1 << 16

# What a browser shows itself; anything else (TIFF, HEIF) is shown as a rendition.
CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "AVIF": "image/avif",
    "TIFF": "image/tiff",
    "HEIF": "image/heif",
}
BROWSER_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "AVIF"})


@dataclass(frozen=True)
class Opened:
    """An open image file (the caller closes `fd`) and what its first bytes say it is."""

    fd: int
    size: int
    mtime_ns: int
    format: str | None

    def read_all(self, limit: int) -> bytes | None:
        """Every byte (None above `limit`: not read into memory)."""
        if self.size > limit:
            return None
        os.lseek(self.fd, 0, os.SEEK_SET)
        chunks = []
        total = 0
        while chunk := os.read(self.fd, _CHUNK):
            total += len(chunk)
            if total > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        os.close(self.fd)


def watched_root(config: Config, row: ImageRow) -> Path | None:
    """The row's watched folder if it is one now and the image is below it, else None."""
    roots = {str(f.path) for f in config.folders}
    if row.root not in roots:
        return None
    root, path = Path(row.root), Path(row.path)
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    if not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
        return None
    return root


def open_image(config: Config, row: ImageRow) -> Opened | None:
    """The indexed image `row` opened for reading, or None (so a 404): its folder is not
    watched now, a folder on the way or the file itself is a symbolic link (whatever was
    swapped in since it was indexed), it is not a regular file, or it is gone. Folders are
    opened one by one from the watched root without following links (as the writer does)."""
    root = watched_root(config, row)
    if root is None:
        return None
    path = Path(row.path)
    try:
        dir_fd = open_folder(root, path.parent)
    except (OSError, FolderMoved):
        return None
    try:
        try:
            fd = os.open(path.name, _READ_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.ENOENT, errno.EACCES, errno.ENOTDIR):
                return None
            raise
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        head = os.pread(fd, 32, 0)
    except OSError:
        os.close(fd)
        return None
    return Opened(fd, st.st_size, st.st_mtime_ns, image_format(head))
