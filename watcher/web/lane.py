"""The interactive lane: web requests answered by the daemon's model worker, ahead of its queue."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

from watcher.pipeline.model_worker import Ask, ModelWorker
from watcher.tasks import clean_caption

if TYPE_CHECKING:
    from PIL import Image

    from watcher.tasks import Task


class _Sink:
    """Carries the worker thread's answer into the asking request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self._cancelled = threading.Event()

    def _put(self, item: tuple[str, object]) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server stopped, nobody is waiting
            self._cancelled.set()

    def chunk(self, text: str) -> None:
        self._put(("chunk", text))

    def done(self) -> None:
        self._put(("done", None))

    def fail(self, exc: BaseException) -> None:
        self._put(("error", exc))

    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()


class WorkerLane:
    """ModelLane over the running ModelWorker (`watcher run`, `watcher serve`): one model,
    its thread, interactive requests first."""

    def __init__(self, worker: ModelWorker) -> None:
        self.worker = worker

    @property
    def model(self) -> str:
        return self.worker.backend.name

    def waiting(self) -> int:
        return self.worker.asks_waiting()

    async def _pieces(
        self, image: Image.Image, task: Task, stream: bool
    ) -> AsyncGenerator[str, None]:
        sink = _Sink(asyncio.get_running_loop())
        self.worker.ask(Ask(image, task, stream, sink))
        try:
            while True:
                kind, value = await sink.queue.get()
                if kind == "chunk":
                    yield str(value)
                elif kind == "done":
                    return
                else:
                    assert isinstance(value, BaseException)
                    raise value
        finally:  # done, failed, or the client went away: the worker stops or skips it
            sink.cancel()

    async def stream(self, image: Image.Image, task: Task) -> AsyncIterator[str]:
        """The text as the model generates it, cleaned as `describe` cleans it."""
        cleaner = CaptionStream()
        pieces = self._pieces(image, task, stream=True)
        try:
            async for piece in pieces:
                out = cleaner.feed(piece)
                if out:
                    yield out
        finally:
            await pieces.aclose()
        tail = cleaner.finish()
        if tail:
            yield tail

    async def describe(self, image: Image.Image, task: Task) -> str:
        """The whole text, post-processed as the writer does (watcher.tasks.clean_caption)."""
        parts = [p async for p in self._pieces(image, task, stream=False)]
        return clean_caption("".join(parts))


# The words a boilerplate opening (watcher.tasks) can start with, and what may follow
# "the"/"this" in one; any other opening is final after its first word (or two).
_LEADS = ("answer", "caption", "prompt", "assistant", "the", "this")
_SUBJECTS = ("image", "picture", "photo", "photograph")
# Past this many characters (whitespace collapsed) every boilerplate match is decided: the
# longest, three layers deep, is well under it.
_DECIDED = 120
_WORD = re.compile(r"[A-Za-z]+")


class CaptionStream:
    """clean_caption for text arriving in pieces: joined, its output equals
    `clean_caption(whole text)`. The opening is held back only while it may still turn out
    to be boilerplate ("The image shows ..."); after that, pieces pass through with runs of
    whitespace collapsed to one space and none at the ends."""

    def __init__(self) -> None:
        self._head: str | None = ""  # held opening; None once it has been let through
        self._space = False  # a space is owed before the next non-space text
        self._started = False  # any text emitted yet

    def feed(self, piece: str) -> str:
        if self._head is not None:
            self._head += piece
            if not self._decided(self._head):
                return ""
            head, self._head = self._head, None
            out = clean_caption(head)
            self._started = bool(out)
            self._space = self._started and head[-1:].isspace()
            return out
        return self._collapse(piece)

    def finish(self) -> str:
        if self._head is not None:
            head, self._head = self._head, None
            return clean_caption(head)
        return ""

    def _collapse(self, piece: str) -> str:
        out = []
        for part in re.split(r"(\s+)", piece):
            if not part:
                continue
            if part.isspace():
                self._space = self._started
                continue
            if self._space:
                out.append(" ")
            out.append(part)
            self._started, self._space = True, False
        return "".join(out)

    @staticmethod
    def _decided(head: str) -> bool:
        text = " ".join(head.split()).lower()
        if len(text) >= _DECIDED or (text and not text[0].isalpha()):
            return True  # every lead-in starts with a letter
        words = _WORD.findall(text)
        if not words:
            return False
        # A word is complete once something that is not a letter follows it.
        first_done = len(words) > 1 or not text.endswith(words[0])
        if not first_done:
            return not any(lead.startswith(words[0]) for lead in _LEADS)
        if words[0] not in _LEADS:
            return True
        if words[0] in ("the", "this"):
            if len(words) < 2:
                return False
            second_done = len(words) > 2 or not text.endswith(words[1])
            if not second_done:
                return not any(s.startswith(words[1]) for s in _SUBJECTS)
            if words[1] not in _SUBJECTS:
                return True
        return False  # a real lead-in: held until _DECIDED characters or the end
