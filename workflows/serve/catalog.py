"""What the service knows about each indexed video besides its vectors: scalar metadata to filter on,
captions and moments for ``/videos/{id}``, and where its bytes are (for previews).

Built from the index version's ``ids.parquet`` (``video_id``, ``key``, ``shard``, clips with ``start_s`` /
``end_s``, ``captions``) and from each ingested shard's ``NNNNNN.parquet`` (``duration``, ``fps``, ``width``,
``height``, ``codec``, manifest fields...). The shards are the ones the version's lineage records (index.json
``lineage.shards``: the shard tars its embeddings came from) unless the service is given ``--shards``, which
override it. A recorded shard that cannot be read (a moved or deleted tree) leaves its videos without
previews or ingest metadata and the catalog ``degraded`` with the reason; a version without lineage (built
before it was recorded) needs ``--shards``, and ``previews_note`` says so. Without the shards a video's
``duration`` is the end of its last indexed clip, and no preview can be made. Given
``jobs.caption`` outputs, each video also carries its generated caption. The ingest manifest's raw source
URI (``source``: a bucket path, a signed URL) is dropped unless ``expose_sources`` says to keep it, so it is
neither shown by ``/videos/{id}`` nor guessable through ``where=`` filters.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from index.annotations import recorded_captions
from pipeline.caption_layout import CAPTIONS_FILE
from pipeline.shard_tar import list_shards
from runtime import storage
from runtime.values import finite_float
from workflows.serve.queries import BadRequest, Filters

log = logging.getLogger(__name__)
# ids.parquet columns that describe one clip, not the video (never offered as where= columns)
CLIP_COLUMNS = ("id", "clip_index", "start_s", "end_s", "captions")
ALLOWED_CACHE = 64  # distinct filters whose allowed-id arrays a catalog keeps
SOURCE_COLUMNS = ("source",)  # ingest fields that say where a video came from (URIs): hidden by default


@dataclasses.dataclass
class Catalog:
    """Per-video metadata of one index version (rebuilt with each version the service loads)."""

    videos: dict[str, dict[str, Any]]  # video_id → scalar columns (where= filters, /videos/{id})
    kinds: dict[str, str]  # column → "number" | "text" | "bool"
    moments: dict[str, list[dict[str, Any]]]  # video_id → indexed clips
    sources: dict[str, tuple[str, str]]  # video_id → (shard tar URI, key): previews
    row_ids: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # video_id → its FAISS ids
    generated: dict[str, str] = dataclasses.field(default_factory=dict)  # video_id → a jobs.caption caption
    shards_from: str | None = None  # where the shard tars came from: "flags" | "lineage" | None (none known)
    previews_note: str | None = None  # why (some) videos have no preview; None when every video has one
    degraded: str | None = None  # a shard tar the lineage records that cannot be read (moved / deleted)
    captions_from: str | None = None  # where the generated captions came from: "flags" | "index" | None
    captions_note: str | None = None  # a caption output the index records that cannot be read
    _allowed: dict[Filters, np.ndarray | None] = dataclasses.field(default_factory=dict, repr=False)
    # searches run on several pool threads: the cache's evict-then-insert must not interleave
    _allowed_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def __len__(self) -> int:
        return len(self.videos)

    def check(self, filters: Filters) -> None:
        """Refuse a filter on a column this index does not carry, naming the ones it does."""
        for column, value in filters.where:
            if column not in self.kinds:
                raise BadRequest(f"unknown filter column {column!r}; this index has: {sorted(self.kinds)}")
            if self.kinds[column] == "number" and finite_float(value) is None:
                raise BadRequest(f"where={column}:{value!r}: {column} is numeric, {value!r} is not a number")

    def matches(self, video_id: str, filters: Filters) -> bool:
        row = self.videos.get(video_id)
        if row is None:
            return False
        duration = row.get("duration")
        if filters.min_duration is not None and (duration is None or duration < filters.min_duration):
            return False
        if filters.max_duration is not None and (duration is None or duration > filters.max_duration):
            return False
        return all(_equal(row.get(c), v, self.kinds[c]) for c, v in filters.where)

    def allowed_ids(self, filters: Filters) -> np.ndarray | None:
        """The FAISS ids (every clip / window row) of the videos passing ``filters``, sorted: the id filter a
        search ranks inside; ``None`` when every video passes (an id filter over every row only costs time:
        p50 6.0 ms against 2.3 ms unfiltered on bench.serve's 20,000 videos). The last ``ALLOWED_CACHE``
        distinct filters are kept (a page of results asks for the same filter again)."""
        with self._allowed_lock:
            if filters in self._allowed:
                return self._allowed[filters]
        rows = [ids for vid, ids in self.row_ids.items() if self.matches(vid, filters)]
        if len(rows) == len(self.row_ids):
            allowed = None
        else:
            allowed = np.unique(np.concatenate(rows).astype(np.int64)) if rows else np.zeros(0, np.int64)
        with self._allowed_lock:
            while len(self._allowed) >= ALLOWED_CACHE:
                self._allowed.pop(next(iter(self._allowed)))
            self._allowed[filters] = allowed
        return allowed

    def preview_window(self, video_id: str, start_s: float, end_s: float) -> tuple[float, float] | None:
        """``(start_s, end_s)`` rounded to the millisecond when a preview of that window may be made: it
        starts where one of the video's indexed clips starts and ends where one ends (a hit's moment, merged
        from adjacent windows or not); None otherwise. Only these windows are decoded, so clients cannot make
        the service decode and cache a new file per millisecond."""
        start, end = round(start_s * 1000), round(end_s * 1000)
        starts, ends = set(), set()
        for moment in self.moments.get(video_id, []):
            first = 0.0 if moment.get("start_s") is None else float(moment["start_s"])
            last = first + 1.0 if moment.get("end_s") is None else float(moment["end_s"])
            starts.add(round(first * 1000))
            ends.add(round(last * 1000))
        if start in starts and end in ends and end > start:
            return start / 1000, end / 1000
        return None

    def describe(self, video_id: str) -> dict[str, Any] | None:
        """``/videos/{id}``: metadata, captions and indexed moments; None for an unknown video."""
        row = self.videos.get(video_id)
        if row is None:
            return None
        moments = self.moments.get(video_id, [])
        captions = list(dict.fromkeys(c for m in moments for c in m.get("captions") or []))
        shown = [{k: v for k, v in m.items() if k != "captions"} for m in moments]
        return {"video_id": video_id, "metadata": row, "captions": captions,
                "generated_caption": self.generated.get(video_id), "moments": shown,
                "has_preview": video_id in self.sources}


def build_catalog(ids: pa.Table, shards: Sequence[str] = (), captions: Sequence[str] = (),
                  expose_sources: bool = False, meta: Mapping[str, Any] | None = None,
                  index_root: str | None = None) -> Catalog:
    """The catalog of an index version from its ids table, the ingested shards (``shards``: folders, which
    override the shard tars ``meta``'s lineage records; ``meta`` is the version's index.json) and
    ``jobs.caption`` output folders (their ``captions.parquet``: the generated caption of each video;
    ``captions`` flags override the caption runs recorded under ``index_root``, ``index.annotations``);
    ``expose_sources`` keeps the ingest ``source`` URIs (module docstring)."""
    videos: dict[str, dict[str, Any]] = {}
    moments: dict[str, list[dict[str, Any]]] = {}
    row_ids: dict[str, list[int]] = {}
    names = [c for c in ids.column_names if c not in CLIP_COLUMNS]
    for row in ids.to_pylist():
        vid = row["video_id"]
        if vid not in videos:
            videos[vid] = {c: row[c] for c in names}
            videos[vid]["num_clips"] = 0
        videos[vid]["num_clips"] += 1
        end = finite_float(row.get("end_s"))
        if end is not None:
            videos[vid]["duration"] = max(videos[vid].get("duration") or 0.0, end)
        moment = {k: row.get(k) for k in ("clip_index", "start_s", "end_s", "captions")}
        moments.setdefault(vid, []).append(moment)
        row_ids.setdefault(vid, []).append(int(row["id"]))
    for clips in moments.values():
        clips.sort(key=lambda m: (m["start_s"] is None, m["start_s"] or 0.0))
    sources: dict[str, tuple[str, str]] = {}
    located = locate_shards(shards, meta or {})
    unreadable = _add_shard_metadata(located.tars, videos, sources, () if expose_sources else SOURCE_COLUMNS)
    generated, captions_from, captions_note = _generated_captions(captions, index_root, videos)
    note, degraded = located.explain(unreadable, len(sources), len(videos))
    return Catalog(videos, _kinds(videos), moments, sources, row_ids, generated=generated,
                   shards_from=located.origin, previews_note=note, degraded=degraded,
                   captions_from=captions_from, captions_note=captions_note)


def _generated_captions(flags: Sequence[str], index_root: str | None,
                        videos: Mapping[str, Any]) -> tuple[dict[str, str], str | None, str | None]:
    """``(video_id → generated caption, where they came from, a note)``: the ``--captions`` folders when
    given (one without captions is an error: a mistyped flag), else the caption runs recorded under the index;
    a recorded one that cannot be read (moved, deleted) is left out and named in the note, the service
    still answers."""
    generated: dict[str, str] = {}
    if flags:
        for folder in flags:
            generated.update(read_generated_captions(folder, videos))
        return generated, "flags", None
    recorded = recorded_captions(index_root) if index_root else []
    missing = []
    for folder in recorded:
        try:
            generated.update(read_generated_captions(folder, videos))
        except FileNotFoundError:
            missing.append(folder)
    note = None
    if missing:
        note = (f"{len(missing)} of the {len(recorded)} caption runs recorded under the index cannot be read "
                f"(moved or deleted?), e.g. {missing[0]!r}: their captions are not shown")
        log.warning("catalog: %s", note)
    return generated, "index" if recorded else None, note


@dataclasses.dataclass(frozen=True)
class ShardLocation:
    """The shard tars a catalog reads, where they came from, and what the version's lineage leaves out."""

    tars: list[str]
    origin: str | None  # "flags" (--shards), "lineage" (index.json), None (neither)
    version: str
    unrecorded: list[str]  # embedding files of the version that record no shard tar

    def explain(self, unreadable: Sequence[str], with_source: int, videos: int) -> tuple[str | None,
                                                                                          str | None]:
        """``(previews_note, degraded)``: why videos lack previews, and the degraded reason when tars the
        lineage records cannot be read (a moved or deleted tree)."""
        override = "serve with --shards INGEST_DIR (where the shards are now) for previews and metadata"
        if self.origin is None:
            why = ("records no lineage (built before index.json recorded the shards it came from)"
                   if not self.unrecorded else
                   f"records no shard tars (its embeddings predate lineage, e.g. {self.unrecorded[0]!r})")
            return f"index version {self.version!r} {why}: {override}", None
        degraded = None
        if unreadable and self.origin == "lineage":
            degraded = (f"index version {self.version!r}: {len(unreadable)} of {len(self.tars)} shard tars "
                        f"its lineage records cannot be read (moved or deleted?), e.g. {unreadable[0]!r}: "
                        f"their videos have no previews or ingest metadata; {override}")
        if with_source == videos:
            return None, degraded
        missing = videos - with_source
        if degraded:
            return degraded, degraded
        if self.origin == "lineage" and self.unrecorded:
            return (f"{missing} of {videos} videos come from embeddings that record no shard tar (e.g. "
                    f"{self.unrecorded[0]!r}): {override}"), None
        where = "the --shards given" if self.origin == "flags" else "the shard tars the lineage records"
        return f"{missing} of {videos} videos are in none of {where}", None


