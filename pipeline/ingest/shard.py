"""Writing one whole shard (``IngestShardStage``, a Ray task per shard) and recognising a finished one.

The task writes straight to the output URI (any store, see :mod:`runtime.storage`):
``shards/NNNNNN.tar`` (``{key}.mp4`` + ``{key}.json``, built in a local temp file and stored as one complete
object), ``shard_errors/NNNNNN.parquet`` and, LAST, the index ``shards/NNNNNN.parquet`` whose metadata
carries the shard fingerprint: the index is the shard's completion marker. Each file/object appears whole
or not at all, so a killed task leaves no half shard, only a shard without its marker (redone on rerun).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.layout import (
    ERROR_SCHEMA,
    SAMPLE_SCHEMA,
    SHARD_FOLDERS,
    IngestConfig,
    dumps_json,
    error_row,
    folder_sizes,
    shard_name,
    shard_uri,
)
from pipeline.ingest.plan import shard_fingerprint
from pipeline.ingest.sample import process_sample, read_ahead
from pipeline.ingest.segments import SEGMENT_REASONS, check_segments
from pipeline.ingest.tarwriter import TarShardWriter
from pipeline.probe import ProbeError
from runtime import storage
from runtime.errors import ErrorPolicy, check_policy, should_record

READ_AHEAD = 4  # remote inputs in flight per shard task


class IngestShardStage:
    """Writes whole shards; runs without Ray on a hand-made batch.

    ``__call__(batch)`` takes ``{"shard": [index], "rows": [[input rows]]}`` and returns
    ``{"shard": [index], "result": [summary dict]}``. A sample that fails as a named input failure
    (:class:`pipeline.probe.ProbeError`) becomes an error row under ``on_error="record"`` and raises under
    ``"raise"``; any other exception is a bug and raises.
    """

    def __init__(
        self,
        output: str,
        config: dict[str, Any],
        crash_once: str | None = None,
        fsync: bool = True,
        on_error: ErrorPolicy = "record",
    ):
        self.output = storage.normalize(output)
        # fsync: durability of local files against power loss (a killed process is covered by temp + rename;
        # an object store acknowledges a PUT only once the object is durable)
        self.fsync = fsync
        self.config = IngestConfig(**config)
        self.config_fingerprint = self.config.fingerprint()
        self.crash_once = crash_once
        self.on_error = check_policy(on_error)
        for folder in SHARD_FOLDERS:
            storage.makedirs(storage.join(self.output, folder))  # local stores only; objects need none

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        results = [self.write_shard(int(i), list(rows)) for i, rows in zip(batch["shard"], batch["rows"])]
        return {"shard": list(batch["shard"]), "result": results}

    def _maybe_crash(self, shard: int) -> None:
        if not self.crash_once:
            return
        target, marker = self.crash_once.split(":", 1)
        if int(target) == shard and not os.path.exists(marker):
            Path(marker).write_text(f"crashed pid {os.getpid()}\n")
            os._exit(17)  # simulate a killed worker: no cleanup, half-written temp tar left behind

    def _write_tar(self, shard: int, rows: list[dict[str, Any]], raw: IO[bytes]) -> dict[str, Any]:
        """Process every row into the open tar file ``raw``: index records, error rows, input bytes, tar
        sha256/size."""
        records, errors, bytes_in = [], [], 0
        writer = TarShardWriter(raw)
        # Remote inputs are read a few ahead (threads) while this one is probed: object-store latency hidden.
        depth = READ_AHEAD if any(not storage.is_local(row["source"]) for row in rows) else 0
        for i, (row, pending) in enumerate(read_ahead(rows, self.config, depth)):
            if i == len(rows) // 2:
                raw.flush()
                self._maybe_crash(shard)
            try:
                data = None if pending is None else pending.result()  # a read error belongs to this row
                video, record = process_sample(row, self.config, data)
            except ProbeError as exc:
                if not should_record(exc, self.on_error):  # name the input: the row is not recorded
                    named = f"{row['source']} (video_id {row['video_id']!r}): {exc.message}"
                    raise type(exc)(exc.reason, named) from exc
                errors.append(error_row(row, exc.reason, exc.message, shard))
                continue
            if "segments" in row:
                errors += self._segments(row, record, shard)
            bytes_in += record["source_bytes"]
            writer.add(f"{row['key']}.mp4", video)
            writer.add(f"{row['key']}.json", dumps_json(record))
            records.append({**{f: record.get(f) for f in SAMPLE_SCHEMA.names}, "shard": shard})
        writer.close()
        return {"records": records, "errors": errors, "bytes_in": bytes_in,
                "tar_sha256": writer.sha.hexdigest(), "tar_bytes": writer.size}

    def _segments(self, row: dict[str, Any], record: dict[str, Any], shard: int) -> list[dict[str, Any]]:
        """Keep the row's valid timed captions in ``record["segments"]``; an error row per bad one (the
        sample is still written), or raise the first under ``on_error="raise"``."""
        valid, bad = check_segments(row["segments"], row["video_id"], record["duration"], record["fps"])
        record["segments"] = valid
        if bad and not should_record(bad[0], self.on_error):
            raise bad[0]
        return [error_row(row, exc.reason, exc.message, shard) for exc in bad]

    def write_shard(self, shard: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Process and write one shard (tar, error table, then its index); returns counts, tar digest and
        error rows. Nothing of the samples goes back to the caller but these counts and error rows."""
        t0 = time.perf_counter()
        tar_uri = shard_uri(self.output, "shards", shard, ".tar")
        # A local temp file becomes the tar (rename, or ONE upload of the complete object) only on success.
        with storage.open_output(tar_uri, fsync=self.fsync and storage.is_local(tar_uri)) as raw:
            written = self._write_tar(shard, rows, raw)
        records, errors = written["records"], written["errors"]
        storage.write_parquet(
            pa.Table.from_pylist(errors, schema=ERROR_SCHEMA),
            shard_uri(self.output, "shard_errors", shard, ".parquet"),
        )
        shard_meta = {
            "fingerprint": shard_fingerprint(self.config_fingerprint, rows),
            "tar_sha256": written["tar_sha256"],
            "tar_bytes": written["tar_bytes"],
            "samples": len(records),
            "errors": len(errors),
            "segment_errors": sum(e["reason"] in SEGMENT_REASONS for e in errors),
            "inputs": len(rows),
            "bytes_in": written["bytes_in"],
        }
        index = pa.Table.from_pylist(records, schema=SAMPLE_SCHEMA).replace_schema_metadata(
            {b"vidsift_shard": dumps_json(shard_meta)}
        )
        # The index is written last: its presence (with a matching fingerprint) marks the shard complete.
        storage.write_parquet(index, shard_uri(self.output, "shards", shard, ".parquet"))
        return {
            "shard": shard,
            **shard_meta,
            "error_rows": errors,
            "seconds": time.perf_counter() - t0,
            "skipped": False,
        }


