"""One reindex run as named steps over a typed state (:class:`ReindexRun`).

lock → :func:`step_scan` (read + hash the source, delta vs the last successful run) → :func:`step_ingest`
(the delta into ``WORKDIR/ingest/run-<seq>/``; WORKDIR on any store) → :func:`step_embed` (into
``WORKDIR/embeddings/model_id=<id>/``, with caption text and, when asked, moment windows) →
:func:`step_index` (the live set; ``delete_videos`` + ``upsert_embeddings`` + ``compact_index`` on a scratch
copy of the CURRENT index, or a full rebuild from the live rows, distributed past ``index.distributed_rows``
and tuned on the live captions, when there is no index yet, the model changed or ``needs_retrain`` says so)
→ :func:`step_validate` → :func:`step_publish` (atomic ``CURRENT`` swap) → :func:`commit_state`
(``WORKDIR/state/state.json``, atomic).

State only advances after publish, and every step is idempotent (ingest skips finished shards, embed skips
finished parts, index work happens in a scratch copy), so a run killed at any point leaves the current
index serving and the next run finishes the work.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from index import build_index, compact_index, delete_videos, needs_retrain, store
from index.upsert import upsert_embeddings
from models import create_inference_model
from pipeline.embedding import list_parts, model_partition, plan_shards, text_dir
from pipeline.ingest import run_ingest
from pipeline.shard_tar import list_shards
from runtime import storage
from runtime.ray_connect import connect_ray
from workflows.embed import run_embed
from workflows.reindex.config import DEFAULT_CONFIG, ReindexError, check_pretrained, merge_config
from workflows.reindex.delta import Delta, compute_delta, delta_manifest
from workflows.reindex.lock import RunLock
from workflows.reindex.scan import scan_source
from workflows.reindex.tables import (
    collect_rows,
    copy_current,
    embed_errors,
    live_captions,
    stamped_meta,
    write_embeddings_dir,
)
from workflows.reindex.validate import validate_index
from workflows.reindex.workdir import STATE_FORMAT, Workdir, read_json

CRASH_ENV = "VIDSIFT_REINDEX_CRASH_AFTER"  # test hook: step name after which the run dies
STEPS = ("scan", "ingest", "embed", "index", "validate", "publish")


class SimulatedCrash(RuntimeError):
    """Raised by the crash test hook (in-process runs) to stop a run right after a step."""


def crash_hook(step: str, mode: str = "raise") -> None:
    """Test hook: when ``$VIDSIFT_REINDEX_CRASH_AFTER == step`` die right after ``step``.

    ``mode="exit"`` is a hard kill (``os._exit(1)``: no cleanup, the lock stays behind); ``"raise"`` raises
    :class:`SimulatedCrash` for in-process tests."""
    if os.environ.get(CRASH_ENV) == step:
        print(
            f"[reindex] {CRASH_ENV}={step}: simulated crash after step {step!r}", file=sys.stderr, flush=True
        )
        if mode == "exit":
            os._exit(1)
        raise SimulatedCrash(f"simulated crash after step {step!r}")


def _log(message: str) -> None:
    print(f"[reindex] {message}", flush=True)


@dataclass
class ReindexRun:
    """Everything one run knows: its inputs, then what each step found or made (filled in step order)."""

    source: str
    wd: Workdir
    cfg: dict[str, Any]
    model: str
    pretrained: str | None
    seq: int  # this run's number (the last successful run's + 1; a rerun after a crash reuses it)
    model_id: str
    full: bool  # full build: no index yet or the model changed
    state: dict[str, Any]  # the last successful run's state (videos/failed emptied for a full build)
    retry_failed: bool = False
    allow_random_init: bool = False
    lock: RunLock | None = None
    crash_mode: str = "raise"
    progress: bool = True
    lock_taken_over: dict[str, Any] | None = None
    t_start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    started_ray: bool = False
    # scan
    videos: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[dict[str, Any]] = field(default_factory=list)
    delta: Delta = field(default_factory=Delta)
    # ingest / embed
    ingested: dict[str, dict[str, Any]] = field(default_factory=dict)  # video id -> its shard row
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)  # video id -> stage/reason/message
    # index
    live_records: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed_records: dict[str, dict[str, Any]] = field(default_factory=dict)
    delta_rows: pa.Table | None = None
    remove: list[str] = field(default_factory=list)  # indexed videos whose rows go (deleted / changed)
    current: str | None = None  # the CURRENT version before this run
    parent: str | None = None  # the version the scratch index was derived from
    mode: str = "none"  # none / incremental / build / rebuild
    live_rows: pa.Table | None = None
    published: str | None = None

    @property
    def partition(self) -> str:
        return storage.join(self.wd.embeddings, model_partition(self.model_id))

    @property
    def run_dir(self) -> str:
        return self.wd.run_ingest_dir(self.seq)

    @property
    def scratch(self) -> Path:
        return self.wd.run_staging(self.seq) / "index"

    def connect_ray(self) -> None:
        """Join the cluster (``RAY_ADDRESS``) or start a local Ray, once; a Ray started here is shut down."""
        self.started_ray = connect_ray()[0] or self.started_ray


def model_id_of(model: str, pretrained: str | None, allow_random_init: bool = False) -> str:
    """The id of the vectors ``model`` makes: built as the embed run builds it (trained weights; a seeded
    random init only with ``allow_random_init``)."""
    encoder, _, _ = create_inference_model(model, pretrained=pretrained, allow_random_init=allow_random_init)
    return encoder.model_id


def prepare_run(source: str, wd: Workdir, cfg: dict[str, Any], model: str, pretrained: str | None,
                **options: Any) -> ReindexRun:
    """The run's number, model id and whether it is a full build, from the state of the last run."""
    t_start = time.perf_counter()
    state = wd.read_state()
    model_id = model_id_of(model, pretrained, bool(options.get("allow_random_init")))
    have_index = store.read_current(wd.index, missing_ok=True) is not None
    full = not have_index or state.get("model_id") != model_id
    if full and state.get("videos") and state.get("model_id") != model_id:
        _log(f"model changed ({state.get('model_id')} -> {model_id}): full rebuild")
    if full:
        state = {**state, "videos": {}, "failed": {}}  # every live video counts as new
    return ReindexRun(source=source, wd=wd, cfg=cfg, model=model, pretrained=pretrained,
                      seq=int(state["seq"]) + 1, model_id=model_id, full=full, state=state,
                      t_start=t_start, **options)


