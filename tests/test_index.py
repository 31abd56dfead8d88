"""The index: rows, full-text search ranking, schema version, prefix queries."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from rows import image_row

from watcher.index import SCHEMA_VERSION, ImageRow, Index, connect, transaction


def _row(path: str, caption: str, **kw) -> ImageRow:
    now = time.time()
    fields = dict(root="/r", width=1, height=1, created=now, updated=now, model_caption=None)
    return image_row(path, caption, **{**fields, **kw})


def test_search_ranks_best_match_first(tmp_path: Path) -> None:
    ix = Index(connect(tmp_path / "i.db"))
    with transaction(ix.db):
        ix.upsert(_row("/r/a.jpg", "a dog on a beach under a grey sky, waves"))
        ix.upsert(_row("/r/b.jpg", "red bicycle, red bicycle leaning on a red wall"))
        ix.upsert(_row("/r/c.jpg", "a bicycle shop window with many wheels and a red door"))
    hits = [r.path for r, _ in ix.search("red bicycle")]
    assert hits == ["/r/b.jpg", "/r/c.jpg"]
    assert [r.path for r, _ in ix.search("bicycles")] == ["/r/b.jpg", "/r/c.jpg"]  # porter
    assert ix.search("dog") and ix.search("dog")[0][0].path == "/r/a.jpg"
    assert ix.search("elephant") == []


def test_search_survives_fts_syntax_in_the_query(tmp_path: Path) -> None:
    ix = Index(connect(tmp_path / "i.db"))
    with transaction(ix.db):
        ix.upsert(_row("/r/a.jpg", "a cat"))
        ix.upsert(_row("/r/b.jpg", "cats and dogs, or not"))
        ix.upsert(_row("/r/c.jpg", "a category error"))
    # Operators and punctuation are the user's words, never FTS5 syntax: no
    # sqlite3.OperationalError, "*" is no prefix search, "-" excludes nothing, AND/OR/NOT
    # are looked for as words.
    for q, found in [
        ('"unbalanced', []),
        ('"cat', ["/r/a.jpg", "/r/b.jpg"]),
        ("AND OR NOT", ["/r/b.jpg"]),
        ("cat*", ["/r/a.jpg", "/r/b.jpg"]),
        ("cat -dog", ["/r/b.jpg"]),
        ("^cat", ["/r/a.jpg", "/r/b.jpg"]),
        ("(", []),
        ("NEAR(cat dog)", []),
        ("col:cat", []),
        ("", []),
    ]:
        assert sorted(r.path for r, _ in ix.search(q)) == found, q


def test_fts_follows_updates_and_deletes(tmp_path: Path) -> None:
    ix = Index(connect(tmp_path / "i.db"))
    with transaction(ix.db):
        ix.upsert(_row("/r/a.jpg", "a cat"))
    with transaction(ix.db):
        ix.upsert(_row("/r/a.jpg", "a horse"))
    assert ix.search("cat") == [] and len(ix.search("horse")) == 1
    with transaction(ix.db):
        ix.move("/r/a.jpg", "/r/b.jpg", None)
    assert ix.search("horse")[0][0].path == "/r/b.jpg"
    with transaction(ix.db):
        ix.delete("/r/b.jpg")
    assert ix.search("horse") == []


def test_index_only_outputs_are_searchable(tmp_path: Path) -> None:
    ix = Index(connect(tmp_path / "i.db"))
    with transaction(ix.db):
        ix.upsert(
            _row(
                "/r/a.jpg",
                "masterpiece, portrait, oil",
                outputs={"prompt": "masterpiece, portrait, oil", "short": "a woman in a blue hat"},
            )
        )
    assert ix.search("hat")[0][0].path == "/r/a.jpg"


def test_schema_version_and_wal(tmp_path: Path) -> None:
    connect(tmp_path / "i.db").conn.close()
    con = sqlite3.connect(tmp_path / "i.db")
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    con.commit()
    with pytest.raises(RuntimeError, match="newer than this watcher"):
        connect(tmp_path / "i.db")


def test_stats_under_is_exactly_the_subtree(tmp_path: Path) -> None:
    ix = Index(connect(tmp_path / "i.db"))
    with transaction(ix.db):
        for p in ("/r/a/1.jpg", "/r/a/sub/2.jpg", "/r/ab/3.jpg", "/r/a.jpg"):
            ix.upsert(_row(p, "x"))
    assert sorted(ix.stats_under("/r/a")) == ["/r/a/1.jpg", "/r/a/sub/2.jpg"]
