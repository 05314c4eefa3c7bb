"""Upserts without a copy (index/upsert.py): a delta shard + superseded ids, the parent's files shared; what
search returns after it, ids, compaction folding the deltas, racing writers, and memory that does not grow
with the index (real FAISS, no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from index import VideoIndex, build_index, compact_index, delete_videos, store
from index.testing import clustered_vectors, write_embeddings
from index.upsert import upsert_embeddings
from jobs.index import main as index_main

ROOT = Path(__file__).resolve().parents[1]
DIM = 16
CLIPS = 4


@pytest.fixture(params=["IVF16,Flat", "Flat", "HNSW16", "IVF16,PQ4x4fs"])  # the last: float16 re-rank
def index_root(request, tmp_path) -> tuple[Path, np.ndarray]:
    """An index of 300 videos x 4 clip rows (ids 0..1199) and its vectors."""
    vecs = clustered_vectors(300 * CLIPS, DIM, seed=1)
    emb = write_embeddings(tmp_path / "emb", vecs, clips_per_video=CLIPS, model_id="toy@abc")
    build_index(emb, tmp_path / "idx", factory=request.param, num_probes=200, progress=False)
    return tmp_path / "idx", vecs


def reembedded(tmp_path: Path, name: str, videos: int, clips: int, seed: int,
               **kw) -> tuple[Path, np.ndarray]:
    """New embeddings of ``videos`` videos (vid-000000...: the ids a re-embedded video keeps) or others."""
    vecs = clustered_vectors(videos * clips, DIM, seed=seed)
    return write_embeddings(tmp_path / name, vecs, clips_per_video=clips, model_id="toy@abc", **kw), vecs


def top_video(index: VideoIndex, vector: np.ndarray) -> str:
    return index.search(vector, k=1)[0].video_id


def test_upsert_replaces_old_rows_shares_files_and_keeps_ids(index_root, tmp_path):
    root, vecs = index_root
    parent = store.read_current(root)
    before = store.read_meta(store.version_dir(root))
    new, new_vecs = reembedded(tmp_path, "up", videos=3, clips=CLIPS, seed=7)  # vid-000000..2, ids 0..11
    meta = upsert_embeddings(root, new, progress=False)
    assert meta["operation"] == "upsert" and meta["parent_version"] == parent
    assert meta["last_operation"] == {**meta["last_operation"], "upserted_rows": 12, "replaced": 12,
                                      "tombstoned": 0, "errors": 0}
    assert meta["count"] == 1200 and meta["stored_count"] == 1212 and meta["superseded"]["count"] == 12
    # The parent's FAISS and ids files are shared, not copied; the delta is the new bytes.
    shard, files = before["shards"][0]["file"], store.read_meta(store.version_dir(root))["files"]
    assert files[shard]["version"] == parent and files["ids.arrow"]["version"] == parent
    assert not (root / "versions" / meta["version"] / shard).exists()
    assert meta["shards"][-1]["delta_of"] == 0 and len(meta["row_parts"]) == 2
    index = VideoIndex.open(root)
    assert len(index) == 1200
    for v in range(3):  # the new vectors are found; the old ones no longer bring the video back first
        assert top_video(index, new_vecs[v * CLIPS]) == f"vid-{v:06d}"
        hits = index.search(vecs[v * CLIPS], k=5)
        assert all(h.video_id != f"vid-{v:06d}" or h.score < 0.999 for h in hits)
    ids = store.read_ids(index.version_dir, index.meta)
    assert ids.num_rows == 1200 and sorted(ids.column("id").to_pylist()) == list(range(1200))  # ids stable
    upserted = ids.filter(ids.column("shard").to_numpy() == len(meta["shards"]) - 1)
    assert sorted(upserted.column("video_id").to_pylist()) == sorted(f"vid-{v:06d}" for v in range(3) for _ in
                                                                     range(CLIPS))
    # the upserted rows score as the new vectors (the search's row of an id is the delta's)
    hit = index.search(new_vecs[0], k=1)[0]
    assert hit.score == pytest.approx(1.0, abs=1e-4) and hit.id in range(CLIPS)


def test_upsert_with_fewer_clips_and_new_videos_then_delete_and_compact(index_root, tmp_path):
    root, vecs = index_root
    fewer, fewer_vecs = reembedded(tmp_path, "fewer", videos=1, clips=2, seed=8)  # vid-000000: ids 0, 1
    meta = upsert_embeddings(root, fewer, progress=False)
    assert meta["last_operation"]["replaced"] == 2 and meta["last_operation"]["tombstoned"] == 2
    assert meta["count"] == 1198
    fresh, fresh_vecs = reembedded(tmp_path, "fresh", videos=2, clips=CLIPS, seed=9, start_id=5000,
                                   video_prefix="new")
    again, again_vecs = reembedded(tmp_path, "again", videos=1, clips=2, seed=10)  # vid-000000 a 2nd time
    upsert_embeddings(root, fresh, progress=False)
    meta = upsert_embeddings(root, again, progress=False)
    assert meta["count"] == 1206 and len(meta["shards"]) == 4
    index = VideoIndex.open(root)
    assert top_video(index, again_vecs[0]) == "vid-000000" and top_video(index, fresh_vecs[4]) == "new-000001"
    assert index.search(fewer_vecs[0], k=1)[0].score < 0.999  # the first upsert's rows are superseded too
    # A delete after upserts hides the video in every shard; a re-upsert of a deleted video revives it.
    meta = delete_videos(root, ["vid-000000", "new-000000"])
    assert meta["count"] == 1200
    index = VideoIndex.open(root)
    assert {h.video_id for h in index.search(again_vecs[0], k=20)}.isdisjoint({"vid-000000"})
    queries = np.concatenate([vecs[::97], fresh_vecs, again_vecs])
    expected = [[(h.video_id, round(h.score, 4)) for h in hits] for hits in index.search(queries, k=5)]
    # Compaction folds the three deltas into the base shard: same live rows, same answers (IVF copies the
    # codes list by list and flat rows are exact; an HNSW graph is rebuilt: its answers mostly agree).
    compacted = compact_index(root, threshold=0.001, progress=False)
    assert compacted["last_operation"]["folded_deltas"] == 3 and len(compacted["shards"]) == 1
    assert compacted["count"] == 1200 and "superseded" not in compacted and "row_parts" not in compacted
    index = VideoIndex.open(root)
    assert index.indexes[0].ntotal == 1200
    got = [[(h.video_id, round(h.score, 4)) for h in hits] for hits in index.search(queries, k=5)]
    if "HNSW" in compacted["factory"]:
        overlap = [len({v for v, _ in g} & {v for v, _ in e}) / 5 for g, e in zip(got, expected)]
        assert np.mean(overlap) >= 0.8, overlap
    else:
        assert got == expected
    ids = store.read_ids(index.version_dir, index.meta)
    assert set(ids.column("shard").to_pylist()) == {0} and len(set(ids.column("id").to_pylist())) == 1200


def test_add_without_upsert_rejects_known_ids_and_add_cli_is_the_delta_path(index_root, tmp_path, capsys):
    root, _vecs = index_root
    new, _ = reembedded(tmp_path, "dup", videos=1, clips=CLIPS, seed=11)
    meta = upsert_embeddings(root, new, progress=False, upsert=False)
    assert meta["last_operation"]["errors"] == CLIPS and meta["last_operation"]["upserted_rows"] == 0
    errors = store.read_meta(store.version_dir(root))["files"]
    assert "errors.parquet" in errors
    assert index_main(["add", "--embeddings", str(new), "--output", str(root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == 1200
    assert store.read_meta(store.version_dir(root))["operation"] == "upsert"


def test_upserts_racing_on_one_parent_publish_once(tmp_path, monkeypatch):
    """Two upserts read the same CURRENT, are released together at publish: one wins, the other gets
    PublishConflict and publishes nothing; a retry on the new CURRENT keeps both writes."""
    vecs = clustered_vectors(400, DIM, seed=3)
    build_index(write_embeddings(tmp_path / "emb", vecs, model_id="toy@abc"), tmp_path / "idx",
                factory="Flat", progress=False)
    sources = [reembedded(tmp_path, f"w{i}", videos=5, clips=1, seed=20 + i, start_id=1000 * (i + 1),
                          video_prefix=f"w{i}")[0] for i in range(2)]
    barrier = threading.Barrier(2, timeout=30)
    real_publish = store.publish

    def publish_together(*args, **kwargs):
        barrier.wait()
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(store, "publish", publish_together)
    results: dict[int, object] = {}

    def write(i: int) -> None:
        try:
            results[i] = upsert_embeddings(tmp_path / "idx", sources[i], progress=False)
        except store.PublishConflict as exc:
            results[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    lost = [i for i, r in results.items() if isinstance(r, store.PublishConflict)]
    assert len(results) == 2 and len(lost) == 1
    monkeypatch.setattr(store, "publish", real_publish)
    vdir = store.version_dir(tmp_path / "idx")
    live = set(store.read_ids(vdir, store.read_meta(vdir)).column("video_id").to_pylist())
    winner, loser = 1 - lost[0], lost[0]
    assert {f"w{winner}-{v:06d}" for v in range(5)} <= live
    assert not any(v.startswith(f"w{loser}") for v in live)
    store.retry_on_conflict(1, upsert_embeddings, tmp_path / "idx", sources[lost[0]], progress=False)
    assert len(VideoIndex.open(tmp_path / "idx")) == 410


MEMORY_CHILD = """
import json, resource, sys
from index import add_embeddings
from index.upsert import upsert_embeddings

