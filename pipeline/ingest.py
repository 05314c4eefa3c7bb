"""Ingest raw videos into WebDataset shards with Ray: read, hash, probe, validate, transcode, write.

Plan (driver, deterministic): read the input rows, flag bad URIs and duplicate ids, sort by id, assign
sanitised keys, cut shards by count and declared bytes. Work (Ray, one task per shard): ``IngestShardStage``
writes one whole shard -- ``shards/NNNNNN.tar`` (``{key}.mp4`` + ``{key}.json``),
``shard_errors/NNNNNN.parquet`` and, last, the index ``shards/NNNNNN.parquet`` whose metadata carries the
shard fingerprint. Every file goes to a temp name and is ``os.replace``d, so a killed task leaves no half
shard. A rerun skips shards whose index + tar match the plan's fingerprint and redoes the rest. Finally
``errors.parquet`` and ``manifest.json`` are written and ``samples + errors == inputs`` is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.inputs import InputError, read_inputs
from pipeline.keys import assign_keys
from pipeline.probe import ProbeError, probe_video, transcode_video

FORMAT_VERSION = "vidsift-ingest-1"
REASONS = (
    "missing",
    "unreadable",
    "not_a_video",
    "no_video_stream",
    "zero_duration",
    "decode_error",
    "too_large",
    "duplicate_id",
    "bad_uri",
)
CRASH_ENV = "VIDSIFT_INGEST_CRASH_ONCE"  # test hook: "<shard>:<marker file>" -> os._exit mid-shard, once
SHARD_DIGITS = 6

SAMPLE_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("key", pa.string()),
        ("source", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("duration", pa.float64()),
        ("fps", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("codec", pa.string()),
        ("num_frames", pa.int64()),
        ("num_keyframes", pa.int64()),
        ("captions", pa.list_(pa.string())),
        ("split", pa.string()),
        ("caption_class", pa.string()),
        ("hard_group", pa.string()),
        ("transcoded", pa.bool_()),
        ("source_sha256", pa.string()),
        ("source_bytes", pa.int64()),
        ("shard", pa.int64()),
    ]
)
ERROR_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("video_id", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("input_index", pa.int64()),
        ("shard", pa.int64()),
    ]
)


class IngestIncompleteError(RuntimeError):
    """Some shard tasks died (worker killed, out of memory); rerun the same command to finish the job."""


@dataclass(frozen=True)
class IngestConfig:
    """Everything that changes shard bytes (workers do not, so they are not here)."""

    samples_per_shard: int = 64
    max_shard_bytes: int | None = 1 << 30
    transcode: bool = False
    short_side: int | None = None
    fps: float | None = None
    keyframe_interval: float = 1.0
    max_bytes: int | None = 2 << 30
    max_pixels: int | None = None
    decode_check: bool = False

    def fingerprint(self) -> str:
        """sha256 of the config + format version: a change invalidates every shard."""
        payload = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}"


def dumps_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def error_row(row: dict[str, Any], reason: str, message: str, shard: int = -1) -> dict[str, Any]:
    assert reason in REASONS, reason
    return {
        "source": row.get("source", ""),
        "video_id": row.get("video_id"),
        "reason": reason,
        "message": str(message)[:2000],
        "input_index": row.get("input_index"),
        "shard": shard,
    }


# ------------------------------------------------------------------------------------------------ planning
def plan_inputs(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split input rows into (candidates sorted by id with keys assigned, driver-level error rows).

    Bad URIs are errors; of several rows with the same id the first in input order is kept, the others are
    ``duplicate_id`` errors.
    """
    errors, candidates, seen = [], [], {}
    for row in rows:
        if "error" in row:
            errors.append(error_row(row, *row["error"]))
            continue
        first = seen.get(row["video_id"])
        if first is not None:
            errors.append(
                error_row(
                    row,
                    "duplicate_id",
                    f"video_id {row['video_id']!r} already used by input "
                    f"row {first['input_index']} ({first['source']})",
                )
            )
            continue
        seen[row["video_id"]] = row
        candidates.append(row)
    keys = assign_keys([r["video_id"] for r in candidates])
    candidates = sorted(candidates, key=lambda r: r["video_id"])
    for row in candidates:
        row["key"] = keys[row["video_id"]]
    return candidates, errors


