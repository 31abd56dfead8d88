"""Semantic search: caption vectors written with the rows, kept in step, searched by meaning."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import sqlite_utils
import yaml
from daemon_harness import run_cli, wait_for
from images import distinct_image
from rows import image_row

from watcher.config import Config, SearchConfig, load_config
from watcher.embedding import model_tag
from watcher.index import SCHEMA_VERSION, Index, _create_v1, connect, transaction
from watcher.pipeline.backfill import Backfill, read_progress


def make_index(db_path: Path, rows: dict[str, str | tuple[str, str]], embedder=None) -> Index:
    """An index with these rows (path -> caption, or (caption, task)); with vectors when
    an embedder is given."""
    index = Index(connect(db_path))
    made = []
    with transaction(index.db):
        for path, value in rows.items():
            caption, task = value if isinstance(value, tuple) else (value, "short")
            index.upsert(image_row(path, caption, task))
            made.append(index.get(path))
        if embedder is not None:
            index.put_caption_vectors(embedder.encode([r.caption for r in made]), made)
    return index


def vector_rows(index: Index, rowid: int) -> tuple[int, int]:
    """How many rows of the two vector tables describe this image."""
    c = index.db.conn
    return (
        c.execute("SELECT count(*) FROM image_vectors WHERE image_id = ?", (rowid,)).fetchone()[0],
        c.execute("SELECT count(*) FROM image_vec WHERE rowid = ?", (rowid,)).fetchone()[0],
    )


def write_config(tmp_path: Path, db: Path, **search) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump({"database": str(db), "search": search}))
    return p


def search_json(*argv: str) -> tuple[int, list[dict], str]:
    code, out, err = run_cli(*argv, "--json")
    return code, json.loads(out), err


CAPTIONS = {
    "/a/bike.jpg": ("A red bicycle parked against a brick wall.", "short"),
    "/a/beach.jpg": ("A golden retriever runs along a sandy beach.", "short"),
    "/a/ramen.jpg": ("A bowl of ramen with a soft-boiled egg.", "long"),
    "/b/moto.jpg": ("A motorcycle parked on a quiet street.", "short"),
    "/b/pasta.jpg": ("A plate of spaghetti with tomato sauce.", "short"),
}


@pytest.fixture
def library(tmp_path, minilm, minilm_embedder) -> tuple[Path, Path]:
    """An index of CAPTIONS with real vectors, and a config pointing at the real model."""
    db = tmp_path / "index.db"
    make_index(db, CAPTIONS, minilm_embedder).db.conn.close()
    return db, write_config(tmp_path, db, embedding_model=str(minilm))


# -- writer, edits, deletes ------------------------------------------------------------------


@pytest.mark.slow
def test_captions_and_an_edited_sidecar_are_found_by_words_and_meaning(
    tmp_path, tiny_llava, minilm, minilm_embedder
):
    from test_cli import config

    from watcher.captioning import caption_folders

    pics = tmp_path / "pics"
    distinct_image(1, pics / "street.jpg")
    distinct_image(2, pics / "other.jpg")
    cfg = load_config(config(tmp_path, tiny_llava, search={"embedding_model": str(minilm)}))
    assert caption_folders(cfg, [pics]).exit_code == 0
    index = Index(connect(cfg.database))
    # The writer stored each caption's vector with its row, tagged with the model.
    assert index.vector_model() == model_tag(cfg.search)
    assert index.vector_count() == index.count() == 2
    row = index.get(str(pics / "street.jpg"))
    rowid = index.rowid_of(row.path)
    stored = index.vectors_of([rowid])[rowid]
    assert float(stored @ minilm_embedder.encode([row.caption]).vectors[0]) > 0.99

    # The user rewrites the sidecar; the image changes, so it is examined again: the
    # sidecar is kept (edited by the user) and what it says is what the index holds.
    (pics / "street.txt").write_text("A crimson bike leaning on a brick wall\n")
    distinct_image(3, pics / "street.jpg")
    assert caption_folders(cfg, [pics]).exit_code == 0
    assert index.get(row.path).caption == "A crimson bike leaning on a brick wall"
    assert index.vector_count() == 2
    conf = str(tmp_path / "config.yaml")
    code, hits, _ = search_json("--config", conf, "search", "crimson", "--mode", "text")
    assert code == 0 and [h["path"] for h in hits] == [row.path]
    # By meaning: no word of the query is in the caption.
    code, hits, err = search_json(
        "--config", conf, "search", "red bicycle", "--mode", "semantic", "--limit", "1"
    )
    assert (code, err) == (0, "")
    assert hits[0]["path"] == row.path and hits[0]["similarity"] > 0.4
    index.db.conn.close()


def test_a_deleted_or_recaptioned_image_leaves_no_vector(tmp_path, minilm_embedder):
    index = make_index(tmp_path / "index.db", CAPTIONS, minilm_embedder)
    bike, beach, ramen = (
        index.rowid_of(p) for p in ("/a/bike.jpg", "/a/beach.jpg", "/a/ramen.jpg")
    )
    assert vector_rows(index, bike) == vector_rows(index, beach) == (1, 1)
    with transaction(index.db):
        index.delete("/a/bike.jpg")  # what events and scans do
    with transaction(index.db):  # what `watcher prune` does: plain SQL
        index.db.conn.execute("DELETE FROM images WHERE path = ?", ("/a/beach.jpg",))
    assert vector_rows(index, bike) == vector_rows(index, beach) == (0, 0)
    # A new caption makes the old vector wrong: it goes (the writer or the backfill puts
    # the new one); the same caption written again keeps it.
    with transaction(index.db):
        index.upsert(image_row("/a/ramen.jpg", *CAPTIONS["/a/ramen.jpg"]))
    assert vector_rows(index, ramen) == (1, 1)
    with transaction(index.db):
        index.upsert(image_row("/a/ramen.jpg", "A cat on a sofa."))
    assert vector_rows(index, ramen) == (0, 0)
    assert index.vector_count() == 2
    assert [r for r, _ in index.missing_vectors(0, 10)] == [ramen]


def test_a_model_change_embeds_every_caption_again(tmp_path, minilm, minilm_embedder):
    db = tmp_path / "index.db"
    index = make_index(db, CAPTIONS)
    # Vectors of another model (another space): random, tagged with its name.
    rng = np.random.default_rng(0)
    with transaction(index.db):
        index.use_vector_model("someone/old-model@1", 384)
        vecs = rng.normal(size=(len(CAPTIONS), 384)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        index.put_vectors([(index.rowid_of(p), vecs[n]) for n, p in enumerate(CAPTIONS)])
    conf = write_config(tmp_path, db, embedding_model=str(minilm))
    code, hits, err = search_json("--config", str(conf), "search", "bicycle")
    assert code == 0 and [h["mode"] for h in hits] == ["text"]
    assert "vectors were made by someone/old-model@1" in err and "full-text search only" in err

    cfg = Config(database=db, search=SearchConfig(embedding_model=str(minilm)))
    backfill = Backfill(cfg)
    backfill.start()
    try:
        wait_for(
            lambda: (p := read_progress(index)) is not None and p.state == "done",
            timeout=120,
            what="the backfill to finish",
        )
    finally:
        backfill.stop()
    assert index.vector_model() == model_tag(cfg.search)
    assert index.vector_count() == len(CAPTIONS) and backfill.embedded == len(CAPTIONS)
    code, hits, err = search_json(
        "--config",
        str(conf),
        "search",
        "japanese noodle soup with an egg",
        "--mode",
        "semantic",
        "--limit",
        "1",
    )
    assert (code, err) == (0, "") and hits[0]["path"] == "/a/ramen.jpg"
    index.db.conn.close()


# -- search without the model, modes, --like, filters ------------------------------------------


def test_search_is_text_only_with_a_note_when_the_model_is_missing(tmp_path, minilm_embedder):
    db = tmp_path / "index.db"
    index = make_index(db, CAPTIONS)
    # Vectors made by the default model, which this machine's Hugging Face cache lacks.
    default = SearchConfig()
    with transaction(index.db):
        index.use_vector_model(model_tag(default), 384)
        batch = minilm_embedder.encode([c for c, _ in CAPTIONS.values()])
        index.put_vectors([(index.rowid_of(p), batch.vectors[n]) for n, p in enumerate(CAPTIONS)])
    index.db.conn.close()
    code, out, err = run_cli("--db", str(db), "search", "bicycle")
    assert (code, out) == (0, "/a/bike.jpg\n    A red bicycle parked against a brick wall.\n")
    assert err.startswith("watcher: note: semantic search unavailable: the embedding model ")
    assert "not in the Hugging Face cache; run `watcher model fetch`" in err
    assert err.endswith("; full-text search only\n") and "Traceback" not in err
    # Turned off in the config: text search, and nothing to say about it.
    off = write_config(tmp_path, db, embedding_model=None)
    assert run_cli("--config", str(off), "search", "bicycle") == (
        0,
        "/a/bike.jpg\n    A red bicycle parked against a brick wall.\n",
        "",
    )
    code, _, err = run_cli("--config", str(off), "search", "bicycle", "--mode", "semantic")
    assert code == 0
    assert err == (
        "watcher: note: semantic search is off (search.embedding_model: null); "
        "full-text search only\n"
    )
    code, out, err = run_cli("--config", str(off), "search", "cycling", "--mode", "semantic")
    assert (code, out) == (1, "") and err.endswith("no matches\n")


def test_hybrid_fuses_words_and_meaning_with_scores_in_json(library):
    db, conf = library
    code, hits, err = search_json("--config", str(conf), "search", "parked motorbike")
    assert (code, err) == (0, "")
    # No caption has both words; by meaning the motorcycle comes first, then the bicycle.
    assert [h["path"] for h in hits[:2]] == ["/b/moto.jpg", "/a/bike.jpg"]
    top = hits[0]
    assert top["mode"] == "hybrid" and top["semantic_rank"] == 1 and top["text_rank"] is None
    assert top["score"] == pytest.approx(1 / 61, abs=1e-6)  # reciprocal rank, one list
    code, hits, _ = search_json("--config", str(conf), "search", "parked bicycle")
    best = hits[0]
    assert best["path"] == "/a/bike.jpg" and best["text_rank"] == 1 and best["semantic_rank"] == 1
    assert best["score"] == pytest.approx(2 / 61, abs=1e-6)
    assert best["score"] > hits[1]["score"]
    # Each mode alone, and scores that grow with relevance.
    code, hits, _ = search_json("--config", str(conf), "search", "parked", "--mode", "text")
    assert {h["path"] for h in hits} == {"/a/bike.jpg", "/b/moto.jpg"}
    assert all(h["mode"] == "text" and h["similarity"] is None for h in hits)
    code, hits, _ = search_json(
        "--config", str(conf), "search", "puppy at the seaside", "--mode", "semantic"
    )
    assert hits[0]["path"] == "/a/beach.jpg"
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)


def test_like_finds_the_nearest_captions_and_filters_narrow_the_search(library):
    db, conf = library
    c = str(conf)
    code, hits, err = search_json("--config", c, "search", "--like", "/a/bike.jpg")
    assert (code, err) == (0, "")
    assert hits[0]["path"] == "/b/moto.jpg" and "/a/bike.jpg" not in [h["path"] for h in hits]
    # Only what is near enough (cosine >= 0.2): the pasta is not like a bicycle.
    code, hits, _ = search_json("--config", c, "search", "--like", "/a/bike.jpg", "--folder", "/b")
    assert [h["path"] for h in hits] == ["/b/moto.jpg"]
    code, hits, _ = search_json("--config", c, "search", "--like", "/a/bike.jpg", "--folder", "/a")
    assert (code, hits) == (1, [])
    code, hits, _ = search_json("--config", c, "search", "food", "--folder", "/b")
    assert [h["path"] for h in hits][:1] == ["/b/pasta.jpg"]
    assert all(h["path"].startswith("/b/") for h in hits)
    code, hits, _ = search_json("--config", c, "search", "food", "--task", "long")
    assert [h["path"] for h in hits] == ["/a/ramen.jpg"]
    assert run_cli("--config", c, "search", "--like", "/a/none.jpg") == (
        1,
        "",
        "watcher: /a/none.jpg is not in the index (it has no caption yet)\n",
    )
    assert run_cli("--config", c, "search") == (
        2,
        "",
        "watcher: search needs TEXT or --like IMAGE (one of them)\n",
    )


# -- schema ---------------------------------------------------------------------------------


def test_a_schema_2_database_is_migrated_and_its_captions_wait_for_vectors(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    db = sqlite_utils.Database(conn)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    _create_v1(db)
    conn.execute("ALTER TABLE images ADD COLUMN model_caption TEXT")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    row = image_row("/p/sky.jpg", "a blue sky").to_row()
    conn.execute(
        f"INSERT INTO images ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
        list(row.values()),
    )
    conn.close()
    # Read-only first (`watcher search` on an old database): upgraded, then read.
    code, out, err = run_cli("--db", str(path), "search", "sky")
    assert (code, out) == (0, "/p/sky.jpg\n    a blue sky\n")
    index = Index(connect(path))
    assert index.db.conn.execute(
        "SELECT value FROM meta WHERE key = 'schema_version'"
    ).fetchone() == (str(SCHEMA_VERSION),)
    assert index.vectors_usable() and index.vector_model() is None
    assert [c for _, c in index.missing_vectors(0, 10)] == ["a blue sky"]
    # Migrated where sqlite-vec could not load (no vector table, no triggers): the next
    # start that can load it adds them.
    for sql in (
        "DROP TABLE image_vec",
        "DROP TRIGGER images_vec_delete",
        "DROP TRIGGER images_vec_caption",
    ):
        index.db.conn.execute(sql)
    assert not index.vectors_usable()
    # Migrating again changes nothing else.
    index.db.conn.close()
    index = Index(connect(path))
    assert index.get("/p/sky.jpg").caption == "a blue sky"
    assert index.vectors_usable()
    assert {
        r[0] for r in index.db.conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")
    } >= {"images_vec_delete", "images_vec_caption"}
    index.db.conn.close()


# -- config ---------------------------------------------------------------------------------


def test_search_config_is_checked_and_a_relative_model_folder_is_the_configs(tmp_path):
    from watcher.config import ConfigError, parse_config

    cfg = parse_config(
        {"search": {"embedding_model": "./models/minilm", "mode": "text"}},
        "c.yaml",
        base_dir=tmp_path,
    )
    assert cfg.search.embedding_model == str(tmp_path / "models" / "minilm")
    assert (
        cfg.search.mode == "text"
        and cfg.search.embedding_revision == SearchConfig().embedding_revision
    )
    assert parse_config({"search": {"embedding_model": None}}).search.embedding_model is None
    for bad, message in (
        (
            {"mode": "fuzzy"},
            "c.yaml: search.mode: expected one of hybrid, text, semantic; got 'fuzzy'",
        ),
        ({"batch_size": 0}, "c.yaml: search.batch_size: expected an integer >= 1; got 0"),
        (
            {"colour": 1},
            "c.yaml: search.colour: unknown key; expected one of backfill, batch_size, "
            "embedding_model, embedding_revision, mode, threads",
        ),
    ):
        with pytest.raises(ConfigError) as e:
            parse_config({"search": bad}, "c.yaml")
        assert str(e.value) == message


def test_model_fetch_also_fetches_the_embedding_model(tmp_path, monkeypatch):
    import io

    from watcher.backends import weights
    from watcher.cli import embedding_fetch

    asked = []

    def download(repo_id, revision):
        asked.append((repo_id, revision))
        folder = tmp_path / "snap"
        folder.mkdir(exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"x" * 2000)
        return folder

    monkeypatch.setattr(weights, "_download", download)
    out, err = io.StringIO(), io.StringIO()
    assert embedding_fetch(SearchConfig(), out, err) == 0
    assert asked == [(SearchConfig().embedding_model, SearchConfig().embedding_revision)]
    assert out.getvalue() == (
        f"fetching the search embedding model {SearchConfig().embedding_model} at revision "
        f"{SearchConfig().embedding_revision} ...\n"
        f"  {tmp_path / 'snap'} (2.0 KB)\n"
        "ok: semantic search works offline now.\n"
    )
    # Off, or a local folder: nothing to fetch, nothing said.
    for cfg in (SearchConfig(embedding_model=None), SearchConfig(embedding_model=str(tmp_path))):
        out = io.StringIO()
        assert embedding_fetch(cfg, out, err) == 0 and out.getvalue() == ""

    def offline(repo_id, revision):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(weights, "_download", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(weights, "offline_mode", lambda: False)
    err = io.StringIO()
    assert embedding_fetch(SearchConfig(), io.StringIO(), err) == 2
    assert err.getvalue() == (
        "watcher: cannot download the embedding model: no connection "
        "(ConnectionError: no route to host)\n"
    )


@pytest.mark.slow
def test_watcher_search_borrows_the_running_daemons_model_and_loads_its_own_without_one(
    tmp_path, tiny_llava, minilm, monkeypatch
):
    from daemon_harness import Daemon, write_config

    from watcher import embedding
    from watcher.service import lifecycle

    watched = tmp_path / "watched"
    for i in range(3):
        distinct_image(i, watched / f"p{i}.jpg")
    folders = [{"path": str(watched), "settle_seconds": 0.2}]
    cfg_path = write_config(tmp_path, tiny_llava, folders, search={"embedding_model": str(minilm)})
    assert run_cli("--config", str(cfg_path), "caption", str(watched))[0] == 0
    db = load_config(cfg_path).database
    index = Index(connect(db))
    target = str(watched / "p1.jpg")
    query = index.get(target).caption  # random weights: its own caption is what it is like
    index.db.conn.close()

    def search(*mode: str) -> tuple[int, str, str]:
        return run_cli("--config", str(cfg_path), "search", query, *mode, "--json")

    # No daemon: the model is loaded here.
    local = {m: search("--mode", m) for m in ("semantic", "hybrid")}
    hit = json.loads(local["semantic"][1])[0]
    assert hit["path"] == target and hit["similarity"] == pytest.approx(1.0, abs=1e-3)

    def refuse(cls, *args, **kwargs):
        raise AssertionError("the model was loaded though a daemon runs with it")

    with Daemon(cfg_path, tmp_path) as d:
        d.wait_scanned()
        row = lifecycle.read(connect(db, readonly=True))
        assert row is not None and row.running and row.url and row.url.startswith("http://")
        # The daemon loads its query model on the first request: on a loaded machine that
        # can take longer than a search waits (it then loads its own, as it should). Warm it.
        import httpx

        def warm() -> bool:
            try:
                return httpx.get(
                    row.url + "api/query-vector", params={"q": "x"}, timeout=60, trust_env=False
                ).is_success
            except httpx.HTTPError:
                return False

        wait_for(warm, 180, "the daemon's query model")
        with monkeypatch.context() as m:
            m.setattr(embedding.Embedder, "load", classmethod(refuse))
            # The same hits, scores and exit code, from the daemon's vector for the query.
            for mode, expected in local.items():
                assert search("--mode", mode) == expected, mode
    after = lifecycle.read(connect(db, readonly=True))
    assert after is not None and not after.running and after.url is None
    # Stopped: loaded here again, same answer.
    assert search("--mode", "semantic") == local["semantic"]


def test_a_borrowed_query_vector_is_used_only_when_it_is_the_configured_models(
    tmp_path, minilm, minilm_embedder, monkeypatch
):
    import httpx

    from watcher.service import lifecycle
    from watcher.web.client import borrow_encoder

    index = make_index(tmp_path / "index.db", {"/p/a.jpg": "a red bicycle"}, minilm_embedder)
    cfg = Config(database=tmp_path / "index.db", search=SearchConfig(embedding_model=str(minilm)))
    mine = minilm_embedder.encode(["crimson bike"])
    answers: list = []
    asked: list = []

    def fake_get(url, **kwargs):
        asked.append(url)
        assert url == "http://127.0.0.1:9/api/query-vector" and kwargs["params"] == {
            "q": "crimson bike"
        }
        status, body = answers.pop(0)
        return httpx.Response(status, json=body, request=httpx.Request("GET", url))

    def borrow():
        return borrow_encoder(cfg, index, "crimson bike")

    # No daemon row yet: nothing is asked.
    monkeypatch.setattr(httpx, "get", fake_get)
    assert borrow() is None and not asked
    lifecycle.record_start(index.db, [], "http://127.0.0.1:9/")  # this process "runs"
    good = {"model": minilm_embedder.tag, "vector": mine.vectors[0].tolist()}
    answers[:] = [(200, good)]
    enc = borrow()
    assert enc is not None and enc.tag == minilm_embedder.tag
    assert np.array_equal(enc.encode(["crimson bike"]).vectors, mine.vectors)
    for status, body in [
        (200, {**good, "model": "another/model@main"}),  # the daemon runs another model
        (200, {**good, "vector": good["vector"][:100]}),  # not this index's length
        (200, {**good, "vector": [2 * x for x in good["vector"]]}),  # not unit length
        (503, {"error": "semantic search is unavailable here"}),
    ]:
        answers[:] = [(status, body)]
        assert borrow() is None, body
        assert not answers, "it was not asked"
    monkeypatch.undo()
    assert borrow() is None  # nothing listens on port 9: refused, loaded here
    lifecycle.record_stop(index.db, [])
    monkeypatch.setattr(httpx, "get", fake_get)
    before = len(asked)
    assert borrow() is None and len(asked) == before  # stopped: not even asked
    index.db.conn.close()
