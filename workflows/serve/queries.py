"""Search requests: parse and check a ``GET /search`` query string or a ``POST /search`` JSON body.

Every problem is a :class:`BadRequest` whose message names the parameter and the rule it broke, so a client
sees ``k must be an integer, got 'ten'`` rather than a stack trace; sizes are checked before anything is
parsed or encoded.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

MAX_QUERY_CHARS = 1_000  # a text query longer than this is no search anyone types; the encoder truncates
MAX_BODY_BYTES = 256 * 1024  # a POST body above this is refused before it is read in full
MAX_QUERY_STRING = 16 * 1024  # GET: the raw query string
MAX_BATCH = 64  # queries in one POST
JSON_TYPES = ("application/json",)  # what POST /search accepts (no cross-site form / text/plain POST)
GET_PARAMS = ("q", "k", "offset", "min_duration", "max_duration", "where")
BODY_FIELDS = ("q", "query", "queries", "k", "offset", "min_duration", "max_duration", "where")


class BadRequest(ValueError):
    """A request the service refuses: ``status`` (400, 413) and a message naming the problem."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Filters:
    """Video filters: duration range (seconds, inclusive) and ``column == value`` conditions."""

    min_duration: float | None = None
    max_duration: float | None = None
    where: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return self.min_duration is not None or self.max_duration is not None or bool(self.where)

    def to_dict(self) -> dict[str, Any]:
        return {"min_duration": self.min_duration, "max_duration": self.max_duration,
                "where": [f"{c}:{v}" for c, v in self.where]}


@dataclasses.dataclass(frozen=True)
class Limits:
    """How much work one search request may ask for; each breach is a 4xx naming the limit.

    Each limit alone is not enough: ``k``, ``offset`` and the batch size multiply, so one 2 KB POST could ask
    for 64 × 110,000 ranked videos. ``max_depth`` caps ``offset + k`` (the ranking each query needs),
    ``max_ranked`` caps ``queries × (offset + k)`` (the ranking the whole request needs) and ``max_where``
    the ``where`` conditions (a filter not seen before is a Python pass over every video)."""

    max_k: int = 1_000
    max_depth: int = 2_000
    max_ranked: int = 4_000
    max_where: int = 4
    max_batch: int = MAX_BATCH

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.max_k <= self.max_depth <= self.max_ranked:
            raise ValueError(f"limits must satisfy max_k <= max_depth <= max_ranked, got {self.max_k}, "
                             f"{self.max_depth}, {self.max_ranked}")


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    """One parsed search: the query texts, page (``k`` hits after ``offset``) and filters."""

    queries: tuple[str, ...]
    k: int = 10
    offset: int = 0
    filters: Filters = Filters()
    batch: bool = False

    @property
    def ranked(self) -> int:
        """The ranked videos this request needs: what :class:`Limits` ``max_ranked`` bounds."""
        return len(self.queries) * (self.offset + self.k)


def check_query_string(raw: str) -> None:
    if len(raw) > MAX_QUERY_STRING:
        raise BadRequest(f"query string is {len(raw):,} bytes; the limit is {MAX_QUERY_STRING:,}", 413)


def check_body_size(size: int) -> None:
    if size > MAX_BODY_BYTES:
        raise BadRequest(f"request body is over {MAX_BODY_BYTES:,} bytes (got {size:,}); send fewer or "
                         "shorter queries", 413)


def check_content_type(value: str | None) -> None:
    """POST bodies must say they are JSON: a web page on any origin can POST ``text/plain`` or a form to this
    service without a CORS preflight, and those requests would be answered and logged to ``--query-log``."""
    kind = (value or "").split(";")[0].strip().lower()
    if kind not in JSON_TYPES:
        raise BadRequest(f"POST /search needs Content-Type: application/json, got {value or 'none'!r}", 415)


def parse_params(params: Sequence[tuple[str, str]], limits: Limits) -> SearchRequest:
    """``GET /search``: ``q``, ``k``, ``offset``, ``min_duration``, ``max_duration``, ``where`` (repeats)."""
    unknown = sorted({name for name, _ in params if name not in GET_PARAMS})
    if unknown:
        raise BadRequest(f"unknown parameter(s) {unknown}; known: {list(GET_PARAMS)}")
    single = {}
    for name, value in params:
        if name != "where" and name in single:
            raise BadRequest(f"parameter {name!r} given more than once")
        single[name] = value
    if "q" not in single:
        raise BadRequest("missing query: pass q=TEXT")
    where = [value for name, value in params if name == "where"]
    return _request([single["q"]], single, where, limits, batch=False)


