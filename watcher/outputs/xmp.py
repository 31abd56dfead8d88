"""The `xmp` output: an XMP sidecar for photo managers, merged into the one already there."""

from __future__ import annotations

import errno
import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from watcher.config import FolderConfig
from watcher.messages import SidecarState
from watcher.outputs import metadata
from watcher.outputs.base import Content, Output, Place, Record, Result, pending
from watcher.outputs.sidecar import (
    NOT_A_FILE,
    SidecarRefused,
    check_name,
    follow_image,
    hash_at,
    render,
    write_atomic,
)

if TYPE_CHECKING:
    from watcher.index import Index

log = structlog.get_logger("watcher.outputs.xmp")

# darktable's sidecars grow with the edit history; beyond this it is not a sidecar.
XMP_MAX_BYTES = 32 << 20


class XmpOutput(Output):
    """`photo.jpg.xmp` (darktable, digiKam) or `photo.xmp` (Lightroom): dc:description,
    Iptc4xmpCore:AltTextAccessibility and, for the `prompt` task, dc:subject keywords,
    merged by ExifTool into the existing sidecar (every property we do not own kept).
    Ownership is per field, recorded in our namespace inside the file (metadata.merge):
    a description changed in a photo manager is left alone while keywords still update.
    The file's own hash is not the rule: photo managers rewrite their sidecars."""

    name = "xmp"

    def write(self, place: Place, content: Content, previous: Record | None) -> Result:
        folder = place.folder
        try:
            target = render(folder.xmp_sidecar, place.image)
            if target.parent != place.image.parent:
                raise SidecarRefused(f"XMP sidecar {target} is not beside its image")
            check_name(target.name, folder.extensions)
        except SidecarRefused as e:
            return pending("xmp", None, None, f"cannot write XMP sidecar: {e.reason}")
        ours = previous.sha256 if previous else None
        if not metadata.available():
            return pending(
                "xmp", str(target), ours, f"cannot write XMP sidecar: {metadata.NOT_INSTALLED}"
            )
        found = metadata.read_capped(place.dir_fd, target.name, XMP_MAX_BYTES)
        if found == NOT_A_FILE or found == metadata.TOO_BIG:
            why = "not a regular file" if found == NOT_A_FILE else "larger than 32 MiB"
            return Result(
                Record("xmp", str(target), ours, SidecarState.KEPT.value, f"{why}; left alone")
            )
        if folder.overwrite == "never" and found is not None and ours is None:
            return Result(
                Record(
                    "xmp",
                    str(target),
                    None,
                    SidecarState.KEPT.value,
                    "overwrite: never; an XMP sidecar was there already",
                )
            )
        old = found[0] if isinstance(found, tuple) else None
        work = metadata.workdir()
        try:
            src = None
            if old is not None:
                src = work / "in.xmp"
                src.write_bytes(old)
            dest = work / "out.xmp"
            try:
                merged = metadata.merge(src, dest, content, folder.overwrite, exif=False)
            except Exception as e:  # ExifTool refused the file (not XMP, damaged)
                if old is None:
                    raise
                return Result(
                    Record(
                        "xmp",
                        str(target),
                        ours,
                        SidecarState.KEPT.value,
                        f"ExifTool cannot read it ({metadata.exiftool_says(e)}); left alone",
                    )
                )
            if not merged.changed:
                sha = hashlib.sha256(old).hexdigest() if old is not None else ours
                return _result(target, sha, merged, wrote=False)
            data = dest.read_bytes()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # A photo manager that saved its sidecar while we merged must not lose that save:
        # the job is retried (and merges into the new file) instead.
        now = hash_at(place.dir_fd, target.name)
        before = hashlib.sha256(old).hexdigest() if old is not None else None
        if now != before:
            raise OSError(errno.EAGAIN, "the XMP sidecar changed while it was merged", str(target))
        sha = write_atomic(target, data, dir_fd=place.dir_fd, extensions=folder.extensions)
        return _result(target, sha, merged, wrote=True, created=old is None)


def _result(
    target, sha: str | None, merged: metadata.Merge, *, wrote: bool, created: bool = False
) -> Result:
    return Result(
        metadata.merged_record("xmp", target, sha, merged),
        fields=merged.fields,
        wrote=wrote,
        created=created,
    )


def follow(index: Index, root: Path, src: Path, dest: Path, folder: FolderConfig) -> Record | None:
    """Our XMP sidecar of `src`, renamed to its name beside `dest` (the image moved), under
    the `.txt` sidecar's rules: only a file the index says we wrote and still exactly as we
    left it, both folders opened from the root without following links, never over a file
    already at the new name. Returns the record for `dest` (caller's transaction, before
    the row moves), or None: nothing followed (the next write makes a new one)."""
    rec = index.output(src, "xmp")
    if rec is None or rec.target is None or rec.sha256 is None:
        return None
    new = follow_image(
        root,
        Path(rec.target),
        folder.xmp_sidecar,
        dest,
        rec.sha256,
        folder.extensions,
        what="XMP sidecar",
        refuse=lambda new: new.parent != dest.parent,  # an XMP is beside its image
        log=log,
    )
    if new is None:
        return None
    return Record("xmp", str(new), rec.sha256, rec.state, rec.error)
