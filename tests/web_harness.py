"""Helpers for the web tests: a daemon (or `watcher serve`) on a free port, its URL, images as
data URIs, and server-sent events read off a real HTTP response."""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml
from daemon_harness import Daemon, wait_for
from PIL import Image


def noise_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A picture of seeded noise: different seeds, different pixels, different captions."""
    rng = random.Random(seed)
    return Image.frombytes(
        "RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))
    )


def write_noise(path: Path, seed: int, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(seed).save(path, fmt)
    return path


def data_uri(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def web_config(
    tmp: Path, model: Path | None, folders: list[str], *, web: dict | None = None, **extra
) -> Path:
    """A config for the tiny Moondream (remote code, in its model process), JSON logs, the
    web server on a free port (listen port 0: the URL is logged at start)."""
    data: dict = {
        "database": str(tmp / "index.db"),
        "log": {"level": "info", "format": "json"},
        "folders": folders,
        "web": {"listen": "127.0.0.1:0", **(web or {})},
    }
    if model is not None:
        data["model"] = {"backend": "moondream", "path": str(model), "max_tokens": 30}
    data.update(extra)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def web_url(daemon: Daemon, timeout: float = 60.0) -> str:
    """The base URL the daemon logged (no trailing slash)."""
    events = wait_for(lambda: daemon.logged("web page and API"), timeout, "the web server")
    return str(events[0]["url"]).rstrip("/")


class Server:
    """`watcher serve` in a subprocess (no folders watched; a model unless --no-model)."""

    def __init__(self, config: Path, tmp: Path, *args: str) -> None:
        self.log_path = tmp / "serve.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "--config", str(config), "serve", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.daemon_like = Daemon(config, tmp)  # for its log reading
        self.daemon_like.log_path = self.log_path
        wait_for(
            lambda: self.daemon_like.logged("web page and API") or self.proc.poll() is not None,
            120,
            "watcher serve to start",
        )
        if self.proc.poll() is not None:
            self.stop()
            raise AssertionError("watcher serve did not start:\n" + self.log_text())
        self.url = web_url(self.daemon_like)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(30)
        self._log.close()
        return code


def sse_events(lines: Iterable[str]) -> list[dict]:
    """The JSON objects of `data:` lines of an event stream, up to the end of the stream."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            if payload.strip() == "[DONE]":
                events.append({"done": True})
                break
            events.append(json.loads(payload))
    return events
