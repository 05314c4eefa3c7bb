"""Races on one index and its lock, on a local folder and on S3 (moto's server): writers released together
by a barrier, as threads and as processes (``jobs.index`` subprocesses too). A few rounds per case here;
``python -m bench.publish_race`` runs hundreds for the floor figure (docs/storage.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import publish_race as race
from index import store
from index.build import add_embeddings, build_index
from index.testing import clustered_vectors, write_embeddings
from runtime import storage

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


@pytest.fixture(scope="module")
def processes(s3_server):
    """Writer processes (2 and 4), spawned once for the module with the S3 server's configuration: each
    test's bucket is named in its arguments, so they serve every test."""
    saved = {k: os.environ.get(k) for k in s3_server}
    os.environ.update(s3_server)
    pools = {n: race.Processes(n) for n in (2, 4)}
    try:
        yield pools
    finally:
        for pool in pools.values():
            pool.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _runner(kind: str, n: int, request):
    """Threads, or the module's writer processes (spawned only when a test asks for them)."""
    return race.run_threads if kind == "threads" else request.getfixturevalue("processes")[n].run


# ---------------------------------------------------------------------------------- storage primitives
@pytest.mark.parametrize("kind", ["threads", "processes"])
@pytest.mark.parametrize("n", [2, 4])
def test_conditional_create_race_has_one_winner(base, kind, n, request):
    run = _runner(kind, n, request)
    for r in range(ROUNDS):
        uri = storage.join(base, "locks", f"{kind}-{n}-{r}.lock")
        results = run([(race.race_create, (uri, f"writer-{i}".encode())) for i in range(n)])
        assert sum(results) == 1, results
        assert storage.read_bytes(uri) == f"writer-{results.index(True)}".encode()


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_compare_and_swap_loses_no_increment(base, kind, request):
    """4 racers add 1 to one counter 8 times each by read + compare-and-swap: every increment survives,
    and the swaps that missed prove they really overlapped."""
    uri = storage.join(base, f"counter-{kind}")
    missed = _runner(kind, 4, request)([(race.race_increment, (uri, 8))] * 4)
    assert int(storage.read_bytes(uri)) == 32
    assert sum(missed) > 0, "the racers never overlapped: no race was tested"


@pytest.mark.parametrize("kind", ["threads", "processes"])
@pytest.mark.parametrize("n", [2, 4])
def test_lock_heartbeat_never_overwrites_a_successor(base, kind, n, request):
    """A holder beats in a loop while n-1 runs take its lock over: once one has, the holder's heartbeat
    fails from then on and the lock ends with a taker's token, never the holder's again."""
    run = _runner(kind, n, request)
    for r in range(ROUNDS):
        path = storage.join(base, f"wd-{kind}-{n}-{r}", "reindex.lock")
        holder, *takers = run([(race.race_lock_holder, (path, 1.0))]
                              + [(race.race_lock_taker, (path,))] * (n - 1))
        final = json.loads(storage.read_bytes(path))["token"]
        acquired = [t["token"] for t in takers if t["acquired"]]
        assert acquired, takers  # ttl_s=0: the holder's record is always stale
        assert final in acquired and final != holder["token"]
        assert holder["lost"] and not holder["beats"][-1]
        first_loss = holder["beats"].index(False)
        assert not any(holder["beats"][first_loss:]), "a heartbeat succeeded after the lock was lost"


def test_stores_without_conditional_writes_are_refused(tmp_path):
    uri = "memory://vidsift-race/locks/run.lock"
    with pytest.raises(storage.ConditionalWriteUnsupported, match="memory.*no conditional writes"):
        storage.create_exclusive(uri, b"x")
    with pytest.raises(storage.ConditionalWriteUnsupported, match="no conditional writes"):
        storage.compare_and_swap(uri, None, b"x")
    emb = write_embeddings(tmp_path / "emb", clustered_vectors(20, race.DIM, seed=1))
    with pytest.raises(store.ConditionalWriteUnsupported, match="cannot publish"):
        build_index(emb, "memory://vidsift-race/idx", factory="Flat", progress=False, text_queries=None)
    assert not storage.exists("memory://vidsift-race/idx/CURRENT")


