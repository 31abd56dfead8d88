"""The messages the pipeline's stages hand each other, and the states a job, image or sidecar is in.

Flow (watcher.pipeline.STAGES): the jobs table gives a `Job`; decoding turns it into `Work`
(a `Prepared` image and its tasks) or a `Failed`; the model worker turns `Work` into
`Captioned` or `Failed`; the writer turns those into an `Outcome`. Every message is frozen:
a stage never changes what it was handed. States are `str` enums whose values are the very
strings stored in SQLite and printed in `--json` output.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from watcher.tasks import Task

if TYPE_CHECKING:  # Pillow is only needed by the stages that make or read pictures
    from PIL import Image


class _Str(str, Enum):
    """A state that is its string: compares, hashes, formats and stores as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class JobState(_Str):
    """A row of the jobs table: pending -> running -> done | failed; skipped is never claimed."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # not captioned where it is (a link out of the root, a named pipe)


class OutcomeState(_Str):
    """What happened to one image in this run (progress lines, `--json`, the summary)."""

    DONE = "done"  # captioned; its row committed (the sidecar may be kept or pending)
    FAILED = "failed"  # gave up: `watcher retry` runs it again
    RETRY = "retry"  # a transient failure: queued again with backoff
    REQUEUED = "requeued"  # changed, moved or deleted while captioned: runs again
    GONE = "gone"  # deleted before its row was written: forgotten
    SKIPPED = "skipped"  # its folder became a link: not captioned there


class SidecarState(_Str):
    """The images table's sidecar_state column."""

    WRITTEN = "written"  # holds our caption (written now, or already identical)
    KEPT = "kept"  # someone else's (or edited) file, left alone; the index holds its text
    PENDING = "pending"  # could not be written; the caption waits in the index for `retry`


@dataclass(frozen=True)
class Job:
    """One claimed unit of work. `gen` detects a re-enqueue while it was running."""

    id: int
    path: Path
    root: Path
    gen: int
    attempts: int


@dataclass(frozen=True, eq=False)
class Prepared:
    """A job's file read once, hashed and decoded: all the later stages know of it."""

    job: Job
    image: Image.Image  # RGB, upright (EXIF orientation applied), max(w, h) <= max_side
    sha256: str  # of the file bytes
    size: int  # bytes
    mtime_ns: int
    width: int  # original size, upright, for the index
    height: int
    # The file read, so the writer can tell it is still this very file (0: not known).
    dev: int = 0
    ino: int = 0


@dataclass(frozen=True, eq=False)
class Work:
    """What the decode stage hands the worker: an image and the tasks its folder asks for."""

    prepared: Prepared
    tasks: tuple[Task, ...]


@dataclass(frozen=True, eq=False)
class Captioned:
    """Raw model outputs for one image, one per task, in task order."""

    prepared: Prepared
    tasks: tuple[Task, ...]
    outputs: tuple[str, ...]
    model: str
    revision: str | None
    reused: bool  # taken from identical bytes captioned before: no model work
    model_ms: float
    batch: int = 0  # images in the model call that captioned it (0: no model call)


@dataclass(frozen=True)
class Failed:
    """A job that produced no caption, and why."""

    job: Job
    reason: str
    transient: bool = False  # a retry may succeed: queued again with backoff
    vanished: bool = False  # the file is gone: the job is forgotten, not failed
    identity: tuple[int, int] | None = None  # (size, mtime_ns) of the file that failed


@dataclass(frozen=True)
class Outcome:
    """What happened to one image, for progress output, stats and tests.

    Plain strings are accepted for the states and checked: a state nothing knows raises."""

    path: str
    state: OutcomeState
    reason: str | None = None  # failed/skipped: why; done: why the sidecar is pending or kept
    caption: str | None = None
    sidecar: str | None = None
    sidecar_state: SidecarState | None = None
    reused: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", OutcomeState(self.state))
        if self.sidecar_state is not None:
            object.__setattr__(self, "sidecar_state", SidecarState(self.sidecar_state))


class _Stop:
    """The end of a hand-off: the stage that takes it finishes and passes it on."""

    def __repr__(self) -> str:
        return "STOP"


STOP = _Stop()
