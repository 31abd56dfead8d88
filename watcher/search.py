"""Caption search: full-text (FTS5), semantic (caption vectors), hybrid (both, fused by rank)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from watcher.bitmatrix import nearest_bits
from watcher.index import VEC_PROBLEM, ImageRow, Index, prefix_range

if TYPE_CHECKING:
    import numpy as np

    from watcher.config import SearchConfig
    from watcher.embedding import Embedder, VectorBatch

MODES = ("hybrid", "text", "semantic")
# Reciprocal-rank fusion's constant (Cormack et al. 2009): a hit's share is 1/(K + rank).
RRF_K = 60
# Below this cosine similarity a caption is not "about" the query (all-MiniLM-L6-v2: unrelated
# captions score 0.0-0.15, paraphrases 0.35 and up, on the test set in tests/data).
MIN_SIMILARITY = 0.2
# Sign-bit (Hamming) candidates rescored with the stored vectors, per hit wanted: the bits
# alone misorder near neighbours, the rescoring puts them right. The scan of the bits in
# memory costs the same whatever the depth (watcher.bitmatrix); reading the candidates'
# stored vectors is what grows (some 2 ms for 200), and recall@10 with it (bench/search.py).
CANDIDATES_PER_HIT = 10
MIN_CANDIDATES = 200
# A folder or task filter matching at most this many images is searched exactly (every
# vector under it) rather than through the whole index's nearest neighbours.
EXACT_BELOW = 20_000


@dataclass(frozen=True)
class Hit:
    """One image found: its row, its place in the result, and why it is there."""

    row: ImageRow
    score: float  # hybrid: fused reciprocal rank; text: -bm25; semantic: cosine similarity
    text_rank: int | None = None  # 1-based place among the full-text matches
    text_score: float | None = None  # -bm25 (grows with relevance)
    semantic_rank: int | None = None  # 1-based place among the nearest captions
    similarity: float | None = None  # cosine similarity of the caption to the query


@dataclass(frozen=True)
class SearchResult:
    hits: tuple[Hit, ...]
    mode: str  # what ran: the asked mode, or "text" when semantic search could not
    # For stderr and the page: why semantic search was not used, and/or that a very common
    # word's matches were ranked among the most recently indexed only (TEXT_RANKED_MAX).
    note: str | None = None


class SearchError(ValueError):
    """A search that cannot be run as asked (an unknown image for --like, a bad mode)."""


@dataclass(frozen=True)
class Filters:
    folder: str | None = None  # only images under this folder (any depth)
    task: str | None = None  # only images whose sidecar holds this task's output

    def sql(self, table: str = "images") -> tuple[str, list]:
        where, args = [], []
        if self.folder is not None:
            where.append(f"{table}.path >= ? AND {table}.path < ?")
            args += list(prefix_range(self.folder))
        if self.task is not None:
            where.append(f"{table}.task = ?")
            args.append(self.task)
        return (" AND " + " AND ".join(where) if where else ""), args


# A full-text search whose words match more captions than this ranks (bm25) only the most
# recently indexed this many of them, and says so: bm25 scores every match, and a common
# word matches tens of thousands at a million images (33k: some 60 ms on 2 cores; 5,000:
# under 15 ms; bench/search.py). A filtered search ranks every match (a folder's images
# may all be old ones).
TEXT_RANKED_MAX = 5_000


def text_hits(
    index: Index, query: str, limit: int, filters: Filters = Filters()
) -> list[tuple[ImageRow, float]]:
    """Full-text search, best match first: rows and their bm25 (lower is better)."""
    ranked, _ = _text_ranked(index, query, limit, filters)
    rows = _rows(index, [r for r, _ in ranked])
    return [(rows[r], -s) for r, s in ranked if r in rows]


def _text_ranked(
    index: Index, query: str, depth: int, filters: Filters
) -> tuple[list[tuple[int, float]], str | None]:
    """(rowid, -bm25) of the best full-text matches, and a note when only the newest
    TEXT_RANKED_MAX matches were ranked. Without a filter the ranking reads the FTS index
    alone and only the winners' rows are read after: a common word matches tens of
    thousands of rows, and joining each to `images` before sorting cost most of the time."""
    conn = index.db.conn
    match = fts_query(query)
    if filters.folder is None and filters.task is None:
        # The newest TEXT_RANKED_MAX-th match's rowid (none: fewer match): a walk of the
        # doclist from its end, without scoring.
        bound = conn.execute(
            "SELECT rowid FROM images_fts WHERE images_fts MATCH ? "
            "ORDER BY rowid DESC LIMIT 1 OFFSET ?",
            (match, TEXT_RANKED_MAX),
        ).fetchone()
        sql = """SELECT rowid, bm25(images_fts) AS score FROM images_fts
                 WHERE images_fts MATCH ? AND rowid > ? ORDER BY score LIMIT ?"""
        args: list = [match, bound[0] if bound else -1, depth]
        note = (
            None
            if bound is None
            else f"the words match more than {TEXT_RANKED_MAX:,} captions: the best of the "
            f"{TEXT_RANKED_MAX:,} most recently indexed are shown (add words to narrow it)"
        )
    else:
        extra, fargs = filters.sql()
        sql = f"""SELECT images.rowid, bm25(images_fts) AS score FROM images_fts
                  JOIN images ON images.rowid = images_fts.rowid
                  WHERE images_fts MATCH ?{extra} ORDER BY score LIMIT ?"""
        args = [match, *fargs, depth]
        note = None
    return [(r, -s) for r, s in conn.execute(sql, args)], note


def fts_query(query: str) -> str:
    """User words as quoted FTS5 terms, AND-ed: punctuation cannot break the syntax."""
    terms = ['"' + t.replace('"', '""') + '"' for t in query.split() if t]
    return " ".join(terms) if terms else '""'


QueryEmbedder = Callable[[str], "np.ndarray"]


class QueryEncoder(Protocol):
    """What encodes a query: the embedding model (watcher.embedding.Embedder), or a
    running daemon's answer for it (watcher.web.client.BorrowedEncoder)."""

    tag: str  # the model that made the vectors (compared with the index's)

    def encode(self, texts: Sequence[str]) -> VectorBatch: ...


