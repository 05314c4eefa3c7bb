"""Index build / publish / incremental / sharded tests on small clustered embeddings (real FAISS, Ray)."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index import (
    CorruptIndexError,
    IndexNotFoundError,
    VideoIndex,
    add_embeddings,
    build_index,
    choose_factory,
    delete_videos,
    make_index,
    needs_retrain,
    sharded,
    store,
)
from index.factory import parse_memory
from index.rows import ROWS_FILE, public_columns, read_rows_table
from index.testing import clustered_vectors, embedding_schema, write_embeddings
from index.tuning import recall_at_k

DIM = 32


def exact_top(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(qn @ dbn.T), axis=1)[:, :k]


def test_choose_factory_tiers():
    gb = 1 << 30
    assert choose_factory(1_000, 512, 4 * gb, 0.95) == "Flat"
    assert choose_factory(50_000, 512, 4 * gb, 0.95).startswith("HNSW32")
    assert choose_factory(50_000, 512, 4 * gb, 0.8).startswith("HNSW16")
    assert choose_factory(1_000_000, 512, 4 * gb, 0.95) == "IVF2048,Flat"
    # Flat codes do not fit: fast-scan PQ, re-ranked against the float16 copy (tests/test_index_rerank.py)
    assert choose_factory(1_000_000, 512, int(1.5 * gb), 0.95) == "IVF2048,PQ128x4fs"
    assert choose_factory(10_000_000, 512, 2 * gb, 0.95) == "IVF8192_HNSW32,PQ128x4fs"
    # Without the re-rank copy (a distributed build): the SQ / OPQ+PQ tiers
    assert choose_factory(1_000_000, 512, int(1.5 * gb), 0.95, rerank=False).endswith(",SQfp16")
    assert choose_factory(1_000_000, 512, 700 * 2**20, 0.95, rerank=False).endswith(",SQ8")
    pq_factory = choose_factory(10_000_000, 512, 2 * gb, 0.95, rerank=False)
    assert pq_factory.startswith("OPQ") and "_HNSW32" in pq_factory and ",PQ" in pq_factory
    # Every choice is a valid factory string for make_index (the one parser).
    for factory in ("Flat", "HNSW32,Flat", "IVF64,SQ8", "OPQ16_64,IVF128_HNSW32,PQ16", "IVF64,PQ16x4fs"):
        assert make_index(factory, 64).d == 64
    with pytest.raises(ValueError, match="too small"):
        choose_factory(10_000_000, 512, 1000, 0.95)
    with pytest.raises(ValueError, match="invalid FAISS factory"):
        make_index("NotAnIndex42", 64)
    assert parse_memory("4GB") == 4 * 10**9 and parse_memory("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="memory budget"):
        parse_memory("lots")


def test_build_layout_metadata_and_recall(tmp_path):
    vecs = clustered_vectors(4000, DIM, seed=1)
    emb = write_embeddings(tmp_path / "emb", vecs, clips_per_video=4, model_id="toy@abc123",
                           model_name="clip4clip-meanP-tiny", pretrained="/ckpt.pt")
    meta = build_index(emb, tmp_path / "idx", factory="IVF64,Flat", recall_target=0.95, num_probes=100,
                       progress=False)
    vdir = tmp_path / "idx" / "versions" / meta["version"]
    assert (tmp_path / "idx" / "CURRENT").read_text().strip() == meta["version"]
    assert {"index.faiss", "ids.arrow", "index.json", "probe.npz"} <= set(os.listdir(vdir))
    on_disk = json.loads((vdir / "index.json").read_text())
    for field in ("factory", "metric", "dim", "model_id", "model_name", "pretrained", "count",
                  "search_params", "recall", "build_time_s", "sources", "training_size"):
        assert field in on_disk, field
    assert on_disk["factory"] == "IVF64,Flat" and on_disk["metric"] == "inner_product"
    assert on_disk["model_id"] == "toy@abc123" and on_disk["model_name"] == "clip4clip-meanP-tiny"
    assert on_disk["count"] == 4000 and on_disk["dim"] == DIM and len(on_disk["sources"]) == 4
    assert 0 < on_disk["training_size"] <= 4000
    assert on_disk["recall"] >= 0.95 and 1 <= on_disk["search_params"]["nprobe"] <= 64
    ids = store.read_ids(str(vdir)).to_pandas()
    assert len(ids) == 4000 and set(ids.columns) >= {"id", "video_id", "clip_index", "start_s", "end_s",
                                                     "captions"}
    # Independent check with fresh queries: the tuned nprobe reaches the target against numpy exact search.
    queries = clustered_vectors(200, DIM, seed=1)[:200] + 0.05
    index = VideoIndex.open(tmp_path / "idx")
    _, found = index.search_vectors(queries, 10)
    truth = exact_top(vecs, queries, 10)
    assert recall_at_k(found, truth, 10) >= 0.9
    # With nprobe=1 recall is clearly lower: tuning is doing something.
    index.indexes[0].nprobe = 1
    _, coarse = index.search_vectors(queries, 10)
    assert recall_at_k(coarse, truth, 10) < recall_at_k(found, truth, 10)


def test_bad_rows_become_error_records(tmp_path):
    vecs = clustered_vectors(300, DIM, seed=2)
    emb = write_embeddings(tmp_path / "emb", vecs, model_id="toy@abc")
    sub = next((tmp_path / "emb").iterdir())
    bad = [
        {"id": 5, "video_id": "dup", "embedding": vecs[0].tolist(), "model_id": "toy@abc"},  # duplicate id
        {"id": 9001, "video_id": "nan", "embedding": [float("nan")] * DIM, "model_id": "toy@abc"},
        {"id": 9002, "video_id": "zero", "embedding": [0.0] * DIM, "model_id": "toy@abc"},
        {"id": 9003, "video_id": "null", "embedding": None, "model_id": "toy@abc"},
        {"id": 9004, "video_id": "other", "embedding": vecs[1].tolist(), "model_id": "other@1"},
    ]
    schema = embedding_schema(DIM)
    table = pa.Table.from_pylist([{**{f.name: None for f in schema}, **r} for r in bad], schema=schema)
    pq.write_table(table, sub / "part-zzzz.parquet")
    meta = build_index(emb, tmp_path / "idx", progress=False)
    assert meta["count"] == 300 and meta["factory"] == "Flat" and meta["recall"] == 1.0
    errors = pq.read_table(tmp_path / "idx" / "versions" / meta["version"] / "errors.parquet").to_pylist()
    reasons = {e["video_id"]: e["reason"] for e in errors}
    assert reasons == {"dup": "duplicate_id", "nan": "bad_embedding", "zero": "bad_embedding",
                       "null": "bad_embedding", "other": "model_mismatch"}


def test_incremental_add_upsert_delete_and_retention(tmp_path):
    vecs = clustered_vectors(2000, DIM, seed=3)
    emb = write_embeddings(tmp_path / "emb", vecs, clips_per_video=2, model_id="toy@abc")
    first = build_index(emb, tmp_path / "idx", factory="IVF32,Flat", num_probes=64, keep=2, progress=False)
    first_count = first["count"]
    new_vecs = clustered_vectors(100, DIM, seed=4)
    new = write_embeddings(tmp_path / "new", new_vecs, clips_per_video=2, model_id="toy@abc",
                           start_id=10_000, video_prefix="new")
    added = add_embeddings(tmp_path / "idx", new, progress=False)
    assert added["count"] == first_count + 100 and added["parent_version"] == first["version"]
    assert added["training_size"] == first["training_size"]  # not retrained
    # The old version is untouched (copy + add), CURRENT points to the new one.
    old = VideoIndex.open(tmp_path / "idx", version=first["version"])
    assert len(old) == first_count
    current = VideoIndex.open(tmp_path / "idx")
    assert current.version == added["version"] and len(current) == first_count + 100
    hit = current.search(new_vecs[7], k=1)[0]
    assert hit.video_id == "new-000003" and hit.score > 0.99
    # Upsert: re-embedding video vid-000000 replaces its two rows.
    moved = np.stack([new_vecs[50], new_vecs[51]])
    upsert = write_embeddings(tmp_path / "upsert", moved, clips_per_video=2, model_id="toy@abc",
                              start_id=20_000, video_prefix="vid")
    up = add_embeddings(tmp_path / "idx", upsert, progress=False)
    assert up["count"] == first_count + 100 and up["last_operation"]["replaced"] == 2
    ids = store.read_ids(str(tmp_path / "idx" / "versions" / up["version"])).to_pandas()
    assert sorted(ids[ids.video_id == "vid-000000"].id.tolist()) == [20_000, 20_001]
    # Delete by video id.
    gone = delete_videos(tmp_path / "idx", ["new-000003", "no-such-video"])
    assert gone["count"] == first_count + 98 and gone["last_operation"]["not_found"] == ["no-such-video"]
    after = VideoIndex.open(tmp_path / "idx")
    assert all(h.video_id != "new-000003" for h in after.search(new_vecs[7], k=5))
    # Retention (keep=3 by default): the oldest version is pruned, the newest three remain.
    versions = store.list_versions(tmp_path / "idx")
    assert len(versions) == 3 and first["version"] not in versions and versions[-1] == gone["version"]
    # A different model's embeddings are refused.
    other = write_embeddings(tmp_path / "other", new_vecs[:4], model_id="other@1", start_id=50_000)
    with pytest.raises(ValueError, match="other@1"):
        add_embeddings(tmp_path / "idx", other, progress=False)


def test_hnsw_delete_rebuilds_graph(tmp_path):
    vecs = clustered_vectors(600, DIM, seed=5)
    emb = write_embeddings(tmp_path / "emb", vecs, model_id="toy@abc")
    build_index(emb, tmp_path / "idx", factory="HNSW16,Flat", num_probes=32, progress=False)
    meta = delete_videos(tmp_path / "idx", ["vid-000010"])
    assert meta["count"] == 599
    hits = VideoIndex.open(tmp_path / "idx").search(vecs[10], k=3)
    assert "vid-000010" not in [h.video_id for h in hits]
    assert VideoIndex.open(tmp_path / "idx").search(vecs[11], k=1)[0].video_id == "vid-000011"


def test_needs_retrain_on_growth_and_recall(tmp_path):
    vecs = clustered_vectors(1500, DIM, seed=6)
    emb = write_embeddings(tmp_path / "emb", vecs, model_id="toy@abc")
    build_index(emb, tmp_path / "idx", factory="IVF32,Flat", num_probes=64, progress=False)
    needed, reasons = needs_retrain(tmp_path / "idx")
    assert not needed, reasons
    more = write_embeddings(tmp_path / "more", clustered_vectors(1700, DIM, seed=7), model_id="toy@abc",
                            start_id=100_000, video_prefix="more")
    add_embeddings(tmp_path / "idx", more, progress=False)
    needed, reasons = needs_retrain(tmp_path / "idx", growth_factor=2.0)
    assert needed and any("grew" in r for r in reasons)
    needed, reasons = needs_retrain(tmp_path / "idx", growth_factor=10.0, recall_target=1.01)
    assert needed and any("recall" in r for r in reasons)


def test_publish_is_atomic_and_errors_are_clear(tmp_path):
    with pytest.raises(IndexNotFoundError, match="does not exist"):
        VideoIndex.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError, match="no CURRENT"):
        VideoIndex.open(tmp_path / "empty")
    emb = write_embeddings(tmp_path / "emb", clustered_vectors(200, DIM, seed=8), model_id="toy@abc")
    meta = build_index(emb, tmp_path / "idx", progress=False)
    # A failed build leaves CURRENT and the published version untouched and no staging dir behind.
    with pytest.raises(ValueError, match="invalid FAISS factory"):
        build_index(emb, tmp_path / "idx", factory="Bogus99", progress=False)
    assert store.read_current(tmp_path / "idx") == meta["version"]
    assert not list((tmp_path / "idx" / "versions").glob(".tmp-*"))
    # Corruption is reported, not crashed on.
    vdir = tmp_path / "idx" / "versions" / meta["version"]
    (vdir / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(CorruptIndexError, match="could not be read"):
        VideoIndex.open(tmp_path / "idx")
    (vdir / "index.json").write_text("{not json")
    with pytest.raises(CorruptIndexError, match="not valid JSON"):
        VideoIndex.open(tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_index(tmp_path / "nope", tmp_path / "idx2", progress=False)


def test_sharded_build_with_ray_matches_exact(tmp_path, ray_local, monkeypatch):
    calls = []  # Ray comes from runtime.ray_connect.connect_ray (the cluster under `ray job submit`)
    real_connect = sharded.connect_ray
    monkeypatch.setattr(sharded, "connect_ray", lambda *a, **kw: calls.append(a) or real_connect(*a, **kw))
    vecs = clustered_vectors(1200, DIM, seed=9)
    emb = write_embeddings(tmp_path / "emb", vecs, clips_per_video=3, model_id="toy@abc", rows_per_file=300)
    meta = build_index(emb, tmp_path / "idx", factory="Flat", shards=3, num_probes=32, progress=False)
    assert len(calls) == 1
    vdir = tmp_path / "idx" / "versions" / meta["version"]
    assert meta["num_shards"] == 3 and {f"shard-0000{i}.faiss" for i in range(3)} <= set(os.listdir(vdir))
    assert sum(s["count"] for s in meta["shards"]) == 1200 and all(s["count"] > 0 for s in meta["shards"])
    assert not (vdir / sharded.PARTS_DIR).exists()  # the tasks' ids files: read into ids.arrow, then removed
    one = build_index(emb, tmp_path / "one", factory="Flat", num_probes=32, progress=False)

    def rows(root, version):
        table = read_rows_table(root / "versions" / version / ROWS_FILE)
        return public_columns(table).drop_columns(["shard"])

    assert rows(tmp_path / "idx", meta["version"]).equals(rows(tmp_path / "one", one["version"]))
    index = VideoIndex.open(tmp_path / "idx")
    queries = vecs[::97] + 0.1
    scores, found = index.search_vectors(queries, 10)
    truth = exact_top(vecs, queries, 10)
    assert recall_at_k(found, truth, 10) == 1.0  # exact shards merged by score == global exact search
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # Incremental add routes new videos to their shard; delete works across shards.
    new = write_embeddings(tmp_path / "new", clustered_vectors(30, DIM, seed=10), clips_per_video=3,
                           model_id="toy@abc", start_id=5000, video_prefix="new")
    added = add_embeddings(tmp_path / "idx", new, progress=False)
    assert added["count"] == 1230
    gone = delete_videos(tmp_path / "idx", ["vid-000000", "new-000001"])
    assert gone["count"] == 1224


def test_cli_build_info_add_delete_check(tmp_path, capsys):
    from jobs.index import main

    emb = write_embeddings(tmp_path / "emb", clustered_vectors(500, DIM, seed=11), model_id="toy@abc")
    assert main(["build", "--embeddings", str(emb), "--output", str(tmp_path / "idx"), "--memory", "1GB",
                 "--recall", "0.9", "--factory", "IVF16,Flat", "--probes", "50"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["factory"] == "IVF16,Flat" and built["count"] == 500
    new = write_embeddings(tmp_path / "new", clustered_vectors(5, DIM, seed=12), model_id="toy@abc",
                           start_id=900, video_prefix="new")
    assert main(["add", "--embeddings", str(new), "--output", str(tmp_path / "idx")]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 505
    assert main(["delete", "--output", str(tmp_path / "idx"), "--video-ids", "new-000000"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 504
    assert main(["info", "--index", str(tmp_path / "idx")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 504 and len(info["versions"]) == 3
    assert main(["check", "--index", str(tmp_path / "idx")]) == 0
    assert main(["info", "--index", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # no captions beside these embeddings: --no-text-rule says what the build tunes on instead
    assert main(["build", "--embeddings", str(emb), "--output", str(tmp_path / "offdata"), "--factory",
                 "IVF16,Flat", "--probes", "50", "--no-text-rule", "offdata"]) == 0
    assert json.loads(capsys.readouterr().out)["tuning_queries"]["kind"] == "offdata"
    with pytest.raises(SystemExit):
        main(["build", "--embeddings", str(emb), "--output", str(tmp_path / "x"), "--no-text-rule", "text"])
    assert "invalid choice: 'text'" in capsys.readouterr().err


@pytest.mark.slow
def test_opq_ivf_pq_build_add_delete(tmp_path):
    """Compressed path (OPQ pre-transform + IVF + PQ): trained on a sample, add/delete without retraining."""
    vecs = clustered_vectors(1500, DIM, seed=13)
    emb = write_embeddings(tmp_path / "emb", vecs, model_id="toy@abc")
    meta = build_index(emb, tmp_path / "idx", factory="OPQ8_32,IVF16,PQ8x4", recall_target=0.5,
                       num_probes=64, progress=False)
    # 32-bit PQ codes on clustered data: recall@10 varies with the (multi-threaded) OPQ/PQ training, so ask
    # only for far better than chance (10/1500) — the point here is train-on-sample + add/delete.
    assert meta["count"] == 1500 and meta["search_params"]["nprobe"] >= 1 and meta["recall"] >= 0.1
    new = write_embeddings(tmp_path / "new", clustered_vectors(20, DIM, seed=14), model_id="toy@abc",
                           start_id=7000, video_prefix="new")
    assert add_embeddings(tmp_path / "idx", new, progress=False)["count"] == 1520
    assert delete_videos(tmp_path / "idx", ["new-000000", "vid-000001"])["count"] == 1518
    hits = VideoIndex.open(tmp_path / "idx", mmap=True).search(vecs[5], k=5)
    assert len(hits) == 5 and "vid-000001" not in [h.video_id for h in hits]


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW32,Flat", "IVF64_HNSW16,Flat", "OPQ8_32,IVF64,Flat"])
def test_filtered_search_ranks_only_allowed_rows(tmp_path, factory):
    """allowed_ids filters inside FAISS: with nprobe=1 / efSearch=16 the probed part of the index holds none
    of the allowed rows, and the search still returns the exact top k of the allowed videos, in order."""
    vecs = clustered_vectors(3000, DIM, seed=11)
    emb = write_embeddings(tmp_path / "emb", vecs, clips_per_video=2)
    build_index(emb, tmp_path / "idx", factory=factory, recall_target=0.5, num_probes=50, progress=False)
    vi = VideoIndex.open(tmp_path / "idx")
    for ix in vi.indexes:
        if "IVF" in factory:  # also behind an OPQ rotation, and with an HNSW coarse quantizer
            faiss.extract_index_ivf(ix).nprobe = 1
        else:
            faiss.downcast_index(ix.index).hnsw.efSearch = 16
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    query = unit[0]
    video_score = (unit @ query).reshape(-1, 2).max(axis=1)  # ids are row numbers, 2 clips a video
    allowed_videos = np.argsort(video_score)[:200]  # the 200 videos farthest from the query
    allowed_ids = np.concatenate([[2 * v, 2 * v + 1] for v in allowed_videos])
    expected = sorted(allowed_videos, key=lambda v: -video_score[v])[:20]
    hits = vi.search(query, k=10, allowed_ids=allowed_ids)
    assert [h.video_id for h in hits] == [f"vid-{v:06d}" for v in expected[:10]]
    assert [h.score for h in hits] == pytest.approx([float(video_score[v]) for v in expected[:10]], abs=1e-5)
    assert not any(h.video_id == f"vid-{v:06d}" for h in hits for v in np.argsort(-video_score)[:50])
    longer = vi.search(query, k=20, allowed_ids=allowed_ids)
    assert [h.video_id for h in longer[:10]] == [h.video_id for h in hits]
    assert [h.video_id for h in longer[10:]] == [f"vid-{v:06d}" for v in expected[10:]]
    assert vi.search(query, k=5, allowed_ids=np.zeros(0, np.int64)) == []
    unfiltered = vi.search(query, k=5)
    assert unfiltered[0].video_id == "vid-000000"  # the stored (unfiltered) search is unchanged
