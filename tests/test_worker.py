"""The model worker's batching: a burst starts with a full batch, a lone image goes alone."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest
from images import distinct_pil

import watcher.pipeline.model_worker as worker_mod
from watcher.intake.settle import Settler
from watcher.messages import STOP, Captioned, Job, Prepared, Work
from watcher.pipeline.model_worker import ModelWorker
from watcher.tasks import Task

TASKS = (Task("short", max_tokens=4),)


class CountingBackend:
    """Records the size of every model call; answers with one word per image."""

    name, revision, max_batch = "counting", None, 4

    def __init__(self) -> None:
        self.calls: list[int] = []

    def describe(self, images, tasks):
        self.calls.append(len(images))
        return [[f"image {im.getpixel((0, 0))}"] for im in images]

    def close(self) -> None:
        pass


def _work(i: int) -> Work:
    job = Job(i, Path(f"/pics/{i}.jpg"), Path("/pics"), 0, 0)
    image = distinct_pil(i, (16, 12))
    return Work(Prepared(job, image, f"{i:064x}", 100, 0, 16, 12), TASKS)


def _run(tmp_path: Path, incoming, feed, expected: int) -> tuple[CountingBackend, list]:
    """Start a worker, `feed` its inbox, collect `expected` outcomes, then stop it."""
    backend = CountingBackend()
    inbox: queue.Queue = queue.Queue()
    outbox: queue.Queue = queue.Queue()
    w = ModelWorker(backend, inbox, outbox, tmp_path / "index.db", incoming=incoming)
    w.start()
    feed(inbox)
    out = [outbox.get(timeout=30) for _ in range(expected)]
    inbox.put(STOP)
    w.join(30)
    assert not w.is_alive()
    return backend, out


def test_a_lone_image_with_nothing_behind_it_goes_alone(tmp_path) -> None:
    asked: list[float] = []

    def incoming(within: float) -> int:
        asked.append(within)
        return 0

    def feed(inbox) -> None:
        inbox.put(_work(0))

    backend, out = _run(tmp_path, incoming, feed, 1)
    assert backend.calls == [1]
    assert [o.prepared.job.path.name for o in out if isinstance(o, Captioned)] == ["0.jpg"]
    assert asked and all(0 < s <= worker_mod.FILL_WAIT for s in asked)


def test_a_burst_waits_for_the_images_on_their_way(tmp_path, monkeypatch) -> None:
    # No deadline can expire under a slow CI machine: the batch ends by filling up.
    monkeypatch.setattr(worker_mod, "FILL_WAIT", 60.0)
    coming = {"n": 3}
    asked = threading.Event()

    def incoming(within: float) -> int:
        asked.set()
        return coming["n"]

    def feed(inbox) -> None:
        inbox.put(_work(0))
        assert asked.wait(30), "the worker never asked what was coming"
        for i in (1, 2, 3):  # e.g. files that were still settling
            inbox.put(_work(i))
            coming["n"] -= 1

    backend, out = _run(tmp_path, incoming, feed, 4)
    assert backend.calls == [4]
    assert sorted(o.outputs for o in out) == sorted(
        (f"image {distinct_pil(i, (16, 12)).getpixel((0, 0))}",) for i in range(4)
    )


@pytest.mark.parametrize("settle, due", [(0.0, True), (3600.0, False)])
def test_settler_counts_files_due_within_a_window(tmp_path, settle, due) -> None:
    s = Settler(lambda ready: None)  # not started: nothing is released
    (tmp_path / "a.jpg").write_bytes(b"x")
    s.touch(tmp_path / "a.jpg", tmp_path, settle)
    assert s.due_within(1.0) is due
    assert s.pending() == 1
