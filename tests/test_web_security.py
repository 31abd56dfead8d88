"""The web server's guard over real HTTP (`watcher serve --no-model`: no model to load):
listen refusals, Host, Origin, the token and the login, CSRF, body limits, headers."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from daemon_harness import run_cli
from web_harness import Server, web_config

TOKEN = "a-long-enough-test-token-123"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("web-security")
    config = web_config(
        tmp,
        None,
        [],
        web={"token": TOKEN, "max_body_bytes": MAX_BODY, "allowed_hosts": ["photos.example"]},
    )
    s = Server(config, tmp, "--no-model")
    try:
        yield s
    finally:
        assert s.stop() == 0, s.log_text()


@pytest.fixture
def anon(server: Server):
    """A client without the token (and without cookies of its own yet)."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def authed(server: Server):
    with httpx.Client(
        base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as c:
        yield c


def host_of(server: Server) -> str:
    return server.url.removeprefix("http://")


# -- starting ---------------------------------------------------------------------------


def test_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    config = web_config(tmp_path, None, [], web={"listen": "0.0.0.0:0"})
    code, _, err = run_cli("--config", str(config), "serve", "--no-model")
    assert code == 2
    assert "web.token is not set" in err and "0.0.0.0:0" in err


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = web_config(tmp_path, None, [])
        code, _, err = run_cli(
            "--config", str(config), "serve", "--no-model", "--listen", f"127.0.0.1:{port}"
        )
        assert code == 2
        assert f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err
        # The daemon says the same, before it loads any model, and does not start.
        daemon_cfg = web_config(
            tmp_path,
            Path("/nonexistent-model"),
            [str(tmp_path)],
            web={"listen": f"127.0.0.1:{port}"},
        )
        code, _, err = run_cli("--config", str(daemon_cfg), "run")
        assert code == 2 and "in use" in err


def test_bad_listen_and_short_token_are_config_errors(tmp_path: Path) -> None:
    code, _, err = run_cli(
        "--config", str(web_config(tmp_path, None, [])), "serve", "--listen", "nowhere"
    )
    assert code == 2 and "--listen" in err
    short = web_config(tmp_path, None, [], web={"token": "short"})
    code, _, err = run_cli("--config", str(short), "serve", "--no-model")
    assert code == 2 and "web.token" in err and "short" not in err.split("web.token")[1]


# -- host and origin ---------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", ""])
def test_foreign_host_header_is_refused(authed: httpx.Client, host: str) -> None:
    r = authed.get("/health", headers={"Host": host})
    assert r.status_code == 421
    assert "does not answer for host" in r.json()["error"]


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:2020", "127.0.0.1", "[::1]:9", "photos.example"]
)
def test_own_host_names_are_served(authed: httpx.Client, host: str) -> None:
    assert authed.get("/health", headers={"Host": host}).status_code == 200