def plan_shards(
    rows: list[dict[str, Any]], samples_per_shard: int, max_shard_bytes: int | None = None
) -> list[list[dict[str, Any]]]:
    """Cut sorted rows into shards of <= ``samples_per_shard`` rows and <= ``max_shard_bytes`` bytes."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    shards: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    current_bytes = 0
    for row in rows:
        size = row.get("declared_bytes") or 0
        full = len(current) >= samples_per_shard
        too_big = max_shard_bytes is not None and current and current_bytes + size > max_shard_bytes
        if current and (full or too_big):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(row)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def shard_fingerprint(config_fingerprint: str, rows: list[dict[str, Any]]) -> str:
    """sha256 over the config and this shard's input rows (ids, keys, sources, captions, passthrough)."""
    fields = ("video_id", "key", "source", "captions", "split", "caption_class", "hard_group", "input_index")
    payload = dumps_json(
        {"config": config_fingerprint, "rows": [{f: r.get(f) for f in fields} for r in rows]}
    )
    return hashlib.sha256(payload).hexdigest()


# ------------------------------------------------------------------------------------------------- per sample
def read_source(source: str, max_bytes: int | None) -> bytes:
    """Bytes of ``source`` through fsspec; ProbeError(missing/unreadable/too_large/bad_uri) on failure."""
    try:
        fs, path = fsspec.core.url_to_fs(source)
    except (ValueError, ImportError) as exc:
        raise ProbeError("bad_uri", f"cannot open URI {source!r}: {exc}") from exc
    try:
        if max_bytes is not None:
            size = fs.size(path)
            if size is not None and size > max_bytes:
                raise ProbeError("too_large", f"{size} bytes > max_bytes={max_bytes}")
        with fs.open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise ProbeError("missing", f"file not found: {source}") from exc
    except (IsADirectoryError, PermissionError, OSError) as exc:
        raise ProbeError("unreadable", f"cannot read {source}: {type(exc).__name__}: {exc}") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise ProbeError("too_large", f"more than max_bytes={max_bytes} bytes")
    return data


def process_sample(row: dict[str, Any], config: IngestConfig) -> tuple[bytes, dict[str, Any]]:
    """(mp4 bytes, json metadata) for one input row; raises ProbeError with the reason class."""
    data = read_source(row["source"], config.max_bytes)
    source_sha = hashlib.sha256(data).hexdigest()
    meta = probe_video(data, max_pixels=config.max_pixels, decode_check=config.decode_check)
    video, transcoded = data, False
    if config.transcode:
        video = transcode_video(
            data, short_side=config.short_side, fps=config.fps, keyframe_interval=config.keyframe_interval
        )
        meta = probe_video(video)
        transcoded = True
    record = {
        "video_id": row["video_id"],
        "key": row["key"],
        "source": row["source"],
        "sha256": hashlib.sha256(video).hexdigest() if transcoded else source_sha,
        "bytes": len(video),
        **meta,
        "captions": list(row.get("captions") or []),
        "split": row.get("split"),
        "transcoded": transcoded,
        "source_sha256": source_sha,
        "source_bytes": len(data),
    }
    for column in ("caption_class", "hard_group"):
        if column in row:
            record[column] = row[column]
    return video, record


