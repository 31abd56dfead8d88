"""`backend: openai` against a real OpenAI-protocol server over HTTP (tests/openai_server.py),
answered by the tiny model: captions end to end, retries, timeouts, refusals, the API key,
and the loopback rule."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path

import pytest
import yaml
from daemon_harness import Daemon, run_cli, wait_for
from images import distinct_image, distinct_pil
from openai_server import ChatServer, Reply

from watcher.backends.openai import BatchFailed, OpenAIBackend, ServerRefused, ServerUnavailable
from watcher.config import ModelConfig
from watcher.index import load_vec
from watcher.tasks import Task, clean_caption

KEY = "sk-test-0123456789abcdef-secret"


@pytest.fixture(scope="module")
def server(tiny_llava):
    with ChatServer(tiny_llava) as s:
        # The model loads before the first test, so no request waits for it (a timeout test
        # must time out on the stall it scripts, not on the load).
        s.answer(distinct_pil(0), Task("short").instruction, 6)
        yield s


@pytest.fixture
def fresh(server):
    """The module's server with nothing scripted and nothing recorded."""
    server.script.clear()
    server.seen.clear()
    server.refuse = lambda image: None
    server.gate = 0
    server.max_in_flight = 0
    return server


def _config(tmp_path: Path, base_url: str, name: str = "config.yaml", **model) -> Path:
    data = {
        "model": {
            "backend": "openai",
            "base_url": base_url,
            "id": "tiny-llava",
            "batch_size": 4,
            "max_tokens": 6,
            "isolate": False,
            **model,
        },
        "database": str(tmp_path / f"{name}.db"),
        "log": {"level": "info", "format": "json"},
        "retry_backoff": 0.05,
        "max_attempts": 2,
    }
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _rows(db: Path) -> dict[str, tuple]:
    con = sqlite3.connect(db)
    try:
        return {
            r[0]: r[1:] for r in con.execute("SELECT path, caption, model, revision FROM images")
        }
    finally:
        con.close()


def _backend(base_url: str, **kw) -> OpenAIBackend:
    cfg = ModelConfig(backend="openai", base_url=base_url, id="tiny-llava", **kw)
    return OpenAIBackend(cfg, backoff=0.01)


def _images(folder: Path, n: int) -> list[Path]:
    return [distinct_image(i, folder / f"img{i}.png") for i in range(n)]


def test_caption_end_to_end_with_api_key(tmp_path, fresh, monkeypatch, capfd):
    pics = tmp_path / "pics"
    images = _images(pics, 5)
    monkeypatch.setenv("WATCHER_TEST_KEY", KEY)
    cfg = _config(tmp_path, fresh.base_url, api_key_env="WATCHER_TEST_KEY", isolate=True)

    code, out, err = run_cli("--config", str(cfg), "caption", str(pics))
    assert code == 0, out + err
    assert "5 new, 0 up to date, 0 failed" in out
    # Every request carried the key as a Bearer token, the model name and the task's prompt.
    assert len(fresh.seen) == 5
    assert {s.authorization for s in fresh.seen} == {f"Bearer {KEY}"}
    assert {s.model for s in fresh.seen} == {"tiny-llava"}
    assert {s.instruction for s in fresh.seen} == {Task("short").instruction}
    assert {s.max_tokens for s in fresh.seen} == {6}
    # The sidecars hold the server's answers, cleaned as a local model's would be.
    answers = sorted(clean_caption(s.answer or "") for s in fresh.seen)
    sidecars = sorted(p.with_suffix(".txt").read_text().strip() for p in images)
    assert sidecars == answers
    rows = _rows(tmp_path / "config.yaml.db")
    assert {r[1] for r in rows.values()} == {"tiny-llava"}
    assert sorted(r[0] for r in rows.values()) == answers

    # Status says where images go; the key is nowhere: not in output, logs, status, database.
    code, status, _ = run_cli("--config", str(cfg), "status")
    assert f"images go to: {fresh.base_url} (model tiny-llava; this machine)" in status
    code, status_json, _ = run_cli("--config", str(cfg), "status", "--json")
    assert json.loads(status_json)["images_go_to"]["to"].startswith(fresh.base_url)
    logs = capfd.readouterr()
    conn = sqlite3.connect(tmp_path / "config.yaml.db")
    load_vec(conn)  # the dump reads every table, the vector tables too
    dump = "\n".join(conn.iterdump())
    for text in (out, err, status, status_json, logs.out, logs.err, dump, cfg.read_text()):
        assert KEY not in text
    assert "from $WATCHER_TEST_KEY" in logs.err  # the log says where the key came from

    # A second run does no model work.
    code, out, _ = run_cli("--config", str(cfg), "caption", str(pics))
    assert code == 0 and "0 new, 5 up to date" in out
    assert len(fresh.seen) == 5


