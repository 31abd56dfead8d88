"""watcher.backends.weights: fail fast offline, fetch into the HF cache, report what is cached."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from tiny_moondream import install_in_hf_cache, model_files, tiny_tokenizer_json

from watcher.backends import ModelUnavailable
from watcher.backends.weights import (
    MOONDREAM_TOKENIZER,
    ensure_available,
    hub_unreachable,
)
from watcher.cli import model_fetch, model_info
from watcher.config import DEFAULT_MOONDREAM_REVISION, ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def _env(hf_home: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HF_HUB_CACHE",
            "HF_ENDPOINT",
            "HUGGINGFACE_HUB_CACHE",
            "TRANSFORMERS_CACHE",
        )
    }
    env["HF_HOME"] = str(hf_home)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env.update(extra)
    return env


@pytest.fixture
def answering_hub():
    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """Point huggingface_hub (in this process) at an empty cache under tmp_path."""
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return hub


_ENSURE = """
import sys, time
from watcher.backends import ModelUnavailable, load_backend
from watcher.config import ModelConfig
t0 = time.monotonic()
try:
    load_backend(ModelConfig())
except ModelUnavailable as e:
    print(f"{time.monotonic() - t0:.2f}")
    print(e)
    sys.exit(3)
print("loaded")
"""


@pytest.mark.parametrize("hub", ["silent", "offline"])
def test_offline_failure_is_fast_and_says_how_to_fix(tmp_path, silent_hub, hub):
    # Empty HF_HOME and HF_HUB_OFFLINE unset: the check must not wait for the Hub
    # client's retries. "silent" is the worst case: a Hub that never answers.
    extra = {"HF_ENDPOINT": silent_hub} if hub == "silent" else {"HF_HUB_OFFLINE": "1"}
    env = _env(tmp_path / "empty-hf-home", **extra)
    proc = subprocess.run(
        [sys.executable, "-c", _ENSURE], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    first, message = proc.stdout.split("\n", 1)
    # The check itself (not interpreter start-up): bounded by the 3 s probe, well under
    # huggingface_hub's own 10 s request timeout, so its retries were not waited for.
    assert float(first) < 9.5
    assert "vikhyatk/moondream2" in message
    assert DEFAULT_MOONDREAM_REVISION in message
    assert "watcher model fetch" in message and "model.path" in message
    assert MOONDREAM_TOKENIZER in message
    assert message.count("\n") == 1  # one message, one line
    assert "torch" not in proc.stderr  # failed before importing the model stack


def test_hub_probe(silent_hub, answering_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", answering_hub)
    assert hub_unreachable(timeout=2) is None
    monkeypatch.setattr(constants, "ENDPOINT", silent_hub)
    started = time.monotonic()
    reason = hub_unreachable(timeout=0.5)
    assert reason is not None and silent_hub in reason
    assert time.monotonic() - started < 3  # its timeout, not the default HUB_PROBE_TIMEOUT
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "offline" in hub_unreachable()


def test_missing_but_hub_answers_lets_loading_download(hub_cache, answering_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", answering_hub)
    ensure_available(ModelConfig())  # no raise: from_pretrained will fetch


def test_cached_model_is_available_offline(hub_cache, tiny_moondream):
    install_in_hf_cache(
        model_files(tiny_moondream),
        hub_cache,
        "vikhyatk/moondream2",
        ref=DEFAULT_MOONDREAM_REVISION,
    )
    ensure_available(ModelConfig())  # the tiny model's code needs no tokenizer
    with pytest.raises(ModelUnavailable, match="revision 2024-01-01"):
        ensure_available(ModelConfig(revision="2024-01-01"))


def test_tokenizer_required_when_the_code_loads_it(hub_cache, tiny_moondream):
    files = model_files(tiny_moondream)
    files["moondream.py"] = b'Tokenizer.from_pretrained("moondream/starmie-v1")\n'
    install_in_hf_cache(files, hub_cache, "vikhyatk/moondream2", ref=DEFAULT_MOONDREAM_REVISION)
    with pytest.raises(ModelUnavailable) as err:
        ensure_available(ModelConfig())
    assert MOONDREAM_TOKENIZER in str(err.value)
    assert "vikhyatk/moondream2 at" not in str(err.value)  # the model itself is there
    install_in_hf_cache({"tokenizer.json": tiny_tokenizer_json()}, hub_cache, MOONDREAM_TOKENIZER)
    ensure_available(ModelConfig())


def test_local_path_skips_the_cache(hub_cache, tiny_moondream):
    ensure_available(ModelConfig(path=str(tiny_moondream), revision=None))


def test_unpinned_revision_refused_before_anything_else(hub_cache):
    with pytest.raises(ModelUnavailable, match="pinned revision"):
        ensure_available(ModelConfig(revision="main"))


def test_info_on_an_empty_cache(hub_cache):
    out = io.StringIO()
    assert model_info(ModelConfig(), out) == 0
    text = out.getvalue()
    assert str(hub_cache) in text
    assert "vikhyatk/moondream2 at revision 2025-06-21: not cached" in text
    assert "watcher model fetch" in text
    assert "nothing cached yet" in text


def test_info_on_a_populated_cache(hub_cache, tiny_moondream):
    snap = install_in_hf_cache(
        model_files(tiny_moondream),
        hub_cache,
        "vikhyatk/moondream2",
        ref=DEFAULT_MOONDREAM_REVISION,
    )
    install_in_hf_cache({"tokenizer.json": tiny_tokenizer_json()}, hub_cache, MOONDREAM_TOKENIZER)
    out = io.StringIO()
    assert model_info(ModelConfig(), out) == 0
    text = out.getvalue()
    assert "vikhyatk/moondream2 at revision 2025-06-21: cached" in text
    assert "ready to run offline" in text
    assert f"2025-06-21 (commit {snap.name[:12]})" in text
    assert MOONDREAM_TOKENIZER in text and "main (commit" in text
    assert " KB" in text or " MB" in text


def test_info_with_a_local_path(hub_cache, tiny_moondream):
    out = io.StringIO()
    assert model_info(ModelConfig(path=str(tiny_moondream)), out) == 0
    assert f"model.path: {tiny_moondream} (" in out.getvalue()


def test_fetch_refuses_an_unpinned_revision():
    out = io.StringIO()
    assert model_fetch(ModelConfig(), "main", out) == 2
    assert "pinned revision" in out.getvalue()


def test_fetch_reports_a_download_failure(hub_cache, monkeypatch):
    # Tests run with HF_HUB_OFFLINE=1: the Hub client refuses at once, and that is the
    # environment's doing (exit 2), said in one line.
    out = io.StringIO()
    assert model_fetch(ModelConfig(), None, out, verify=False) == 2
    assert "HF_HUB_OFFLINE is set in your environment" in out.getvalue().splitlines()[-1]

    import watcher.backends.weights as models

    def broken(repo_id, revision):
        raise ValueError("the repository is odd\nmore lines")

    monkeypatch.setattr(models, "_download", broken)
    out = io.StringIO()
    assert model_fetch(ModelConfig(), None, out, verify=False) == 1
    assert out.getvalue().splitlines()[-1] == (
        "watcher: download failed: ValueError: the repository is odd"
    )


_FETCH = """
import sys, time
from pathlib import Path
from PIL import Image
import watcher.backends.weights as models
from tiny_moondream import install_in_hf_cache, model_files, tiny_tokenizer_json
from watcher.backends import load_backend
from watcher.cli import model_fetch, model_info
from watcher.config import ModelConfig
from watcher.tasks import Task

