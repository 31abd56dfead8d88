"""Runs the backend in a child process of its own, behind the same Backend interface.

Why: the model's Python (generate()'s token loop, kernel launches) and the pipeline's Python
(decoding, sidecars, SQLite, file events, logging) would otherwise take turns on one
interpreter lock; the benchmark measured every model call 10-35% slower for it. A child also
turns a crash in model code (a segfault in a kernel, the OOM killer) into one failed batch
and a reload instead of a dead daemon.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from watcher.backends import ModelUnavailable, is_out_of_memory
from watcher.isolated import python_command, safe_sys_path

if TYPE_CHECKING:
    from PIL import Image

    from watcher.backends import Backend
    from watcher.config import LogConfig, ModelConfig
    from watcher.tasks import Task

log = structlog.get_logger("watcher.backends.process")

CLOSE_TIMEOUT = 10.0  # seconds a closing child gets before it is killed

# glibc malloc settings for the child (environment variables it reads at start-up; other C
# libraries ignore them; a value already in the environment wins). By default glibc returns
# freed memory to the system as soon as a free leaves enough of it at the top of the heap,
# and serves every block over its (adaptive) mmap threshold with a fresh mmap: a CPU model's
# activations and KV cache, freed and allocated again at every generated token, then come
# back as new zeroed pages each time. Measured on the benchmark's `small` model: about
# 90,000 page faults and 0.3 s of kernel time per batch of 32 (5% of the model's CPU time),
# against under 1,000 faults and 0.01 s with these. The cost: between batches the child
# keeps the memory its largest batch used (up to 1 GiB freed memory), which it would need
# again for the next batch anyway.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # blocks this big or smaller: from the heap
    "MALLOC_TRIM_THRESHOLD_": str(2**30),  # give memory back only past 1 GiB free at the top
    "MALLOC_TOP_PAD_": str(64 * 2**20),  # grow the heap in steps of 64 MiB, not page by page
}


class ModelError(RuntimeError):
    """An exception raised by the backend in the child, carried back as its type and text.

    (The exception object itself may not unpickle here: remote-code models define their own
    classes in modules only the child has imported.)"""

    def __init__(
        self,
        type_name: str,
        message: str,
        *,
        out_of_memory: bool = False,
        remote_traceback: str = "",
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.out_of_memory = out_of_memory
        self.transient = transient  # may pass by itself (a model server down): retry later
        if remote_traceback:
            note = "in the model process:\n" + remote_traceback.rstrip()
            if sys.version_info >= (3, 11):
                self.add_note(note)
            else:  # 3.10 has no add_note; keep the note where 3.11's traceback looks for it
                self.__notes__ = [note]


class ModelCrashed(RuntimeError):
    """The child died (or could not be restarted) while the parent waited for a batch."""


class SharedPixels:
    """A memory file both processes map: the parent copies a batch's pixels in, the child
    reads them out. Pickling PIL images through the socket instead cost 20-45 ms per batch
    of 32 320x240 images (several copies in each process), 6-12% of the tiny model's time.

    A memfd on Linux (RAM, gone when both processes close it), an unlinked temp file
    elsewhere. It grows to the largest batch seen; untouched pages cost nothing."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            if hasattr(os, "memfd_create"):
                fd = os.memfd_create("watcher-pixels")
            else:  # pragma: no cover - macOS
                import tempfile

                f = tempfile.TemporaryFile()  # noqa: SIM115 - the fd outlives the object
                fd = os.dup(f.fileno())
                f.close()
        self.fd = fd
        self.size = 0
        self.map: mmap.mmap | None = None

    def ensure(self, size: int) -> None:
        """Map at least `size` bytes (the parent grows the file first)."""
        if size <= self.size:
            return
        if self.map is not None:
            self.map.close()
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.size = size

    def put(self, images: Sequence[Image.Image]) -> list[tuple[str, tuple[int, int], int, int]]:
        """Copy `images` in; what the child needs to read them back."""
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        lengths = [im.width * im.height * 3 for im in rgb]
        total = sum(lengths)
        if total > self.size:
            self.ensure(max(total, 2 * self.size, 1 << 20))
        assert self.map is not None or total == 0
        layout, offset = [], 0
        for im, n in zip(rgb, lengths, strict=True):
            self.map[offset : offset + n] = im.tobytes()  # type: ignore[index]
            layout.append(("RGB", im.size, offset, n))
            offset += n
        return layout

    def get(
        self, layout: Sequence[tuple[str, tuple[int, int], int, int]], size: int
    ) -> list[Image.Image]:
        from PIL import Image

        self.ensure(size)
        if self.map is None:
            return []
        with memoryview(self.map) as view:  # released before any remap
            return [Image.frombytes(mode, dims, view[o : o + n]) for mode, dims, o, n in layout]

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        os.close(self.fd)