class TarShardWriter:
    """Minimal deterministic USTAR writer: fixed mtime/uid/gid/mode, one ``write`` per header and payload
    (``tarfile.addfile`` copies in 16 KiB chunks), sha256 and size of the tar computed as it is written."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def _write(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        self.f.write(data)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        self._write(data)
        if len(data) % tarfile.BLOCKSIZE:
            self._write(tarfile.NUL * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        """End-of-archive marker (two zero blocks), padded to a whole record like tar(1) does."""
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
        remainder = (self.size + len(end)) % tarfile.RECORDSIZE
        self._write(end + (tarfile.NUL * (tarfile.RECORDSIZE - remainder) if remainder else b""))


# ----------------------------------------------------------------------------------------------- per shard
class IngestShardStage:
    """Writes whole shards; runs without Ray on a hand-made batch.

    ``__call__(batch)`` takes ``{"shard": [index], "rows": [[input rows]]}`` and returns
    ``{"shard": [index], "result": [summary dict]}``.
    """

    def __init__(
        self, output: str, config: dict[str, Any], crash_once: str | None = None, fsync: bool = True
    ):
        self.output = Path(output)
        self.fsync = fsync  # durability against power loss; a killed process is covered by temp + rename
        self.config = IngestConfig(**config)
        self.config_fingerprint = self.config.fingerprint()
        self.crash_once = crash_once
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

    def write_shard(self, shard: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Process and write one shard atomically; returns counts, tar digest and error rows."""
        t0 = time.perf_counter()
        name = shard_name(shard)
        tar_path = self.output / "shards" / f"{name}.tar"
        tmp_tar = tar_path.with_name(f"{tar_path.name}.tmp-{os.getpid()}")
        fingerprint = shard_fingerprint(self.config_fingerprint, rows)
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
                    errors.append(error_row(row, exc.reason, exc.message, shard))
                    continue
                except Exception as exc:  # noqa: BLE001 - one bad sample must never sink the shard
                    errors.append(error_row(row, "decode_error", f"{type(exc).__name__}: {exc}", shard))
                    continue
                bytes_in += record["source_bytes"]
                writer.add(f"{row['key']}.mp4", video)
                writer.add(f"{row['key']}.json", dumps_json(record))
                records.append({**{f: record.get(f) for f in SAMPLE_SCHEMA.names}, "shard": shard})
            writer.close()
            raw.flush()
            if self.fsync:
                os.fsync(raw.fileno())
        tar_sha, tar_bytes = writer.sha.hexdigest(), writer.size
        os.replace(tmp_tar, tar_path)
        _atomic_write_parquet(
            self.output / "shard_errors" / f"{name}.parquet",
            pa.Table.from_pylist(errors, schema=ERROR_SCHEMA),
        )
        shard_meta = {
            "fingerprint": fingerprint,
            "tar_sha256": tar_sha,
            "tar_bytes": tar_bytes,
            "samples": len(records),
            "errors": len(errors),
            "inputs": len(rows),
            "bytes_in": bytes_in,
        }
        index = pa.Table.from_pylist(records, schema=SAMPLE_SCHEMA).replace_schema_metadata(
            {b"vidsift_shard": dumps_json(shard_meta)}
        )
        # The index is written last: its presence (with a matching fingerprint) marks the shard complete.
        _atomic_write_parquet(self.output / "shards" / f"{name}.parquet", index)
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


def _ingest_shard_task(
    output: str,
    config: dict[str, Any],
    crash_once: str | None,
    fsync: bool,
    shard: int,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    stage = IngestShardStage(output, config, crash_once, fsync)
    return stage({"shard": [shard], "rows": [rows]})["result"][0]


# -------------------------------------------------------------------------------------------------- driver
def _ensure_ray(num_cpus: int | None) -> tuple[bool, float]:
    """Use the running Ray; else join ``RAY_ADDRESS`` (``ray job submit`` sets it); else start a local one."""
    import ray

    t0 = time.perf_counter()
    if ray.is_initialized():
        return False, 0.0
    address = os.environ.get("RAY_ADDRESS")
    repo_root = str(Path(__file__).resolve().parents[1])
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        pythonpath = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        )
    return True, time.perf_counter() - t0