def test_missing_key_variable_is_a_config_error(tmp_path, fresh, monkeypatch):
    distinct_image(0, tmp_path / "pics" / "a.png")
    monkeypatch.delenv("WATCHER_TEST_KEY", raising=False)
    cfg = _config(tmp_path, fresh.base_url, api_key_env="WATCHER_TEST_KEY")
    code, out, err = run_cli("--config", str(cfg), "caption", str(tmp_path / "pics"))
    assert code == 2, out + err
    assert "WATCHER_TEST_KEY is not set" in err
    assert fresh.seen == []


def test_429_then_success_honours_retry_after(tmp_path, fresh):
    pics = tmp_path / "pics"
    _images(pics, 1)
    fresh.script += [Reply(429, {"Retry-After": "0"}, {"error": {"message": "slow down"}})]
    cfg = _config(tmp_path, fresh.base_url)
    code, out, err = run_cli("--config", str(cfg), "caption", str(pics))
    assert code == 0, out + err
    assert [s.status for s in fresh.seen] == [429, 200]
    assert (pics / "img0.txt").read_text().strip() == clean_caption(fresh.seen[1].answer or "")
    assert "model server busy or unreachable; will retry" in err


def test_500_retried_with_backoff_then_gives_up_as_transient(fresh):
    pil = distinct_pil(1, (96, 72))
    backend = _backend(fresh.base_url, retries=2)
    try:
        fresh.script += [Reply(500, body={"error": "boom"}), Reply(503)]
        assert backend.describe([pil], [Task("short")])[0][0] == fresh.seen[-1].answer
        assert [s.status for s in fresh.seen] == [500, 503, 200]

        fresh.seen.clear()
        fresh.script += [Reply(500, body={"error": "still broken"})] * 3
        with pytest.raises(ServerUnavailable) as e:
            backend.describe([pil], [Task("short")])
        assert len(fresh.seen) == 3
        assert "500 Internal Server Error: still broken (tried 3 times)" in str(e.value)
        assert e.value.transient
    finally:
        backend.close()


def test_timeout_is_retried(fresh):
    from PIL import Image

    pil = Image.new("RGB", (40, 30), (10, 120, 200))
    backend = _backend(fresh.base_url, timeout=1.0, retries=1)
    try:
        fresh.script += [Reply(stall=True), Reply.chat("a blue square")]
        out = backend.describe([pil], [Task("short")])
        assert len(fresh.seen) == 2
        assert out == [["a blue square"]]
    finally:
        backend.close()


def test_unreachable_server_fails_transiently_with_reason(tmp_path):
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pics = tmp_path / "pics"
    _images(pics, 2)
    cfg = _config(tmp_path, f"http://127.0.0.1:{port}/v1", retries=0)
    code, out, _ = run_cli("--config", str(cfg), "caption", str(pics))
    assert code == 1
    assert f"cannot reach http://127.0.0.1:{port}/v1" in out
    assert "gave up after 2 attempts" in out  # transient: retried by the job queue


def test_4xx_fails_that_image_only_with_the_servers_reason(tmp_path, fresh):
    pics = tmp_path / "pics"
    images = _images(pics, 4)
    bad = distinct_image(9, pics / "bad.png", size=(77, 33))
    fresh.refuse = lambda image: "image too small" if image.size == (77, 33) else None
    cfg = _config(tmp_path, fresh.base_url)

    code, out, err = run_cli("--config", str(cfg), "caption", str(pics))
    assert code == 1, out + err
    reason = (
        f"model error: ServerRefused: {fresh.base_url} refused the image: "
        "400 Bad Request: image too small"
    )
    assert f"failed: {bad}: {reason}" in out
    assert all(p.with_suffix(".txt").exists() for p in images)
    assert not bad.with_suffix(".txt").exists()
    # Nothing of the failed batch was sent twice (the model worker retries it one by one).
    assert len(fresh.seen) == 4 + 1
    con = sqlite3.connect(tmp_path / "config.yaml.db")
    assert con.execute("SELECT state, error FROM jobs WHERE path = ?", (str(bad),)).fetchone() == (
        "failed",
        reason,
    )
    code, status, _ = run_cli("--config", str(cfg), "status")
    assert f"  {bad}: {reason}" in status


def test_requests_of_a_batch_are_in_flight_together(fresh):
    from PIL import Image

    images = [Image.new("RGB", (32, 32), (i * 30, 50, 90)) for i in range(8)]
    fresh.gate = 4
    fresh.script += [Reply.chat(f"caption {i}") for i in range(16)]  # no model: quick
    backend = _backend(fresh.base_url, concurrency=4, batch_size=8)
    try:
        out = backend.describe(images, [Task("short"), Task("prompt")])
    finally:
        backend.close()
    assert fresh.max_in_flight == 4  # as many as model.concurrency, never more
    assert sorted(t for o in out for t in o) == sorted(f"caption {i}" for i in range(16))
    assert sorted(s.instruction for s in fresh.seen) == sorted(
        [Task("short").instruction, Task("prompt").instruction] * 8
    )


