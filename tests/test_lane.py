"""The interactive lane: requests served by the one model worker ahead of the queue, streamed
through the model process, cleaned as the writer cleans."""

from __future__ import annotations

import json
import queue
import random
import threading
from pathlib import Path

import httpx
import pytest
from daemon_harness import Daemon, job_states, wait_for
from PIL import Image
from web_harness import data_uri, web_config, web_url, write_noise

from watcher.config import ModelConfig
from watcher.messages import STOP, Captioned, Job, Prepared, Work
from watcher.pipeline.model_worker import Ask, ModelWorker, WorkerStopped
from watcher.tasks import Task, clean_caption
from watcher.web.lane import CaptionStream

# -- the stream cleaner -------------------------------------------------------------------------

TEXTS = [
    "red cat sitting on a wooden table",
    "The image shows a red cat sitting on a table.",
    "Answer: the picture depicts   two dogs\n\nin the snow ",
    "  this photo captures: a sunset",
    "The cat sat on the mat.",
    "Theatre seats in a row",
    "The image shows.",
    "   ",
    "1. a list item, then more",
    "caption : the photograph features " + "many words " * 20,
    "This is a long caption " * 10,
]


def _pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True) if text[a:b]]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_cleaner_joins_to_clean_caption(text: str) -> None:
    rng = random.Random(text)
    for _ in range(25):
        cleaner = CaptionStream()
        out = [cleaner.feed(p) for p in _pieces(text, rng)] + [cleaner.finish()]
        assert "".join(out) == clean_caption(text), out


def test_stream_cleaner_lets_an_ordinary_opening_through_at_once() -> None:
    cleaner = CaptionStream()
    assert cleaner.feed("re") == "re"  # no lead-in ("The image shows") starts with "re"
    assert cleaner.feed("d  cat") == "d cat"
    assert cleaner.feed("  on ") == " on"
    assert cleaner.finish() == ""
    waiting = CaptionStream()
    assert waiting.feed("Th") == ""  # may become "The image shows"
    assert waiting.feed("e dog") == "The dog"  # "dog" is no image word: let through
    held = CaptionStream()
    assert held.feed("The image") == ""  # may be "The image shows": held back
    assert held.feed(" shows a cat") == ""
    assert held.finish() == "A cat"


# -- the worker: asks go ahead of the queued work -----------------------------------------------


class GatedBackend:
    """Records calls by image tag; the first queued image holds its call until released."""

    name = "fake"
    revision = None
    max_batch = 1

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.stream_closed = threading.Event()

    def describe(self, images, tasks):
        tag = images[0].info["tag"]
        self.calls.append(tag)
        if tag == "w0":
            self.entered.set()
            assert self.release.wait(30)
        return [[f"text of {im.info['tag']}" for _ in tasks] for im in images]

    def stream(self, image, task):
        self.calls.append(image.info["tag"] + ":stream")
        try:
            yield from ("one", " two", " three", " four")
        finally:
            self.stream_closed.set()

    def close(self) -> None:
        pass


def _image(tag: str) -> Image.Image:
    im = Image.new("RGB", (8, 8))
    im.info["tag"] = tag
    return im


def _work(i: int, tmp: Path) -> Work:
    job = Job(i, tmp / f"w{i}.png", tmp, 0, 0)
    prepared = Prepared(job, _image(f"w{i}"), f"{i:064x}", 1, 1, 8, 8)
    return Work(prepared, (Task("short"),))


class Recorder:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.pieces: list[str] = []
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.cancel_after = cancel_after

    def chunk(self, text: str) -> None:
        self.pieces.append(text)

    def done(self) -> None:
        self.finished.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.finished.set()

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.pieces) >= self.cancel_after


def test_an_ask_waits_only_for_the_model_call_in_hand(tmp_path: Path) -> None:
    backend = GatedBackend()
    inbox: queue.Queue = queue.Queue()
    outbox: queue.Queue = queue.Queue()
    worker = ModelWorker(backend, inbox, outbox, tmp_path / "index.db")
    for i in range(5):
        inbox.put(_work(i, tmp_path))
    worker.start()
    try:
        assert backend.entered.wait(30)  # w0 is on the model; w1..w4 wait in the inbox
        plain, streamed = Recorder(), Recorder()
        worker.ask(Ask(_image("ask"), Task("normal"), False, plain))
        worker.ask(Ask(_image("ask2"), Task("normal"), True, streamed))
        assert worker.asks_waiting() == 2
        backend.release.set()
        assert plain.finished.wait(30) and streamed.finished.wait(30)
        wait_for(lambda: outbox.qsize() == 5, 30, "the queued work")
    finally:
        inbox.put(STOP)
        worker.join(30)
    assert backend.calls == ["w0", "ask", "ask2:stream", "w1", "w2", "w3", "w4"]
    assert plain.pieces == ["text of ask"] and plain.error is None
    assert streamed.pieces == ["one", " two", " three", " four"]
    assert all(isinstance(outbox.get_nowait(), Captioned) for _ in range(5))


