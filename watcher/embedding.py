"""The caption-embedding model: found offline, loaded once, encodes text in batches."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    import numpy as np

    from watcher.config import Config, SearchConfig

log = structlog.get_logger("watcher.embedding")

# all-MiniLM-L6-v2 truncates at 256 word pieces (sentence-transformers' max_seq_length);
# captions are far shorter, a pasted essay in a sidecar is cut there.
MAX_TOKENS = 256


class EmbeddingUnavailable(RuntimeError):
    """The embedding model cannot be used (turned off, not downloaded, does not load)."""


@dataclass(frozen=True)
class VectorBatch:
    """Unit-length vectors for some texts, in order, and the model tag that made them."""

    model: str
    vectors: np.ndarray  # float32, (n, dim), L2-normalised
    texts: tuple[str, ...] = ()  # what was embedded, row for row

    def by_text(self) -> dict[str, np.ndarray]:
        return dict(zip(self.texts, self.vectors, strict=True))


def model_folder(cfg: SearchConfig) -> Path:
    """Where the configured embedding model's files are: a local folder, or the cached
    snapshot at the pinned revision. Never downloads (EmbeddingUnavailable says how)."""
    name = cfg.embedding_model
    if name is None:
        raise EmbeddingUnavailable("semantic search is off (search.embedding_model: null)")
    local = Path(name).expanduser()
    if local.is_absolute() or name.startswith((".", "~")):
        if (local / "config.json").is_file():
            return local
        raise EmbeddingUnavailable(
            f"search.embedding_model: {local} is not a model folder (no config.json)"
        )
    from watcher.backends.weights import cached_snapshot, snapshot_complete

    folder = cached_snapshot(name, cfg.embedding_revision)
    if folder is None or not snapshot_complete(folder):
        raise EmbeddingUnavailable(
            f"the embedding model {name} at revision {cfg.embedding_revision or 'main'} is not "
            "in the Hugging Face cache; run `watcher model fetch` (it fetches it with the "
            "vision model), or set search.embedding_model to a local copy"
        )
    return folder


def model_tag(cfg: SearchConfig) -> str:
    """What the index records for the vectors a config's model makes: a change of model or
    revision changes it, and every caption is embedded again."""
    from watcher.backends.weights import snapshot_revision

    name = cfg.embedding_model or ""
    local = Path(name).expanduser()
    if local.is_absolute() or name.startswith((".", "~")):
        resolved = local.resolve()
        return f"{resolved}@{snapshot_revision(resolved) or 'local'}"
    return f"{name}@{cfg.embedding_revision or 'main'}"


class Embedder:
    """A sentence-embedding model (BERT family: all-MiniLM-L6-v2 by default) on the CPU:
    mean pooling over the tokens, then L2 normalisation, which is what sentence-transformers
    does for this model. One instance serves several threads (a lock around each batch)."""

    def __init__(
        self, folder: Path, tag: str, batch_size: int = 32, threads: int | None = None
    ) -> None:
        import torch

        if threads:
            # Only where nothing else in the process runs torch (see caption_embedder): on
            # a busy 2-core machine one thread encoded a query in 65 ms, two in 317 ms.
            torch.set_num_threads(threads)

        self.tag = tag
        self.batch_size = batch_size
        self._torch = torch
        from watcher.backends import LOADING

        try:
            with LOADING:  # never beside another model's load (or import) in this process
                from transformers import AutoModel, AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            raise EmbeddingUnavailable(
                f"the embedding model at {folder} does not load: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            ) from None
        self.model.eval()
        self.dim = int(self.model.config.hidden_size)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, cfg: SearchConfig, *, alone: bool = True) -> Embedder:
        """The configured model, offline; EmbeddingUnavailable (a message) otherwise.
        `alone`: no other model runs torch in this process, so search.threads applies."""
        return cls(
            model_folder(cfg), model_tag(cfg), cfg.batch_size, cfg.threads if alone else None
        )

    def encode(self, texts: Sequence[str]) -> VectorBatch:
        import numpy as np

        torch = self._torch
        out = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                chunk = [t or " " for t in texts[start : start + self.batch_size]]
                enc = self.tokenizer(
                    chunk,
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out.append(pooled.float().numpy())
        vectors = np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
        return VectorBatch(self.tag, vectors.astype(np.float32, copy=False), tuple(texts))


class LazyEmbedder:
    """The model loaded at its first use, once, shared by the writer and the backfill; a
    model that cannot load is reported once, and then every call returns None (the
    captions still go in; search stays text-only for them until the model is there)."""

    def __init__(self, cfg: SearchConfig, alone: bool = True) -> None:
        self.cfg = cfg
        self.alone = alone
        self._lock = threading.Lock()
        self._embedder: Embedder | None = None
        self.error: str | None = None

    def get(self) -> Embedder | None:
        with self._lock:
            if self._embedder is None and self.error is None:
                try:
                    self._embedder = Embedder.load(self.cfg, alone=self.alone)
                    log.info("embedding model loaded", model=self._embedder.tag)
                except EmbeddingUnavailable as e:
                    self.error = str(e)
                    log.warning("semantic search unavailable; captions not embedded", reason=e)
            return self._embedder

    def __call__(self, texts: Sequence[str]) -> VectorBatch | None:
        """Vectors for `texts`, or None (never raises: a caption is never lost to this)."""
        embedder = self.get()
        if embedder is None or not texts:
            return None
        try:
            return embedder.encode(texts)
        except Exception as e:  # a bug or OOM here must not fail the captions
            log.error("embedding failed; the backfill will try again", error=str(e))
            return None


_SHARED: dict[SearchConfig, LazyEmbedder] = {}
_SHARED_LOCK = threading.Lock()


def caption_embedder(cfg: Config) -> LazyEmbedder | None:
    """The process's one embedder for this config (the writer and the backfill share its
    weights); None when semantic search is off. Its torch threads are search.threads when
    the vision model runs in a process of its own (model.isolate), else torch's default,
    which the vision model in this process needs."""
    if cfg.search.embedding_model is None:
        return None
    with _SHARED_LOCK:
        if cfg.search not in _SHARED:
            _SHARED[cfg.search] = LazyEmbedder(cfg.search, alone=cfg.model.isolate)
        return _SHARED[cfg.search]
