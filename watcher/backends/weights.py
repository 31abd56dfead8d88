"""Model weights on disk: is the configured model usable offline, fetch it, show the cache.

Everything here uses huggingface_hub's cache (honouring HF_HOME / HF_HUB_CACHE) and never
imports torch, so `ensure_available` and `cache_info` are quick and work offline. What
differs per backend is asked of its spec (watcher.backends.registry); `HubBackendSpec` is
the part shared by the backends that load from that cache.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from watcher.backends import ModelUnavailable
from watcher.backends.registry import BackendSpec, get_backend
from watcher.config import ModelConfig, SearchConfig

# Moondream2's remote code loads this tokenizer from the Hub at start-up (unpinned, "main").
MOONDREAM_TOKENIZER = "moondream/starmie-v1"
FIX = "run `watcher model fetch` on a connected machine, or set model.path to a local copy"
HUB_PROBE_TIMEOUT = 3.0  # seconds; the whole check stays well under 10 s
_UNPINNED = (None, "", "main", "master")
_SHA = re.compile(r"^[0-9a-f]{40}$")
# Weight formats we never need; a repo's .bin files are skipped when it has safetensors.
_IGNORE = [
    "*.onnx",
    "*.onnx_data",
    "*.gguf",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.tflite",
    "*.mlmodel",
    "*.mf",
    "onnx/*",
    "*.pt",
    "*.pth",
    "*.ckpt",
]


def needs_remote_code(cfg: ModelConfig) -> bool:
    return get_backend(cfg.backend).needs_remote_code(cfg)


def require_pinned_revision(cfg: ModelConfig) -> None:
    """Remote code runs only from a local copy or a pinned revision (tag or commit sha)."""
    if cfg.path or not needs_remote_code(cfg):
        return
    if cfg.revision in _UNPINNED:
        raise ModelUnavailable(
            f"model.revision: {cfg.id} runs code from its repository, which is only trusted "
            f"at a pinned revision (a tag such as 2025-06-21 or a commit sha); got "
            f"{cfg.revision!r}. Set model.revision, or set model.path to a local copy."
        )


def snapshot_revision(path: Path) -> str | None:
    """The commit of a local copy that is a Hugging Face cache snapshot, else None."""
    resolved = path.expanduser().resolve()
    if resolved.parent.name == "snapshots" and _SHA.match(resolved.name):
        return resolved.name
    return None


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` (None: main), or None."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, a bad repo id, an unreadable cache ...
        return None
    return path if path.is_dir() else None


def _has_weights(folder: Path) -> bool:
    return (
        any(folder.glob("*.safetensors"))
        or any(folder.glob("*.bin"))
        or any(folder.glob("*.safetensors.index.json"))
    )


def snapshot_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and _has_weights(folder)


def uses_moondream_tokenizer(folder: Path | None, default: bool) -> bool:
    """Whether loading this model fetches the starmie tokenizer from the Hub.

    Judged from the model's own code when we have it (a tiny test model does not), else
    `default` (the backend's answer: Moondream2 does).
    """
    if folder is not None:
        code = [p.read_text(encoding="utf-8", errors="replace") for p in folder.glob("*.py")]
        if code:
            return any("starmie" in c or "Tokenizer.from_pretrained" in c for c in code)
    return default


def cached_tokenizer_file(repo_id: str = MOONDREAM_TOKENIZER) -> Path | None:
    folder = cached_snapshot(repo_id, None)
    if folder is not None and (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    return None


def offline_mode() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """None when the Hub answers at all; otherwise why not. Bounded by `timeout`.

    Any HTTP answer (even an error status) means reachable. The probe runs in a daemon
    thread so a slow DNS lookup cannot hold us past the deadline.
    """
    if offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    from huggingface_hub import constants

    url = constants.ENDPOINT.rstrip("/") + "/api/models"
    result: list[str | None] = []

    def probe() -> None:
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout):
                pass
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)
        except Exception as e:  # URLError, timeouts, DNS errors, refused connections
            reason = getattr(e, "reason", None) or e
            result.append(f"{constants.ENDPOINT} unreachable: {reason}")

    t = threading.Thread(target=probe, name="hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return f"{constants.ENDPOINT} unreachable: no answer within {timeout:.0f} s"
    return result[0]


class HubBackendSpec(BackendSpec):
    """A backend that loads a Hugging Face model from the cache or from model.path."""

    checks_weights = True
    title = ""  # the model family, for messages ("Moondream loads it at start-up")

    def missing_files(self, cfg: ModelConfig) -> list[str]:
        missing: list[str] = []
        folder: Path | None
        if cfg.path:
            folder = Path(cfg.path).expanduser()
            if not folder.is_dir():
                return []  # the backend reports a bad model.path itself
        else:
            folder = cached_snapshot(cfg.id, cfg.revision)
            if folder is None or not snapshot_complete(folder):
                missing.append(f"model {cfg.id} at revision {cfg.revision or 'main'}")
                folder = None
        for repo_id in self.tokenizers(cfg, folder):
            if cached_tokenizer_file(repo_id) is None:
                missing.append(f"tokenizer {repo_id} ({self.title} loads it at start-up)")
        return missing

    def model_name(self, cfg: ModelConfig) -> str:
        return str(Path(cfg.path).expanduser()) if cfg.path else cfg.id

    def model_revision(self, cfg: ModelConfig) -> str | None:
        return snapshot_revision(Path(cfg.path)) if cfg.path else cfg.revision


def missing_files(cfg: ModelConfig) -> list[str]:
    """What the configured model still needs from the Hub, as phrases for a message."""
    return get_backend(cfg.backend).missing_files(cfg)


def ensure_available(cfg: ModelConfig, *, daemon: bool = False) -> None:
    """Raise ModelUnavailable quickly, with one clear message, when loading cannot work.

    That is: an unpinned revision for remote code, or files missing from the cache while
    the Hub cannot be reached (offline mode, or no answer within a few seconds). When
    files are missing but the Hub answers, loading goes on and downloads them.
    A backend that manages its own weights (Photon) has nothing missing here.

    `daemon`: for `watcher run`, which never downloads (it sets HF_HUB_OFFLINE for itself):
    missing files are an error at once, and the message says so rather than blaming a
    setting the user did not make.
    """
    require_pinned_revision(cfg)
    missing = missing_files(cfg)
    if not missing:
        return
    if daemon:
        raise ModelUnavailable(
            f"{' and '.join(missing)} not found in the Hugging Face cache ({hub_cache_dir()}); "
            f"`watcher run` never downloads. To fix: {FIX}."
        )
    reason = hub_unreachable()
    if reason is None:
        return
    raise ModelUnavailable(
        f"{' and '.join(missing)} not found in the Hugging Face cache ({hub_cache_dir()}) "
        f"and the Hub cannot be reached ({reason}). To fix: {FIX}."
    )


# --- watcher model fetch / watcher model info, as data (the CLI prints them) -------------


@dataclass(frozen=True)
class FetchStep:
    """One step of `fetch`, reported as it happens (for a progress line).

    "local copy": model.path is used as it is (`folder`); "downloading": `repo_id` at
    `revision` starts (`tokenizer`: a tokenizer the model loads); "downloaded": it is in
    `folder`, `size` bytes; "cached": everything is in the HF cache `folder`;
    "test-loading": the model is being loaded from the cache; "elsewhere": the backend's
    model is not downloaded (it runs on a server).
    """

    kind: Literal["local copy", "downloading", "downloaded", "cached", "test-loading", "elsewhere"]
    repo_id: str | None = None
    revision: str | None = None
    tokenizer: bool = False
    folder: Path | None = None
    size: int = 0


FetchOutcome = Literal[
    "refused", "no network", "download failed", "downloaded", "loads", "does not load"
]


@dataclass(frozen=True)
class FetchReport:
    """How `fetch` ended, after its `steps`.

    outcome: "refused" (an unpinned revision for remote code; `message` says why), "no
    network" (the Hub cannot be reached; `message` is why), "download failed" (`message`:
    the error's type and first line), "downloaded" (not test-loaded: asked not to, or
    `not_test_loaded` says why), "loads" (test-loaded from the cache) or "does not load"
    (`message`: the error's first line).
    """

    outcome: FetchOutcome
    steps: tuple[FetchStep, ...]
    message: str = ""
    not_test_loaded: str | None = None


def fetch(
    cfg: ModelConfig,
    revision: str | None,
    *,
    verify: bool = True,
    on_step: Callable[[FetchStep], None] | None = None,
) -> FetchReport:
    """Download the model (and the tokenizers it loads) into the HF cache, then check it
    loads. `on_step` hears of every step as it happens. Never raises for a refused
    request, a failed download or a model that does not load: the report says which."""
    target = dataclasses.replace(cfg, revision=revision or cfg.revision)
    spec = get_backend(target.backend)
    steps: list[FetchStep] = []

    def step(s: FetchStep) -> None:
        steps.append(s)
        if on_step is not None:
            on_step(s)

    def report(
        outcome: FetchOutcome, message: str = "", not_test_loaded: str | None = None
    ) -> FetchReport:
        return FetchReport(outcome, tuple(steps), message, not_test_loaded)

    try:
        require_pinned_revision(target)
    except ModelUnavailable as e:
        return report("refused", str(e))
    if not spec.downloads:
        step(FetchStep("elsewhere"))
        return report("downloaded", not_test_loaded=spec.not_test_loaded)
    folder: Path | None = None
    try:
        if target.path:
            folder = Path(target.path).expanduser()
            step(FetchStep("local copy", folder=folder))
        else:
            step(FetchStep("downloading", target.id, target.revision))
            folder = _download(target.id, target.revision)
            step(
                FetchStep(
                    "downloaded", target.id, target.revision, folder=folder, size=_size(folder)
                )
            )
        for repo_id in spec.tokenizers(target, folder if folder and folder.is_dir() else None):
            step(FetchStep("downloading", repo_id, tokenizer=True))
            tok = _download(repo_id, None)
            step(FetchStep("downloaded", repo_id, tokenizer=True, folder=tok, size=_size(tok)))
    except Exception as e:
        reason = _network_reason(e)
        if reason is None:
            return report("download failed", f"{type(e).__name__}: {first_line(e)}")
        return report("no network", reason)
    step(FetchStep("cached", folder=hub_cache_dir()))
    if not verify:
        return report("downloaded")
    if spec.not_test_loaded is not None:
        return report("downloaded", not_test_loaded=spec.not_test_loaded)
    from watcher.backends import load_backend

    step(FetchStep("test-loading"))
    try:
        backend = load_backend(target)
    except Exception as e:
        return report("does not load", first_line(e))
    backend.close()
    return report("loads")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover


def _size(folder: Path) -> int:
    """Bytes on disk under `folder`, following the cache's symlinks to their blobs once."""
    seen: set[Path] = set()
    total = 0
    for p in folder.rglob("*"):
        try:
            real = p.resolve()
            if real in seen or not real.is_file():
                continue
            seen.add(real)
            total += real.stat().st_size
        except OSError:
            continue
    return total


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(repo_id, revision=revision)
    ignore = list(_IGNORE)
    if any(f.endswith(".safetensors") for f in files):
        ignore.append("*.bin")
    return Path(snapshot_download(repo_id, revision=revision, ignore_patterns=ignore))


# Exception type names (anywhere in the chain) that mean "no network to the Hub": the
# requests/urllib3/httpx stack's and huggingface_hub's own, matched by name so none of
# those libraries need importing here.
_NETWORK_ERRORS = {
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "Timeout",
    "TimeoutException",
    "MaxRetryError",
    "NewConnectionError",
    "NameResolutionError",
    "ProxyError",
    "SSLError",
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "gaierror",
    "timeout",
    "TimeoutError",
    "ConnectionRefusedError",
    "ConnectionResetError",
    "URLError",
}


def _network_reason(e: BaseException) -> str | None:
    """Why the Hub could not be reached, in a few words, or None for any other error."""
    chain, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if not any(type(x).__name__ in _NETWORK_ERRORS for x in chain):
        return None
    if offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE is set in your environment; unset it)"
    inner = chain[-1]
    detail = getattr(inner, "strerror", None) or first_line(inner)
    return f"no connection ({type(inner).__name__}: {detail})"


