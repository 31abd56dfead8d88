"""The pipeline's stages in-process over real files: sidecars, index rows, job states, stop."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import queue
import threading
from pathlib import Path

import pytest
from daemon_harness import wait_for
from images import distinct_image
from PIL import Image

from watcher.config import Config, FolderConfig
from watcher.index import Index, connect, transaction
from watcher.jobs import JobQueue
from watcher.messages import (
    STOP,
    Captioned,
    Failed,
    Job,
    JobState,
    Outcome,
    OutcomeState,
    SidecarState,
)
from watcher.pipeline import STAGES
from watcher.pipeline.decode import prepare
from watcher.pipeline.stages import Pipeline
from watcher.pipeline.writer import Writer
from watcher.tasks import Task

TASKS = (Task("short"),)


def _pixels(im) -> str:
    return hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()


class FakeBackend:
    """An in-process model that answers, per picture, what `answers` holds for its pixels."""

    name, revision = "fake-model", "rev1"

    def __init__(self, answers: dict[str, str], max_batch: int = 4) -> None:
        self.answers = answers
        self.max_batch = max_batch
        self.calls: list[int] = []

    def describe(self, images, tasks):
        self.calls.append(len(images))
        return [[self.answers[_pixels(im)]] for im in images]

    def close(self) -> None:
        pass


def _config(tmp_path: Path, pics: Path, **folder) -> Config:
    return Config(
        folders=(FolderConfig(path=pics, **folder),),
        database=tmp_path / "index.db",
        decode_threads=1,
        retry_backoff=0.01,
    )


def _images(pics: Path, names: list[str]) -> dict[str, Path]:
    """Write one distinct image per name; the hash of its pixels -> its path."""
    made = {}
    for i, name in enumerate(names):
        path = distinct_image(i, pics / name)
        with Image.open(path) as im:
            made[_pixels(im)] = path
    assert len(made) == len(names)
    return made


def _queue(cfg: Config, paths: list[Path]) -> JobQueue:
    jobs = JobQueue(connect(cfg.database))
    jobs.enqueue_many((p, cfg.folders[0].path) for p in paths)
    return jobs


def _drain(cfg: Config, backend, jobs: JobQueue, *, n: int) -> tuple[Pipeline, list[Outcome]]:
    outcomes: list[Outcome] = []
    pipeline = Pipeline(cfg, backend, on_outcome=outcomes.append)

    def drained() -> bool:
        counts = jobs.counts()
        return len(outcomes) >= n and counts["pending"] + counts["running"] == 0

    pipeline.start()
    try:
        assert pipeline.wait_until(drained, timeout=60), f"not drained: {jobs.counts()}"
    finally:
        pipeline.stop()
    return pipeline, outcomes


# -- the stages, named in one place ---------------------------------------------------------


def test_each_stage_takes_what_the_one_before_gives_and_its_threads_bear_its_name(tmp_path):
    assert [s.name for s in STAGES] == ["feeder", "decode", "model-worker", "writer"]
    for before, after in zip(STAGES, STAGES[1:], strict=False):
        assert set(after.takes) & set(before.gives), (before.name, after.name)
    handed_on = {t for s in STAGES[:-1] for t in s.gives}
    assert handed_on <= {t for s in STAGES for t in s.takes}, "a message nobody takes"
    assert set(STAGES[-1].gives) == {Outcome}

    pics = tmp_path / "pics"
    made = _images(pics, ["a.jpg"])
    cfg = _config(tmp_path, pics)
    pipeline = Pipeline(cfg, FakeBackend(dict.fromkeys(made, "a cat")))
    pipeline.start()
    try:
        pipeline.wake()
        names = {t.name for t in threading.enumerate()}
        assert {"feeder", "model-worker", "writer"} <= names
    finally:
        pipeline.stop()
    assert not pipeline.worker.is_alive() and not pipeline.writer.is_alive()


# -- the whole pipeline ---------------------------------------------------------------------


def test_pipeline_writes_sidecars_rows_and_outcomes_in_queue_order(tmp_path):
    pics = tmp_path / "pics"
    made = _images(pics, ["c.jpg", "a.jpg", "b.png"])
    answers = {colour: f"The image shows picture {p.stem}." for colour, p in made.items()}
    cfg = _config(tmp_path, pics, prefix="trigger")
    order = [pics / "c.jpg", pics / "a.jpg", pics / "b.png"]
    jobs = _queue(cfg, order)
    backend = FakeBackend(answers, max_batch=8)

    _, outcomes = _drain(cfg, backend, jobs, n=3)

    assert [Path(o.path) for o in outcomes] == order  # one decode thread: queue order
    assert {(o.state, o.sidecar_state) for o in outcomes} == {
        (OutcomeState.DONE, SidecarState.WRITTEN)
    }
    index = Index(connect(cfg.database))
    for path in order:
        sidecar = path.with_suffix(".txt")
        assert sidecar.read_text() == f"trigger, Picture {path.stem}.\n"
        row = index.get(str(path))
        assert row is not None
        assert (row.caption, row.sidecar, row.sidecar_state, row.model, row.revision) == (
            f"trigger, Picture {path.stem}.",
            str(sidecar),
            "written",
            "fake-model",
            "rev1",
        )
        assert row.outputs == {"short": f"Picture {path.stem}."}
        assert jobs.state_of(str(path)) == ("done", None)
    assert jobs.counts() == {"pending": 0, "running": 0, "done": 3, "failed": 0, "skipped": 0}
    assert sum(backend.calls) == 3


@pytest.mark.parametrize("answer", ["", "   \n "], ids=["empty", "blank"])
def test_no_text_from_the_model_fails_the_image_and_writes_no_sidecar(tmp_path, answer):
    pics = tmp_path / "pics"
    made = _images(pics, ["empty.jpg", "fine.jpg"])
    answers = {c: (answer if p.name == "empty.jpg" else "a dog") for c, p in made.items()}
    # A prefix alone is no caption either.
    cfg = _config(tmp_path, pics, prefix="trigger")
    jobs = _queue(cfg, list(made.values()))

    _, outcomes = _drain(cfg, FakeBackend(answers), jobs, n=2)

    by_name = {Path(o.path).name: o for o in outcomes}
    reason = "the model returned no text"
    assert (by_name["empty.jpg"].state, by_name["empty.jpg"].reason) == ("failed", reason)
    assert not (pics / "empty.txt").exists()
    assert Index(connect(cfg.database)).get(str(pics / "empty.jpg")) is None
    assert jobs.state_of(str(pics / "empty.jpg")) == ("failed", reason)
    assert (pics / "fine.txt").read_text() == "trigger, a dog\n"
    # Failed, not lost: `watcher retry` queues it again.
    assert jobs.failed_existing() == ([str(pics / "empty.jpg")], [])
    assert jobs.retry() == 1 and jobs.state_of(str(pics / "empty.jpg"))[0] == "pending"


def test_stop_with_full_hand_offs_returns_and_hands_unfinished_jobs_back(tmp_path):
    pics = tmp_path / "pics"
    names = [f"{i:02}.jpg" for i in range(24)]
    made = _images(pics, names)
    entered, release = threading.Event(), threading.Event()

    class Blocking(FakeBackend):
        def describe(self, images, tasks):
            entered.set()
            assert release.wait(60), "never released"
            return super().describe(images, tasks)

    cfg = dataclasses.replace(_config(tmp_path, pics), decode_threads=2)
    jobs = _queue(cfg, list(made.values()))
    pipeline = Pipeline(cfg, Blocking(dict.fromkeys(made, "a bird"), max_batch=2))
    assert pipeline.max_in_flight < len(names)  # the slots, not the queue, run out
    pipeline.start()
    pipeline.wake(len(names))
    try:
        assert entered.wait(60), "the model was never called"
        # Every slot taken: the decode hand-off is full and the feeder waits for a slot.
        wait_for(lambda: pipeline.in_flight == pipeline.max_in_flight, 60, "all slots taken")
    finally:
        stopper = threading.Thread(target=pipeline.stop)
        stopper.start()
        release.set()
        stopper.join(90)
    assert not stopper.is_alive(), "stop() did not return"
    assert not pipeline.worker.is_alive() and not pipeline.writer.is_alive()

    counts = JobQueue(connect(cfg.database)).counts()
    assert counts["running"] == 0 and counts["failed"] == 0
    assert counts["done"] >= 1, "the batch on the model was not finished"
    assert counts["done"] + counts["pending"] == len(names)
    written = sorted(p.name for p in pics.glob("*.txt"))
    done = sorted(Path(p).with_suffix(".txt").name for p in made.values() if _is_done(jobs, p))
    assert written == done


def test_stop_hands_back_jobs_whose_decode_had_not_started(tmp_path, monkeypatch):
    import watcher.pipeline.stages as stages_mod

    pics = tmp_path / "pics"
    made = _images(pics, [f"{i}.jpg" for i in range(5)])
    decoding, release = threading.Event(), threading.Event()
    real_prepare = stages_mod.prepare

    def slow_prepare(job, **kw):
        decoding.set()
        assert release.wait(60), "never released"
        return real_prepare(job, **kw)

    monkeypatch.setattr(stages_mod, "prepare", slow_prepare)
    cfg = _config(tmp_path, pics)  # one decode thread: one decoding, four waiting for it
    jobs = _queue(cfg, list(made.values()))
    pipeline = Pipeline(cfg, FakeBackend(dict.fromkeys(made, "a fish")))
    # Released only once stop() is winding the decode pool down (claiming has stopped).
    winding_down = threading.Event()
    shutdown = pipeline._pool.shutdown

    def shutdown_seen(*args, **kw):
        winding_down.set()
        return shutdown(*args, **kw)

    monkeypatch.setattr(pipeline._pool, "shutdown", shutdown_seen)
    pipeline.start()
    pipeline.wake(5)
    assert decoding.wait(60), "nothing was decoded"
    wait_for(lambda: pipeline.in_flight == 5, 60, "all five claimed")
    stopper = threading.Thread(target=pipeline.stop)
    stopper.start()
    try:
        assert winding_down.wait(60), "stop() never reached the decode pool"
    finally:
        release.set()
        stopper.join(90)
    assert not stopper.is_alive(), "stop() did not return"
    # The one being decoded is finished; the four never started are pending again, none is
    # left `running` for a next start to find.
    assert jobs.counts() == {"pending": 4, "running": 0, "done": 1, "failed": 0, "skipped": 0}
    assert [p.name for p in pics.glob("*.txt")] == ["0.txt"]


def _is_done(jobs: JobQueue, path: Path) -> bool:
    state = jobs.state_of(str(path))
    return state is not None and state[0] == "done"


# -- the writer alone -----------------------------------------------------------------------


class _WriterRun:
    """A Writer over a real database, fed messages by the test."""

    def __init__(self, tmp_path: Path, **folder) -> None:
        self.pics = tmp_path / "pics"
        self.pics.mkdir(exist_ok=True)
        self.cfg = dataclasses.replace(
            _config(tmp_path, self.pics, **folder), max_attempts=3, retry_backoff=60.0
        )
        self.jobs = JobQueue(connect(self.cfg.database))
        self.outcomes: list[Outcome] = []
        self.ended = 0
        self.inbox: queue.Queue = queue.Queue()

    def claim(self, name: str) -> Job:
        path = self.pics / name
        if not path.exists():
            distinct_image(len(list(self.pics.iterdir())), path)
        self.jobs.enqueue(path, self.pics)
        (job,) = self.jobs.claim(1)
        return job

    def captioned(self, name: str, output: str) -> Captioned:
        prepared = prepare(self.claim(name), max_pixels=self.cfg.max_pixels, max_side=64)
        return Captioned(prepared, TASKS, (output,), "fake-model", None, False, 1.0, 1)

    def run(self, *items: object) -> list[Outcome]:
        def end() -> None:
            self.ended += 1

        writer = Writer(self.cfg, self.inbox, self.cfg.database, self.outcomes.append, end)
        writer.start()
        for item in items:
            self.inbox.put(item)
        self.inbox.put(STOP)
        writer.join(60)
        assert not writer.is_alive()
        assert self.ended == len(items)  # every message ends its job exactly once
        return self.outcomes


def test_writer_writes_the_cleaned_caption_then_the_row_and_the_job_state(tmp_path):
    w = _WriterRun(tmp_path, suffix="style")
    item = w.captioned("cat.jpg", "Answer: the picture shows a   cat\non a mat")
    (outcome,) = w.run(item)

    path, sidecar = w.pics / "cat.jpg", w.pics / "cat.txt"
    assert sidecar.read_text() == "A cat on a mat, style\n"
    assert outcome == Outcome(
        str(path), "done", None, "A cat on a mat, style", str(sidecar), "written", False
    )
    row = Index(connect(w.cfg.database)).get(str(path))
    assert row is not None
    assert (row.caption, row.sidecar_state, row.sha256, row.size) == (
        "A cat on a mat, style",
        "written",
        item.prepared.sha256,
        path.stat().st_size,
    )
    assert w.jobs.state_of(str(path)) == ("done", None)


def test_writer_records_failures_as_failed_or_retried(tmp_path):
    w = _WriterRun(tmp_path)
    broken = Failed(w.claim("broken.jpg"), "truncated or corrupt image: x")
    busy = Failed(w.claim("busy.jpg"), "out of memory running the model", transient=True)
    blank = w.captioned("blank.jpg", "  ")
    outcomes = w.run(broken, busy, blank)

    got = {Path(o.path).name: (o.state, o.reason) for o in outcomes}
    assert got == {
        "broken.jpg": ("failed", "truncated or corrupt image: x"),
        "busy.jpg": ("retry", "out of memory running the model"),
        "blank.jpg": ("failed", "the model returned no text"),
    }
    assert w.jobs.state_of(str(w.pics / "broken.jpg")) == (
        "failed",
        "truncated or corrupt image: x",
    )
    assert w.jobs.state_of(str(w.pics / "busy.jpg")) == (
        "pending",
        "out of memory running the model",
    )
    assert list(w.pics.glob("*.txt")) == []
    assert Index(connect(w.cfg.database)).count() == 0


# -- messages and states --------------------------------------------------------------------


def test_states_are_their_strings_in_json_and_unknown_ones_are_refused():
    o = Outcome("/p/a.jpg", "done", sidecar_state="kept")
    assert o.state is OutcomeState.DONE and o.sidecar_state is SidecarState.KEPT
    shown = json.loads(json.dumps(dataclasses.asdict(o)))
    assert (shown["state"], shown["sidecar_state"]) == ("done", "kept")
    assert f"{o.state}: {o.sidecar_state}" == "done: kept"
    with pytest.raises(ValueError):
        Outcome("/p/a.jpg", "finished")
    with pytest.raises(ValueError):
        Outcome("/p/a.jpg", "done", sidecar_state="same")  # no stage produces it


def test_counts_include_skipped_jobs(tmp_path):
    jobs = JobQueue(connect(tmp_path / "index.db"))
    pics, other = tmp_path / "pics", tmp_path / "other"
    with transaction(jobs.db):
        jobs.skip(pics / "link.jpg", pics, "a symbolic link out of the folder")
        jobs.skip(other / "fifo.jpg", other, "a named pipe")
    jobs.enqueue(pics / "a.jpg", pics)

    assert jobs.counts() == {"pending": 1, "running": 0, "done": 0, "failed": 0, "skipped": 2}
    assert jobs.counts(pics)["skipped"] == 1
    assert list(jobs.counts()) == [s.value for s in JobState]
