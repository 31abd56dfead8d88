"""One watcher as the model server of others: `backend: openai` against a daemon's own
/v1/chat/completions (issue 17 with the web API of issue 14), over real HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from daemon_harness import Daemon, run_cli, wait_for
from images import distinct_image
from web_harness import web_config, web_url, write_noise

TOKEN = "the-server-watchers-token-1234"


def client_config(tmp: Path, base_url: str, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    data = {
        "model": {
            "backend": "openai",
            "base_url": base_url,
            "id": "moondream",
            "api_key_env": "WATCHER_SERVER_KEY",
            "isolate": False,
            "max_tokens": 12,
            "batch_size": 4,
        },
        "database": str(tmp / f"{name}.db"),
        "search": {"embedding_model": None},
        "log": {"level": "info", "format": "json"},
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_two_watchers_caption_through_a_third_watchers_model(
    tmp_path: Path, tiny_moondream: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    own = write_noise(server_dir / "watched" / "own.png", seed=1)
    server = Daemon(
        web_config(server_dir, tiny_moondream, [str(own.parent)], web={"token": TOKEN}),
        server_dir,
    )
    server.start()
    try:
        base_url = web_url(server) + "/v1"
        wait_for(lambda: server.captioned(own), 120, "the server's own image")
        pics = tmp_path / "pics"
        for i in (11, 12, 13):
            distinct_image(i, pics / f"p{i}.png")
        copy = tmp_path / "pics-copy"
        shutil.copytree(pics, copy)

        # Without the key the server refuses: a clear per-image failure, exit 1.
        monkeypatch.setenv("WATCHER_SERVER_KEY", "wrong-token-wrong-token")
        code, out, err = run_cli(
            "--config", str(client_config(tmp_path, base_url, "bad")), "caption", str(pics)
        )
        assert code == 1, out + err
        assert "401" in out + err

        monkeypatch.setenv("WATCHER_SERVER_KEY", TOKEN)
        texts = []
        for name, folder in (("a", pics), ("b", copy)):
            cfg = client_config(tmp_path, base_url, name)
            code, out, err = run_cli("--config", str(cfg), "caption", str(folder))
            assert code == 0, out + err
            assert "3 new, 0 up to date, 0 failed" in out
            texts.append({p.name: p.read_text() for p in sorted(folder.glob("*.txt"))})
            code, status, _ = run_cli("--config", str(cfg), "status")
            assert f"images go to: {base_url} (model moondream; this machine)" in status
            # A second run sends nothing: everything is up to date.
            code, out, _ = run_cli("--config", str(cfg), "caption", str(folder))
            assert code == 0 and "0 new, 3 up to date" in out
        a, b = texts
        assert sorted(a) == ["p11.txt", "p12.txt", "p13.txt"]
        assert all(t.strip() for t in a.values())
        assert len(set(a.values())) > 1  # the answers depend on the image
        assert a == b  # two watchers, one server: the same captions
    finally:
        server.stop()
