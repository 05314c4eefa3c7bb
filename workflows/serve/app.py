"""The search service as one ASGI app (Starlette): JSON endpoints, previews and the static page.

``GET /search``, ``POST /search``, ``GET /videos/{id}``, ``GET /previews/{id}.webp?start=&end=``,
``GET /healthz``, ``GET /version``, ``GET /`` (the page) and ``/static/*``. Bad input is a 4xx JSON
``{"error": message, "status": code}``; every search answer carries the index version that produced it.
The same app runs under uvicorn (default) or as a Ray Serve deployment (:mod:`workflows.serve.run`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from index.query import Hit
from workflows.serve.live import LiveIndex
from workflows.serve.previews import PreviewError, PreviewMaker
from workflows.serve.queries import (
    MAX_BODY_BYTES,
    BadRequest,
    check_body_size,
    check_query_string,
    parse_body,
    parse_params,
)
from workflows.serve.querylog import QueryLog
from workflows.serve.search import preview_url, run_search

PAGE_DIR = Path(__file__).resolve().parent / "page"
DEFAULT_MAX_K = 10_000
DRAIN_LIMIT_BYTES = 8 * 1024 * 1024  # a bigger body is refused and the connection dropped at once
log = logging.getLogger(__name__)


def create_app(
    live: LiveIndex, previews: PreviewMaker | None = None, max_k: int = DEFAULT_MAX_K,
    query_log: QueryLog | None = None,
) -> Starlette:
    """The service over ``live``; ``previews=None`` serves hits without previews; ``query_log`` records the
    texts of answered searches (for tuning the next build on them)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        live.start()
        if query_log is not None:
            query_log.start()
        try:
            yield
        finally:
            live.stop()
            if query_log is not None:
                query_log.stop()

    routes = [
        Route("/", page), Route("/search", search_get, methods=["GET"]),
        Route("/search", search_post, methods=["POST"]), Route("/videos/{video_id:path}", video),
        Route("/previews/{name:path}", preview), Route("/healthz", healthz), Route("/version", version),
        Mount("/static", StaticFiles(directory=PAGE_DIR), name="static"),
    ]
    handlers = {BadRequest: _error_response, PreviewError: _error_response, HTTPException: _http_error,
                Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.live, app.state.previews, app.state.max_k = live, previews, int(max_k)
    app.state.query_log = query_log
    return app


async def page(request: Request) -> Response:
    return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def search_get(request: Request) -> Response:
    check_query_string(request.url.query)
    parsed = parse_params(request.query_params.multi_items(), request.app.state.max_k)
    return _answer(request, parsed)


async def search_post(request: Request) -> Response:
    body = await _read_body(request)
    return _answer(request, parse_body(body, request.app.state.max_k))


def _answer(request: Request, parsed) -> Response:
    # Searches run inline on the event loop: one text encode + FAISS search is a few ms, and on 2 cores a
    # thread hop per request costs more than it overlaps (docs/serve.md, "Why uvicorn").
    t0 = time.perf_counter()
    snapshot = request.app.state.live.current  # read once: the whole request uses this version
    pages = run_search(snapshot, parsed)
    if request.app.state.query_log is not None:
        request.app.state.query_log.record(parsed.queries, snapshot.version)
    took_ms = round((time.perf_counter() - t0) * 1000, 2)
    common = {"version": snapshot.version, "k": parsed.k, "offset": parsed.offset,
              "filters": parsed.filters.to_dict(), "took_ms": took_ms}
    if parsed.batch:
        body: dict[str, Any] = {**common, "results": [{"query": q, "hits": h}
                                                      for q, h in zip(parsed.queries, pages)]}
    else:
        body = {**common, "query": parsed.queries[0], "hits": pages[0]}
    return JSONResponse(body, headers={"X-Vidsift-Version": snapshot.version})


async def _read_body(request: Request) -> bytes:
    """The body, refused as soon as it is known to be too big (nothing of it is kept, parsed or encoded)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        if int(declared) <= DRAIN_LIMIT_BYTES:
            # Discard the rest first: a client that writes its whole body before reading (urllib, requests)
            # would otherwise get a broken pipe instead of the 413 that says why.
            async for _chunk in request.stream():
                pass
        check_body_size(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        check_body_size(size)
        chunks.append(chunk)
    return b"".join(chunks)


async def video(request: Request) -> Response:
    snapshot = request.app.state.live.current
    video_id = request.path_params["video_id"]
    described = snapshot.catalog.describe(video_id)
    if described is None:
        return _json_error(f"unknown video_id {video_id!r} in index version {snapshot.version}", 404)
    if described["has_preview"] and described["moments"]:
        first = described["moments"][0]
        described["preview_url"] = _preview_path(video_id, first.get("start_s"), first.get("end_s"))
    return JSONResponse({**described, "version": snapshot.version})


async def preview(request: Request) -> Response:
    name = request.path_params["name"]
    if not name.endswith(".webp"):
        raise PreviewError(f"previews are /previews/<video_id>.webp, got {name!r}")
    video_id = unquote(name[: -len(".webp")])
    maker: PreviewMaker | None = request.app.state.previews
    source = request.app.state.live.current.catalog.sources.get(video_id)
    if maker is None or source is None:
        raise PreviewError(f"no preview for {video_id!r}: the service cannot reach its video "
                           "(serve with --shards INGEST_DIR)")
    start = _float_param(request, "start", 0.0)
    end = _float_param(request, "end", start + 1.0)
    path = await run_in_threadpool(maker.path, source, start, end)  # decoding takes 100s of ms
    return FileResponse(path, media_type="image/webp", headers={"Cache-Control": "public, max-age=86400"})


async def healthz(request: Request) -> Response:
    live: LiveIndex = request.app.state.live
    return JSONResponse({"ok": True, "version": live.current.version})


async def version(request: Request) -> Response:
    query_log: QueryLog | None = request.app.state.query_log
    return JSONResponse({**request.app.state.live.status(),
                         "query_log": None if query_log is None else query_log.status()})


def _preview_path(video_id: str, start, end) -> str:
    return preview_url(Hit(video_id=video_id, score=0.0, start_s=start, end_s=end))


def _float_param(request: Request, name: str, default: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be finite, got {raw!r}")
    return value


def _json_error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def _error_response(request: Request, exc: Exception) -> Response:
    return _json_error(str(exc), getattr(exc, "status", 400))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _json_error(f"{exc.detail}: {request.method} {request.url.path}", exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return _json_error(f"internal error: {type(exc).__name__}: {exc}", 500)
