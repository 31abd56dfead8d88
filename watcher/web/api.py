"""The Moondream-compatible HTTP API (/v1/caption, /v1/query, ...), OpenAI chat, and /health."""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from watcher.tasks import Task
from watcher.web.context import WebContext
from watcher.web.security import TooLarge

if TYPE_CHECKING:
    from PIL import Image

# Moondream's caption lengths, and "prompt" (the Stable Diffusion prompt: our extension).
CAPTION_KINDS = ("short", "normal", "long", "prompt")
MAX_QUESTION = 2000  # characters
MAX_TOKENS_CAP = 2048  # the most a request's settings.max_tokens may ask for
_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),", re.I)


class ApiError(Exception):
    """An error answered as JSON {"error": message} with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


# -- request parsing -------------------------------------------------------------------------


async def _payload(request: Request) -> dict[str, Any]:
    """The request's fields: a JSON object, or a multipart form whose file field `image`
    (or `file`) becomes image bytes."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("application/json", "") or ctype.endswith("+json"):
        body = await request.body()
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "expected a JSON object")
        return data
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=50)
        out: dict[str, Any] = {}
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key in ("image", "file"):
                        out["image_bytes"] = await value.read()
                else:
                    out[key] = value
        finally:
            await form.close()
        if "stream" in out:
            out["stream"] = str(out["stream"]).lower() in ("1", "true", "yes", "on")
        return out
    raise ApiError(
        415, f"unsupported content type {ctype!r}: send application/json or multipart/form-data"
    )


def _image_bytes(data: dict[str, Any]) -> bytes:
    if isinstance(data.get("image_bytes"), bytes):
        return data["image_bytes"]
    url = data.get("image_url")
    if not isinstance(url, str) or not url:
        raise ApiError(400, "image_url is required: a data URI (data:image/jpeg;base64,...)")
    return decode_data_uri(url)


def decode_data_uri(url: str) -> bytes:
    """The bytes of a base64 data URI; ApiError 400 for anything else (this server fetches
    no URL: nothing leaves the machine because a request named it)."""
    m = _DATA_URI.match(url[:300])
    if not m:
        raise ApiError(
            400, "image_url must be a data URI (data:image/...;base64,...); URLs are not fetched"
        )
    if ";base64" not in (m.group("params") or "").lower():
        raise ApiError(400, "image_url: only base64 data URIs are accepted")
    try:
        return base64.b64decode("".join(url[m.end() :].split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_url: the base64 data is not valid") from None


def _image(ctx: WebContext, data: dict[str, Any]) -> Image.Image:
    """The request's image, decoded as the pipeline decodes files (the same bomb guard)."""
    from watcher.pipeline.decode import DecodeError, decode_image

    raw = _image_bytes(data)
    if not raw:
        raise ApiError(400, "the image is empty")
    cfg = ctx.config
    try:
        return decode_image(raw, max_pixels=cfg.max_pixels, max_side=cfg.max_side)
    except DecodeError as e:
        status = 413 if e.reason.startswith("image too large") else 400
        raise ApiError(status, f"bad image: {e.reason}") from None


def _max_tokens(ctx: WebContext, data: dict[str, Any]) -> int:
    settings = data.get("settings")
    value = settings.get("max_tokens") if isinstance(settings, dict) else None
    if value is None:
        value = data.get("max_tokens", data.get("max_completion_tokens"))
    if value is None:
        return ctx.config.model.max_tokens
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, "max_tokens: expected a positive integer")
    return min(value, MAX_TOKENS_CAP)


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{key}: expected true or false")
    return value


# -- answering ---------------------------------------------------------------------------------


def _lane(ctx: WebContext):
    if ctx.lane is None:
        raise ApiError(503, "no model is loaded in this server (started with --no-model)")
    return ctx.lane


def _model_failure(exc: BaseException) -> ApiError:
    """A model-side failure as the status a client can act on."""
    from watcher.backends.process import ModelCrashed
    from watcher.pipeline.model_worker import WorkerStopped

    if isinstance(exc, (WorkerStopped, ModelCrashed)):
        return ApiError(503, f"the model is not available: {exc}")
    text = " ".join(str(exc).split())[:300]
    return ApiError(500, f"model error: {getattr(exc, 'type_name', type(exc).__name__)}: {text}")


async def _answer(ctx: WebContext, image: Image.Image, task: Task) -> str:
    try:
        return await _lane(ctx).describe(image, task)
    except ApiError:
        raise
    except Exception as exc:
        raise _model_failure(exc) from exc


async def _started_stream(ctx: WebContext, image: Image.Image, task: Task):
    """The lane's stream with its first piece already produced, so that a failure before any
    text (model down) is still an HTTP status, not an event inside a 200."""
    pieces = _lane(ctx).stream(image, task).__aiter__()
    try:
        first = await pieces.__anext__()
    except StopAsyncIteration:
        first = None
    except Exception as exc:
        raise _model_failure(exc) from exc
    return first, pieces


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _moondream_stream(ctx: WebContext, image: Image.Image, task: Task) -> Response:
    first, pieces = await _started_stream(ctx, image, task)

    async def events() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield _sse({"chunk": first, "completed": False})
            async for piece in pieces:
                yield _sse({"chunk": piece, "completed": False})
        except Exception as exc:  # after the 200: the error goes in the stream
            yield _sse({"error": _model_failure(exc).message, "completed": True})
            return
        finally:
            await _close(pieces)
        yield _sse({"completed": True})

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def _handler(fn: Callable[[WebContext, Request], Any], ctx: WebContext):
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(ctx, request)
        except ApiError as e:
            return error_response(e.status, e.message)
        except TooLarge:
            raise  # the security middleware answers 413
        except Exception as e:  # never a traceback to the client
            import structlog

            structlog.get_logger("watcher.web.api").error(
                "API request failed", path=request.url.path, exc_info=e
            )
            return error_response(500, f"internal error: {type(e).__name__}")

    return endpoint


async def caption(ctx: WebContext, request: Request) -> Response:
    data = await _payload(request)
    length = data.get("length", "normal")
    if length not in CAPTION_KINDS:
        raise ApiError(400, f"length: expected one of {', '.join(CAPTION_KINDS)}")
    stream = _flag(data, "stream")
    task = Task(length, max_tokens=_max_tokens(ctx, data))
    _lane(ctx)
    image = _image(ctx, data)
    if stream:
        return await _moondream_stream(ctx, image, task)
    return JSONResponse({"caption": await _answer(ctx, image, task), "request_id": _id()})


async def query(ctx: WebContext, request: Request) -> Response:
    data = await _payload(request)
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ApiError(400, "question is required")
    if len(question) > MAX_QUESTION:
        raise ApiError(400, f"question: at most {MAX_QUESTION} characters")
    stream = _flag(data, "stream")
    task = Task("query", question.strip(), _max_tokens(ctx, data))
    _lane(ctx)
    if "image_url" not in data and "image_bytes" not in data:
        raise ApiError(400, "image_url is required: this server answers questions about images")
    image = _image(ctx, data)
    if stream:
        return await _moondream_stream(ctx, image, task)
    return JSONResponse({"answer": await _answer(ctx, image, task), "request_id": _id()})


def _not_supported(skill: str):
    async def endpoint(ctx: WebContext, request: Request) -> Response:
        raise ApiError(
            501,
            f"{skill} is not supported by this server: it captions and answers questions "
            "(/v1/caption, /v1/query)",
        )

    return endpoint


async def health(ctx: WebContext, request: Request) -> Response:
    lane = ctx.lane
    return JSONResponse(
        {
            "status": "ok",
            "model": getattr(lane, "model", None) if lane is not None else None,
            "watching": ctx.daemon,
            "interactive_waiting": lane.waiting()
            if lane is not None and hasattr(lane, "waiting")
            else 0,
        }
    )


# -- OpenAI-compatible chat completions --------------------------------------------------------


def _chat_task_and_image(ctx: WebContext, data: dict[str, Any]) -> tuple[Task, Image.Image]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list")
    text, url = "", None
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ApiError(400, "messages[].content: expected a string or a list of parts")
        texts = []
        for part in parts:
            if not isinstance(part, dict):
                raise ApiError(400, "messages[].content[]: expected objects")
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                ref = part.get("image_url")
                ref = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(ref, str):
                    raise ApiError(400, "image_url: expected {'url': 'data:image/...'}")
                url = ref
        text = " ".join(t.strip() for t in texts if t.strip()) or text
    if url is None:
        raise ApiError(400, "no image: send an image_url content part (a data URI)")
    max_tokens = _max_tokens(ctx, data)
    if len(text) > MAX_QUESTION:
        raise ApiError(400, f"the question: at most {MAX_QUESTION} characters")
    task = Task("query", text, max_tokens) if text else Task("normal", max_tokens=max_tokens)
    _lane(ctx)
    return task, _image(ctx, {"image_url": url})


def _openai_error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)


