"""The writer says an outcome only once it is committed: a log reader finds the index agree."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from test_stages import _WriterRun

from watcher.index import Index, connect
from watcher.jobs import JobQueue
from watcher.messages import Failed, Outcome, OutcomeState
from watcher.pipeline import writer as writer_module


class _Reader:
    """Stands in for the writer's logger: at each line, reads the database as another
    process would (its own read-only connection: committed state only)."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.seen: list[tuple[str, dict[str, Any], Any, Any]] = []
        self.default_path: str | None = None  # read at lines that name no image

    def _line(self, event: str, **fields: Any) -> None:
        path = fields.get("path", self.default_path)
        job = row = None
        if path is not None:
            conn = connect(self.db, readonly=True)
            try:
                job = JobQueue(conn).state_of(path)
                found = Index(conn).get(path)
                row = (found.caption, found.sidecar_state) if found else None
            finally:
                conn.conn.close()
        self.seen.append((event, fields, job, row))

    info = warning = error = debug = _line

    def at(self, event: str, path: Path | None = None) -> tuple[dict[str, Any], Any, Any]:
        (hit,) = [
            (f, j, r)
            for e, f, j, r in self.seen
            if e == event and (path is None or f.get("path") == str(path))
        ]
        return hit


@pytest.fixture
def reader(tmp_path, monkeypatch) -> _Reader:
    spy = _Reader(tmp_path / "index.db")
    monkeypatch.setattr(writer_module, "log", spy)
    return spy


def test_every_outcome_line_is_logged_after_its_commit(tmp_path, reader):
    w = _WriterRun(tmp_path)
    (w.pics / "kept.txt").write_text("my own words\n")
    broken = Failed(w.claim("broken.jpg"), "truncated or corrupt image: x")
    busy = Failed(w.claim("busy.jpg"), "out of memory running the model", transient=True)
    done = w.captioned("cat.jpg", "a cat on a mat")
    kept = w.captioned("kept.jpg", "a dog")
    deleted = w.captioned("deleted.jpg", "a bird")
    (w.pics / "deleted.jpg").unlink()
    vanished = Failed(w.claim("vanished.jpg"), "image vanished", vanished=True)
    w.run(broken, busy, done, kept, deleted, vanished)

    # Each line, as it was written, already had its job state and row committed.
    assert reader.at("image failed")[1] == ("failed", "truncated or corrupt image: x")
    fields, job, _ = reader.at("will retry")
    assert fields["path"] == str(w.pics / "busy.jpg")
    assert job == ("pending", "out of memory running the model")
    caption = (w.pics / "cat.txt").read_text().strip()
    assert reader.at("captioned", w.pics / "cat.jpg")[1:] == (("done", None), (caption, "written"))
    assert reader.at("kept existing sidecar (not ours)")[1:] == (
        ("done", None),
        ("my own words", "kept"),
    )
    # Forgotten: no job, no row, by the time either is said.
    assert reader.at("image deleted while being captioned")[1:] == (None, None)
    assert reader.at("image gone before it was captioned")[1:] == (None, None)
    assert (w.pics / "kept.txt").read_text() == "my own words\n"


def test_a_batch_the_database_refuses_is_said_only_as_what_was_committed(
    tmp_path, reader, monkeypatch
):
    """A full disk at COMMIT when the writer stops: nothing of the rolled-back batch is
    said ("will retry" was never committed); the line that is said follows its own commit."""
    w = _WriterRun(tmp_path)

    def disk_full(site: str, paths: object) -> None:
        if site == "db_commit":
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(writer_module.faults, "hit", disk_full)
    busy = Failed(w.claim("busy.jpg"), "out of memory running the model", transient=True)
    reader.default_path = str(w.pics / "busy.jpg")
    w.run(busy)

    # (A pause-and-write-again may come first if the batch arrived before the stop.)
    said = [e for e, *_ in reader.seen if e != "database write failed; will write again"]
    assert said == ["database write failed; jobs will be retried"]
    assert reader.at(said[0])[1][0] == "pending"  # released and committed before the line
    assert w.jobs.state_of(str(w.pics / "busy.jpg"))[0] == "pending"


def test_a_ray_actors_lines_are_said_by_the_driver_after_its_commit(tmp_path, reader):
    """On Ray the sidecar step runs in an actor; its lines travel with its results and the
    driver says them once it has committed (here: an image deleted while captioned)."""
    from watcher.cluster import Result, _committer

    w = _WriterRun(tmp_path)
    item = w.captioned("deleted.jpg", "a bird")
    path = str(w.pics / "deleted.jpg")
    gone = Outcome(path, OutcomeState.GONE, "image deleted while being captioned")
    said = (("info", "image deleted while being captioned", {"path": path}),)
    db = connect(w.cfg.database)
    outcomes: list[Outcome] = []
    try:
        _committer(w.cfg, db, outcomes.append).commit([Result(item.prepared.job, gone, item, said)])
    finally:
        db.conn.close()

    assert outcomes == [gone]
    # Said once, after the commit that forgot the job.
    assert [e for e, *_ in reader.seen] == ["image deleted while being captioned"]
    assert reader.at("image deleted while being captioned")[1:] == (None, None)