def locate_shards(flags: Sequence[str], meta: Mapping[str, Any]) -> ShardLocation:
    """The shard tars to read: every tar of the ``--shards`` folders when given (a folder without shards
    is an error naming it), else the tars index.json's ``lineage.shards`` records (absolute paths / URIs,
    as the embeddings recorded them)."""
    lineage = meta.get("lineage") or {}
    version = str(meta.get("version", "?"))
    unrecorded = list(lineage.get("unrecorded") or [])
    if flags:
        tars = [tar for folder in flags for tar in list_shards(folder)]
        return ShardLocation(tars, "flags", version, unrecorded)
    recorded = list(lineage.get("shards") or [])
    return ShardLocation(recorded, "lineage" if recorded else None, version, unrecorded)


def read_generated_captions(folder: str, videos: Mapping[str, Any]) -> dict[str, str]:
    """``video_id → caption`` from a ``jobs.caption`` output folder, for the videos of this index version;
    a folder without ``captions.parquet`` is an error naming it (a mistyped flag must not serve silently)."""
    path = storage.join(folder, CAPTIONS_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"--captions {folder!r}: no {CAPTIONS_FILE} there (a jobs.caption --output)")
    table = storage.read_parquet(path, columns=["video_id", "caption"])
    return {v: c for v, c in zip(table["video_id"].to_pylist(), table["caption"].to_pylist()) if v in videos}


