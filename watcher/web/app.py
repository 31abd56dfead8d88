"""The web app (API, pages, static files behind the security middleware) and its server thread."""

from __future__ import annotations

import errno
import socket
import threading
from pathlib import Path
from typing import Any, TextIO

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from watcher.config import Config, WebConfig, split_listen
from watcher.web import api, pages
from watcher.web.context import WebContext
from watcher.web.security import RefusedToListen, SecurityMiddleware, check_listen, login_routes

log = structlog.get_logger("watcher.web")

STATIC = Path(__file__).parent / "static"
SHUTDOWN_SECONDS = 3  # open connections (a stream) get this long once the server stops


def create_app(ctx: WebContext) -> Starlette:
    """The whole web app for `ctx`: API routes, the pages, /static, login; every request
    through SecurityMiddleware (watcher.web.security)."""
    routes: list[BaseRoute] = [
        *api.routes(ctx),
        *login_routes(ctx.config.web),
        *pages.routes(ctx),
        Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static"),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse(
            {"error": exc.detail or "error"}, exc.status_code, headers=exc.headers or None
        )

    return Starlette(
        routes=routes,
        middleware=[Middleware(SecurityMiddleware, web=ctx.config.web)],
        exception_handlers={HTTPException: http_error},
    )


class WebUnavailable(RuntimeError):
    """The server cannot start as configured (worded for the user: exit 2)."""


class WebServer:
    """uvicorn serving `create_app(ctx)` on web.listen, from a thread of its own (the
    daemon) or the calling thread (`watcher serve`).

    `bind()` takes the port first, so a port in use (or a refused address) is an error before
    the model is loaded, not a daemon running without its page."""

    def __init__(self, web: WebConfig) -> None:
        self.web = web
        self._sock: socket.socket | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def bind(self) -> str:
        """Take the listen address; the URL it serves. WebUnavailable if it cannot."""
        try:
            host, port = split_listen(self.web.listen)
        except ValueError as e:
            raise WebUnavailable(f"web.listen {self.web.listen!r}: {e}") from None
        try:
            check_listen(self.web)
        except RefusedToListen as e:
            raise WebUnavailable(str(e)) from None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                why = (
                    "the port is in use (another `watcher run` or `watcher serve`?); set "
                    "web.listen to another port, or web.enabled: false"
                )
            elif e.errno == errno.EACCES:
                why = "permission denied (ports below 1024 need privileges)"
            else:
                why = e.strerror or str(e)
            raise WebUnavailable(f"cannot listen on {self.web.listen}: {why}") from None
        sock.setblocking(False)
        self._sock = sock
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        if host in ("0.0.0.0", "::"):
            shown = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        self.url = f"http://{shown}:{bound}/"
        return self.url

    def _make(self, ctx: WebContext):
        import uvicorn

        config = uvicorn.Config(
            create_app(ctx),
            log_config=None,  # our logging (structlog) stays as configured
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=SHUTDOWN_SECONDS,
            server_header=False,
            proxy_headers=False,
        )
        return uvicorn.Server(config)

    def start(self, ctx: WebContext) -> None:
        """Serve from a daemon thread (after bind())."""
        assert self._sock is not None, "bind() first"
        self._server = self._make(ctx)
        server, sock = self._server, self._sock
        self._thread = threading.Thread(
            target=lambda: server.run(sockets=[sock]), name="web", daemon=True
        )
        self._thread.start()
        log.info("web page and API", url=self.url)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = SHUTDOWN_SECONDS + 2) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the web server did not stop in time")
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def serve(cfg: Config, *, with_model: bool, err: TextIO) -> int:
    """`watcher serve`: the page and the API on the index, without watching any folder;
    with the configured model on a worker of its own unless `with_model` is False. Runs
    until SIGINT/SIGTERM. Exit 0, or 2 when the server or the model cannot start."""
    import os
    import queue
    import signal

    from watcher.backends import ModelUnavailable, open_backend
    from watcher.messages import STOP
    from watcher.pipeline.model_worker import ModelWorker
    from watcher.web.lane import WorkerLane

    os.environ["HF_HUB_OFFLINE"] = "1"  # as the daemon: weights from the cache only
    server = WebServer(cfg.web)
    try:
        server.bind()
    except WebUnavailable as e:
        print(f"watcher: {e}", file=err)
        return 2
    worker: ModelWorker | None = None
    backend = None
    stop = threading.Event()
    try:
        if with_model:
            try:
                backend = open_backend(cfg.model, cfg.log)
            except ModelUnavailable as e:
                print(f"watcher: {e}", file=err)
                return 2
            # The worker with nothing queued: it only answers the interactive lane.
            worker = ModelWorker(backend, queue.Queue(), queue.Queue(), cfg.database)
            worker.start()
        lane = WorkerLane(worker) if worker is not None else None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        server.start(WebContext(cfg, cfg.database, lane, daemon=False))
        print(f"watcher: web page and API at {server.url} (Ctrl-C stops)", file=err, flush=True)
        while not stop.wait(0.5):
            if not server.running():
                print("watcher: the web server stopped", file=err)
                return 2
        log.info("stopping")
        return 0
    finally:
        server.stop()
        if worker is not None:
            worker.inbox.put(STOP)
            worker.join(30)
        if backend is not None:
            backend.close()
