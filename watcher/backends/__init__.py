"""Model backends: one small interface, several implementations, chosen by config."""

from __future__ import annotations

import sys
import threading
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from watcher.config import LogConfig, ModelConfig
    from watcher.tasks import Task


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded (weights missing offline, bad path, unsupported machine)."""


class Backend(Protocol):
    """What the model worker needs from a model.

    `describe` takes RGB images and the tasks to run on every one of them and returns, per
    image, one raw output string per task (in task order). Backends that can share work
    between tasks (Moondream's encode_image) do so inside `describe`.
    """

    # Read-only in the protocol: a plain attribute or a property (LazyBackend) both do.
    @property
    def name(self) -> str: ...  # model id or path, for provenance in the index

    @property
    def revision(self) -> str | None: ...

    @property
    def max_batch(self) -> int: ...  # the largest batch worth sending at once

    def describe(self, images: Sequence[Image.Image], tasks: Sequence[Task]) -> list[list[str]]: ...

    def close(self) -> None: ...


def stream_text(backend: Backend, image: Image.Image, task: Task) -> Generator[str, None, None]:
    """One image's raw text for one task, in chunks as the model generates it: through the
    backend's optional `stream(image, task)` (Moondream, transformers, the model process),
    else the whole text from `describe` as one chunk. Joined, the chunks are what
    `describe([image], [task])` gives (greedy decoding)."""
    stream = getattr(backend, "stream", None)
    if stream is not None:
        yield from stream(image, task)
        return
    yield backend.describe([image], [task])[0][0]


class Unsupported(RuntimeError):
    """The backend cannot do what was asked (detect/point on a captioning-only model)."""


# transformers' from_pretrained is not safe in two threads of one process at once: it loads
# onto the meta device by patching torch process-wide, and a model loaded meanwhile in another
# thread came out with meta tensors ("Cannot copy out of meta tensor"; `watcher caption`
# loading the vision model and the caption embedder together). Its lazy top-level names are
# not either: `from transformers import AutoModel` in two threads at once raised ImportError
# ("cannot import name 'AutoModel'": the daemon's search box beside its backfill). Every load
# in this package, with its import of transformers' classes, holds this lock.
LOADING = threading.RLock()

SKILLS = ("detect", "point")  # Moondream's: boxes around / points on a named object


def can_locate(backend: Backend) -> bool:
    """Whether `backend` answers `locate` (Moondream's detect/point)."""
    return bool(getattr(backend, "can_locate", False))


def device_of(backend: Backend) -> str | None:
    """The device the vision model computes on ("cpu", "cuda:0", "mps"), where it says;
    None for a model served elsewhere (backend openai) or one that does not say."""
    said = getattr(backend, "device", None)
    if said is None:
        placement = getattr(backend, "placement", None)
        said = getattr(placement, "device", placement)
    return None if said is None else str(said).split()[0] or None


def runs_on_cpu(backend: Backend) -> bool:
    """Whether the vision model computes on this machine's CPU, where any other CPU work
    (the caption embedder's above all) slows it down."""
    return (device_of(backend) or "").startswith("cpu")


def locate(backend: Backend, image: Image.Image, skill: str, target: str) -> list[dict]:
    """Moondream's detect (`{x_min, y_min, x_max, y_max}` per object) or point (`{x, y}`),
    coordinates as fractions of the image's size; Unsupported where the backend cannot."""
    fn = getattr(backend, "locate", None)
    if fn is None or not can_locate(backend):
        raise Unsupported(f"{skill} is not supported by this model ({backend.name})")
    return fn(image, skill, target)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` means the model ran out of memory (then a smaller batch may fit)."""
    if isinstance(exc, MemoryError) or getattr(exc, "out_of_memory", False):
        return True
    torch = sys.modules.get("torch")  # no torch imported: no torch error can have happened
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def open_backend(cfg: ModelConfig, log_cfg: LogConfig | None = None) -> Backend:
    """The backend the pipeline runs: in a child process when `model.isolate` (the default),
    else in this one. Raises ModelUnavailable with a user-facing message."""
    if not cfg.isolate:
        return load_backend(cfg)
    from watcher.backends.registry import get_backend

    if get_backend(cfg.backend).checks_weights:
        # Here too, before a child spends seconds importing torch only to find no weights.
        from watcher.backends.weights import ensure_available

        ensure_available(cfg)
    from watcher.backends.process import ModelProcess

    return ModelProcess.start(cfg, log_cfg)


def load_backend(cfg: ModelConfig) -> Backend:
    """Build the configured backend (the one registered as `model.backend`) in this process.
    Raises ModelUnavailable with a user-facing message."""
    from watcher.backends.registry import get_backend

    spec = get_backend(cfg.backend)
    if spec.checks_weights:
        # Fail in seconds, with one clear message, when the weights are not on this
        # machine and the Hub cannot be reached (instead of after the Hub client's retries).
        from watcher.backends.weights import ensure_available

        ensure_available(cfg)
    return spec.load(cfg)