def _add_shard_metadata(tars: Sequence[str], videos: dict[str, dict[str, Any]], sources: dict,
                        hidden: Sequence[str] = SOURCE_COLUMNS) -> list[str]:
    """Overlay the ingest shards' per-video scalar fields (but ``hidden`` ones) and record where each
    video's mp4 is; returns the tars that could not be read (no ``NNNNNN.parquet`` beside them)."""
    unreadable = []
    for tar in tars:
        marker = tar[: -len(".tar")] + ".parquet"
        try:
            table = storage.read_parquet(marker) if storage.exists(marker) else None
        except (OSError, ValueError) as exc:  # a store that refuses (no such bucket, no access)
            log.warning("%s cannot be read: %s", marker, exc)
            table = None
        if table is None:
            log.warning("%s has no readable %s: its videos get no previews", tar, storage.name(marker))
            unreadable.append(tar)
            continue
        scalar = [f.name for f in table.schema if _is_scalar(f.type)]
        for row in table.select(scalar).to_pylist():
            vid = row.get("video_id")
            if vid in videos:
                videos[vid].update({k: v for k, v in row.items() if k != "shard" and k not in hidden})
                sources[vid] = (tar, row["key"])
    return unreadable


def _is_scalar(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_string(kind) \
        or pa.types.is_large_string(kind) or pa.types.is_boolean(kind)


def _kinds(videos: dict[str, dict[str, Any]]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for row in videos.values():
        for column, value in row.items():
            if value is None or column in kinds:
                continue
            kinds[column] = "bool" if isinstance(value, bool) else \
                "number" if isinstance(value, (int, float)) else "text"
    return kinds


def _equal(have: Any, want: str, kind: str) -> bool:
    if have is None:
        return False
    if kind == "number":
        return finite_float(want) == finite_float(have)
    if kind == "bool":
        return str(have).lower() == want.lower()
    return str(have) == want
