"""The browser pages over HTTP (Starlette's test client on the pages' routes): library,
pagination, filters, thumbnails and originals by id only, editing, re-caption, status."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.testclient import TestClient
from web_library import FakeLane, Library, context, jpeg, library

from watcher.index import connect, transaction
from watcher.jobs import JobQueue
from watcher.outputs.sidecar import text_hash
from watcher.web import pages

HTML = {"accept": "text/html"}
JSON = {"accept": "application/json"}


@pytest.fixture
def lib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Library:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return library(tmp_path)


def client(lib: Library, lane: FakeLane | None = None) -> TestClient:
    static = Path(pages.__file__).parent / "static"
    app = Starlette(
        routes=[*pages.routes(context(lib, lane)), Mount("/static", StaticFiles(directory=static))]
    )
    return TestClient(app, follow_redirects=False)


def ids_on(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<li class="tile[^"]*" data-id="(\d+)"', html)]


def test_library_lists_newest_first_with_thumbnails_and_keyset_pages(lib: Library) -> None:
    t0 = time.time() - 1000
    for i in range(7):
        lib.add(f"img{i}.jpg", f"picture number {i}", mtime=t0 + i)
    c = client(lib)
    r = c.get("/?limit=3")
    assert r.status_code == 200
    assert "7 images in the index" in r.text
    newest = [lib.id_of(f"img{i}.jpg") for i in (6, 5, 4)]
    assert ids_on(r.text) == newest
    assert f'src="/thumb/{newest[0]}"' in r.text
    assert "picture number 6" in r.text
    seen = ids_on(r.text)
    nxt = re.search(r'href="([^"]+)" rel="next"', r.text)
    while nxt:
        r = c.get(nxt.group(1).replace("&amp;", "&"))
        assert r.status_code == 200
        seen += ids_on(r.text)
        nxt = re.search(r'href="([^"]+)" rel="next"', r.text)
    assert seen == [lib.id_of(f"img{i}.jpg") for i in range(6, -1, -1)]
    # The JSON listing pages the same way, with an opaque cursor.
    j = c.get("/api/images", params={"limit": 4}).json()
    assert [i["id"] for i in j["images"]] == seen[:4] and j["next"]
    j2 = c.get("/api/images", params={"limit": 4, "cursor": j["next"]}).json()
    assert [i["id"] for i in j2["images"]] == seen[4:] and j2["next"] is None
    assert c.get("/api/images", params={"cursor": "not-a-cursor"}).status_code == 400
    assert c.get("/api/images", params={"state": "bogus"}).status_code == 400
    assert c.get("/api/images", params={"folder": "/etc"}).status_code == 400


def test_search_narrows_the_grid_and_filters_by_folder_and_state(
    lib: Library, tmp_path: Path
) -> None:
    lib.add("bike.jpg", "a red bicycle against a wall")
    lib.add("dog.jpg", "a dog on a beach")
    other = tmp_path / "other"
    other.mkdir()
    lib.config = type(lib.config)(
        folders=(*lib.config.folders, type(lib.config.folders[0])(path=other)),
        database=lib.db,
    )
    lib.add("bike2.jpg", "two bicycles", root=other)
    c = client(lib)
    assert len(ids_on(c.get("/").text)) == 3
    r = c.get("/", params={"q": "bicycle"})
    assert sorted(ids_on(r.text)) == sorted([lib.id_of("bike.jpg"), lib.id_of("bike2.jpg")])
    r = c.get("/", params={"q": "bicycle", "folder": "1"})
    assert ids_on(r.text) == [lib.id_of("bike2.jpg")]
    assert set(ids_on(c.get("/", params={"folder": "0"}).text)) == {
        lib.id_of("bike.jpg"),
        lib.id_of("dog.jpg"),
    }
    assert "Nothing matches" in c.get("/", params={"q": "elephant"}).text
    assert c.get("/api/search", params={"q": "dog"}).json()["images"][0]["id"] == lib.id_of(
        "dog.jpg"
    )
    assert c.get("/api/search").status_code == 400

    # A failed job (no row) and a hand-edited caption show under their states.
    db = connect(lib.db)
    bad = lib.root / "broken.jpg"
    bad.write_bytes(b"not an image")
    jobs = JobQueue(db)
    jobs.enqueue(bad, lib.root)
    with transaction(db):
        db.conn.execute(
            "UPDATE jobs SET state = 'failed', error = 'not an image (cannot identify image "
            "file)' WHERE path = ?",
            (str(bad),),
        )
    db.conn.close()
    r = c.get("/", params={"state": "failed"})
    assert "broken.jpg" in r.text and "cannot identify image file" in r.text
    assert ids_on(r.text) == []
    dog = lib.id_of("dog.jpg")
    sha = text_hash("a dog on a beach\n")
    assert (
        c.post(
            f"/image/{dog}/caption",
            data={"caption": "my own dog words", "sidecar_sha256": sha},
            headers=JSON,
        ).status_code
        == 200
    )
    assert ids_on(c.get("/", params={"state": "hand-edited"}).text) == [dog]
    assert dog not in ids_on(c.get("/", params={"state": "captioned"}).text)


def test_thumbnail_is_upright_cached_and_revalidated_by_etag(lib: Library, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° to view: a 80x40 picture shows as 40x80
    lib.add("rot.jpg", "rotated", data=jpeg((200, 10, 10), (80, 40), exif=exif.tobytes()))
    c = client(lib)
    i = lib.id_of("rot.jpg")
    r = c.get(f"/thumb/{i}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (40, 80)
    etag = r.headers["etag"]
    cached = list((tmp_path / "cache").rglob("*.jpg"))
    assert len(cached) == 1
    assert c.get(f"/thumb/{i}", headers={"if-none-match": etag}).status_code == 304
    # The same bytes again: served from the cache file (it is what the response holds).
    cached[0].write_bytes(jpeg((0, 255, 0), (10, 10)))
    assert Image.open(io.BytesIO(c.get(f"/thumb/{i}").content)).size == (10, 10)
    # The image changes on disk: a new key, so a new thumbnail, whatever the cache holds.
    lib.images["rot.jpg"].write_bytes(jpeg((0, 0, 250), (30, 60)))
    r2 = c.get(f"/thumb/{i}", headers={"if-none-match": etag})
    assert r2.status_code == 200 and r2.headers["etag"] != etag
    assert Image.open(io.BytesIO(r2.content)).size == (30, 60)
    assert c.get(f"/thumb/{i}", params={"size": "huge"}).status_code == 400


def test_original_is_served_by_id_with_its_type_and_nothing_else_is(
    lib: Library, tmp_path: Path
) -> None:
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(png, "PNG")
    lib.add("a.png", "white square", data=png.getvalue())
    lib.add("sub/b.jpg", "in a subfolder")
    c = client(lib)
    a, b = lib.id_of("a.png"), lib.id_of("sub/b.jpg")
    r = c.get(f"/file/{a}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == png.getvalue()
    assert r.headers["x-content-type-options"] == "nosniff"
    assert c.get(f"/file/{b}").status_code == 200
    for url in ("/file/9999", "/thumb/9999", "/image/9999", "/file/-1", "/file/../../etc/passwd"):
        assert c.get(url).status_code == 404, url
    # A symbolic link swapped in for the image (pointing outside) is not followed.
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg((1, 2, 3)))
    os.unlink(lib.images["a.png"])
    os.symlink(secret, lib.images["a.png"])
    assert c.get(f"/file/{a}").status_code == 404
    assert c.get(f"/thumb/{a}").status_code == 404
    # A folder on the way swapped for a link: nothing read through it.
    sub = lib.root / "sub"
    os.rename(sub, tmp_path / "moved")
    os.symlink(tmp_path / "moved", sub)
    assert c.get(f"/file/{b}").status_code == 404
    # A row whose folder is no longer watched is not served (nor its page shown).
    lib.config = type(lib.config)(folders=(), database=lib.db)
    c2 = client(lib)
    assert c2.get(f"/image/{a}").status_code == 404


def test_edit_writes_the_sidecar_the_index_and_search_and_refuses_a_stale_form(
    lib: Library,
) -> None:
    lib.add("cat.jpg", "a cat on a sofa")
    c = client(lib, FakeLane())
    i = lib.id_of("cat.jpg")
    page = c.get(f"/image/{i}")
    assert page.status_code == 200
    assert "a cat on a sofa" in page.text
    loaded = re.search(r'name="sidecar_sha256" value="([0-9a-f]+)"', page.text)
    assert loaded and loaded.group(1) == text_hash("a cat on a sofa\n")
    r = c.post(
        f"/image/{i}/caption",
        data={"caption": "  Whiskers, asleep  ", "sidecar_sha256": loaded.group(1)},
        headers=HTML,
    )
    assert r.status_code == 303 and r.headers["location"] == f"/image/{i}?done=saved"
    sidecar = lib.images["cat.jpg"].with_suffix(".txt")
    assert sidecar.read_text() == "Whiskers, asleep\n"
    row = lib.row("cat.jpg")
    assert (row.caption, row.sidecar_state, row.sidecar_sha256) == (
        "Whiskers, asleep",
        "kept",
        None,
    )
    assert row.model_caption == "a cat on a sofa"
    assert c.get("/api/search", params={"q": "whiskers"}).json()["images"][0]["id"] == i
    # The model's words stay searchable too (its output is indexed beside the caption).
    assert c.get("/api/search", params={"q": "sofa"}).json()["images"][0]["id"] == i

    # The same stale form again (the file changed since): 409, the file untouched.
    r = c.post(
        f"/image/{i}/caption",
        data={"caption": "overwrite?", "sidecar_sha256": loaded.group(1)},
        headers=HTML,
    )
    assert r.status_code == 409
    assert "changed on disk since the page was loaded" in r.text
    assert "overwrite?" in r.text  # the user's draft is not lost
    assert sidecar.read_text() == "Whiskers, asleep\n"
    j = c.post(f"/image/{i}/caption", data={"caption": "x", "sidecar_sha256": ""}, headers=JSON)
    assert j.status_code == 409 and "changed on disk" in j.json()["error"]
    empty = c.post(
        f"/image/{i}/caption",
        data={"caption": "  ", "sidecar_sha256": text_hash("Whiskers, asleep\n")},
        headers=JSON,
    )
    assert empty.status_code == 400 and "empty" in empty.json()["error"]


def test_recaption_replaces_our_sidecar_but_never_the_users(lib: Library) -> None:
    lib.add("a.jpg", "first words")
    lib.add("b.jpg", "second words")
    lane = FakeLane()
    c = client(lib, lane)
    a, b = lib.id_of("a.jpg"), lib.id_of("b.jpg")
    r = c.post(f"/image/{a}/recaption", data={"task": "long"}, headers=HTML)
    assert r.status_code == 303, r.text
    text_a = lib.images["a.jpg"].with_suffix(".txt").read_text()
    assert text_a.startswith("Long words colour") or text_a.startswith("long words colour")
    row = lib.row("a.jpg")
    assert row.task == "long" and row.sidecar_state == "written"
    assert row.sidecar_sha256 == text_hash(text_a)
    assert "long" in row.outputs and "short" in row.outputs

    # Edited by hand, then re-captioned: the sidecar stays the user's.
    sha = text_hash("second words\n")
    c.post(f"/image/{b}/caption", data={"caption": "mine now", "sidecar_sha256": sha})
    r = c.post(f"/image/{b}/recaption", data={"task": "prompt"}, headers=HTML)
    assert r.status_code == 303
    assert lib.images["b.jpg"].with_suffix(".txt").read_text() == "mine now\n"
    row = lib.row("b.jpg")
    assert row.caption == "mine now" and row.sidecar_state == "kept"
    assert row.model_caption and row.model_caption.lower().startswith("prompt words")
    assert lane.calls == ["long", "prompt"]
    assert c.post(f"/image/{a}/recaption", data={"task": "query"}).status_code == 400
    assert client(lib).post(f"/image/{a}/recaption", data={"task": "long"}).status_code == 503


def test_answer_is_saved_in_the_index_only_when_asked(lib: Library) -> None:
    lib.add("a.jpg", "words")
    c = client(lib, FakeLane())
    i = lib.id_of("a.jpg")
    r = c.post(
        f"/image/{i}/answer", data={"question": "what colour?", "answer": "blue"}, headers=HTML
    )
    assert r.status_code == 303
    row = lib.row("a.jpg")
    assert row.outputs["query:what colour?"] == "blue"
    assert lib.images["a.jpg"].with_suffix(".txt").read_text() == "words\n"


def test_hostile_names_and_captions_are_text(lib: Library) -> None:
    name = "<img src=x onerror=alert(1)>.jpg"
    lib.add(name, "<script>alert('caption')</script> & more")
    c = client(lib, FakeLane())
    for url in ("/", f"/image/{lib.id_of(name)}", "/?q=script"):
        html = c.get(url).text
        assert "<img src=x" not in html and "<script>alert" not in html, url
        assert "&lt;script&gt;alert(" in html, url
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in c.get("/").text
    csp = c.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_status_shows_failures_and_retry_queues_them_again(lib: Library) -> None:
    lib.add("ok.jpg", "fine")
    bad = lib.root / "bad.jpg"
    bad.write_bytes(b"garbage")
    db = connect(lib.db)
    JobQueue(db).enqueue(bad, lib.root)
    with transaction(db):
        db.conn.execute(
            "UPDATE jobs SET state = 'failed', error = 'truncated or corrupt image: x' "
            "WHERE path = ?",
            (str(bad),),
        )
    job = db.conn.execute("SELECT id FROM jobs WHERE path = ?", (str(bad),)).fetchone()[0]
    db.conn.close()
    c = client(lib)
    html = c.get("/status").text
    assert "truncated or corrupt image: x" in html and str(bad) in html
    s = c.get("/api/status").json()
    assert s["queue"]["failed"] == 1 and s["failures"][0]["job"] == job
    assert s["model"]["backend"] == lib.config.model.backend
    r = c.post("/api/retry", data={"job": str(job)}, headers=HTML)
    assert r.status_code == 303 and r.headers["location"] == "/status?done=retry"
    assert c.get("/api/status").json()["queue"] == {**s["queue"], "failed": 0, "pending": 1}
    assert c.post("/api/retry", data={"job": str(job)}).status_code == 404
    assert c.post("/api/retry", data={"job": "x"}).status_code == 400


def test_pages_without_an_index_yet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lib = library(tmp_path)
    lib.db.unlink()
    c = client(lib)
    assert "No images here yet" in c.get("/").text
    assert c.get("/thumb/1").status_code == 404
    assert c.get("/status").status_code == 200
    assert c.get("/try").status_code == 200


def test_page_posts_need_the_pages_csrf_token_in_the_real_app(lib: Library) -> None:
    from watcher.web.app import create_app

    lib.add("a.jpg", "words")
    i = lib.id_of("a.jpg")
    c = TestClient(
        create_app(context(lib, FakeLane())),
        base_url="http://127.0.0.1:2020",
        follow_redirects=False,
    )
    page = c.get(f"/image/{i}", headers=HTML)
    assert page.status_code == 200
    token = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert token and token.group(1)
    form = {"caption": "by hand", "sidecar_sha256": text_hash("words\n")}
    refused = c.post(f"/image/{i}/caption", data=form, headers=HTML)
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    assert lib.images["a.jpg"].with_suffix(".txt").read_text() == "words\n"
    ok = c.post(f"/image/{i}/caption", data={**form, "csrf_token": token.group(1)}, headers=HTML)
    assert ok.status_code == 303
    assert lib.images["a.jpg"].with_suffix(".txt").read_text() == "by hand\n"
    assert c.post("/api/retry", data={"job": "1"}).status_code == 403
    # The thumbnail and the page go through the app's static files and headers too.
    assert c.get("/static/common.js").status_code == 200
    assert c.get(f"/thumb/{i}").headers["content-type"] == "image/jpeg"


def test_undecodable_file_name_is_listed_served_and_editable(lib: Library) -> None:
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    lib.add(name, "a cafe")
    c = client(lib)
    i = lib.id_of(name)
    assert "caf\\xe9.jpg" in c.get("/").text
    assert c.get(f"/thumb/{i}").status_code == 200
    assert c.get(f"/file/{i}").status_code == 200
    r = c.post(
        f"/image/{i}/caption",
        data={"caption": "un café", "sidecar_sha256": text_hash("a cafe\n")},
        headers=JSON,
    )
    assert r.status_code == 200 and r.json()["caption"] == "un café"
    assert (lib.root / os.fsdecode(b"caf\xe9.txt")).read_text() == "un café\n"