# ------------------------------------------------------------------------------------------------ steps
def step_scan(run: ReindexRun) -> None:
    """Read + hash the source (the hash cache is kept even if the run dies), diff it against the state."""
    wd = run.wd
    cache = read_json(wd.hash_cache, default={}) or {}
    run.videos, run.problems, new_cache = scan_source(
        run.source, cache, workers=run.cfg["hash_workers"], progress=run.progress
    )
    # a cache, not state: safe to keep even if the run dies
    storage.write_json(wd.hash_cache, new_cache, fsync=True)
    run.delta = compute_delta(run.videos, run.problems, run.state, retry_failed=run.retry_failed)
    if run.progress:
        full = ", full build" if run.full else ""
        _log(f"run {run.seq}: delta {run.delta.counts()} (model {run.model_id}{full})")
    run.summary = {
        "run": run.seq,
        "source": run.source,
        "workdir": wd.root,
        "model_id": run.model_id,
        "full_build": run.full,
        **run.delta.counts(),
        "source_problems": run.problems,
        "lock_taken_over": run.lock_taken_over,
    }


def step_ingest(run: ReindexRun) -> None:
    """Ingest the delta into its own run dir (same seq after a crash -> its finished shards are reused)."""
    wd, ids = run.wd, run.delta.to_ingest
    fp_path = storage.join(wd.staging, f"run-{run.seq:06d}.delta.json")
    manifest_path = storage.join(wd.staging, f"run-{run.seq:06d}.delta.parquet")
    old_fp = read_json(fp_path, default={}).get("fingerprint")
    fp = delta_manifest(run.videos, ids, manifest_path)
    if old_fp is not None and old_fp != fp:
        _log(f"the source changed since the interrupted run {run.seq}: redoing its ingest/embed")
        wd.reset_run(run.seq, run.partition)
    storage.write_json(fp_path, {"fingerprint": fp, "videos": len(ids)}, fsync=True)
    finished = read_json(storage.join(run.run_dir, "manifest.json"), default={}) or {}
    if not (finished.get("summary") or {}).get("complete"):  # a rerun skips Ray start-up when done
        run.connect_ray()
    options = {k: v for k, v in run.cfg["ingest"].items() if v is not None}
    run.summary["ingest"] = run_ingest(manifest_path, run.run_dir, **options, progress=run.progress)
    for shard in storage.list_files(storage.join(run.run_dir, "shards"), ".parquet"):
        columns = ["video_id", "sha256", "source_sha256", "source"]
        for rec in storage.read_parquet(shard, columns=columns).to_pylist():
            run.ingested[rec["video_id"]] = rec
    for err in ingest_errors(run.run_dir):
        run.failed[err["video_id"]] = {"stage": "ingest", "reason": err["reason"], "message": err["message"]}


