"""TransformersBackend on tiny random-weight models built offline (tests/tiny_models.py).

The tiny models only ever generate `content_words()`, never a prompt word, so any prompt
word in an output was echoed from the prompt.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from tiny_models import build_tiny_llava_next, content_words, prompt_words
from transformers import AutoProcessor

from watcher.backends import ModelUnavailable, load_backend
from watcher.backends.transformers_backend import TransformersBackend
from watcher.config import ModelConfig
from watcher.tasks import Task

TOKENS = 8
SHORT = Task("short", max_tokens=TOKENS)
PROMPT = Task("prompt", max_tokens=TOKENS)
QUERY = Task("query", "what colour is the main object ?", max_tokens=TOKENS)
QUERY2 = Task("query", "how many animals are there ?", max_tokens=TOKENS)
TASKS = (SHORT, PROMPT, QUERY)


def cfg(path: Path | str, **kw) -> ModelConfig:
    return ModelConfig(backend="transformers", path=str(path), revision=None, **kw)


def picture(color, size=(64, 64), shape: str | None = None, ink="white") -> Image.Image:
    im = Image.new("RGB", size, color)
    w, h = size
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=ink)
    elif shape == "square":
        draw.rectangle([0, 0, w // 2, h // 2], fill=ink)
    elif shape == "stripes":
        for x in range(0, w, 8):
            draw.rectangle([x, 0, x + 3, h], fill=ink)
    return im


# Different sizes and aspect ratios: LLaVA-NeXT turns each into a different number of image
# tokens, so a batch of them is left-padded.
MIXED = [
    picture("red", (64, 64)),
    picture("blue", (120, 40), "circle"),
    picture("green", (40, 100), "square", ink="black"),
    picture((200, 180, 20), (300, 200), "stripes"),
    picture("purple", (50, 50), "circle", ink="yellow"),
    picture("white", (90, 160), "square", ink="red"),
]


@pytest.fixture(scope="module")
def tiny_llava_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava_next(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="module")
def llava(tiny_llava: Path) -> TransformersBackend:
    return TransformersBackend.load(cfg(tiny_llava))


@pytest.fixture(scope="module")
def llava_next(tiny_llava_next: Path) -> TransformersBackend:
    return TransformersBackend.load(cfg(tiny_llava_next))


@pytest.fixture(scope="module")
def blip(tiny_blip: Path) -> TransformersBackend:
    return TransformersBackend.load(cfg(tiny_blip))


@pytest.fixture(params=["llava", "llava_next", "blip"])
def backend(request: pytest.FixtureRequest) -> TransformersBackend:
    return request.getfixturevalue(request.param)


# --- loading --------------------------------------------------------------------------


def test_load_from_path_sets_the_attributes(tiny_llava: Path) -> None:
    b = TransformersBackend.load(cfg(tiny_llava, batch_size=3, device="cpu", dtype="float32"))
    assert b.name == str(tiny_llava)
    assert b.revision is None
    assert b.max_batch == 3
    assert b.placement.device == "cpu"
    assert b.placement.dtype == torch.float32
    assert b.chat is True
    b.close()


def test_load_backend_picks_transformers(tiny_blip: Path) -> None:
    b = load_backend(cfg(tiny_blip))
    assert isinstance(b, TransformersBackend)
    assert b.chat is False  # BLIP has no chat template
    b.close()


def test_missing_path_is_model_unavailable(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelUnavailable, match="no-such-model") as err:
        TransformersBackend.load(cfg(missing))
    assert str(missing) in str(err.value)


def test_folder_without_model_files_is_model_unavailable(tmp_path: Path) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ModelUnavailable) as err:
        TransformersBackend.load(cfg(empty))
    assert str(empty) in str(err.value)


def test_folder_without_weights_is_model_unavailable(tiny_llava: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial-copy"
    shutil.copytree(tiny_llava, partial)
    for weights in partial.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelUnavailable, match="files missing") as err:
        TransformersBackend.load(cfg(partial))
    assert str(partial) in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_device_is_model_unavailable(tiny_llava: Path) -> None:
    with pytest.raises(ModelUnavailable, match="CUDA is not available"):
        TransformersBackend.load(cfg(tiny_llava, device="cuda"))


def test_uncached_hub_model_offline_is_model_unavailable() -> None:
    # conftest sets HF_HUB_OFFLINE: nothing may be fetched, and this id is not cached.
    model = ModelConfig(backend="transformers", id="nobody-here/no-such-vlm", revision="v1")
    with pytest.raises(ModelUnavailable, match="nobody-here/no-such-vlm"):
        TransformersBackend.load(model)


# --- outputs --------------------------------------------------------------------------


def test_output_is_generated_words_only(backend: TransformersBackend) -> None:
    vocabulary = set(content_words())
    for row in backend.describe(MIXED[:3], TASKS):
        for text in row:
            words = text.split()
            # Every token generated, and nothing else: no prompt, no special tokens.
            assert len(words) == TOKENS, text
            assert set(words) <= vocabulary, text


def test_chat_prompt_is_not_echoed(llava: TransformersBackend) -> None:
    echoed = set(prompt_words()) | {"<image>", "<s>", "</s>", "<pad>"}
    for row in llava.describe(MIXED[:2], (*TASKS, QUERY2)):
        for text in row:
            assert text.strip()
            assert not echoed & set(text.lower().split()), text
            assert "ASSISTANT" not in text.upper() and "USER" not in text.upper()


def test_same_image_gives_the_same_text(backend: TransformersBackend) -> None:
    first = backend.describe([picture("red"), picture("red")], TASKS)
    again = backend.describe([picture("red")], TASKS)
    assert first[0] == first[1] == again[0]


def test_different_images_give_different_text(backend: TransformersBackend) -> None:
    red, blue = backend.describe([picture("red"), picture("blue", shape="circle")], [SHORT])
    assert red != blue


def test_task_prompt_changes_the_output(llava: TransformersBackend) -> None:
    for row in llava.describe([picture("red"), picture("teal", shape="stripes")], TASKS):
        assert len(set(row)) == len(TASKS), row  # short, prompt and query all differ
    ((a, b),) = llava.describe([picture("red")], [QUERY, QUERY2])
    assert a != b  # and so does the question


def test_model_without_chat_template_captions_once_for_all_tasks(
    blip: TransformersBackend,
) -> None:
    # Unconditional captioning: every task gets the same caption, cut at its max_tokens.
    long_short = (Task("long", max_tokens=12), Task("short", max_tokens=5), QUERY)
    ((long, short, query),) = blip.describe([picture("blue", shape="circle")], long_short)
    assert len(long.split()) == 12 and len(short.split()) == 5
    assert long.split()[:5] == short.split()
    assert query.split() == long.split()[:TOKENS]


def test_max_tokens_is_per_task(llava: TransformersBackend) -> None:
    ((three, ten),) = llava.describe([picture("red")], [Task("short", max_tokens=3), QUERY])
    assert len(three.split()) == 3
    assert len(ten.split()) == TOKENS


def test_llava_next_batches_need_left_padding(tiny_llava_next: Path) -> None:
    # Guards the batching test below: it only means something if the batch is padded.
    processor = AutoProcessor.from_pretrained(tiny_llava_next, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    conversations = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": im}, {"type": "text", "text": "what ?"}],
            }
        ]
        for im in MIXED
    ]
    inputs = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding=True,
    )
    padding = (inputs["attention_mask"] == 0).sum(dim=1)
    assert len(set(padding.tolist())) > 2, padding


def test_batch_gives_the_same_text_as_one_at_a_time(backend: TransformersBackend) -> None:
    tasks = (SHORT, QUERY)
    batched = backend.describe(MIXED, tasks)
    single = [backend.describe([im], tasks)[0] for im in MIXED]
    assert batched == single


def test_batches_are_split_at_max_batch(tiny_llava_next: Path, llava_next) -> None:
    small = TransformersBackend.load(cfg(tiny_llava_next, batch_size=4))
    generate = small._model.generate
    sizes: list[int] = []

    def spy(**kw):
        sizes.append(kw["input_ids"].shape[0])
        return generate(**kw)

    small._model.generate = spy
    assert small.describe(MIXED, [SHORT]) == llava_next.describe(MIXED, [SHORT])
    assert sizes == [4, 2]
    small.close()


def test_non_rgb_images_are_converted(llava: TransformersBackend) -> None:
    rgba = picture("green", shape="circle").convert("RGBA")
    grey = picture("grey", shape="square").convert("L")
    got = llava.describe([rgba, grey], [SHORT])
    want = llava.describe([rgba.convert("RGB"), grey.convert("RGB")], [SHORT])
    assert got == want


def test_empty_input(llava: TransformersBackend) -> None:
    assert llava.describe([], TASKS) == []
    assert llava.describe([picture("red")], []) == [[]]


def test_close_frees_the_model(tiny_blip: Path) -> None:
    b = TransformersBackend.load(cfg(tiny_blip))
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.describe([picture("red")], [SHORT])
