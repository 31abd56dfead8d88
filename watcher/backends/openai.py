"""A model on an OpenAI-compatible chat-completions server (vLLM, Ollama, LM Studio, llama.cpp).

Each (image, task) pair is one `POST {base_url}/chat/completions` request: the task's
instruction (`Task.instruction`, as for the local chat models) and the image as a JPEG data
URI, greedy (`temperature: 0`), capped at the task's `max_tokens`. The raw answer goes back
to the pipeline, which cleans it as it cleans every backend's output.

`describe` keeps up to `model.concurrency` requests in flight (a thread pool over one
httpx connection pool), so a server that batches (vLLM, llama.cpp with slots) sees them
together. A 429, a 5xx, a timeout or a connection error is retried with a growing pause
(the server's `Retry-After` when it sends one), up to `model.retries` times; after that the
image fails as *transient* (`ServerUnavailable`): the job queue tries it again later. Any
other 4xx fails that image at once (`ServerRefused`) with the server's own message.

What goes where: only to `model.base_url`, which the config must name (there is no
default); one that is not a loopback address is refused unless `model.allow_remote: true`
(checked when the config is loaded). Redirects are not followed, and proxies, `.netrc` and
other settings from the environment are not used (`trust_env=False`): nothing reaches a
host the config does not name. The API key is read from the environment variable that
`model.api_key_env` names, sent as `Authorization: Bearer`, and never logged or shown.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import ipaddress
import os
import re
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from watcher.backends import ModelUnavailable
from watcher.backends.registry import BackendSpec

if TYPE_CHECKING:
    import httpx
    from PIL import Image

    from watcher.config import ModelConfig
    from watcher.tasks import Task

log = structlog.get_logger("watcher.backends.openai")

BACKOFF = 0.5  # seconds before the first retry; doubled each time
MAX_WAIT = 60.0  # the longest pause between tries, whatever Retry-After says
JPEG_QUALITY = 90
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Answers worth trying again: the server is busy, restarting, or timed out on its side.
RETRY_STATUSES = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))


class ServerRefused(RuntimeError):
    """The server answered this image with an error that another try will not change
    (a 4xx other than 429): the image fails now, with the server's reason."""

    transient = False


class ServerUnavailable(RuntimeError):
    """The server could not be reached, or stayed busy or failing, through every retry:
    the image fails as transient, and the job queue tries it again later."""

    transient = True


class BatchFailed(RuntimeError):
    """Some images of a batch failed; `.errors` maps image index -> error. The outputs of
    the others are kept, so the model worker's one-by-one retry sends no request twice.
    Transient only if every failure is (then the worker retries the whole batch later)."""

    def __init__(self, errors: dict[int, BaseException], total: int) -> None:
        self.errors = dict(sorted(errors.items()))
        self.index, first = next(iter(self.errors.items()))
        self.transient = all(getattr(e, "transient", False) for e in self.errors.values())
        super().__init__(
            f"{len(self.errors)} of {total} images failed; image {self.index}: "
            f"{type(first).__name__}: {first}"
        )


