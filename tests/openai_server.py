"""A small OpenAI chat-completions server for tests: real HTTP on a free loopback port,
answered by a real (tiny) model, with scripted failures and a record of what it was sent."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

from watcher.tasks import INSTRUCTIONS, Task


@dataclass(frozen=True)
class Reply:
    """A scripted answer instead of the model's: a status, headers and a JSON body.
    `stall`: hold the request until the next one arrives (a server that does not answer
    in time; the client's retry releases it)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    stall: bool = False

    @classmethod
    def chat(cls, text: str) -> Reply:
        """A successful answer with this text (no model work: quick, whatever the load)."""
        message = {"role": "assistant", "content": text}
        return cls(200, body={"choices": [{"index": 0, "message": message}]})


@dataclass
class Seen:
    """One request as the server saw it."""

    authorization: str | None
    model: str
    instruction: str
    max_tokens: int
    image: Image.Image
    status: int = 0
    answer: str | None = None


class ChatServer:
    """`with ChatServer(model_dir) as server:` serves `server.base_url` (…/v1).

    `script`: replies for the next requests, in order (a Reply, or None for the model's
    answer). `refuse(image)`: a reason to answer that image with a 400. `gate`: hold the
    first requests until this many are in flight together (or 10 s pass), to see how many
    a client sends at once (`max_in_flight`)."""

    def __init__(self, model_dir: Path | None, *, max_tokens: int = 6) -> None:
        self.model_dir = model_dir
        self.max_tokens = max_tokens
        self.script: list[Reply | None] = []
        self.refuse: Callable[[Image.Image], str | None] = lambda image: None
        self.gate = 0
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()
        self._backend: Any = None
        self._arrived = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._backend is not None:
            self._backend.close()

    # -- the model ---------------------------------------------------------------------
    def answer(self, image: Image.Image, instruction: str, max_tokens: int) -> str:
        """The tiny model's raw answer, as the transformers backend gives it locally."""
        from watcher.backends import load_backend
        from watcher.config import ModelConfig

        kind = next((k for k, v in INSTRUCTIONS.items() if v == instruction), None)
        task = Task(kind, None, max_tokens) if kind else Task("query", instruction, max_tokens)
        with self._model_lock:
            if self._backend is None:
                assert self.model_dir is not None, "this server has no model"
                self._backend = load_backend(
                    ModelConfig(
                        backend="transformers",
                        path=str(self.model_dir),
                        max_tokens=self.max_tokens,
                        isolate=False,
                        device="cpu",
                    )
                )
            return self._backend.describe([image], [task])[0][0]

    # -- HTTP --------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (a timeout test)
                    pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][0]["content"]
                text = next(p["text"] for p in content if p["type"] == "text")
                url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
                image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                image.load()
                seen = Seen(
                    self.headers.get("Authorization"),
                    body["model"],
                    text,
                    body["max_tokens"],
                    image,
                )
                server._arrived.set()
                with server._cond:
                    server.seen.append(seen)
                    reply = server.script.pop(0) if server.script else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server._cond.notify_all()
                    deadline = time.monotonic() + 10
                    while server.max_in_flight < server.gate and time.monotonic() < deadline:
                        server._cond.wait(deadline - time.monotonic())
                try:
                    if reply is not None and reply.stall:
                        server._arrived.clear()
                        server._arrived.wait(30)  # released by the client's next try
                    if reply is not None:
                        seen.status = reply.status
                        self._send(reply.status, reply.body or {}, reply.headers)
                        return
                    why = server.refuse(image)
                    if why:
                        seen.status = 400
                        self._send(400, {"error": {"message": why, "type": "invalid_request"}})
                        return
                    answer = server.answer(image, text, body["max_tokens"])
                    seen.status, seen.answer = 200, answer
                    self._send(
                        200,
                        {
                            "object": "chat.completion",
                            "model": body["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": answer},
                                    "finish_reason": "stop",
                                }
                            ],
                        },
                    )
                finally:
                    with server._cond:
                        server.in_flight -= 1

        return Handler
