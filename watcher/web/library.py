"""What the library page lists: images newest first, search hits, or jobs in a state, a page at
a time behind an opaque cursor."""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from watcher.config import Config
from watcher.index import ImageRow, Index
from watcher.paths import decode, encode, shown
from watcher.search import search

PAGE_SIZE = 60
# Search ranks every hit (bm25); the page walks the best ones, as `watcher search --limit`.
SEARCH_MAX = 1000

# The state filter: images by their sidecar, or names by their job.
STATES = ("captioned", "hand-edited", "pending", "failed", "skipped")
_SIDECAR_STATES = {"captioned": "written", "hand-edited": "kept"}
_JOB_STATES = {"pending": ("pending", "running"), "failed": ("failed",), "skipped": ("skipped",)}


class BadRequest(ValueError):
    """A filter or cursor the page did not make."""


@dataclass(frozen=True)
class Item:
    """One tile: an indexed image (with `id`), or a name known only to the queue."""

    id: int | None
    name: str
    folder: str
    caption: str
    state: str  # captioned | hand-edited | pending | failed | skipped | sidecar pending
    reason: str | None = None
    job: int | None = None  # the job id (failed: what the retry button names)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "folder": self.folder,
            "caption": self.caption,
            "state": self.state,
            "reason": self.reason,
            "job": self.job,
            "thumb": f"/thumb/{self.id}" if self.id is not None else None,
            "page": f"/image/{self.id}" if self.id is not None else None,
        }


@dataclass(frozen=True)
class Page:
    items: list[Item] = field(default_factory=list)
    next: str | None = None  # the cursor of the following page
    total: int | None = None  # images in the index (unfiltered listing only)
    note: str | None = None  # what the search could not do (full-text only, ranking capped)


@dataclass(frozen=True)
class Query:
    """The library's filters, as the page's form and /api/images take them."""

    q: str = ""
    folder: int | None = None  # position in the config's folders (never a path)
    state: str = ""
    cursor: str = ""
    limit: int = PAGE_SIZE

    @classmethod
    def parse(cls, params: dict[str, str], config: Config) -> Query:
        folder = params.get("folder", "")
        state = params.get("state", "")
        if state and state not in STATES:
            raise BadRequest(f"unknown state {state!r}; one of {', '.join(STATES)}")
        index: int | None = None
        if folder:
            try:
                index = int(folder)
            except ValueError:
                raise BadRequest("folder must be a number from the list") from None
            if not 0 <= index < len(config.folders):
                raise BadRequest("no such folder")
        try:
            limit = int(params.get("limit", PAGE_SIZE))
        except ValueError:
            raise BadRequest("limit must be a number") from None
        return cls(
            q=params.get("q", "").strip()[:500],
            folder=index,
            state=state,
            cursor=params.get("cursor", ""),
            limit=max(1, min(limit, 500)),
        )


def state_of(row: ImageRow) -> str:
    return {"written": "captioned", "kept": "hand-edited"}.get(row.sidecar_state, "sidecar pending")


def _item(image_id: int, row: ImageRow) -> Item:
    path = Path(row.path)
    return Item(
        image_id,
        shown(path.name),
        shown(path.parent),
        row.caption,
        state_of(row),
        row.sidecar_error,
    )


def _cursor(data: dict) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _uncursor(cursor: str) -> dict:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError):
        raise BadRequest("bad cursor") from None
    if not isinstance(data, dict):
        raise BadRequest("bad cursor")
    return data


def _pair(data: dict, key: str) -> tuple[float, int] | None:
    value = data.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, (int, float)) for v in value)
    ):
        raise BadRequest("bad cursor")
    return value[0], int(value[1])


