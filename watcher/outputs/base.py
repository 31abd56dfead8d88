"""The output seam: what is written for an image, where it goes, and how we know it is ours."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from watcher.messages import SidecarState

if TYPE_CHECKING:
    from watcher.config import FolderConfig

# The outputs a folder may list under `outputs:`, in the order they are written. `embed`
# comes last: it changes the image file itself, whose new identity the index row records.
OUTPUT_NAMES = ("txt", "xmp", "embed")
DEFAULT_OUTPUTS = ("txt",)


@dataclass(frozen=True)
class Content:
    """What every output is given for one image: the caption and where it came from."""

    caption: str  # the sidecar text without its final newline (prefix/suffix applied)
    task: str
    model: str
    revision: str | None
    # Keywords for the photo managers (the `prompt` task's comma-separated terms), or ().
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class Place:
    """Where an image's outputs go: the image, its watched root, its folder opened from the
    root without following links (outputs/sidecar.open_folder), and the folder's settings."""

    image: Path
    root: Path
    dir_fd: int
    folder: FolderConfig


@dataclass(frozen=True)
class Record:
    """The index's row for one image and one output (image_outputs): its target file, the
    hash of what we last wrote there, its state and why (pending: the error; kept: why it
    was left alone)."""

    output: str
    target: str | None
    sha256: str | None
    state: str
    error: str | None = None


@dataclass(frozen=True)
class Result:
    """What one output did for one image."""

    record: Record
    # The text the target holds when it is someone else's (kept), for the index to show.
    theirs: str | None = None
    # The image file itself changed (embed): its new (sha256, size, mtime_ns), for the row,
    # so the daemon knows its own write and does not caption the image again.
    image_identity: tuple[str, int, int] | None = None
    fields: dict[str, str] = field(default_factory=dict)  # per field: written | kept
    wrote: bool = False  # a file was (re)written now, not found already holding this
    created: bool = False  # nothing was at the target before this write


class Output(ABC):
    """One kind of file written for an image. Each has its own ownership rule: a hand edit
    in one is left alone while the others still update."""

    name: str

    @abstractmethod
    def write(self, place: Place, content: Content, previous: Record | None) -> Result:
        """Write (or leave alone) this output for `place.image`. Raises OSError only for
        errors that go away by themselves (the writer retries the job); any other problem
        is a `pending` Record with the reason, for `watcher retry`."""


def pending(output: str, target: str | None, sha256: str | None, reason: str) -> Result:
    return Result(Record(output, target, sha256, SidecarState.PENDING.value, reason))


def output_for(name: str) -> Output:
    """The Output named `name` (one of OUTPUT_NAMES other than txt, whose record is the
    images row's sidecar columns and whose writes go through outputs/sidecar.py)."""
    if name == "xmp":
        from watcher.outputs.xmp import XmpOutput

        return XmpOutput()
    if name == "embed":
        from watcher.outputs.embed import EmbedOutput

        return EmbedOutput()
    raise ValueError(f"unknown output {name!r}; expected one of {', '.join(OUTPUT_NAMES)}")


def keywords_for(task: str, caption: str, enabled: bool) -> tuple[str, ...]:
    """The `prompt` task's comma-separated terms as keywords (deduplicated, in order)."""
    if not enabled or task != "prompt":
        return ()
    seen: dict[str, None] = {}
    for term in caption.split(","):
        t = " ".join(term.split())
        if t and len(t) <= 64:
            seen.setdefault(t, None)
    return tuple(seen)