tiny = Path(sys.argv[1])
def fake_download(repo_id, revision):  # lays out what snapshot_download leaves behind
    if repo_id == models.MOONDREAM_TOKENIZER:
        files = {"tokenizer.json": tiny_tokenizer_json()}
    else:
        assert repo_id == "vikhyatk/moondream2", repo_id
        files = model_files(tiny)
    return install_in_hf_cache(files, models.hub_cache_dir(), repo_id, ref=revision or "main")
models._download = fake_download
rc = model_fetch(ModelConfig(), None, sys.stdout)
print("RC", rc)
t0 = time.monotonic()
b = load_backend(ModelConfig())
print("SECONDS", round(time.monotonic() - t0, 2))
print("LOADED", b.name, b.revision, b.model.tokenizer.get_vocab_size())
print("OUT", b.describe([Image.new("RGB", (32, 32), "red")], [Task("short")]))
model_info(ModelConfig(), sys.stdout)
"""


@pytest.mark.slow  # a fresh interpreter that loads the model twice: 30-50 s on 2 busy cores
def test_fetch_then_load_by_id_without_the_hub(tmp_path, silent_hub):
    """Fetch into an empty HF_HOME (the download faked), test-load, load again by id.

    The model, like Moondream2, fetches its tokenizer while loading. Offline mode is not
    set and the Hub never answers: with everything cached, nothing may wait on it.
    """
    from tiny_moondream import build_tiny_moondream

    model = build_tiny_moondream(tmp_path / "tiny-tok", tokenizer=True)
    env = _env(tmp_path / "hf-home", HF_ENDPOINT=silent_hub)
    proc = subprocess.run(
        [sys.executable, "-c", _FETCH, str(model)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "RC 0" in out
    assert f"fetching tokenizer {MOONDREAM_TOKENIZER}" in out
    assert "ok: the model loads from the cache" in out
    assert str(tmp_path / "hf-home" / "hub") in out
    # A second load (the stack is imported by then): under huggingface_hub's own 10 s
    # request timeout, so nothing waited on the Hub that never answers.
    assert float(out.split("SECONDS ")[1].split()[0]) < 9.5, out
    assert "LOADED vikhyatk/moondream2 2025-06-21 4" in out  # 4: the tiny tokenizer's vocab
    assert "OUT [['" in out
    assert "ready to run offline" in out
    assert (
        textwrap.dedent("""\
        cached models:
          moondream/starmie-v1: """)
        in out
    )
    assert "  vikhyatk/moondream2: " in out
