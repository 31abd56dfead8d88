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