def ingest_errors(run_dir: str) -> list[dict[str, Any]]:
    """The error rows of an ingest output (``errors.parquet``, or ``_errors.parquet`` in a newer layout)."""
    for name in ("_errors.parquet", "errors.parquet"):
        uri = storage.join(run_dir, name)
        if storage.exists(uri):
            return storage.read_parquet(uri).to_pylist()
    return []


def step_embed(run: ReindexRun) -> None:
    """Embed the run's shards (done parts are skipped; content already embedded is reused)."""
    if not run.ingested:
        return
    ec = run.cfg["embed"]
    with_text = bool(ec.get("with_text"))
    todo = any(w.todo_keys for w in plan_shards(list_shards(run.run_dir), run.partition))
    if todo or (with_text and captions_missing(run.partition)):  # a rerun skips Ray start-up when done
        run.connect_ray()
    run.summary["embed"] = run_embed(
        run.run_dir,
        run.model,
        run.wd.embeddings,
        pretrained=run.pretrained,
        allow_random_init=run.allow_random_init,
        sampling=dict(ec.get("sampling") or {}),
        batch_size=int(ec.get("batch_size", 16)),
        encoders=int(ec.get("encoders", 1)),
        with_text=with_text,
        windows=bool(ec.get("windows")),
        window_s=ec.get("window_s"),
        stride_s=ec.get("stride_s"),
    )
    for vid, err in embed_errors(run.partition, f"{storage.name(run.run_dir)}-").items():
        run.failed[vid] = {"stage": "embed", **err}


def captions_missing(partition: str) -> bool:
    """Whether an embedding part of ``partition`` has no caption text part yet (``--with-text`` layout)."""
    done = {storage.name(u) for u in storage.list_files(text_dir(partition), ".parquet")}
    return any(storage.name(part) not in done for part in list_parts(partition))


def step_index(run: ReindexRun) -> None:
    """The live set, then the scratch index that holds exactly it (incremental update or full build)."""
    collect_live_set(run)
    update_scratch_index(run)


