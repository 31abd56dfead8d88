"""The clients people use, unchanged, against a real daemon with a token: the official
`moondream` client (md.vl(endpoint=...)) and the `openai` client."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest
from conftest import require
from daemon_harness import Daemon, wait_for
from PIL import Image
from web_harness import data_uri, web_config, web_url, write_noise

TOKEN = "s3cret-token-for-the-web-tests"


def _moondream():
    require(
        "the moondream client",
        importlib.util.find_spec("moondream") is not None,
        "pip install --no-deps moondream",
    )
    import moondream

    return moondream


def _openai():
    require(
        "the openai client", importlib.util.find_spec("openai") is not None, "pip install openai"
    )
    import openai

    return openai


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_moondream: Path):
    tmp = tmp_path_factory.mktemp("web-clients")
    folder = tmp / "pics"
    image = write_noise(folder / "photo.png", seed=7)
    daemon = Daemon(web_config(tmp, tiny_moondream, [str(folder)], web={"token": TOKEN}), tmp)
    daemon.start()
    try:
        url = web_url(daemon)
        wait_for(lambda: daemon.captioned(image), 120, "the start-up caption")
        with httpx.Client(
            base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as http:
            yield url, http, image
    finally:
        daemon.stop()


def test_moondream_client_caption_stream_and_query(served) -> None:
    md = _moondream()
    url, http, path = served
    model = md.vl(endpoint=f"{url}/v1", api_key=TOKEN)
    image = Image.open(path)
    # The client sends the picture as JPEG: the raw API, given the same JPEG, is the reference.
    jpeg = model.encode_image(image).image_url
    reference = http.post("/v1/caption", json={"image_url": jpeg, "length": "short"}).json()

    caption = model.caption(image, length="short")["caption"]
    assert caption == reference["caption"]

    pieces = list(model.caption(image, length="short", stream=True)["caption"])
    assert len(pieces) > 1 and "".join(pieces) == caption

    question = "What is on the table?"
    answer = model.query(image, question)["answer"]
    raw = http.post("/v1/query", json={"image_url": jpeg, "question": question}).json()
    assert answer == raw["answer"] and answer
    assert "".join(model.query(image, question, stream=True)["answer"]) == answer


def test_moondream_client_without_the_token_is_refused(served) -> None:
    md = _moondream()
    url, _, path = served
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as refused:
        md.vl(endpoint=f"{url}/v1").caption(Image.open(path))
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        md.vl(endpoint=f"{url}/v1", api_key="not-the-token-at-all").caption(Image.open(path))
    assert wrong.value.code == 401


def test_openai_client_chat_completion_with_an_image(served) -> None:
    openai = _openai()
    url, http, path = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
    uri = data_uri(path)
    question = "Describe the colours."
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": uri}},
            ],
        }
    ]
    done = client.chat.completions.create(model="moondream-watcher", messages=messages)
    text = done.choices[0].message.content
    assert (
        text
        == http.post("/v1/query", json={"image_url": uri, "question": question}).json()["answer"]
    )
    assert done.choices[0].finish_reason == "stop"

    stream = client.chat.completions.create(model="m", messages=messages, stream=True)
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(deltas) == text

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert "image" in str(bad.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="m", messages=messages
        )
