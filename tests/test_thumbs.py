"""Thumbnails: upright, bomb-guarded, keyed by the image's bytes, evicted under the cap."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from watcher.pipeline.decode import DecodeError
from watcher.web.thumbs import ThumbCache, cache_key, make_thumb


def png(size: tuple[int, int], color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def test_thumb_is_small_upright_jpeg() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 270° to view
    out = io.BytesIO()
    Image.new("RGB", (1000, 500), "blue").save(out, "JPEG", exif=exif.tobytes())
    thumb = Image.open(io.BytesIO(make_thumb(out.getvalue(), 100, max_pixels=10**8)))
    assert thumb.format == "JPEG" and thumb.size == (50, 100)


def test_thumb_refuses_a_decompression_bomb_before_decoding_it() -> None:
    with pytest.raises(DecodeError, match="exceeds max_pixels"):
        make_thumb(png((3000, 3000)), 100, max_pixels=1_000_000)
    with pytest.raises(DecodeError, match="not an image"):
        make_thumb(b"<svg onload=alert(1)>", 100, max_pixels=10**8)


def test_key_follows_the_bytes_and_the_size() -> None:
    a = cache_key("aa" * 32, 10, 384)
    assert a != cache_key("ab" * 32, 10, 384)  # other bytes
    assert a != cache_key("aa" * 32, 11, 384)
    assert a != cache_key("aa" * 32, 10, 1600)


def test_cache_evicts_least_recently_used_above_the_cap(tmp_path: Path) -> None:
    cache = ThumbCache(tmp_path / "c", cap_bytes=10_000)
    blob = os.urandom(3000)
    for i, key in enumerate(("k1", "k2", "k3")):
        cache.put(key, blob)
        t = 1_000_000 + i
        os.utime(cache._path(key), (t, t))
    assert cache.get("k1") == blob  # used now: the newest
    cache.put("k4", blob)  # 12,000 > cap: down to 90% of it, oldest first
    assert cache.get("k2") is None
    assert cache.get("k1") == blob and cache.get("k3") == blob and cache.get("k4") == blob
    total = sum(p.stat().st_size for p in (tmp_path / "c").rglob("*.jpg"))
    assert total <= 10_000


def test_unwritable_cache_only_costs_a_new_thumbnail(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    cache = ThumbCache(tmp_path / "file" / "c", cap_bytes=10_000)
    cache.put("k1", b"data")  # the folder cannot be made: no error
    assert cache.get("k1") is None
