"""Full batches under a burst (worker and daemon), while a lone image still goes alone."""

from __future__ import annotations

import collections
import os
import queue
import threading
from pathlib import Path

from daemon_harness import Daemon, wait_for, write_config
from images import distinct_image
from test_worker import _run, _work

import watcher.pipeline.model_worker as worker_mod
from watcher.messages import STOP, Captioned
from watcher.pipeline.model_worker import ModelWorker


def test_images_being_decoded_are_waited_for_however_quick_the_last_call(tmp_path, monkeypatch):
    # The "may come" wait has run out at once (as after a very quick model call, or a model
    # that is faster than decoding): only the images known to be in decode can fill it.
    monkeypatch.setattr(worker_mod, "FILL_WAIT", 0.0)
    decoding = {"n": 3}
    asked = threading.Event()

    def count() -> int:
        asked.set()
        return decoding["n"]

    backend_calls: list[int] = []

    class Backend:
        name, revision, max_batch = "counting", None, 4

        def describe(self, images, tasks):
            backend_calls.append(len(images))
            return [["x"] for _ in images]

    inbox: queue.Queue = queue.Queue()
    outbox: queue.Queue = queue.Queue()
    w = ModelWorker(Backend(), inbox, outbox, tmp_path / "index.db", decoding=count)
    w.start()
    inbox.put(_work(0))
    assert asked.wait(30), "the worker never asked what is being decoded"
    for i in (1, 2, 3):  # decoded one after the other, as slowly as the machine likes
        inbox.put(_work(i))  # handed on, then no longer counted (the pipeline's order)
        decoding["n"] -= 1
    out = [outbox.get(timeout=30) for _ in range(4)]
    inbox.put(STOP)
    w.join(30)
    assert backend_calls == [4]
    assert all(isinstance(o, Captioned) and o.batch == 4 for o in out)
    assert w.batch_sizes == collections.Counter({4: 1})


def test_a_lone_image_goes_alone_and_says_so(tmp_path) -> None:
    backend, out = _run(tmp_path, lambda within: 0, lambda inbox: inbox.put(_work(0)), 1)
    assert backend.calls == [1]
    assert out[0].batch == 1


def _calls(d: Daemon, folder: Path) -> list[int]:
    """The daemon's model calls under `folder`, as images per call, from the `batch` field
    of its `captioned` log lines (a call of s images gives s lines saying s; a copy reused
    from an earlier call says 0 and is no call)."""
    seen = collections.Counter(
        e["batch"]
        for e in d.logged("captioned")
        if e["path"].startswith(str(folder) + os.sep) and e["batch"]
    )
    return sorted((s for s, k in seen.items() for _ in range(k // s)), reverse=True)


def test_a_burst_into_the_daemon_runs_full_batches_and_a_lone_image_goes_alone(
    tmp_path, tiny_llava
):
    watched, staging = tmp_path / "watched", tmp_path / "staging"
    (watched / "burst").mkdir(parents=True)
    cfg = write_config(
        tmp_path,
        tiny_llava,
        [{"path": str(watched), "settle_seconds": 0.3}],
        model={
            "backend": "transformers",
            "path": str(tiny_llava),
            "batch_size": 16,
            "max_tokens": 6,
            "isolate": False,
        },
        decode_threads=1,
        max_side=64,
    )
    # Large PNGs (no reduced-scale decode), one decode thread, and small images for the
    # model: decoding a batch takes longer than the tiny model takes to caption it, as
    # with a real model on a GPU.
    n = 32
    staged = [distinct_image(i, staging / f"img{i:03d}.png", size=(1600, 1200)) for i in range(n)]
    with Daemon(cfg, tmp_path) as d:
        d.wait_scanned()  # else the start-up scan may queue part of the burst itself
        for p in staged:  # moved in at once, as a copy tool finishing a folder does
            os.rename(p, watched / "burst" / p.name)
        wait_for(
            lambda: all(d.captioned(watched / "burst" / p.name) for p in staged),
            120,
            "every image of the burst",
        )
        # Each line comes just after its batch's commit: wait for the last batch's too.
        wait_for(lambda: sum(_calls(d, watched / "burst")) == n, 30, "a line per image")
        assert _calls(d, watched / "burst") == [16] * (n // 16)
        distinct_image(n, watched / "lone.jpg")
        wait_for(lambda: d.captioned(watched / "lone.jpg"), 60, "the lone image")
        assert [e["batch"] for e in d.wait_logged("captioned", path=str(watched / "lone.jpg"))] == [
            1
        ]
    assert d.proc.returncode == 0
