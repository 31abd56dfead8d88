"""`watcher init`: a commented config file with every key at its default."""

from __future__ import annotations

import json
from pathlib import Path

from watcher.backends.registry import backend_names
from watcher.config import (
    DEFAULT_LISTEN,
    Config,
    FolderConfig,
    ModelConfig,
    SearchConfig,
    WebConfig,
)


def _y(value: object) -> str:
    """A YAML scalar or flow list (JSON is valid YAML for these)."""
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)


def render_config(folders: list[Path], database: Path | None = None) -> str:
    """The config text: defaults filled in from the code (so it cannot drift), comments
    saying what each key does, and `folders` watched."""
    m, c, f, w = ModelConfig(), Config(), FolderConfig(path=Path(".")), WebConfig()
    s = SearchConfig()
    db = database or c.database
    folder_lines = "\n".join(f"  - path: {_y(str(p))}" for p in folders) or "  []"
    if not folders:
        folder_lines = (
            "  []   # e.g.\n  # - path: ~/Pictures/inbox\n"
            "  # - path: ~/datasets/lora\n  #   task: prompt"
        )
    return f"""\
# moondream-watcher configuration, written by `watcher init`. Every key is at its default;
# change what you need. Reference: config.example.yaml in the project.

model:
  backend: {m.backend}                # {" | ".join(backend_names())}
  id: {_y(m.id)}    # Hugging Face model id
  revision: {_y(m.revision)}           # a tag or commit; remote code is never run unpinned
  path: null                       # a local copy of the model; wins over id/revision
  device: {m.device}                     # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
  dtype: {m.dtype}                      # auto | float32 | float16 | bfloat16
  batch_size: {m.batch_size}                    # images per model call
  max_tokens: {m.max_tokens}                  # longest output, in tokens
  trust_remote_code: {_y(m.trust_remote_code)}         # transformers backend only
  isolate: {_y(m.isolate)}                    # run the model in its own process
  # backend openai: an OpenAI-compatible server (vLLM, Ollama, LM Studio, llama.cpp);
  # id is the server's model name. The API key is read from the environment variable
  # named here, never written in this file.
  base_url: null                   # e.g. http://127.0.0.1:11434/v1; required for openai
  api_key_env: null                # e.g. OPENAI_API_KEY (the variable's name, not the key)
  allow_remote: {_y(m.allow_remote)}             # true: base_url may be another machine
  concurrency: {m.concurrency}                   # requests in flight, so the server can batch
  timeout: {m.timeout}                   # seconds per request
  retries: {m.retries}                       # more tries after a 429, 5xx, timeout or no connection

database: {_y(str(db))}   # the index: captions, search, queue

decode_threads: {c.decode_threads}                  # CPU threads that read and prepare images
max_pixels: {c.max_pixels}              # refuse images above this many pixels
max_side: {c.max_side}                     # downscale larger images before the model
max_attempts: {c.max_attempts}                    # transient errors retry this often
retry_backoff: {c.retry_backoff}                 # seconds before the first retry, doubled each time

log:
  format: {c.log.format}                     # auto (JSON unless on a terminal) | json | console
  level: {c.log.level}                      # debug | info | warning | error

# The web page and the Moondream-compatible HTTP API that `watcher run` serves.
web:
  enabled: {_y(w.enabled)}                    # serve them while the daemon runs
  listen: {_y(DEFAULT_LISTEN)}         # host:port; anything but loopback needs a token
  token: null                      # a secret (16+ characters) every request must carry
  max_body_bytes: {w.max_body_bytes}          # largest request body (uploads)
  allowed_hosts: {_y(w.allowed_hosts)}                # other Host names (a reverse proxy)
  thumb_cache: null                # thumbnails; null: the user cache folder
  thumb_cache_mb: {w.thumb_cache_mb}               # size cap of the thumbnail cache
# Search by meaning: captions are embedded (on the CPU, offline) beside the full-text index.
search:
  embedding_model: {_y(s.embedding_model)}   # a local folder works too; null: text only
  embedding_revision: {_y(s.embedding_revision)}
  mode: {s.mode}                     # what `watcher search` does: hybrid | text | semantic
  batch_size: {s.batch_size}                 # captions per embedding call
  threads: {s.threads}                     # CPU threads for it (when the vision model is isolated)
  backfill: {_y(s.backfill)}                 # the daemon embeds existing captions at start

# Settings every folder gets unless it sets its own.
defaults:
  task: {f.task}                      # prompt | short | normal | long | query
  index_tasks: {_y(f.index_tasks)}                  # extra outputs kept in the index only
  question: null                   # the question for task query
  prefix: {_y(f.prefix)}                       # prepended to every caption (LoRA trigger words)
  suffix: {_y(f.suffix)}                       # appended to every caption
  sidecar: {_y(f.sidecar)}            # {{stem}}.txt (photo.txt) or {{name}}.txt (photo.jpg.txt)
  overwrite: {f.overwrite}                  # never | ours (only ours, unchanged) | always
  polling: {_y(f.polling)}                   # poll instead of OS events (network shares)
  poll_interval: {f.poll_interval}               # seconds between polls when polling
  settle_seconds: {f.settle_seconds}              # unchanged this long before a file is read
  ignore: {_y(f.ignore)}                       # glob patterns never captioned
  extensions: {_y(f.extensions)}
  on_delete: {f.on_delete}                  # keep | remove-ours
  rescan_minutes: {_y(f.rescan_minutes)}              # also rescan every N minutes (0: never)
  outputs: {_y(f.outputs)}                # any of txt, xmp (photo managers), embed (in the image)
  xmp_sidecar: {_y(f.xmp_sidecar)}      # {{name}}.xmp (darktable, digiKam); {{stem}}.xmp: Lightroom
  xmp_keywords: {_y(f.xmp_keywords)}              # task prompt: its terms as XMP/IPTC keywords

folders:
{folder_lines}
"""