def parse_body(body: bytes, limits: Limits) -> SearchRequest:
    """``POST /search``: ``{"q": TEXT, ...}`` or ``{"queries": [TEXT, ...], ...}`` with the GET fields."""
    check_body_size(len(body))
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"JSON body must be an object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(BODY_FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; known: {list(BODY_FIELDS)}")
    given = [f for f in ("q", "query", "queries") if f in payload]
    if len(given) != 1:
        raise BadRequest('pass exactly one of "q" (one query) or "queries" (a list)')
    texts = payload[given[0]]
    batch = given[0] == "queries"
    if batch and (not isinstance(texts, list) or not texts):
        raise BadRequest('"queries" must be a non-empty list of strings')
    if batch and len(texts) > limits.max_batch:
        raise BadRequest(f'"queries" holds {len(texts)} queries; the limit is {limits.max_batch}', 413)
    where = payload.get("where") or []
    if isinstance(where, Mapping):
        where = [f"{c}:{v}" for c, v in where.items()]
    elif isinstance(where, str):
        where = [where]
    if not isinstance(where, list) or not all(isinstance(w, str) for w in where):
        raise BadRequest('"where" must be "col:value", a list of them or an object {col: value}')
    fields = {k: v for k, v in payload.items() if k in ("k", "offset", "min_duration", "max_duration")}
    return _request(texts if batch else [texts], fields, where, limits, batch=batch)


def _request(
    texts: list, fields: Mapping[str, Any], where: list[str], limits: Limits, batch: bool
) -> SearchRequest:
    if len(where) > limits.max_where:
        raise BadRequest(f"{len(where)} where conditions; the limit (max_where) is {limits.max_where}")
    queries = tuple(_text(t, i if batch else None) for i, t in enumerate(texts))
    k = _integer("k", fields.get("k", 10))
    if k < 1:
        raise BadRequest(f"k must be >= 1, got {k}")
    if k > limits.max_k:
        raise BadRequest(f"k={k} is above this service's maximum k of {limits.max_k}")
    offset = _integer("offset", fields.get("offset", 0))
    if offset < 0:
        raise BadRequest(f"offset must be >= 0, got {offset}")
    if offset + k > limits.max_depth:
        raise BadRequest(f"offset + k = {offset + k:,} is above this service's limit (max_depth) of "
                         f"{limits.max_depth:,}: page no deeper into one ranking")
    if len(queries) * (offset + k) > limits.max_ranked:
        raise BadRequest(f"{len(queries)} queries × (offset + k = {offset + k:,}) = "
                         f"{len(queries) * (offset + k):,} ranked videos is above this service's limit "
                         f"(max_ranked) of {limits.max_ranked:,}: send fewer queries or a smaller k")
    lo = _seconds("min_duration", fields.get("min_duration"))
    hi = _seconds("max_duration", fields.get("max_duration"))
    if lo is not None and hi is not None and lo > hi:
        raise BadRequest(f"min_duration {lo} is above max_duration {hi}")
    return SearchRequest(queries, k, offset, Filters(lo, hi, tuple(_condition(w) for w in where)), batch)


def _text(value: Any, position: int | None) -> str:
    where = "" if position is None else f" at position {position}"
    if not isinstance(value, str):
        raise BadRequest(f"query{where} must be a string, got {type(value).__name__}")
    if len(value) > MAX_QUERY_CHARS:
        raise BadRequest(f"query{where} is {len(value):,} characters; the limit is {MAX_QUERY_CHARS:,}", 413)
    if not value.strip():
        raise BadRequest(f"empty query{where}: type some words to search for")
    return value.strip()


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadRequest(f"{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {value!r}") from None


def _seconds(name: str, value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise BadRequest(f"{name} must be a finite number >= 0, got {value!r}")
    return seconds


def _condition(text: str) -> tuple[str, str]:
    column, sep, value = text.partition(":")
    if not sep or not column.strip():
        raise BadRequest(f"where={text!r} must be COLUMN:VALUE")
    return column.strip(), value.strip()