def collect_live_set(run: ReindexRun) -> None:
    """The live set: unchanged indexed videos + the delta videos that were ingested and embedded."""
    delta, ingested, failed = run.delta, run.ingested, run.failed
    run.live_records = {vid: run.state["videos"][vid] for vid in delta.unchanged + delta.unavailable}
    delta_pairs = {
        (vid, ingested[vid]["sha256"]) for vid in delta.to_ingest if vid in ingested and vid not in failed
    }
    run.delta_rows = collect_rows(run.partition, delta_pairs) if delta_pairs else None
    rows_per_video: dict[str, int] = {}
    if run.delta_rows is not None:
        for vid in run.delta_rows.column("video_id").to_pylist():
            rows_per_video[vid] = rows_per_video.get(vid, 0) + 1
    for vid, sha in sorted(delta_pairs):
        if vid not in rows_per_video:  # ingested but no vectors: the embed error went elsewhere
            message = "no embedding rows were written for this video"
            failed.setdefault(vid, {"stage": "embed", "reason": "no_rows", "message": message})
            continue
        rec = ingested[vid]
        run.live_records[vid] = {
            "source": rec["source"],
            "source_sha256": rec["source_sha256"],
            "sha256": sha,
            "rows": rows_per_video[vid],
        }
    run.failed_records = failure_records(run)
    old_indexed = set(run.state.get("videos", {}))
    run.remove = sorted((set(delta.deleted) | set(delta.changed)) & old_indexed)
    run.summary.update(
        rows_added=int(run.delta_rows.num_rows) if run.delta_rows is not None else 0,
        rows_removed=int(sum(run.state["videos"][v].get("rows", 0) for v in run.remove)),
        failed=len(failed),
        failed_ids=sorted(failed),
    )


def failure_records(run: ReindexRun) -> dict[str, dict[str, Any]]:
    """This run's failures (plus delta videos that vanished without an error row) and the earlier failures
    of videos still in the source that were not retried."""
    ingest_ids = run.delta.to_ingest
    for vid in ingest_ids:
        if vid not in run.ingested and vid not in run.failed:
            run.failed[vid] = {
                "stage": "ingest",
                "reason": "missing_from_shards",
                "message": "ingest finished without a shard row or an error for this video",
            }
    records = {
        vid: {"source": run.videos[vid]["source"], "source_sha256": run.videos[vid]["source_sha256"], **info}
        for vid, info in run.failed.items()
    }
    for vid, rec in run.state.get("failed", {}).items():
        if vid in run.videos and vid not in ingest_ids and vid not in run.live_records:
            records[vid] = rec
    return records


def update_scratch_index(run: ReindexRun) -> None:
    """Bring a scratch copy of the index to the live set: nothing to do, incremental, or a (re)build."""
    run.current = store.read_current(run.wd.index, missing_ok=True)
    if not run.live_records:
        raise ReindexError(
            f"no video of {run.source} could be ingested and embedded "
            f"({len(run.failed)} failed, {len(run.problems)} source problems); nothing to index"
        )
    if run.full:
        run.mode = "build"
    elif run.remove or run.delta_rows is not None:
        run.mode = "incremental"
        update_incrementally(run)
    if run.mode != "none":
        live_pairs = {(vid, r["sha256"]) for vid, r in run.live_records.items()}
        run.live_rows = collect_rows(run.partition, live_pairs)
    if run.mode in ("build", "rebuild"):
        rebuild_from_live_rows(run)
    run.summary["index_mode"] = run.mode


def update_incrementally(run: ReindexRun) -> None:
    """Copy CURRENT into the scratch dir, delete the removed videos, upsert the delta rows as a delta shard
    (:func:`index.upsert.upsert_embeddings`: nothing of the index is loaded into memory); switch to a
    rebuild when ``needs_retrain`` says the updated index has drifted too far."""
    staging = run.wd.run_staging(run.seq)
    run.parent = copy_current(run.wd.index, run.scratch)
    upserted = set(run.delta_rows.column("video_id").to_pylist()) if run.delta_rows is not None else set()
    deleted = [vid for vid in run.remove if vid not in upserted]  # a changed video's rows are superseded
    if deleted:
        delete_videos(run.scratch, deleted, keep=2)
    if run.delta_rows is not None:
        delta_dir = write_embeddings_dir(run.delta_rows, run.partition, staging / "delta", "delta")
        upsert_embeddings(run.scratch, delta_dir, keep=2, progress=run.progress)
    # Deletes and upserts only hide rows; past the threshold the shards are rewritten without them (and
    # the delta shards folded into their base shard).
    compacted = compact_index(run.scratch, threshold=float(run.cfg["index"]["compact_threshold"]), keep=2,
                              progress=run.progress)
    if compacted is not None:
        run.summary["compacted"] = compacted["last_operation"]
    retrain, reasons = needs_retrain(run.scratch, growth_factor=run.cfg["index"]["growth_factor"])
    if retrain:
        _log(f"needs_retrain: {'; '.join(reasons)} -> rebuilding from the live rows")
        run.summary["retrain_reasons"] = reasons
        run.mode = "rebuild"


