"""The pipeline's stages, in order: what each takes, gives and guarantees (watcher.messages)."""

from __future__ import annotations

from dataclasses import dataclass

from watcher.messages import Captioned, Failed, Job, Outcome, Work


@dataclass(frozen=True)
class Stage:
    """One stage: its threads, the messages it takes and gives, the invariant it keeps."""

    name: str  # its thread's name (a pool's prefix): shown in logs, tracebacks and py-spy
    module: str
    takes: tuple[type, ...]
    gives: tuple[type, ...]
    keeps: str


CLAIM = Stage(
    "feeder",
    "watcher.pipeline.stages",
    (),
    (Job,),
    "at most max_in_flight jobs between claim (pending -> running) and commit",
)
DECODE = Stage(
    "decode",
    "watcher.pipeline.decode",
    (Job,),
    (Work, Failed),
    "each file is read once; the model never touches a file",
)
MODEL = Stage(
    "model-worker",
    "watcher.pipeline.model_worker",
    (Work,),
    (Captioned, Failed),
    "one thread owns the model; identical bytes are run once",
)
WRITE = Stage(
    "writer",
    "watcher.pipeline.writer",
    (Captioned, Failed),
    (Outcome,),
    "a sidecar is durable before the row naming it commits; row and job state commit together",
)

# The order a job goes through them; each stage takes what the one before gives.
STAGES: tuple[Stage, ...] = (CLAIM, DECODE, MODEL, WRITE)
