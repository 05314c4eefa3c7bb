"""The search service as one ASGI app (Starlette): JSON endpoints, previews and the static page.

``GET /search``, ``POST /search``, ``GET /videos/{id}``, ``GET /previews/{id}.webp?start=&end=``,
``GET /healthz``, ``GET /version``, ``GET /`` (the page) and ``/static/*``. Bad input is a 4xx JSON
``{"error": message, "status": code}``; every search answer carries the index version that produced it.
Searches run in the bounded pool of :mod:`.pool` (503 with ``Retry-After`` when full or past the deadline);
:mod:`.access` refuses foreign Host headers and, with a token, unauthenticated requests; an internal error is
logged and answered without its text. The same app runs under uvicorn (default) or as a Ray Serve
deployment (:mod:`workflows.serve.run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from index.query import Hit
from workflows.serve.access import Access, AccessGuard
from workflows.serve.live import LiveIndex
from workflows.serve.pool import DeadlineExceeded, Overloaded, PoolConfig, SearchPool
from workflows.serve.previews import PreviewError, PreviewMaker
from workflows.serve.queries import (
    MAX_BODY_BYTES,
    BadRequest,
    Limits,
    SearchRequest,
    check_body_size,
    check_content_type,
    check_query_string,
    parse_body,
    parse_params,
)
from workflows.serve.querylog import QueryLog
from workflows.serve.search import preview_url, run_search

PAGE_DIR = Path(__file__).resolve().parent / "page"
DRAIN_LIMIT_BYTES = 8 * 1024 * 1024  # a bigger body is refused and the connection dropped at once
log = logging.getLogger(__name__)


def create_app(
    live: LiveIndex, previews: PreviewMaker | None = None, limits: Limits = Limits(),
    query_log: QueryLog | None = None, pool: PoolConfig = PoolConfig(), access: Access = Access(),
) -> Starlette:
    """The service over ``live``; ``previews=None`` serves hits without previews; ``query_log`` records the
    texts of answered searches (for tuning the next build on them); ``limits`` bound one request's work,
    ``pool`` where it runs, ``access`` who may ask (:mod:`.access`; the default answers loopback names with
    no token)."""
    searches = SearchPool(pool)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        live.start()
        if query_log is not None:
            query_log.start()
        try:
            yield
        finally:
            live.stop()
            searches.shutdown()
            if query_log is not None:
                query_log.stop()

    routes = [
        Route("/", page), Route("/search", search_get, methods=["GET"]),
        Route("/search", search_post, methods=["POST"]), Route("/videos/{video_id:path}", video),
        Route("/previews/{name:path}", preview), Route("/healthz", healthz), Route("/version", version),
        Mount("/static", StaticFiles(directory=PAGE_DIR), name="static"),
    ]
    handlers = {BadRequest: _error_response, PreviewError: _error_response, HTTPException: _http_error,
                Overloaded: _busy_response, DeadlineExceeded: _busy_response, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan,
                    middleware=[Middleware(AccessGuard, access=access)])
    app.state.live, app.state.previews, app.state.limits = live, previews, limits
    app.state.query_log, app.state.searches = query_log, searches
    return app


async def page(request: Request) -> Response:
    return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def search_get(request: Request) -> Response:
    check_query_string(request.url.query)
    parsed = parse_params(request.query_params.multi_items(), request.app.state.limits)
    return await _answer(request, parsed)


async def search_post(request: Request) -> Response:
    check_content_type(request.headers.get("content-type"))
    body = await _read_body(request)
    return await _answer(request, parse_body(body, request.app.state.limits))


async def _answer(request: Request, parsed: SearchRequest) -> Response:
    # The search and the JSON of its answer run in the bounded pool, never on the event loop: one heavy
    # request must not hold up every other connection (module docstring of .pool).
    snapshot = request.app.state.live.current  # read once: the whole request uses this version
    body = await request.app.state.searches.run(parsed.ranked, _search_body, snapshot, parsed)
    if request.app.state.query_log is not None:
        request.app.state.query_log.record(parsed.queries, snapshot.version)
    return Response(body, media_type="application/json", headers={"X-Vidsift-Version": snapshot.version})


def _search_body(deadline: float, snapshot, parsed: SearchRequest) -> bytes:
    t0 = time.perf_counter()
    outcome = run_search(snapshot, parsed, deadline)
    common = {"version": snapshot.version, "k": parsed.k, "offset": parsed.offset,
              "filters": parsed.filters.to_dict(), "partial": outcome.partial,
              "missing_shards": list(outcome.missing_shards),
              "took_ms": round((time.perf_counter() - t0) * 1000, 2)}
    if parsed.batch:
        body: dict[str, Any] = {**common, "results": [{"query": q, "hits": h}
                                                      for q, h in zip(parsed.queries, outcome.pages)]}
    else:
        body = {**common, "query": parsed.queries[0], "hits": outcome.pages[0]}
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


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
        note = request.app.state.live.current.catalog.previews_note or "serve with --shards INGEST_DIR"
        raise PreviewError(f"no preview for {video_id!r}: the service cannot reach its video ({note})")
    start = _float_param(request, "start", 0.0)
    end = _float_param(request, "end", start + 1.0)
    window = request.app.state.live.current.catalog.preview_window(video_id, start, end)
    if window is None:
        raise PreviewError(f"no preview of {video_id!r} from {start} to {end} s: previews are made of the "
                           "windows the index lists for a video (a hit's preview_url)")
    data = await run_in_threadpool(maker.render, source, *window)  # decoding takes 100s of ms
    return Response(data, media_type="image/webp", headers={"Cache-Control": "public, max-age=86400"})


async def healthz(request: Request) -> Response:
    """Always 200 while a version answers (module docstring of .live): ``status`` says ``degraded``, with
    the reason, while the newest published version is not served; the service answers from the old one."""
    return JSONResponse(request.app.state.live.health())


async def version(request: Request) -> Response:
    query_log: QueryLog | None = request.app.state.query_log
    previews: PreviewMaker | None = request.app.state.previews
    live: LiveIndex = request.app.state.live
    return JSONResponse({**live.status(), "health": live.health()["status"],
                         "query_log": None if query_log is None else query_log.status(),
                         "limits": dataclasses.asdict(request.app.state.limits),
                         "search_pool": request.app.state.searches.status(),
                         "preview_cache": None if previews is None else previews.status()})


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


async def _busy_response(request: Request, exc: Overloaded | DeadlineExceeded) -> Response:
    return JSONResponse({"error": str(exc), "status": 503}, status_code=503,
                        headers={"Retry-After": str(exc.retry_after_s)})


async def _internal_error(request: Request, exc: Exception) -> Response:
    # The exception's text stays in the log: it may hold paths, URIs or data a client must not see.
    log.exception("internal error on %s %s", request.method, request.url.path)
    return _json_error("internal error (logged by the service)", 500)
