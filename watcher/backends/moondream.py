"""Moondream2 through its Hugging Face remote code (caption / query / encode_image).

The model's own API is used, not `generate`: `caption(image, length=...)` for the
short/normal/long tasks, `query(image, question)` for the prompt and query tasks. Decoding
is always greedy (`temperature 0`) with the task's token cap, and `variant` is always
None: a non-None variant makes the model download LoRA weights from a remote API.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from watcher.backends import ModelUnavailable
from watcher.backends.device import pick
from watcher.backends.weights import (
    FIX,
    MOONDREAM_TOKENIZER,
    cached_snapshot,
    cached_tokenizer_file,
    require_pinned_revision,
    snapshot_complete,
)

if TYPE_CHECKING:
    from PIL import Image

    from watcher.config import ModelConfig
    from watcher.tasks import Task

log = structlog.get_logger()

CAPTION_LENGTHS = ("short", "normal", "long")
_SHA = re.compile(r"^[0-9a-f]{40}$")


def settings_for(task: Task) -> dict[str, Any]:
    """Sampling settings for one call: greedy, capped, never a remote LoRA variant."""
    return {"temperature": 0, "max_tokens": task.max_tokens, "variant": None}


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


def _local_revision(path: Path) -> str | None:
    """The commit of a local copy that is a Hugging Face cache snapshot, else None."""
    resolved = path.resolve()
    if resolved.parent.name == "snapshots" and _SHA.match(resolved.name):
        return resolved.name
    return None


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
            source, name, revision = str(local), str(local), _local_revision(local)
            kwargs["local_files_only"] = True
        else:
            source, name, revision = cfg.id, cfg.id, cfg.revision
            kwargs["revision"] = cfg.revision
            snapshot = cached_snapshot(cfg.id, cfg.revision)
            if snapshot is not None and snapshot_complete(snapshot):
                # Everything is here: no Hub round trips at start-up.
                kwargs["local_files_only"] = True
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
            from transformers import AutoModelForCausalLM

            with _cached_tokenizer():
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
        settings = settings_for(task)
        if task.kind in CAPTION_LENGTHS:
            out = self.model.caption(encoded, length=task.kind, stream=False, settings=settings)
            return str(out["caption"]).strip()
        # "prompt" asks the Stable Diffusion instruction, "query" the user's question.
        out = self.model.query(encoded, task.instruction, reasoning=False, settings=settings)
        return str(out["answer"]).strip()

    def describe(self, images: Sequence[Image.Image], tasks: Sequence[Task]) -> list[list[str]]:
        """Per image, one output per task. The image is encoded once and reused."""
        import torch

        results: list[list[str]] = []
        with torch.inference_mode():
            for image in images:
                encoded = self.model.encode_image(image)
                results.append([self._run(encoded, task) for task in tasks])
        return results

    def close(self) -> None:
        model, self.model = self.model, None
        if model is None:
            return
        del model
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - best effort
            pass