def rebuild_from_live_rows(run: ReindexRun) -> None:
    """A fresh scratch index built from exactly the live rows (old parts may hold stale rows), as a user
    builds one by hand: tuned on the live videos' caption text embeddings when the embed step wrote them,
    and distributed over Ray tasks (:mod:`index.distributed`) from ``index.distributed_rows`` live rows."""
    icfg = run.cfg["index"]
    shutil.rmtree(run.scratch, ignore_errors=True)
    staging = run.wd.run_staging(run.seq)
    live_dir = write_embeddings_dir(run.live_rows, run.partition, staging / "live", "live")
    captions = live_captions(text_dir(run.partition), set(run.live_records))
    text_queries = None
    if captions is not None:
        text_queries = str(staging / "live_text")
        storage.write_parquet(captions, storage.join(text_queries, "part-live.parquet"))
    distributed = run.live_rows.num_rows >= int(icfg["distributed_rows"])
    if distributed:
        run.connect_ray()
    meta = build_index(live_dir, run.scratch, keep=1, factory=icfg["factory"],
                       memory_budget=icfg["memory_budget"], recall_target=icfg["recall_target"], k=icfg["k"],
                       progress=run.progress, text_queries=text_queries, distributed=distributed,
                       slice_rows=int(icfg["slice_rows"]))
    run.summary["build"] = {"distributed": distributed, "rows": int(run.live_rows.num_rows),
                            "tuned_on": meta["tuning_queries"]["kind"]}
    run.parent = run.current


def step_validate(run: ReindexRun) -> None:
    """Check the scratch version against the live rows (raises :class:`ReindexError`: nothing published)."""
    vc = run.cfg["validate"]
    run.summary["validation"] = validate_index(
        run.scratch, run.live_rows, vc["min_recall"], int(vc["known_queries"])
    )


def step_publish(run: ReindexRun) -> None:
    """Stamp the scratch version with this run and publish it into ``WORKDIR/index``: its files, then
    index.json, then the single CURRENT object (readers never see a partial version). A run whose lock was
    taken over stops here (:class:`LockLostError`, checked again just before CURRENT is swapped) and
    publishes nothing. CURRENT is swapped only if it still names ``run.parent``, the version this run
    read: a successor that took the lock over and published first makes this swap fail
    (:class:`index.store.PublishConflict`), and one that publishes after it fails in the same way."""
    check_lock = run.lock.check_held if run.lock is not None else None
    if check_lock is not None:
        check_lock()
    staged, meta = stamped_meta(run.scratch, {"run": run.seq, "parent_version": run.parent, "mode": run.mode,
                                              **run.delta.counts(), "source": run.source})
    try:
        run.published = store.publish_copy(staged, meta, run.wd.index, keep=int(run.cfg["index"]["keep"]),
                                           expected_current=run.parent, before_swap=check_lock)
    except store.PublishConflict as exc:
        raise ReindexError(f"{exc} (state.json was not advanced: the next run redoes this one)") from exc


