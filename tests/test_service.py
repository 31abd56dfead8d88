"""Service files: rendering (checked by systemd-analyze and plistlib) and install/uninstall
with a temporary home and a fake command runner (nothing is registered for real)."""

from __future__ import annotations

import io
import os
import plistlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from watcher.config import Config, parse_config
from watcher.service import install as service
from watcher.service.install import (
    LABEL,
    PLIST_NAME,
    UNIT_NAME,
    ServiceError,
    install,
    render_launchd,
    render_systemd,
    status,
    uninstall,
)

PYTHON = os.path.abspath(sys.executable)
CONFIG = Path("/home/u/.config/moondream-watcher/config.yaml")
ROOT = Path(__file__).resolve().parent.parent


def make_cfg(folders: list[str], database: str) -> Config:
    return parse_config({"folders": folders, "database": database})


@pytest.fixture
def cfg() -> Config:
    return make_cfg(
        ["/home/u/Pictures", "/home/u/My Photos"], "/home/u/.local/share/moondream-watcher/index.db"
    )


class FakeRunner:
    def __init__(self, codes: dict[str, list[int]] | None = None):
        self.commands: list[list[str]] = []
        self.codes = codes or {}  # verb -> exit codes to return, in order

    def __call__(self, cmd):
        self.commands.append(list(cmd))
        verb = cmd[2] if cmd[0] == "systemctl" else cmd[1]
        queue = self.codes.get(verb)
        return queue.pop(0) if queue else 0


def service_section(unit: str) -> list[tuple[str, str]]:
    """(key, value) pairs of [Service], comments skipped."""
    pairs, section = [], None
    for line in unit.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#") and section == "[Service]":
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


# --- systemd ----------------------------------------------------------------------------------