class ModelProcess:
    """A Backend whose model lives in a child Python process.

    `describe` copies the pixels into memory both processes map, sends the layout over a
    socket pair and waits for the outputs; the waiting thread holds no lock the pipeline
    needs. If the child dies mid-batch, that call raises ModelCrashed and the next call
    starts a new child (the worker then retries the batch one image at a time, so only an
    image that crashes the model fails).
    """

    def __init__(self, cfg: ModelConfig, log_cfg: LogConfig | None = None) -> None:
        self.cfg = cfg
        self.log_cfg = log_cfg
        self.name = cfg.source
        self.revision = cfg.revision
        self.max_batch = cfg.batch_size
        self.pid: int | None = None
        self.can_locate = False  # the child's backend does detect/point (said when ready)
        self.device: str | None = None  # where the child's model computes (said when ready)
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._pixels = SharedPixels()
        self._lock = threading.Lock()  # one request on the socket at a time

    @classmethod
    def start(cls, cfg: ModelConfig, log_cfg: LogConfig | None = None) -> ModelProcess:
        """Start the child and wait until its model is loaded; ModelUnavailable if it is not."""
        self = cls(cfg, log_cfg)
        self._spawn()
        return self

    # -- Backend ------------------------------------------------------------------------
    def describe(self, images: Sequence[Image.Image], tasks: Sequence[Task]) -> list[list[str]]:
        return self._request("describe", images, tuple(tasks), f"running a batch of {len(images)}")

    def locate(self, image: Image.Image, skill: str, target: str) -> list[dict]:
        """detect/point in the child (watcher.backends.locate there)."""
        return self._request("locate", [image], (skill, target), f"running {skill}")

    def stream(self, image: Image.Image, task: Task) -> Iterator[str]:
        """One image's text for one task, piece by piece as the child's backend generates
        it (`stream_text` there). A reader that stops early cancels the generation: the
        child stops at its next piece and the rest of the reply is read and dropped, so the
        socket stays in step for the next request."""
        doing = "streaming one image"
        with self._lock:
            conn = self._send("stream", [image], task, doing)
            finished = False
            try:
                while True:
                    reply = self._recv(conn, doing)
                    if reply[0] != "chunk":
                        finished = True
                        _result(reply)  # raises the child's error, if that is what came
                        return
                    yield reply[1]
            except ModelCrashed:
                finished = True
                raise
            finally:
                if not finished:
                    self._cancel_stream(conn)

    def _request(
        self, kind: str, images: Sequence[Image.Image], payload: object, doing: str
    ) -> Any:
        """Send one request and wait for its one reply, under the lock: the reply's value,
        or the child's error raised here (ModelError), or ModelCrashed if the child died
        meanwhile (`doing` says what it was doing, for that message)."""
        with self._lock:
            conn = self._send(kind, images, payload, doing)
            reply = self._recv(conn, doing)
        return _result(reply)

    def _send(
        self, kind: str, images: Sequence[Image.Image], payload: object, doing: str
    ) -> Connection:
        """Copy `images` into the shared pixels and send the request; under self._lock."""
        conn = self._connected()
        layout = self._pixels.put(images)  # MemoryError/OSError here: the worker decides
        try:
            conn.send((kind, layout, self._pixels.size, payload))
        except OSError as e:  # a closed socket: the child is gone
            raise self._crashed(doing) from e
        return conn

    def _recv(self, conn: Connection, doing: str) -> tuple:
        try:
            return conn.recv()
        except (EOFError, OSError) as e:
            raise self._crashed(doing) from e

    def _crashed(self, doing: str) -> ModelCrashed:
        return ModelCrashed(f"the model process died ({self._reap()}) {doing}")

    def _cancel_stream(self, conn: Connection) -> None:
        try:
            conn.send(("cancel",))
            while conn.recv()[0] == "chunk":
                pass
        except (EOFError, OSError):
            self._reap()

    def _connected(self) -> Connection:
        """The socket to a running child (started again if it died); under self._lock."""
        if self._conn is None:
            self.restarts += 1
            log.warning("restarting the model process", restarts=self.restarts)
            try:
                self._spawn()
            except ModelUnavailable as e:
                raise ModelCrashed(f"the model process could not be restarted: {e}") from e
        assert self._conn is not None
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send(("close",))
                except OSError:
                    pass
                self._reap(CLOSE_TIMEOUT)
            if self._pixels.fd >= 0:
                self._pixels.close()
                self._pixels.fd = -1

    # -- child management ---------------------------------------------------------------
    def _spawn(self) -> None:
        ours, theirs = Pipe(duplex=True)
        # Isolated (-I): a `structlog.py` or `torch.py` in the working directory (a watched
        # folder, for `watcher caption .`) must not be imported in place of the real one.
        # The child gets our own sys.path less the working directory, and this package's
        # root first, so it imports this same package, wherever it was imported from here.
        package_root = str(Path(__file__).resolve().parents[2])
        path = [package_root, *(p for p in safe_sys_path() if p != package_root)]
        try:
            proc = subprocess.Popen(
                python_command(
                    "watcher.backends.process",
                    [str(theirs.fileno()), str(self._pixels.fd)],
                    path=path,
                ),
                pass_fds=(theirs.fileno(), self._pixels.fd),
                env={**MALLOC_ENV, **os.environ},
                stdin=subprocess.DEVNULL,
                stdout=sys.__stderr__.fileno() if sys.__stderr__ else subprocess.DEVNULL,
            )
        except OSError as e:
            ours.close()
            raise ModelUnavailable(f"cannot start the model process: {e}") from e
        finally:
            theirs.close()
        self._proc, self._conn = proc, ours
        try:
            ours.send((self.cfg, self.log_cfg))
            reply = ours.recv()
        except (EOFError, OSError):
            why = self._reap()
            raise ModelUnavailable(
                f"the model process exited ({why}) before the model "
                "was loaded; its log lines above say why"
            ) from None
        if reply[0] == "unavailable":
            self._reap(CLOSE_TIMEOUT)
            raise ModelUnavailable(reply[1])
        _, self.name, self.revision, self.max_batch, self.can_locate, self.device = reply
        self.pid = proc.pid

    def _reap(self, timeout: float = 5.0) -> str:
        """Close our end, wait for the child (killed after `timeout`); how it ended, in words."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is None:
            return "not running"
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"


def _result(reply: tuple) -> Any:
    """An "ok" reply's value; any other reply is the child's error, raised here."""
    if reply[0] == "ok":
        return reply[1]
    raise _model_error(reply)


def _model_error(reply: tuple) -> ModelError:
    _, type_name, message, oom, tb, transient = reply
    return ModelError(
        type_name, message, out_of_memory=oom, remote_traceback=tb, transient=transient
    )


# -- the child ------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies, even mid-model-call."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere: the closed socket ends the child after its current call
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(conn: Connection, pixels: SharedPixels) -> int:
    """The child's loop: load the model, then answer describe requests until closed."""
    from watcher.backends import load_backend
    from watcher.log import configure_logging

    # Ctrl-C and `systemctl stop` signal the whole group; the parent decides when we stop
    # (after the batch in hand), by closing the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    try:
        cfg, log_cfg = conn.recv()
    except EOFError:
        return 0
    configure_logging(log_cfg)
    try:
        backend = load_backend(cfg)
    except ModelUnavailable as e:
        conn.send(("unavailable", str(e)))
        return 2
    except Exception as e:
        log.error("the model could not be loaded", exc_info=e)
        conn.send(("unavailable", f"the model could not be loaded: {type(e).__name__}: {e}"))
        return 2
    from watcher.backends import can_locate, device_of, locate

    conn.send(
        (
            "ready",
            backend.name,
            backend.revision,
            backend.max_batch,
            can_locate(backend),
            device_of(backend),
        )
    )
    try:
        while True:
            try:
                request = conn.recv()
            except EOFError:
                break
            if request[0] == "close":
                break
            if request[0] == "cancel":  # came after its stream had already finished
                continue
            kind, layout, size, tasks = request
            try:
                if kind == "stream":
                    _stream(conn, backend, pixels.get(layout, size)[0], tasks)
                    conn.send(("ok", None))
                    continue
                if kind == "locate":
                    skill, target = tasks
                    conn.send(("ok", locate(backend, pixels.get(layout, size)[0], skill, target)))
                    continue
                outputs = backend.describe(pixels.get(layout, size), tasks)
            except Exception as e:  # the parent decides: split, retry one by one, or fail
                conn.send(
                    (
                        "error",
                        type(e).__name__,
                        str(e),
                        is_out_of_memory(e),
                        traceback.format_exc(limit=20),
                        bool(getattr(e, "transient", False)),
                    )
                )
                continue
            conn.send(("ok", [list(o) for o in outputs]))
    finally:
        backend.close()
    return 0


def _stream(conn: Connection, backend: Backend, image: Image.Image, task: Task) -> None:
    """Send the pieces of one image's text as they come; stop early on the parent's cancel."""
    from watcher.backends import stream_text

    pieces = stream_text(backend, image, task)
    try:
        for piece in pieces:
            conn.send(("chunk", piece))
            if conn.poll() and conn.recv()[0] == "cancel":
                break
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # runs the backend's own clean-up (joins its generate thread)


if __name__ == "__main__":
    sys.exit(serve(Connection(int(sys.argv[1])), SharedPixels(int(sys.argv[2]))))
