"""The browser pages: library, image, try, status (HTML from templates, thumbnails)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import sqlite_utils
import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Route

from watcher.index import ImageRow, Index, NoDatabase, connect, transaction
from watcher.jobs import JobQueue
from watcher.paths import decode, encode, shown
from watcher.tasks import Task
from watcher.web import thumbs
from watcher.web.context import WebContext
from watcher.web.files import BROWSER_FORMATS, CONTENT_TYPES, open_image, watched_root
from watcher.web.library import STATES, BadRequest, Query, list_page, state_of

log = structlog.get_logger("watcher.web.pages")

_HERE = Path(__file__).parent
# Our own scripts and styles only; images from us (and data:/blob: for the try page's
# preview). No inline script can run, whatever a caption or a file name holds.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
RECAPTION_TASKS = ("prompt", "short", "normal", "long")
_FORM_MAX = 1 << 20  # a caption edit: 1 MiB is the sidecar limit too
_Work = Callable[[sqlite_utils.Database], None]  # what a form writes, on its own connection


@dataclass(frozen=True)
class _Error(Exception):
    status: int
    message: str


class Pages:
    """The route handlers, sharing the context, the templates and per-thread connections."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,  # every {{ }} is escaped; nothing here is marked |safe
            undefined=jinja2.StrictUndefined,
        )
        web = ctx.config.web
        self.thumbs = thumbs.ThumbCache(
            Path(web.thumb_cache).expanduser() if web.thumb_cache else thumbs.default_folder(),
            web.thumb_cache_mb << 20,
        )
        self._local = threading.local()
        # The query encoder of the search box: the one `watcher search` uses (hybrid search),
        # loaded on the first search, tried again a minute after it could not be.
        self._embedder: Any = None
        self._embedder_tried = float("-inf")
        self._embedder_lock = threading.Lock()

    def query_embedder(self, index: Index) -> Any:
        """The embedding model for search queries, or None (then the search is text-only)."""
        with self._embedder_lock:
            if self._embedder is None and time.monotonic() - self._embedder_tried > 60:
                from watcher.search import load_query_embedder

                self._embedder_tried = time.monotonic()
                try:
                    self._embedder, _ = load_query_embedder(index, self.ctx.config.search)
                except Exception as e:  # a broken model folder: the box still searches text
                    log.warning("search box: semantic search unavailable", error=str(e))
            return self._embedder

    def _embed(self, db: sqlite_utils.Database, path: str) -> None:
        """The search vector of a caption just changed here, as the writer makes one for
        its own (without it the image waits for the backfill's next look to be found by
        meaning). No embedding model, or no vectors in the index yet: nothing to do."""
        index = Index(db)
        embedder = self.query_embedder(index)
        row = index.get(path)
        if embedder is None or row is None:
            return
        try:
            vectors = embedder.encode([row.caption])
            with transaction(db):
                index.put_caption_vectors(vectors, [row])
        except Exception as e:  # the edit stands; the backfill embeds it later
            log.warning("could not embed the edited caption", path=shown(path), error=str(e))

    # -- plumbing --------------------------------------------------------------------------

    def reader(self) -> sqlite_utils.Database | None:
        """This thread's read-only connection (None: no index yet)."""
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = connect(self.ctx.db_path, readonly=True)
            except NoDatabase:
                return None
            self._local.db = db
        return db

    def writer(self) -> sqlite_utils.Database:
        return connect(self.ctx.db_path)

    def render(self, request: Request, name: str, status: int = 200, **data: Any) -> Response:
        template = self.env.get_template(name)
        html = template.render(
            csrf=getattr(request.state, "csrf_token", ""),
            daemon=self.ctx.daemon,
            has_model=self.ctx.lane is not None,
            **data,
        )
        return HTMLResponse(html, status, headers=_headers())

    def row(self, image_id: int) -> ImageRow:
        db = self.reader()
        row = Index(db).by_id(image_id) if db is not None else None
        # Its page only while it is under a watched folder (its file may be gone meanwhile:
        # the text can still be read and edited).
        if row is None or watched_root(self.ctx.config, row) is None:
            raise _Error(404, "no such image")
        return row

    # -- library ---------------------------------------------------------------------------

    def _page(self, request: Request) -> tuple[Query, Any]:
        query = Query.parse(dict(request.query_params), self.ctx.config)
        db = self.reader()
        if db is None:
            from watcher.web.library import Page

            return query, Page()
        return query, list_page(db, self.ctx.config, query, self.query_embedder)

    def library(self, request: Request) -> Response:
        try:
            query, page = self._page(request)
        except BadRequest as e:
            return self.render(request, "error.html", 400, message=str(e))
        folders = [shown(f.path) for f in self.ctx.config.folders]
        return self.render(
            request,
            "library.html",
            query=query,
            page=page,
            folders=folders,
            states=STATES,
            next_url=_with(request, cursor=page.next) if page.next else None,
            first_url=_with(request, cursor=None),
        )

    def api_images(self, request: Request) -> Response:
        try:
            _, page = self._page(request)
        except BadRequest as e:
            return _json_error(400, str(e))
        return JSONResponse(
            {
                "images": [i.to_json() for i in page.items],
                "next": page.next,
                "total": page.total,
                "note": page.note,
            }
        )

    def api_search(self, request: Request) -> Response:
        if not request.query_params.get("q", "").strip():
            return _json_error(400, "q is required")
        return self.api_images(request)

    def api_query_vector(self, request: Request) -> Response:
        """A search text's vector from the model this server has loaded: `watcher search`
        borrows it from a running daemon rather than loading torch and the model itself
        (seconds per search). 503 when there is no model here to encode with."""
        q = request.query_params.get("q", "")
        if not q.strip():
            return _json_error(400, "q is required")
        db = self.reader()
        embedder = self.query_embedder(Index(db)) if db is not None else None
        if embedder is None:
            return _json_error(503, "semantic search is unavailable here")
        batch = embedder.encode([q])
        # float32 -> JSON float -> float32 is exact: the same scores as a local search.
        return JSONResponse({"model": batch.model, "vector": batch.vectors[0].tolist()})

    # -- one image -------------------------------------------------------------------------

    def _image_data(self, image_id: int) -> dict[str, Any]:
        from watcher.editing import sidecar_hash

        row = self.row(image_id)
        try:
            loaded = sidecar_hash(self.ctx.config, row)
        except Exception:  # not under a watched folder now, a bad pattern: no editing
            loaded = None
        return {
            "id": image_id,
            "name": shown(Path(row.path).name),
            "path": shown(row.path),
            "caption": row.caption,
            "model_caption": row.ours,
            "task": row.task,
            "outputs": dict(sorted(row.outputs.items())),
            "model": row.model,
            "revision": row.revision,
            "updated": row.updated,
            "created": row.created,
            "width": row.width,
            "height": row.height,
            "size": row.size,
            "sidecar": shown(row.sidecar) if row.sidecar else None,
            "sidecar_state": row.sidecar_state,
            "state": state_of(row),
            "reason": row.sidecar_error,
            "sidecar_sha256": loaded or "",
        }

    def image(self, request: Request) -> Response:
        image_id = request.path_params["id"]
        try:
            data = self._image_data(image_id)
        except _Error as e:
            return self.render(request, "error.html", e.status, message=e.message)
        return self.render(
            request,
            "image.html",
            image=data,
            tasks=RECAPTION_TASKS,
            when=_when(data["updated"]),
            notice=request.query_params.get("done", ""),
            error=None,
        )

    def api_image(self, request: Request) -> Response:
        try:
            return JSONResponse(self._image_data(request.path_params["id"]))
        except _Error as e:
            return _json_error(e.status, e.message)

    async def edit(self, request: Request) -> Response:
        from watcher.editing import edit_caption

        async def change(form: dict[str, Any], image_id: int) -> _Work:
            text = str(form.get("caption", ""))
            expected = str(form.get("sidecar_sha256", "")) or None
            row = self.row(image_id)

            def work(db: sqlite_utils.Database) -> None:
                edit_caption(self.ctx.config, db, row.path, text, expected_sha256=expected)
                self._embed(db, row.path)

            return work

        return await self._change(request, "saved", change, shown_text="caption")

    async def recaption(self, request: Request) -> Response:
        from watcher.editing import apply_caption

        async def change(form: dict[str, Any], image_id: int) -> _Work:
            kind = str(form.get("task", ""))
            if kind not in RECAPTION_TASKS:
                raise _Error(400, f"unknown task {kind!r}")
            lane = self.ctx.lane
            if lane is None:
                raise _Error(503, "no model is loaded here")
            row = self.row(image_id)
            picture = await run_in_threadpool(self._picture, row)
            task = Task(kind, max_tokens=self.ctx.config.model.max_tokens)
            try:
                text = await lane.describe(picture, task)
            except Exception as e:  # the model stopped or crashed: said, nothing changed
                raise _Error(503, f"the model could not answer: {e}") from None
            from watcher.captioning import model_name, model_revision

            def work(db: sqlite_utils.Database) -> None:
                apply_caption(
                    self.ctx.config,
                    db,
                    row.path,
                    task,
                    text,
                    model=model_name(self.ctx.config.model),
                    revision=model_revision(self.ctx.config.model),
                )
                self._embed(db, row.path)

            return work

        return await self._change(request, "recaptioned", change)

    async def save_output(self, request: Request) -> Response:
        from watcher.editing import save_output

        async def change(form: dict[str, Any], image_id: int) -> _Work:
            question = str(form.get("question", "")).strip()
            answer = str(form.get("answer", ""))
            if not question:
                raise _Error(400, "the question is missing")
            row = self.row(image_id)
            return lambda db: save_output(db, row.path, Task("query", question).key, answer)

        return await self._change(request, "answer-saved", change)

    async def _change(
        self,
        request: Request,
        done: str,
        change: Callable[[dict[str, Any], int], Awaitable[_Work]],
        shown_text: str | None = None,
    ) -> Response:
        """One form that changes an image (edit, recaption, saved answer): read the form,
        let `change` check it and say what to write, write that on a connection of its own
        off the event loop, and answer (errors on the image's page, or as JSON). An edit
        refused keeps the form's `shown_text` field on the page, so nothing typed is lost."""
        from watcher.editing import EditConflict, EditError

        image_id = request.path_params["id"]
        text = None
        try:
            form = await _form(request)
            if shown_text is not None:
                text = str(form.get(shown_text, ""))
            work = await change(form, image_id)

            def run() -> None:
                db = self.writer()
                try:
                    work(db)
                finally:
                    db.conn.close()

            await run_in_threadpool(run)
        except _Error as e:
            return self._answer(request, e.status, e.message, image_id)
        except EditConflict as e:
            return self._answer(request, 409, str(e), image_id, text)
        except EditError as e:
            return self._answer(request, 400, str(e), image_id, text)
        return self._done(request, image_id, done)

    def _picture(self, row: ImageRow) -> Any:
        """The image decoded as the pipeline does (bomb guard, upright), for the model."""
        from watcher.pipeline.decode import DecodeError, decode_image

        data = self._bytes(row)
        try:
            image = decode_image(
                data, max_pixels=self.ctx.config.max_pixels, max_side=self.ctx.config.max_side
            )
        except DecodeError as e:
            raise _Error(422, f"cannot decode the image: {e.reason}") from None
        return image

    def _bytes(self, row: ImageRow) -> bytes:
        opened = open_image(self.ctx.config, row)
        if opened is None:
            raise _Error(404, "no such image")
        try:
            data = opened.read_all(self.ctx.config.max_pixels * 8 + (256 << 20))
        finally:
            opened.close()
        if data is None:
            raise _Error(413, "the file is too large to decode")
        return data

    def _answer(
        self, request: Request, status: int, message: str, image_id: int, text: str | None = None
    ) -> Response:
        if not _wants_html(request):
            return _json_error(status, message)
        try:
            data = self._image_data(image_id)
        except _Error as e:
            return self.render(request, "error.html", e.status, message=e.message)
        if text is not None:
            data = {**data, "draft": text}
        return self.render(
            request,
            "image.html",
            status,
            image=data,
            tasks=RECAPTION_TASKS,
            when=_when(data["updated"]),
            notice="",
            error=message,
        )

    def _done(self, request: Request, image_id: int, what: str) -> Response:
        if not _wants_html(request):
            return JSONResponse(self._image_data(image_id))
        return RedirectResponse(f"/image/{image_id}?done={what}", 303)

    # -- files -----------------------------------------------------------------------------

    def thumb(self, request: Request) -> Response:
        size = request.query_params.get("size", "s")
        side = thumbs.SIDES.get(size)
        if side is None:
            return _json_error(400, f"size is one of {', '.join(thumbs.SIDES)}")
        try:
            row, opened = self._opened(request)
        except _Error as e:
            return _json_error(e.status, e.message)
        try:
            data = None
            if (opened.size, opened.mtime_ns) == (row.size, row.mtime_ns):
                sha = row.sha256
            else:  # changed since it was indexed: the thumbnail of what is there now
                data = opened.read_all(self.ctx.config.max_pixels * 8 + (256 << 20))
                if data is None:
                    return _json_error(413, "the file is too large to decode")
                sha = hashlib.sha256(data).hexdigest()
            key = thumbs.cache_key(sha, opened.size, side)
            etag = f'"{key}"'
            headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
            if etag in _etags(request.headers.get("if-none-match", "")):
                return Response(status_code=304, headers=headers)
            jpeg = self.thumbs.get(key)
            if jpeg is None:
                if data is None:
                    data = opened.read_all(self.ctx.config.max_pixels * 8 + (256 << 20))
                    if data is None:
                        return _json_error(413, "the file is too large to decode")
                try:
                    jpeg = thumbs.make_thumb(data, side, max_pixels=self.ctx.config.max_pixels)
                except thumbs.DecodeError as e:
                    return _json_error(422, f"cannot make a thumbnail: {e.reason}")
                self.thumbs.put(key, jpeg)
        finally:
            opened.close()
        return Response(jpeg, media_type="image/jpeg", headers=headers)

    def _opened(self, request: Request) -> tuple[ImageRow, Any]:
        """The image of the URL's id and its file, opened as web.files does; _Error(404)
        for an id not in the index or a file no longer there (or no longer allowed)."""
        db = self.reader()
        row = Index(db).by_id(request.path_params["id"]) if db is not None else None
        if row is None:
            raise _Error(404, "no such image")
        opened = open_image(self.ctx.config, row)
        if opened is None:
            raise _Error(404, "no such image")
        return row, opened

    def original(self, request: Request) -> Response:
        try:
            row, opened = self._opened(request)
        except _Error as e:
            return _json_error(e.status, e.message)
        fmt = opened.format
        headers = {
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Content-Length": str(opened.size),
            "Cache-Control": "private, no-cache",
            "ETag": f'"{row.sha256[:40]}-{opened.size:x}-{opened.mtime_ns:x}"',
        }
        if fmt not in BROWSER_FORMATS:
            headers["Content-Disposition"] = "attachment"
        media = CONTENT_TYPES.get(fmt or "", "application/octet-stream")

        def chunks() -> Any:
            try:
                offset = 0
                while offset < opened.size:
                    chunk = _pread(opened.fd, min(1 << 20, opened.size - offset), offset)
                    if not chunk:
                        break
                    offset += len(chunk)
                    yield chunk
            finally:
                opened.close()

        return StreamingResponse(chunks(), media_type=media, headers=headers)

    # -- try and status --------------------------------------------------------------------

    def try_page(self, request: Request) -> Response:
        return self.render(request, "try.html")

    def _status(self) -> dict[str, Any]:
        from watcher.service.status import collect

        report = collect(self.ctx.db_path)
        model = self.ctx.config.model
        report["model"] = {"backend": model.backend, "id": model.source, "device": model.device}
        report["web_daemon"] = self.ctx.daemon
        db = self.reader()
        if db is not None:  # the failures' job ids, for the retry buttons
            for f in report.get("failures", []):
                r = db.conn.execute(
                    "SELECT id FROM jobs WHERE path = ? AND state = 'failed'", (encode(f["path"]),)
                ).fetchone()
                f["job"] = r[0] if r else None
                f["path"] = shown(f["path"])
        for key in ("sidecars_pending_list", "skipped_list", "sidecars_kept_list"):
            for entry in report.get(key, []):
                for k in ("path", "sidecar"):
                    if entry.get(k):
                        entry[k] = shown(entry[k])
        return report

    def status_page(self, request: Request) -> Response:
        report = self._status()
        return self.render(
            request, "status.html", report=report, notice=request.query_params.get("done", "")
        )

    def api_status(self, request: Request) -> Response:
        return JSONResponse(self._status())

    async def retry(self, request: Request) -> Response:
        try:
            form = await _form(request)
        except _Error as e:
            return _json_error(e.status, e.message)
        try:
            job = int(str(form.get("job", "")))
        except ValueError:
            return _json_error(400, "job must be a job id")

        def run() -> tuple[int, int] | None:
            db = self.writer()
            try:
                found = db.conn.execute(
                    "SELECT path FROM jobs WHERE id = ? AND state = 'failed'", (job,)
                ).fetchone()
                if found is None:
                    return None
                jobs = JobQueue(db)
                failed, gone = jobs.failed_existing([decode(found[0])])
                return jobs.retry(failed), jobs.forget_failed(gone)
            finally:
                db.conn.close()

        done = await run_in_threadpool(run)
        if done is None:
            return _json_error(404, "no failed job with that id")
        if _wants_html(request):
            return RedirectResponse("/status?done=retry", 303)
        return JSONResponse({"requeued": done[0], "forgotten": done[1]})


