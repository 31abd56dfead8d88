"""The pages in headless Chromium (Debian's, driven by Playwright) against a real daemon with a
tiny model: thumbnails, search, editing that survives a re-caption, the try page, a hostile
file name, the status page's failure and its retry."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require
from daemon_harness import Daemon, wait_for, write_config
from web_library import jpeg

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOSTILE = "<img src=x onerror=alert(1)>.jpg"
# A deadline for the page to show what the daemon did (a tiny model on a loaded machine).
UI_MS = 60_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    require("playwright", sync_playwright is not None, "pip install 'moondream-watcher[test]'")
    require("chromium", os.path.exists(CHROMIUM), "apt-get install chromium")
    assert sync_playwright is not None
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Site:
    def __init__(self, daemon: Daemon, url: str, root: Path, tmp: Path) -> None:
        self.daemon, self.url, self.root, self.tmp = daemon, url.rstrip("/"), root, tmp

    def row(self, name: str) -> dict:
        row = self.daemon.rows()[str(self.root / name)]
        return {**row, "outputs": json.loads(row["outputs"])}


@pytest.fixture(scope="module")
def site(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One daemon for the module: a folder of three pictures, one with a hostile name, and a
    file that is no image (a failure with its reason)."""
    tmp = tmp_path_factory.mktemp("web-browser")
    root = tmp / "photos"
    root.mkdir()
    colours = {"red.jpg": (220, 30, 30), "green.jpg": (30, 200, 40), "blue.jpg": (30, 40, 220)}
    for name, colour in colours.items():
        (root / name).write_bytes(jpeg(colour, (96, 64)))
    (root / HOSTILE).write_bytes(jpeg((240, 240, 0), (64, 96)))
    (root / "broken.jpg").write_bytes(b"this is no picture at all")
    cfg = write_config(
        tmp,
        tiny_llava,
        [{"path": str(root)}],
        web={"listen": "127.0.0.1:0", "thumb_cache": str(tmp / "thumbs")},
    )
    d = Daemon(cfg, tmp, env={"XDG_CACHE_HOME": str(tmp / "cache")})
    d.start()
    try:
        started = wait_for(lambda: d.logged("web page and API"), 60, "the web server")
        url = started[0]["url"]
        for name in (*colours, HOSTILE):
            wait_for(lambda n=name: d.captioned(root / n), 120, f"{name} captioned")
        wait_for(
            lambda: (d.job_state(root / "broken.jpg") or ("",))[0] == "failed",
            120,
            "broken.jpg failed",
        )
        yield Site(d, url, root, tmp)
    finally:
        d.stop()


def test_library_shows_thumbnails_and_search_narrows_it(browser, site: Site) -> None:
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(site.url + "/")
    tiles = page.locator(".tile img")
    assert tiles.count() == 4
    page.wait_for_function(
        "() => [...document.querySelectorAll('.tile img')].every(i => i.complete && "
        "i.naturalWidth > 0)",
        timeout=UI_MS,
    )
    shot = site.tmp / "web-library.png"
    page.screenshot(path=str(shot))
    if os.environ.get("WATCHER_SCREENSHOT"):  # how docs/web-library.png is made
        shutil.copy(shot, os.environ["WATCHER_SCREENSHOT"])
    assert shot.stat().st_size > 1000
    # A word only one caption holds (the tiny model's words are noise: give one of our own).
    rid = _image_id(page, "green.jpg")
    page.goto(f"{site.url}/image/{rid}")
    page.fill("#caption", "kingfisher over the pond")
    page.click("#save")
    page.wait_for_selector(".notice", timeout=UI_MS)
    page.goto(site.url + "/")
    page.fill("#q", "kingfisher")
    page.press("#q", "Enter")
    page.wait_for_url("**/?q=kingfisher*", timeout=UI_MS)
    assert page.locator(".tile").count() == 1
    assert page.locator(".tile .name").inner_text() == "green.jpg"
    page.close()


