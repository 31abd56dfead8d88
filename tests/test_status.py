"""`watcher status` on a database built by the library: what the report says, as text and JSON."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import run_cli
from images import distinct_image

from watcher.config import FolderConfig
from watcher.index import ImageRow, Index, connect, transaction
from watcher.intake.filter import NOT_IMAGE_EXTENSION, NOT_REGULAR, PassedOver
from watcher.intake.observer import Sink
from watcher.jobs import JobQueue
from watcher.service import lifecycle, watches
from watcher.service.status import collect, daemon_pid
from watcher.service.watches import Watch


def _row(path: Path, root: Path, **kw) -> ImageRow:
    fields = dict(
        path=str(path),
        root=str(root),
        sha256="0" * 64,
        size=1,
        mtime_ns=1,
        width=8,
        height=8,
        caption="a red square",
        task="short",
        outputs={"short": "a red square"},
        model="tiny",
        revision=None,
        sidecar=str(path.with_suffix(".txt")),
        sidecar_sha256="1" * 64,
        sidecar_state="written",
        sidecar_error=None,
        created=time.time(),
        updated=time.time(),
    )
    fields.update(kw)
    return ImageRow(**fields)


def _status(db_path: Path, *extra: str) -> str:
    code, out, err = run_cli("--db", str(db_path), "status", *extra)
    assert code == 0 and err == ""
    return out


@pytest.fixture
def library(tmp_path):
    """A database with the work of one folder: 2 captioned (one sidecar not writable, one
    left as the user edited it), 2 failed, 1 pending, 1 running, 1 skipped (a named pipe)."""
    root = tmp_path / "pics"
    names = ["done1.jpg", "done2.jpg", "bad1.jpg", "bad2.jpg", "later.jpg", "now.jpg"]
    paths = {n: distinct_image(i, root / n) for i, n in enumerate(names)}
    db = connect(tmp_path / "index.db")
    jobs, index = JobQueue(db), Index(db)
    jobs.enqueue_many((paths[n], root) for n in names[:4])
    claimed = {j.path.name: j for j in jobs.claim(4)}
    with transaction(db):
        for n in ("done1.jpg", "done2.jpg"):
            jobs.finish(claimed[n])
        index.upsert(_row(paths["done1.jpg"], root))
        index.upsert(
            _row(
                paths["done2.jpg"],
                root,
                sidecar_state="pending",
                sidecar_error="the folder is read-only",
            )
        )
        for n, reason in (("bad1.jpg", "not an image (truncated)"), ("bad2.jpg", "too big")):
            jobs.fail(claimed[n], reason, transient=False, max_attempts=1, backoff=0)
        jobs.skip(root / "pipe.jpg", root, NOT_REGULAR)
    jobs.enqueue_many([(paths["now.jpg"], root)])
    jobs.claim(1)
    jobs.enqueue_many([(paths["later.jpg"], root)])
    yield tmp_path / "index.db", root, db
    db.conn.close()


def test_status_without_a_daemon(library):
    db_path, root, _ = library
    out = _status(db_path)
    assert out.splitlines()[:5] == [
        f"database: {db_path}",
        "daemon: not running",
        "images indexed: 2",
        "queue: 1 pending, 1 running, 2 done, 2 failed",
        "rate: 0.03 images/s over the last minute",  # 2 done in the last minute
    ]
    assert (
        "sidecars pending (caption kept in the index; `watcher retry --all` once the reason "
        "is fixed): 1\n"
        f"  {root / 'done2.jpg'}: the folder is read-only\n"
    ) in out
    assert f"skipped, not captioned: 1\n  {root / 'pipe.jpg'}: {NOT_REGULAR}\n" in out
    _, failures = out.split("last failures:\n")
    assert sorted(failures.splitlines()) == [  # the newest first: the same second here
        f"  {root / 'bad1.jpg'}: not an image (truncated)",
        f"  {root / 'bad2.jpg'}: too big",
    ]
    assert daemon_pid(db_path) is None


def test_status_json_has_the_same_report(library):
    db_path, root, _ = library
    report = json.loads(_status(db_path, "--json"))
    assert report == collect(db_path) | {"images_per_second": report["images_per_second"]}
    assert report["database"] == str(db_path)
    assert report["daemon"] is None
    assert report["images"] == 2
    assert report["queue"] == {"pending": 1, "running": 1, "done": 2, "failed": 2, "skipped": 1}
    assert sorted((f["path"], f["reason"], f["attempts"]) for f in report["failures"]) == [
        (str(root / "bad1.jpg"), "not an image (truncated)", 1),
        (str(root / "bad2.jpg"), "too big", 1),
    ]
    assert report["skipped"] == 1
    assert report["skipped_list"] == [{"path": str(root / "pipe.jpg"), "reason": NOT_REGULAR}]
    assert report["sidecars_pending_list"] == [
        {"path": str(root / "done2.jpg"), "reason": "the folder is read-only"}
    ]
    assert report["missing"] == 0


def test_status_leaves_out_failures_of_deleted_images(library):
    db_path, root, _ = library
    (root / "bad1.jpg").unlink()
    out = _status(db_path)
    assert out.endswith(f"last failures:\n  {root / 'bad2.jpg'}: too big\n")


def _watches(tmp_path: Path, root: Path, monkeypatch) -> list[Watch]:
    """Three folders as the daemon sees them: one watched (with a file passed over), one
    missing, one the OS refused to watch (its inotify limit reached)."""
    gone, full = tmp_path / "unplugged", tmp_path / "full"
    full.mkdir()
    ok = Watch(FolderConfig(root), Sink())
    missing = Watch(FolderConfig(gone), Sink())
    refused = Watch(FolderConfig(full), Sink())
    assert ok.start() and not missing.start()
    real = watches.start_observer

    def at_limit(folder, sink):
        if folder.path == full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, sink)

    monkeypatch.setattr(watches, "start_observer", at_limit)
    assert not refused.start()
    return [ok, missing, refused]


def _describe(ws: list[Watch], root: Path) -> list[dict]:
    passed = PassedOver()
    passed.add(root / "notes.pdf", NOT_IMAGE_EXTENSION)
    return [w.describe(passed if w.folder.path == root else None) for w in ws]


def test_status_of_a_running_daemon_and_its_folders(library, tmp_path, monkeypatch):
    db_path, root, db = library
    ws = _watches(tmp_path, root, monkeypatch)
    try:
        with transaction(db):  # an image indexed under the folder that is missing now
            Index(db).upsert(_row(tmp_path / "unplugged" / "x.jpg", tmp_path / "unplugged"))
        lifecycle.record_start(db, _describe(ws, root))  # this process plays the daemon
        out = _status(db_path)
    finally:
        for w in ws:
            w.stop()
    lines = out.splitlines()
    assert lines[1] == f"daemon: running (pid {os.getpid()}), watching 3 folders"
    assert lines[2] == f"  {root}"
    assert lines[3] == f"    passed over: 1 file ({NOT_IMAGE_EXTENSION}): notes.pdf"
    assert lines[4].startswith(f"  {tmp_path / 'unplugged'}  [missing since ")
    assert lines[4].endswith(
        " (does not exist): waiting for it to appear; 1 indexed image points into it, "
        "kept until it is back]"
    )
    assert lines[5].startswith(f"  {tmp_path / 'full'}  [the OS refused more file watches")
    assert "fs.inotify.max_user_watches" in lines[5] and "polling: true" in lines[5]
    assert lines[6] == "images indexed: 3"
    assert (
        "index rows of missing files: 1 (their folders are gone; `watcher prune` removes them)"
        in lines
    )
    assert daemon_pid(db_path) == os.getpid()

    report = json.loads(_status(db_path, "--json"))
    d = report["daemon"]
    assert (d["running"], d["responding"], d["pid"]) == (True, True, os.getpid())
    assert [(f["path"], f["state"]) for f in d["folders"]] == [
        (str(root), "watching"),
        (str(tmp_path / "unplugged"), "missing"),
        (str(tmp_path / "full"), "error"),
    ]
    assert d["folders"][1]["missing"] == "does not exist"
    assert d["folders"][1]["indexed_images"] == 1


def test_status_of_a_daemon_that_stopped_beating(library):
    db_path, _, db = library
    lifecycle.record_start(db, [])
    lifecycle.beat(db)
    assert _status(db_path).splitlines()[1] == (
        f"daemon: running (pid {os.getpid()}), watching 0 folders"
    )
    with transaction(db):  # hung (or stopped with SIGSTOP) for a minute: no beat since
        db.conn.execute("UPDATE daemon SET heartbeat = heartbeat - 60")
    assert _status(db_path).splitlines()[1] == (
        f"daemon: not responding (pid {os.getpid()}, last heartbeat 60 s ago), watching 0 folders"
    )
    assert json.loads(_status(db_path, "--json"))["daemon"]["responding"] is False


def test_status_after_the_daemon_stopped_or_was_killed(library):
    db_path, _, db = library
    lifecycle.record_start(db, [])
    lifecycle.record_stop(db, [])
    assert _status(db_path).splitlines()[1] == "daemon: not running"
    assert daemon_pid(db_path) is None
    assert json.loads(_status(db_path, "--json"))["daemon"]["running"] is False

    # Killed without a word: its row says started, never stopped; its pid is gone.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from watcher.index import connect; "
            "from watcher.service import lifecycle; "
            "lifecycle.record_start(connect(Path(sys.argv[1])), []); "
            "import os; os._exit(9)",
            str(db_path),
        ],
        check=False,
        timeout=60,
    )
    row = lifecycle.read(db)
    assert row is not None and row.stopped is None and row.pid != os.getpid()
    assert _status(db_path).splitlines()[1] == "daemon: not running"
    assert daemon_pid(db_path) is None


def test_status_of_a_folder_never_captioned(tmp_path):
    db_path = tmp_path / "none.db"
    assert _status(db_path).splitlines() == [
        f"database: {db_path}",
        "daemon: not running",
        "images indexed: 0",
        "queue: 0 pending, 0 running, 0 done, 0 failed",
        "rate: 0.00 images/s over the last minute",
    ]
    assert not db_path.exists()  # status creates nothing