async def chat_completions(ctx: WebContext, request: Request) -> Response:
    try:
        data = await _payload(request)
        stream = _flag(data, "stream")
        task, image = _chat_task_and_image(ctx, data)
        model = getattr(ctx.lane, "model", "moondream-watcher")
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not stream:
            text = await _answer(ctx, image, task)
            return JSONResponse(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                }
            )
        first, pieces = await _started_stream(ctx, image, task)
    except ApiError as e:
        return _openai_error(e.status, e.message)

    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        return _sse(
            {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    async def events() -> AsyncIterator[bytes]:
        try:
            yield chunk({"role": "assistant", "content": first or ""}, None)
            async for piece in pieces:
                yield chunk({"content": piece}, None)
        except Exception as exc:
            yield _sse({"error": {"message": _model_failure(exc).message, "type": "server_error"}})
            return
        finally:
            await _close(pieces)
        yield chunk({}, "stop")
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _close(pieces: Any) -> None:
    close = getattr(pieces, "aclose", None)
    if close is not None:  # the lane's generator: tells the worker the asker is gone
        await close()


def _id() -> str:
    return uuid.uuid4().hex


def routes(ctx: WebContext) -> list[BaseRoute]:
    """The API's routes (mounted by watcher.web.app.create_app)."""
    return [
        Route("/health", _handler(health, ctx), methods=["GET"]),
        Route("/v1/health", _handler(health, ctx), methods=["GET"]),
        Route("/v1/caption", _handler(caption, ctx), methods=["POST"]),
        Route("/v1/query", _handler(query, ctx), methods=["POST"]),
        Route("/v1/detect", _handler(_not_supported("detect"), ctx), methods=["POST"]),
        Route("/v1/point", _handler(_not_supported("point"), ctx), methods=["POST"]),
        Route("/v1/segment", _handler(_not_supported("segment"), ctx), methods=["POST"]),
        Route("/v1/chat/completions", _handler(chat_completions, ctx), methods=["POST"]),
    ]
