"""The sign bits a searching process holds in memory follow what the daemon writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rows import image_row
from test_semantic import CAPTIONS, make_index

import watcher.index
import watcher.search
from watcher.bitmatrix import BitMatrix, matrix_for
from watcher.index import Index, open_index, transaction
from watcher.search import search


def held(reader: Index) -> list[int]:
    """The rowids whose bits the reader's process holds, after catching up."""
    m = matrix_for(reader)
    with m.lock:
        m.refresh(reader)
        return sorted(m.ids[: m.n].tolist())


def stored(index: Index) -> list[int]:
    return [i for (i,) in index.db.conn.execute("SELECT image_id FROM image_vectors ORDER BY 1")]


def semantic(reader: Index, query: str, embedder, **kw) -> list[str]:
    result = search(reader, query, mode="semantic", embedder=embedder, **kw)
    assert result.mode == "semantic" and result.note is None
    return [h.row.path for h in result.hits]


def write(writer: Index, embedder, rows: dict[str, str]) -> None:
    """What the daemon's writer does: the rows and their caption vectors, one transaction."""
    with transaction(writer.db):
        made = []
        for path, caption in rows.items():
            writer.upsert(image_row(path, caption))
            made.append(writer.get(path))
        writer.put_caption_vectors(embedder.encode([r.caption for r in made if r]), made)


def test_a_long_lived_searcher_sees_new_recaptioned_and_deleted_images(
    tmp_path: Path, minilm_embedder
):
    db = tmp_path / "index.db"
    writer = make_index(db, CAPTIONS, minilm_embedder)
    reader = open_index(db)  # the web server's connection: opened once, kept
    assert (
        semantic(reader, "japanese noodle soup with an egg", minilm_embedder)[0] == "/a/ramen.jpg"
    )
    loads = matrix_for(reader).loads

    write(writer, minilm_embedder, {"/c/sushi.jpg": "Sushi rolls and chopsticks on a tray."})
    assert semantic(reader, "raw fish with rice", minilm_embedder)[0] == "/c/sushi.jpg"

    # The bike's sidecar edited: the old vector goes at once, the new one comes with it.
    write(writer, minilm_embedder, {"/a/bike.jpg": "A sailboat on a calm lake at dawn."})
    assert semantic(reader, "a boat on the water", minilm_embedder)[0] == "/a/bike.jpg"
    assert "/a/bike.jpg" not in semantic(reader, "red bicycle", minilm_embedder)[:1]

    with transaction(writer.db):
        writer.delete("/b/moto.jpg")
    assert "/b/moto.jpg" not in semantic(reader, "motorbike", minilm_embedder)
    assert held(reader) == stored(writer) and len(stored(writer)) == len(CAPTIONS)
    # All of it from the change log, without loading every vector again.
    assert matrix_for(reader).loads == loads
    reader.db.conn.close()
    writer.db.conn.close()


def test_a_model_change_or_a_pruned_log_makes_the_searcher_reload(
    tmp_path: Path, minilm_embedder, monkeypatch
):
    db = tmp_path / "index.db"
    writer = make_index(db, CAPTIONS, minilm_embedder)
    reader = open_index(db)
    assert held(reader) == stored(writer)
    m = matrix_for(reader)
    loads = m.loads

    monkeypatch.setattr(watcher.index, "CHANGES_KEPT", 2)
    for n in range(4):  # more changes than the log keeps, while the reader looks away
        write(writer, minilm_embedder, {f"/d/{n}.jpg": f"A kite number {n} in the sky."})
    assert held(reader) == stored(writer) and m.loads == loads + 1
    assert semantic(reader, "a kite flying", minilm_embedder)[0].startswith("/d/")
    assert held(reader) == stored(writer) and m.loads == loads + 1  # caught up: no reload

    rng = np.random.default_rng(1)
    with transaction(writer.db):
        writer.use_vector_model("someone/other-model@1", 384)
        ids = stored(writer)  # none: the other model's vectors went
        rows = [writer.rowid_of(p) for p in CAPTIONS]
        vecs = rng.normal(size=(len(rows), 384)).astype(np.float32)
        writer.put_vectors([(r, v / np.linalg.norm(v)) for r, v in zip(rows, vecs, strict=True)])
    assert ids == []
    assert held(reader) == sorted(rows) and m.loads == loads + 2
    assert m.model == "someone/other-model@1"
    # What the user sees: the configured model no longer matches the index's vectors.
    result = search(reader, "bicycle", mode="semantic", embedder=minilm_embedder)
    assert result.mode == "text" and "someone/other-model@1" in (result.note or "")
    reader.db.conn.close()
    writer.db.conn.close()


def test_filters_and_like_narrow_the_candidates_from_memory(
    tmp_path: Path, minilm_embedder, monkeypatch
):
    db = tmp_path / "index.db"
    writer = make_index(db, CAPTIONS, minilm_embedder)
    reader = open_index(db)
    # Every filter through the in-memory candidates, not the exact path for small ones.
    monkeypatch.setattr(watcher.search, "EXACT_BELOW", 0)
    under_b = semantic(reader, "noodles", minilm_embedder, folder="/b")
    assert under_b and all(p.startswith("/b/") for p in under_b)
    assert semantic(reader, "japanese noodle soup with an egg", minilm_embedder, task="long") == [
        "/a/ramen.jpg"
    ]
    write(writer, minilm_embedder, {"/b/udon.jpg": "A bowl of udon noodles in broth."})
    like = search(reader, None, like="/a/ramen.jpg", folder="/b")
    assert like.hits[0].row.path == "/b/udon.jpg"
    assert all(h.row.path.startswith("/b/") for h in like.hits)
    reader.db.conn.close()
    writer.db.conn.close()


@pytest.mark.parametrize("k", [1, 37, 500])
def test_the_candidates_are_the_hamming_nearest(k: int):
    rng = np.random.default_rng(k)
    vecs = rng.normal(size=(3000, 384)).astype(np.float32)
    m = BitMatrix()
    rowids = rng.choice(10_000, size=len(vecs), replace=False) + 1
    q8 = np.clip(np.rint(vecs * 40), -127, 127).astype(np.int8)
    for r, q in zip(rowids, q8, strict=True):
        m._put(int(r), q.tobytes())
    for r in rowids[:100]:  # removals keep the rest addressable
        m._remove(int(r))
    live, signs = rowids[100:], q8[100:] > 0
    query = rng.normal(size=384).astype(np.float32)
    dist = (signs != (query > 0)).sum(axis=1)
    got = m.nearest(query, k)
    assert len(got) == len(set(got)) == k and set(got) <= set(live.tolist())
    worst = max(dist[live.tolist().index(r)] for r in got)
    assert set(live[dist < worst].tolist()) <= set(got)
