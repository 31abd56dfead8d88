"""The model worker: the one thread that owns the model, batches prepared images, reuses copies."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from watcher import faults
from watcher.backends import Backend, is_out_of_memory, locate, stream_text
from watcher.index import Index, connect
from watcher.messages import STOP, Captioned, Failed, Job, Work
from watcher.pipeline import MODEL
from watcher.tasks import Task

if TYPE_CHECKING:
    from PIL import Image

log = structlog.get_logger("watcher.pipeline.model_worker")

# Interactive requests answered before the next queued batch gets its turn.
ASKS_PER_TURN = 8
# The longest wait for a batch to fill before the first model call (later: one call's time).
FILL_WAIT = 0.5
# The longest wait for images already being decoded (they are certain to come; this only
# guards against a decode that hangs).
MAX_FILL_WAIT = 10.0


class AskSink(Protocol):
    """Where the worker sends an interactive request's answer (called from its thread)."""

    def chunk(self, text: str) -> None: ...  # raw text, in order (one piece unless streamed)

    def done(self) -> None: ...

    def fail(self, exc: BaseException) -> None: ...

    def cancelled(self) -> bool: ...  # the asker is gone: skip it, or stop streaming


@dataclass(frozen=True, eq=False)
class Ask:
    """An interactive request (the web page, the HTTP API): one image, one task, served by
    the worker ahead of the queued Work, on the same model."""

    image: Image.Image  # RGB, at most max_side, as decoding prepares it
    task: Task
    stream: bool
    sink: AskSink
    # (skill, object): Moondream's detect/point instead of the task; one JSON chunk.
    locate: tuple[str, str] | None = None


class WorkerStopped(RuntimeError):
    """The model worker has stopped (the daemon is stopping): no more interactive answers."""


class _Wake:
    """Put into the inbox when an Ask arrives: wakes a worker waiting for Work."""

    def __repr__(self) -> str:
        return "WAKE"


WAKE = _Wake()


