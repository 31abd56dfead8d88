"""The HTTP API of a real daemon (tiny Moondream in its model process), over real HTTP."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import httpx
import pytest
from daemon_harness import Daemon, wait_for
from web_harness import (
    data_uri,
    noise_image,
    png_bytes,
    sse_events,
    web_config,
    web_url,
    write_noise,
)

MAX_BODY = 3 * 2**20
MAX_PIXELS = 4_000_000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_moondream: Path):
    """One daemon for the module: watching a folder of three images (captioned at start)."""
    tmp = tmp_path_factory.mktemp("web-api")
    folder = tmp / "pics"
    images = [write_noise(folder / f"img{i}.png", seed=i) for i in range(3)]
    config = web_config(
        tmp,
        tiny_moondream,
        [str(folder)],
        web={"max_body_bytes": MAX_BODY},
        max_pixels=MAX_PIXELS,
    )
    daemon = Daemon(config, tmp).start()
    try:
        url = web_url(daemon)
        wait_for(lambda: all(daemon.captioned(p) for p in images), 120, "the start-up captions")
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, daemon, folder, images
    finally:
        daemon.stop()


def post(client: httpx.Client, path: str, **body) -> httpx.Response:
    return client.post(path, json=body)


def streamed(client: httpx.Client, path: str, **body) -> tuple[httpx.Response, list[dict]]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        return r, sse_events(r.iter_lines())


def test_health_names_the_model(served) -> None:
    client, daemon, _, _ = served
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["watching"] is True
    assert body["model"] and Path(body["model"]).name == "tiny-moondream0"


def test_caption_is_the_sidecar_text(served) -> None:
    """The API cleans text as the writer does: the same image, the same task (the folder's
    default, short), the same text as its sidecar."""
    client, _, _, images = served
    for image in images[:2]:
        r = post(client, "/v1/caption", image_url=data_uri(image), length="short")
        assert r.status_code == 200, r.text
        assert r.json()["caption"] == image.with_suffix(".txt").read_text().strip()


def test_caption_depends_on_image_and_length(served) -> None:
    client, _, _, images = served
    short = [post(client, "/v1/caption", image_url=data_uri(p), length="short") for p in images]
    texts = [r.json()["caption"] for r in short]
    assert len(set(texts)) > 1  # the pixels steer the words
    long = post(client, "/v1/caption", image_url=data_uri(images[0]), length="long").json()
    assert len(long["caption"].split()) > len(texts[0].split())
    prompt = post(client, "/v1/caption", image_url=data_uri(images[0]), length="prompt")
    assert prompt.status_code == 200 and prompt.json()["caption"]


def test_caption_stream_joins_to_the_caption(served) -> None:
    client, _, _, images = served
    whole = post(client, "/v1/caption", image_url=data_uri(images[1]), length="normal").json()
    r, events = streamed(client, "/v1/caption", image_url=data_uri(images[1]), length="normal")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = [e["chunk"] for e in events if "chunk" in e]
    assert len(chunks) > 1  # pieces as generated, not one block
    assert all(e["completed"] is False for e in events[:-1])
    assert events[-1] == {"completed": True}
    assert "".join(chunks) == whole["caption"]


def test_query_answers_and_streams_the_same(served) -> None:
    client, _, _, images = served
    uri = data_uri(images[2])
    a = post(client, "/v1/query", image_url=uri, question="What colour is the sky?")
    b = post(client, "/v1/query", image_url=uri, question="How many dogs are there?")
    assert a.status_code == 200 and b.status_code == 200
    assert a.json()["answer"] != b.json()["answer"]  # the question steers the answer
    r, events = streamed(client, "/v1/query", image_url=uri, question="What colour is the sky?")
    assert "".join(e.get("chunk", "") for e in events) == a.json()["answer"]
    assert events[-1]["completed"] is True


def test_multipart_upload_answers_like_a_data_uri(served) -> None:
    client, _, _, images = served
    r = client.post(
        "/v1/caption",
        files={"image": ("x.png", images[0].read_bytes(), "image/png")},
        data={"length": "short"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == images[0].with_suffix(".txt").read_text().strip()


def test_chat_completions_json_and_stream(served) -> None:
    client, _, _, images = served
    uri = data_uri(images[0])
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in the picture?"},
                {"type": "image_url", "image_url": {"url": uri}},
            ],
        }
    ]
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": messages})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and body["choices"][0]["finish_reason"] == "stop"
    same = post(client, "/v1/query", image_url=uri, question="What is in the picture?")
    assert message["content"] == same.json()["answer"]
    with client.stream(
        "POST", "/v1/chat/completions", json={"messages": messages, "stream": True}
    ) as s:
        events = sse_events(s.iter_lines())
    assert events[-1] == {"done": True}
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(deltas) == message["content"]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces width x height (a decompression bomb's header) and holds one row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 7))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"length": "short"}).encode(), 400, "image_url is required"),
        (json.dumps({"image_url": "http://example.com/a.jpg"}).encode(), 400, "data URI"),
        (json.dumps({"image_url": "data:image/png;base64,%%%"}).encode(), 400, "base64"),
        (
            json.dumps(
                {"image_url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}
            ).encode(),
            400,
            "not an image",
        ),
        (
            json.dumps(
                {
                    "image_url": "data:image/png;base64,"
                    + base64.b64encode(_png_header_only(30000, 30000)).decode()
                }
            ).encode(),
            413,
            "exceeds max_pixels",
        ),
    ],
)
def test_bad_requests_get_a_status_and_a_reason(served, body, status, says) -> None:
    client, _, _, _ = served
    r = client.post("/v1/caption", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]


def test_other_errors(served) -> None:
    client, _, _, images = served
    uri = data_uri(images[0])
    bad_length = post(client, "/v1/caption", image_url=uri, length="huge")
    assert bad_length.status_code == 400 and "length" in bad_length.json()["error"]
    no_question = post(client, "/v1/query", image_url=uri)
    assert no_question.status_code == 400 and "question" in no_question.json()["error"]
    text = client.post("/v1/caption", content=b"hi", headers={"content-type": "text/plain"})
    assert text.status_code == 415 and "content type" in text.json()["error"]
    for skill in ("detect", "point"):
        r = post(client, f"/v1/{skill}", image_url=uri, object="cat")
        assert r.status_code == 501 and skill in r.json()["error"]
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = client.get("/v1/caption")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_body_limit_is_enforced(served) -> None:
    client, _, _, _ = served
    big = json.dumps({"image_url": "data:image/png;base64," + "A" * (MAX_BODY + 10)}).encode()
    r = client.post("/v1/caption", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]

    def chunks():  # no Content-Length: counted while read
        for _ in range(8):
            yield b"A" * (MAX_BODY // 4)

    r = client.post("/v1/caption", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]


def test_uploads_write_nothing_into_the_watched_folder(served) -> None:
    client, daemon, folder, images = served
    before = sorted(p.name for p in folder.iterdir())
    rows = len(daemon.rows())
    upload = png_bytes(noise_image(99))
    r = client.post(
        "/v1/caption", files={"image": ("new.png", upload, "image/png")}, data={"length": "long"}
    )
    assert r.status_code == 200
    assert sorted(p.name for p in folder.iterdir()) == before
    assert len(daemon.rows()) == rows


def test_a_stream_the_client_leaves_does_not_block_the_next(served) -> None:
    client, daemon, _, images = served
    with client.stream(
        "POST",
        "/v1/caption",
        json={"image_url": data_uri(images[0]), "length": "long", "stream": True},
    ) as r:
        next(r.iter_lines())  # the first event, then hang up
    again = post(client, "/v1/caption", image_url=data_uri(images[0]), length="short")
    assert again.status_code == 200
    assert again.json()["caption"] == images[0].with_suffix(".txt").read_text().strip()
