"""Model weights on disk: is the configured model usable offline, fetch it, show the cache.

Everything here uses huggingface_hub's cache (honouring HF_HOME / HF_HUB_CACHE) and never
imports torch, so `ensure_available` and `cmd_info` are quick and work offline.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from watcher.backends import ModelUnavailable
from watcher.config import ModelConfig

# Moondream2's remote code loads this tokenizer from the Hub at start-up (unpinned, "main").
MOONDREAM_TOKENIZER = "moondream/starmie-v1"
FIX = "run `watcher model fetch` on a connected machine, or set model.path to a local copy"
HUB_PROBE_TIMEOUT = 3.0  # seconds; the whole check stays well under 10 s
_UNPINNED = (None, "", "main", "master")
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
    return cfg.backend == "moondream" or cfg.trust_remote_code


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


def uses_moondream_tokenizer(folder: Path | None, cfg: ModelConfig) -> bool:
    """Whether loading this model fetches the starmie tokenizer from the Hub.

    Judged from the model's own code when we have it (a tiny test model does not), else
    from the backend: Moondream2 does.
    """
    if folder is not None:
        code = [p.read_text(encoding="utf-8", errors="replace") for p in folder.glob("*.py")]
        if code:
            return any("starmie" in c or "Tokenizer.from_pretrained" in c for c in code)
    return cfg.backend == "moondream"


def cached_tokenizer_file() -> Path | None:
    folder = cached_snapshot(MOONDREAM_TOKENIZER, None)
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


def missing_files(cfg: ModelConfig) -> list[str]:
    """What the configured model still needs from the Hub, as phrases for a message."""
    missing: list[str] = []
    folder: Path | None = None
    if cfg.path:
        folder = Path(cfg.path).expanduser()
        if not folder.is_dir():
            return []  # the backend reports a bad model.path itself
    elif cfg.backend != "photon":
        folder = cached_snapshot(cfg.id, cfg.revision)
        if folder is None or not snapshot_complete(folder):
            missing.append(f"model {cfg.id} at revision {cfg.revision or 'main'}")
            folder = None
    if cfg.backend == "moondream" and uses_moondream_tokenizer(folder, cfg):
        if cached_tokenizer_file() is None:
            missing.append(f"tokenizer {MOONDREAM_TOKENIZER} (Moondream loads it at start-up)")
    return missing


def ensure_available(cfg: ModelConfig, *, daemon: bool = False) -> None:
    """Raise ModelUnavailable quickly, with one clear message, when loading cannot work.

    That is: an unpinned revision for remote code, or files missing from the cache while
    the Hub cannot be reached (offline mode, or no answer within a few seconds). When
    files are missing but the Hub answers, loading goes on and downloads them.
    Photon manages its own weights and is not checked here.

    `daemon`: for `watcher run`, which never downloads (it sets HF_HUB_OFFLINE for itself):
    missing files are an error at once, and the message says so rather than blaming a
    setting the user did not make.
    """
    require_pinned_revision(cfg)
    if cfg.backend == "photon":
        return
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


# --- CLI: watcher model fetch / watcher model info ---------------------------------------


def _human(n: int) -> str:
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


def cmd_fetch(
    cfg: ModelConfig,
    revision: str | None,
    out: TextIO,
    *,
    verify: bool = True,
    err: TextIO | None = None,
) -> int:
    """Download the model (and Moondream's tokenizer) into the HF cache, then check it loads.

    Returns 0 when everything is in place, 1 on a download or load failure, 2 when the
    request itself is refused (an unpinned revision for remote code) or the Hub cannot be
    reached: one line on `err` saying what to do, never an exception dump.
    """
    import dataclasses

    err = err or out
    target = dataclasses.replace(cfg, revision=revision or cfg.revision)
    try:
        require_pinned_revision(target)
    except ModelUnavailable as e:
        print(f"watcher: {e}", file=err)
        return 2
    folder: Path | None = None
    try:
        if target.path:
            folder = Path(target.path).expanduser()
            print(
                f"model.path is set: {folder} is used as it is; nothing to download for the model.",
                file=out,
            )
        else:
            print(f"fetching {target.id} at revision {target.revision or 'main'} ...", file=out)
            folder = _download(target.id, target.revision)
            print(f"  {folder} ({_human(_size(folder))})", file=out)
        if target.backend in ("moondream", "photon") and uses_moondream_tokenizer(
            folder if folder and folder.is_dir() else None, target
        ):
            print(f"fetching tokenizer {MOONDREAM_TOKENIZER} ...", file=out)
            tok = _download(MOONDREAM_TOKENIZER, None)
            print(f"  {tok} ({_human(_size(tok))})", file=out)
    except Exception as e:
        reason = _network_reason(e)
        if reason is None:
            print(f"watcher: download failed: {type(e).__name__}: {_first_line(e)}", file=err)
            return 1
        print(
            f"watcher: cannot download from the Hugging Face Hub: {reason}. Connect this "
            "machine to the network and run `watcher model fetch` again, or fetch on a "
            f"connected machine and copy its cache ({hub_cache_dir()}) here, or set "
            "model.path to a local copy.",
            file=err,
        )
        return 2
    print(f"cache: {hub_cache_dir()}", file=out)
    if not verify:
        return 0
    if target.backend == "photon":
        print("not test-loaded: Photon loads on its GPU machine.", file=out)
        return 0
    from watcher.backends import load_backend

    print("test-loading the model ...", file=out)
    try:
        backend = load_backend(target)
    except Exception as e:
        print(f"watcher: downloaded, but it does not load: {_first_line(e)}", file=err)
        return 1
    backend.close()
    print("ok: the model loads from the cache; it works offline now.", file=out)
    return 0


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
    detail = getattr(inner, "strerror", None) or _first_line(inner)
    return f"no connection ({type(inner).__name__}: {detail})"


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _revision_lines(revisions: Iterable) -> list[str]:
    lines = []
    for rev in sorted(revisions, key=lambda r: r.last_modified, reverse=True):
        refs = ", ".join(sorted(rev.refs)) or "no tag"
        lines.append(f"    {refs} (commit {rev.commit_hash[:12]}): {_human(rev.size_on_disk)}")
    return lines


def cmd_info(cfg: ModelConfig, out: TextIO) -> int:
    """What is cached, at which revisions, and how big. Reads the disk only."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = hub_cache_dir()
    print(f"Hugging Face cache: {cache}", file=out)
    if cfg.path:
        p = Path(cfg.path).expanduser()
        state = f"{_human(_size(p))}" if p.is_dir() else "missing"
        print(f"model.path: {p} ({state})", file=out)
    else:
        folder = cached_snapshot(cfg.id, cfg.revision)
        status = "cached" if folder is not None and snapshot_complete(folder) else "not cached"
        print(
            f"configured: {cfg.backend} {cfg.id} at revision {cfg.revision or 'main'}: {status}",
            file=out,
        )
    if cfg.backend != "photon":
        missing = missing_files(cfg)
        if missing:
            print(f"not ready offline: missing {' and '.join(missing)}; to fix: {FIX}", file=out)
        else:
            print("ready to run offline", file=out)
    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:
        print("nothing cached yet", file=out)
        return 0
    except Exception as e:
        print(f"cannot read the cache: {e}", file=out)
        return 1
    repos = sorted((r for r in info.repos if r.repo_type == "model"), key=lambda r: r.repo_id)
    if not repos:
        print("nothing cached yet", file=out)
        return 0
    print("cached models:", file=out)
    for repo in repos:
        print(f"  {repo.repo_id}: {_human(repo.size_on_disk)}", file=out)
        for line in _revision_lines(repo.revisions):
            print(line, file=out)
    for warning in info.warnings:
        print(f"warning: {warning}", file=out)
    return 0
