"""Logging set-up: JSON lines for services, console lines on a terminal, level filtering."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pytest
import structlog

from watcher.config import LogConfig
from watcher.log import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_fields():
    out = io.StringIO()  # not a TTY: JSON with format auto
    configure_logging(LogConfig(format="auto", level="info"), stream=out)
    log = structlog.get_logger("watcher.pipeline.writer")
    log.info(
        "captioned",
        path=Path("/photos/a b.jpg"),
        task="short",
        model="vikhyatk/moondream2",
        ms=123.4,
        outcome="written",
    )
    (rec,) = lines(out)
    assert rec["event"] == "captioned"
    assert rec["level"] == "info"
    assert rec["logger"] == "watcher.pipeline.writer"
    assert rec["path"] == "/photos/a b.jpg"
    assert (rec["task"], rec["model"], rec["ms"], rec["outcome"]) == (
        "short",
        "vikhyatk/moondream2",
        123.4,
        "written",
    )
    ts = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))
    assert ts.utcoffset() == timezone.utc.utcoffset(None)
    assert abs((datetime.now(timezone.utc) - ts).total_seconds()) < 60
    assert list(rec)[:4] == ["timestamp", "level", "logger", "event"]


def test_level_filter():
    out = io.StringIO()
    configure_logging(LogConfig(format="json", level="warning"), stream=out)
    log = structlog.get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [r["event"] for r in lines(out)] == ["w", "e"]

    out = io.StringIO()
    configure_logging(LogConfig(format="json", level="debug"), stream=out)
    structlog.get_logger().debug("d")
    assert [r["level"] for r in lines(out)] == ["debug"]


def test_module_logger_follows_reconfiguration():
    log = structlog.get_logger("watcher.early")  # made before configuration, like modules do
    first, second = io.StringIO(), io.StringIO()
    configure_logging(LogConfig(format="json"), stream=first)
    log.info("one")
    configure_logging(LogConfig(format="json"), stream=second)
    log.info("two")
    assert [r["event"] for r in lines(first)] == ["one"]
    assert [r["event"] for r in lines(second)] == ["two"]


def test_console_format_is_not_json():
    out = io.StringIO()
    configure_logging(LogConfig(format="console"), stream=out)
    structlog.get_logger().info("captioned", path="/p/a.jpg", ms=5)
    text = out.getvalue()
    assert "captioned" in text and "path=/p/a.jpg" in text and "ms=5" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])
    assert "\x1b[" not in text  # colours only on a terminal


def test_tty_gets_coloured_console(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = FakeTTY()
    configure_logging(LogConfig(format="auto"), stream=out)
    structlog.get_logger().warning("hello", n=1)
    assert "hello" in out.getvalue() and "\x1b[" in out.getvalue()
    assert not out.getvalue().lstrip().startswith("{")


def test_json_forced_on_a_tty():
    out = FakeTTY()
    configure_logging(LogConfig(format="json"), stream=out)
    structlog.get_logger().info("x")
    assert lines(out)[0]["event"] == "x"


def test_stdlib_libraries_only_from_warning_and_as_json():
    out = io.StringIO()
    configure_logging(LogConfig(format="json", level="debug"), stream=out)
    lib = logging.getLogger("watchdog.observers.inotify")
    lib.info("noisy detail")
    lib.debug("noisier")
    lib.warning("inotify watch limit reached")
    warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    recs = lines(out)
    events = [r["event"] for r in recs]
    assert "noisy detail" not in events and "noisier" not in events
    (rec,) = [r for r in recs if r["event"] == "inotify watch limit reached"]
    assert rec["level"] == "warning" and rec["logger"] == "watchdog.observers.inotify"
    assert "timestamp" in rec
    assert any("deprecated thing" in r["event"] for r in recs if r.get("logger") == "py.warnings")


@pytest.mark.slow  # a fresh interpreter importing transformers: 5-45 s on 2 busy cores
def test_transformers_logging_routed_when_imported_later(tmp_path):
    """transformers installs its own stderr handler on import; ours replaces it."""
    pytest.importorskip("transformers")
    script = textwrap.dedent("""
        import sys
        from watcher.config import LogConfig
        from watcher.log import configure_logging
        configure_logging(LogConfig(format="json"), stream=sys.stderr)
        from transformers.utils import logging as hf
        hf.get_logger("transformers.test").warning("from transformers")
        hf.get_logger("transformers.test").info("too chatty")
    """)
    r = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode == 0, r.stderr
    out = [line for line in r.stderr.splitlines() if line.strip()]
    recs = [json.loads(line) for line in out]  # every line is JSON: no plain-text duplicate
    assert [(x["event"], x["level"], x["logger"]) for x in recs] == [
        ("from transformers", "warning", "transformers.test")
    ]
