"""Incremental reindex of a video source: delta detection, a run lock, and idempotent steps.

One run (:func:`run_reindex`): lock → read the source and hash it (sha256 of the bytes, cached by
(path, size, mtime)) → delta vs the last successful run (new / changed / deleted) → ingest the delta into
``WORKDIR/ingest/run-<seq>/`` → embed it into ``WORKDIR/embeddings/model_id=<id>/`` → update a scratch copy
of the CURRENT index (``delete_videos`` + ``add_embeddings``, or a full rebuild from the live rows when
there is no index yet, the model changed or ``needs_retrain`` says so) → validate it → publish it into
``WORKDIR/index`` (atomic ``CURRENT`` swap) → write ``WORKDIR/state/state.json`` (atomic).

State only advances after publish, and every step is idempotent (ingest skips finished shards, embed skips
finished parts, index work happens in a scratch copy), so a run killed at any point leaves the current
index serving and the next run finishes the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

STATE_FORMAT = "vidsift-reindex-1"
CRASH_ENV = "VIDSIFT_REINDEX_CRASH_AFTER"  # test hook: step name after which the run dies
STEPS = ("scan", "ingest", "embed", "index", "validate", "publish")
LOCK_FILE = "reindex.lock"
HASH_CHUNK = 8 << 20

DEFAULT_CONFIG: dict[str, Any] = {
    "model": "clip4clip-meanP-tiny",
    "pretrained": None,
    "ingest": {"samples_per_shard": 64, "workers": None},
    "embed": {"batch_size": 16, "encoders": 1, "sampling": {"num_clips": 4, "frames_per_clip": 4}},
    "index": {
        "factory": None,
        "memory_budget": "4GB",
        "recall_target": 0.95,
        "k": 10,
        "keep": 3,
        "growth_factor": 2.0,
    },
    "validate": {"min_recall": 0.9, "known_queries": 5},
    "lock": {"ttl_s": 3600.0, "heartbeat_s": 30.0},
    "hash_workers": 4,
}


class ReindexError(RuntimeError):
    """The reindex cannot proceed (bad source, bad workdir, failed validation)."""


class ReindexInputError(ReindexError):
    """Bad arguments: an unusable workdir or config."""


class LockHeldError(ReindexError):
    """Another live run holds ``WORKDIR/reindex.lock``."""


class SimulatedCrash(RuntimeError):
    """Raised by the crash test hook (in-process runs) to stop a run right after a step."""


# ---------------------------------------------------------------------------------------------- helpers
def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temp file + fsync + ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as exc:
        raise ReindexError(f"{path} is not valid JSON ({exc}); fix or remove it") from exc


def merge_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of nested dicts (``override`` wins); unknown top-level keys are an error."""
    out = json.loads(json.dumps(base))
    for key, value in (override or {}).items():
        if key not in base:
            raise ReindexInputError(f"unknown reindex config key {key!r} (known: {sorted(base)})")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """``DEFAULT_CONFIG`` merged with the YAML file at ``path`` (if any)."""
    if path is None:
        return merge_config(DEFAULT_CONFIG, {})
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as exc:
        raise ReindexInputError(f"reindex config not found: {path}") from exc
    if not isinstance(data, dict):
        raise ReindexInputError(f"reindex config {path} must be a mapping, got {type(data).__name__}")
    return merge_config(DEFAULT_CONFIG, data)


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


