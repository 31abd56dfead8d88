"""`watcher search` borrowing a running daemon's query encoder over its local web API."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from watcher.config import Config
    from watcher.embedding import VectorBatch
    from watcher.index import Index

log = structlog.get_logger("watcher.web.client")

# The daemon answers from memory in milliseconds; one still loading its model (the first
# search after a start) takes about as long as loading it here would. A daemon that does not
# even accept the connection is given up on at once.
TIMEOUT = (2.0, 30.0)  # (connect, the rest), seconds


class BorrowedEncoder:
    """The query's vector as the daemon's model made it: what `search()` asks of a query
    encoder (`tag`, `encode`), for the one text it was made for."""

    def __init__(self, batch: VectorBatch) -> None:
        self.tag = batch.model
        self._batch = batch

    def encode(self, texts: Sequence[str]) -> VectorBatch:
        if tuple(texts) != self._batch.texts:
            raise ValueError("a borrowed query vector encodes only its own query")
        return self._batch


def borrow_encoder(cfg: Config, index: Index, query: str) -> BorrowedEncoder | None:
    """The running daemon's vector for `query`, made by the model this config names; None
    (load the model here) when no daemon runs on this database, it serves no web API, or
    its answer is not that model's vector. Never raises: this only saves time."""
    from watcher.embedding import VectorBatch, model_tag
    from watcher.service import lifecycle

    if cfg.search.embedding_model is None:
        return None
    try:
        row = lifecycle.read(index.db)
        dim = index.vector_dim()
    except Exception:  # an older or busy database: the local model answers
        return None
    if row is None or not row.running or not row.url or dim is None:
        return None
    tag = model_tag(cfg.search)
    try:
        import httpx
        import numpy as np

        headers = {"Authorization": f"Bearer {cfg.web.token}"} if cfg.web.token else {}
        reply = httpx.get(
            row.url.rstrip("/") + "/api/query-vector",
            params={"q": query},
            headers=headers,
            timeout=httpx.Timeout(TIMEOUT[1], connect=TIMEOUT[0]),
            trust_env=False,  # the daemon is on this machine: never through a proxy
        )
        reply.raise_for_status()
        data = reply.json()
        vector = np.asarray(data["vector"], dtype=np.float32)
        if (
            data.get("model") != tag
            or vector.shape != (dim,)
            or not np.all(np.isfinite(vector))
            or not math.isclose(float(np.linalg.norm(vector)), 1.0, abs_tol=1e-3)
        ):
            log.debug("the daemon's query vector is not this model's", url=row.url)
            return None
    except Exception as e:  # not answering, stopped meanwhile, an old daemon: load here
        log.debug("could not borrow the daemon's query encoder", url=row.url, error=str(e))
        return None
    return BorrowedEncoder(VectorBatch(tag, vector[None, :], (query,)))