def is_loopback(host: str) -> bool:
    """Whether `host` (from a URL) is this machine: `localhost` or a loopback address.
    A name that merely resolves to 127.0.0.1 does not count: what it resolves to can change."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_problem(cfg: ModelConfig, given: Collection[str]) -> str | None:
    """What is wrong with the server settings of `cfg`, as a config error, or None."""
    if not cfg.base_url:
        return (
            "model.base_url: missing; backend openai needs the server's OpenAI API root, "
            "e.g. http://127.0.0.1:11434/v1 (Ollama) or http://127.0.0.1:8000/v1 (vLLM)"
        )
    parts = urlsplit(cfg.base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"model.base_url: expected an http:// or https:// URL; got {cfg.base_url!r}"
    if parts.username or parts.password:
        return (
            "model.base_url: no user or password in the URL; put the API key in an environment "
            "variable and name it in model.api_key_env"
        )
    if parts.query or parts.fragment:
        return f"model.base_url: expected no query or fragment; got {cfg.base_url!r}"
    if not cfg.allow_remote and not is_loopback(parts.hostname):
        return (
            f"model.base_url: {parts.hostname} is not this machine; images would be sent "
            "to it. Set model.allow_remote: true to allow that host"
        )
    if "id" not in given:
        return (
            "model.id: missing; backend openai needs the name the server knows the model by "
            "(e.g. moondream for Ollama, vikhyatk/moondream2 for vLLM)"
        )
    if cfg.api_key_env is not None and not ENV_NAME.match(cfg.api_key_env):
        return (
            "model.api_key_env: expected the NAME of an environment variable (such as "
            "OPENAI_API_KEY), not the key itself"
        )
    return None


class OpenAISpec(BackendSpec):
    """A model that watcher does not load: it lives behind an HTTP API."""

    name = "openai"
    not_test_loaded = "the model runs on the server at model.base_url"
    downloads = False

    def load(self, cfg: ModelConfig) -> OpenAIBackend:
        return OpenAIBackend(cfg)

    def config_problem(self, cfg: ModelConfig, given: Collection[str]) -> str | None:
        return url_problem(cfg, given)

    def model_name(self, cfg: ModelConfig) -> str:
        return cfg.id

    def model_revision(self, cfg: ModelConfig) -> str | None:
        return cfg.revision

    def destination(self, cfg: ModelConfig) -> str:
        host = urlsplit(cfg.base_url or "").hostname or ""
        where = "this machine" if is_loopback(host) else "another machine: model.allow_remote"
        return f"{cfg.base_url} (model {cfg.id}; {where})"


SPEC = OpenAISpec()


def api_key(cfg: ModelConfig) -> str | None:
    """The API key from the environment variable the config names; ModelUnavailable when
    that variable is not set (a key the user meant to send must not silently go missing)."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ModelUnavailable(
            f"model.api_key_env: the environment variable {cfg.api_key_env} is not set; "
            "set it to the server's API key (for the service: Environment= or "
            "EnvironmentFile= in its unit), or remove model.api_key_env"
        )
    return key


