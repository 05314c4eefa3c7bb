"""Nightly reindex: delta detection, lock, crash safety, and incremental == full rebuild.

One module-scoped scenario runs the real pipeline (Ray ingest → Ray Data embed → FAISS) on a tiny synthetic
source: a first full run, then the source gains, changes, loses and breaks videos; a run killed after
``embed`` and one killed after ``index`` must leave the old version serving; the next run finishes; and a
from-scratch run over a copy of the new source must give the same index.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workflows import reindex as rx
from workflows.reindex import run as run_module
from workflows.reindex import scan as rx_scan

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": "clip4clip-meanP-tiny",
    "ingest": {"samples_per_shard": 4},
    "embed": {"batch_size": 4, "sampling": {"num_clips": 2, "frames_per_clip": 2}},
    "lock": {"ttl_s": 600, "heartbeat_s": 0.2},
}
MANIFEST_COLUMNS = ["video_id", "path", "captions", "split", "caption_class", "hard_group"]


def write_source(src: Path, corpus: Path, ids: list[str], extra: list[dict] | None = None) -> str:
    """Make ``src`` hold exactly the corpus videos ``ids`` (+ ``extra`` rows) and its manifest."""
    manifest = pd.read_parquet(corpus / "manifest.parquet")
    (src / "videos").mkdir(parents=True, exist_ok=True)
    rows = manifest[manifest.video_id.isin(ids)][MANIFEST_COLUMNS]
    for path in rows.path:
        if not (src / path).exists():
            shutil.copy(corpus / path, src / path)
    if extra:
        rows = pd.concat([rows, pd.DataFrame(extra)], ignore_index=True)
    rows.to_parquet(src / "manifest.parquet")
    return str(src / "manifest.parquet")


def index_snapshot(root: Path) -> dict:
    """{(video_id, clip_index): vector} of the CURRENT version, read back from FAISS."""
    from index import store

    _vdir, _meta, indexes, ids = store.load_version(root)
    out = {}
    for row in ids.to_pylist():
        vec = indexes[row["shard"]].reconstruct(int(row["id"]))
        out[(row["video_id"], row["clip_index"])] = np.asarray(vec, np.float32)
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from synthetic import generate_corpus

    base = tmp_path_factory.mktemp("reindex_corpora")
    generate_corpus(base / "a", n=12, seed=3, min_duration=2.0, max_duration=2.0, size=64, fps=10)
    generate_corpus(base / "b", n=1, seed=11, min_duration=2.0, max_duration=2.0, size=64, fps=10)
    return base / "a", base / "b"


@pytest.fixture(scope="module")
def scenario(corpora, ray_local, tmp_path_factory):
    """Run the whole story once; tests assert on what it recorded."""
    from index import VideoIndex, store

    corpus_a, corpus_b = corpora
    base = tmp_path_factory.mktemp("reindex")
    src, wd = base / "src", base / "wd"
    ids = [f"synth-{i:06d}" for i in range(12)]
    rec: dict = {"wd": wd}

    # Night 1: ten videos, full build.
    source = write_source(src, corpus_a, ids[:10])
    rec["run1"] = rx.run_reindex(source, wd, config=TINY, allow_random_init=True)
    rec["v1"] = store.read_current(wd / "index")
    rec["snap1"] = index_snapshot(wd / "index")

    # The source changes: +2 new, synth-000003 re-encoded with other content (same id and path),
    # synth-000005 deleted, and one broken file that ingest must reject.
    (src / "videos" / "synth-000005.mp4").unlink()
    time.sleep(0.01)
    shutil.copy(corpus_b / "videos" / "synth-000000.mp4", src / "videos" / "synth-000003.mp4")
    (src / "videos" / "broken.mp4").write_bytes(b"this is not a video" * 100)
    broken = {"video_id": "broken-000", "path": "videos/broken.mp4", "captions": ["nothing"], "split": "test",
              "caption_class": "x", "hard_group": "x"}
    live_ids = [i for i in ids if i != "synth-000005"]
    source = write_source(src, corpus_a, live_ids, extra=[broken])

    # Night 2 is killed twice: after embed, then after the index update (before validate/publish).
    for step in ("embed", "index"):
        os.environ[rx.CRASH_ENV] = step
        try:
            with pytest.raises(rx.SimulatedCrash):
                rx.run_reindex(source, wd, config=TINY, allow_random_init=True)
        finally:
            os.environ.pop(rx.CRASH_ENV, None)
        vx = VideoIndex.open(wd / "index")
        rec[f"after_crash_{step}"] = {
            "current": store.read_current(wd / "index"), "count": len(vx),
            "state_seq": json.loads((wd / "state" / "state.json").read_text())["seq"],
            "lock_exists": (wd / "reindex.lock").exists(),
        }
    rec["run2"] = rx.run_reindex(source, wd, config=TINY, allow_random_init=True)
    rec["snap2"] = index_snapshot(wd / "index")

    # Reference: a from-scratch run over a copy of the new source in a fresh workdir.
    src_copy = base / "src_copy"
    shutil.copytree(src, src_copy)
    rec["scratch"] = rx.run_reindex(str(src_copy / "manifest.parquet"), base / "wd_scratch", config=TINY,
                                    allow_random_init=True)
    rec["scratch_root"] = base / "wd_scratch" / "index"
    rec["source"] = source
    return rec


# --------------------------------------------------------------------------------------------- scenario
@pytest.mark.slow
def test_first_run_is_a_full_build(scenario):
    run1 = scenario["run1"]
    assert run1["full_build"] and run1["index_mode"] == "build"
    assert (run1["new"], run1["changed"], run1["deleted"]) == (10, 0, 0)
    assert run1["live_videos"] == 10 and run1["live_rows"] == 10 * 3  # 2 clips + 1 video row each
    assert len(scenario["snap1"]) == 30
    assert run1["validation"]["recall"] >= 0.9
    assert all(q["ok"] for q in run1["validation"]["known_queries"])


@pytest.mark.slow
def test_killed_runs_leave_the_old_version_serving_and_the_next_run_finishes(scenario):
    v1 = scenario["v1"]
    for step in ("embed", "index"):
        after = scenario[f"after_crash_{step}"]
        assert after["current"] == v1, step
        assert after["count"] == 30, step
        assert after["state_seq"] == 1, step  # state only advances after publish
        assert not after["lock_exists"], step  # an exception (not a hard kill) releases the lock
    run2 = scenario["run2"]
    assert run2["version"] != v1 and run2["run"] == 2
    # The killed runs' work is reused: ingest skips its finished shards, embed has nothing left to do.
    assert run2["ingest"]["shards_written"] == 0 and run2["ingest"]["shards_skipped"] >= 1
    assert run2["embed"]["videos"] == 0


@pytest.mark.slow
def test_incremental_reindex_equals_full_rebuild(scenario):
    from index import VideoIndex

    run2 = scenario["run2"]
    assert run2["index_mode"] == "incremental"
    assert (run2["new"], run2["changed"], run2["deleted"], run2["unchanged"]) == (3, 1, 1, 8)
    assert run2["failed_ids"] == ["broken-000"]
    assert run2["rows_added"] == 9 and run2["rows_removed"] == 6  # 2 new + 1 changed in, 1 deleted + old out
    snap2 = scenario["snap2"]
    ref = index_snapshot(scenario["scratch_root"])
    assert set(snap2) == set(ref)
    assert {v for v, _ in snap2} == {f"synth-{i:06d}" for i in range(12) if i != 5}
    for key in ref:
        np.testing.assert_allclose(snap2[key], ref[key], atol=1e-5, err_msg=str(key))
    # The changed video really changed.
    assert not np.allclose(scenario["snap1"][("synth-000003", -1)], snap2[("synth-000003", -1)], atol=1e-3)
    inc, full = VideoIndex.open(scenario["wd"] / "index"), VideoIndex.open(scenario["scratch_root"])
    rng = np.random.default_rng(0)
    queries = np.concatenate([
        np.stack([ref[(f"synth-{i:06d}", -1)] for i in (0, 3, 10)]),
        rng.standard_normal((3, inc.dim)).astype(np.float32),
    ])
    for hits_inc, hits_full in zip(inc.search(queries, k=5), full.search(queries, k=5)):
        assert [h.video_id for h in hits_inc] == [h.video_id for h in hits_full]
        np.testing.assert_allclose([h.score for h in hits_inc], [h.score for h in hits_full], atol=1e-5)


@pytest.mark.slow
def test_rebuild_when_needs_retrain_uses_only_live_rows(scenario, tmp_path):
    """A rebuild reads old part files that still hold rows of deleted or re-encoded videos: drop them."""
    wd = tmp_path / "wd"
    shutil.copytree(scenario["wd"], wd)
    src = Path(scenario["source"]).parent
    manifest = pd.read_parquet(src / "manifest.parquet")
    smaller = src / "manifest_without_10.parquet"
    manifest[manifest.video_id != "synth-000010"].to_parquet(smaller)
    cfg = {**TINY, "index": {"growth_factor": 0.5}}  # any index > half its build size gets rebuilt
    run = rx.run_reindex(str(smaller), wd, config=cfg, allow_random_init=True)
    assert run["index_mode"] == "rebuild" and run["retrain_reasons"]
    assert (run["deleted"], run["rows_removed"]) == (1, 3) and "ingest" not in run
    snap = index_snapshot(wd / "index")
    expected = {k: v for k, v in scenario["snap2"].items() if k[0] != "synth-000010"}
    assert set(snap) == set(expected)  # no rows of synth-000005 or of synth-000003's old content
    for key, vec in expected.items():
        np.testing.assert_allclose(snap[key], vec, atol=1e-5)
    from index import store

    meta = json.loads((Path(store.version_dir(wd / "index")) / "index.json").read_text())
    assert meta["operation"] == "build" and meta["reindex"]["mode"] == "rebuild"


@pytest.mark.slow
def test_unchanged_source_is_a_noop_and_failed_videos_are_not_retried(scenario):
    wd = scenario["wd"]
    before = (wd / "index" / "CURRENT").read_text()
    run3 = rx.run_reindex(scenario["source"], wd, config=TINY, allow_random_init=True)
    assert run3["index_mode"] == "none" and run3["version"] == before.strip()
    assert (run3["new"], run3["changed"], run3["deleted"]) == (0, 0, 0)
    assert "ingest" not in run3 and "embed" not in run3
    state = json.loads((wd / "state" / "state.json").read_text())
    assert state["seq"] == 3 and "broken-000" in state["failed"]
    assert state["failed"]["broken-000"]["stage"] == "ingest"


@pytest.mark.slow
def test_hard_killed_cli_run_leaves_a_stale_lock_that_the_next_run_takes_over(scenario):
    """`python -m jobs.reindex` dying by os._exit (no cleanup) leaves its lock; the next run takes it over."""
    wd = scenario["wd"]
    before = (wd / "index" / "CURRENT").read_text()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[rx.CRASH_ENV] = "scan"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.reindex", "--source", scenario["source"], "--workdir", str(wd),
         "--model", "clip4clip-meanP-tiny", "--allow-random-init", "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "simulated crash after step 'scan'" in proc.stderr
    lock = json.loads((wd / "reindex.lock").read_text())
    assert lock["hostname"] == socket.gethostname() and lock["pid"] != os.getpid()
    run = rx.run_reindex(scenario["source"], wd, config=TINY, allow_random_init=True)
    assert run["lock_taken_over"]["pid"] == lock["pid"]
    assert "not running" in run["lock_taken_over"]["reason"]
    assert (wd / "index" / "CURRENT").read_text() == before
    assert not (wd / "reindex.lock").exists()


@pytest.mark.slow
def test_reindex_builds_what_a_hand_build_builds(corpora, ray_local, tmp_path):
    """A recipe that asks for moments: the nightly run embeds windows and caption text and tunes on text, as
    `jobs.embed --with-text --windows` + `jobs.index build` over the same shards do by hand."""
    from index import store
    from index.moments import WINDOW_CLIP_BASE
    from jobs import embed as embed_job
    from jobs import index as index_job

    ids = [f"synth-{i:06d}" for i in range(4)]
    source = write_source(tmp_path / "src", corpora[0], ids)
    cfg = {**TINY, "embed": {**TINY["embed"], "windows": True, "with_text": True}}
    run = rx.run_reindex(source, tmp_path / "wd", config=cfg, allow_random_init=True, progress=False)
    assert run["build"] == {"distributed": False, "rows": run["live_rows"], "tuned_on": "text"}
    shards = str(tmp_path / "wd" / "ingest" / "run-000001")
    assert embed_job.main(["--shards", shards, "--model", TINY["model"], "--allow-random-init",
                           "--output", str(tmp_path / "hand_emb"), "--batch-size", "4",
                           "--num-clips", "2", "--frames-per-clip", "2", "--with-text", "--windows"]) == 0
    partition = next((tmp_path / "hand_emb").glob("model_id=*"))
    assert index_job.main(["build", "--embeddings", str(partition), "--output", str(tmp_path / "hand")]) == 0
    nightly_dir, hand_dir = store.version_dir(tmp_path / "wd" / "index"), store.version_dir(tmp_path / "hand")
    nightly, hand = store.read_meta(nightly_dir), store.read_meta(hand_dir)
    for key in ("factory", "count", "dim", "model_id", "search_params", "num_shards"):
        assert nightly[key] == hand[key], key
    assert nightly["tuning_queries"]["kind"] == hand["tuning_queries"]["kind"] == "text"
    assert nightly["tuning_queries"]["count"] == hand["tuning_queries"]["count"] > 0
    rows = {name: store.read_ids(vdir).select(["video_id", "clip_index"]).to_pylist()
            for name, vdir in (("nightly", nightly_dir), ("hand", hand_dir))}
    assert sorted(map(str, rows["nightly"])) == sorted(map(str, rows["hand"]))
    windows = [r for r in rows["nightly"] if r["clip_index"] >= WINDOW_CLIP_BASE]
    assert {r["video_id"] for r in windows} == set(ids)


# ------------------------------------------------------------------------------------------ unit: lock
def _write_lock(path: Path, **fields) -> None:
    now = time.time()
    record = {"pid": os.getpid(), "hostname": socket.gethostname(), "started": now, "heartbeat": now,
              "token": "someone-else", **fields}
    path.write_text(json.dumps(record))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_live_lock_refuses_a_second_run(tmp_path):
    lock_path = tmp_path / "reindex.lock"
    with rx.RunLock(lock_path, ttl_s=60, heartbeat_s=0.05) as held:
        with pytest.raises(rx.LockHeldError, match="another reindex is running.*pid"):
            rx.RunLock(lock_path, ttl_s=60).acquire()
        first = json.loads(lock_path.read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads(lock_path.read_text())["heartbeat"] > first  # heartbeat thread refreshes it
        assert json.loads(lock_path.read_text())["token"] == held.token
    assert not lock_path.exists()
    # A live holder on another host with a fresh heartbeat also refuses.
    _write_lock(lock_path, hostname="other-host", pid=1)
    with pytest.raises(rx.LockHeldError, match="other-host"):
        rx.RunLock(lock_path, ttl_s=60).acquire()


def test_lock_held_makes_the_cli_exit_nonzero(tmp_path):
    _write_lock(tmp_path / "reindex.lock")  # our own live pid on this host
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.reindex", "--source", str(tmp_path / "none.csv"), "--workdir",
         str(tmp_path), "--allow-random-init"], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3
    assert "another reindex is running" in proc.stderr and str(os.getpid()) in proc.stderr


def test_shipped_config_refuses_until_a_trained_model_is_set(tmp_path):
    """configs/reindex.yaml names a placeholder checkpoint URI: the nightly job fails clearly (exit 2, the
    config key named) and never builds the production index with a random model."""
    base = [sys.executable, "-m", "jobs.reindex", "--source", str(tmp_path / "none.csv"), "--workdir",
            str(tmp_path / "wd")]
    proc = subprocess.run([*base, "--config", str(ROOT / "configs" / "reindex.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "placeholder" in proc.stderr and "`pretrained`" in proc.stderr and "--pretrained" in proc.stderr
    proc = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=120)  # no config at all
    assert proc.returncode == 2 and "--allow-random-init" in proc.stderr
    assert not (tmp_path / "wd" / "index").exists()


@pytest.mark.parametrize("stale", ["dead_pid", "old_heartbeat"])
def test_stale_lock_is_taken_over(tmp_path, stale):
    lock_path = tmp_path / "reindex.lock"
    if stale == "dead_pid":
        _write_lock(lock_path, pid=_dead_pid())
    else:
        _write_lock(lock_path, hostname="other-host", pid=1, heartbeat=time.time() - 120)
    lock = rx.RunLock(lock_path, ttl_s=60, heartbeat_s=10)
    lock.acquire()
    try:
        assert lock.took_over is not None
        assert ("not running" if stale == "dead_pid" else "heartbeat") in lock.took_over["reason"]
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not lock_path.exists()


def test_release_never_removes_someone_elses_lock(tmp_path):
    lock_path = tmp_path / "reindex.lock"
    lock = rx.RunLock(lock_path, ttl_s=60, heartbeat_s=10)
    lock.acquire()
    _write_lock(lock_path, token="taken-over-by-another-run")
    lock.release()
    assert json.loads(lock_path.read_text())["token"] == "taken-over-by-another-run"


# ------------------------------------------------------------------------------------ unit: scan, delta
def test_scan_hashes_once_and_detects_content_changes(tmp_path, monkeypatch):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name, data in (("a", b"aaa"), ("b", b"bbb"), ("c", b"ccc")):
        (videos / f"{name}.mp4").write_bytes(data)
    calls = []
    real_hash = rx_scan.hash_file
    monkeypatch.setattr(rx_scan, "hash_file", lambda uri: calls.append(uri) or real_hash(uri))
    found, problems, cache = rx.scan_source(str(videos / "*.mp4"), {}, progress=False)
    assert sorted(found) == ["a", "b", "c"] and not problems and len(calls) == 3
    import hashlib

    assert found["a"]["source_sha256"] == hashlib.sha256(b"aaa").hexdigest()
    state = {"videos": {v: {"source_sha256": r["source_sha256"]} for v, r in found.items()}, "failed": {}}

    calls.clear()
    found2, _, cache2 = rx.scan_source(str(videos / "*.mp4"), cache, progress=False)
    assert calls == []  # (path, size, mtime) unchanged: every hash came from the cache
    assert rx.compute_delta(found2, [], state).counts()["unchanged"] == 3

    # b: same bytes rewritten (new mtime) -> re-hashed but unchanged; c: new content; a: deleted; d: new.
    time.sleep(0.01)
    (videos / "b.mp4").write_bytes(b"bbb")
    (videos / "c.mp4").write_bytes(b"CCC")
    (videos / "a.mp4").unlink()
    (videos / "d.mp4").write_bytes(b"ddd")
    found3, _, _ = rx.scan_source(str(videos / "*.mp4"), cache2, progress=False)
    assert sorted(Path(c).name for c in calls) == ["b.mp4", "c.mp4", "d.mp4"]
    delta = rx.compute_delta(found3, [], state)
    assert (delta.new, delta.changed, delta.deleted, delta.unchanged) == (["d"], ["c"], ["a"], ["b"])


def test_delta_keeps_unreadable_known_videos_and_skips_old_failures(tmp_path):
    state = {"videos": {"a": {"source_sha256": "1"}, "gone": {"source_sha256": "2"}},
             "failed": {"bad": {"source_sha256": "3"}}}
    videos = {"bad": {"source_sha256": "3"}, "new": {"source_sha256": "4"}}
    problems = [{"video_id": "a", "reason": "unreadable"}]
    delta = rx.compute_delta(videos, problems, state)
    assert delta.unavailable == ["a"] and delta.deleted == ["gone"] and delta.new == ["new"]
    assert rx.compute_delta(videos, problems, state, retry_failed=True).new == ["bad", "new"]
    videos["bad"]["source_sha256"] = "changed"
    assert rx.compute_delta(videos, problems, state).changed == ["bad"]


def test_bad_workdir_and_config_are_clear_errors(tmp_path):
    wd = rx.Workdir("s3://bucket/reindex")  # any store: state, lock and index are URIs on it
    assert wd.lock == "s3://bucket/reindex/reindex.lock" and wd.index == "s3://bucket/reindex/index"
    with pytest.raises(rx.ReindexInputError, match="placeholder"):
        rx.check_pretrained(rx.load_config(ROOT / "configs" / "reindex.yaml")["pretrained"])
    with pytest.raises(rx.ReindexInputError, match="set `pretrained:`"):
        rx.check_pretrained(None)
    rx.check_pretrained(None, allow_random_init=True)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("modle: x\n")
    with pytest.raises(rx.ReindexInputError, match="unknown reindex config key 'modle'"):
        rx.load_config(cfg)
    loaded = rx.load_config(ROOT / "configs" / "reindex.yaml")
    assert loaded["index"]["keep"] >= 1 and loaded["model"]


# ------------------------------------------------------------------------------------- unit: run steps
def _run(tmp_path: Path, **fields) -> rx.ReindexRun:
    """A prepared run without building a model (fast tier): state and delta are given."""
    base = dict(source="src.csv", wd=rx.Workdir(tmp_path / "wd"), cfg=rx.load_config(None), model="m",
                pretrained=None, seq=2, model_id="m@0", full=False, progress=False,
                state={"format": "vidsift-reindex-1", "seq": 1, "videos": {}, "failed": {}})
    return rx.ReindexRun(**{**base, **fields})


def test_steps_are_skipped_when_there_is_nothing_to_do(tmp_path):
    run = _run(tmp_path, delta=rx.Delta(unchanged=["a"]))
    assert [s for s in rx.STEPS if run_module.step_wanted(run, s)] == ["scan", "index"]
    run.delta.new.append("b")
    run.mode = "incremental"
    assert [s for s in rx.STEPS if run_module.step_wanted(run, s)] == list(rx.STEPS)


def test_live_set_keeps_unchanged_videos_and_records_failures(tmp_path):
    state = {"format": "vidsift-reindex-1", "seq": 1,
             "videos": {"a": {"source": "a.mp4", "source_sha256": "1", "sha256": "x", "rows": 3},
                        "gone": {"source": "g.mp4", "source_sha256": "2", "sha256": "y", "rows": 3}},
             "failed": {"old": {"source": "o.mp4", "source_sha256": "5", "stage": "ingest"}}}
    videos = {v: {"source": f"{v}.mp4", "source_sha256": s} for v, s in
              (("a", "1"), ("new", "3"), ("lost", "4"), ("old", "5"))}
    run = _run(tmp_path, state=state, videos=videos,
               delta=rx.Delta(new=["lost", "new"], deleted=["gone"], unchanged=["a"]),
               failed={"new": {"stage": "embed", "reason": "decode_failure", "message": "m"}})
    run_module.collect_live_set(run)
    assert set(run.live_records) == {"a"} and run.remove == ["gone"]
    assert run.failed["lost"]["reason"] == "missing_from_shards"
    assert set(run.failed_records) == {"new", "lost", "old"}  # an old failure that was not retried stays
    assert (run.summary["rows_added"], run.summary["rows_removed"]) == (0, 3)
    assert run.summary["failed_ids"] == ["lost", "new"]
    run.remove = []  # nothing to add or remove: the index stays as it is
    run_module.update_scratch_index(run)
    assert run.mode == "none" and run.summary["index_mode"] == "none" and run.live_rows is None
    run.live_records = {}
    with pytest.raises(rx.ReindexError, match="nothing to index"):
        run_module.update_scratch_index(run)


def test_commit_state_advances_the_state_only_at_the_end(tmp_path):
    run = _run(tmp_path, live_records={"a": {"sha256": "x", "rows": 3}}, current="v1")
    Path(run.wd.staging).mkdir(parents=True)
    run_module.commit_state(run)
    state = json.loads(Path(run.wd.state).read_text())
    assert state["seq"] == 2 and state["index_version"] == "v1" and state["videos"] == run.live_records
    assert run.summary["live_rows"] == 3 and not Path(run.wd.staging).exists()
    assert run.wd.read_state()["seq"] == 2


def test_incremental_deletes_compact_the_scratch_index_past_the_threshold(tmp_path):
    """Deletes tombstone rows in the scratch copy; past ``index.compact_threshold`` the run compacts it, and
    the published version holds its own files (a scratch version's references are resolved by the copy)."""
    from index import VideoIndex, build_index, store
    from index.testing import clustered_vectors, write_embeddings

    vecs = clustered_vectors(60, 8, seed=2)
    run = _run(tmp_path)
    build_index(write_embeddings(tmp_path / "emb", vecs, clips_per_video=2, model_id="m@0"), run.wd.index,
                factory="Flat", progress=False)
    run.remove = ["vid-000000", "vid-000001"]  # 4 of 60 rows: below 20 %, tombstones stay
    run_module.update_incrementally(run)
    assert "compacted" not in run.summary
    assert store.read_meta(store.version_dir(str(run.scratch)))["tombstones"]["count"] == 4
    run_module.step_publish(run)
    live = store.read_meta(store.version_dir(run.wd.index))
    assert live["tombstones"]["count"] == 4 and all("version" not in r for r in live["files"].values())
    assert len(VideoIndex.open(run.wd.index)) == 56
    run.seq += 1
    run.remove = [f"vid-{v:06d}" for v in range(2, 10)]  # 16 more: 20 of 60 rows
    run_module.update_incrementally(run)
    assert run.summary["compacted"]["dropped_rows"] == 20
    run_module.step_publish(run)
    index = VideoIndex.open(run.wd.index)
    assert len(index) == index.indexes[0].ntotal == 40 and "tombstones" not in index.meta
    assert not {f"vid-{v:06d}" for v in range(10)} & {h.video_id for h in index.search(vecs[:20], k=5)[0]}


def test_full_build_is_distributed_past_the_threshold_and_tunes_on_live_captions(ray_local, tmp_path):
    """``index.distributed_rows`` live rows make the full build a distributed one (on-disk lists, Ray
    tasks); fewer build in process. Both tune on the caption text of the live videos only."""
    import pyarrow as pa

    from index import store
    from index.testing import clustered_vectors, write_embeddings
    from runtime import storage

    vecs = clustered_vectors(3000, 16, seed=4)
    run = _run(tmp_path, model_id="m_0", full=True)
    write_embeddings(run.wd.embeddings, vecs, clips_per_video=3, model_id="m_0")
    parts = sorted(Path(run.partition).glob("part-*"))
    run.live_rows = pa.concat_tables([storage.read_parquet(p) for p in parts])
    run.live_records = {f"vid-{v:06d}": {} for v in range(1, 1000)}  # vid-000000 was deleted
    rng = np.random.default_rng(0)
    text = pa.table({"video_id": [f"vid-{v:06d}" for v in range(1000)],
                     "caption": [f"caption {v}" for v in range(1000)],
                     "embedding": (vecs[::3] + rng.normal(size=(1000, 16))).astype(np.float32).tolist()})
    storage.write_parquet(text, str(Path(run.wd.embeddings) / "_text" / "model_id=m_0" / "part-000.parquet"))
    run.cfg["index"].update(distributed_rows=3000, slice_rows=1000, factory="IVF16,Flat")
    built = {}
    for threshold in (3000, 3001):
        run.cfg["index"]["distributed_rows"] = threshold
        run_module.rebuild_from_live_rows(run)
        built[threshold] = (dict(run.summary["build"]), store.read_meta(store.version_dir(str(run.scratch))))
    (dist_summary, dist), (local_summary, local) = built[3000], built[3001]
    assert dist_summary == {"distributed": True, "rows": 3000, "tuned_on": "text"}
    assert local_summary == {"distributed": False, "rows": 3000, "tuned_on": "text"}
    assert "ivfdata" in dist["shards"][0] and "ivfdata" not in local["shards"][0]
    for meta in (dist, local):
        assert meta["factory"] == "IVF16,Flat" and meta["count"] == 3000
        assert meta["tuning_queries"]["kind"] == "text"
        assert meta["tuning_queries"]["captions"]["distinct"] == 999  # not the deleted video's caption
    assert dist["search_params"] == local["search_params"]