def test_edit_changes_the_sidecar_and_survives_a_recaption(browser, site: Site) -> None:
    page = browser.new_page()
    page.goto(site.url + "/")
    rid = _image_id(page, "red.jpg")
    page.goto(f"{site.url}/image/{rid}")
    model_text = page.locator("#model-caption").inner_text()
    page.fill("#caption", "a red square, by hand")
    page.click("#save")
    page.wait_for_selector(".notice", timeout=UI_MS)
    sidecar = site.root / "red.txt"
    assert sidecar.read_text() == "a red square, by hand\n"
    assert site.row("red.jpg")["sidecar_state"] == "kept"
    # Re-captioned with another task, through the page: the model's text is new, the
    # sidecar stays the user's.
    page.select_option("#task", "long")
    page.click("#recaption")
    page.wait_for_selector("text=Captioned again.", timeout=UI_MS)
    row = site.row("red.jpg")
    assert row["task"] == "long" and "long" in row["outputs"]
    assert sidecar.read_text() == "a red square, by hand\n"
    assert page.locator("#caption").input_value() == "a red square, by hand"
    assert model_text  # the page showed the model's own text beside the user's
    # A question about the image: answered through /v1/query, written nowhere until saved.
    outputs = dict(site.row("red.jpg")["outputs"])
    page.fill("#question", "What is in the picture?")
    page.click("#ask button")
    page.wait_for_selector("#save-answer:not([hidden])", timeout=UI_MS)
    answer = page.locator("#answer").inner_text()
    assert answer.strip() and not answer.startswith("Error")
    assert site.row("red.jpg")["outputs"] == outputs
    page.click("#save-answer button")
    page.wait_for_selector("text=Answer saved in the index.", timeout=UI_MS)
    saved = site.row("red.jpg")["outputs"]
    assert saved["query:What is in the picture?"] == answer.strip()
    assert sidecar.read_text() == "a red square, by hand\n"
    page.close()


def test_try_page_answers_an_uploaded_image(browser, site: Site) -> None:
    before = sorted(p.name for p in site.root.iterdir())
    upload = site.tmp / "upload.jpg"
    upload.write_bytes(jpeg((10, 120, 200), (80, 80)))
    page = browser.new_page()
    page.goto(site.url + "/try")
    page.set_input_files("#file", str(upload))
    page.wait_for_selector("#preview:not([hidden])", timeout=UI_MS)
    page.check("input[name=mode][value=short]")
    page.click("#go")
    page.wait_for_selector("#try-answer[data-done='1']", timeout=UI_MS)
    assert page.locator("#try-answer").inner_text().strip()
    assert page.locator("#try-error").is_hidden()
    # A question, streamed through /v1/query.
    page.check("input[name=mode][value=query]")
    page.fill("#question", "What colour is it?")
    page.click("#go")
    page.wait_for_selector("#try-answer[data-done='1']", timeout=UI_MS)
    assert page.locator("#try-answer").inner_text().strip()
    assert sorted(p.name for p in site.root.iterdir()) == before  # nothing written there
    page.close()


def test_hostile_file_name_stays_inert(browser, site: Site) -> None:
    dialogs: list[str] = []
    page = browser.new_page()
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(site.url + "/")
    assert page.locator(".tile .name", has_text=HOSTILE).count() == 1
    rid = _image_id(page, HOSTILE)
    page.goto(f"{site.url}/image/{rid}")
    assert page.locator("h1.name").inner_text() == HOSTILE
    page.goto(site.url + "/status")
    page.goto(site.url + "/?q=" + "onerror")
    assert dialogs == []
    assert page.evaluate("() => document.querySelectorAll('img[src=x]').length") == 0
    page.close()


def test_status_shows_the_failure_and_its_retry_runs_it_again(browser, site: Site) -> None:
    page = browser.new_page()
    page.goto(site.url + "/status")
    failure = page.locator("#failures li", has_text="broken.jpg")
    assert failure.count() == 1
    assert "not an image" in failure.locator(".reason").inner_text()
    failed_before = len(site.daemon.logged("image failed", path=str(site.root / "broken.jpg")))
    failure.locator("button", has_text="Retry").click()
    page.wait_for_selector("text=Queued again.", timeout=UI_MS)
    wait_for(
        lambda: (
            len(site.daemon.logged("image failed", path=str(site.root / "broken.jpg")))
            > failed_before
        ),
        60,
        "the retried image to run (and fail) again",
    )
    # The page refreshes itself: the failure is listed again, with its reason.
    page.wait_for_selector("#failures li:has-text('broken.jpg')", timeout=UI_MS)
    page.close()


def _image_id(page, name: str) -> str:
    tile = page.locator(".tile", has=page.locator(".name", has_text=name))
    rid = tile.first.get_attribute("data-id")
    assert rid, f"no tile for {name}"
    return rid
