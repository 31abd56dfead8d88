"""Moondream2 through its Hugging Face remote code (caption / query / encode_image).

The model's own API is used, not `generate`: `caption(image, length=...)` for the
short/normal/long tasks, `query(image, question)` for the prompt and query tasks. Decoding
is always greedy (`temperature 0`) with the task's token cap, and `variant` is always
None: a non-None variant makes the model download LoRA weights from a remote API.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from watcher.backends import LOADING, ModelUnavailable
from watcher.backends.weights import (
    FIX,
    MOONDREAM_TOKENIZER,
    HubBackendSpec,
    cached_snapshot,
    cached_tokenizer_file,
    require_pinned_revision,
    snapshot_complete,
    snapshot_revision,
    uses_moondream_tokenizer,
)
from watcher.config import DEFAULT_MOONDREAM_REVISION

if TYPE_CHECKING:
    from PIL import Image

    from watcher.config import ModelConfig
    from watcher.tasks import Task

log = structlog.get_logger()

# The task kinds Moondream's own `caption` call serves (the others go through `query`).
CAPTION_LENGTHS = ("short", "normal", "long")


class MoondreamSpec(HubBackendSpec):
    """Moondream2 through its remote code: always remote code, so always a pinned revision
    (the config's default one) or a local copy."""

    name = "moondream"
    title = "Moondream"
    default_revision = DEFAULT_MOONDREAM_REVISION

    def load(self, cfg: ModelConfig) -> MoondreamBackend:
        return MoondreamBackend.load(cfg)

    def needs_remote_code(self, cfg: ModelConfig) -> bool:
        return True

    def tokenizers(self, cfg: ModelConfig, folder: Path | None) -> tuple[str, ...]:
        return (MOONDREAM_TOKENIZER,) if uses_moondream_tokenizer(folder, True) else ()


SPEC = MoondreamSpec()


def settings_for(task: Task, *, pin_variant: bool = True) -> dict[str, Any]:
    """Sampling settings for one Moondream call: greedy, capped by the task.

    `pin_variant`: add `variant: None`, for the Hugging Face remote code, where a non-None
    variant downloads LoRA weights from a remote API. Photon's settings have no such key."""
    settings: dict[str, Any] = {"temperature": 0, "max_tokens": task.max_tokens}
    if pin_variant:
        settings["variant"] = None
    return settings


def run_task(model: Any, image: Any, task: Task, settings: dict[str, Any], **query: Any) -> str:
    """One task on one (encoded) image through Moondream's API: `caption` for the caption
    lengths, `query` (with the backend's extra `query` arguments) for the rest."""
    if task.kind in CAPTION_LENGTHS:
        out = model.caption(image, length=task.kind, stream=False, settings=settings)
        return str(out["caption"]).strip()
    # "prompt" asks the Stable Diffusion instruction, "query" the user's question.
    out = model.query(image, task.instruction, settings=settings, **query)
    return str(out["answer"]).strip()


def stream_task(
    model: Any, image: Any, task: Task, settings: dict[str, Any], **query: Any
) -> Iterator[str]:
    """`run_task` with `stream=True`: Moondream's caption/query return a generator of text
    pieces under "caption"/"answer" (a plain string from an API that does not stream is one
    piece). Leading whitespace of the first piece is dropped, as run_task strips it."""
    if task.kind in CAPTION_LENGTHS:
        out = model.caption(image, length=task.kind, stream=True, settings=settings)["caption"]
    else:
        out = model.query(image, task.instruction, stream=True, settings=settings, **query)[
            "answer"
        ]
    pieces: Iterator[Any] = iter([out]) if isinstance(out, str) else iter(out)
    started = False
    for piece in pieces:
        text = str(piece)
        if not started:
            text = text.lstrip()
            started = bool(text)
        if text:
            yield text


@contextlib.contextmanager
def _cached_tokenizer() -> Iterator[None]:
    """While loading, serve Moondream's tokenizer from the cache without asking the Hub.

    Moondream2's code calls `Tokenizer.from_pretrained("moondream/starmie-v1")`, which
    checks the Hub first (with retries: ~20 s when the network is down) unless offline
    mode was set before huggingface_hub was imported. When the tokenizer is cached we hand
    out the cached file instead; other identifiers go to the original method.
    """
    path = cached_tokenizer_file()
    if path is None:
        yield
        return
    try:
        from tokenizers import Tokenizer
    except ImportError:
        yield
        return
    original = Tokenizer.__dict__["from_pretrained"]
    fallback = Tokenizer.from_pretrained

    def from_pretrained(identifier: str, *args: Any, **kwargs: Any) -> Any:
        if identifier == MOONDREAM_TOKENIZER:
            return Tokenizer.from_file(str(path))
        return fallback(identifier, *args, **kwargs)

    Tokenizer.from_pretrained = staticmethod(from_pretrained)
    try:
        yield
    finally:
        Tokenizer.from_pretrained = original


class MoondreamBackend:
    """Backend over a loaded Moondream2 (or API-compatible) remote-code model."""

    def __init__(self, model: Any, *, name: str, revision: str | None, placement: Any) -> None:
        self.model = model
        self.name = name
        self.revision = revision
        self.placement = placement
        # There is no batch API in the HF code: describe() loops over the images anyway,
        # and one image per call keeps a failure confined to its image.
        self.max_batch = 1

    @classmethod
    def load(cls, cfg: ModelConfig) -> MoondreamBackend:
        require_pinned_revision(cfg)
        kwargs: dict[str, Any] = {}
        if cfg.path:
            local = Path(cfg.path).expanduser()
            if not (local / "config.json").is_file():
                raise ModelUnavailable(
                    f"model.path: {local} is not a model folder (no config.json). "
                    f"Point it at a copy of {cfg.id}, or unset it; to get one: {FIX}."
                )
            source, name, revision = str(local), str(local), snapshot_revision(local)
            kwargs["local_files_only"] = True
        else:
            source, name, revision = cfg.id, cfg.id, cfg.revision
            kwargs["revision"] = cfg.revision
            snapshot = cached_snapshot(cfg.id, cfg.revision)
            if snapshot is not None and snapshot_complete(snapshot):
                # Everything is here: no Hub round trips at start-up.
                kwargs["local_files_only"] = True
        from watcher.backends.device import pick  # torch: only once a model loads

        placement = pick(cfg.device, cfg.dtype)
        log.info(
            "loading model",
            backend="moondream",
            model=name,
            revision=revision,
            device=placement.device,
        )
        started = time.monotonic()
        try:
            with LOADING, _cached_tokenizer():
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(
                    source,
                    trust_remote_code=True,  # only local or pinned: checked above
                    device_map={"": placement.device},
                    dtype=placement.dtype,
                    **kwargs,
                )
            model.eval()
        except ModelUnavailable:
            raise
        except Exception as e:
            at = f" at revision {revision}" if revision else ""
            raise ModelUnavailable(
                f"cannot load Moondream from {source}{at}: {type(e).__name__}: {e}"
            ) from e
        weights = next(iter(model.parameters()), None)
        log.info(
            "model ready",
            backend="moondream",
            model=name,
            revision=revision,
            placement=placement.describe(),
            # Moondream2's code builds its layers in bfloat16 whatever dtype is asked for.
            weights_dtype=str(weights.dtype).removeprefix("torch.")
            if weights is not None
            else None,
            seconds=round(time.monotonic() - started, 1),
        )
        return cls(model, name=name, revision=revision, placement=placement)

    def _run(self, encoded: Any, task: Task) -> str:
        return run_task(self.model, encoded, task, settings_for(task), reasoning=False)

    def describe(self, images: Sequence[Image.Image], tasks: Sequence[Task]) -> list[list[str]]:
        """Per image, one output per task. The image is encoded once and reused."""
        import torch

        results: list[list[str]] = []
        with torch.inference_mode():
            for image in images:
                encoded = self.model.encode_image(image)
                results.append([self._run(encoded, task) for task in tasks])
        return results

    def stream(self, image: Image.Image, task: Task) -> Iterator[str]:
        """One image's text for one task, piece by piece as Moondream generates it."""
        import torch

        with torch.inference_mode():  # held while the generator runs the model
            encoded = self.model.encode_image(image)
            yield from stream_task(self.model, encoded, task, settings_for(task), reasoning=False)

    @property
    def can_locate(self) -> bool:
        return all(hasattr(self.model, m) for m in ("detect", "point"))

    def locate(self, image: Image.Image, skill: str, target: str) -> list[dict]:
        """Moondream's detect/point on one image (greedy; `variant` pinned to None)."""
        import torch

        settings: dict[str, Any] = {"variant": None, "max_objects": 50}
        with torch.inference_mode():
            encoded = self.model.encode_image(image)
            if skill == "detect":
                found = self.model.detect(encoded, target, settings=settings)["objects"]
            else:
                found = self.model.point(encoded, target, settings=settings)["points"]
        return [{k: float(v) for k, v in dict(item).items()} for item in found]

    def close(self) -> None:
        model, self.model = self.model, None
        if model is None:
            return
        del model
        from watcher.backends.device import free_memory

        free_memory(self.placement.device)
