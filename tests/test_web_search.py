"""The library page's search box is `watcher search`'s hybrid search: it finds by meaning."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.testclient import TestClient
from test_semantic import CAPTIONS, make_index, write_config

from watcher.config import load_config
from watcher.web import pages
from watcher.web.context import WebContext


def names(client: TestClient, q: str) -> list[str]:
    response = client.get("/api/search", params={"q": q})
    assert response.status_code == 200, response.text
    return [i["name"] for i in response.json()["images"]]


def test_the_search_box_finds_a_caption_sharing_no_word_with_the_query(
    tmp_path, minilm, minilm_embedder
):
    db = tmp_path / "index.db"
    make_index(db, CAPTIONS, minilm_embedder).db.conn.close()
    ctx = WebContext(
        initial=load_config(write_config(tmp_path, db, embedding_model=str(minilm))),
        db_path=db,
        lane=None,
    )
    with TestClient(Starlette(routes=pages.routes(ctx))) as client:
        # "crimson bike": no word of the caption "A red bicycle parked against a brick wall."
        assert names(client, "crimson bike")[0] == "bike.jpg"
        # Words still count: the exact word ranks its caption first.
        assert names(client, "spaghetti")[0] == "pasta.jpg"

    # Semantic search off: the same box searches the words only, and finds nothing here.
    ctx = WebContext(
        initial=load_config(write_config(tmp_path, db, embedding_model=None)),
        db_path=db,
        lane=None,
    )
    with TestClient(Starlette(routes=pages.routes(ctx))) as client:
        assert names(client, "crimson bike") == []
        assert names(client, "spaghetti") == ["pasta.jpg"]


def test_a_caption_edited_on_the_page_is_found_by_meaning_at_once(
    tmp_path, minilm, minilm_embedder, monkeypatch
):
    import dataclasses

    from web_library import library

    from watcher.config import SearchConfig
    from watcher.editing import sidecar_hash
    from watcher.index import Index, connect, transaction

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lib = library(tmp_path)
    lib.config = dataclasses.replace(lib.config, search=SearchConfig(embedding_model=str(minilm)))
    lib.add("a.jpg", "A plate of spaghetti with tomato sauce.")
    lib.add("b.jpg", "A golden retriever runs along a sandy beach.")
    index = Index(connect(lib.db))
    rows = [lib.row("a.jpg"), lib.row("b.jpg")]
    with transaction(index.db):
        index.put_caption_vectors(minilm_embedder.encode([r.caption for r in rows]), rows)
    a = lib.id_of("a.jpg")
    with TestClient(Starlette(routes=pages.routes(WebContext(lib.config, lib.db, None)))) as c:
        assert names(c, "red bicycle") == []  # nothing in the library is like it yet
        r = c.post(
            f"/image/{a}/caption",
            data={
                "caption": "A crimson bike leaning on a brick wall",
                "sidecar_sha256": sidecar_hash(lib.config, lib.row("a.jpg")) or "",
            },
        )
        assert r.status_code == 200, r.text
        assert (tmp_path / "photos" / "a.txt").read_text() == (
            "A crimson bike leaning on a brick wall\n"
        )
        # Its vector was made with the edit: found by meaning, no word shared with it.
        assert names(c, "red bicycle") == ["a.jpg"]
    rowid = index.rowid_of(str(tmp_path / "photos" / "a.jpg"))
    assert rowid in index.vectors_of([rowid])
