"""Moondream through Photon (the `moondream` package's local engine, Kestrel).

Photon micro-batches requests that are in flight at the same time, so `describe` keeps up
to `max_batch` caption/query calls running at once from a thread pool; the client's
blocking calls are thread-safe (each one is a coroutine on Photon's own event loop).

Photon runs on NVIDIA GPUs (CUDA) and Apple Silicon (MPS) only; `load` refuses other
machines with a message that says so. Install it with `pip install
'moondream-watcher[photon]'`.

The engine is injectable: `PhotonBackend(engine, cfg)` takes any object with the Photon
client's call signatures (`encode_image(image)`, `caption(image, length=..., stream=False,
settings=None)`, `query(image, question, stream=False, settings=None, ...)`, `close()`),
which is how the tests drive it without a GPU.

Errors: `describe` waits for every request of the batch to finish (none is left running),
then, if any failed, raises `PhotonBatchError` for the first failed image (in image order)
with the original exception as its cause and all failures in `.errors`. The caller is
expected to retry the images one by one, so each failure lands on its own image.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from watcher.backends import ModelUnavailable
from watcher.backends.moondream import run_task, settings_for, stream_task
from watcher.backends.registry import BackendSpec
from watcher.backends.weights import MOONDREAM_TOKENIZER, uses_moondream_tokenizer

if TYPE_CHECKING:
    from PIL import Image

    from watcher.config import ModelConfig
    from watcher.tasks import Task

log = structlog.get_logger()

# Hugging Face ids of the models Photon knows, and Photon's names for them.
PHOTON_NAMES = {
    "vikhyatk/moondream2": "moondream2",
    "moondream/moondream3-preview": "moondream3-preview",
}
INSTALL_HINT = "install it with: pip install 'moondream-watcher[photon]'"


class PhotonBatchError(RuntimeError):
    """Some images of a batch failed; `.index` is the first, `.errors` maps index -> error."""

    def __init__(self, errors: dict[int, BaseException], total: int) -> None:
        self.errors = dict(sorted(errors.items()))
        self.index, first = next(iter(self.errors.items()))
        super().__init__(
            f"photon: {len(self.errors)} of {total} images failed; image {self.index}: "
            f"{type(first).__name__}: {first}"
        )


class PhotonSpec(BackendSpec):
    """Photon fetches and checks its own weights (none are checked before start) and
    runs only on a GPU machine, so `watcher model fetch` does not test-load it."""

    name = "photon"
    not_test_loaded = "Photon loads on its GPU machine"

    def load(self, cfg: ModelConfig) -> PhotonBackend:
        return PhotonBackend.load(cfg)

    def tokenizers(self, cfg: ModelConfig, folder: Path | None) -> tuple[str, ...]:
        # Moondream's weights, so Moondream's tokenizer when its code asks for it.
        return (MOONDREAM_TOKENIZER,) if uses_moondream_tokenizer(folder, False) else ()


SPEC = PhotonSpec()


def photon_device(cfg: ModelConfig) -> str:
    """The device Photon should use, or ModelUnavailable on a machine it does not support."""
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    want = cfg.device
    if want == "auto":
        if cuda:
            return "cuda"
        if mps:
            return "mps"
    elif want.startswith("cuda") and cuda:
        return want
    elif want == "mps" and mps:
        return want
    found = "CUDA" if cuda else ("Apple Silicon (MPS)" if mps else "neither")
    raise ModelUnavailable(
        f"backend photon runs only on an NVIDIA GPU (CUDA) or Apple Silicon (MPS); "
        f"model.device is {want!r} and this machine has {found}. "
        "Use model.backend: moondream instead (it also runs on the CPU)."
    )


def _photon_model_path(cfg: ModelConfig) -> tuple[str | None, str | None]:
    """(model_path, revision) to give Photon: a local copy or the pinned cached revision.

    Without one, Photon downloads its own default revision of the weights.
    """
    if cfg.path:
        p = Path(cfg.path).expanduser()
        weights = p / "model.safetensors" if p.is_dir() else p
        if not weights.is_file():
            raise ModelUnavailable(
                f"model.path: {weights} not found (Photon needs the model.safetensors of Moondream)"
            )
        return str(weights), None
    if cfg.revision:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(cfg.id, "model.safetensors", revision=cfg.revision)
        if isinstance(hit, str):
            return hit, cfg.revision
    return None, None


def _error(f: Future) -> BaseException | None:
    """Wait for `f`; its exception, or None.

    Not concurrent.futures.wait: futures cancelled by shutdown(cancel_futures=True) never
    wake its waiters, while Future.exception() does return for them.
    """
    try:
        return f.exception()
    except CancelledError:
        return RuntimeError("request cancelled: the photon backend was closed")


def _cancelled() -> Future:
    f: Future = Future()
    f.cancel()
    return f


class PhotonBackend:
    """Backend over a Photon client (or a stand-in with the same call signatures)."""

    def __init__(
        self, engine: Any, cfg: ModelConfig, *, name: str | None = None, revision: str | None = None
    ) -> None:
        self.engine = engine
        self.name = name or cfg.path or cfg.id
        self.revision = revision
        self.max_batch = max(1, cfg.batch_size)
        self._pool = ThreadPoolExecutor(max_workers=self.max_batch, thread_name_prefix="photon")
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def load(cls, cfg: ModelConfig, *, factory: Callable[..., Any] | None = None) -> PhotonBackend:
        """Start Photon for `cfg`. `factory(model, **runtime_config)` defaults to md.photon."""
        if factory is None:
            try:
                import moondream as md
            except ImportError as e:
                raise ModelUnavailable(
                    f"backend photon needs the moondream package ({e}); {INSTALL_HINT}"
                ) from None
            factory = getattr(md, "photon", None)
            if factory is None:
                raise ModelUnavailable(
                    "the installed moondream package has no Photon (md.photon); upgrade: "
                    "pip install -U 'moondream-watcher[photon]'"
                )
        device = photon_device(cfg)
        model = PHOTON_NAMES.get(cfg.id, cfg.id)
        model_path, revision = _photon_model_path(cfg)
        runtime: dict[str, Any] = {"device": device, "max_batch_size": max(1, cfg.batch_size)}
        if model_path:
            runtime["model_path"] = model_path
        log.info(
            "loading model",
            backend="photon",
            model=model,
            device=device,
            revision=revision,
            model_path=model_path,
        )
        try:
            engine = factory(model, **runtime)
        except ModelUnavailable:
            raise
        except Exception as e:
            raise ModelUnavailable(
                f"Photon could not start {model} on {device}: {type(e).__name__}: {e}"
            ) from e
        log.info(
            "model ready",
            backend="photon",
            model=model,
            device=device,
            max_batch=max(1, cfg.batch_size),
        )
        return cls(engine, cfg, name=cfg.path or cfg.id, revision=revision)

    def _run(self, image: Any, task: Task) -> str:
        return run_task(
            self.engine, image, task, settings_for(task, pin_variant=False), stream=False
        )

    def stream(self, image: Image.Image, task: Task) -> Iterator[str]:
        """One image's text for one task, as Photon streams it (in the caller's thread)."""
        if self._closed:
            raise RuntimeError("photon backend is closed")
        yield from stream_task(self.engine, image, task, settings_for(task, pin_variant=False))

    def _submit_all(
        self, calls: list[tuple[Callable[..., Any], tuple]], *, started: bool
    ) -> list[Future]:
        """Submit a whole round of requests at once, under the lock that close() takes: a
        close() either comes before the round (nothing of it runs) or after it has been
        queued (its queued requests are cancelled, its running ones finish). A describe()
        already under way when close() came reports the cancelled requests as image
        errors (PhotonBatchError); a describe() that starts after close() is refused."""
        with self._lock:
            if self._closed:
                if not started:
                    raise RuntimeError("photon backend is closed")
                return [_cancelled() for _ in calls]
            return [self._pool.submit(fn, *args) for fn, args in calls]

    def describe(self, images: Sequence[Image.Image], tasks: Sequence[Task]) -> list[list[str]]:
        """Per image, one output per task; all requests of the batch run concurrently."""
        errors: dict[int, BaseException] = {}
        encoder = getattr(self.engine, "encode_image", None)
        started = False
        # Encode each image once (Photon: one JPEG encode instead of one per task).
        if encoder is not None and len(tasks) > 1:
            enc_futures = self._submit_all([(encoder, (image,)) for image in images], started=False)
            started = True
            encoded: list[Any] = []
            for i, (image, f) in enumerate(zip(images, enc_futures, strict=True)):
                exc = _error(f)
                if exc is not None:
                    errors[i] = exc
                encoded.append(image if exc is not None else f.result())
        else:
            encoded = list(images)
        keys = [(i, j) for i in range(len(encoded)) if i not in errors for j in range(len(tasks))]
        submitted = self._submit_all(
            [(self._run, (encoded[i], tasks[j])) for i, j in keys], started=started
        )
        futures: dict[tuple[int, int], Future] = dict(zip(keys, submitted, strict=True))
        results: list[list[str]] = [["" for _ in tasks] for _ in images]
        for (i, j), f in futures.items():
            exc = _error(f)
            if exc is not None:
                errors.setdefault(i, exc)
            else:
                results[i][j] = f.result()
        if errors:
            err = PhotonBatchError(errors, len(images))
            raise err from err.errors[err.index]
        return results

    def close(self) -> None:
        """Cancel queued requests, wait for running ones, then stop the engine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
        log.info("model closed", backend="photon", model=self.name)
