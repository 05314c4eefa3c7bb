"""Publish races: writers released together by a barrier (threads, or processes) add / delete / build /
prune one index while a reader thread polls CURRENT and opens every version it names. Counts lost
acknowledged writes and CURRENTs naming a version that cannot be opened, for the conditional publish
(``index.store.publish``) and, as the baseline in the same run, for the protocol main had: CURRENT read,
compared, then written unconditionally, and ``prune`` removing unfinished versions numbered below CURRENT.

    python -m bench.publish_race        # per store (local folder, moto S3): 200 append + 16 index races
    python -m bench.publish_race --rounds 20 --index-rounds 8 --baseline-rounds 8 --json /tmp/race.json

A race is one round: 2-4 writers on one index. Index races (``CASES``): each writer an ``add`` of its own
new videos, a ``delete`` of videos added before the round, a full ``build``, or a ``prune(keep=1)`` loop.
Append races (``LOG_CASES``, cheap enough for hundreds of rounds): each writer reads CURRENT's list of
writes and publishes a version with its own id appended, through the same ``store.publish``.

A write is *lost* when it was acknowledged (returned a version) but its version is not in the final
version's history (the chain of ``parent_version`` from the final CURRENT), or its change is not live (added
videos / appended ids missing, deleted videos back); a *phantom* is a refused write whose change is live.
``tests/test_publish_race.py`` runs a few rounds of every case in CI; this script gives the floor figure:
0 lost and 0 bad CURRENTs over >= 200 races per store.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.record import BenchRecord, add_record_args, col
from index import store
from index.build import add_embeddings, build_index, delete_videos
from index.testing import clustered_vectors, write_embeddings
from runtime import storage

DIM = 8
BASE_VIDEOS = 40
KEEP = 3
PRUNE_PASSES = 20
# (name, kinds of the writers, processes?): every round runs one case; rounds cycle through them.
CASES = [
    ("2 add", ("add", "add"), False),
    ("4 add", ("add",) * 4, False),
    ("2 add + 2 delete", ("add", "delete", "add", "delete"), False),
    ("build + 3 add", ("build", "add", "add", "add"), False),
    ("3 add + prune", ("add", "prune", "add", "add"), False),
    ("2 add, processes", ("add", "add"), True),
    ("2 add + 2 delete, processes", ("add", "delete", "add", "delete"), True),
    ("build + add + prune, processes", ("build", "add", "prune", "add"), True),
]


# The cheap writer for hundreds of races: "append" reads CURRENT's writes.json and publishes a version with
# its own id appended (the read-modify-publish of an add, without FAISS).
LOG_FILE = "writes.json"
LOG_CASES = [
    ("2 append", ("append",) * 2, False),
    ("4 append", ("append",) * 4, False),
    ("3 append + prune", ("append", "prune", "append", "append"), False),
    ("2 append, processes", ("append",) * 2, True),
    ("4 append, processes", ("append",) * 4, True),
]


@dataclass(frozen=True)
class Op:
    kind: str  # "add" | "delete" | "build" | "prune" | "append"
    root: str
    source: str | None = None  # the embeddings an add / build reads
    videos: tuple[str, ...] = ()  # the videos an add adds / a delete removes; the ids an append appends
    retries: int = 0


@dataclass
class Outcome:
    op: Op
    ok: bool
    version: str | None = None
    parent: str | None = None
    conflict: bool = False  # refused with PublishConflict
    error: str | None = None


@dataclass
class RoundResult:
    case: str
    acked: int = 0
    refused: int = 0
    lost: list[str] = field(default_factory=list)
    phantom: list[str] = field(default_factory=list)
    bad_current: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # failures other than a PublishConflict
    versions_seen: int = 0


def apply_op(op: Op) -> Outcome:
    """One writer's operation through the library calls ``jobs.index`` makes; never raises."""
    try:
        if op.kind == "prune":
            for _ in range(PRUNE_PASSES):
                store.prune(op.root, keep=1)
            return Outcome(op, True)
        if op.kind == "append":
            meta = store.retry_on_conflict(op.retries, append_write, op)
        elif op.kind == "add":
            meta = store.retry_on_conflict(op.retries, add_embeddings, op.root, op.source, keep=KEEP,
                                           progress=False)
        elif op.kind == "delete":
            meta = store.retry_on_conflict(op.retries, delete_videos, op.root, list(op.videos), keep=KEEP)
        else:
            meta = store.retry_on_conflict(op.retries, build_index, op.source, op.root, factory="Flat",
                                           keep=KEEP, progress=False, text_queries=None)
        return Outcome(op, True, meta["version"], meta.get("parent_version"))
    except store.PublishConflict as exc:
        return Outcome(op, False, conflict=True, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - every other failure is counted, not hidden
        return Outcome(op, False, error=f"{type(exc).__name__}: {exc}")


def read_log(root: str, version: str | None) -> list[str]:
    if version is None:
        return []
    return storage.read_json(storage.join(store.version_uri(root, version), LOG_FILE))


def append_write(op: Op) -> dict:
    """One read-modify-publish: CURRENT's log + ``op.videos`` as a new version, published on it."""
    expected = store.read_current(op.root, missing_ok=True)
    try:
        writes = read_log(op.root, expected)
    except FileNotFoundError as exc:  # pruned: only possible once it is no longer CURRENT
        raise store.PublishConflict(f"{expected!r} was pruned while read: CURRENT moved; retry") from exc
    version = store.new_version_name(op.root)
    stage = store.staging_dir(op.root, version)
    try:
        (stage / LOG_FILE).write_text(json.dumps(writes + list(op.videos)))
        store.publish(op.root, stage, {"dim": 0, "count": 0, "shards": []}, version, keep=KEEP,
                      expected_current=expected)
    except BaseException:
        store.discard_stage(op.root, stage, version)
        raise
    return {"version": version, "parent_version": expected}


def open_log_version(root: str, version: str) -> set[str]:
    """Open a log version as a reader must: index.json, then every file it records, checksum-verified."""
    vdir = store.version_dir(root, version)
    meta = store.read_meta(vdir)
    for name in meta["files"]:
        store.local_file(vdir, meta, name, verify=True)
    return set(read_log(root, version))


def open_index_version(root: str, version: str) -> set[str]:
    """Open an index version (load + verify every file); its video ids."""
    return set(store.load_version(root, version)[3].column("video_id").to_pylist())


# ------------------------------------------------------------------------------ the baseline protocol
def _unconditional_swap(root: str, expected: str | None, version: str) -> None:
    """main's publish: compare CURRENT with what the writer read, then write it (not atomic)."""
    found = store.read_current(root, missing_ok=True)
    if found != expected:
        raise store.PublishConflict(f"{root!r}: CURRENT moved from {expected!r} to {found!r}")
    storage.write_text(storage.join(root, store.CURRENT_FILE), version + "\n", fsync=True)


def _old_prune(root, keep: int = 3, **_ignored) -> list[str]:
    """main's prune: also removes unfinished versions numbered below CURRENT (another writer's staging)."""
    root = storage.normalize(root)
    current = store.read_current(root, missing_ok=True)
    versions = store.list_versions(root)
    for name in versions[: max(0, len(versions) - max(1, keep))]:
        if name != current:
            storage.remove(store.version_uri(root, name), recursive=True)
    if current is not None:
        for name in set(store.list_versions(root, complete=False)) - set(versions):
            if store._seq(name) < store._seq(current):
                storage.remove(store.version_uri(root, name), recursive=True)
    return []


_CONDITIONAL = (store._swap_current, store._check_complete, store.prune)
_BASELINE = (_unconditional_swap, lambda *args: None, _old_prune)


def use_protocol(protocol: str) -> None:
    """Install ``protocol`` ("conditional": the library as it is; "baseline": main's) in this process."""
    store._swap_current, store._check_complete, store.prune = (
        _BASELINE if protocol == "baseline" else _CONDITIONAL)


# -------------------------------------------------------------------------------------------- writers
# A racer is ``fn(start, *args)``: it gets ready (e.g. takes a lock), calls ``start()`` (a barrier: every
# racer of the round passes it together) and races. Racers run as threads or in long-lived processes.
Racer = tuple[Callable, tuple]


def started_op(start: Callable[[], None], op: Op) -> Outcome:
    start()
    return apply_op(op)


def run_threads(racers: list[Racer]) -> list:
    """Each racer in its own thread, released together; their results in order."""
    barrier, results = threading.Barrier(len(racers)), [None] * len(racers)

    def run(i: int) -> None:
        fn, args = racers[i]
        results[i] = fn(barrier.wait, *args)

    threads = [threading.Thread(target=run, args=(i,), name=f"racer-{i}") for i in range(len(racers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _process_loop(inbox, outbox, barrier, protocol: str) -> None:
    use_protocol(protocol)
    while (task := inbox.get()) is not None:
        index, fn, args = task
        try:
            outbox.put((index, fn(barrier.wait, *args)))
        except Exception as exc:  # noqa: BLE001 - handed back to the parent, which raises it
            outbox.put((index, exc))


class Processes:
    """``n`` long-lived processes (spawned once: imports cost seconds) that run one racer each per call,
    released together by a multiprocessing barrier."""

    def __init__(self, n: int, protocol: str = "conditional"):
        ctx = mp.get_context("spawn")
        self.barrier = ctx.Barrier(n)
        self.inboxes = [ctx.Queue() for _ in range(n)]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_process_loop, args=(q, self.outbox, self.barrier, protocol),
                                  daemon=True) for q in self.inboxes]
        for p in self.procs:
            p.start()

    def run(self, racers: list[Racer]) -> list:
        for i, (inbox, (fn, args)) in enumerate(zip(self.inboxes, racers, strict=True)):
            inbox.put((i, fn, args))
        results = dict(self.outbox.get(timeout=900) for _ in racers)
        for value in results.values():
            if isinstance(value, Exception):
                raise value
        return [results[i] for i in range(len(racers))]

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Racers of the storage primitives and the lock (tests/test_publish_race.py runs them as threads and
# processes): module-level, so a spawned process can run them.
def race_create(start: Callable[[], None], uri: str, data: bytes) -> bool:
    start()
    return storage.create_exclusive(uri, data)


def race_increment(start: Callable[[], None], uri: str, times: int) -> int:
    """Add 1 to the counter at ``uri`` ``times`` times (read, then compare-and-swap, again on a miss);
    returns how many swaps missed."""
    start()
    missed = 0
    for _ in range(times):
        while True:
            try:
                raw = storage.read_bytes(uri)
            except FileNotFoundError:
                raw = None
            if storage.compare_and_swap(uri, raw, str(int(raw or 0) + 1).encode()):
                break
            missed += 1
    return missed


def race_lock_holder(start: Callable[[], None], path: str, duration_s: float) -> dict:
    """Hold the reindex lock and beat while others race to take it over: for ``duration_s`` at least, and
    on until a heartbeat has failed and 3 more after it (every later beat must fail too); 120 s at most."""
    from workflows.reindex.lock import RunLock  # local: workflows.reindex pulls in Ray + models (seconds)

    lock = RunLock(path, ttl_s=3600, heartbeat_s=0)
    lock.acquire()
    start()
    beats, start_s = [], time.monotonic()
    while time.monotonic() - start_s < 120:
        beats.append(lock.heartbeat())
        time.sleep(0.02)  # a beat loop with no pause at all would starve every takeover (correctly)
        failed_at = beats.index(False) if False in beats else None
        if failed_at is not None and len(beats) - failed_at > 3 and time.monotonic() - start_s >= duration_s:
            break
    return {"token": lock.token, "beats": beats, "lost": lock.lost}


def race_lock_taker(start: Callable[[], None], path: str) -> dict:
    """Take the lock over as soon as released (``ttl_s=0``: every heartbeat counts as stale)."""
    from workflows.reindex.lock import LockHeldError, RunLock  # local: see race_lock_holder

    lock = RunLock(path, ttl_s=0.0, heartbeat_s=0)
    start()
    for _ in range(20):  # a beating holder can win each swap ("keeps changing hands"): start again
        try:
            lock.acquire()
            return {"token": lock.token, "acquired": True}
        except LockHeldError:
            continue
    return {"token": lock.token, "acquired": False}


@contextmanager
def current_watcher(root: str, opener: Callable[[str, str], set[str]]) -> Iterator[dict]:
    """A reader thread that reads CURRENT every 2 ms and opens (loads, verifies) each new version it names,
    until the block ends. ``bad`` lists versions that could not be opened while CURRENT still named them."""
    state: dict = {"seen": set(), "bad": []}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            time.sleep(0.002)  # poll hard, but leave the writers the GIL
            version = store.read_current(root, missing_ok=True)
            if version is None or version in state["seen"]:  # published files never change: open once
                continue
            try:
                opener(root, version)
                state["seen"].add(version)
            except Exception as exc:  # noqa: BLE001 - judged below: only a still-current version counts
                if store.read_current(root, missing_ok=True) == version:
                    state["bad"].append(f"{version}: {type(exc).__name__}: {exc}")

    thread = threading.Thread(target=watch, name="current-watcher", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join(timeout=60)


# ----------------------------------------------------------------------------------------------- rounds
class Race:
    """Rounds of ``CASES`` on one index under ``base`` (any store)."""

    def __init__(self, base: str, mode: str = "index"):
        self.base, self.mode, self.counter, self.restarts = storage.normalize(base), mode, 0, 0
        self.opener = open_index_version if mode == "index" else open_log_version
        if mode == "index":
            self.base_emb = write_embeddings(storage.join(self.base, "emb-base"),
                                             clustered_vectors(BASE_VIDEOS, DIM, seed=1))
        self.restart()

    def restart(self) -> None:
        """A fresh index (at the start, and after the baseline protocol broke one)."""
        self.root = storage.join(self.base, f"idx-{self.restarts}")
        self.restarts += 1
        if self.mode == "log":
            append_write(Op("append", self.root, videos=("initial",)))
        else:
            build_index(self.base_emb, self.root, factory="Flat", progress=False, text_queries=None)

    def _new_videos(self, n: int = 2) -> tuple[str, tuple[str, ...]]:
        """An embeddings folder of ``n`` videos no other writer has."""
        self.counter += 1
        prefix = f"w{self.counter:05d}"
        uri = storage.join(self.base, f"emb-{prefix}")
        write_embeddings(uri, clustered_vectors(n, DIM, seed=self.counter), start_id=10_000 * self.counter,
                         video_prefix=prefix)
        return uri, tuple(f"{prefix}-{i:06d}" for i in range(n))

    def ops_for(self, kinds: tuple[str, ...], retries: int) -> list[Op]:
        ops = []
        for kind in kinds:
            if kind == "append":
                self.counter += 1
                ops.append(Op("append", self.root, videos=(f"w{self.counter:05d}",), retries=retries))
            elif kind == "add":
                source, videos = self._new_videos()
                ops.append(Op("add", self.root, source, videos, retries))
            elif kind == "delete":  # its victims are added (unraced) first
                source, videos = self._new_videos()
                add_embeddings(self.root, source, keep=KEEP, progress=False)
                ops.append(Op("delete", self.root, videos=videos, retries=retries))
            elif kind == "build":
                ops.append(Op("build", self.root, self.base_emb, retries=retries))
            else:
                ops.append(Op("prune", self.root))
        return ops

    def round(self, case: str, kinds: tuple[str, ...], runner: Callable[[list[Racer]], list],
              retries: int) -> RoundResult:
        ops = self.ops_for(kinds, retries)
        initial = store.read_current(self.root)
        with current_watcher(self.root, self.opener) as watched:
            outcomes = runner([(started_op, (op,)) for op in ops])
        result = RoundResult(case, versions_seen=len(watched["seen"]), bad_current=list(watched["bad"]))
        final = store.read_current(self.root)
        try:
            live = self.opener(self.root, final)
        except (store.IndexNotFoundError, store.CorruptIndexError, FileNotFoundError) as exc:
            result.bad_current.append(f"final CURRENT {final}: {type(exc).__name__}: {exc}")
            self.restart()  # nothing can be written on an index whose CURRENT is broken
            return result
        check_round(final, live, initial, outcomes, result)
        return result


def check_round(final: str, live: set[str], initial: str, outcomes: list[Outcome],
                result: RoundResult) -> None:
    """Fill ``result`` from the final version (``live``: its video ids / log ids): acknowledged / refused
    counts, lost and phantom writes, unexpected failures."""
    parents = {o.version: o.parent for o in outcomes if o.ok and o.version}
    history, version = set(), final
    while version in parents and version not in history:
        history.add(version)
        version = parents[version]
    if version != initial:  # the chain from the final version must lead back to where the round began
        result.lost.append(f"history of {final} ends at {version}, not at {initial}")
    built = any(o.ok and o.op.kind == "build" for o in outcomes)
    for o in outcomes:
        if o.op.kind == "prune":
            if not o.ok:
                result.unexpected.append(f"prune: {o.error}")
            continue
        if not o.ok and not o.conflict:
            result.unexpected.append(f"{o.op.kind}: {o.error}")
            continue
        result.acked += o.ok
        result.refused += not o.ok
        # A build replaces the whole index: rows of the writes before it are gone by design.
        effect = built or (set(o.op.videos) <= live if o.op.kind != "delete" else not set(o.op.videos) & live)
        if o.ok and o.version not in history:
            result.lost.append(f"{o.op.kind} {o.version} (parent {o.parent}) is not in the final history")
        elif o.ok and not effect:
            result.lost.append(f"{o.op.kind} {o.version}: its videos {o.op.videos} are not as it left them")
        if not o.ok and not built and effect and o.op.videos:
            result.phantom.append(f"{o.op.kind} refused but its change is live: {o.op.videos}")


# -------------------------------------------------------------------------------------------- the bench
def run_store(base: str, protocol: str, rounds: int, mode: str = "index",
              log: Callable[[str], None] = print) -> dict:
    """``rounds`` races of ``mode``'s cases ("index": ``CASES``, "log": ``LOG_CASES``) on the store of
    ``base`` under ``protocol``; the totals and the first problems."""
    use_protocol(protocol)
    cases = CASES if mode == "index" else LOG_CASES
    race = Race(base, mode)
    pools: dict[int, Processes] = {}
    totals = {"races": 0, "acked": 0, "refused": 0, "lost": 0, "phantom": 0, "bad_current": 0,
              "unexpected": 0, "versions_seen": 0, "examples": []}
    t0 = time.perf_counter()
    try:
        for r in range(rounds):
            case, kinds, processes = cases[r % len(cases)]
            if processes and len(kinds) not in pools:
                pools[len(kinds)] = Processes(len(kinds), protocol)
            runner = pools[len(kinds)].run if processes else run_threads
            res = race.round(case, kinds, runner, retries=2 * (r // len(cases) % 2))
            totals["races"] += 1
            for key in ("acked", "refused", "versions_seen"):
                totals[key] += getattr(res, key)
            for key in ("lost", "phantom", "bad_current", "unexpected"):
                totals[key] += len(getattr(res, key))
                totals["examples"].extend(f"{case}: {x}" for x in getattr(res, key)[:1])
            if (r + 1) % 10 == 0 or r + 1 == rounds:
                rate = (r + 1) / (time.perf_counter() - t0)
                log(f"[race] {mode} {protocol} {base}: {r + 1}/{rounds} races, {rate:.2f} races/s, "
                    f"ETA {(rounds - r - 1) / rate:.0f}s; lost {totals['lost']}, bad CURRENT "
                    f"{totals['bad_current']}, unexpected {totals['unexpected']}")
    finally:
        for pool in pools.values():
            pool.close()
        use_protocol("conditional")
    totals["examples"] = totals["examples"][:5]
    totals["seconds"] = round(time.perf_counter() - t0, 1)
    return totals


def main(argv: list[str] | None = None) -> int:
    from bench.storage import make_bucket, s3_server  # local: Ray + models, which writer processes never need

    p = argparse.ArgumentParser(prog="python -m bench.publish_race", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200, help="append races per store, conditional publish")
    p.add_argument("--index-rounds", type=int, default=16, help="add/delete/build/prune races per store")
    p.add_argument("--baseline-rounds", type=int, default=16, help="per store and mode, main's protocol")
    add_record_args(p, "publish_race")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the S3 server
    record = BenchRecord.start("publish_race", argv)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="vs-publish-race-"))
    os.environ.setdefault(storage.CACHE_ENV, str(work / "cache"))
    plan = [("log", "baseline", args.baseline_rounds), ("log", "conditional", args.rounds),
            ("index", "baseline", args.baseline_rounds), ("index", "conditional", args.index_rounds)]
    with s3_server(work / "s3.log"):
        bucket = make_bucket(f"publish-race-{os.getpid()}")
        for store_name, base in (("local", str(work / "local")), ("s3", bucket)):
            for mode, protocol, rounds in plan:
                if rounds:
                    totals = run_store(storage.join(base, f"{mode}-{protocol}"), protocol, rounds, mode)
                    rows.append({"store": store_name, "writers": mode, "protocol": protocol, **totals})
                    print(f"[race] {store_name} {mode} {protocol}: {totals}", flush=True)
    _record(record, rows, args)
    ok = all(r["lost"] == r["bad_current"] == r["unexpected"] == r["phantom"] == 0
             for r in rows if r["protocol"] == "conditional")
    return 0 if ok else 1


def _record(record: BenchRecord, rows: list[dict], args: argparse.Namespace) -> None:
    columns = [col("store", "store"), col("writers", "writers"), col("protocol", "protocol"),
               col("races", "races"), col("acked", "acknowledged writes"),
               col("refused", "refused (PublishConflict)"), col("lost", "lost acknowledged"),
               col("phantom", "refused but live"), col("bad_current", "CURRENT naming an unopenable version"),
               col("unexpected", "other errors"), col("seconds", "seconds", "{:.0f}")]
    record.table("publish_race", columns=columns, rows=rows,
                 sample_size=f"per store: {args.rounds} append races and {args.index_rounds} index races "
                             f"(conditional), {args.baseline_rounds} of each (baseline); cases cycled: "
                             f"{', '.join(c[0] for c in LOG_CASES + CASES)}",
                 baseline="main's protocol (read-compare-write CURRENT, prune of unfinished versions below "
                          "CURRENT), same run, same cases", filtering="none")
    for store_name in sorted({r["store"] for r in rows}):
        mine = [r for r in rows if r["store"] == store_name and r["protocol"] == "conditional"]
        lost, bad = sum(r["lost"] for r in mine), sum(r["bad_current"] for r in mine)
        record.add_headline(f"publish races ({store_name})", "0 lost acknowledged writes, 0 bad CURRENTs "
                            "over >= 200 races", f"{lost} lost, {bad} bad CURRENT over "
                            f"{sum(r['races'] for r in mine)} races",
                            "yes" if lost == bad == 0 and sum(r["races"] for r in mine) >= 200 else "no")
    record.write(args.json)


if __name__ == "__main__":
    raise SystemExit(main())
