"""``run_ingest`` as named steps over a typed state.

plan (read inputs, plan rows and shards, fingerprints) -> prepare the output (drop stale files, find
finished shards) -> run the shard tasks on Ray with progress -> write the error table -> summarise -> write
the run manifest -> report (print, raise when shard tasks died). Each step takes the :class:`IngestState`
and fills in its part, so each can be run and checked on its own.

The output is a URI on any store (:mod:`runtime.storage`). Shard tasks write their shards themselves; the
driver gets back only counts, digests and error rows, and writes ``errors.parquet`` and, last,
``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import ray

from pipeline.ingest.layout import (
    CRASH_ENV,
    ERROR_SCHEMA,
    FORMAT_VERSION,
    SHARD_DIGITS,
    SHARD_FOLDERS,
    IngestConfig,
    IngestIncompleteError,
    dumps_json,
    folder_sizes,
    is_temp_name,
    shard_name,
)
from pipeline.ingest.plan import plan_inputs, plan_shards, shard_fingerprint
from pipeline.ingest.segments import SEGMENT_REASONS
from pipeline.ingest.shard import completed_shard, ingest_shard_task
from pipeline.inputs import read_inputs
from runtime import storage
from runtime.errors import ErrorPolicy, check_policy
from runtime.progress import Progress
from runtime.ray_connect import connect_ray


@dataclass(frozen=True)
class IngestRequest:
    """One ingest run: what to read, where to write, the shard-shaping config and how to run the tasks."""

    input: str | os.PathLike
    output: str | os.PathLike  # a folder or URI prefix (s3://bucket/vidsift/ingest); normalised to str
    config: IngestConfig = field(default_factory=IngestConfig)
    workers: int | None = None  # concurrent shard tasks (None: the cluster's CPUs)
    task_retries: int = 2
    fsync: bool = True
    progress: bool = True
    on_error: ErrorPolicy = "record"

    def __post_init__(self) -> None:
        check_policy(self.on_error)
        # Local paths absolute (Ray workers resolve them as the driver meant), URIs as they are.
        object.__setattr__(self, "output", storage.normalize(self.output))


@dataclass
class IngestState:
    """What the steps of one run know, filled in step by step."""

    request: IngestRequest
    t_start: float
    rows: list[dict[str, Any]]
    driver_errors: list[dict[str, Any]]
    shards: list[list[dict[str, Any]]]
    fingerprints: list[str]
    input_fingerprint: str
    results: dict[int, dict[str, Any]] = field(default_factory=dict)  # shard -> result (written or skipped)
    todo: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # shard -> why its task died
    workers: int | None = None
    started_ray: bool = False
    ray_init_s: float = 0.0
    first_result_s: float | None = None
    bytes_done: int = 0
    t_work: float = 0.0
    t_end: float = 0.0
    errors: list[dict[str, Any]] = field(default_factory=list)  # every error row, sorted
    summary: dict[str, Any] = field(default_factory=dict)


def make_config(
    samples_per_shard: int = 64,
    transcode: bool | None = None,
    *,
    max_shard_bytes: int | None = 1 << 30,
    short_side: int | None = None,
    fps: float | None = None,
    keyframe_interval: float | None = None,
    max_bytes: int | None = 2 << 30,
    max_pixels: int | None = None,
    decode_check: bool = False,
) -> IngestConfig:
    """The config of ``run_ingest``'s arguments: ``transcode=None`` transcodes only when ``short_side``,
    ``fps`` or ``keyframe_interval`` is given; without transcoding those three are not part of it."""
    if transcode is None:
        transcode = any(v is not None for v in (short_side, fps, keyframe_interval))
    return IngestConfig(
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


# ------------------------------------------------------------------------------------------------- steps
def plan_run(request: IngestRequest, t_start: float | None = None) -> IngestState:
    """Read the inputs and plan candidates, driver-level errors, shards and their fingerprints."""
    t_start = time.perf_counter() if t_start is None else t_start
    config = request.config
    rows = read_inputs(request.input, on_error=request.on_error)
    candidates, driver_errors = plan_inputs(rows, on_error=request.on_error)
    shards = plan_shards(candidates, config.samples_per_shard, config.max_shard_bytes)
    config_fp = config.fingerprint()
    fingerprints = [shard_fingerprint(config_fp, s) for s in shards]
    input_fp = hashlib.sha256("".join(fingerprints).encode() + dumps_json(driver_errors)).hexdigest()
    return IngestState(
        request, t_start, rows, driver_errors, shards, fingerprints, input_fp, workers=request.workers
    )


def remove_stale(output: str, n_shards: int, listing: dict[str, dict[str, int]]) -> None:
    """Drop temp files of killed tasks (local stores) and shard files beyond the current plan (from an
    older, larger run); ``listing`` (``{folder: {name: size}}``) forgets them too."""
    for folder in SHARD_FOLDERS:
        files = listing[folder]
        for name in list(files):
            stem = name.split(".", 1)[0]
            if is_temp_name(name) or (stem.isdigit() and len(stem) == SHARD_DIGITS and int(stem) >= n_shards):
                storage.remove(storage.join(output, folder, name))
                del files[name]


def prepare_output(state: IngestState) -> None:
    """Create the folders (local stores), clean stale files, and sort shards into finished (``results``) and
    ``todo``. When there is work to do, the old run's ``manifest.json`` goes first: it names this run's
    shards only once they are all written."""
    output = state.request.output
    for folder in SHARD_FOLDERS:
        storage.makedirs(storage.join(output, folder))
    listing = {folder: folder_sizes(storage.join(output, folder)) for folder in SHARD_FOLDERS}
    remove_stale(output, len(state.shards), listing)
    for i, fp in enumerate(state.fingerprints):
        done = completed_shard(output, i, fp, listing)
        if done is not None:
            state.results[i] = done
        else:
            state.todo.append(i)
    if state.todo:
        storage.remove(storage.join(output, "manifest.json"))


def run_shard_tasks(state: IngestState) -> None:
    """Write the ``todo`` shards with one Ray task each (joining or starting Ray only when there are any)."""
    state.t_work = time.perf_counter()
    if state.todo:
        state.started_ray, state.ray_init_s = connect_ray(num_cpus=state.request.workers)
        try:
            _run_tasks(state)
        finally:
            if state.started_ray:
                ray.shutdown()
    state.t_end = time.perf_counter()


def _run_tasks(state: IngestState) -> None:
    """At most ``workers`` shard tasks in flight; collect each as it finishes and print progress."""
    request = state.request
    if state.workers is None:
        state.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # max_retries: a task whose worker (or node) died runs again; it rewrites the same shard objects.
    options: dict[str, Any] = {"num_cpus": 1, "max_retries": request.task_retries}
    if env := storage.storage_env():  # the store's endpoint/credentials, also for workers started earlier
        options["runtime_env"] = {"env_vars": env}
    task = ray.remote(**options)(ingest_shard_task)
    args = (request.output, asdict(request.config), os.environ.get(CRASH_ENV), request.fsync,
            request.on_error)
    total = sum(len(state.shards[i]) for i in state.todo)
    progress = Progress("ingest", total, unit="videos", every_s=0.0, enabled=request.progress)
    pending, in_flight = list(state.todo), {}
    state.t_work = time.perf_counter()
    while pending or in_flight:
        while pending and len(in_flight) < state.workers:
            i = pending.pop(0)
            in_flight[task.remote(*args, i, state.shards[i])] = i
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        i = in_flight.pop(ready[0])
        if collect_shard(state, i, ready[0]):
            _shard_progress(state, progress, i)


def _shard_progress(state: IngestState, progress: Progress, shard: int) -> None:
    """``[ingest] done/total videos  rate  ETA`` plus MB/s and which shard finished."""
    state.bytes_done += state.results[shard]["bytes_in"]
    mb_per_s = state.bytes_done / max(progress.elapsed(), 1e-9) / 1e6
    done = f"{len(state.results)}/{len(state.shards)} shards"
    progress.update(len(state.shards[shard]), f"{mb_per_s:.1f} MB/s  shard {shard_name(shard)} done ({done})")


def collect_shard(state: IngestState, shard: int, ref: Any) -> bool:
    """Store a finished task's result (True), or record the shard as failed when its worker died (False).

    A task that raised (a bug, or an input failure under ``on_error="raise"``) raises here, except an
    ``OSError`` (disk full, lost mount): like a dead worker, rerunning finishes that shard.
    """
    try:
        state.results[shard] = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if not isinstance(exc, OSError):
            raise
        _mark_failed(state, shard, exc)
        return False
    except ray.exceptions.RayError as exc:  # worker killed, out of memory, node lost
        _mark_failed(state, shard, exc)
        return False
    if state.first_result_s is None:
        state.first_result_s = time.perf_counter() - state.t_work
    return True


def _mark_failed(state: IngestState, shard: int, exc: BaseException) -> None:
    state.failed[shard] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(f"[ingest] shard {shard_name(shard)} FAILED: {state.failed[shard]}", file=sys.stderr, flush=True)


def write_error_table(state: IngestState) -> None:
    """``errors.parquet``: driver-level and shard error rows, by input row."""
    shard_errors = [e for i in sorted(state.results) for e in state.results[i]["error_rows"]]
    state.errors = sorted(
        state.driver_errors + shard_errors,
        key=lambda e: (e["input_index"] if e["input_index"] is not None else -1, e["source"]),
    )
    table = pa.Table.from_pylist(state.errors, schema=ERROR_SCHEMA)
    storage.write_parquet(table, storage.join(state.request.output, "errors.parquet"))


def summarize(state: IngestState) -> None:
    """The run summary: counts, the ``samples + errors == inputs`` check, bytes and timings."""
    results, errors = state.results, state.errors
    n_samples = sum(r["samples"] for r in results.values())
    n_unfinished = sum(len(state.shards[i]) for i in state.failed)
    # a bad timed caption is an error row of a video that is still a sample: not an input lost
    n_segment_errors = sum(e["reason"] in SEGMENT_REASONS for e in errors)
    n_errors = len(errors) - n_segment_errors
    accounted = n_samples + n_errors + n_unfinished == len(state.rows)
    by_reason: dict[str, int] = {}
    for e in errors:
        by_reason[e["reason"]] = by_reason.get(e["reason"], 0) + 1
    written = [r for r in results.values() if not r["skipped"]]
    bytes_in = sum(r["bytes_in"] for r in written)
    work_s = state.t_end - state.t_work
    busy = bool(written) and work_s > 0
    state.summary = {
        "input": os.fspath(state.request.input),
        "output": state.request.output,
        "inputs": len(state.rows),
        "samples": n_samples,
        "errors": n_errors,
        "segment_errors": n_segment_errors,
        "errors_by_reason": dict(sorted(by_reason.items())),
        "unfinished": n_unfinished,
        "failed_shards": [shard_name(i) for i in sorted(state.failed)],
        "accounted": accounted,
        "complete": not state.failed and accounted,
        "shards": len(state.shards),
        "shards_written": len(written),
        "shards_skipped": len(results) - len(written),
        "bytes_in": bytes_in,
        "bytes_out": sum(r["tar_bytes"] for r in results.values()),
        "workers": state.workers,
        "ray_init_s": round(state.ray_init_s, 3),
        "first_shard_s": round(state.first_result_s, 3) if state.first_result_s is not None else None,
        "work_s": round(work_s, 3),
        "wall_s": round(state.t_end - state.t_start, 3),
        "videos_per_s": round(sum(r["inputs"] for r in written) / work_s, 3) if busy else 0.0,
        "mb_per_s": round(bytes_in / work_s / 1e6, 3) if busy else 0.0,
    }


def _shard_entry(state: IngestState, i: int) -> dict[str, Any]:
    result = state.results.get(i)
    return {
        "shard": shard_name(i),
        "tar": f"shards/{shard_name(i)}.tar",
        "index": f"shards/{shard_name(i)}.parquet",
        "inputs": len(state.shards[i]),
        "samples": result["samples"] if result else None,
        "errors": result["errors"] if result else None,
        "tar_bytes": result["tar_bytes"] if result else None,
        "sha256": result["tar_sha256"] if result else None,
        "fingerprint": state.fingerprints[i],
        "status": "failed" if i in state.failed else "done",
    }


def write_run_manifest(state: IngestState) -> None:
    """``manifest.json``: input and config fingerprints, the config, every shard and the summary."""
    config = state.request.config
    run_manifest = {
        "format": FORMAT_VERSION,
        "input": os.fspath(state.request.input),
        "input_rows": len(state.rows),
        "input_fingerprint": state.input_fingerprint,
        "config": asdict(config),
        "config_fingerprint": config.fingerprint(),
        "shards": [_shard_entry(state, i) for i in range(len(state.shards))],
        "summary": state.summary,
    }
    text = json.dumps(run_manifest, indent=2, sort_keys=True).encode()
    # Written last: the run's marker (readers that want "the finished ingest" check it exists).
    storage.write_bytes(storage.join(state.request.output, "manifest.json"), text, fsync=state.request.fsync)


def report(state: IngestState) -> None:
    """Print the summary table (with ``progress``); raise when shard tasks died or rows went missing."""
    summary = state.summary
    if state.request.progress:
        print(format_summary(summary), flush=True)
    if state.failed:
        raise IngestIncompleteError(
            f"{len(state.failed)} shard task(s) died ({', '.join(summary['failed_shards'])}); "
            f"rerun the same command to finish them. First: {next(iter(state.failed.values()))}"
        )
    if not summary["accounted"]:
        raise RuntimeError(
            f"accounting mismatch: {summary['samples']} samples + {summary['errors']} errors "
            f"!= {summary['inputs']} inputs"
        )


STEPS = (prepare_output, run_shard_tasks, write_error_table, summarize, write_run_manifest, report)


def ingest(request: IngestRequest, t_start: float | None = None) -> dict[str, Any]:
    """Run every step on ``request``; returns the summary."""
    state = plan_run(request, t_start)
    for step in STEPS:
        step(state)
    return state.summary


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
    on_error: ErrorPolicy = "record",
) -> dict[str, Any]:
    """Ingest ``input`` (manifest, directory or glob) into ``output`` (a folder or a URI such as
    ``s3://bucket/vidsift/ingest``); returns the run summary.

    ``transcode=None`` transcodes only when ``short_side``, ``fps`` or ``keyframe_interval`` is given.
    ``workers`` = concurrent shard tasks (default: the cluster's CPUs). Raises ``InputError`` when the input
    cannot be read and ``IngestIncompleteError`` when shard tasks died (rerun to finish; done shards are
    kept). ``on_error="record"`` records bad inputs in ``errors.parquet``; ``"raise"`` raises the first
    (a :class:`runtime.errors.InputError`). Bugs raise under either policy.
    """
    t_start = time.perf_counter()
    config = make_config(
        samples_per_shard, transcode, max_shard_bytes=max_shard_bytes, short_side=short_side, fps=fps,
        keyframe_interval=keyframe_interval, max_bytes=max_bytes, max_pixels=max_pixels,
        decode_check=decode_check,
    )
    request = IngestRequest(
        input=input, output=output, config=config, workers=workers, task_retries=task_retries,
        fsync=fsync, progress=progress, on_error=on_error,
    )
    return ingest(request, t_start)


def format_summary(summary: dict[str, Any]) -> str:
    """The final summary as an aligned two-column table."""
    lines = [
        ("inputs", summary["inputs"]),
        ("samples (in shards)", summary["samples"]),
        ("errors", summary["errors"]),
        *([("segment errors (kept samples)", summary["segment_errors"])] if summary.get("segment_errors")
          else []),
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
