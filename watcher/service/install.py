"""Install the watcher as an OS service: a systemd user unit (Linux), a LaunchAgent (macOS).

The unit and plist are rendered from the templates in systemd/ and launchd/ at the
project root (a source checkout or an editable install) or, in a wheel, from the copies
packaged as watcher/service/templates/. Rendering puts in the real interpreter, the config path,
the folders the service may write to and the database folder, quoted for the format.

`install`, `uninstall` and `status` take the home directory, the OS name and the command
runner as parameters so that tests can run them without touching the real system.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import platform
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from watcher.config import Config
from watcher.isolated import python_command

UNIT_NAME = "moondream-watcher.service"
LABEL = "com.moondream-watcher"
PLIST_NAME = f"{LABEL}.plist"
DIST_NAME = "moondream-watcher"
_TEMPLATE_DIRS = {UNIT_NAME: "systemd", PLIST_NAME: "launchd"}
# Variables from the installing shell that the service needs to find the same model cache.
PASS_ENV = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")

Runner = Callable[[Sequence[str]], int]


class ServiceError(Exception):
    """A problem to show the user (bad path, missing template), not a bug."""


# --- templates ------------------------------------------------------------------------------


def template_text(name: str) -> str:
    """The template `name`: the project-root copy if there is one, else the packaged copy."""
    kind = _TEMPLATE_DIRS[name]
    source = Path(__file__).resolve().parents[2] / kind / name
    if source.is_file():
        return source.read_text(encoding="utf-8")
    packaged = importlib.resources.files("watcher.service").joinpath("templates").joinpath(name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    raise ServiceError(
        f"service template {name} not found: neither {source} nor "
        "watcher/service/templates/ in the installed package"
    )


def _fill(text: str, values: Mapping[str, str | list[str]]) -> str:
    """Replace @NAME@ in one pass; a line that is only a list-valued placeholder becomes
    that many lines (none for an empty list). Template-only '#@' lines are dropped."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("#@"):
            continue
        m = _PLACEHOLDER.fullmatch(line.strip())
        if m and isinstance(values.get(m.group(1)), list):
            out.extend(values[m.group(1)])
            continue

        def sub(m: re.Match[str]) -> str:
            value = values.get(m.group(1))
            if not isinstance(value, str):
                raise ServiceError(f"template placeholder {m.group(0)} has no value")
            return value

        out.append(_PLACEHOLDER.sub(sub, line))
    return "\n".join(out) + "\n"


# --- what the service needs -----------------------------------------------------------------


