"""Writing one whole shard (``IngestShardStage``, a Ray task per shard) and recognising a finished one.

``shards/NNNNNN.tar`` (``{key}.mp4`` + ``{key}.json``), ``shard_errors/NNNNNN.parquet`` and, last, the index
``shards/NNNNNN.parquet`` whose metadata carries the shard fingerprint. Every file goes to a temp name and is
``os.replace``d, so a killed task leaves no half shard.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.layout import (
    ERROR_SCHEMA,
    SAMPLE_SCHEMA,
    IngestConfig,
    atomic_write_parquet,
    dumps_json,
    error_row,
    shard_name,
)
from pipeline.ingest.plan import shard_fingerprint
from pipeline.ingest.sample import process_sample
from pipeline.ingest.tarwriter import TarShardWriter
from pipeline.probe import ProbeError
from runtime.errors import ErrorPolicy, check_policy, should_record


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
        self.output = Path(output)
        self.fsync = fsync  # durability against power loss; a killed process is covered by temp + rename
        self.config = IngestConfig(**config)
        self.config_fingerprint = self.config.fingerprint()
        self.crash_once = crash_once
        self.on_error = check_policy(on_error)
        (self.output / "shards").mkdir(parents=True, exist_ok=True)
        (self.output / "shard_errors").mkdir(parents=True, exist_ok=True)

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

    def _write_tar(self, shard: int, rows: list[dict[str, Any]], tmp_tar: Path) -> dict[str, Any]:
        """Process every row into ``tmp_tar``: index records, error rows, input bytes, tar sha256/size."""
        records, errors, bytes_in = [], [], 0
        with open(tmp_tar, "wb") as raw:
            writer = TarShardWriter(raw)
            for i, row in enumerate(rows):
                if i == len(rows) // 2:
                    raw.flush()
                    self._maybe_crash(shard)
                try:
                    video, record = process_sample(row, self.config)
                except ProbeError as exc:
                    if not should_record(exc, self.on_error):  # name the input: the row is not recorded
                        named = f"{row['source']} (video_id {row['video_id']!r}): {exc.message}"
                        raise type(exc)(exc.reason, named) from exc
                    errors.append(error_row(row, exc.reason, exc.message, shard))
                    continue
                bytes_in += record["source_bytes"]
                writer.add(f"{row['key']}.mp4", video)
                writer.add(f"{row['key']}.json", dumps_json(record))
                records.append({**{f: record.get(f) for f in SAMPLE_SCHEMA.names}, "shard": shard})
            writer.close()
            raw.flush()
            if self.fsync:
                os.fsync(raw.fileno())
        return {"records": records, "errors": errors, "bytes_in": bytes_in,
                "tar_sha256": writer.sha.hexdigest(), "tar_bytes": writer.size}

    def write_shard(self, shard: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Process and write one shard atomically; returns counts, tar digest and error rows."""
        t0 = time.perf_counter()
        name = shard_name(shard)
        tar_path = self.output / "shards" / f"{name}.tar"
        tmp_tar = tar_path.with_name(f"{tar_path.name}.tmp-{os.getpid()}")
        written = self._write_tar(shard, rows, tmp_tar)
        records, errors = written["records"], written["errors"]
        os.replace(tmp_tar, tar_path)
        atomic_write_parquet(
            self.output / "shard_errors" / f"{name}.parquet",
            pa.Table.from_pylist(errors, schema=ERROR_SCHEMA),
        )
        shard_meta = {
            "fingerprint": shard_fingerprint(self.config_fingerprint, rows),
            "tar_sha256": written["tar_sha256"],
            "tar_bytes": written["tar_bytes"],
            "samples": len(records),
            "errors": len(errors),
            "inputs": len(rows),
            "bytes_in": written["bytes_in"],
        }
        index = pa.Table.from_pylist(records, schema=SAMPLE_SCHEMA).replace_schema_metadata(
            {b"vidsift_shard": dumps_json(shard_meta)}
        )
        # The index is written last: its presence (with a matching fingerprint) marks the shard complete.
        atomic_write_parquet(self.output / "shards" / f"{name}.parquet", index)
        return {
            "shard": shard,
            **shard_meta,
            "error_rows": errors,
            "seconds": time.perf_counter() - t0,
            "skipped": False,
        }


def completed_shard(output: Path, shard: int, fingerprint: str) -> dict[str, Any] | None:
    """The shard's recorded summary when its index, error file and tar exist and match ``fingerprint``."""
    name = shard_name(shard)
    index_path = output / "shards" / f"{name}.parquet"
    tar_path = output / "shards" / f"{name}.tar"
    errors_path = output / "shard_errors" / f"{name}.parquet"
    if not (index_path.exists() and tar_path.exists() and errors_path.exists()):
        return None
    try:
        metadata = pq.read_schema(index_path).metadata or {}
        shard_meta = json.loads(metadata[b"vidsift_shard"])
        if shard_meta["fingerprint"] != fingerprint or tar_path.stat().st_size != shard_meta["tar_bytes"]:
            return None
        errors = pq.read_table(errors_path, schema=ERROR_SCHEMA).to_pylist()
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
