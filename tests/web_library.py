"""A small indexed library for the web page tests: images, our sidecars, index rows."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from watcher.config import Config, FolderConfig
from watcher.index import ImageRow, Index, connect, transaction
from watcher.outputs.sidecar import write_atomic
from watcher.tasks import Task
from watcher.web.context import WebContext


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (64, 48), **save) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG", **save)
    return out.getvalue()


@dataclass
class Library:
    root: Path
    db: Path
    config: Config
    images: dict[str, Path] = field(default_factory=dict)

    def add(
        self,
        name: str,
        caption: str,
        *,
        data: bytes | None = None,
        mtime: float | None = None,
        root: Path | None = None,
    ) -> Path:
        """An image with our sidecar and its row, as the writer leaves them."""
        root = root or self.root
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = data if data is not None else jpeg((len(self.images) * 37 % 256, 90, 160))
        path.write_bytes(data)
        if mtime is not None:
            import os

            os.utime(path, (mtime, mtime))
        sidecar = path.with_suffix(".txt")
        sha = write_atomic(sidecar, caption + "\n")
        st = path.stat()
        now = time.time()
        row = ImageRow(
            path=str(path),
            root=str(root),
            sha256=hashlib.sha256(data).hexdigest(),
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            width=64,
            height=48,
            caption=caption,
            task="short",
            outputs={"short": caption},
            model="tiny",
            revision="r1",
            sidecar=str(sidecar),
            sidecar_sha256=sha,
            sidecar_state="written",
            sidecar_error=None,
            created=now,
            updated=now,
            model_caption=caption,
        )
        db = connect(self.db)
        with transaction(db):
            Index(db).upsert(row)
        db.conn.close()
        self.images[name] = path
        return path

    def id_of(self, name: str) -> int:
        db = connect(self.db)
        try:
            i = Index(db).id_of(str(self.images[name]))
        finally:
            db.conn.close()
        assert i is not None
        return i

    def row(self, name: str) -> ImageRow:
        db = connect(self.db)
        try:
            r = Index(db).get(str(self.images[name]))
        finally:
            db.conn.close()
        assert r is not None
        return r


def library(tmp_path: Path, **folder) -> Library:
    root = tmp_path / "photos"
    root.mkdir()
    cfg = Config(folders=(FolderConfig(path=root, **folder),), database=tmp_path / "index.db")
    connect(cfg.database).conn.close()
    return Library(root, cfg.database, cfg)


class FakeLane:
    """A model lane answering from the image's mean colour and the task: deterministic, and
    different for different images and tasks."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _text(self, image: Image.Image, task: Task) -> str:
        r, g, b = (int(v) for v in image.resize((1, 1)).getpixel((0, 0)))  # type: ignore[misc]
        self.calls.append(task.key)
        return f"{task.kind} words colour {r} {g} {b}"

    async def stream(self, image: Image.Image, task: Task) -> AsyncIterator[str]:
        for word in self._text(image, task).split():
            yield word + " "

    async def describe(self, image: Image.Image, task: Task) -> str:
        return self._text(image, task)


def context(lib: Library, lane: FakeLane | None = None) -> WebContext:
    """The pages' context (the test sets XDG_CACHE_HOME: thumbnails stay in tmp_path)."""
    return WebContext(lib.config, lib.db, lane)
