"""Model backends: one small interface, several implementations, chosen by config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from watcher.config import ModelConfig
    from watcher.tasks import Task


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded (weights missing offline, bad path, unsupported machine)."""


class Backend(Protocol):
    """What the model worker needs from a model.

    `describe` takes RGB images and the tasks to run on every one of them and returns, per
    image, one raw output string per task (in task order). Backends that can share work
    between tasks (Moondream's encode_image) do so inside `describe`.
    """

    name: str  # model id or path, for provenance in the index
    revision: str | None
    max_batch: int  # the largest batch worth sending at once

    def describe(
        self, images: Sequence[Image.Image], tasks: Sequence[Task]
    ) -> list[list[str]]: ...

    def close(self) -> None: ...


def load_backend(cfg: ModelConfig) -> Backend:
    """Build the configured backend. Raises ModelUnavailable with a user-facing message."""
    if cfg.backend in ("moondream", "transformers"):
        # Fail in seconds, with one clear message, when the weights are not on this
        # machine and the Hub cannot be reached (instead of after the Hub client's retries).
        from watcher.models import ensure_available

        ensure_available(cfg)
    if cfg.backend == "transformers":
        from watcher.backends.transformers_backend import TransformersBackend

        return TransformersBackend.load(cfg)
    if cfg.backend == "moondream":
        from watcher.backends.moondream import MoondreamBackend

        return MoondreamBackend.load(cfg)
    if cfg.backend == "photon":
        from watcher.backends.photon import PhotonBackend

        return PhotonBackend.load(cfg)
    raise ModelUnavailable(f"unknown backend {cfg.backend!r}")