def search(
    index: Index,
    query: str | None,
    *,
    mode: str = "hybrid",
    limit: int = 20,
    folder: str | Path | None = None,
    task: str | None = None,
    like: str | Path | None = None,
    embedder: QueryEncoder | None = None,
    unavailable: str | None = None,
    min_similarity: float = MIN_SIMILARITY,
) -> SearchResult:
    """Search the captions. `mode` hybrid (default) fuses the full-text and the semantic
    ranking by reciprocal rank; `like` (an image path) finds the captions nearest to that
    image's (no text, no model needed). `embedder` encodes the query (None: semantic search
    unavailable, `unavailable` saying why; the search then runs full-text only, and the
    result's note says so)."""
    if mode not in MODES:
        raise SearchError(f"unknown search mode {mode!r}; expected one of {', '.join(MODES)}")
    filters = Filters(None if folder is None else str(folder), task)
    if like is not None:
        return _like(index, str(like), limit, filters, min_similarity)
    query = query or ""
    note = None
    vector = None
    if mode != "text":
        problem = _semantic_problem(index, embedder, unavailable)
        if problem is None and embedder is not None:
            vector = embedder.encode([query]).vectors[0]
        else:
            note = f"{problem}; full-text search only"
    if vector is None:
        ranked, capped = _text_ranked(index, query, limit, filters)
        rows = _rows(index, [r for r, _ in ranked])
        return SearchResult(
            tuple(
                Hit(rows[r], score, text_rank=n, text_score=score)
                for n, (r, score) in enumerate(ranked, 1)
                if r in rows
            ),
            "text",
            _notes(note, capped),
        )
    # The nearest-neighbour list as deep as the hits wanted (its cost grows with the depth);
    # the full-text one deeper (its cost is scoring every match, whatever the depth).
    sem = _nearest(index, vector, limit, filters)
    sem = [(rowid, sim) for rowid, sim in sem if sim >= min_similarity]
    if mode == "semantic":
        rows = _rows(index, [r for r, _ in sem])
        return SearchResult(
            tuple(
                Hit(rows[r], sim, semantic_rank=n, similarity=sim)
                for n, (r, sim) in enumerate(sem, 1)
                if r in rows
            ),
            "semantic",
        )
    text, capped = _text_ranked(index, query, max(limit * 2, 50), filters)
    return SearchResult(_fuse(index, text, sem, limit), "hybrid", _notes(capped))


