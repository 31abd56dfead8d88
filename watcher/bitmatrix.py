"""The caption vectors' sign bits held in memory, caught up from the index's change log."""

from __future__ import annotations

import sqlite3
import threading
from typing import TYPE_CHECKING

from watcher.index import Index

if TYPE_CHECKING:
    import numpy as np

# Rows scanned at a time: 128k x 8 bytes of scratch, in a core's L2 cache.
SCAN_BLOCK = 131_072
# Rows read per query when loading every vector (bounds the bytes held at once: 50k x 384).
LOAD_CHUNK = 50_000


class BitMatrix:
    """Every stored vector's sign bits as uint64 columns (48 bytes an image at 384 dims), and
    the change-log position they reflect. A search first catches up on the log (the vectors
    added, replaced or removed since), so a long-lived process (the web server) sees what the
    daemon writes without a restart; a pruned log or another model means a full reload.
    Methods are thread-safe (one lock: a scan of a million rows takes some 20 ms)."""

    def __init__(self) -> None:
        import numpy as np

        self.lock = threading.Lock()
        self.model: str | None = None
        self.pos = -1  # last change-log seq applied; -1: never loaded
        self.n = 0
        self.words = 0
        self.ids = np.zeros(0, dtype=np.int64)
        self.cols = np.zeros((0, 0), dtype=np.uint64)
        self.slot_of = np.full(0, -1, dtype=np.int64)  # rowid -> slot (-1: none)
        self.loads = 0  # full loads so far (tests and the bench read it)
        self.load_s = 0.0  # seconds the last full load took

    # -- keeping up with the index ---------------------------------------------------------

    def refresh(self, index: Index) -> None:
        """Catch up with the index, in one read transaction (one consistent snapshot)."""
        conn = index.db.conn
        own = not conn.in_transaction
        if own:
            conn.execute("BEGIN")
        try:
            self._refresh(conn)
        finally:
            if own:
                conn.execute("COMMIT")

    def _refresh(self, conn: sqlite3.Connection) -> None:
        meta = dict(
            conn.execute(
                "SELECT key, value FROM meta WHERE key IN "
                "('embedding_model', 'vector_changes_pruned')"
            ).fetchall()
        )
        model = meta.get("embedding_model")
        pruned = int(meta.get("vector_changes_pruned", 0))
        # The newest change made: the log's last row, or the last one pruned (the whole log
        # goes when the model changes).
        top = max(conn.execute("SELECT max(seq) FROM vector_changes").fetchone()[0] or 0, pruned)
        # A reload when: first use, another model, changes dropped before we read them, or
        # a log behind us (the database file was replaced).
        if self.pos < 0 or model != self.model or self.pos < pruned or top < self.pos:
            self._load(conn, model, top)
            return
        if top == self.pos:
            return
        changed = sorted(
            {
                i
                for (i,) in conn.execute(
                    "SELECT image_id FROM vector_changes WHERE seq > ? AND seq <= ?",
                    (self.pos, top),
                )
            }
        )
        for start in range(0, len(changed), 500):
            part = changed[start : start + 500]
            now = dict(
                conn.execute(
                    f"SELECT image_id, q FROM image_vectors WHERE image_id IN "
                    f"({','.join('?' * len(part))})",
                    part,
                ).fetchall()
            )
            for i in part:
                if i in now:
                    self._put(i, now[i])
                else:
                    self._remove(i)
        self.pos = top

    def _load(self, conn: sqlite3.Connection, model: str | None, pos: int) -> None:
        import time

        import numpy as np

        t0 = time.perf_counter()
        count = conn.execute("SELECT count(*) FROM image_vectors").fetchone()[0]
        first = conn.execute("SELECT q FROM image_vectors LIMIT 1").fetchone()
        dim = len(first[0]) if first else 0
        self.words = (dim + 63) // 64
        cap = max(count, 1024)
        ids = np.zeros(cap, dtype=np.int64)
        cols = np.zeros((self.words, cap), dtype=np.uint64)
        n, after = 0, -(2**63)
        while True:
            part = conn.execute(
                "SELECT image_id, q FROM image_vectors WHERE image_id > ? "
                "ORDER BY image_id LIMIT ?",
                (after, LOAD_CHUNK),
            ).fetchall()
            if not part:
                break
            m = len(part)
            if n + m > cap:  # the count and the rows come from one snapshot: cannot happen
                raise sqlite3.DatabaseError("image_vectors changed during a read transaction")
            ids[n : n + m] = [i for i, _ in part]
            q = np.frombuffer(b"".join(b for _, b in part), dtype=np.int8).reshape(m, dim)
            cols[:, n : n + m] = self._bits(q > 0).T
            n += m
            after = part[-1][0]
        self.ids, self.cols, self.n = ids, cols, n
        top = int(ids[:n].max()) if n else 0
        self.slot_of = np.full(max(top + 1, 1024), -1, dtype=np.int64)
        self.slot_of[ids[:n]] = np.arange(n)
        self.model, self.pos = model, pos
        self.loads += 1
        self.load_s = time.perf_counter() - t0

    def _bits(self, signs: np.ndarray) -> np.ndarray:
        """(m, dim) booleans -> (m, words) uint64, packed as quantize() packs the query's."""
        import numpy as np

        packed = np.packbits(signs, axis=1, bitorder="little")
        pad = self.words * 8 - packed.shape[1]
        if pad:
            packed = np.pad(packed, ((0, 0), (0, pad)))
        return np.ascontiguousarray(packed).view(np.uint64)

    def _put(self, image_id: int, q: bytes) -> None:
        import numpy as np

        v = np.frombuffer(q, dtype=np.int8)
        if self.words == 0:
            self.words = (len(v) + 63) // 64
            self.cols = np.zeros((self.words, 0), dtype=np.uint64)
        bits = self._bits((v > 0)[None, :])[0]
        if image_id >= len(self.slot_of):
            grown = np.full(max(2 * len(self.slot_of), image_id + 1), -1, dtype=np.int64)
            grown[: len(self.slot_of)] = self.slot_of
            self.slot_of = grown
        slot = int(self.slot_of[image_id])
        if slot < 0:
            if self.n == len(self.ids):
                cap = max(2 * self.n, 1024)
                self.ids = np.resize(self.ids, cap)
                cols = np.zeros((self.words, cap), dtype=np.uint64)
                cols[:, : self.n] = self.cols[:, : self.n]
                self.cols = cols
            slot = self.n
            self.n += 1
            self.ids[slot] = image_id
            self.slot_of[image_id] = slot
        self.cols[:, slot] = bits

    def _remove(self, image_id: int) -> None:
        if image_id >= len(self.slot_of) or (slot := int(self.slot_of[image_id])) < 0:
            return
        last = self.n - 1  # the last slot moves into the freed one: the columns stay dense
        moved = int(self.ids[last])
        self.ids[slot] = moved
        self.cols[:, slot] = self.cols[:, last]
        self.slot_of[moved] = slot
        self.slot_of[image_id] = -1
        self.n = last

    # -- searching --------------------------------------------------------------------------

    def nearest(self, vector: object, k: int) -> list[int]:
        """Rowids of (at least, on ties: exactly) `k` vectors whose sign bits are nearest
        (Hamming) to `vector`'s, in no order: candidates, to be rescored."""
        import numpy as np

        n = self.n
        if n == 0 or k <= 0:
            return []
        if k >= n:
            return self.ids[:n].tolist()
        q = self._bits(np.atleast_2d(np.asarray(vector, dtype=np.float32)) > 0)[0]
        dist = np.empty(n, dtype=np.uint16)
        counts = np.zeros(self.words * 64 + 1, dtype=np.int64)
        xor = np.empty(SCAN_BLOCK, dtype=np.uint64)
        ones = np.empty(SCAN_BLOCK, dtype=np.uint8)
        # A block at a time, so the scratch arrays stay in the CPU's cache; with each block's
        # histogram of distances (0..dim), from which the k-th smallest distance comes in
        # one pass, where a partial sort of a million costs several times more.
        for start in range(0, n, SCAN_BLOCK):
            end = min(n, start + SCAN_BLOCK)
            d, x, o = dist[start:end], xor[: end - start], ones[: end - start]
            d[:] = 0
            for w in range(self.words):
                np.bitwise_xor(self.cols[w, start:end], q[w], out=x)
                np.bitwise_count(x, out=o)
                np.add(d, o, out=d)
            counts += np.bincount(d, minlength=len(counts))
        t = int(np.searchsorted(np.cumsum(counts), k))
        below = np.flatnonzero(dist < t)
        tied = np.flatnonzero(dist == t)[: k - len(below)]
        return self.ids[np.concatenate([below, tied])].tolist()


_MATRICES: dict[str, BitMatrix] = {}
_MATRICES_LOCK = threading.Lock()


def matrix_for(index: Index) -> BitMatrix:
    """The process's matrix for this index's database file (shared by its connections)."""
    row = index.db.conn.execute("PRAGMA database_list").fetchone()
    key = row[2] or f"memory:{id(index.db.conn)}"
    with _MATRICES_LOCK:
        m = _MATRICES.get(key)
        if m is None:
            m = _MATRICES[key] = BitMatrix()
        return m


def nearest_bits(index: Index, vector: object, k: int) -> list[int]:
    """Sign-bit candidates from the in-memory matrix, brought up to date first."""
    m = matrix_for(index)
    with m.lock:
        m.refresh(index)
        return m.nearest(vector, k)