def _pread(fd: int, n: int, offset: int) -> bytes:
    import os

    return os.pread(fd, n, offset)


def _etags(header: str) -> set[str]:
    return {t.strip().removeprefix("W/") for t in header.split(",") if t.strip()}


def _headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def _json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


def _wants_html(request: Request) -> bool:
    """A form posted by the page (not fetch with JSON wanted)."""
    accept = request.headers.get("accept", "")
    return (
        "text/html" in accept
        or "application/json" not in accept
        and "form" in (request.headers.get("content-type", ""))
    )


async def _form(request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > _FORM_MAX:
        raise _Error(413, "the form is too large")
    form = await request.form(max_files=0, max_fields=20)
    return dict(form)


def _with(request: Request, **changes: str | None) -> str:
    params = dict(request.query_params)
    for k, v in changes.items():
        if v is None:
            params.pop(k, None)
        else:
            params[k] = v
    from urllib.parse import urlencode

    return "/?" + urlencode(params)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def routes(ctx: WebContext) -> list[BaseRoute]:
    """Every page route and /api/ JSON route; mounted by watcher.web.app.create_app."""
    p = Pages(ctx)
    return [
        Route("/", p.library, methods=["GET"]),
        Route("/image/{id:int}", p.image, methods=["GET"]),
        Route("/image/{id:int}/caption", p.edit, methods=["POST"]),
        Route("/image/{id:int}/recaption", p.recaption, methods=["POST"]),
        Route("/image/{id:int}/answer", p.save_output, methods=["POST"]),
        Route("/thumb/{id:int}", p.thumb, methods=["GET"]),
        Route("/file/{id:int}", p.original, methods=["GET"]),
        Route("/try", p.try_page, methods=["GET"]),
        Route("/status", p.status_page, methods=["GET"]),
        Route("/api/images", p.api_images, methods=["GET"]),
        Route("/api/images/{id:int}", p.api_image, methods=["GET"]),
        Route("/api/search", p.api_search, methods=["GET"]),
        Route("/api/query-vector", p.api_query_vector, methods=["GET"]),
        Route("/api/status", p.api_status, methods=["GET"]),
        Route("/api/retry", p.retry, methods=["POST"]),
    ]