def _notes(*notes: str | None) -> str | None:
    return "; ".join(n for n in notes if n) or None


def _semantic_problem(
    index: Index, embedder: QueryEncoder | None, unavailable: str | None
) -> str | None:
    if not index.vectors_usable():
        return "semantic search unavailable: " + (
            VEC_PROBLEM[0] if VEC_PROBLEM else "the index has no vector table yet"
        )
    if embedder is None:
        return unavailable or "semantic search unavailable: no embedding model"
    stored = index.vector_model()
    if stored is None:
        return (
            "semantic search unavailable: no caption is embedded yet (the daemon embeds "
            "them in the background; `watcher status` shows how far it is)"
        )
    if stored != embedder.tag:
        return (
            f"semantic search unavailable: the index's vectors were made by {stored}, the "
            f"configured model is {embedder.tag} (the daemon embeds every caption again at "
            "its next start)"
        )
    return None


def _nearest(
    index: Index, vector: np.ndarray, k: int, filters: Filters, exclude: int | None = None
) -> list[tuple[int, float]]:
    """(rowid, cosine similarity) of the `k` captions nearest to `vector`, best first: the
    sign bits' Hamming neighbours (held in memory: watcher.bitmatrix) rescored with the
    stored int8 vectors; under a selective filter, every vector it matches, exactly."""
    import numpy as np

    filtered = filters.folder is not None or filters.task is not None
    ids: list[int] | None = None
    if filtered:
        extra, args = filters.sql()
        ids = [
            r[0]
            for r in index.db.conn.execute(
                f"SELECT images.rowid FROM images WHERE 1{extra} LIMIT ?",
                [*args, EXACT_BELOW + 1],
            )
        ]
        if len(ids) > EXACT_BELOW:
            ids = None
    if ids is None:
        want = max(MIN_CANDIDATES, (k + (exclude is not None)) * CANDIDATES_PER_HIT)
        if filtered:
            want *= 4  # a broad filter: more candidates, most survive it
        ids = nearest_bits(index, vector, want)
        if filtered:
            ids = _keep(index, ids, filters)
    vecs = index.vectors_of([i for i in ids if i != exclude])
    if not vecs:
        return []
    keys = list(vecs)
    sims: np.ndarray = np.stack([vecs[i] for i in keys]) @ np.asarray(vector, dtype=np.float32)
    order = np.argsort(-sims)[:k]
    return [(keys[n], float(sims[n])) for n in order]


def _keep(index: Index, ids: list[int], filters: Filters) -> list[int]:
    extra, args = filters.sql()
    keep: set[int] = set()
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        keep.update(
            r[0]
            for r in index.db.conn.execute(
                f"SELECT images.rowid FROM images WHERE images.rowid IN "
                f"({','.join('?' * len(part))}){extra}",
                [*part, *args],
            )
        )
    return [i for i in ids if i in keep]