def test_render_systemd(cfg):
    # A fixed interpreter path: where this checkout lives (under /tmp in some CI runs) must
    # not change what is asserted; the verify tests below use the real interpreter.
    python = "/opt/watcher/bin/python"
    unit = render_systemd(cfg, CONFIG, python, env={})
    assert "@" not in unit.replace("$MAINPID", "")  # every placeholder filled
    assert not any(line.startswith("#@") for line in unit.splitlines())
    pairs = service_section(unit)
    kv = dict(pairs)
    assert kv["Type"] == "notify"
    assert kv["NotifyAccess"] == "main"
    assert kv["ExecStart"] == f'"{python}" -I -u -m watcher --config {CONFIG} run'
    assert kv["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert kv["Restart"] == "on-failure"
    assert kv["WatchdogSec"] == "120"
    assert int(kv["TimeoutStopSec"]) > 0
    assert kv["StandardOutput"] == "journal"
    envs = [v for k, v in pairs if k == "Environment"]
    assert "HF_HUB_OFFLINE=1" in envs and "PYTHONUNBUFFERED=1" in envs
    assert '"WATCHER_DB=/home/u/.local/share/moondream-watcher/index.db"' in envs
    assert kv["NoNewPrivileges"] == "yes"
    assert kv["ProtectSystem"] == "strict"
    assert kv["ProtectHome"] == "read-only"
    assert kv["PrivateTmp"] == "yes"
    rw = [v for k, v in pairs if k == "ReadWritePaths"]
    assert rw == [
        "-%C/moondream-watcher",
        '"-/home/u/Pictures"',
        '"-/home/u/My Photos"',
        '"-/home/u/.local/share/moondream-watcher"',
    ]
    assert "#IPAddressDeny=any" in unit.splitlines()
    assert "WantedBy=default.target" in unit.splitlines()


def test_private_tmp_off_when_something_lives_in_tmp(tmp_path):
    cfg = make_cfg([str(tmp_path / "photos")], "/home/u/index.db")
    pairs = service_section(render_systemd(cfg, CONFIG))
    assert dict(pairs)["PrivateTmp"] == "no"
    rw = [v for k, v in pairs if k == "ReadWritePaths"]
    assert f'"-{tmp_path / "photos"}"' in rw
    assert "-/tmp" in rw and "-/var/tmp" in rw  # else read-only under ProtectSystem=strict


def test_systemd_rejects_what_it_cannot_express(cfg):
    with pytest.raises(ServiceError, match="symlink"):
        render_systemd(cfg, CONFIG, python='/opt/we"ird/bin/python')
    bad = make_cfg(["/home/u/new\nline"], "/home/u/index.db")
    with pytest.raises(ServiceError, match="control character"):
        render_systemd(bad, CONFIG)


def _systemd_analyze_verify(unit_file: Path, runtime_dir: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian/Ubuntu: apt-get install systemd)")
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir), "SYSTEMD_LOG_COLOR": "0"}
    r = subprocess.run(
        [exe, "--user", "verify", str(unit_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "Failed to initialize manager" in r.stderr:  # no user manager support here
        r = subprocess.run(
            [exe, "verify", str(unit_file)], env=env, capture_output=True, text=True, timeout=60
        )
    return r


def test_systemd_analyze_verify(cfg, tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    unit_file = tmp_path / UNIT_NAME
    unit_file.write_text(render_systemd(cfg, CONFIG))
    r = _systemd_analyze_verify(unit_file, runtime)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr


def test_systemd_analyze_verify_awkward_paths(tmp_path):
    """Spaces, %, $, quotes and backslashes: verify finds the interpreter only if the
    program path is escaped right, and warns about any folder that is split or garbled."""
    odd = Path(tempfile.mkdtemp(prefix="odd %n $HOME; dir ", dir=tmp_path))
    python = odd / "python"
    python.symlink_to(PYTHON)
    folders = [str(odd / "My Photos"), str(odd / "100% \"real\" $HOME \\ 'x'")]
    cfg = make_cfg(folders, str(odd / "db dir" / "index.db"))
    unit = render_systemd(cfg, odd / "config.yaml", python=str(python))
    kv = dict(service_section(unit))
    assert kv["ExecStart"].startswith('"' + str(python).replace("%", "%%") + '" -I -u -m watcher')
    unit_file = tmp_path / UNIT_NAME
    unit_file.write_text(unit)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    r = _systemd_analyze_verify(unit_file, runtime)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    # The check bites: a broken program path is reported.
    unit_file.write_text(unit.replace(str(python).replace("%", "%%"), str(odd / "nope")))
    assert _systemd_analyze_verify(unit_file, runtime).returncode != 0


# --- launchd ----------------------------------------------------------------------------------


def test_render_launchd(cfg, tmp_path):
    home = tmp_path / "Users" / "u"
    config = Path("/Users/u/cfg & <stuff>/config.yaml")
    data = plistlib.loads(render_launchd(cfg, config, home=home, env={}))
    assert data["Label"] == LABEL
    assert data["RunAtLoad"] is True
    assert data["KeepAlive"] == {"SuccessfulExit": False}
    assert data["ProgramArguments"] == [
        PYTHON,
        "-I",
        "-u",
        "-m",
        "watcher",
        "--config",
        str(config),
        "run",
    ]
    assert data["ProcessType"] == "Background"
    logs = home / "Library" / "Logs" / "moondream-watcher"
    assert Path(data["StandardOutPath"]).parent == logs
    assert Path(data["StandardErrorPath"]).parent == logs
    assert data["WorkingDirectory"] == str(home)
    env = data["EnvironmentVariables"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert os.path.dirname(PYTHON) == env["PATH"].split(":")[0]
    assert "/usr/bin" in env["PATH"].split(":")
    assert env["WATCHER_DB"] == str(cfg.database)
    assert not any("@" in str(v) for v in [*data.values(), *env.values()])


def test_rendered_command_is_accepted_by_the_cli(cfg, tmp_path):
    """The service's argv must parse: a missing config is reported as such, not as usage."""
    missing = tmp_path / "no such config.yaml"
    argv = plistlib.loads(render_launchd(cfg, missing, home=tmp_path, env={}))["ProgramArguments"]
    r = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode != 0
    assert "unrecognized arguments" not in r.stderr and "usage:" not in r.stderr, r.stderr
    assert str(missing) in r.stderr and "not found" in r.stderr, r.stderr


def test_launchd_passes_hf_cache_location(cfg, tmp_path):
    data = plistlib.loads(
        render_launchd(cfg, CONFIG, home=tmp_path, env={"HF_HOME": "/Volumes/models/hf"})
    )
    assert data["EnvironmentVariables"]["HF_HOME"] == "/Volumes/models/hf"


# --- install / uninstall / status -------------------------------------------------------------


@pytest.fixture
def setup(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    config = home / "conf" / "config.yaml"
    config.parent.mkdir()
    config.write_text("folders: []\n")
    cfg = make_cfg(
        [str(home / "Pictures"), str(home / "My Photos")], str(home / "data dir" / "index.db")
    )
    return home, config, cfg


def test_install_linux_now(setup):
    home, config, cfg = setup
    runner, out = FakeRunner(), io.StringIO()
    rc = install(cfg, config, now=True, out=out, system="Linux", home=home, runner=runner, env={})
    assert rc == 0, out.getvalue()
    unit = home / ".config" / "systemd" / "user" / UNIT_NAME
    assert unit.read_text() == render_systemd(cfg, config, env={})
    assert (home / "data dir").is_dir()  # must exist for ReadWritePaths at start
    assert runner.commands == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "try-restart", UNIT_NAME],
        ["systemctl", "--user", "enable", "--now", UNIT_NAME],
    ]
    assert "$ systemctl --user enable --now moondream-watcher.service" in out.getvalue()
    assert "journalctl --user -u" in out.getvalue()


def test_install_linux_later(setup):
    home, config, cfg = setup
    runner, out = FakeRunner(), io.StringIO()
    assert (
        install(cfg, config, now=False, out=out, system="Linux", home=home, runner=runner, env={})
        == 0
    )
    assert runner.commands == [["systemctl", "--user", "daemon-reload"]]
    assert f"systemctl --user enable --now {UNIT_NAME}" in out.getvalue()


def test_install_linux_reports_failures(setup):
    home, config, cfg = setup
    runner = FakeRunner({"daemon-reload": [1]})
    out = io.StringIO()
    assert (
        install(cfg, config, now=True, out=out, system="Linux", home=home, runner=runner, env={})
        == 1
    )
    assert len(runner.commands) == 1 and "user session" in out.getvalue()
    runner = FakeRunner({"enable": [1]})
    assert (
        install(
            cfg,
            config,
            now=True,
            out=io.StringIO(),
            system="Linux",
            home=home,
            runner=runner,
            env={},
        )
        == 1
    )


def test_install_needs_the_config_file(setup):
    home, config, cfg = setup
    runner, out = FakeRunner(), io.StringIO()
    assert (
        install(
            cfg,
            home / "missing.yaml",
            now=True,
            out=out,
            system="Linux",
            home=home,
            runner=runner,
            env={},
        )
        == 2
    )
    assert "config file not found" in out.getvalue()
    assert runner.commands == [] and not (home / ".config").exists()


def test_install_macos_now(setup, monkeypatch):
    home, config, cfg = setup
    runner, out = FakeRunner(), io.StringIO()
    rc = install(
        cfg, config, now=True, out=out, system="Darwin", home=home, runner=runner, uid=501, env={}
    )
    assert rc == 0, out.getvalue()
    plist = home / "Library" / "LaunchAgents" / PLIST_NAME
    argv = plistlib.loads(plist.read_bytes())["ProgramArguments"]
    assert argv[1:] == ["-I", "-u", "-m", "watcher", "--config", str(config), "run"]
    assert (home / "Library" / "Logs" / "moondream-watcher").is_dir()
    assert runner.commands == [
        ["launchctl", "bootout", f"gui/501/{LABEL}"],
        ["launchctl", "enable", f"gui/501/{LABEL}"],
        ["launchctl", "bootstrap", "gui/501", str(plist)],
    ]


def test_install_macos_retries_bootstrap_after_bootout(setup, monkeypatch):
    home, config, cfg = setup
    monkeypatch.setattr(service.time, "sleep", lambda s: None)
    runner = FakeRunner({"bootstrap": [5, 0]})  # the old job was still going away
    assert (
        install(
            cfg,
            config,
            now=True,
            out=io.StringIO(),
            system="Darwin",
            home=home,
            runner=runner,
            uid=501,
            env={},
        )
        == 0
    )
    assert [c[1] for c in runner.commands] == ["bootout", "enable", "bootstrap", "bootstrap"]


def test_install_macos_later(setup):
    home, config, cfg = setup
    runner, out = FakeRunner(), io.StringIO()
    assert (
        install(
            cfg,
            config,
            now=False,
            out=out,
            system="Darwin",
            home=home,
            runner=runner,
            uid=501,
            env={},
        )
        == 0
    )
    assert runner.commands == []
    assert "launchctl bootstrap gui/501" in out.getvalue()


def test_uninstall_and_status_linux(setup):
    home, config, cfg = setup
    kw = dict(system="Linux", home=home, env={})
    install(cfg, config, now=False, out=io.StringIO(), runner=FakeRunner(), **kw)
    runner, out = FakeRunner({"status": [3]}), io.StringIO()
    assert status(out, runner=runner, **kw) == 3
    assert runner.commands == [["systemctl", "--user", "status", UNIT_NAME, "--no-pager"]]
    runner = FakeRunner()
    assert uninstall(io.StringIO(), runner=runner, **kw) == 0
    assert runner.commands == [
        ["systemctl", "--user", "disable", "--now", UNIT_NAME],
        ["systemctl", "--user", "daemon-reload"],
    ]
    assert not (home / ".config" / "systemd" / "user" / UNIT_NAME).exists()
    runner, out = FakeRunner(), io.StringIO()
    assert uninstall(out, runner=runner, **kw) == 0 and "not installed" in out.getvalue()
    assert status(out, runner=runner, **kw) == 3 and runner.commands == []


def test_uninstall_and_status_macos(setup):
    home, config, cfg = setup
    kw = dict(system="Darwin", home=home, uid=501, env={})
    install(cfg, config, now=False, out=io.StringIO(), runner=FakeRunner(), **kw)
    runner = FakeRunner()
    assert status(io.StringIO(), runner=runner, **kw) == 0
    assert runner.commands == [["launchctl", "print", f"gui/501/{LABEL}"]]
    runner = FakeRunner()
    assert uninstall(io.StringIO(), runner=runner, **kw) == 0
    assert runner.commands == [["launchctl", "bootout", f"gui/501/{LABEL}"]]
    assert not (home / "Library" / "LaunchAgents" / PLIST_NAME).exists()


def test_unsupported_os(setup):
    home, config, cfg = setup
    out = io.StringIO()
    assert (
        install(
            cfg, config, now=True, out=out, system="Windows", home=home, runner=FakeRunner(), env={}
        )
        == 2
    )
    assert "Linux" in out.getvalue()


def test_unit_path_follows_xdg_config_home():
    assert (
        service.unit_path(env={"XDG_CONFIG_HOME": "/x/cfg"})
        == Path("/x/cfg/systemd/user") / UNIT_NAME
    )
    assert (
        service.unit_path(Path("/h"), env={"XDG_CONFIG_HOME": "/x"})
        == Path("/h/.config/systemd/user") / UNIT_NAME
    )


# --- templates --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kind", [(UNIT_NAME, "systemd"), (PLIST_NAME, "launchd")])
def test_templates_found_in_checkout_and_package(name, kind, monkeypatch):
    canonical = (ROOT / kind / name).read_text(encoding="utf-8")
    assert service.template_text(name) == canonical
    # As from a wheel: nothing next to the package, only watcher/service/templates/.
    monkeypatch.setattr(
        service, "__file__", "/nonexistent/site-packages/watcher/service/install.py"
    )
    packaged = ROOT / "watcher" / "service" / "templates" / name
    if not packaged.exists():
        with pytest.raises(ServiceError, match="not found"):
            service.template_text(name)
        pytest.skip(
            "watcher/service/templates/ not set up in this checkout (see systemd/README.md)"
        )
    assert service.template_text(name) == canonical  # the packaged copy must not drift