def test_publish_requires_the_version_the_writer_read(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    with pytest.raises(TypeError, match="expected_current"):
        store.publish(tmp_path / "idx", stage, {}, "000001-x")


# -------------------------------------------------------------------------------------- publish races
@pytest.mark.parametrize("case", race.CASES, ids=[c[0] for c in race.CASES])
def test_publish_race(base, case, request):
    """Every case of the bench, once with retries off (losers must be refused) and once with n-1 retries (a
    writer loses only to another's success, so that is enough for all): no acknowledged write lost, no
    refused one live, no other error, CURRENT always opens."""
    name, kinds, in_processes = case
    bench = race.Race(base)
    runner = _runner("processes" if in_processes else "threads", len(kinds), request)
    results = [bench.round(name, kinds, runner, retries) for retries in (0, len(kinds) - 1)]
    for res in results:
        assert (res.lost, res.phantom, res.bad_current, res.unexpected) == ([], [], [], []), res
        assert res.versions_seen >= 1
    assert results[0].acked >= 1
    assert results[1].refused == 0 and results[1].acked == sum(k != "prune" for k in kinds)


def test_prune_never_removes_another_writers_staging(base):
    """A writer staging a version numbered below CURRENT (it started before two publishes) keeps its files
    through prunes; only an unfinished version idle past the retention age is a leftover to remove. Its
    publish is then refused, and CURRENT never names a version with missing files."""
    bench = race.Race(base)
    slow = store.new_version_name(bench.root)  # the slow writer's version, staged under versions/
    stage = store.staging_dir(bench.root, slow)
    (stage / "ids.parquet").write_bytes(b"staged")
    store.upload_file(stage / "ids.parquet", bench.root, slow, "ids.parquet")
    read_before = store.read_current(bench.root)
    for _ in range(2):
        add_embeddings(bench.root, bench._new_videos()[0], keep=1, progress=False)
    store.prune(bench.root, keep=1)
    assert slow in store.list_versions(bench.root, complete=False)
    assert storage.exists(storage.join(store.version_uri(bench.root, slow), "ids.parquet"))
    with pytest.raises(store.PublishConflict, match="CURRENT moved.*retry"):
        store.publish(bench.root, stage, {"dim": race.DIM, "count": 0, "shards": []}, slow,
                      expected_current=read_before)
    store.discard_stage(bench.root, stage, slow)  # what every writer does with a failed publish
    assert slow not in store.list_versions(bench.root, complete=False)
    leftover = store.new_version_name(bench.root) + "-dead"
    storage.write_bytes(storage.join(store.version_uri(bench.root, leftover), "ids.parquet"), b"x")
    assert leftover not in store.prune(bench.root, keep=1)  # fresh: maybe a live writer's
    assert leftover in store.prune(bench.root, keep=1, staging_age_s=0.0)
    store.load_version(bench.root)


# ------------------------------------------------------------------------------ jobs.index subprocesses
GATE = """
import os, sys, time
from jobs import index
open(sys.argv[1] + ".ready-" + str(os.getpid()), "w").close()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.001)
sys.exit(index.main(sys.argv[2:]))
"""


def _cli_race(argvs: list[list[str]], gate: Path) -> list[subprocess.CompletedProcess]:
    """``python -m jobs.index ARGV`` per argv, imports done first, then released together (a gate file)."""
    procs = [subprocess.Popen([sys.executable, "-c", GATE, str(gate), *argv], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in argvs]
    deadline = time.time() + 300
    while len(list(gate.parent.glob(gate.name + ".ready-*"))) < len(procs):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a writer died starting"
        time.sleep(0.05)
    gate.touch()
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return outs


@pytest.mark.parametrize("retries", [0, 2])
def test_jobs_index_add_race(base, tmp_path, retries):
    """The measurement of issue #24: two ``jobs.index add`` runs on one index, released together. Each
    exits 0 with its videos in the final version, or (no retries left) exits 4 saying retry, with none
    of its videos published."""
    bench = race.Race(base)
    sources = [bench._new_videos() for _ in range(2)]
    gate = tmp_path / f"gate-{retries}"
    outs = _cli_race([["add", "--embeddings", src, "--output", bench.root, "--retries", str(retries)]
                      for src, _videos in sources], gate)
    live = set(store.load_version(bench.root)[3].column("video_id").to_pylist())
    for out, (_src, videos) in zip(outs, sources):
        assert out.returncode in (0, 4), out.stderr[-2000:]
        if out.returncode == 0:
            assert set(videos) <= live
        else:
            assert "CURRENT moved" in out.stderr and "retry" in out.stderr
            assert not set(videos) & live
    assert any(out.returncode == 0 for out in outs)
    if retries:
        assert all(out.returncode == 0 for out in outs)