def test_a_cancelled_stream_stops_the_model_and_a_stopped_worker_says_so(tmp_path: Path) -> None:
    backend = GatedBackend()
    backend.release.set()
    inbox: queue.Queue = queue.Queue()
    worker = ModelWorker(backend, inbox, queue.Queue(), tmp_path / "index.db")
    worker.start()
    leaving = Recorder(cancel_after=2)
    worker.ask(Ask(_image("a"), Task("short"), True, leaving))
    wait_for(backend.stream_closed.is_set, 30, "the abandoned stream to be closed")
    assert leaving.pieces == ["one", " two"]
    inbox.put(STOP)
    worker.join(30)
    late = Recorder()
    worker.ask(Ask(_image("b"), Task("short"), False, late))
    assert late.finished.is_set() and isinstance(late.error, WorkerStopped)


# -- streaming through the model process --------------------------------------------------------


def test_the_model_process_streams_and_stays_in_step(tiny_moondream: Path) -> None:
    from watcher.backends.process import ModelProcess

    backend = ModelProcess.start(ModelConfig(backend="moondream", path=str(tiny_moondream)))
    try:
        image = Image.new("RGB", (32, 32), (200, 30, 90))
        task = Task("long", max_tokens=20)
        whole = backend.describe([image], [task])[0][0]
        pieces = list(backend.stream(image, task))
        assert len(pieces) > 1 and "".join(pieces) == whole
        # A reader that leaves after one piece: the next calls still get their own replies.
        first = backend.stream(image, task)
        assert next(first) == pieces[0]
        first.close()
        other = Task("query", "what is it?", 20)
        assert backend.describe([image], [other])[0][0] == "".join(backend.stream(image, other))
        assert backend.restarts == 0
    finally:
        backend.close()


# -- a real daemon: an interactive request during a burst ----------------------------------------


def test_interactive_request_goes_ahead_of_a_burst(tmp_path: Path, tiny_moondream: Path) -> None:
    """The first queued image holds the model (a test gate), an API request arrives and
    waits, the gate opens: the request is answered before the next queued image reaches the
    model (which a second gate holds until the answer is in)."""
    folder = tmp_path / "burst"
    images = [write_noise(folder / f"b{i:02}.png", seed=100 + i) for i in range(12)]
    first_gate, second_gate = tmp_path / "gate1", tmp_path / "gate2"
    faults = {"model": [{"gate": str(first_gate), "times": 1}, {"gate": str(second_gate)}]}
    daemon = Daemon(
        web_config(tmp_path, tiny_moondream, [str(folder)]),
        tmp_path,
        env={"WATCHER_FAULTS": json.dumps(faults)},
    ).start()
    try:
        url = web_url(daemon)
        reached = first_gate.with_name("gate1.reached")
        wait_for(reached.exists, 120, "the first image on the model")
        answer: dict = {}

        def ask() -> None:
            r = httpx.post(
                f"{url}/v1/caption",
                json={"image_url": data_uri(images[0]), "length": "short"},
                timeout=120,
            )
            answer.update(status=r.status_code, body=r.json())

        asking = threading.Thread(target=ask)
        asking.start()
        wait_for(
            lambda: httpx.get(f"{url}/health").json()["interactive_waiting"] == 1,
            60,
            "the request to wait for the model",
        )
        first_gate.touch()
        asking.join(120)
        assert answer.get("status") == 200, answer
        states = job_states(daemon.db)
        # Answered while the burst waits: at most the image in hand was done.
        assert sum(s == "done" for s in states.values()) <= 1
        assert sum(s in ("pending", "running") for s in states.values()) >= len(images) - 1
        second_gate.touch()
        wait_for(lambda: all(daemon.captioned(p) for p in images), 120, "the burst")
        events = [e.get("event") for e in daemon.events()]
        answered = events.index("interactive request answered")
        faults_hit = [i for i, e in enumerate(events) if e == "injected fault (test only)"]
        assert faults_hit[0] < answered < faults_hit[1]
        # The answer is the text the writer put in the sidecar for the same picture.
        assert answer["body"]["caption"] == images[0].with_suffix(".txt").read_text().strip()
    finally:
        first_gate.touch()
        second_gate.touch()
        daemon.stop()
