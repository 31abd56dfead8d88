"""What the benchmarks feed the watcher: distinct images, written ahead and moved in whole."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from bench.checks import BenchFailure


def image_bytes(i: int, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    """A distinct picture for `i` (the tests' generator), with `i` stamped into its pixels so
    that no two images in a run share bytes: the pipeline re-uses captions of identical
    bytes, which would make a benchmark skip model work."""
    from images import distinct_pil

    im = distinct_pil(i, size)
    px = im.load()
    w, h = im.size
    for bit in range(24):
        on = (i >> bit) & 1
        for dx in range(2):  # 2x2 cells survive JPEG well enough to change the bytes
            for dy in range(2):
                x, y = 2 * bit + dx, h - 2 + dy
                if x < w:
                    px[x, y] = (255, 255, 255) if on else (0, 0, 0)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_images(folder: Path, ids: Sequence[int], size: tuple[int, int]) -> list[Path]:
    """`folder/img<i>.jpg` for each id, every one with bytes of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, seen = [], set()
    for i in ids:
        data = image_bytes(i, size)
        if data in seen:
            raise BenchFailure(f"image generator produced duplicate bytes for {i}")
        seen.add(data)
        p = folder / f"img{i:06d}.jpg"
        p.write_bytes(data)
        paths.append(p)
    return paths


def drop(paths: Sequence[Path], into: Path) -> list[Path]:
    """Move prepared files into a watched folder (rename: each lands whole, at once)."""
    out = []
    for p in paths:
        dest = into / p.name
        os.rename(p, dest)
        out.append(dest)
    return out