class ModelWorker(threading.Thread):
    """Takes Work from `inbox`, sends Captioned/Failed to `outbox`.

    Batches are whatever is waiting, up to the backend's size: no waiting for a full batch, so
    a single dropped image is not delayed. On out-of-memory the batch is split and the batch
    size shrinks for good; on any other model error the batch is retried one image at a time
    so only the bad image fails.

    Interactive requests (`ask`) go ahead of the Work: they are served before each batch
    and between the model calls of a batch, so one waits at most for the model call in hand.
    """

    def __init__(
        self,
        backend: Backend,
        inbox: queue.Queue,
        outbox: queue.Queue,
        db_path: Path,
        *,
        cache_size: int = 4096,
        incoming: Callable[[float], int] = lambda within: 0,
        decoding: Callable[[], int] = lambda: 0,
    ) -> None:
        super().__init__(name=MODEL.name, daemon=True)
        self.backend = backend
        self.inbox = inbox
        self.outbox = outbox
        self.db_path = db_path
        self.batch_limit = max(1, backend.max_batch)
        # How many images will reach the inbox within the given seconds, as far as the stages
        # before can tell (being decoded, queued, settling): worth waiting for.
        self.incoming = incoming
        # How many images are claimed and being decoded: certain to reach the inbox soon.
        self.decoding = decoding
        self._last_call = 0.0  # seconds the last model call took
        self._cache: OrderedDict[tuple, tuple[str, ...]] = OrderedDict()
        self._cache_size = cache_size
        self.model_calls = 0  # batches sent to the model
        self.images_run = 0  # images the model actually saw
        self.batch_sizes: Counter[int] = Counter()  # model calls by their number of images
        self.busy_seconds = 0.0
        # When the work in hand last made progress (taken from the inbox, a model call
        # returned); None while waiting for work. The systemd watchdog reads it through
        # stalled_for(): an idle worker is never "not responding", however rarely it wakes.
        self.busy_since: float | None = None
        self.released: list[Job] = []  # work handed back at shutdown
        self.asks: queue.Queue[Ask] = queue.Queue()
        self.asks_served = 0
        self._ask_lock = threading.Lock()  # ask() vs the end of run(): none is left unanswered
        self._stopped = False

    def ask(self, request: Ask) -> None:
        """Queue an interactive request ahead of the background Work (any thread)."""
        with self._ask_lock:
            if self._stopped:
                request.sink.fail(WorkerStopped("the model worker has stopped"))
                return
            self.asks.put(request)
        self.inbox.put(WAKE)

    def asks_waiting(self) -> int:
        """Interactive requests queued and not yet started."""
        return self.asks.qsize()

    # -- thread -------------------------------------------------------------------------
    def run(self) -> None:
        self.index = Index(connect(self.db_path))
        draining = False
        while True:
            self._serve_asks()
            self.busy_since = None
            try:
                first = self.inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            if first is WAKE:
                continue
            self.busy_since = time.monotonic()
            if first is STOP:
                break
            batch, draining = self._gather(first)
            self._serve_asks()  # those that came while the batch filled go first
            self._process(batch)
            if draining:
                break
        # Anything still queued was decoded but not run: hand it back (pending again).
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not STOP and item is not WAKE:
                self.released.append(item.prepared.job)
        with self._ask_lock:
            self._stopped = True
        while True:
            try:
                self.asks.get_nowait().sink.fail(WorkerStopped("the daemon is stopping"))
            except queue.Empty:
                break
        self.index.db.conn.close()

    # -- interactive requests -----------------------------------------------------------
    def _serve_asks(self) -> None:
        """Answer the interactive requests waiting (up to ASKS_PER_TURN), on this thread's
        model: a flood of requests slows the queue down but cannot stop it."""
        for _ in range(ASKS_PER_TURN):
            try:
                request = self.asks.get_nowait()
            except queue.Empty:
                return
            if request.sink.cancelled():
                continue
            self.busy_since = time.monotonic()
            t0 = time.perf_counter()
            try:
                self._answer(request)
            except Exception as exc:  # the model call: anything can come out of it
                log.warning(
                    "interactive request failed",
                    task=request.task.kind,
                    error=_first_line(_described(exc)),
                )
                request.sink.fail(exc)
                continue
            finally:
                self.busy_seconds += time.perf_counter() - t0
                self.busy_since = time.monotonic()
            self.asks_served += 1
            request.sink.done()
            log.info(
                "interactive request answered",
                task=request.task.kind,
                stream=request.stream,
                ms=round((time.perf_counter() - t0) * 1000, 1),
                work_waiting=self.inbox.qsize(),
            )

    def _answer(self, request: Ask) -> None:
        sink = request.sink
        if request.locate is not None:
            skill, target = request.locate
            sink.chunk(json.dumps(locate(self.backend, request.image, skill, target)))
            return
        if not request.stream:
            sink.chunk(self.backend.describe([request.image], [request.task])[0][0])
            return
        with contextlib.closing(stream_text(self.backend, request.image, request.task)) as pieces:
            for piece in pieces:
                sink.chunk(piece)
                if sink.cancelled():  # the asker left: stop the model generating for nobody
                    break

    def stalled_for(self) -> float:
        """Seconds the work in hand has gone without progress (a model call that does not
        return); 0 while idle."""
        since = self.busy_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    # -- batching -----------------------------------------------------------------------
    def _gather(self, first: Work) -> tuple[list[Work], bool]:
        """`first` and whatever is waiting, up to the batch limit; (batch, STOP seen).

        Images already claimed and being decoded are certain to come within a decode's time:
        the batch waits for them (up to MAX_FILL_WAIT, a guard against a stuck decode), so a
        burst runs full batches even where decoding is slower than the model, as on a GPU
        (a batch of 8 instead of 32 costs a factor of 2-4 there). Images that may come
        (`incoming`: queued but not claimed, or settling and due) are waited for no longer
        than one model call took (or FILL_WAIT before the first): when the stages before
        are the slower side, waiting longer only idles the model. A lone image, with nothing
        behind it, goes at once."""
        batch = [first]
        start = time.monotonic()
        deadline = None
        while len(batch) < self.batch_limit:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                now = time.monotonic()
                self.busy_since = now  # gathering is progress
                if self.decoding() > 0 and now - start < MAX_FILL_WAIT:
                    wait = 0.005
                else:
                    if deadline is None:
                        deadline = now + (self._last_call if self._last_call else FILL_WAIT)
                    if now >= deadline or self.incoming(deadline - now) <= 0:
                        break
                    wait = min(deadline - now, 0.005)
                try:
                    item = self.inbox.get(timeout=wait)
                except queue.Empty:
                    continue
            if item is STOP:
                return batch, True
            if item is WAKE:
                if self.asks.qsize():  # an interactive request waits: run what is here
                    break
                continue
            batch.append(item)
        return batch, False

    def _process(self, batch: list[Work]) -> None:
        groups: dict[tuple, list[Work]] = {}
        for w in batch:
            groups.setdefault(w.tasks, []).append(w)
        for i, (tasks, works) in enumerate(groups.items()):
            if i:
                self._serve_asks()
            self._process_group(tasks, works)

    def _cache_key(self, sha256: str, tasks: tuple[Task, ...]) -> tuple:
        return (sha256, self.backend.name, self.backend.revision, tuple(t.key for t in tasks))

    def _known(self, sha256: str, tasks: tuple[Task, ...]) -> tuple[str, ...] | None:
        key = self._cache_key(sha256, tasks)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        row = self.index.by_hash(sha256)
        if (
            row is not None
            and row.model == self.backend.name
            and row.revision == self.backend.revision
            and all(t.key in row.outputs for t in tasks)
        ):
            outputs = tuple(row.outputs[t.key] for t in tasks)
            self._remember(key, outputs)
            return outputs
        return None

    def _remember(self, key: tuple, outputs: tuple[str, ...]) -> None:
        self._cache[key] = outputs
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _process_group(self, tasks: tuple[Task, ...], works: list[Work]) -> None:
        # Identical bytes run once: copies take the first one's outputs (or its failure).
        todo: dict[str, list[Work]] = {}
        for w in works:
            try:
                known = self._known(w.prepared.sha256, tasks)
            except Exception as e:  # the index is busy or unreadable: run the model instead
                log.warning("could not look up earlier captions", error=str(e))
                known = None
            if known is not None:
                self._emit(w, tasks, known, reused=True, ms=0.0)
            else:
                todo.setdefault(w.prepared.sha256, []).append(w)
        unique = [ws[0] for ws in todo.values()]
        for start in range(0, len(unique), self.batch_limit):
            if start:
                self._serve_asks()  # between the model calls of one batch too
            chunk = unique[start : start + self.batch_limit]
            for w, outputs, ms, size in self._run(tasks, chunk):
                copies = todo[w.prepared.sha256]
                if isinstance(outputs, Failed):
                    for copy in copies:
                        self._fail(copy, outputs.reason, transient=outputs.transient)
                    continue
                self._remember(self._cache_key(w.prepared.sha256, tasks), outputs)
                for i, copy in enumerate(copies):
                    self._emit(copy, tasks, outputs, reused=i > 0, ms=ms, batch=0 if i else size)

    def _run(self, tasks: tuple[Task, ...], chunk: list[Work]):
        """Yield (work, outputs or a Failed, ms per image, images in its model call) for
        every work in `chunk`."""
        t0 = time.perf_counter()
        try:
            self.model_calls += 1
            # Test-only seam (watcher.faults): a no-op unless WATCHER_FAULTS is set.
            if faults.active():
                faults.hit("model", [str(w.prepared.job.path) for w in chunk], len(chunk))
            results = self.backend.describe([w.prepared.image for w in chunk], tasks)
            if len(results) != len(chunk):
                raise RuntimeError(f"backend returned {len(results)} results for {len(chunk)}")
        except Exception as exc:  # the model call: anything can come out of it
            self.busy_seconds += time.perf_counter() - t0
            self.busy_since = time.monotonic()
            yield from self._recover(tasks, chunk, exc)
            return
        elapsed = time.perf_counter() - t0
        self.busy_seconds += elapsed
        self._last_call = elapsed
        self.images_run += len(chunk)
        self.batch_sizes[len(chunk)] += 1
        self.busy_since = time.monotonic()
        for w, outputs in zip(chunk, results, strict=True):
            yield w, tuple(outputs), elapsed * 1000 / len(chunk), len(chunk)

    def _recover(self, tasks, chunk, exc):
        if is_out_of_memory(exc):
            if len(chunk) > 1:
                half = max(1, len(chunk) // 2)
                if half < self.batch_limit:
                    log.warning("out of memory: batch size reduced", old=self.batch_limit, new=half)
                    self.batch_limit = half
                yield from self._run(tasks, chunk[:half])
                yield from self._run(tasks, chunk[half:])
                return
            log.error("out of memory on a single image", path=str(chunk[0].prepared.job.path))
            yield (
                chunk[0],
                Failed(chunk[0].prepared.job, "out of memory running the model", transient=True),
                0.0,
                1,
            )
            return
        if getattr(exc, "transient", False):
            # The model is there but cannot answer now (a model server down or busy after
            # its own retries): every image waits and is tried again later (retry_backoff,
            # max_attempts); one at a time now would only fail the same way.
            reason = _first_line(f"model error: {_described(exc)}")
            log.warning("model unavailable; images will be retried", error=reason, batch=len(chunk))
            for w in chunk:
                yield w, Failed(w.prepared.job, reason, transient=True), 0.0, 1
            return
        if len(chunk) > 1:
            log.warning(
                "model error on a batch; retrying one image at a time",
                error=_described(exc),
                batch=len(chunk),
            )
            for w in chunk:
                yield from self._run(tasks, [w])
            return
        log.error(
            "model failed on image",
            path=str(chunk[0].prepared.job.path),
            error=_described(exc),
            exc_info=exc,
        )
        yield (
            chunk[0],
            Failed(chunk[0].prepared.job, _first_line(f"model error: {_described(exc)}")),
            0.0,
            1,
        )

    def _fail(self, w: Work, reason: str, *, transient: bool) -> None:
        p = w.prepared
        self.outbox.put(Failed(p.job, reason, transient, identity=(p.size, p.mtime_ns)))

    def _emit(self, w: Work, tasks, outputs, *, reused: bool, ms: float, batch: int = 0) -> None:
        self.outbox.put(
            Captioned(
                w.prepared,
                tasks,
                tuple(outputs),
                self.backend.name,
                self.backend.revision,
                reused,
                ms,
                batch,
            )
        )


def _described(exc: BaseException) -> str:
    # A ModelError from the model process carries the type name of the original exception.
    return f"{getattr(exc, 'type_name', type(exc).__name__)}: {exc}"


def _first_line(text: str, limit: int = 300) -> str:
    """A reason for `watcher status`: one line, bounded (model errors can be pages long)."""
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[: limit - 3] + "..."