def _rows(index: Index, rowids: list[int]) -> dict[int, ImageRow]:
    out: dict[int, ImageRow] = {}
    for start in range(0, len(rowids), 500):
        part = rowids[start : start + 500]
        cur = index.db.conn.execute(
            f"SELECT rowid AS _rowid, * FROM images WHERE rowid IN ({','.join('?' * len(part))})",
            part,
        )
        names = [c[0] for c in cur.description]
        for values in cur:
            row = dict(zip(names, values, strict=True))
            out[row.pop("_rowid")] = ImageRow.from_row(row)
    return out


def _fuse(
    index: Index, text: list[tuple[int, float]], sem: list[tuple[int, float]], limit: int
) -> tuple[Hit, ...]:
    """Reciprocal-rank fusion: each list gives a hit 1/(RRF_K + its rank there)."""
    fused: dict[int, float] = {}
    info: dict[int, dict] = {}
    for n, (r, s) in enumerate(text, 1):
        fused[r] = fused.get(r, 0.0) + 1.0 / (RRF_K + n)
        info.setdefault(r, {}).update(text_rank=n, text_score=s)
    for n, (r, s) in enumerate(sem, 1):
        fused[r] = fused.get(r, 0.0) + 1.0 / (RRF_K + n)
        info.setdefault(r, {}).update(semantic_rank=n, similarity=s)
    best = sorted(fused, key=lambda r: (-fused[r], r))[:limit]
    rows = _rows(index, best)
    return tuple(Hit(rows[r], fused[r], **info[r]) for r in best if r in rows)


def _like(
    index: Index, path: str, limit: int, filters: Filters, min_similarity: float
) -> SearchResult:
    """The images whose captions are nearest to this image's (its stored vector)."""
    import os

    path = os.path.abspath(os.path.expanduser(path))
    rowid = index.rowid_of(path)
    if rowid is None:
        raise SearchError(f"{path} is not in the index (it has no caption yet)")
    if not index.vectors_usable():
        problem = VEC_PROBLEM[0] if VEC_PROBLEM else "the index has no vector table yet"
        raise SearchError(f"--like needs caption vectors: {problem}")
    vector = index.vectors_of([rowid]).get(rowid)
    if vector is None:
        raise SearchError(
            f"{path} has no caption vector yet (the daemon embeds captions in the background; "
            "`watcher status` shows how far it is)"
        )
    sem = _nearest(index, vector, limit, filters, exclude=rowid)
    sem = [(r, sim) for r, sim in sem if sim >= min_similarity]
    rows = _rows(index, [r for r, _ in sem])
    return SearchResult(
        tuple(
            Hit(rows[r], sim, semantic_rank=n, similarity=sim)
            for n, (r, sim) in enumerate(sem, 1)
            if r in rows
        ),
        "semantic",
    )


def load_query_embedder(index: Index, cfg: SearchConfig) -> tuple[Embedder | None, str | None]:
    """The model to encode a query with, or None and why not: off, not downloaded, or not
    the model the index's vectors came from (checked before loading anything)."""
    from watcher.embedding import Embedder, EmbeddingUnavailable, model_tag

    if cfg.embedding_model is None:
        return None, "semantic search is off (search.embedding_model: null)"
    tag = model_tag(cfg)
    try:
        usable = index.vectors_usable()
        stored = index.vector_model() if usable else None
    except sqlite3.Error:
        usable, stored = False, None
    # Nothing to compare the query with: the model is not loaded for nothing.
    if not usable:
        reason = VEC_PROBLEM[0] if VEC_PROBLEM else "the index has no vector table yet"
        return None, f"semantic search unavailable: {reason}"
    if stored is None:
        return None, (
            "semantic search unavailable: no caption is embedded yet (the daemon embeds "
            "them in the background; `watcher status` shows how far it is)"
        )
    if stored != tag:
        return None, (
            f"semantic search unavailable: the index's vectors were made by {stored}, the "
            f"configured model is {tag} (the daemon embeds every caption again at its next "
            "start)"
        )
    try:
        return Embedder.load(cfg), None
    except EmbeddingUnavailable as e:
        return None, f"semantic search unavailable: {e}"