# ------------------------------------------------------------------------------------------------- lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``WORKDIR/reindex.lock`` created with ``O_EXCL``: pid, hostname, start time, heartbeat.

    A background thread refreshes the heartbeat (atomic rewrite, the file never disappears). A lock whose
    pid is gone on this host, or whose heartbeat is older than ``ttl_s``, is stale and is taken over
    (renamed away atomically first, so two runs can never both take it over)."""

    def __init__(self, path: str | os.PathLike, ttl_s: float = 3600.0, heartbeat_s: float = 30.0):
        self.path = Path(path)
        self.ttl_s, self.heartbeat_s = float(ttl_s), float(heartbeat_s)
        self.token = uuid.uuid4().hex
        self.record: dict[str, Any] | None = None
        self.took_over: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        """The lock file's contents (None when absent; ``{}`` when unreadable, e.g. half-written)."""
        return _read_lock_file(self.path)

    def stale_reason(self, info: dict[str, Any]) -> str | None:
        """Why the lock ``info`` is stale, or None when its holder looks alive."""
        now = time.time()
        heartbeat = float(info.get("heartbeat") or info.get("started") or 0)
        if not info:
            age = now - self.path.stat().st_mtime if self.path.exists() else float("inf")
            return f"unreadable lock file, {age:.0f}s old" if age > self.ttl_s else None
        if info.get("hostname") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
            return f"pid {info.get('pid')} is not running on {info.get('hostname')}"
        if now - heartbeat > self.ttl_s:
            return f"heartbeat {now - heartbeat:.0f}s old > ttl {self.ttl_s:.0f}s"
        return None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockHeldError` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            now = time.time()
            record = {"pid": os.getpid(), "hostname": socket.gethostname(), "started": now, "heartbeat": now,
                      "token": self.token, "argv": sys.argv}
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            self.record = record
            self._thread = threading.Thread(target=self._beat, name="reindex-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise LockHeldError(f"could not acquire {self.path}: it keeps changing hands")

    def _take_over_if_stale(self) -> None:
        """Move a stale lock out of the way (atomic rename); raise :class:`LockHeldError` for a live one."""
        info = self.read()
        if info is None:
            return  # released between our open and read: race again
        reason = self.stale_reason(info)
        if reason is None:
            raise LockHeldError(
                f"another reindex is running: {self.path} is held by pid {info.get('pid')} on "
                f"{info.get('hostname')} since {_iso(info.get('started'))} (heartbeat "
                f"{time.time() - float(info.get('heartbeat', 0)):.0f}s ago); exiting"
            )
        graveyard = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, graveyard)
        except FileNotFoundError:
            return  # someone else moved it first; race again for the fresh lock
        if _read_lock_file(graveyard) != info:
            # Between our read and rename another run took the stale lock over and wrote its own: put that
            # one back (link fails if yet another lock appeared meanwhile) and back off.
            try:
                os.link(graveyard, self.path)
            except FileExistsError:
                pass
            graveyard.unlink(missing_ok=True)
            raise LockHeldError(f"{self.path} changed hands while taking over a stale lock; exiting")
        _log(f"taking over stale lock ({reason}): {info}")
        self.took_over = {**info, "reason": reason}
        graveyard.unlink(missing_ok=True)
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Refresh the heartbeat, only while the lock is still ours."""
        info = self.read()
        if not info or info.get("token") != self.token or self.record is None:
            return
        self.record["heartbeat"] = time.time()
        write_json_atomic(self.path, self.record)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info = self.read()
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.record = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_lock_file(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}


def _iso(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(ts)))
    except (TypeError, ValueError):
        return "?"


# ------------------------------------------------------------------------------------------ source scan
def file_signature(uri: str) -> tuple[int, str] | None:
    """(size, mtime) of a source file for the hash cache; None when it cannot be stat'ed."""
    from pipeline.inputs import split_protocol

    protocol, path = split_protocol(uri)
    try:
        if protocol in ("file", "local"):
            st = os.stat(path)
            return st.st_size, str(st.st_mtime_ns)
        import fsspec

        fs, p = fsspec.core.url_to_fs(uri)
        info = fs.info(p)
        stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag")
        return int(info.get("size") or 0), str(stamp)
    except (OSError, ValueError):
        return None


def hash_file(uri: str) -> str:
    """sha256 of the bytes of ``uri`` (streamed)."""
    import fsspec

    digest = hashlib.sha256()
    with fsspec.open(uri, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def scan_source(
    source: str, cache: dict[str, dict[str, Any]], workers: int = 4, progress: bool = True
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict]:
    """Read the source (manifest/dir/glob) and content-hash every video, reusing ``cache`` entries whose
    (size, mtime) still match. Returns ``(videos by id, problem rows, new cache)``; each video dict is the
    ingest input row plus ``source_sha256``. Problem rows (bad URI, unreadable, duplicate id) say why."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.inputs import read_inputs

    rows = read_inputs(source)
    videos: dict[str, dict[str, Any]] = {}
    problems: list[dict[str, Any]] = []
    for row in rows:
        if "error" in row:
            problems.append(
                {
                    "video_id": row["video_id"],
                    "source": row["source"],
                    "reason": row["error"][0],
                    "message": row["error"][1],
                }
            )
        elif row["video_id"] in videos:
            problems.append(
                {
                    "video_id": row["video_id"],
                    "source": row["source"],
                    "reason": "duplicate_id",
                    "message": f"video id also used by {videos[row['video_id']]['source']}",
                }
            )
        else:
            videos[row["video_id"]] = row
    new_cache: dict[str, dict[str, Any]] = {}
    todo = []
    hits = 0
    for vid, row in videos.items():
        sig = file_signature(row["source"])
        if sig is None:
            continue
        entry = cache.get(row["source"])
        if entry and entry.get("size") == sig[0] and entry.get("mtime") == sig[1]:
            row["source_sha256"] = entry["sha256"]
            new_cache[row["source"]] = entry
            hits += 1
        else:
            todo.append((vid, sig))
    t0 = time.monotonic()
    last = t0
    hash_errors: dict[str, str] = {}

    def work(item):
        vid, sig = item
        try:
            return vid, sig, hash_file(videos[vid]["source"]), None
        except (OSError, ValueError) as exc:
            return vid, sig, None, f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        for done, (vid, sig, digest, error) in enumerate(pool.map(work, todo), 1):
            if error is not None:
                hash_errors[vid] = error
            if digest is not None:
                videos[vid]["source_sha256"] = digest
                new_cache[videos[vid]["source"]] = {"size": sig[0], "mtime": sig[1], "sha256": digest}
            now = time.monotonic()
            if progress and (now - last > 5 or done == len(todo)):
                rate = done / max(now - t0, 1e-9)
                _log(
                    f"hashed {done}/{len(todo)} files  {rate:.1f} files/s  "
                    f"ETA {(len(todo) - done) / max(rate, 1e-9):.0f}s"
                )
                last = now
    for vid in [v for v, row in videos.items() if "source_sha256" not in row]:
        row = videos.pop(vid)
        problems.append(
            {
                "video_id": vid,
                "source": row["source"],
                "reason": "unreadable",
                "message": hash_errors.get(vid, f"cannot stat {row['source']}"),
            }
        )
    if progress:
        _log(
            f"scanned {len(rows)} source rows: {len(videos)} videos ({hits} hashes from cache, "
            f"{len(todo)} hashed), {len(problems)} problems"
        )
    return videos, problems, new_cache


@dataclass
class Delta:
    """What changed in the source since the last successful run."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)  # known videos whose source cannot be read now

    @property
    def to_ingest(self) -> list[str]:
        return sorted(self.new + self.changed)

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("new", "changed", "deleted", "unchanged", "unavailable")}


def compute_delta(
    videos: dict[str, dict[str, Any]],
    problems: list[dict[str, Any]],
    state: dict[str, Any],
    retry_failed: bool = False,
) -> Delta:
    """New / changed (different content hash) / deleted videos vs the state of the last successful run.

    Videos that failed before (ingest or embed error) are only retried when their content changed or
    with ``retry_failed``. Known videos whose source is listed but unreadable now keep their indexed rows."""
    known = {vid: rec["source_sha256"] for vid, rec in state.get("videos", {}).items()}
    failed = {vid: rec["source_sha256"] for vid, rec in state.get("failed", {}).items()}
    problem_ids = {p["video_id"] for p in problems}
    delta = Delta()
    for vid in sorted(videos):
        sha = videos[vid]["source_sha256"]
        if vid in known:
            (delta.unchanged if known[vid] == sha else delta.changed).append(vid)
        elif vid in failed:
            if failed[vid] != sha:
                delta.changed.append(vid)
            elif retry_failed:
                delta.new.append(vid)
        else:
            delta.new.append(vid)
    for vid in sorted(set(known) | set(failed)):
        if vid in videos:
            continue
        if vid in problem_ids and vid in known:
            delta.unavailable.append(vid)
        else:
            delta.deleted.append(vid)
    return delta


# ----------------------------------------------------------------------------------------- embeddings
def _pair_keys(table: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(table.column("video_id"), table.column("sha256"), "\x00")


def collect_rows(partition: Path, pairs: Iterable[tuple[str, str]]) -> pa.Table | None:
    """Every embedding row (video + clip rows) of the given (video_id, sha256) pairs, from all part files
    of ``partition``, one row per id (the newest part wins). None when no part holds any of them."""
    wanted = pa.array(sorted(f"{v}\x00{s}" for v, s in pairs), pa.string())
    if len(wanted) == 0:
        return None
    tables = []
    for part in sorted(partition.glob("part-*.parquet"), key=lambda p: p.stat().st_mtime_ns):
        meta = pq.read_table(part, columns=["video_id", "sha256"])
        mask = pc.is_in(_pair_keys(meta), value_set=wanted)
        if pc.any(mask).as_py():
            tables.append(pq.read_table(part).filter(mask))
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")
    ids = table.column("id").to_numpy()
    _, last = np.unique(ids[::-1], return_index=True)  # newest occurrence of each id
    keep = np.sort(len(ids) - 1 - last)
    return table.take(pa.array(keep))


def write_embeddings_dir(table: pa.Table, partition: Path, out_dir: Path, name: str) -> Path:
    """Write ``table`` as ``out_dir/part-<name>.parquet`` beside a copy of the partition's ``_model.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (partition / "_model.json").exists():
        shutil.copyfile(partition / "_model.json", out_dir / "_model.json")
    target = out_dir / f"part-{name}.parquet"
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, target)
    return out_dir


def embed_errors(partition: Path, label_prefix: str) -> dict[str, dict[str, str]]:
    """Embed error records (by video id) of the part files whose shard label starts with ``label_prefix``."""
    out: dict[str, dict[str, str]] = {}
    for part in sorted((partition / "errors").glob(f"part-{label_prefix}*.parquet")):
        for row in pq.read_table(part).to_pylist():
            out[row["video_id"]] = {"reason": row["reason"], "message": row["message"]}
    return out


# ---------------------------------------------------------------------------------------------- index
def copy_current(live_root: Path, scratch_root: Path) -> str:
    """Copy the CURRENT version of ``live_root`` into a fresh ``scratch_root`` (as its CURRENT)."""
    from index import store

    version = store.read_current(live_root)
    shutil.rmtree(scratch_root, ignore_errors=True)
    (scratch_root / store.VERSIONS_DIR).mkdir(parents=True)
    shutil.copytree(live_root / store.VERSIONS_DIR / version, scratch_root / store.VERSIONS_DIR / version)
    (scratch_root / store.CURRENT_FILE).write_text(version + "\n")
    return version


def index_contents(root: Path) -> dict[str, Any]:
    """(ids, video ids, count, recall) of the CURRENT version of ``root`` for validation."""
    from index import store

    vdir, meta, _indexes, ids = store.load_version(root)
    return {
        "version": vdir.name,
        "meta": meta,
        "ids": ids.column("id").to_numpy(),
        "video_ids": set(ids.column("video_id").to_pylist()),
    }


def validate_index(root: Path, live: pa.Table, min_recall: float, known_queries: int = 5) -> dict[str, Any]:
    """Check the CURRENT version of ``root`` against the live rows; raise :class:`ReindexError` if wrong.

    Counts and the exact id set equal the live set, recall on the index's probe set is >= ``min_recall``,
    and each of up to ``known_queries`` live videos' own video embedding finds that video at rank 1."""
    from index import VideoIndex

    got = index_contents(root)
    problems = []
    want_ids = np.sort(live.column("id").to_numpy())
    have_ids = np.sort(got["ids"])
    if len(have_ids) != len(want_ids) or not np.array_equal(have_ids, want_ids):
        missing = np.setdiff1d(want_ids, have_ids)
        extra = np.setdiff1d(have_ids, want_ids)
        problems.append(
            f"index holds {len(have_ids)} rows, live set has {len(want_ids)} "
            f"({len(missing)} missing, {len(extra)} unexpected)"
        )
    live_videos = set(live.column("video_id").to_pylist())
    if got["video_ids"] != live_videos:
        problems.append(
            f"video sets differ: {len(live_videos - got['video_ids'])} missing, "
            f"{len(got['video_ids'] - live_videos)} unexpected"
        )
    recall = float(got["meta"].get("recall", float("nan")))
    if not recall >= min_recall:
        problems.append(
            f"recall@{got['meta'].get('recall_k')} on the probe set is {recall:.4f} < {min_recall}"
        )
    video_rows = live.filter(pc.equal(live.column("clip_index"), -1)).sort_by("video_id")
    n = video_rows.num_rows
    picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(known_queries, n))}) if n else []
    checked = []
    if picks:
        vx = VideoIndex.open(root)
        vectors = np.stack([np.asarray(video_rows.column("embedding")[i].as_py(), np.float32) for i in picks])
        results = vx.search(vectors, k=5)
        for i, hits in zip(picks, results):
            vid = video_rows.column("video_id")[i].as_py()
            top = hits[0].score if hits else float("-inf")
            # Exact duplicates (same content under two ids) tie at the top: any tied rank-1 hit counts.
            ok = any(h.video_id == vid and h.score >= top - 1e-4 for h in hits)
            checked.append({"video_id": vid, "ok": ok, "top": hits[0].video_id if hits else None})
            if not ok:
                problems.append(
                    f"known query for {vid!r} returned {hits[0].video_id if hits else None!r} at rank 1"
                )
    if problems:
        raise ReindexError(f"validation of index version {got['version']} failed: " + "; ".join(problems))
    return {
        "version": got["version"],
        "rows": int(len(have_ids)),
        "videos": len(live_videos),
        "recall": recall,
        "known_queries": checked,
    }


def _stamp_meta(version_dir: Path, extra: dict[str, Any]) -> None:
    from index import store

    meta = json.loads((version_dir / store.META_FILE).read_text())
    meta["reindex"] = extra
    store.write_json_atomic(version_dir / store.META_FILE, meta)


# ------------------------------------------------------------------------------------------------ run
class Workdir:
    """Layout of a reindex working directory."""

    def __init__(self, root: str | os.PathLike):
        root_s = os.fspath(root)
        if "://" in root_s and not root_s.startswith("file://"):
            raise ReindexInputError(
                f"--workdir {root_s!r}: the reindex workdir must be a POSIX filesystem path (a local disk or "
                "a shared volume mounted on every node, e.g. EFS/NFS/PVC); object stores cannot do O_EXCL "
                "locks or atomic renames"
            )
        self.root = Path(root_s.removeprefix("file://")).resolve()
        self.lock = self.root / LOCK_FILE
        self.state = self.root / "state" / "state.json"
        self.hash_cache = self.root / "state" / "hash_cache.json"
        self.runs = self.root / "state" / "runs"
        self.ingest = self.root / "ingest"
        self.embeddings = self.root / "embeddings"
        self.index = self.root / "index"
        self.staging = self.root / "staging"

    def run_ingest_dir(self, seq: int) -> Path:
        return self.ingest / f"run-{seq:06d}"


def _ensure_ray() -> bool:
    """Join ``RAY_ADDRESS`` (set by ``ray job submit``) or start a local Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    repo_root = str(Path(__file__).resolve().parents[1])
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        pythonpath = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        )
    return True


def _delta_manifest(videos: dict[str, dict[str, Any]], ids: list[str], path: Path) -> str:
    """Write the ingest manifest of the delta (absolute sources); returns its content fingerprint."""
    columns = ["video_id", "path", "captions", "split", "caption_class", "hard_group"]
    rows = [
        {
            "video_id": vid,
            "path": videos[vid]["source"],
            "captions": list(videos[vid].get("captions") or []),
            **{c: videos[vid].get(c) for c in columns[3:]},
        }
        for vid in ids
    ]
    present = [c for c in columns[3:] if any(c in videos[v] for v in ids)]
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("video_id", pa.string()),
                ("path", pa.string()),
                ("captions", pa.list_(pa.string())),
                *[(c, pa.string()) for c in present],
            ]
        ),
    )
    fingerprint = hashlib.sha256(
        json.dumps(
            [[r["video_id"], r["path"], videos[r["video_id"]]["source_sha256"]] for r in rows]
        ).encode()
    ).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return fingerprint


def _reset_run(wd: Workdir, seq: int, partition: Path) -> None:
    """Forget a crashed run's outputs whose delta differs from this run's (embed would trust its parts)."""
    run_dir = wd.run_ingest_dir(seq)
    label = f"{run_dir.name}-"
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in (partition, partition / "errors"):
        for part in folder.glob(f"part-{label}*.parquet"):
            part.unlink(missing_ok=True)


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
) -> dict[str, Any]:
    """One reindex run (see the module docstring); returns the summary dict.

    Raises :class:`LockHeldError` when another live run holds the lock, :class:`ReindexError` on bad input
    or failed validation (nothing is published then), and :class:`SimulatedCrash` from the test hook."""
    cfg = merge_config(DEFAULT_CONFIG, config or {})
    model = model or cfg["model"]
    pretrained = pretrained if pretrained is not None else cfg["pretrained"]
    wd = Workdir(workdir)
    wd.root.mkdir(parents=True, exist_ok=True)
    lock = RunLock(wd.lock, ttl_s=cfg["lock"]["ttl_s"], heartbeat_s=cfg["lock"]["heartbeat_s"])
    with lock:
        return _run_locked(
            source, wd, cfg, model, pretrained, retry_failed, dry_run, crash_mode, progress, lock
        )


def _run_locked(
    source, wd: Workdir, cfg, model, pretrained, retry_failed, dry_run, crash_mode, progress, lock: RunLock
) -> dict[str, Any]:
    from index import add_embeddings, build_index, delete_videos, needs_retrain, store
    from pipeline.embedding import build_encoder, model_partition

    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def step_done(step: str, t0: float) -> None:
        timings[step] = round(time.perf_counter() - t0, 3)
        if progress:
            _log(f"step {step} done in {timings[step]:.1f}s")
        crash_hook(step, crash_mode)

    state = read_json(wd.state, default=None) or {
        "format": STATE_FORMAT,
        "seq": 0,
        "videos": {},
        "failed": {},
    }
    if state.get("format") != STATE_FORMAT:
        raise ReindexError(f"{wd.state} is not a {STATE_FORMAT} state file")
    seq = int(state["seq"]) + 1
    encoder, _, _ = build_encoder(model, pretrained)
    model_id = encoder.model_id
    del encoder
    partition = wd.embeddings / model_partition(model_id)
    have_index = store.read_current(wd.index, missing_ok=True) is not None
    full = not have_index or state.get("model_id") != model_id
    if full and state.get("videos") and state.get("model_id") != model_id:
        _log(f"model changed ({state.get('model_id')} -> {model_id}): full rebuild")
    if full:
        state = {**state, "videos": {}, "failed": {}}  # every live video counts as new

    # ---- scan: read + hash the source, diff against the state
    t0 = time.perf_counter()
    cache = read_json(wd.hash_cache, default={}) or {}
    videos, problems, new_cache = scan_source(source, cache, workers=cfg["hash_workers"], progress=progress)
    write_json_atomic(wd.hash_cache, new_cache)  # a cache, not state: safe to keep even if the run dies
    delta = compute_delta(videos, problems, state, retry_failed=retry_failed)
    if progress:
        _log(f"run {seq}: delta {delta.counts()} (model {model_id}{', full build' if full else ''})")
    step_done("scan", t0)
    summary: dict[str, Any] = {
        "run": seq,
        "source": source,
        "workdir": str(wd.root),
        "model_id": model_id,
        "full_build": full,
        **delta.counts(),
        "source_problems": problems,
        "lock_taken_over": lock.took_over,
    }
    if dry_run:
        summary.update(dry_run=True, new_ids=delta.new, changed_ids=delta.changed, deleted_ids=delta.deleted)
        return summary

    started_ray = False
    try:
        ingest_ids = delta.to_ingest
        ingested: dict[str, dict[str, Any]] = {}
        failed: dict[str, dict[str, Any]] = {}
        if ingest_ids:
            # ---- ingest the delta into its own run dir (same seq after a crash -> shards are reused)
            from pipeline.ingest import run_ingest

            t0 = time.perf_counter()
            run_dir = wd.run_ingest_dir(seq)
            fp_path = wd.staging / f"run-{seq:06d}.delta.json"
            manifest_path = wd.staging / f"run-{seq:06d}.delta.parquet"
            old_fp = read_json(fp_path, default={}).get("fingerprint")
            fp = _delta_manifest(videos, ingest_ids, manifest_path)
            if old_fp is not None and old_fp != fp:
                _log(f"the source changed since the interrupted run {seq}: redoing its ingest/embed")
                _reset_run(wd, seq, partition)
            write_json_atomic(fp_path, {"fingerprint": fp, "videos": len(ingest_ids)})
            finished = read_json(run_dir / "manifest.json", default={}) or {}
            if not (finished.get("summary") or {}).get("complete"):  # a rerun skips Ray start-up when done
                started_ray = _ensure_ray() or started_ray
            ic = cfg["ingest"]
            summary["ingest"] = run_ingest(
                str(manifest_path),
                str(run_dir),
                **{k: v for k, v in ic.items() if v is not None},
                progress=progress,
            )
            for shard_index in sorted((run_dir / "shards").glob("*.parquet")):
                for rec in pq.read_table(
                    shard_index, columns=["video_id", "sha256", "source_sha256", "source"]
                ).to_pylist():
                    ingested[rec["video_id"]] = rec
            errs = pq.read_table(run_dir / "errors.parquet").to_pylist()
            for err in errs:
                failed[err["video_id"]] = {
                    "stage": "ingest",
                    "reason": err["reason"],
                    "message": err["message"],
                }
            step_done("ingest", t0)

            # ---- embed the run's shards (done parts are skipped; content already embedded is reused)
            from jobs.embed import run_embed

            t0 = time.perf_counter()
            ec = cfg["embed"]
            if ingested:
                from pipeline.datasets import list_shards
                from pipeline.embedding import plan_shards

                if any(w.todo_keys for w in plan_shards(list_shards(str(run_dir)), partition)):
                    started_ray = _ensure_ray() or started_ray
                summary["embed"] = run_embed(
                    str(run_dir),
                    model,
                    str(wd.embeddings),
                    pretrained=pretrained,
                    sampling=dict(ec.get("sampling") or {}),
                    batch_size=int(ec.get("batch_size", 16)),
                    encoders=int(ec.get("encoders", 1)),
                )
                for vid, err in embed_errors(partition, f"{run_dir.name}-").items():
                    failed[vid] = {"stage": "embed", **err}
            step_done("embed", t0)

        # ---- the live set: unchanged indexed videos + successfully embedded delta videos
        t0 = time.perf_counter()
        live_records: dict[str, dict[str, Any]] = {
            vid: state["videos"][vid] for vid in delta.unchanged + delta.unavailable
        }
        delta_pairs = {
            (vid, ingested[vid]["sha256"]) for vid in ingest_ids if vid in ingested and vid not in failed
        }
        delta_rows = collect_rows(partition, delta_pairs) if delta_pairs else None
        rows_per_video: dict[str, int] = {}
        if delta_rows is not None:
            for vid in delta_rows.column("video_id").to_pylist():
                rows_per_video[vid] = rows_per_video.get(vid, 0) + 1
        for vid, sha in sorted(delta_pairs):
            if vid not in rows_per_video:  # ingested but no vectors: the embed error went elsewhere
                failed.setdefault(
                    vid,
                    {
                        "stage": "embed",
                        "reason": "no_rows",
                        "message": "no embedding rows were written for this video",
                    },
                )
                continue
            rec = ingested[vid]
            live_records[vid] = {
                "source": rec["source"],
                "source_sha256": rec["source_sha256"],
                "sha256": sha,
                "rows": rows_per_video[vid],
            }
        for vid in ingest_ids:
            if vid not in ingested and vid not in failed:
                failed[vid] = {
                    "stage": "ingest",
                    "reason": "missing_from_shards",
                    "message": "ingest finished without a shard row or an error for this video",
                }
        failed_records = {
            vid: {"source": videos[vid]["source"], "source_sha256": videos[vid]["source_sha256"], **info}
            for vid, info in failed.items()
        }
        for vid, rec in state.get("failed", {}).items():
            if vid in videos and vid not in ingest_ids and vid not in live_records:
                failed_records[vid] = rec
        old_indexed = set(state.get("videos", {}))
        remove = sorted((set(delta.deleted) | set(delta.changed)) & old_indexed)
        index_changes = bool(remove) or delta_rows is not None
        summary.update(
            rows_added=int(delta_rows.num_rows) if delta_rows is not None else 0,
            rows_removed=int(sum(state["videos"][v].get("rows", 0) for v in remove)),
            failed=len(failed),
            failed_ids=sorted(failed),
        )

        version = store.read_current(wd.index, missing_ok=True)
        if not live_records:
            raise ReindexError(
                f"no video of {source} could be ingested and embedded "
                f"({len(failed)} failed, {len(problems)} source problems); nothing to index"
            )
        scratch = wd.staging / f"run-{seq:06d}" / "index"
        live_pairs = {(vid, r["sha256"]) for vid, r in live_records.items()}
        icfg = cfg["index"]
        build_kwargs = dict(
            factory=icfg["factory"],
            memory_budget=icfg["memory_budget"],
            recall_target=icfg["recall_target"],
            k=icfg["k"],
            progress=progress,
        )
        mode = "none"
        if full:
            mode = "build"
        elif index_changes:
            mode = "incremental"
            parent = copy_current(wd.index, scratch)
            if remove:
                delete_videos(scratch, remove, keep=2)
            if delta_rows is not None:
                delta_dir = write_embeddings_dir(
                    delta_rows, partition, wd.staging / f"run-{seq:06d}" / "delta", "delta"
                )
                add_embeddings(scratch, delta_dir, keep=2, progress=progress)
            retrain, reasons = needs_retrain(scratch, growth_factor=icfg["growth_factor"])
            if retrain:
                _log(f"needs_retrain: {'; '.join(reasons)} -> rebuilding from the live rows")
                summary["retrain_reasons"] = reasons
                mode = "rebuild"
        live_rows = collect_rows(partition, live_pairs) if mode != "none" else None
        if mode in ("build", "rebuild"):
            shutil.rmtree(scratch, ignore_errors=True)
            live_dir = write_embeddings_dir(
                live_rows, partition, wd.staging / f"run-{seq:06d}" / "live", "live"
            )
            build_index(live_dir, scratch, keep=1, **build_kwargs)
            parent = version
        summary["index_mode"] = mode
        step_done("index", t0)

        published = version
        if mode != "none":
            # ---- validate the scratch version against the live rows, then publish it atomically
            t0 = time.perf_counter()
            summary["validation"] = validate_index(
                scratch, live_rows, cfg["validate"]["min_recall"], int(cfg["validate"]["known_queries"])
            )
            step_done("validate", t0)
            t0 = time.perf_counter()
            staged = store.version_dir(scratch)
            _stamp_meta(
                staged,
                {"run": seq, "parent_version": parent, "mode": mode, **delta.counts(), "source": source},
            )
            wd.index.mkdir(parents=True, exist_ok=True)
            (wd.index / store.VERSIONS_DIR).mkdir(exist_ok=True)
            published = store.publish(wd.index, staged, keep=int(icfg["keep"]))
            step_done("publish", t0)

        new_state = {
            "format": STATE_FORMAT,
            "seq": seq,
            "model_id": model_id,
            "model": model,
            "pretrained": pretrained,
            "source": source,
            "index_version": published,
            "updated": time.time(),
            "videos": dict(sorted(live_records.items())),
            "failed": dict(sorted(failed_records.items())),
        }
        write_json_atomic(wd.state, new_state)
        summary.update(
            version=published,
            live_videos=len(live_records),
            live_rows=int(sum(r.get("rows", 0) for r in live_records.values())),
        )
        shutil.rmtree(wd.staging, ignore_errors=True)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    timings["total"] = round(time.perf_counter() - t_start, 3)
    summary["timings_s"] = timings
    write_json_atomic(wd.runs / f"run-{seq:06d}.json", summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The final summary as an aligned two-column table."""
    val = summary.get("validation") or {}
    lines = [
        ("run", summary.get("run")),
        ("model", summary.get("model_id")),
        (
            "new / changed / deleted",
            f"{summary.get('new')} / {summary.get('changed')} / {summary.get('deleted')}",
        ),
        ("unchanged / unavailable", f"{summary.get('unchanged')} / {summary.get('unavailable')}"),
        ("failed (ingest/embed)", summary.get("failed", 0)),
        ("source problems", len(summary.get("source_problems") or [])),
        ("rows added / removed", f"{summary.get('rows_added', 0)} / {summary.get('rows_removed', 0)}"),
        ("index mode", summary.get("index_mode", "-")),
        (
            "validation",
            f"{val.get('rows')} rows, {val.get('videos')} videos, recall {val.get('recall')}" if val else "-",
        ),
        ("version published", summary.get("version")),
        ("live videos / rows", f"{summary.get('live_videos')} / {summary.get('live_rows')}"),
        ("timings (s)", " ".join(f"{k}={v}" for k, v in (summary.get("timings_s") or {}).items())),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(["reindex summary", "-" * (width + 30)] + [f"{k:<{width}}  {v}" for k, v in lines])


__all__ = [
    "CRASH_ENV",
    "DEFAULT_CONFIG",
    "Delta",
    "LockHeldError",
    "ReindexError",
    "ReindexInputError",
    "RunLock",
    "SimulatedCrash",
    "collect_rows",
    "compute_delta",
    "format_summary",
    "load_config",
    "run_reindex",
    "scan_source",
    "validate_index",
]
