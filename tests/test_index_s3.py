"""FAISS index versions on a real S3 HTTP API (moto server): build / add / delete / prune on s3, CURRENT
written last, VideoIndex.open("s3://...") on verified local copies, and the reindex lock and workdir on s3."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pytest

from index import (
    CorruptIndexError,
    VideoIndex,
    add_embeddings,
    build_index,
    delete_videos,
    store,
)
from index.embeddings import resolve_embeddings
from index.testing import clustered_vectors, write_embeddings
from runtime import storage

DIM = 16


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _emb(root: str, n: int = 300, start: int = 0, prefix: str = "vid", seed: int = 0, **kw) -> str:
    vectors = clustered_vectors(n, DIM, seed=seed)
    return write_embeddings(root, vectors, start_id=start, video_prefix=prefix, rows_per_file=100, **kw)


def test_build_on_s3_matches_local_and_records_checksums(s3_bucket, tmp_path, cache):
    emb_s3 = _emb(f"{s3_bucket}/emb")
    emb_local = _emb(str(tmp_path / "emb"))
    # Error tables and cards beside the parts (old and new layouts) are never read as data.
    part_dir = storage.list_dirs(emb_s3)[0]
    bad = pa.table({"id": [1], "reason": ["x"]})
    storage.write_parquet(bad, storage.join(part_dir, "_errors.parquet"))
    storage.write_parquet(bad, storage.join(part_dir, "_errors", "part-000000.parquet"))
    storage.write_parquet(bad, storage.join(part_dir, "errors.parquet"))
    source = resolve_embeddings(emb_s3)
    assert source.num_rows == 300 and all(storage.name(f).startswith("part-") for f in source.files)

    idx = f"{s3_bucket}/idx"
    meta = build_index(emb_s3, idx, factory="Flat", progress=False)
    local = build_index(emb_local, tmp_path / "idx", factory="Flat", progress=False)
    assert storage.read_text(f"{idx}/CURRENT").strip() == meta["version"]
    vdir = store.version_dir(idx)
    recorded = store.read_meta(vdir)["files"]
    assert set(recorded) == {"index.faiss", "ids.arrow", "probe.npz"}
    for name, rec in recorded.items():
        data = storage.read_bytes(f"{vdir}/{name}")
        assert len(data) == rec["size"]
        assert hashlib.sha256(data).hexdigest() == rec["sha256"]
    staged = [p for p in Path(tempfile.gettempdir()).glob(f"vidsift-index-{meta['version']}-*")]
    assert not staged  # the local staging folder of an s3 publish is removed after it

    remote, here = VideoIndex.open(idx), VideoIndex.open(tmp_path / "idx")
    assert remote.version == meta["version"] and len(remote) == len(here) == local["count"] == 300
    queries = clustered_vectors(5, DIM, seed=9)
    for a, b in zip(remote.search(queries, k=5), here.search(queries, k=5)):
        assert [h.video_id for h in a] == [h.video_id for h in b]
    # The local copies are in the cache, not next to anything else.
    assert any(cache.rglob("index.faiss"))


def test_add_delete_prune_on_s3(s3_bucket, cache):
    idx = f"{s3_bucket}/idx"
    v1 = build_index(_emb(f"{s3_bucket}/e1", n=200), idx, factory="Flat", keep=2, progress=False)["version"]
    more = _emb(f"{s3_bucket}/e2", n=50, start=10_000, prefix="new", seed=1)
    v2 = add_embeddings(idx, more, keep=2, progress=False)
    assert v2["count"] == 250 and v2["parent_version"] == v1
    v3 = delete_videos(idx, ["new-000000", "new-000001", "nope"], keep=2)
    assert v3["count"] == 248 and v3["last_operation"]["not_found"] == ["nope"]
    assert store.list_versions(idx) == [v2["version"], v3["version"]]  # keep=2 pruned v1
    assert not storage.exists(store.version_uri(idx, v1))
    vi = VideoIndex.open(idx)
    assert vi.version == v3["version"] and len(vi) == 248
    hits = vi.search(clustered_vectors(1, DIM, seed=1)[0], k=3)
    assert "new-000000" not in {h.video_id for h in hits}
    old = VideoIndex.open(idx, version=v2["version"])  # a retained version still opens
    assert len(old) == 250


def test_text_query_needs_weights_unless_random_init_is_allowed(s3_bucket, cache):
    import models

    with pytest.warns(models.RandomInitWarning):
        model, _, _ = models.create_inference_model("clip4clip-meanP-tiny", allow_random_init=True)
    dim = int(model.encode_text(["x"]).shape[-1])
    vectors = clustered_vectors(40, dim, seed=3)
    emb = write_embeddings(f"{s3_bucket}/emb", vectors, model_id=model.model_id,
                           model_name="clip4clip-meanP-tiny")
    idx = f"{s3_bucket}/idx"
    build_index(emb, idx, factory="Flat", progress=False)
    with pytest.raises(models.MissingWeightsError, match="--pretrained"):
        VideoIndex.open(idx).search("a red circle", k=3)
    with pytest.warns(models.RandomInitWarning):
        hits = VideoIndex.open(idx, allow_random_init=True).search("a red circle", k=3)
    assert len(hits) == 3


def test_corrupt_copies_are_detected_by_checksum(s3_bucket, cache, monkeypatch):
    idx = f"{s3_bucket}/idx"
    build_index(_emb(f"{s3_bucket}/emb", n=100), idx, factory="Flat", progress=False)
    expected = [h.video_id for h in VideoIndex.open(idx).search(clustered_vectors(1, DIM, seed=4)[0], k=3)]
    cached = next(cache.rglob("index.faiss"))
    cached.write_bytes(b"garbage" * 100)  # a damaged cache entry is re-downloaded, not used
    again = VideoIndex.open(idx)
    assert [h.video_id for h in again.search(clustered_vectors(1, DIM, seed=4)[0], k=3)] == expected
    assert cached.read_bytes() != b"garbage" * 100
    vdir = store.version_dir(idx)
    storage.write_bytes(f"{vdir}/ids.arrow", b"not the published bytes")  # the object itself changed
    monkeypatch.setenv(storage.CACHE_ENV, str(cache.parent / "fresh-cache"))  # (verified copies are reused)
    with pytest.raises(CorruptIndexError, match="ids.arrow.*sha256"):
        VideoIndex.open(idx)


def test_readers_never_see_a_partial_version(s3_bucket, cache, monkeypatch):
    """While a version's files are uploaded, CURRENT still names the old complete version; a publish that
    dies half way leaves CURRENT alone and removes its partial prefix."""
    idx = f"{s3_bucket}/idx"
    v1 = build_index(_emb(f"{s3_bucket}/e1", n=120), idx, factory="Flat", progress=False)["version"]
    seen = []
    real_upload = store.upload_file

    def probing_upload(local, root, version, name):
        vi = VideoIndex.open(idx)  # a reader in the middle of the publish
        seen.append((name, vi.version, len(vi)))
        return real_upload(local, root, version, name)

    monkeypatch.setattr(store, "upload_file", probing_upload)
    more = _emb(f"{s3_bucket}/e2", n=30, start=5000, prefix="new", seed=2)
    v2 = add_embeddings(idx, more, progress=False)["version"]
    assert len(seen) >= 3 and all(v == v1 and n == 120 for _, v, n in seen)
    assert VideoIndex.open(idx).version == v2

    calls = []

    def dying_upload(local, root, version, name):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("network gone")
        return real_upload(local, root, version, name)

    monkeypatch.setattr(store, "upload_file", dying_upload)
    with pytest.raises(OSError, match="network gone"):
        delete_videos(idx, ["new-000000"])
    assert store.read_current(idx) == v2 and store.list_versions(idx) == [v1, v2]
    assert store.list_versions(idx, complete=False) == [v1, v2]  # the partial prefix is gone


def test_sharded_ray_build_writes_shards_to_s3(s3_bucket, cache, ray_local):
    idx = f"{s3_bucket}/idx"
    meta = build_index(_emb(f"{s3_bucket}/emb", n=200), idx, factory="Flat", shards=2, progress=False)
    files = store.read_meta(store.version_dir(idx))["files"]
    assert {"shard-00000.faiss", "shard-00001.faiss"} <= set(files) and meta["num_shards"] == 2
    assert len(VideoIndex.open(idx)) == 200


def test_reindex_lock_on_s3(s3_bucket):
    from workflows.reindex import LockHeldError, LockLostError, RunLock

    path = f"{s3_bucket}/wd/reindex.lock"
    first, second = RunLock(path, ttl_s=60, heartbeat_s=0.1), RunLock(path, ttl_s=60)
    first.acquire()
    try:
        with pytest.raises(LockHeldError, match="another reindex is running"):
            second.acquire()
        beat = json.loads(storage.read_bytes(path))["heartbeat"]
        time.sleep(0.5)
        assert json.loads(storage.read_bytes(path))["heartbeat"] > beat  # heartbeat rewrites the object
        first.check_held()
    finally:
        first.release()
    assert not storage.exists(path)
    # A stale holder on another host (old heartbeat) is taken over; the old holder then finds it lost.
    stale = {"pid": 1, "hostname": "other-host", "started": 0, "heartbeat": time.time() - 600, "token": "x"}
    storage.write_bytes(path, json.dumps(stale).encode())
    taker = RunLock(path, ttl_s=60, heartbeat_s=10)
    taker.acquire()
    try:
        assert "heartbeat" in taker.took_over["reason"]
        assert json.loads(storage.read_bytes(path))["pid"] == os.getpid()
        assert json.loads(storage.read_bytes(path))["hostname"] == socket.gethostname()
        loser = RunLock(path, ttl_s=60)
        loser.record, loser.token = dict(stale), "x"
        with pytest.raises(LockLostError, match="taken over"):
            loser.check_held()
    finally:
        taker.release()


@pytest.mark.slow
def test_reindex_with_workdir_on_s3(s3_bucket, synthetic_corpus, ray_local, tmp_path, cache):
    """A small nightly run: local source, workdir (state, lock, ingest, embeddings, index) on s3."""
    from workflows import reindex as rx

    config = {"model": "clip4clip-meanP-tiny", "ingest": {"samples_per_shard": 8},
              "embed": {"batch_size": 4, "sampling": {"num_clips": 2, "frames_per_clip": 2}},
              "validate": {"known_queries": 2}}
    wd = f"{s3_bucket}/reindex"
    source = str(synthetic_corpus / "manifest.parquet")
    run = rx.run_reindex(source, wd, config=config, allow_random_init=True, progress=False)
    assert run["index_mode"] == "build" and run["live_videos"] == 24
    assert storage.read_json(f"{wd}/state/state.json")["seq"] == 1
    assert not storage.exists(f"{wd}/reindex.lock") and not storage.exists(f"{wd}/staging")
    assert len(VideoIndex.open(f"{wd}/index")) == run["live_rows"]
    again = rx.run_reindex(source, wd, config=config, allow_random_init=True, progress=False)
    assert again["index_mode"] == "none" and again["version"] == run["version"]
