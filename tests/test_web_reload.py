"""The pages serve the folders watched now: a reload that removes or adds a folder is followed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from web_library import library

from watcher.config import Config, FolderConfig
from watcher.web import pages
from watcher.web.context import WebContext


def test_a_folder_taken_out_of_the_config_is_no_longer_served_and_one_added_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lib = library(tmp_path)
    other = tmp_path / "other"
    lib.add("a.jpg", "a red bicycle")
    lib.add("b.jpg", "a blue boat", root=other)
    both = dataclasses.replace(lib.config, folders=(*lib.config.folders, FolderConfig(path=other)))
    now: list[Config] = [lib.config]  # what the daemon holds; a reload replaces it
    ctx = WebContext(lib.config, lib.db, None, source=lambda: now[0])
    a, b = lib.id_of("a.jpg"), lib.id_of("b.jpg")
    with TestClient(Starlette(routes=pages.routes(ctx))) as c:
        assert c.get(f"/file/{a}").status_code == 200
        assert c.get(f"/file/{b}").status_code == 404  # not watched (yet)

        now[0] = both  # reload: `other` is watched now
        assert c.get(f"/file/{b}").status_code == 200
        assert c.get(f"/image/{b}").status_code == 200

        now[0] = dataclasses.replace(both, folders=(FolderConfig(path=other),))
        for url in (f"/file/{a}", f"/thumb/{a}", f"/image/{a}"):
            assert c.get(url).status_code == 404, url  # taken out: not served any more
        assert c.get(f"/file/{b}").status_code == 200
