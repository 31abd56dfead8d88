"""The benchmarks' outcome checks: no speed is reported for a run that did not do its work."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from daemon_harness import index_rows, job_states


class BenchFailure(RuntimeError):
    """The benchmark's own outcome check failed: no speed is reported."""


def sidecar_of(image: Path) -> Path:
    return image.with_suffix(".txt")


def check_sidecars(images: Sequence[Path]) -> None:
    """Every image has its sidecar, and none is empty."""
    missing = [p for p in images if not sidecar_of(p).is_file()]
    if missing:
        raise BenchFailure(f"{len(missing)} of {len(images)} sidecars missing, e.g. {missing[0]}")
    empty = [p for p in images if not sidecar_of(p).read_text().strip()]
    if empty:
        raise BenchFailure(f"{len(empty)} empty sidecars, e.g. {sidecar_of(empty[0])}")


def check_rows(db: Path, images: Sequence[Path]) -> None:
    """Every image has its index row with its sidecar `written`, and its job `done`."""
    rows = {path: row["sidecar_state"] for path, row in index_rows(db).items()}
    jobs = job_states(db)
    missing = [p for p in images if rows.get(str(p)) != "written"]
    if missing:
        raise BenchFailure(
            f"{len(missing)} of {len(images)} index rows missing or not "
            f"'written', e.g. {missing[0]}: {rows.get(str(missing[0]))}"
        )
    undone = [p for p in images if jobs.get(str(p)) != "done"]
    if undone:
        raise BenchFailure(
            f"{len(undone)} jobs not done, e.g. {undone[0]}: {jobs.get(str(undone[0]))}"
        )


def missing_vectors(db: Path, images: Sequence[Path]) -> list[Path]:
    """The images whose caption has no search vector (yet)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        have = {
            path
            for (path,) in conn.execute(
                "SELECT path FROM images JOIN image_vectors ON image_vectors.image_id = "
                "images.rowid"
            )
        }
    finally:
        conn.close()
    return [p for p in images if str(p) not in have]


def check_vectors(db: Path, images: Sequence[Path]) -> None:
    """Every image's caption has its search vector (an embedding model that failed to load
    would leave the benchmark measuring captions alone)."""
    missing = missing_vectors(db, images)
    if missing:
        raise BenchFailure(
            f"{len(missing)} of {len(images)} captions have no search vector, e.g. {missing[0]}"
        )


def wait_vectors(db: Path, images: Sequence[Path], timeout: float) -> float:
    """Wait until every image's caption has its vector (the daemon's backfill embeds those
    its writer left under a burst); when that was, epoch seconds."""
    deadline = time.time() + timeout
    while missing_vectors(db, images):
        if time.time() > deadline:
            check_vectors(db, images)
        time.sleep(0.1)
    return time.time()


def last_finished(db: Path, images: Sequence[Path]) -> float:
    """When the last of `images` had its job marked done (epoch seconds): in the transaction
    that committed its caption, so the moment its sidecar and row were there."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        wanted = {str(p) for p in images}
        times = [
            updated
            for path, updated in conn.execute("SELECT path, updated FROM jobs WHERE state = 'done'")
            if path in wanted
        ]
    finally:
        conn.close()
    if len(times) != len(wanted):
        raise BenchFailure(f"{len(wanted) - len(times)} of {len(wanted)} jobs not done")
    return max(times)
