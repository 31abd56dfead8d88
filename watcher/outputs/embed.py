"""The `embed` output (opt-in): the description written into the image file itself, atomically."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import stat
import threading
from collections import OrderedDict

from watcher import faults
from watcher.outputs import metadata
from watcher.outputs.base import Content, Output, Place, Record, Result, pending
from watcher.outputs.sidecar import _O_CLOEXEC, _O_NOFOLLOW, TEMP_SUFFIX, fsync_fd

# The formats ExifTool rewrites in place with every other byte of metadata kept.
EMBEDDABLE = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WebP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
# A bigger image is left alone (it would be read into memory and copied twice).
EMBED_MAX_BYTES = 256 << 20
SKIPPED = "skipped"  # an image format we do not embed into: said once, not retried


class OwnWrites:
    """The (size, mtime_ns) each image had as this process's embed left it, from just before
    its rename. The index row records it too, but only when the writer commits, and the
    rename's file event can settle before that (a loaded machine, a short settle time): the
    daemon would queue its own write and run the image again. A file matching an entry is
    exactly as we wrote it, so an entry never needs taking back; the oldest go past `cap`."""

    def __init__(self, cap: int = 4096) -> None:
        self._cap = cap
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def add(self, path: str, size: int, mtime_ns: int) -> None:
        with self._lock:
            self._seen[path] = (size, mtime_ns)
            self._seen.move_to_end(path)
            while len(self._seen) > self._cap:
                self._seen.popitem(last=False)

    def matches(self, path: str, size: int, mtime_ns: int) -> bool:
        with self._lock:
            return self._seen.get(path) == (size, mtime_ns)


# Process-wide: the file events this process sees are of the writes this process made.
OWN_WRITES = OwnWrites()


class EmbedOutput(Output):
    """dc:description, Iptc4xmpCore:AltTextAccessibility, the `prompt` task's keywords and
    EXIF ImageDescription, written by ExifTool into a copy of the image, which then
    replaces it (temp file in the same folder, fsync, rename): a reader, or a crash, sees
    the old file or the new one. Ownership per field, as for XMP (metadata.merge): what a
    photo manager changed is kept. The result carries the image's new identity, which the
    index row records, so the daemon knows the file it sees next is its own write."""

    name = "embed"

    def write(self, place: Place, content: Content, previous: Record | None) -> Result:
        image = place.image
        kind = EMBEDDABLE.get(image.suffix.lower())
        ours = previous.sha256 if previous else None
        if kind is None:
            return Result(
                Record(
                    "embed",
                    str(image),
                    ours,
                    SKIPPED,
                    f"{image.suffix or 'no extension'}: embedding is done in JPEG, PNG, "
                    "WebP and TIFF only; use the xmp output for this image",
                )
            )
        if not metadata.available():
            return pending("embed", str(image), ours, f"cannot embed: {metadata.NOT_INSTALLED}")
        found = metadata.read_capped(place.dir_fd, image.name, EMBED_MAX_BYTES)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "image deleted meanwhile", str(image))
        if isinstance(found, str):
            why = "not a regular file" if found == metadata.NOT_A_FILE else "larger than 256 MiB"
            return Result(Record("embed", str(image), ours, SKIPPED, f"{why}; not embedded"))
        old, st = found
        work = metadata.workdir()
        try:
            src, dest = work / f"in{image.suffix.lower()}", work / f"out{image.suffix.lower()}"
            src.write_bytes(old)
            try:
                merged = metadata.merge(src, dest, content, place.folder.overwrite, exif=True)
            except Exception as e:  # ExifTool cannot write this file (damaged, odd variant)
                return Result(
                    Record(
                        "embed",
                        str(image),
                        ours,
                        SKIPPED,
                        f"ExifTool cannot write this {kind} ({metadata.exiftool_says(e)}); "
                        "not embedded",
                    )
                )
            if not merged.changed:
                return _result(image, hashlib.sha256(old).hexdigest(), merged, None)
            data = dest.read_bytes()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        identity = replace_image(place.dir_fd, image.name, data, st, str(image))
        return _result(image, identity[0], merged, identity)


def _result(image, sha: str, merged: metadata.Merge, identity) -> Result:
    return Result(
        metadata.merged_record("embed", image, sha, merged),
        image_identity=identity,
        fields=merged.fields,
        wrote=identity is not None,
    )


def replace_image(
    dir_fd: int, name: str, data: bytes, before: os.stat_result, path: str
) -> tuple[str, int, int]:
    """Replace the image `name` in `dir_fd` (the image at `path`) by `data`: a temp file of
    our name form in the same folder (mode copied), fsync, rename over the image, fsync the
    folder. Raises OSError(EAGAIN) when the image changed since it was read (`before`): the
    job runs again on the new file. Returns the new file's (sha256, size, mtime_ns), which
    OWN_WRITES holds from before the rename."""
    tmp = f".{os.getpid() & 0xFFFFFFFF:08x}{secrets.token_hex(4)}{TEMP_SUFFIX}"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=dir_fd
    )
    try:
        try:
            os.fchmod(fd, stat.S_IMODE(before.st_mode))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        # Test-only seam: the kill -9 test stops here, between the fsync and the rename.
        faults.hit("embed_rename", (name,))
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        ):
            raise OSError(errno.EAGAIN, "the image changed while its description was embedded")
        # Before the rename: its event may be looked at before this returns. (A rename that
        # then fails leaves an entry no file at `path` matches: the temp's mtime is its own.)
        OWN_WRITES.add(path, after.st_size, after.st_mtime_ns)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise
    fsync_fd(dir_fd)
    return hashlib.sha256(data).hexdigest(), after.st_size, after.st_mtime_ns