def _abs(path: Path | str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def writable_paths(cfg: Config) -> list[Path]:
    """Where the service writes: every watched folder (sidecars) and the database folder."""
    seen: list[Path] = []
    for p in [*(f.path for f in cfg.folders), _abs(cfg.database).parent]:
        p = _abs(p)
        if p not in seen:
            seen.append(p)
    return seen


def _python_path(python: str) -> str | None:
    """The project root when `watcher` is not installed in this interpreter (a bare source
    checkout), so that the service finds it (see _command); None otherwise."""
    if _interpreter(python) != os.path.abspath(sys.executable):
        return None  # another interpreter: assume the package is installed there
    try:
        importlib.metadata.distribution(DIST_NAME)
        return None
    except importlib.metadata.PackageNotFoundError:
        return str(Path(__file__).resolve().parents[2])


def service_environment(
    cfg: Config, python: str, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Variables the service gets on top of the fixed ones in the templates."""
    env = os.environ if env is None else env
    extra: dict[str, str] = {}
    # The daemon re-reads the config; without a `database` key it would fall back to the
    # default location *in the service's environment*. Pin it to what install made writable.
    extra["WATCHER_DB"] = str(_abs(cfg.database))
    for name in PASS_ENV:
        if env.get(name):
            extra[name] = str(_abs(env[name]))
    return extra


def _interpreter(python: str) -> str:
    """An absolute path for `python`, looked up on PATH when it is a bare name. Symlinks are
    kept: a virtualenv's bin/python is a link, and resolving it would leave the venv."""
    if not python:
        raise ServiceError("cannot tell which Python interpreter to run (sys.executable is empty)")
    if os.sep not in python:
        found = shutil.which(python)
        if not found:
            raise ServiceError(f"{python}: not found on PATH")
        python = found
    return os.path.abspath(python)


def _command(python: str, config_path: Path) -> list[str]:
    """`python -I -u -m watcher --config CONFIG run`: -I so that nothing in the service's
    working directory (the home folder) is imported in place of our modules; -u for the
    PYTHONUNBUFFERED that -I ignores. A bare source checkout (not installed) is put on the
    path explicitly, since -I also ignores PYTHONPATH."""
    # --config is an option of `watcher` itself, so it comes before the subcommand.
    args = ["--config", str(_abs(config_path)), "run"]
    root = _python_path(python)
    if root:
        return python_command("watcher", args, python=_interpreter(python), path=[root])
    return [_interpreter(python), "-I", "-u", "-m", "watcher", *args]


# --- systemd --------------------------------------------------------------------------------


def _check_line(value: str) -> str:
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ServiceError(
            f"cannot put {value!r} in a unit file: it contains a control character (a newline?)"
        )
    return value


def systemd_quote(value: str, *, expand_dollar: bool = True) -> str:
    """One word for a unit file: double-quoted, with \\ and \" escaped and % doubled
    (specifiers); with `expand_dollar` (ExecStart= arguments, not the program path) $ is
    doubled too, so systemd does not substitute variables."""
    v = _check_line(value).replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if expand_dollar:
        v = v.replace("$", "$$")
    return f'"{v}"'


def _exec_start(argv: Sequence[str]) -> str:
    bad = sorted(set(argv[0]) & set("\"'\\"))
    if bad:
        # systemd refuses these in the program path even when quoted and escaped.
        raise ServiceError(
            f"systemd cannot run {argv[0]!r}: its path contains {' '.join(bad)}. Make a "
            "symlink to that interpreter at a path without quotes or backslashes and pass it "
            "as the Python to use."
        )
    words = [systemd_quote(argv[0], expand_dollar=False)]
    for arg in argv[1:]:
        plain = re.fullmatch(r"[A-Za-z0-9_./=:+-]+", arg) is not None
        words.append(arg if plain else systemd_quote(arg))
    return " ".join(words)


def _under_tmp(paths: Iterable[Path | str]) -> list[str]:
    hits = []
    for p in paths:
        s = os.fspath(p)
        if any(s == t or s.startswith(t + "/") for t in ("/tmp", "/var/tmp")):
            hits.append(s)
    return hits


def render_systemd(
    cfg: Config,
    config_path: Path,
    python: str = sys.executable,
    *,
    env: Mapping[str, str] | None = None,
) -> str:
    """The systemd user unit for `cfg`, read from `config_path`, run by `python`."""
    config_path = _abs(config_path)
    argv = _command(python, config_path)
    rw = writable_paths(cfg)
    environment = service_environment(cfg, python, env)
    # PrivateTmp hides the real /tmp: keep it only if nothing the service needs lives there.
    needed_in_tmp = _under_tmp(
        [*rw, config_path, argv[0], *([cfg.model.path] if cfg.model.path else [])]
    )
    rw_lines = [
        f"ReadWritePaths={systemd_quote('-' + str(p), expand_dollar=False)}" for p in rw
    ]  # "-": a folder missing at start (unmounted disk) is skipped
    if needed_in_tmp:
        private_tmp = [
            _check_line(f"# PrivateTmp=no: {p} is in a temporary folder") for p in needed_in_tmp
        ]
        private_tmp.append("PrivateTmp=no")
        # ProtectSystem=strict would leave the shared /tmp read-only (SQLite, tempfile).
        rw_lines += ["ReadWritePaths=-/tmp", "ReadWritePaths=-/var/tmp"]
    else:
        private_tmp = ["PrivateTmp=yes"]
    return _fill(
        template_text(UNIT_NAME),
        {
            # Quoted, so that a trailing backslash cannot continue the comment line.
            "CONFIG_COMMENT": systemd_quote(str(config_path), expand_dollar=False),
            "EXEC_START": _exec_start(argv),
            "ENVIRONMENT": [
                f"Environment={systemd_quote(f'{k}={v}', expand_dollar=False)}"
                for k, v in environment.items()
            ],
            "PRIVATE_TMP": private_tmp,
            "READ_WRITE_PATHS": rw_lines,
        },
    )


# --- launchd --------------------------------------------------------------------------------


def render_launchd(
    cfg: Config,
    config_path: Path,
    python: str = sys.executable,
    *,
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """The LaunchAgent plist for `cfg` (XML), filled in with plistlib so escaping is right."""
    home = _abs(home or Path.home())
    argv = _command(python, config_path)
    path_dirs = [
        os.path.dirname(argv[0]),
        "/opt/homebrew/bin",
        "/usr/local/bin",
        "/usr/bin",
        "/bin",
        "/usr/sbin",
        "/sbin",
    ]
    values = {
        "PYTHON": argv[0],
        "CONFIG": str(_abs(config_path)),
        "HOME": str(home),
        "PATH": ":".join(dict.fromkeys(path_dirs)),
        "LOG_DIR": str(launchd_log_dir(home)),
    }
    data = plistlib.loads(template_text(PLIST_NAME).encode("utf-8"))

    def fill(obj: Any) -> Any:
        if isinstance(obj, str):
            return _PLACEHOLDER.sub(lambda m: values[m.group(1)], obj)
        if isinstance(obj, list):
            return [fill(x) for x in obj]
        if isinstance(obj, dict):
            return {fill(k): fill(v) for k, v in obj.items()}
        return obj

    data = fill(data)
    data["ProgramArguments"] = argv  # the template shows the usual form; this is exact
    data.setdefault("EnvironmentVariables", {}).update(service_environment(cfg, python, env))
    return plistlib.dumps(data, fmt=plistlib.FMT_XML, sort_keys=False)


def launchd_log_dir(home: Path | None = None) -> Path:
    return (home or Path.home()) / "Library" / "Logs" / "moondream-watcher"


# --- install / uninstall / status -----------------------------------------------------------


def unit_path(home: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """~/.config/systemd/user/moondream-watcher.service ($XDG_CONFIG_HOME when home is
    not given explicitly)."""
    env = os.environ if env is None else env
    if home is None and env.get("XDG_CONFIG_HOME"):
        base = Path(env["XDG_CONFIG_HOME"])
    else:
        base = (home or Path.home()) / ".config"
    return base / "systemd" / "user" / UNIT_NAME


def plist_path(home: Path | None = None) -> Path:
    return (home or Path.home()) / "Library" / "LaunchAgents" / PLIST_NAME


def run_command(cmd: Sequence[str]) -> int:
    """The default runner: run `cmd` with the terminal's stdin/stdout/stderr."""
    try:
        return subprocess.run(list(cmd), check=False).returncode
    except FileNotFoundError:
        print(f"{cmd[0]}: command not found", file=sys.stderr)
        return 127


class _Host:
    def __init__(
        self,
        out: TextIO | None,
        system: str | None,
        home: Path | None,
        runner: Runner | None,
        uid: int | None,
        env: Mapping[str, str] | None,
    ):
        self.out = out or sys.stdout
        self.system = system or platform.system()
        self.explicit_home = home
        self.home = _abs(home) if home else Path.home()
        self.runner = runner or run_command
        self.uid = uid if uid is not None else (os.getuid() if hasattr(os, "getuid") else 0)
        self.env = os.environ if env is None else env

    def say(self, text: str = "") -> None:
        print(text, file=self.out)

    def run(self, cmd: Sequence[str]) -> int:
        self.say(f"$ {shlex.join(cmd)}")
        self.out.flush()
        return self.runner(list(cmd))

    def unit_path(self) -> Path:
        return unit_path(self.explicit_home, None if self.explicit_home else self.env)

    def plist_path(self) -> Path:
        return plist_path(self.home)

    def domain(self) -> str:
        return f"gui/{self.uid}"

    def unsupported(self) -> int:
        self.say(
            f"error: `watcher service` supports Linux (systemd) and macOS (launchd), "
            f"not {self.system}. Run `watcher run` from your own service manager."
        )
        return 2


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def install(
    cfg: Config,
    config_path: Path,
    now: bool = False,
    out: TextIO | None = None,
    *,
    python: str = sys.executable,
    system: str | None = None,
    home: Path | None = None,
    runner: Runner | None = None,
    uid: int | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Write the unit/plist for `cfg` and register it; with `now`, (re)start it too.

    `cfg` must be what `config_path` holds: the service re-reads that file, while the
    writable paths come from `cfg`. Returns a process exit code.
    """
    host = _Host(out, system, home, runner, uid, env)
    config_path = _abs(config_path)
    if host.system not in ("Linux", "Darwin"):
        return host.unsupported()
    if not config_path.is_file():
        host.say(
            f"error: {config_path}: config file not found. The service runs "
            "`watcher --config <it> run`; write it first (folders to watch, model)."
        )
        return 2
    if not cfg.folders:
        host.say(
            f"warning: {config_path} configures no folders; the service will have "
            "nothing to watch until you add some and reload it."
        )
    try:
        _abs(cfg.database).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        host.say(
            f"warning: cannot create the database folder {_abs(cfg.database).parent}: {e.strerror}"
        )
    try:
        if host.system == "Linux":
            return _install_systemd(host, cfg, config_path, python, now)
        return _install_launchd(host, cfg, config_path, python, now)
    except ServiceError as e:
        host.say(f"error: {e}")
        return 2


def _install_systemd(host: _Host, cfg: Config, config_path: Path, python: str, now: bool) -> int:
    text = render_systemd(cfg, config_path, python, env=host.env)
    path = host.unit_path()
    _write(path, text.encode("utf-8"))
    host.say(f"wrote {path}")
    rc = host.run(["systemctl", "--user", "daemon-reload"])
    if rc != 0:
        host.say(
            "error: systemctl --user daemon-reload failed; is a systemd user session "
            "running (loginctl, XDG_RUNTIME_DIR)?"
        )
        return rc
    if now:
        host.say("starting: the first start loads the model and can take a few minutes")
        # A running instance is restarted to pick up the new unit; then enable and start.
        host.run(["systemctl", "--user", "try-restart", UNIT_NAME])
        rc = host.run(["systemctl", "--user", "enable", "--now", UNIT_NAME])
        if rc != 0:
            host.say(f"error: the service did not start; see `journalctl --user -u {UNIT_NAME} -e`")
            return rc
    else:
        host.say("To start it now and at every login:")
        host.say(f"  systemctl --user enable --now {UNIT_NAME}")
    host.say(f"Logs:   journalctl --user -u {UNIT_NAME} -f")
    host.say("Status: watcher service status")
    host.say(
        "To keep it running while you are logged out: loginctl enable-linger "
        f"{host.env.get('USER', '$USER')}"
    )
    return 0


def _install_launchd(host: _Host, cfg: Config, config_path: Path, python: str, now: bool) -> int:
    data = render_launchd(cfg, config_path, python, home=host.home, env=host.env)
    path = host.plist_path()
    launchd_log_dir(host.home).mkdir(parents=True, exist_ok=True)
    _write(path, data)
    host.say(f"wrote {path}")
    target = f"{host.domain()}/{LABEL}"
    bootstrap = ["launchctl", "bootstrap", host.domain(), str(path)]
    if now:
        # Unload a running copy (fails harmlessly when none is loaded), then load this one.
        was_loaded = host.run(["launchctl", "bootout", target]) == 0
        host.run(["launchctl", "enable", target])
        rc = host.run(bootstrap)
        if rc != 0 and was_loaded:
            time.sleep(2)  # bootout returns before the old job is fully gone
            rc = host.run(bootstrap)
        if rc != 0:
            host.say(f"error: launchctl bootstrap failed; see {launchd_log_dir(host.home)}")
            return rc
    else:
        host.say("It starts at your next login. To start it now:")
        host.say(f"  {shlex.join(bootstrap)}")
    host.say(f"Logs:   {launchd_log_dir(host.home) / 'watcher.log'}")
    host.say("Status: watcher service status")
    return 0


def uninstall(
    out: TextIO | None = None,
    *,
    system: str | None = None,
    home: Path | None = None,
    runner: Runner | None = None,
    uid: int | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Stop and unregister the service and remove its unit/plist (logs and index stay)."""
    host = _Host(out, system, home, runner, uid, env)
    if host.system == "Linux":
        path = host.unit_path()
        if not path.exists():
            host.say(f"not installed: {path} does not exist")
            return 0
        host.run(["systemctl", "--user", "disable", "--now", UNIT_NAME])
        path.unlink()
        host.say(f"removed {path}")
        return host.run(["systemctl", "--user", "daemon-reload"])
    if host.system == "Darwin":
        path = host.plist_path()
        if not path.exists():
            host.say(f"not installed: {path} does not exist")
            return 0
        host.run(["launchctl", "bootout", f"{host.domain()}/{LABEL}"])
        path.unlink()
        host.say(f"removed {path}; logs stay in {launchd_log_dir(host.home)}")
        return 0
    return host.unsupported()


def status(
    out: TextIO | None = None,
    *,
    system: str | None = None,
    home: Path | None = None,
    runner: Runner | None = None,
    uid: int | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Show whether the service is installed and what the service manager says about it.

    Returns the service manager's exit code (systemctl status: 3 when not running), or 3
    when the service is not installed.
    """
    host = _Host(out, system, home, runner, uid, env)
    if host.system == "Linux":
        path = host.unit_path()
        if not path.exists():
            host.say(f"not installed ({path} does not exist); run `watcher service install`")
            return 3
        host.say(f"unit: {path}")
        rc = host.run(["systemctl", "--user", "status", UNIT_NAME, "--no-pager"])
        host.say(f"Logs: journalctl --user -u {UNIT_NAME} -f")
        return rc
    if host.system == "Darwin":
        path = host.plist_path()
        if not path.exists():
            host.say(f"not installed ({path} does not exist); run `watcher service install`")
            return 3
        host.say(f"plist: {path}")
        rc = host.run(["launchctl", "print", f"{host.domain()}/{LABEL}"])
        host.say(f"Logs: {launchd_log_dir(host.home) / 'watcher.log'}")
        return rc
    return host.unsupported()