def retry_after(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks for (a number or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def encode_image(image: Image.Image) -> str:
    """The image as a JPEG data URI (what every OpenAI-compatible server accepts)."""
    buf = io.BytesIO()
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def answer_text(data: Any) -> str:
    """The text of a chat-completions answer; ValueError when it has none."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content in the answer") from None
    if isinstance(content, list):  # content parts
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    if not isinstance(content, str):
        raise ValueError(f"message.content is {type(content).__name__}, not text")
    return content


def _server_message(response: httpx.Response, limit: int = 200) -> str:
    """The server's own error text: OpenAI's {"error": {"message"}}, Ollama's {"error"},
    or the start of the body."""
    text = ""
    try:
        data = response.json()
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            text = str(err.get("message") or err)
        elif err:
            text = str(err)
        elif isinstance(data, dict) and data.get("detail"):
            text = str(data["detail"])
    except ValueError:
        text = response.text
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_HINTS = {
    401: "check the API key in the environment variable named by model.api_key_env",
    403: "check the API key in the environment variable named by model.api_key_env",
    404: "check model.base_url (the API root, usually ending in /v1) and model.id",
    413: "the image is too large for the server; lower max_side",
}


def _failed(exc: BaseException) -> Future:
    f: Future = Future()
    f.set_exception(exc)
    return f


class OpenAIBackend:
    """Backend over an OpenAI-compatible chat-completions API."""

    def __init__(self, cfg: ModelConfig, *, backoff: float = BACKOFF) -> None:
        import httpx

        problem = url_problem(cfg, ("id",))
        if problem:  # a config built in code, bypassing load_config's check
            raise ModelUnavailable(problem)
        assert cfg.base_url is not None
        self.name = cfg.id
        self.revision = cfg.revision
        self.max_batch = max(1, cfg.batch_size)
        self.base_url = cfg.base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = cfg.id
        self.retries = cfg.retries
        self.timeout = cfg.timeout
        self.backoff = backoff
        key = api_key(cfg)
        self._secret = key or ""
        headers = {"User-Agent": "moondream-watcher"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(cfg.timeout, connect=min(10.0, cfg.timeout)),
            limits=httpx.Limits(
                max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency
            ),
            follow_redirects=False,
            trust_env=False,
        )
        self._pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="openai")
        self._closed = threading.Event()
        self._lock = threading.Lock()
        # Outputs (and refusals) of a batch that failed: the model worker retries such a
        # batch one image at a time, and these are answered from here, not sent again.
        self._kept: dict[tuple[str, str], str | ServerRefused] = {}
        log.info(
            "model server",
            backend="openai",
            url=self.base_url,
            model=self.model,
            concurrency=cfg.concurrency,
            api_key=f"from ${cfg.api_key_env}" if key else None,
        )

    # -- Backend -------------------------------------------------------------------------
    def describe(self, images: Sequence[Image.Image], tasks: Sequence[Task]) -> list[list[str]]:
        """Per image, one answer per task; every request of the batch is in flight at once
        (up to model.concurrency)."""
        uris = [encode_image(im) for im in images]
        digests = [hashlib.blake2b(u.encode("ascii"), digest_size=16).hexdigest() for u in uris]
        results: list[list[str]] = [["" for _ in tasks] for _ in images]
        futures: dict[tuple[int, int], Future] = {}
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("openai backend is closed")
            for i, uri in enumerate(uris):
                for j, task in enumerate(tasks):
                    kept = self._kept.pop((digests[i], task.key), None)
                    if isinstance(kept, ServerRefused):
                        futures[(i, j)] = _failed(kept)
                    elif kept is not None:
                        results[i][j] = kept
                    else:
                        futures[(i, j)] = self._pool.submit(self._ask, uri, task)
        errors: dict[int, BaseException] = {}
        for (i, j), f in futures.items():
            try:
                results[i][j] = f.result()
            except BaseException as e:  # noqa: BLE001 - each is that image's failure
                errors.setdefault(i, e if isinstance(e, Exception) else RuntimeError(str(e)))
        if not errors:
            return results
        if len(images) == 1:
            raise errors[0]
        with self._lock:
            if len(self._kept) > 64 * self.max_batch:  # never grows without bound
                self._kept.clear()
            for (i, j), f in futures.items():
                if i not in errors:
                    self._kept[(digests[i], tasks[j].key)] = results[i][j]
                elif isinstance(f.exception(), ServerRefused):
                    self._kept[(digests[i], tasks[j].key)] = f.exception()  # type: ignore[assignment]
        raise BatchFailed(errors, len(images))

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()  # ends any pause between retries at once
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    # -- one request ---------------------------------------------------------------------
    def _ask(self, uri: str, task: Task) -> str:
        import httpx

        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": task.instruction},
                        {"type": "image_url", "image_url": {"url": uri}},
                    ],
                }
            ],
            "max_tokens": task.max_tokens,
            "temperature": 0,
            "stream": False,
        }
        tries = self.retries + 1
        for attempt in range(1, tries + 1):
            wait: float | None = None
            try:
                response = self._client.post(self.url, json=body)
            except httpx.TimeoutException:
                problem = f"no answer from {self.base_url} within {self.timeout:g} s"
            except httpx.TransportError as e:
                problem = (
                    f"cannot reach {self.base_url}: {self._redact(str(e)) or type(e).__name__}"
                )
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return answer_text(response.json())
                    except ValueError as e:
                        raise ServerRefused(
                            f"{self.base_url} gave an answer that is not a chat completion: {e}"
                        ) from None
                reason = self._redact(_server_message(response))
                said = f"{status} {response.reason_phrase}" + (f": {reason}" if reason else "")
                if status not in RETRY_STATUSES:
                    if 300 <= status < 400:
                        where = response.headers.get("location", "?")
                        raise ServerRefused(
                            f"{self.base_url} redirects to {self._redact(where)}; not followed "
                            "(set model.base_url to the final address)"
                        )
                    hint = _HINTS.get(status)
                    raise ServerRefused(
                        f"{self.base_url} refused the image: {said}"
                        + (f" ({hint})" if hint else "")
                    )
                problem = f"{self.base_url} answered {said}"
                wait = retry_after(response.headers.get("retry-after"))
            if attempt == tries or self._closed.is_set():
                break
            pause = min(MAX_WAIT, wait if wait is not None else self.backoff * 2 ** (attempt - 1))
            log.info(
                "model server busy or unreachable; will retry",
                url=self.base_url,
                problem=problem,
                attempt=attempt,
                seconds=round(pause, 2),
            )
            if self._closed.wait(pause):  # closing: stop waiting
                break
        raise ServerUnavailable(f"{problem} (tried {attempt} time{'s' if attempt > 1 else ''})")

    def _redact(self, text: str) -> str:
        """`text` without the API key (a server may echo a request back in its error)."""
        return text.replace(self._secret, "***") if self._secret else text
