"""PhotonBackend with a stand-in engine that has the Photon client's call signatures."""

from __future__ import annotations

import sys
import threading
import time
import types

import pytest
import torch
from PIL import Image

from watcher.backends import ModelUnavailable, load_backend
from watcher.backends.photon import PhotonBackend, PhotonBatchError
from watcher.config import ModelConfig
from watcher.tasks import PROMPT_INSTRUCTION, Task

WAIT = 5.0  # seconds; only reached when something is wrong


class Encoded:
    """Like moondream's Base64EncodedImage: what encode_image returns."""

    def __init__(self, image: Image.Image) -> None:
        self.color = image.getpixel((0, 0))


class FakePhoton:
    """moondream.PhotonClient's surface: encode_image, caption, query, close."""

    def __init__(self, barrier: int | None = None, fail_color=None) -> None:
        self.barrier = threading.Barrier(barrier, timeout=WAIT) if barrier else None
        self.fail_color = fail_color
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()
        self.started = threading.Semaphore(0)
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: list[tuple] = []
        self.encoded = 0
        self.closed = False
        self.in_flight_at_close: int | None = None

    def encode_image(self, image):
        if isinstance(image, Encoded):
            return image
        with self.lock:
            self.encoded += 1
        return Encoded(image)

    def caption(self, image, length="normal", stream=False, settings=None):
        return {"caption": self._serve("caption", image, length, stream, settings)}

    def query(
        self,
        image=None,
        question=None,
        stream=False,
        settings=None,
        reasoning=False,
        spatial_refs=None,
    ):
        if question is None:
            raise ValueError("question parameter is required")
        return {"answer": self._serve("query", image, question, stream, settings)}

    def close(self):
        with self.lock:
            self.in_flight_at_close = self.in_flight
            self.closed = True

    def _serve(self, method, image, arg, stream, settings):
        color = image.color if isinstance(image, Encoded) else image.getpixel((0, 0))
        with self.lock:
            self.calls.append((method, arg, stream, settings))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.started.release()
        try:
            if self.barrier is not None:
                self.barrier.wait()  # passes only when `parties` requests are in flight
            if self.gate is not None:
                assert self.gate.wait(WAIT)
            if color == self.fail_color:
                raise RuntimeError(f"engine error on {color}")
            return f"{method} {arg} {color}"
        finally:
            with self.lock:
                self.in_flight -= 1


def _img(color) -> Image.Image:
    return Image.new("RGB", (16, 16), color)


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (1, 2, 3), (4, 5, 6)]


def test_requests_run_concurrently_up_to_max_batch():
    engine = FakePhoton(barrier=4)
    backend = PhotonBackend(engine, ModelConfig(backend="photon", batch_size=4))
    assert backend.max_batch == 4
    out = backend.describe([_img(c) for c in COLORS + COLORS[:2]], [Task("short")])
    assert out == [[f"caption short {c}"] for c in COLORS + COLORS[:2]]
    assert engine.max_in_flight == 4  # the barrier of 4 let everything through
    backend.close()


def test_tasks_share_one_encoding_and_keep_order():
    engine = FakePhoton(barrier=6)
    backend = PhotonBackend(engine, ModelConfig(backend="photon", batch_size=6))
    tasks = [Task("long", max_tokens=9), Task("prompt"), Task("query", "Any dogs?", 5)]
    images = [_img(c) for c in COLORS[:2]]
    out = backend.describe(images, tasks)
    assert engine.encoded == 2
    assert engine.max_in_flight == 6
    for c, row in zip(COLORS[:2], out, strict=True):
        assert row == [
            f"caption long {c}",
            f"query {PROMPT_INSTRUCTION} {c}",
            f"query Any dogs? {c}",
        ]
    settings = {(m, a): s for m, a, _, s in engine.calls}
    assert settings[("caption", "long")] == {"temperature": 0, "max_tokens": 9}
    assert settings[("query", "Any dogs?")] == {"temperature": 0, "max_tokens": 5}
    assert all(stream is False for _, _, stream, _ in engine.calls)
    backend.close()