def test_cross_origin_posts_are_refused(server: Server, authed: httpx.Client) -> None:
    body = {"image_url": "data:image/png;base64,AAAA"}
    evil = authed.post("/v1/caption", json=body, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-origin" in evil.json()["error"]
    null = authed.post("/v1/caption", json=body, headers={"Origin": "null"})
    assert null.status_code == 403
    fetch = authed.post("/v1/caption", json=body, headers={"Sec-Fetch-Site": "cross-site"})
    assert fetch.status_code == 403
    # Our own origin, and no Origin at all (API clients), pass the guard: this server has no
    # model, which is the next thing they hear about.
    own = authed.post("/v1/caption", json=body, headers={"Origin": f"http://{host_of(server)}"})
    assert own.status_code == 503 and "no model" in own.json()["error"]
    assert authed.post("/v1/caption", json=body).status_code == 503


# -- the token -----------------------------------------------------------------------------


def test_requests_without_the_token_are_refused(anon: httpx.Client) -> None:
    r = anon.get("/health")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "authentication required" in r.json()["error"]
    wrong = anon.get("/health", headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"})
    assert wrong.status_code == 401 and "wrong token" in wrong.json()["error"]
    api = anon.post("/v1/caption", json={})
    assert api.status_code == 401


def test_each_way_of_giving_the_token(anon: httpx.Client) -> None:
    assert anon.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert anon.get("/health", headers={"X-Moondream-Auth": TOKEN}).status_code == 200


def test_a_browser_is_sent_to_the_login_and_back(server: Server, anon: httpx.Client) -> None:
    page = anon.get("/some/page?x=1", headers={"Accept": "text/html"})
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=%2Fsome%2Fpage%3Fx%3D1"
    form = anon.get("/login")
    assert form.status_code == 200 and 'name="token"' in form.text
    wrong = anon.post("/login", data={"token": "nope", "next": "/x"})
    assert wrong.status_code == 403 and "Wrong token" in wrong.text
    assert "watcher_auth" not in wrong.headers.get("set-cookie", "")
    ok = anon.post("/login", data={"token": TOKEN, "next": "/health"})
    assert ok.status_code == 303 and ok.headers["location"] == "/health"
    cookie = ok.headers["set-cookie"]
    assert "watcher_auth=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert TOKEN not in cookie  # the browser never stores the token itself
    assert anon.get("/health").status_code == 200  # the cookie is the login now


def test_login_redirects_only_to_this_server(anon: httpx.Client) -> None:
    for target in ("//evil.example/x", "http://evil.example/", "/\\evil.example"):
        r = anon.post("/login", data={"token": TOKEN, "next": target})
        assert r.status_code == 303 and r.headers["location"] == "/"


def test_login_from_another_site_is_refused(anon: httpx.Client) -> None:
    r = anon.post("/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403


# -- CSRF (the pages' state-changing requests; /logout is one) ------------------------------


def test_csrf_token_is_required_outside_the_api(authed: httpx.Client) -> None:
    first = authed.get("/login")  # any page: the session cookie comes with it
    cookie = first.headers["set-cookie"]
    assert cookie.startswith("watcher_session=") and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    session = authed.cookies["watcher_session"]
    refused = authed.post("/logout")
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    wrong = authed.post("/logout", headers={"X-CSRF-Token": session[:-2] + "xx"})
    assert wrong.status_code == 403
    by_header = authed.post("/logout", headers={"X-CSRF-Token": session})
    assert by_header.status_code == 303
    by_form = authed.post("/logout", data={"csrf_token": session})
    assert by_form.status_code == 303
    by_multipart = authed.post(
        "/logout", data={"csrf_token": session}, files={"f": ("a.txt", b"x", "text/plain")}
    )
    assert by_multipart.status_code == 303


def test_csrf_without_a_session_cookie_is_refused(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        forged = c.post("/logout", headers={"X-CSRF-Token": "A" * 43})
        assert forged.status_code == 403


def test_the_api_needs_no_csrf_token_and_sets_no_cookie(authed: httpx.Client) -> None:
    r = authed.post("/v1/query", json={"question": "q", "image_url": "data:image/png;base64,AAAA"})
    assert r.status_code == 503  # past the guard; no model here
    assert "set-cookie" not in r.headers


# -- limits and headers ------------------------------------------------------------------------


def test_bodies_over_the_limit_are_refused(authed: httpx.Client) -> None:
    big = b"x" * (MAX_BODY + 1)
    r = authed.post("/v1/caption", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]

    def chunked():
        for _ in range(4):
            yield b"x" * (MAX_BODY // 2)

    r = authed.post(
        "/logout",
        content=chunked(),
        headers={"content-type": "application/x-www-form-urlencoded", "X-CSRF-Token": "A" * 43},
    )
    assert r.status_code in (403, 413)  # no session cookie: refused before or while reading
    authed.get("/login")
    session = authed.cookies["watcher_session"]
    r = authed.post(
        "/logout",
        content=chunked(),
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "Cookie": f"watcher_session={session}",
        },
    )
    assert r.status_code == 413


def test_every_response_carries_the_security_headers(
    anon: httpx.Client, authed: httpx.Client
) -> None:
    for r in (anon.get("/health"), authed.get("/health"), authed.get("/nope")):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert authed.get("/nope").status_code == 404
