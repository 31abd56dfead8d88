"""Moondream through the whole product: `watcher caption`, the daemon, and offline failure."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from daemon_harness import Daemon, wait_for
from images import distinct_image

import watcher.backends as backends
from watcher.cli import main


def _config(tmp_path: Path, model: Path, folder: dict | None = None) -> Path:
    data = {
        "model": {"backend": "moondream", "path": str(model), "max_tokens": 9},
        "database": str(tmp_path / "index.db"),
        "log": {"format": "json"},
    }
    if folder:
        data["folders"] = [folder]
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_caption_with_moondream_encodes_each_image_once(tmp_path, tiny_moondream, monkeypatch):
    pics = tmp_path / "pics"
    for i in range(4):
        distinct_image(i, pics / f"{i}.jpg")
    cfg = _config(
        tmp_path,
        tiny_moondream,
        {"path": str(pics), "task": "prompt", "index_tasks": ["short", "long"]},
    )
    loaded = []
    real = backends.load_backend

    def spy(model_cfg, _log_cfg=None):  # in this process, to count the model's calls
        b = real(model_cfg)
        loaded.append(b.model)  # close() drops the backend's reference
        return b

    monkeypatch.setattr(backends, "open_backend", spy)
    out = io.StringIO()
    assert main(["--config", str(cfg), "caption", str(pics)], out=out, err=io.StringIO()) == 0
    assert "4 new, 0 up to date, 0 failed" in out.getvalue()
    [model] = loaded
    assert model.encode_image_calls == 4  # three outputs per image, one encoding
    methods = sorted({(c[0], c[1] if c[0] == "caption" else "q") for c in model.calls})
    assert methods == [("caption", "long"), ("caption", "short"), ("query", "q")]
    assert all(c[2] == {"temperature": 0, "variant": None, "max_tokens": 9} for c in model.calls)
    con = sqlite3.connect(tmp_path / "index.db")
    rows = con.execute("SELECT path, caption, task, outputs FROM images").fetchall()
    assert len(rows) == 4
    for path, caption, task, outputs in rows:
        outputs = json.loads(outputs)
        assert task == "prompt" and set(outputs) == {"prompt", "short", "long"}
        assert Path(path).with_suffix(".txt").read_text() == caption + "\n"
        assert caption.strip()


@pytest.mark.slow  # 30-50 s on 2 busy cores (daemon start-ups)
def test_daemon_with_moondream(tmp_path, tiny_moondream):
    watched = tmp_path / "watched"
    watched.mkdir()
    cfg = _config(
        tmp_path, tiny_moondream, {"path": str(watched), "settle_seconds": 0.2, "task": "normal"}
    )
    with Daemon(cfg, tmp_path) as d:
        distinct_image(1, watched / "a.jpg")
        distinct_image(2, watched / "b.jpg")
        wait_for(
            lambda: d.captioned(watched / "a.jpg") and d.captioned(watched / "b.jpg"),
            60,
            "moondream sidecars",
        )
        assert (watched / "a.txt").read_text() != (watched / "b.txt").read_text()
        [ready] = d.logged("model ready")
        assert ready["model"] == str(tiny_moondream) and "cpu" in ready["placement"]


@pytest.mark.parametrize("command", ["caption", "run"])
def test_missing_weights_fail_fast_with_the_fix(tmp_path, silent_hub, command):
    pics = tmp_path / "pics"
    distinct_image(1, pics / "a.jpg")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")
    }
    env.update(
        HF_HOME=str(tmp_path / "empty-hf-home"),
        HF_ENDPOINT=silent_hub,
        WATCHER_DB=str(tmp_path / "index.db"),
        WATCHER_CONFIG=str(tmp_path / "no-config.yaml"),
    )
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "watcher", command, str(pics)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 2
    # Generous (interpreter start-up on a loaded machine), yet far below the Hub client's
    # retries against a Hub that never answers.
    assert elapsed < 30, f"took {elapsed:.1f}s"
    message = [line for line in r.stderr.splitlines() if line.startswith("watcher: ")]
    assert len(message) == 1, r.stderr
    for needed in ("vikhyatk/moondream2", "2025-06-21", "watcher model fetch", "model.path"):
        assert needed in message[0]
    assert not (pics / "a.txt").exists()