def completed_shard(
    output: str | os.PathLike,
    shard: int,
    fingerprint: str,
    listing: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any] | None:
    """The shard's recorded summary when its index, error file and tar exist and match ``fingerprint``.

    ``listing``: ``{"shards": {name: size}, "shard_errors": {...}}`` from one listing of each folder
    (:func:`pipeline.ingest.layout.folder_sizes`), so a rerun over many shards on an object store does not
    ask for every object on its own; listed here when not given.
    """
    if listing is None:
        listing = {f: folder_sizes(storage.join(output, f)) for f in SHARD_FOLDERS}
    index_uri = shard_uri(output, "shards", shard, ".parquet")
    errors_uri = shard_uri(output, "shard_errors", shard, ".parquet")
    name = shard_name(shard)
    shards, shard_errors = listing.get("shards", {}), listing.get("shard_errors", {})
    present = f"{name}.parquet" in shards and f"{name}.tar" in shards and f"{name}.parquet" in shard_errors
    if not present:
        return None
    try:
        fs, path = storage.arrow_filesystem(index_uri)
        metadata = pq.read_schema(path, filesystem=fs).metadata or {}
        shard_meta = json.loads(metadata[b"vidsift_shard"])
        if shard_meta["fingerprint"] != fingerprint or shards[f"{name}.tar"] != shard_meta["tar_bytes"]:
            return None
        errors = storage.read_parquet(errors_uri).cast(ERROR_SCHEMA).to_pylist()
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    if len(errors) != shard_meta["errors"]:
        return None
    return {"shard": shard, **shard_meta, "error_rows": errors, "seconds": 0.0, "skipped": True}


def ingest_shard_task(
    output: str,
    config: dict[str, Any],
    crash_once: str | None,
    fsync: bool,
    on_error: ErrorPolicy,
    shard: int,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """One shard as a Ray task (the driver wraps it with ``ray.remote``)."""
    stage = IngestShardStage(output, config, crash_once, fsync, on_error)
    return stage({"shard": [shard], "rows": [rows]})["result"][0]