def test_a_failing_image_raises_after_the_batch_settles():
    engine = FakePhoton(fail_color=COLORS[2])
    backend = PhotonBackend(engine, ModelConfig(backend="photon", batch_size=3))
    images = [_img(c) for c in COLORS[:4]]
    with pytest.raises(PhotonBatchError) as err:
        backend.describe(images, [Task("short"), Task("normal")])
    assert err.value.index == 2
    assert list(err.value.errors) == [2]
    assert isinstance(err.value.__cause__, RuntimeError)
    assert "image 2" in str(err.value) and "engine error" in str(err.value)
    assert engine.in_flight == 0  # nothing left running
    assert len(engine.calls) == 8  # every request was tried
    # The caller retries one by one: the good images go through, the bad one fails alone.
    assert backend.describe([images[0]], [Task("short")]) == [[f"caption short {COLORS[0]}"]]
    with pytest.raises(PhotonBatchError):
        backend.describe([images[2]], [Task("short")])
    backend.close()


def test_close_waits_for_running_requests_and_cancels_queued_ones():
    engine = FakePhoton()
    engine.gate = threading.Event()
    backend = PhotonBackend(engine, ModelConfig(backend="photon", batch_size=2))
    failure: list[BaseException] = []

    def run():
        try:
            backend.describe([_img(c) for c in COLORS], [Task("short")])
        except BaseException as e:  # noqa: BLE001
            failure.append(e)

    describer = threading.Thread(target=run)
    describer.start()
    for _ in range(2):
        assert engine.started.acquire(timeout=WAIT)  # two requests running, four queued
    closer = threading.Thread(target=backend.close)
    closer.start()
    deadline = time.monotonic() + WAIT
    while not backend._pool._shutdown:  # close() has begun shutting the pool down
        assert time.monotonic() < deadline
        time.sleep(0.001)
    with backend._pool._shutdown_lock:  # ... and has cancelled the queued requests
        pass
    assert not engine.closed  # the engine stays up while requests run
    engine.gate.set()
    closer.join(WAIT)
    describer.join(WAIT)
    assert not closer.is_alive() and not describer.is_alive()
    assert engine.closed and engine.in_flight_at_close == 0
    assert len(engine.calls) == 2  # the queued four never reached the engine
    [err] = failure
    assert isinstance(err, PhotonBatchError) and "closed" in str(err)
    with pytest.raises(RuntimeError, match="closed"):
        backend.describe([_img(COLORS[0])], [Task("short")])
    backend.close()  # idempotent


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def fake_moondream(monkeypatch):
    """A `moondream` module whose md.photon records how it was called."""
    made: list[tuple] = []

    def photon(model, *, api_key=None, **runtime_config):
        made.append((model, runtime_config))
        return FakePhoton()

    module = types.ModuleType("moondream")
    module.photon = photon
    monkeypatch.setitem(sys.modules, "moondream", module)
    return made


def test_missing_package_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "moondream", None)
    with pytest.raises(ModelUnavailable, match=r"pip install 'moondream-watcher\[photon\]'"):
        load_backend(ModelConfig(backend="photon"))


def test_unsupported_machine_refused(fake_moondream, no_accelerator):
    with pytest.raises(ModelUnavailable) as err:
        load_backend(ModelConfig(backend="photon"))
    message = str(err.value)
    assert "NVIDIA GPU (CUDA) or Apple Silicon (MPS)" in message
    assert "model.backend: moondream" in message
    assert fake_moondream == []  # never started
    with pytest.raises(ModelUnavailable, match="'cpu'"):
        load_backend(ModelConfig(backend="photon", device="cpu"))


def test_load_on_a_gpu_machine(fake_moondream, no_accelerator, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend = load_backend(ModelConfig(backend="photon", batch_size=3, revision=None))
    assert isinstance(backend, PhotonBackend)
    assert backend.name == "vikhyatk/moondream2" and backend.max_batch == 3
    [(model, runtime)] = fake_moondream
    assert model == "moondream2"
    assert runtime["device"] == "cuda" and runtime["max_batch_size"] == 3
    assert backend.describe([_img(COLORS[0])], [Task("short")]) == [[f"caption short {COLORS[0]}"]]
    backend.close()
    assert backend.engine.closed


def test_engine_start_failure_is_model_unavailable(no_accelerator, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def broken(model, **runtime):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(ModelUnavailable, match="Photon could not start moondream2 on cuda"):
        PhotonBackend.load(ModelConfig(backend="photon"), factory=broken)
