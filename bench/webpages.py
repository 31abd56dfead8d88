"""Web pages: library page and search response times (server time) on a large synthetic index,
page 1 against page 500 (keyset pagination: a deep page should cost what the first does)."""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path

from bench import log
from bench.checks import BenchFailure
from bench.report import Result, pct, table
from watcher.paths import encode

GOAL_MS = 150.0
REPEAT = 40
_WORDS = (
    "red blue green yellow black white grey orange purple brown dog cat horse bird bicycle car "
    "boat train house tree river mountain beach sky cloud sun snow rain street city field "
    "forest window door table chair woman man child girl boy smiling standing sitting walking "
    "running holding wearing hat coat dress shirt glasses flowers garden kitchen portrait "
    "night morning evening light shadow reflection water stone wooden metal old new small large"
).split()


def build_index(db_path: Path, roots: list[Path], n: int, seed: int = 7) -> None:
    """`n` image rows spread over `roots` (no files: the listing reads only the index), with
    captions drawn from a small vocabulary so searches match thousands of rows, 2% of them
    hand-edited, mtimes spread over a year."""
    from watcher.index import ImageRow, connect, transaction

    rnd = random.Random(seed)
    db = connect(db_path)
    cols = [f.name for f in dataclasses.fields(ImageRow)]
    sql = f"INSERT INTO images ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
    now = time.time()
    rows = []
    for i in range(n):
        root = roots[i % len(roots)]
        caption = " ".join(rnd.choice(_WORDS) for _ in range(10))
        edited = rnd.random() < 0.02
        path = root / f"d{i // 1000:03d}" / f"img{i:07d}.jpg"
        rows.append(
            ImageRow(
                path=str(path),
                root=str(root),
                sha256=f"{i:064x}",
                size=1000 + i,
                mtime_ns=int((now - rnd.random() * 365 * 86400) * 1e9),
                width=640,
                height=480,
                caption=caption,
                task="short",
                outputs={"short": caption},
                model="bench",
                revision=None,
                sidecar=str(path.with_suffix(".txt")),
                sidecar_sha256=None if edited else f"{i:064x}",
                sidecar_state="kept" if edited else "written",
                sidecar_error="edited by you; not overwritten" if edited else None,
                created=now,
                updated=now,
                model_caption=caption,
            ).to_row()
        )
        if len(rows) == 10_000:
            with transaction(db):
                db.conn.executemany(sql, rows)
            rows = []
    with transaction(db):
        db.conn.executemany(sql, rows)
        db.conn.executemany(
            "INSERT INTO jobs (path, root, state, gen, attempts, error, next_try, enqueued, "
            "updated) VALUES (?, ?, 'failed', 0, 5, 'truncated or corrupt image', 0, ?, ?)",
            [(encode(roots[0] / f"bad{i}.jpg"), encode(roots[0]), now, now) for i in range(500)],
        )
    db.conn.execute("ANALYZE")
    db.conn.close()


def run(args: argparse.Namespace, work: Path) -> Result:
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from watcher.config import Config, FolderConfig
    from watcher.web.context import WebContext
    from watcher.web.pages import routes

    n = args.web_images
    base = work / "webpages"
    base.mkdir(parents=True, exist_ok=True)
    db_path = base / "index.db"
    roots = [base / "photos", base / "scans"]
    t0 = time.perf_counter()
    if not db_path.exists():
        build_index(db_path, roots, n)
    log(f"webpages: {n:,} rows in {time.perf_counter() - t0:.1f} s")
    cfg = Config(folders=tuple(FolderConfig(path=r) for r in roots), database=db_path)
    served: list[float] = []

    class Timed:
        """Server time: from the request reaching the app to the last byte of its answer."""

        def __init__(self, app: Starlette) -> None:
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            start = time.perf_counter()
            await self.app(scope, receive, send)
            served.append((time.perf_counter() - start) * 1000)

    app = Timed(Starlette(routes=routes(WebContext(cfg, db_path, None))))
    client = TestClient(app)

    def timed(url: str, params: dict[str, str]) -> tuple[list[float], str]:
        times = []
        text = ""
        for _ in range(REPEAT):
            r = client.get(url, params=params)
            if r.status_code != 200:
                raise BenchFailure(f"{url} {params}: HTTP {r.status_code}: {r.text[:200]}")
            text = r.text
            times.append(served[-1])
        return times, text

    def cursor_of(page: int, params: dict[str, str]) -> str:
        """The cursor of page `page`, walking from page 1 as a user clicking Next would."""
        cursor = ""
        for _ in range(page - 1):
            j = client.get("/api/images", params={**params, "cursor": cursor}).json()
            if not j.get("next"):
                raise BenchFailure(f"fewer than {page} pages for {params}")
            cursor = j["next"]
        return cursor

    deep = 500 if n >= 60 * 500 else max(2, n // 60 // 2)
    cases: list[tuple[str, str, dict[str, str]]] = []
    cases.append(("library page 1", "/", {}))
    cases.append((f"library page {deep}", "/", {"cursor": cursor_of(deep, {})}))
    cases.append(("folder filter, page 1", "/", {"folder": "1"}))
    f_deep = max(2, deep // 2)
    cases.append(
        (
            f"folder filter, page {f_deep}",
            "/",
            {"folder": "1", "cursor": cursor_of(f_deep, {"folder": "1"})},
        )
    )
    cases.append(("hand-edited filter, page 1", "/", {"state": "hand-edited"}))
    cases.append(("failed filter, page 1", "/", {"state": "failed"}))
    cases.append(("search, a common word", "/", {"q": "red"}))
    cases.append(("search, two words", "/", {"q": "red bicycle"}))
    cases.append(("search, a rare pair", "/", {"q": "snow kitchen portrait"}))
    cases.append(("search, page 5", "/", {"q": "dog", "cursor": _search_cursor(4 * 60)}))
    cases.append(("/api/images page 1 (JSON)", "/api/images", {}))
    rows = []
    data: dict[str, dict[str, float]] = {}
    for name, url, params in cases:
        times, text = timed(url, params)
        if url == "/" and 'class="tile' not in text:
            raise BenchFailure(f"{name}: the page lists no image")
        p50, p95 = pct(times, 50), pct(times, 95)
        data[name] = {"p50_ms": round(p50, 2), "p95_ms": round(p95, 2)}
        rows.append((name, f"{p50:.1f}", f"{p95:.1f}", "yes" if p95 < GOAL_MS else "NO"))
        log(f"webpages: {name}: p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    first, last = data["library page 1"]["p95_ms"], data[f"library page {deep}"]["p95_ms"]
    lines = [
        f"Library and search on a synthetic index of {n:,} images (2 folders, 2% hand-edited, "
        f"500 failed jobs), 60 per page; server time of {REPEAT} requests each "
        "(Starlette test client, in-process, the pages' own routes; no thumbnails).",
        "",
        *table(["request", "p50 ms", "p95 ms", f"p95 < {GOAL_MS:.0f} ms"], rows),
        "",
        f"Page {deep} / page 1 (p95): {last / first:.2f}.",
    ]
    return Result("webpages", lines, {"images": n, "deep_page": deep, "cases": data})


def _search_cursor(offset: int) -> str:
    import base64
    import json

    raw = json.dumps({"o": offset}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
