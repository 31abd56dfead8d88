"""MoondreamBackend against a tiny remote-code model loaded exactly like Moondream2."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from watcher.backends import ModelUnavailable, load_backend
from watcher.backends.device import pick
from watcher.backends.moondream import MoondreamBackend
from watcher.config import ModelConfig
from watcher.tasks import PROMPT_INSTRUCTION, Task

GREEDY = {"temperature": 0, "variant": None}


@pytest.fixture(scope="module")
def backend(tiny_moondream: Path):
    b = load_backend(ModelConfig(backend="moondream", path=str(tiny_moondream), revision=None))
    yield b
    b.close()


@pytest.fixture
def model(backend):
    m = backend.model
    m.calls.clear()
    m.encode_image_calls = 0
    return m


def _image(color, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def _stripes() -> Image.Image:
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    for x in range(0, 64, 8):
        for y in range(64):
            img.putpixel((x, y), (0, 0, 0))
    return img


def test_loads_through_remote_code(backend, tiny_moondream):
    assert isinstance(backend, MoondreamBackend)
    assert type(backend.model).__module__.startswith("transformers_modules.")
    assert backend.name == str(tiny_moondream)
    assert backend.revision is None  # a local copy that is not a cache snapshot
    assert backend.max_batch == 1
    assert backend.placement == pick("auto", "auto")  # cuda > mps > cpu


def test_caption_lengths_and_exact_settings(backend, model):
    tasks = [
        Task("short", max_tokens=7),
        Task("normal", max_tokens=30),
        Task("long", max_tokens=50),
    ]
    [[short, normal, long_]] = backend.describe([_image((200, 40, 40))], tasks)
    assert model.calls == [
        ("caption", "short", {**GREEDY, "max_tokens": 7}),
        ("caption", "normal", {**GREEDY, "max_tokens": 30}),
        ("caption", "long", {**GREEDY, "max_tokens": 50}),
    ]
    for text in (short, normal, long_):
        assert text and all(w.isalpha() for w in text.split(" "))
    assert len(short.split()) < len(normal.split()) < len(long_.split())


def test_max_tokens_caps_the_output(backend, model):
    [[text]] = backend.describe([_image((10, 200, 10))], [Task("long", max_tokens=3)])
    assert len(text.split()) == 3
    assert model.calls == [("caption", "long", {**GREEDY, "max_tokens": 3})]


def test_prompt_and_query_use_query(backend, model):
    tasks = [Task("prompt", max_tokens=40), Task("query", "Is there a dog?", 20)]
    [[prompt, answer]] = backend.describe([_image((30, 30, 220))], tasks)
    assert model.calls == [
        ("query", PROMPT_INSTRUCTION, {**GREEDY, "max_tokens": 40}),
        ("query", "Is there a dog?", {**GREEDY, "max_tokens": 20}),
    ]
    assert prompt and answer


def test_one_encode_per_image_for_several_tasks(backend, model):
    images = [_image((200, 40, 40)), _image((30, 30, 220)), _stripes()]
    tasks = [Task("short"), Task("long"), Task("prompt"), Task("query", "What colour?")]
    out = backend.describe(images, tasks)
    assert len(out) == 3 and all(len(row) == 4 for row in out)
    assert model.encode_image_calls == 3
    assert len(model.calls) == 12


def test_deterministic(backend):
    tasks = [Task("normal"), Task("query", "What is it?")]
    images = [_stripes(), _image((120, 60, 200))]
    assert backend.describe(images, tasks) == backend.describe(images, tasks)


def test_output_depends_on_image_task_and_question(backend):
    tasks = [Task("normal"), Task("query", "What colour is it?"), Task("query", "Count them.")]
    red, blue = backend.describe([_image((220, 20, 20)), _image((20, 20, 220))], tasks)
    assert red[0] != blue[0]
    assert red[1] != red[2]  # the question matters
    [[normal, long_]] = backend.describe([_stripes()], [Task("normal"), Task("long")])
    assert not long_.startswith(normal)  # the length is part of the prompt


def test_unpinned_revision_refused(tmp_path):
    for revision in (None, "main"):
        cfg = ModelConfig(backend="moondream", revision=revision)
        with pytest.raises(ModelUnavailable, match="pinned revision"):
            load_backend(cfg)
        with pytest.raises(ModelUnavailable, match="pinned revision"):
            MoondreamBackend.load(cfg)


def test_bad_local_path_refused(tmp_path):
    with pytest.raises(ModelUnavailable, match="not a model folder"):
        load_backend(ModelConfig(backend="moondream", path=str(tmp_path / "nope")))


def test_close_releases_the_model(tiny_moondream):
    b = MoondreamBackend.load(ModelConfig(path=str(tiny_moondream), revision=None))
    b.close()
    assert b.model is None
    b.close()  # idempotent