def commit_state(run: ReindexRun) -> None:
    """Advance ``state.json`` (only now: a run that died earlier is redone by the next one)."""
    published = run.published if run.mode != "none" else run.current
    storage.write_json(run.wd.state, {
        "format": STATE_FORMAT,
        "seq": run.seq,
        "model_id": run.model_id,
        "model": run.model,
        "pretrained": run.pretrained,
        "source": run.source,
        "index_version": published,
        "updated": time.time(),
        "videos": dict(sorted(run.live_records.items())),
        "failed": dict(sorted(run.failed_records.items())),
    }, fsync=True)
    run.summary.update(
        version=published,
        live_videos=len(run.live_records),
        live_rows=int(sum(r.get("rows", 0) for r in run.live_records.values())),
    )
    storage.remove(run.wd.staging, recursive=True)
    shutil.rmtree(run.wd.run_staging(run.seq), ignore_errors=True)  # the local scratch of a remote workdir


# ---------------------------------------------------------------------------------------------- driver
STEP_FUNCTIONS: dict[str, Callable[[ReindexRun], None]] = {
    "scan": step_scan,
    "ingest": step_ingest,
    "embed": step_embed,
    "index": step_index,
    "validate": step_validate,
    "publish": step_publish,
}


def step_wanted(run: ReindexRun, step: str) -> bool:
    """Ingest/embed only run for a non-empty delta; validate/publish only when the index changed."""
    if step in ("ingest", "embed"):
        return bool(run.delta.to_ingest)
    if step in ("validate", "publish"):
        return run.mode != "none"
    return True


def run_step(run: ReindexRun, step: str) -> None:
    """Run ``step`` if it is wanted, record its time, then the crash test hook."""
    if not step_wanted(run, step):
        return
    t0 = time.perf_counter()
    STEP_FUNCTIONS[step](run)
    run.timings[step] = round(time.perf_counter() - t0, 3)
    if run.progress:
        _log(f"step {step} done in {run.timings[step]:.1f}s")
    crash_hook(step, run.crash_mode)


def execute(run: ReindexRun, dry_run: bool = False) -> dict[str, Any]:
    """Run :data:`STEPS` in order on a prepared run (the lock held); returns the summary."""
    run_step(run, "scan")
    if dry_run:
        d = run.delta
        run.summary.update(dry_run=True, new_ids=d.new, changed_ids=d.changed, deleted_ids=d.deleted)
        return run.summary
    try:
        for step in STEPS[1:]:
            run_step(run, step)
        commit_state(run)
    finally:
        if run.started_ray:
            ray.shutdown()
    run.timings["total"] = round(time.perf_counter() - run.t_start, 3)
    run.summary["timings_s"] = run.timings
    storage.write_json(storage.join(run.wd.runs, f"run-{run.seq:06d}.json"), run.summary, fsync=True)
    return run.summary


def run_reindex(
    source: str,
    workdir: str | os.PathLike,
    config: dict[str, Any] | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    retry_failed: bool = False,
    dry_run: bool = False,
    crash_mode: str = "raise",
    progress: bool = True,
    allow_random_init: bool = False,
) -> dict[str, Any]:
    """One reindex run (see the module docstring); returns the summary dict. ``workdir`` may be on any
    store (a local folder, ``s3://``, ``gs://``).

    Raises :class:`ReindexInputError` without trained weights (``pretrained`` / the config's ``pretrained``,
    still the placeholder) unless ``allow_random_init``, :class:`LockHeldError` when another live run
    holds the lock, :class:`ReindexError` on bad input or failed validation (nothing is published then),
    and :class:`SimulatedCrash` from the test hook."""
    cfg = merge_config(DEFAULT_CONFIG, config or {})
    pretrained = pretrained if pretrained is not None else cfg["pretrained"]
    check_pretrained(pretrained, allow_random_init)
    wd = Workdir(workdir)
    storage.makedirs(wd.root)
    lock = RunLock(wd.lock, ttl_s=cfg["lock"]["ttl_s"], heartbeat_s=cfg["lock"]["heartbeat_s"])
    with lock:
        run = prepare_run(
            source,
            wd,
            cfg,
            model or cfg["model"],
            pretrained,
            retry_failed=retry_failed,
            allow_random_init=allow_random_init,
            lock=lock,
            crash_mode=crash_mode,
            progress=progress,
            lock_taken_over=lock.took_over,
        )
        return execute(run, dry_run)
