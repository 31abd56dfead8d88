"""Full-text search at scale: a very common word's matches ranked among the newest, said so."""

from __future__ import annotations

from pathlib import Path

from test_semantic import make_index

import watcher.search
from watcher.search import search


def test_a_word_matching_more_than_the_cap_ranks_the_newest_and_says_so(
    tmp_path: Path, monkeypatch
):
    index = make_index(
        tmp_path / "index.db",
        {f"/p/{n}.jpg": f"A cat number {n} {'cat ' * (n % 3)}on a mat." for n in range(6)},
    )
    every = search(index, "cat", mode="text", limit=10)
    assert len(every.hits) == 6 and every.note is None

    monkeypatch.setattr(watcher.search, "TEXT_RANKED_MAX", 4)
    capped = search(index, "cat", mode="text", limit=10)
    assert {h.row.path for h in capped.hits} == {f"/p/{n}.jpg" for n in range(2, 6)}
    assert capped.note and "more than 4 captions" in capped.note
    assert "most recently indexed" in capped.note
    # Ranked among those by bm25, as before: the order is that of the uncapped search.
    kept = [h.row.path for h in every.hits if h.row.path in {h.row.path for h in capped.hits}]
    assert [h.row.path for h in capped.hits] == kept
    # Words matching fewer than the cap: every match ranked, nothing to say.
    narrow = search(index, "cat number 3", mode="text")
    assert [h.row.path for h in narrow.hits] == ["/p/3.jpg"] and narrow.note is None
    # A folder filter ranks every match under it (the folder's images may all be old ones).
    with_filter = search(index, "cat", mode="text", limit=10, folder="/p")
    assert len(with_filter.hits) == 6 and with_filter.note is None
    index.db.conn.close()


def test_the_web_search_says_when_its_ranking_was_capped(tmp_path: Path, monkeypatch):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient
    from test_semantic import write_config

    from watcher.config import load_config
    from watcher.web import pages
    from watcher.web.context import WebContext

    db = tmp_path / "index.db"
    make_index(db, {f"/p/{n}.jpg": f"A cat number {n} on a mat." for n in range(6)}).db.conn.close()
    ctx = WebContext(
        initial=load_config(write_config(tmp_path, db, embedding_model=None)),
        db_path=db,
        lane=None,
    )
    monkeypatch.setattr(watcher.search, "TEXT_RANKED_MAX", 4)
    with TestClient(Starlette(routes=pages.routes(ctx))) as client:
        api = client.get("/api/search", params={"q": "cat"}).json()
        assert api["note"] and "more than 4 captions" in api["note"]
        assert len(api["images"]) == 4
        page = client.get("/", params={"q": "cat"}).text
        assert "more than 4 captions" in page
        # A narrow search has nothing to say.
        assert client.get("/api/search", params={"q": "number 3"}).json()["note"] is None
