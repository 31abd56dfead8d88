"""The web server's guard: Host and Origin checks, the token login, CSRF, body size limits."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from html import escape
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from watcher.config import WebConfig

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SESSION_COOKIE = "watcher_session"  # the CSRF token, one per browser
AUTH_COOKIE = "watcher_auth"  # set by /login when web.token is configured
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})
# Every response: no sniffing, no framing (clickjacking), no inline or foreign scripts.
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        b"img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
        b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
)


class RefusedToListen(ValueError):
    """A listen address the server must not use as configured (worded for the user)."""


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) can only be reached from this machine."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(web: WebConfig) -> None:
    """RefusedToListen for a non-loopback listen address without web.token."""
    if not is_loopback(web.host) and not web.token:
        raise RefusedToListen(
            f"web.listen is {web.listen}, which other machines can reach, and web.token is not "
            "set: refusing to serve without a token. Set web.token (a long random string: "
            'python -c "import secrets; print(secrets.token_urlsafe(24))"), or listen on '
            "127.0.0.1."
        )


def login_cookie_value(token: str) -> str:
    """What the login cookie holds: derived from the token, so the browser never stores the
    token itself (and a cookie of an old token stops working when the token changes)."""
    return hmac.new(token.encode(), b"watcher-login-v1", hashlib.sha256).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _headers(scope: Scope) -> dict[str, str]:
    """Header names (lower case) to values; repeated headers joined as HTTP joins them."""
    out: dict[str, str] = {}
    for k, v in scope.get("headers", ()):
        name, value = k.decode("latin-1").lower(), v.decode("latin-1")
        if name in out:
            value = out[name] + ("; " if name == "cookie" else ", ") + value
        out[name] = value
    return out


def _cookies(headers: dict[str, str]) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header: as if none was sent
        return {}
    return {k: m.value for k, m in jar.items()}


def _hostname(host_header: str) -> str | None:
    """The name in a Host header, lower case, without the port; None if malformed."""
    h = host_header.strip().lower()
    if not h:
        return None
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] if end > 0 else None
    name, _, port = h.partition(":")
    if port and not port.isdigit():
        return None
    return name.rstrip(".") or None


class TooLarge(Exception):
    """The request body went past web.max_body_bytes while being read."""


async def json_error(send: Send, status: int, message: str, headers: tuple = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *SECURITY_HEADERS,
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class SecurityMiddleware:
    """Pure ASGI middleware in front of every route (see web-contract.md):

    1. Host: must name this server (localhost, the listen address, web.allowed_hosts; any
       name when listening on all interfaces, where the token is required) -> else 421.
       Defeats DNS rebinding against a server on loopback.
    2. Origin: a POST/PUT/PATCH/DELETE whose Origin header is present must be our own
       origin (http://<Host>); `Sec-Fetch-Site: cross-site` is refused too -> else 403.
    3. Token (web.token set): `Authorization: Bearer T`, `X-Moondream-Auth: T` or the login
       cookie; missing or wrong -> 401 (a browser asking for a page without any: /login).
    4. CSRF: every browser gets a random `watcher_session` cookie (HttpOnly, SameSite=Strict),
       exposed to routes as `request.state.csrf_token`; a state-changing request outside
       /v1/ and /login needs header X-CSRF-Token or form field csrf_token equal to it -> 403.
    5. Body size: more than web.max_body_bytes -> 413, by Content-Length up front or while
       the body is read (a route reading it gets TooLarge; the client gets the 413).
    """

    def __init__(self, app: ASGIApp, web: WebConfig) -> None:
        self.app = app
        self.web = web
        self.login_cookie = login_cookie_value(web.token) if web.token else None
        host = web.host.lower()
        self.any_host = host in ("0.0.0.0", "::", "")
        self.hosts = LOOPBACK_NAMES | {host, *web.allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":  # none are served; never an unchecked channel
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        method = scope["method"].upper()
        path: str = scope.get("path", "/")
        host = _hostname(headers.get("host", ""))
        if host is None or not (self.any_host or host in self.hosts):
            await json_error(
                send,
                421,
                f"this server does not answer for host {headers.get('host', '')!r}; "
                "add it to web.allowed_hosts if it is yours",
            )
            return
        if method in STATE_CHANGING and not self._origin_ok(headers):
            await json_error(send, 403, "cross-origin request refused")
            return
        cookies = _cookies(headers)
        if self.login_cookie is not None and not self._public(path):
            refusal = self._auth_refusal(headers, cookies)
            if refusal is not None:
                status, message = refusal
                if status == 401 and method == "GET" and self._wants_page(path, headers):
                    target = "/login?" + urlencode({"next": _query_path(scope)})
                    await RedirectResponse(target, status_code=303)(scope, receive, send)
                    return
                await json_error(
                    send, status, message, ((b"www-authenticate", b'Bearer realm="watcher"'),)
                )
                return
        length = headers.get("content-length")
        limit = self.web.max_body_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            await json_error(send, 413, f"request body too large (the limit is {limit} bytes)")
            return
        session = cookies.get(SESSION_COOKIE, "")
        fresh = not _valid_session(session)
        if fresh:
            session = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["csrf_token"] = session
        receive = _limited(receive, limit)
        if method in STATE_CHANGING and not path.startswith("/v1/") and path != "/login":
            try:
                ok, receive = await self._csrf_ok(scope, receive, headers, session, fresh)
            except TooLarge:
                await json_error(send, 413, f"request body too large (the limit is {limit} bytes)")
                return
            if not ok:
                await json_error(
                    send,
                    403,
                    "missing or wrong CSRF token: reload the page and try again",
                )
                return
        # API clients get no cookie; a browser gets its session with its first page.
        new_session = session if fresh and not path.startswith("/v1/") else None
        await self._call(scope, receive, send, new_session)

    # -- the checks ---------------------------------------------------------------------
    def _origin_ok(self, headers: dict[str, str]) -> bool:
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return False
        origin = headers.get("origin")
        if origin is None:
            return True  # a non-browser client (curl, the moondream and openai clients)
        host = headers.get("host", "").strip().lower()
        return origin.strip().lower() in (f"http://{host}", f"https://{host}")

    def _public(self, path: str) -> bool:
        return path == "/login" or path.startswith("/static/")

    def _auth_refusal(
        self, headers: dict[str, str], cookies: dict[str, str]
    ) -> tuple[int, str] | None:
        assert self.web.token is not None and self.login_cookie is not None
        given: list[str] = []
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given.append(auth[7:].strip())
        if "x-moondream-auth" in headers:
            given.append(headers["x-moondream-auth"].strip())
        for value in given:
            if _same(value, self.web.token):
                return None
        cookie = cookies.get(AUTH_COOKIE)
        if cookie is not None and _same(cookie, self.login_cookie):
            return None
        if given or cookie is not None:  # RFC 6750: an invalid token is a 401 too
            return 401, "wrong token (or an expired login: log in again at /login)"
        return (
            401,
            "authentication required: send the token as 'Authorization: Bearer <token>' "
            "or 'X-Moondream-Auth: <token>', or log in at /login",
        )

    @staticmethod
    def _wants_page(path: str, headers: dict[str, str]) -> bool:
        return not path.startswith(("/v1/", "/api/")) and "text/html" in headers.get("accept", "")

    async def _csrf_ok(
        self,
        scope: Scope,
        receive: Receive,
        headers: dict[str, str],
        session: str,
        fresh: bool,
    ) -> tuple[bool, Receive]:
        """Whether the request carries the session's CSRF token; the receive to hand on
        (a form body read here is replayed to the route)."""
        if fresh:  # no session cookie was sent: nothing can match it
            return False, receive
        header = headers.get(CSRF_HEADER)
        if header is not None:
            return _same(header, session), receive
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("application/x-www-form-urlencoded", "multipart/form-data"):
            return False, receive
        body = await _read_body(receive)
        replay = _replay(body)
        if ctype == "application/x-www-form-urlencoded":
            values = parse_qs(body.decode("latin-1")).get(CSRF_FIELD, [])
            field = values[0] if values else None
        else:
            form = await Request(scope, _replay(body)).form()
            value = form.get(CSRF_FIELD)
            field = value if isinstance(value, str) else None
            await form.close()
        return field is not None and _same(field, session), replay

    async def _call(self, scope: Scope, receive: Receive, send: Send, new_session: str | None):
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = list(SECURITY_HEADERS)
                present = {k.lower() for k, _ in message.get("headers", ())}
                extra = [(k, v) for k, v in extra if k not in present]
                if new_session is not None:
                    extra.append((b"set-cookie", session_cookie(new_session).encode()))
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except TooLarge:
            if started:
                raise
            limit = self.web.max_body_bytes
            await json_error(send, 413, f"request body too large (the limit is {limit} bytes)")


def session_cookie(value: str) -> str:
    return f"{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict"


def _valid_session(value: str) -> bool:
    return 32 <= len(value) <= 64 and all(c.isalnum() or c in "-_" for c in value)


def _query_path(scope: Scope) -> str:
    path = scope.get("path", "/")
    qs = scope.get("query_string", b"")
    return path + ("?" + qs.decode("latin-1") if qs else "")


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise TooLarge()
        return message

    return wrapped


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


# -- the login page (only with web.token) -------------------------------------------------

_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moondream-watcher: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 24rem; margin: 4rem auto">
<h1>moondream-watcher</h1>
<p>{message}</p>
<form method="post" action="/login">
<input type="hidden" name="next" value="{next}">
<label>Token <input type="password" name="token" autocomplete="current-password"
 autofocus required></label>
<button type="submit">Log in</button>
</form></body></html>
"""


def _safe_next(value: str | None) -> str:
    """Only a path on this server (no scheme, no //host): no open redirect."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def login_routes(web: WebConfig) -> list[BaseRoute]:
    """GET/POST /login and POST /logout: the browser's way to present web.token."""

    def page(message: str, next_path: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(
            _LOGIN_PAGE.format(message=escape(message), next=escape(next_path)), status
        )

    async def login_form(request: Request) -> Response:
        next_path = _safe_next(request.query_params.get("next"))
        if not web.token:
            return RedirectResponse(next_path, status_code=303)
        return page("This server needs its token (web.token in its config).", next_path)

    async def login(request: Request) -> Response:
        if not web.token:
            return RedirectResponse("/", status_code=303)
        form = await request.form()
        token = form.get("token")
        next_path = _safe_next(str(form.get("next") or "/"))
        if not isinstance(token, str) or not _same(token, web.token):
            return page("Wrong token.", next_path, 403)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(
            AUTH_COOKIE,
            login_cookie_value(web.token),
            httponly=True,
            samesite="strict",
            path="/",
        )
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/login" if web.token else "/", status_code=303)
        response.delete_cookie(AUTH_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    return [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
