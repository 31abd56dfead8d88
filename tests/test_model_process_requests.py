"""The model process's requests (describe, locate, stream) share one send/reply path: errors
come back as the child's, a dead child fails the request in hand and is restarted for the next,
and the child runs with the allocator settings that spare a CPU model its page faults."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import wait_for
from images import distinct_image
from PIL import Image

from watcher.backends import open_backend
from watcher.backends.process import MALLOC_ENV, ModelCrashed, ModelError, ModelProcess
from watcher.config import ModelConfig
from watcher.tasks import Task

TASK = Task("short", max_tokens=6)
USER_TOP_PAD = "12345678"  # a setting of the user's own, which must reach the child unchanged


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def child(tiny_llava: Path) -> Iterator[ModelProcess]:
    """One model process for the module, started with a MALLOC_TOP_PAD_ of the user's."""
    old = os.environ.get("MALLOC_TOP_PAD_")
    os.environ["MALLOC_TOP_PAD_"] = USER_TOP_PAD
    try:
        backend = open_backend(
            ModelConfig(backend="transformers", path=str(tiny_llava), revision=None, max_tokens=6)
        )
    finally:
        if old is None:
            del os.environ["MALLOC_TOP_PAD_"]
        else:
            os.environ["MALLOC_TOP_PAD_"] = old
    assert isinstance(backend, ModelProcess)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image.Image:
    path = distinct_image(7, tmp_path_factory.mktemp("img") / "7.jpg")
    with Image.open(path) as im:
        return im.convert("RGB")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/environ")
def test_the_child_gets_the_allocator_settings_and_the_users_own_win(child) -> None:
    assert child.pid is not None
    raw = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
    env = dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)
    assert env["MALLOC_TRIM_THRESHOLD_"] == MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]
    assert env["MALLOC_MMAP_THRESHOLD_"] == MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert env["MALLOC_TOP_PAD_"] == USER_TOP_PAD
    assert env["HF_HUB_OFFLINE"] == "1", "the rest of the environment is inherited as before"


def test_stream_gives_describes_text_and_an_early_stop_keeps_the_socket_in_step(
    child, image
) -> None:
    whole = child.describe([image], [TASK])[0][0]
    assert whole.strip()
    assert "".join(child.stream(image, TASK)) == whole
    pieces = child.stream(image, TASK)
    assert next(pieces)
    pieces.close()  # the reader stops early: the child is told to cancel
    assert child.describe([image, image], [TASK]) == [[whole], [whole]]


def test_an_error_in_the_child_comes_back_with_its_type_and_text(child, image) -> None:
    # The tiny llava does not detect: watcher.backends.locate in the child raises Unsupported.
    with pytest.raises(ModelError, match="detect is not supported by this model") as info:
        child.locate(image, "detect", "a cat")
    assert info.value.type_name == "Unsupported"
    assert not info.value.out_of_memory and not info.value.transient
    assert child.describe([image], [TASK])[0][0].strip(), "the socket is still in step"


@pytest.mark.slow  # starts the model process twice more
def test_a_dead_child_fails_the_request_in_hand_and_is_restarted_for_the_next(child, image) -> None:
    expected = child.describe([image], [TASK])
    for request, doing in (
        (lambda: child.describe([image, image], [TASK]), "running a batch of 2"),
        (lambda: list(child.stream(image, TASK)), "streaming one image"),
    ):
        pid, restarts = child.pid, child.restarts
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: not _alive(pid), 30, "the model process to die")
        with pytest.raises(ModelCrashed, match=rf"died \(killed by SIGKILL\) {doing}"):
            request()
        assert child.describe([image], [TASK]) == expected
        assert child.restarts == restarts + 1 and child.pid != pid
