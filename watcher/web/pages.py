"""The browser pages: library, image, try, status (HTML from templates, thumbnails)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from watcher.web.context import WebContext


def routes(ctx: WebContext) -> list[BaseRoute]:
    """Every page route and /api/ JSON route; mounted by watcher.web.app.create_app."""
    return []