def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

root, emb, how = sys.argv[1:4]
start = hwm_kb()
(upsert_embeddings if how == "upsert" else add_embeddings)(root, emb, progress=False)
print(json.dumps({"growth_kb": hwm_kb() - start}))
"""


def _peak_growth_mb(root: Path, emb: Path, how: str) -> float:
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(root), str(emb), how], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_kb"] / 1024


@pytest.mark.slow
def test_upsert_peak_memory_does_not_grow_with_the_index(tmp_path):
    """The upsert process's peak RSS growth on an index 4x larger stays where it is on the small one; the
    in-memory add of the same rows (the baseline, measured the same way) grows with the index."""
    dim = 128
    growth = {}
    for rows in (20_000, 80_000):
        vecs = clustered_vectors(rows, dim, seed=5)
        root = tmp_path / f"idx{rows}"
        emb = write_embeddings(tmp_path / f"emb{rows}", vecs, clips_per_video=4, model_id="toy@abc",
                               rows_per_file=20_000)
        build_index(emb, root, factory="IVF64,Flat", num_probes=200, progress=False)
        up = write_embeddings(tmp_path / f"up{rows}", clustered_vectors(400, dim, seed=6), clips_per_video=4,
                              model_id="toy@abc")
        # The upsert publishes a new version each time, so it can be measured twice; the lower figure drops
        # one-off noise (allocator arenas, a thread pool started under load) from a bound of a few MB.
        growth[rows] = {"upsert": min(_peak_growth_mb(root, up, "upsert") for _ in range(2)),
                        "add": _peak_growth_mb(root, up, "add")}
    raw_extra_mb = (80_000 - 20_000) * dim * 4 / 2**20  # 29.3 MB more float32 vectors
    upsert_extra = growth[80_000]["upsert"] - growth[20_000]["upsert"]
    add_extra = growth[80_000]["add"] - growth[20_000]["add"]
    print(f"peak RSS growth MB: {growth}; raw vectors +{raw_extra_mb:.1f} MB")
    assert add_extra >= 0.8 * raw_extra_mb, growth  # the measurement sees an index loaded into memory
    assert upsert_extra <= 0.25 * raw_extra_mb, growth


def test_fanout_shards_of_an_upserted_version_answer_as_one_process(index_root, tmp_path):
    """The fan-out's shard deployments (workflows/serve/fanout.py ShardSet, one per shard here) skip the
    superseded rows as VideoIndex does: their merged clip hits are the one process's."""
    from workflows.serve.fanout import ShardSet

    root, vecs = index_root
    new, new_vecs = reembedded(tmp_path, "up", videos=3, clips=CLIPS, seed=7)
    meta = upsert_embeddings(root, new, progress=False)
    index = VideoIndex.open(root)
    queries = np.concatenate([new_vecs, vecs[:12]])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    want_d, want_i = index.search_vectors(queries, 8)
    shards = [ShardSet(str(root), meta["version"], [p]) for p in range(len(meta["shards"]))]
    answers = [s.search(queries, 8, None, False)[0] for s in shards]  # (scores, ids) of its one shard
    scores = np.concatenate([a[0] for a in answers], axis=1)
    ids = np.concatenate([a[1] for a in answers], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :8]
    np.testing.assert_array_equal(np.take_along_axis(ids, order, axis=1), want_i)
    np.testing.assert_allclose(np.take_along_axis(scores, order, axis=1), want_d, atol=1e-5)
    delta_ids = answers[-1][1]
    delta_rows = index.rows.rows_of(np.unique(delta_ids[delta_ids >= 0]))
    assert set(index.rows.column("video_id", delta_rows)) <= {f"vid-{v:06d}" for v in range(3)}