def test_batch_error_keeps_good_outputs_for_the_retry(fresh):
    from PIL import Image

    images = [Image.new("RGB", (32 + i, 32), (i * 60, 50, 90)) for i in range(3)]
    fresh.refuse = lambda image: "nope" if image.size == (33, 32) else None
    backend = _backend(fresh.base_url)
    try:
        with pytest.raises(BatchFailed) as e:
            backend.describe(images, [Task("short")])
        assert list(e.value.errors) == [1] and not e.value.transient
        assert len(fresh.seen) == 3
        # The model worker's one-by-one retry: the good images are answered from memory.
        assert backend.describe([images[0]], [Task("short")])[0][0]
        with pytest.raises(ServerRefused, match="nope"):
            backend.describe([images[1]], [Task("short")])
        assert len(fresh.seen) == 3
        with pytest.raises(ServerRefused, match="nope"):  # a later try asks the server again
            backend.describe([images[1]], [Task("short")])
        assert len(fresh.seen) == 4
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"base_url": "http://192.0.2.7:8000/v1"}, "192.0.2.7 is not this machine"),
        ({"base_url": "http://gpu-box.local/v1"}, "gpu-box.local is not this machine"),
        ({}, "model.base_url: missing"),
        ({"base_url": "ftp://127.0.0.1/v1"}, "expected an http:// or https:// URL"),
        ({"base_url": "http://u:pw@127.0.0.1/v1"}, "no user or password in the URL"),
        ({"api_key": KEY}, "model.api_key: not allowed"),
        ({"api_key_env": KEY}, "the NAME of an environment variable"),
    ],
)
def test_loopback_rule_and_server_settings_refused(tmp_path, model, message):
    distinct_image(0, tmp_path / "pics" / "a.png")
    data = {"backend": "openai", "id": "m", "base_url": "http://127.0.0.1:9/v1", **model}
    if not model:
        del data["base_url"]
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"model": data, "database": str(tmp_path / "i.db")}))
    code, out, err = run_cli("--config", str(cfg), "caption", str(tmp_path / "pics"))
    assert code == 2
    assert message in err
    assert KEY not in err
    assert not (tmp_path / "i.db").exists()


@pytest.mark.parametrize("url", ["http://localhost:9/v1", "http://[::1]:9/v1"])
def test_loopback_names_allowed_and_remote_needs_allow_remote(tmp_path, url):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"backend": "openai", "id": "m", "base_url": url}}))
    code, out, err = run_cli("--config", str(cfg), "--db", str(tmp_path / "i.db"), "status")
    assert code == 0, err
    assert f"images go to: {url} (model m; this machine) (backend openai)" in out
    remote = "https://gpu.example.org/v1"
    cfg.write_text(
        yaml.safe_dump(
            {"model": {"backend": "openai", "id": "m", "base_url": remote, "allow_remote": True}}
        )
    )
    code, out, err = run_cli("--config", str(cfg), "--db", str(tmp_path / "i.db"), "status")
    assert code == 0, err
    assert f"images go to: {remote} (model m; another machine: model.allow_remote)" in out


@pytest.mark.slow
def test_two_daemons_share_one_server(tmp_path, fresh):
    """Two daemons (each with its model process, as in production) caption their own
    folders through the same server."""
    daemons = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        cfg = _config(tmp_path, fresh.base_url, name=f"{name}.yaml", isolate=True)
        data = yaml.safe_load(cfg.read_text())
        data["folders"] = [{"path": str(folder), "settle_seconds": 0.2}]
        cfg.write_text(yaml.safe_dump(data))
        daemons.append((folder, Daemon(cfg, tmp_path).start()))
    try:
        for folder, _ in daemons:
            _images(folder, 3)
        for folder, d in daemons:
            for i in range(3):
                wait_for(lambda d=d, f=folder, i=i: d.captioned(f / f"img{i}.png"), 60, "done")
            assert len(d.rows()) == 3
    finally:
        for _, d in daemons:
            d.stop()
    assert len(fresh.seen) == 6
    answers = sorted(clean_caption(s.answer or "") for s in fresh.seen)
    sidecars = sorted(p.read_text().strip() for folder, _ in daemons for p in folder.glob("*.txt"))
    assert sidecars == answers


def test_model_fetch_downloads_nothing_for_a_model_on_a_server(tmp_path):
    # The tests run with HF_HUB_OFFLINE=1: any attempt at the Hub would end in exit 2.
    cfg = _config(tmp_path, "http://127.0.0.1:9/v1")
    data = yaml.safe_load(cfg.read_text())
    data["search"] = {"embedding_model": None}
    cfg.write_text(yaml.safe_dump(data))
    code, out, err = run_cli("--config", str(cfg), "model", "fetch")
    assert (code, err) == (0, "")
    assert "backend openai: nothing to download for the model." in out
    assert "not test-loaded: the model runs on the server at model.base_url." in out