def list_page(
    db: sqlite_utils.Database,
    config: Config,
    query: Query,
    embedder: Callable[[Index], Any] | None = None,
) -> Page:
    """One page of the library. `embedder` gives the search box's query encoder (None, or
    one that returns None: full-text search only)."""
    root = str(config.folders[query.folder].path) if query.folder is not None else None
    after = _uncursor(query.cursor) if query.cursor else {}
    if query.q:
        return _search(db, query, root, after, embedder)
    if query.state in _JOB_STATES:
        return _jobs(db, query, root, after)
    index = Index(db)
    key = _pair(after, "k")
    rows = index.newest(
        query.limit + 1,
        after=(int(key[0]), key[1]) if key else None,
        root=root,
        sidecar_state=_SIDECAR_STATES.get(query.state),
    )
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    nxt = _cursor({"k": [rows[-1][1].mtime_ns, rows[-1][0]]}) if more else None
    total = index.count() if not (root or query.state or query.cursor) else None
    return Page([_item(i, r) for i, r in rows], nxt, total)


def _search(
    db: sqlite_utils.Database,
    query: Query,
    root: str | None,
    after: dict,
    embedder: Callable[[Index], Any] | None,
) -> Page:
    offset = after.get("o", 0)
    if not isinstance(offset, int) or not 0 <= offset <= SEARCH_MAX:
        raise BadRequest("bad cursor")
    index = Index(db)
    # Without a filter the page needs only the best offset+limit (+1: is there more?); a
    # filter may drop any number of them, so it takes the best SEARCH_MAX.
    filtered = root is not None or bool(query.state)
    want = SEARCH_MAX if filtered else min(SEARCH_MAX, offset + query.limit + 1)
    # The same search as `watcher search`: hybrid where caption vectors and the model are
    # there, full-text otherwise.
    model = embedder(index) if embedder is not None else None
    result = search(index, query.q, mode="hybrid" if model else "text", limit=want, embedder=model)
    hits = [h.row for h in result.hits]
    if root is not None:
        hits = [r for r in hits if r.root == root]
    if query.state in _SIDECAR_STATES:
        hits = [r for r in hits if r.sidecar_state == _SIDECAR_STATES[query.state]]
    elif query.state in _JOB_STATES:
        wanted = _JOB_STATES[query.state]
        hits = [r for r in hits if (_job_state(db, r.path) or "") in wanted]
    chunk = hits[offset : offset + query.limit]
    ids = index.ids_of([r.path for r in chunk])
    items = [_item(ids[r.path], r) for r in chunk if r.path in ids]
    more = offset + query.limit < min(len(hits), SEARCH_MAX)
    return Page(items, _cursor({"o": offset + query.limit}) if more else None, note=result.note)


def _job_state(db: sqlite_utils.Database, path: str) -> str | None:
    row = db.conn.execute("SELECT state FROM jobs WHERE path = ?", (encode(path),)).fetchone()
    return row[0] if row else None


def _jobs(db: sqlite_utils.Database, query: Query, root: str | None, after: dict) -> Page:
    """Names in a queue state, most recently changed first (keyset on (updated, id))."""
    states = _JOB_STATES[query.state]
    where = [f"state IN ({', '.join('?' * len(states))})"]
    args: list = list(states)
    if root is not None:
        where.append("root = ?")
        args.append(encode(root))
    key = _pair(after, "j")
    if key is not None:
        where.append("(updated, id) < (?, ?)")
        args += [key[0], key[1]]
    rows = db.conn.execute(
        "SELECT id, path, state, error, updated FROM jobs WHERE "
        + " AND ".join(where)
        + " ORDER BY updated DESC, id DESC LIMIT ?",
        (*args, query.limit + 1),
    ).fetchall()
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    paths = [decode(p) for _, p, _, _, _ in rows]
    index = Index(db)
    ids = index.ids_of(paths)
    items = []
    for (job_id, _, state, error, _), path in zip(rows, paths, strict=True):
        image_id = ids.get(path)
        row = index.by_id(image_id) if image_id is not None else None
        items.append(
            Item(
                image_id,
                shown(os.path.basename(path)),
                shown(os.path.dirname(path)),
                row.caption if row else "",
                "pending" if state == "running" else state,
                error,
                job_id,
            )
        )
    nxt = _cursor({"j": [rows[-1][4], rows[-1][0]]}) if more else None
    return Page(items, nxt)
