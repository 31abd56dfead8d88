"""The background embedding of existing captions: complete, resumable, second to the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from daemon_harness import run_cli, wait_for
from test_semantic import make_index

from watcher.config import Config, SearchConfig
from watcher.embedding import model_tag
from watcher.index import Index, connect, transaction
from watcher.jobs import JobQueue
from watcher.pipeline.backfill import BATCH, Backfill, read_progress

N = 2 * BATCH + 7  # three batches, the last one short


def captions(n: int) -> dict[str, str]:
    things = ["a red bicycle", "a sleeping cat", "a bowl of soup", "a snowy mountain"]
    return {f"/p/{i:03}.jpg": f"{things[i % 4]} number {i}" for i in range(n)}


def state(index: Index) -> str | None:
    p = read_progress(index)
    return p.state if p else None


def run_backfill(cfg: Config, until) -> Backfill:
    backfill = Backfill(cfg)
    backfill.start()
    try:
        wait_for(until, timeout=180, what="the backfill")
    finally:
        backfill.stop()
    return backfill


def test_backfill_embeds_every_caption_and_resumes_where_it_stopped(tmp_path, minilm):
    db = tmp_path / "index.db"
    index = make_index(db, captions(N))
    cfg = Config(database=db, search=SearchConfig(embedding_model=str(minilm)))
    # Stopped (as by a daemon stop) once the first batch is in.
    first = run_backfill(cfg, lambda: index.vector_count() >= BATCH)
    done_before = index.vector_count()
    assert BATCH <= done_before < N and first.embedded == done_before
    kept = dict(index.db.conn.execute("SELECT image_id, q FROM image_vectors"))
    # The next start embeds only what is left, and leaves the rest as it was.
    second = run_backfill(cfg, lambda: state(index) == "done")
    assert index.vector_count() == N and second.embedded == N - done_before
    assert index.missing_vectors(0, 10) == []
    now = dict(index.db.conn.execute("SELECT image_id, q FROM image_vectors"))
    assert {i: now[i] for i in kept} == kept
    assert index.vector_model() == model_tag(cfg.search)
    index.db.conn.close()


def test_backfill_waits_while_images_are_being_captioned(tmp_path, minilm):
    db = tmp_path / "index.db"
    index = make_index(db, captions(5))
    JobQueue(index.db).enqueue_many([(Path("/p/new.jpg"), Path("/p"))])
    cfg = Config(database=db, search=SearchConfig(embedding_model=str(minilm)))
    backfill = Backfill(cfg)
    backfill.start()
    try:
        wait_for(lambda: state(index) == "paused", timeout=120, what="the backfill to pause")
        assert index.vector_count() == 0
        code, out, _ = run_cli("--db", str(db), "status", "--json")
        assert json.loads(out)["semantic"] == {
            "model": model_tag(cfg.search),
            "embedded": 0,
            "images": 5,
            "backfill": "paused",
            "rate": 0.0,
            "reason": None,
        }
        with transaction(index.db):  # the pipeline is done with it
            index.db.conn.execute("UPDATE jobs SET state = 'done'")
        wait_for(lambda: state(index) == "done", timeout=120, what="the backfill to finish")
    finally:
        backfill.stop()
    assert index.vector_count() == 5
    code, out, _ = run_cli("--db", str(db), "status")
    assert f"semantic search: 5 of 5 captions embedded ({model_tag(cfg.search)})" in out
    index.db.conn.close()


def test_alongside_a_gpu_model_the_backfill_does_not_wait_for_the_queue(tmp_path, minilm):
    """A vision model that is not on this CPU (a GPU, a server) leaves the CPU free: the
    backfill embeds while images are still queued, and a poke makes it look again at once."""
    db = tmp_path / "index.db"
    index = make_index(db, captions(5))
    JobQueue(index.db).enqueue_many([(Path("/p/new.jpg"), Path("/p"))])  # stays pending
    cfg = Config(database=db, search=SearchConfig(embedding_model=str(minilm)))
    backfill = Backfill(cfg, yield_to_pipeline=False)
    backfill.start()
    try:
        # Its state is written after the batch it follows: wait for it too (CI once read
        # "loading" between the last batch's commit and the report).
        wait_for(lambda: index.vector_count() == 5, timeout=120, what="the backfill")
        wait_for(lambda: state(index) == "done", timeout=30, what="the backfill to say done")
        # A caption the writer left without its vector: found on the poke, not in 10 min.
        make_index(db, {"/p/late.jpg": "a lighthouse on a rocky cliff"}).db.conn.close()
        backfill.poke()
        wait_for(lambda: index.vector_count() == 6, timeout=60, what="the poked backfill")
    finally:
        backfill.stop()
    index.db.conn.close()


def test_backfill_without_the_model_says_why_in_status(tmp_path):
    db = tmp_path / "index.db"
    index = make_index(db, captions(3))
    missing = tmp_path / "no-model"
    cfg = Config(database=db, search=SearchConfig(embedding_model=str(missing)))
    run_backfill(cfg, lambda: state(index) == "off")
    report = json.loads(run_cli("--db", str(db), "status", "--json")[1])["semantic"]
    assert report["backfill"] == "off" and report["embedded"] == 0
    assert report["reason"] == (
        f"search.embedding_model: {missing} is not a model folder (no config.json)"
    )
    index.db.conn.close()


@pytest.mark.slow
def test_the_daemon_embeds_old_captions_at_start_and_new_ones_as_it_writes(
    tmp_path, tiny_llava, minilm
):
    from daemon_harness import Daemon, write_config
    from images import distinct_image

    from watcher.config import load_config

    watched = tmp_path / "watched"
    for i in range(3):
        distinct_image(i, watched / f"old{i}.jpg")
    folders = [{"path": str(watched), "settle_seconds": 0.2}]
    # Captioned before semantic search: rows without vectors.
    off = write_config(
        tmp_path, tiny_llava, folders, name="off.yaml", search={"embedding_model": None}
    )
    assert run_cli("--config", str(off), "caption", str(watched))[0] == 0
    cfg_path = write_config(tmp_path, tiny_llava, folders, search={"embedding_model": str(minilm)})
    cfg = load_config(cfg_path)
    index = Index(connect(cfg.database))
    assert index.count() == 3 and index.vector_count() == 0
    with Daemon(cfg_path, tmp_path) as d:
        wait_for(lambda: index.vector_count() == 3, timeout=180, what="the backfill")
        distinct_image(7, watched / "new.jpg")
        wait_for(lambda: d.captioned(watched / "new.jpg"), timeout=120, what="the new image")
        # The writer stored its vector with its row.
        new = index.rowid_of(str(watched / "new.jpg"))
        assert index.vectors_of([new])
        wait_for(lambda: state(index) == "done", timeout=120, what="the backfill to finish")
        out = run_cli("--config", str(cfg_path), "status")[1]
        assert f"semantic search: 4 of 4 captions embedded ({model_tag(cfg.search)})" in out
    index.db.conn.close()


def test_under_a_burst_on_a_cpu_model_the_vectors_follow_once_the_queue_is_empty(
    tmp_path, tiny_llava, minilm
):
    """The vision model on this CPU comes first: while more images wait for it, the writer
    writes captions without their vectors and the backfill embeds them once the queue is
    empty; the last batch (nothing after it) is embedded with its captions."""
    from daemon_harness import Daemon, write_config
    from images import distinct_image

    from watcher.config import load_config

    watched = tmp_path / "watched"
    n = 12  # batches of at most 8: at least one written while others wait
    images = [distinct_image(i, watched / f"{i:02}.jpg") for i in range(n)]
    folders = [{"path": str(watched), "settle_seconds": 0.2}]
    cfg_path = write_config(tmp_path, tiny_llava, folders, search={"embedding_model": str(minilm)})
    cfg = load_config(cfg_path)
    with Daemon(cfg_path, tmp_path) as d:
        wait_for(lambda: all(d.captioned(p) for p in images), timeout=180, what="the captions")
        index = Index(connect(cfg.database))
        wait_for(lambda: index.vector_count() == n, timeout=180, what="every vector")
        # Some were embedded by the backfill after the burst, not by the writer.
        wait_for(
            lambda: any(e.get("embedded", 0) > 0 for e in d.logged("all captions embedded")),
            timeout=60,
            what="the backfill's report",
        )
        rowids = [index.rowid_of(str(p)) for p in images]
        assert len(index.vectors_of([r for r in rowids if r is not None])) == n
        index.db.conn.close()


def test_the_device_a_vision_model_computes_on_decides_whether_embedding_waits():
    """CPU: the embedder would compete with the vision model; a GPU or a remote server: not."""
    from types import SimpleNamespace as NS

    import torch

    from watcher.backends import device_of, runs_on_cpu
    from watcher.backends.device import Placement

    assert runs_on_cpu(NS(placement=Placement("cpu", torch.float32)))
    assert not runs_on_cpu(NS(placement=Placement("cuda:0", torch.bfloat16)))
    assert device_of(NS(placement="mps float16")) == "mps"
    assert runs_on_cpu(NS(device="cpu"))  # the model process says where its model is
    assert device_of(NS()) is None and not runs_on_cpu(NS())  # backend openai: elsewhere


def test_watcher_caption_writes_a_bursts_captions_first_and_waits_for_their_vectors(
    tmp_path, tiny_llava, minilm
):
    """On a CPU vision model the embedder would hold it back (a caption costs it more than
    the tiny model's own time): `watcher caption` writes a burst's captions without their
    vectors, embeds them once the captions are done, and exits only when every one is in.
    It embeds its own captions only: older rows without vectors are the daemon's backfill's."""
    from daemon_harness import cli_config
    from images import distinct_image

    old, new = tmp_path / "old", tmp_path / "new"
    for i in range(3):
        distinct_image(i, old / f"{i}.jpg")
    images = [distinct_image(10 + i, new / f"{i:02}.jpg") for i in range(12)]
    logs = {"level": "info", "format": "json"}
    off = cli_config(tmp_path, tiny_llava, search={"embedding_model": None}, log=logs)
    assert run_cli("--config", str(off), "caption", str(old))[0] == 0
    on = cli_config(tmp_path, tiny_llava, search={"embedding_model": str(minilm)}, log=logs)
    code, out, err = run_cli("--config", str(on), "caption", str(new))
    assert code == 0, err
    assert "12 new, 0 up to date, 0 failed" in out
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    # Batches of 4 with 12 claimed at once: every batch was written while others waited.
    assert [e for e in events if e["event"] == "captioned"]
    after = [e for e in events if e["event"] == "search vectors embedded after the captions"]
    assert [e["captions"] for e in after] == [12]
    last_caption = max(i for i, e in enumerate(events) if e["event"] == "captioned")
    assert events.index(after[0]) > last_caption
    index = Index(connect(tmp_path / "index.db"))
    rowids = [index.rowid_of(str(p)) for p in images]
    assert len(index.vectors_of([r for r in rowids if r is not None])) == 12
    assert index.vector_count() == 12  # the three older rows are left to the daemon
    assert read_progress(index) is None  # `watcher status` reports the daemon's backfill only
    index.db.conn.close()


def test_a_burst_leaves_every_batch_to_the_backfill_and_a_lone_batch_embeds_inline(tmp_path):
    """The writer's question, batch by batch: a batch written while others are in flight,
    and the rest of that burst (its last batch too), leave their vectors for later; once
    nothing is in flight, the next lone batch is embedded with its captions."""
    from types import SimpleNamespace as NS

    from watcher.pipeline.stages import Pipeline

    p = Pipeline(Config(database=tmp_path / "index.db"), NS(max_batch=4), defer_embedding=True)
    p._in_flight = 10  # a burst of 10 in batches of 4, 4, 2
    assert p._embed_now(4) is False
    for _ in range(4):
        p._job_end()
    assert p._embed_now(4) is False
    for _ in range(4):
        p._job_end()
    assert p.in_flight == 2
    assert p._embed_now(2) is False  # the last batch: nothing after it, but part of the burst
    for _ in range(2):
        p._job_end()
    p._in_flight = 1  # later, one image alone
    assert p._embed_now(1) is True


def test_the_vision_model_and_the_embedder_load_in_two_threads_at_once(tiny_llava, minilm):
    """`watcher caption` loads the vision model in its worker while the embedder may load in
    another thread: transformers' loading is not thread-safe (a model came out with meta
    tensors), so loads take turns, and both models work."""
    import threading

    from images import distinct_pil

    from watcher.backends import load_backend
    from watcher.config import ModelConfig
    from watcher.embedding import Embedder
    from watcher.tasks import Task

    start = threading.Barrier(2)
    got: dict = {}

    def load(name, fn):
        start.wait()
        try:
            got[name] = fn()
        except Exception as e:
            got[name] = e

    cfg = ModelConfig(backend="transformers", path=tiny_llava, max_tokens=4, isolate=False)
    threads = [
        threading.Thread(target=load, args=("vision", lambda: load_backend(cfg))),
        threading.Thread(
            target=load,
            args=("embedder", lambda: Embedder.load(SearchConfig(embedding_model=str(minilm)))),
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not isinstance(got["vision"], Exception), got["vision"]
    assert not isinstance(got["embedder"], Exception), got["embedder"]
    assert got["vision"].describe([distinct_pil(1, (96, 72))], [Task("short")])[0][0]
    assert got["embedder"].encode(["a red bicycle"]).vectors.shape == (1, 384)


def test_a_scoped_backfill_embeds_only_what_it_was_handed_and_drains_on_the_threads_given(
    tmp_path, minilm, monkeypatch
):
    """`watcher caption`'s backfill: the paths the writer handed it, none of the index's other
    rows without vectors; nothing while the pipeline is busy; on `drain` the rest, on the
    torch threads given (set in its own thread: torch keeps the number per thread)."""
    import torch

    from watcher.embedding import Embedder

    db = tmp_path / "index.db"
    rows = captions(40)
    index = make_index(db, rows)
    cfg = Config(database=db, search=SearchConfig(embedding_model=str(minilm)))
    threads_seen: list[tuple[int, int]] = []
    real = Embedder.encode

    def spy(self, texts):
        threads_seen.append((len(texts), torch.get_num_threads()))
        return real(self, texts)

    monkeypatch.setattr(Embedder, "encode", spy)
    backfill = Backfill(cfg, scoped=True, busy=lambda: not backfill._closing.is_set())
    backfill.start()
    handed = list(rows)[:36]
    backfill.poke(handed[:20])
    backfill.poke(handed[20:])
    wait_for(lambda: threads_seen, timeout=60, what="the embedder's first use")  # the probe
    assert index.vector_count() == 0  # busy: it waits
    assert backfill.drain(threads=2) == 36
    assert not backfill.is_alive()
    got = index.vectors_of([r for r in (index.rowid_of(p) for p in handed) if r is not None])
    assert len(got) == 36 and index.vector_count() == 36
    batches = [(n, t) for n, t in threads_seen if n > 1]
    assert sum(n for n, _ in batches) == 36 and {t for _, t in batches} == {2}
    assert read_progress(index) is None
    index.db.conn.close()


def test_a_full_disk_does_not_hold_watcher_caption_at_its_exit(tmp_path, minilm, monkeypatch):
    """The scoped backfill cannot store vectors (disk full): `drain` still returns, the
    captions stay (without vectors, for the daemon's backfill), and nothing is retried forever."""
    import sqlite3

    db = tmp_path / "index.db"
    rows = captions(5)
    index = make_index(db, rows)
    cfg = Config(database=db, search=SearchConfig(embedding_model=str(minilm)))

    def full(self, items):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Index, "put_vectors", full)
    backfill = Backfill(cfg, scoped=True, busy=lambda: False)
    backfill.start()
    backfill.poke(list(rows))
    assert backfill.drain() == 0
    assert not backfill.is_alive()
    assert index.vector_count() == 0 and index.count() == 5
    index.db.conn.close()