def _remove_stale(output: Path, n_shards: int) -> None:
    """Drop temp files of killed tasks and shard files beyond the current plan (from an older, larger run)."""
    for folder in (output / "shards", output / "shard_errors"):
        for path in folder.iterdir():
            stem = path.name.split(".", 1)[0]
            if ".tmp-" in path.name or (
                stem.isdigit() and len(stem) == SHARD_DIGITS and int(stem) >= n_shards
            ):
                path.unlink(missing_ok=True)


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_ingest(
    input: str | os.PathLike,
    output: str | os.PathLike,
    samples_per_shard: int = 64,
    workers: int | None = None,
    transcode: bool | None = None,
    *,
    max_shard_bytes: int | None = 1 << 30,
    short_side: int | None = None,
    fps: float | None = None,
    keyframe_interval: float | None = None,
    max_bytes: int | None = 2 << 30,
    max_pixels: int | None = None,
    decode_check: bool = False,
    task_retries: int = 2,
    fsync: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Ingest ``input`` (manifest, directory or glob) into ``output``; returns the run summary.

    ``transcode=None`` transcodes only when ``short_side``, ``fps`` or ``keyframe_interval`` is given.
    ``workers`` = concurrent shard tasks (default: the cluster's CPUs). Raises ``InputError`` when the input
    cannot be read and ``IngestIncompleteError`` when shard tasks died (rerun to finish; done shards are
    kept).
    """
    import ray

    t_start = time.perf_counter()
    output = Path(output)
    if transcode is None:
        transcode = any(v is not None for v in (short_side, fps, keyframe_interval))
    config = IngestConfig(
        samples_per_shard=samples_per_shard,
        max_shard_bytes=max_shard_bytes,
        transcode=bool(transcode),
        short_side=short_side if transcode else None,
        fps=fps if transcode else None,
        keyframe_interval=(keyframe_interval or 1.0) if transcode else 1.0,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        decode_check=decode_check,
    )
    rows = read_inputs(input)
    candidates, driver_errors = plan_inputs(rows)
    shards = plan_shards(candidates, samples_per_shard, max_shard_bytes)
    config_fp = config.fingerprint()
    fingerprints = [shard_fingerprint(config_fp, s) for s in shards]
    input_fp = hashlib.sha256("".join(fingerprints).encode() + dumps_json(driver_errors)).hexdigest()
    for folder in ("shards", "shard_errors"):
        (output / folder).mkdir(parents=True, exist_ok=True)
    _remove_stale(output, len(shards))

    results: dict[int, dict[str, Any]] = {}
    todo = []
    for i, fp in enumerate(fingerprints):
        done = completed_shard(output, i, fp)
        if done is not None:
            results[i] = done
        else:
            todo.append(i)

    started_ray, ray_init_s = (False, 0.0)
    first_result_s = None
    failed: dict[int, str] = {}
    t_work = time.perf_counter()
    if todo:
        started_ray, ray_init_s = _ensure_ray(workers)
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1, max_retries=task_retries)(_ingest_shard_task)
        crash_once = os.environ.get(CRASH_ENV)
        pending, in_flight = list(todo), {}
        total_videos = sum(len(shards[i]) for i in todo)
        done_videos = done_bytes = 0
        t_work = time.perf_counter()
        try:
            while pending or in_flight:
                while pending and len(in_flight) < workers:
                    i = pending.pop(0)
                    ref = task.remote(str(output), asdict(config), crash_once, fsync, i, shards[i])
                    in_flight[ref] = i
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                i = in_flight.pop(ready[0])
                try:
                    results[i] = ray.get(ready[0])
                except (ray.exceptions.RayError, OSError) as exc:
                    failed[i] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    print(f"[ingest] shard {shard_name(i)} FAILED: {failed[i]}", file=sys.stderr, flush=True)
                    continue
                if first_result_s is None:
                    first_result_s = time.perf_counter() - t_work
                done_videos += len(shards[i])
                done_bytes += results[i]["bytes_in"]
                elapsed = time.perf_counter() - t_work
                rate = done_videos / elapsed if elapsed > 0 else 0.0
                eta = (total_videos - done_videos) / rate if rate > 0 else float("inf")
                if progress:
                    print(
                        f"[ingest] shard {shard_name(i)} done ({len(results)}/{len(shards)} shards) "
                        f"{done_videos}/{total_videos} videos  {rate:.1f} videos/s  "
                        f"{done_bytes / elapsed / 1e6:.1f} MB/s  ETA {_fmt_eta(eta)}",
                        flush=True,
                    )
        finally:
            if started_ray:
                ray.shutdown()
    t_end = time.perf_counter()

    shard_errors = [e for i in sorted(results) for e in results[i]["error_rows"]]
    all_errors = sorted(
        driver_errors + shard_errors,
        key=lambda e: (e["input_index"] if e["input_index"] is not None else -1, e["source"]),
    )
    _atomic_write_parquet(output / "errors.parquet", pa.Table.from_pylist(all_errors, schema=ERROR_SCHEMA))
    n_samples = sum(r["samples"] for r in results.values())
    n_unfinished = sum(len(shards[i]) for i in failed)
    accounted = n_samples + len(all_errors) + n_unfinished == len(rows)
    by_reason: dict[str, int] = {}
    for e in all_errors:
        by_reason[e["reason"]] = by_reason.get(e["reason"], 0) + 1
    written = [r for r in results.values() if not r["skipped"]]
    bytes_in = sum(r["bytes_in"] for r in written)
    work_s = t_end - t_work
    summary = {
        "input": os.fspath(input),
        "output": str(output),
        "inputs": len(rows),
        "samples": n_samples,
        "errors": len(all_errors),
        "errors_by_reason": dict(sorted(by_reason.items())),
        "unfinished": n_unfinished,
        "failed_shards": [shard_name(i) for i in sorted(failed)],
        "accounted": accounted,
        "complete": not failed and accounted,
        "shards": len(shards),
        "shards_written": len(written),
        "shards_skipped": len(results) - len(written),
        "bytes_in": bytes_in,
        "bytes_out": sum(r["tar_bytes"] for r in results.values()),
        "workers": workers,
        "ray_init_s": round(ray_init_s, 3),
        "first_shard_s": round(first_result_s, 3) if first_result_s is not None else None,
        "work_s": round(work_s, 3),
        "wall_s": round(t_end - t_start, 3),
        "videos_per_s": round(sum(r["inputs"] for r in written) / work_s, 3)
        if written and work_s > 0
        else 0.0,
        "mb_per_s": round(bytes_in / work_s / 1e6, 3) if written and work_s > 0 else 0.0,
    }
    run_manifest = {
        "format": FORMAT_VERSION,
        "input": os.fspath(input),
        "input_rows": len(rows),
        "input_fingerprint": input_fp,
        "config": asdict(config),
        "config_fingerprint": config_fp,
        "shards": [
            {
                "shard": shard_name(i),
                "tar": f"shards/{shard_name(i)}.tar",
                "index": f"shards/{shard_name(i)}.parquet",
                "inputs": len(shards[i]),
                "samples": results[i]["samples"] if i in results else None,
                "errors": results[i]["errors"] if i in results else None,
                "tar_bytes": results[i]["tar_bytes"] if i in results else None,
                "sha256": results[i]["tar_sha256"] if i in results else None,
                "fingerprint": fingerprints[i],
                "status": "failed" if i in failed else "done",
            }
            for i in range(len(shards))
        ],
        "summary": summary,
    }
    _atomic_write_bytes(output / "manifest.json", json.dumps(run_manifest, indent=2, sort_keys=True).encode())
    if progress:
        print(format_summary(summary), flush=True)
    if failed:
        raise IngestIncompleteError(
            f"{len(failed)} shard task(s) died ({', '.join(summary['failed_shards'])}); "
            f"rerun the same command to finish them. First: {next(iter(failed.values()))}"
        )
    if not accounted:
        raise RuntimeError(
            f"accounting mismatch: {n_samples} samples + {len(all_errors)} errors != {len(rows)} inputs"
        )
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The final summary as an aligned two-column table."""
    lines = [
        ("inputs", summary["inputs"]),
        ("samples (in shards)", summary["samples"]),
        ("errors", summary["errors"]),
        *((f"  {reason}", n) for reason, n in summary["errors_by_reason"].items()),
        (
            "samples + errors == inputs",
            "yes"
            if summary["accounted"] and not summary["unfinished"]
            else f"NO ({summary['unfinished']} unfinished)",
        ),
        (
            "shards (written / skipped)",
            f"{summary['shards']} ({summary['shards_written']} / {summary['shards_skipped']})",
        ),
        ("bytes in / out", f"{summary['bytes_in']:,} / {summary['bytes_out']:,}"),
        ("throughput", f"{summary['videos_per_s']} videos/s, {summary['mb_per_s']} MB/s"),
        ("ray init / first shard", f"{summary['ray_init_s']} s / {summary['first_shard_s']} s"),
        ("wall", f"{summary['wall_s']} s"),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(["ingest summary", "-" * (width + 24)] + [f"{k:<{width}}  {v}" for k, v in lines])


__all__ = [
    "IngestConfig",
    "IngestIncompleteError",
    "IngestShardStage",
    "InputError",
    "REASONS",
    "plan_inputs",
    "plan_shards",
    "process_sample",
    "run_ingest",
    "format_summary",
    "completed_shard",
]
