"""Retrieval quality of text, semantic and hybrid search on a fixed test set, real weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_semantic import make_index

from watcher.search import search

DATA = Path(__file__).parent / "data" / "search_quality.json"


def load_set() -> dict:
    return json.loads(DATA.read_text(encoding="utf-8"))


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def measure(index, embedder, queries: list[dict], mode: str) -> tuple[float, float]:
    """(recall@5, mean reciprocal rank within the first 20) of `mode` over `queries`."""
    found, rr = 0, 0.0
    for q in queries:
        hits = [h.row.path for h in search(index, q["q"], mode=mode, embedder=embedder).hits]
        target = f"/photos/{q['target']}.jpg"
        found += target in hits[:5]
        rr += 1 / (hits.index(target) + 1) if target in hits else 0.0
    return found / len(queries), rr / len(queries)


def test_the_test_set_is_what_it_claims():
    data = load_set()
    assert len(data["captions"]) >= 60 and len(data["queries"]) >= 30
    paraphrases = [q for q in data["queries"] if q["kind"] == "paraphrase"]
    assert len(paraphrases) * 3 >= len(data["queries"])
    for q in data["queries"]:
        caption = words(data["captions"][q["target"]])
        if q["kind"] == "paraphrase":
            assert not words(q["q"]) & caption, q  # not one word in common
        elif q["kind"] == "exact":
            assert words(q["q"]) <= caption, q


@pytest.fixture(scope="module")
def quality_index(tmp_path_factory, minilm_embedder):
    data = load_set()
    db = tmp_path_factory.mktemp("quality") / "index.db"
    rows = {f"/photos/{k}.jpg": c for k, c in data["captions"].items()}
    index = make_index(db, rows, minilm_embedder)
    yield index
    index.db.conn.close()


def test_hybrid_beats_text_and_does_not_lose_on_exact_words(quality_index, minilm_embedder):
    data = load_set()
    queries = data["queries"]
    exact = [q for q in queries if q["kind"] == "exact"]
    text = measure(quality_index, minilm_embedder, queries, "text")
    hybrid = measure(quality_index, minilm_embedder, queries, "hybrid")
    semantic = measure(quality_index, minilm_embedder, queries, "semantic")
    assert hybrid[0] > text[0], (text, hybrid, semantic)
    assert hybrid[1] > text[1], (text, hybrid, semantic)
    # Where the words are there, fusing in meaning costs nothing.
    text_exact = measure(quality_index, minilm_embedder, exact, "text")
    hybrid_exact = measure(quality_index, minilm_embedder, exact, "hybrid")
    assert hybrid_exact[0] >= text_exact[0], (text_exact, hybrid_exact)
    assert hybrid_exact[1] >= text_exact[1], (text_exact, hybrid_exact)
