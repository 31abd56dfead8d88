"""The persistent job queue: idempotent enqueue, claim, crash recovery, retry, backoff."""

from __future__ import annotations

from pathlib import Path

from watcher.index import connect, transaction
from watcher.jobs import JobQueue


def _q(tmp_path: Path) -> JobQueue:
    return JobQueue(connect(tmp_path / "db.sqlite"))


def test_enqueue_is_idempotent(tmp_path: Path) -> None:
    q = _q(tmp_path)
    root = tmp_path / "pics"
    assert q.enqueue(root / "a.jpg", root)
    assert not q.enqueue(root / "a.jpg", root)
    assert q.counts()["pending"] == 1


def test_claim_finish_and_reenqueue_while_running(tmp_path: Path) -> None:
    q = _q(tmp_path)
    root = tmp_path / "pics"
    q.enqueue_many([(root / "a.jpg", root), (root / "b.jpg", root)])
    jobs = q.claim(10)
    assert [j.path.name for j in jobs] == ["a.jpg", "b.jpg"]
    assert q.counts()["running"] == 2
    q.enqueue(root / "a.jpg", root)  # changed while running
    with transaction(q.db):
        assert not q.finish(jobs[0])  # stale: runs again
        assert q.finish(jobs[1])
    assert q.counts() == {"pending": 1, "running": 0, "done": 1, "failed": 0, "skipped": 0}


def test_a_settled_event_for_the_bytes_a_running_job_was_queued_with_leaves_it_alone(
    tmp_path: Path,
) -> None:
    """The start-up scan queued a file, then its own events settled while it ran: the same
    bytes, so its result stands. New bytes, or a scan's re-queue (settings changed), run it
    again."""
    q = _q(tmp_path)
    root = tmp_path / "pics"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"first")
    (root / "b.jpg").write_bytes(b"first")
    q.enqueue_many([(root / "a.jpg", root), (root / "b.jpg", root)])  # the scan
    a, b = q.claim(10)
    assert q.enqueue_many([(root / "a.jpg", root)], settled=True) == 0  # its event
    assert q.enqueue_many([(root / "b.jpg", root)]) == 1  # a scan again: outdated settings
    with transaction(q.db):
        assert q.finish(a)  # current: done
        assert not q.finish(b)  # runs again
    assert q.state_of(str(root / "a.jpg")) == ("done", None)

    (root / "a.jpg").write_bytes(b"second, longer")  # changed after it was done
    assert q.enqueue_many([(root / "a.jpg", root)], settled=True) == 1
    running = {j.path.name: j for j in q.claim(10)}
    (root / "a.jpg").write_bytes(b"third, longer still")  # changed while it runs
    assert q.enqueue_many([(root / "a.jpg", root)], settled=True) == 1
    with transaction(q.db):
        assert not q.finish(running["a.jpg"])  # read older bytes: runs again
        assert q.finish(running["b.jpg"])
    assert q.counts()["pending"] == 1


def test_crash_recovery_requeues_running(tmp_path: Path) -> None:
    q = _q(tmp_path)
    root = tmp_path / "pics"
    q.enqueue(root / "a.jpg", root)
    q.claim(1)
    q2 = _q(tmp_path)  # a new process after kill -9
    assert q2.recover() == 1
    assert [j.path.name for j in q2.claim(5)] == ["a.jpg"]


def test_transient_failure_backs_off_then_gives_up(tmp_path: Path) -> None:
    q = _q(tmp_path)
    root = tmp_path / "pics"
    q.enqueue(root / "a.jpg", root)
    job = q.claim(1)[0]
    with transaction(q.db):
        assert q.fail(job, "disk full", transient=True, max_attempts=2, backoff=60) == "pending"
    assert q.claim(1) == []  # not due yet
    q.db.conn.execute("UPDATE jobs SET next_try = 0")
    job = q.claim(1)[0]
    assert job.attempts == 2
    with transaction(q.db):
        assert q.fail(job, "disk full", transient=True, max_attempts=2, backoff=60) == "failed"
    [f] = q.failures()
    assert f.error == "disk full (gave up after 2 attempts)"


def test_permanent_failure_and_retry(tmp_path: Path) -> None:
    q = _q(tmp_path)
    root = tmp_path / "pics"
    q.enqueue_many([(root / "a.jpg", root), (root / "b.jpg", root)])
    a, b = q.claim(2)
    with transaction(q.db):
        q.fail(a, "not an image", transient=False, max_attempts=5, backoff=1)
        q.fail(b, "not an image", transient=False, max_attempts=5, backoff=1)
    assert q.counts()["failed"] == 2
    assert q.retry([str(root / "a.jpg")]) == 1
    assert q.counts()["failed"] == 1 and q.counts()["pending"] == 1
    assert q.retry() == 1
    assert q.counts()["pending"] == 2


def test_claim_limited_to_roots(tmp_path: Path) -> None:
    q = _q(tmp_path)
    a, b = tmp_path / "a", tmp_path / "ab"
    q.enqueue_many([(a / "x.jpg", a), (b / "y.jpg", b)])
    assert [j.path for j in q.claim(5, (a,))] == [a / "x.jpg"]