def first_line(e: BaseException, limit: int = 300, *, drop_stop: bool = False) -> str:
    """The first line of an error's text, at most `limit` characters, for a message.
    `drop_stop`: without a closing full stop (the message goes on after it)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if drop_stop and text:
        line = line.rstrip(". ")
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass(frozen=True)
class CachedRevision:
    refs: tuple[str, ...]  # sorted tag/branch names; empty: none
    commit: str
    size: int


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    size: int
    revisions: tuple[CachedRevision, ...]  # newest first


@dataclass(frozen=True)
class CacheInfo:
    """What `watcher model info` reports: the configured model and what is cached."""

    cache: Path
    local_path: Path | None  # model.path, when set
    local_size: int | None  # its size; None: the folder is missing
    cached: bool  # without model.path: whether the configured snapshot is complete
    # What loading offline still needs; None: the backend's weights are not checked.
    missing: tuple[str, ...] | None
    models: tuple[CachedModel, ...] = ()  # model repositories in the cache, by id
    warnings: tuple[str, ...] = ()
    cache_error: str | None = None  # the cache exists but could not be read


def cache_info(cfg: ModelConfig) -> CacheInfo:
    """What is cached, at which revisions, and how big. Reads the disk only."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = hub_cache_dir()
    local_path: Path | None = None
    local_size: int | None = None
    cached = False
    if cfg.path:
        local_path = Path(cfg.path).expanduser()
        local_size = _size(local_path) if local_path.is_dir() else None
    else:
        folder = cached_snapshot(cfg.id, cfg.revision)
        cached = folder is not None and snapshot_complete(folder)
    spec = get_backend(cfg.backend)
    missing = tuple(missing_files(cfg)) if spec.checks_weights else None
    base = CacheInfo(cache, local_path, local_size, cached, missing)
    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:
        return base
    except Exception as e:
        return dataclasses.replace(base, cache_error=str(e))
    repos = sorted((r for r in info.repos if r.repo_type == "model"), key=lambda r: r.repo_id)
    models = tuple(
        CachedModel(
            repo.repo_id,
            repo.size_on_disk,
            tuple(
                CachedRevision(tuple(sorted(rev.refs)), rev.commit_hash, rev.size_on_disk)
                for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
            ),
        )
        for repo in repos
    )
    return dataclasses.replace(base, models=models, warnings=tuple(str(w) for w in info.warnings))


def fetch_embedding(
    search: SearchConfig, *, on_step: Callable[[FetchStep], None] | None = None
) -> FetchReport | None:
    """`watcher model fetch`'s second part: the caption-embedding model of `search:` at its
    pinned revision (None: nothing to fetch: semantic search off, or a local folder)."""
    name = search.embedding_model
    if name is None or name.startswith((".", "~", "/")):
        return None
    steps: list[FetchStep] = []

    def step(s: FetchStep) -> None:
        steps.append(s)
        if on_step is not None:
            on_step(s)

    step(FetchStep("downloading", name, search.embedding_revision))
    try:
        folder = _download(name, search.embedding_revision)
    except Exception as e:
        reason = _network_reason(e)
        if reason is None:
            return FetchReport(
                "download failed", tuple(steps), f"{type(e).__name__}: {first_line(e)}"
            )
        return FetchReport("no network", tuple(steps), reason)
    step(
        FetchStep("downloaded", name, search.embedding_revision, folder=folder, size=_size(folder))
    )
    return FetchReport("downloaded", tuple(steps))
