"""Distributed index build (index/distributed.py, index/ondisk.py): Ray tasks over slices of the embeddings,
one on-disk IVF index merged from their inverted lists. Real FAISS, real Ray (local and a 3-node
``ray.cluster_utils.Cluster`` through ``ray job submit``), moto's S3 server."""

from __future__ import annotations

import json
import sys

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_fixtures import cluster3  # noqa: F401  (one cluster for both modules: SharedResource)

from index import VideoIndex, build_index, delete_videos, ondisk, store
from index.distributed import build_distributed, claimed_ids, distributed_factory, is_fast_scan, plan_slices
from index.embeddings import iter_batches, resolve_embeddings
from index.factory import make_index, needs_rerank
from index.testing import clustered_vectors, embedding_schema
from runtime import storage

DIM = 32
FACTORY = "IVF32,Flat"


def write_parts(out, vectors: np.ndarray, rows_per_file: int, row_group: int, ids=None, model="toy@000000"):
    """Embeddings Parquet (``out/model_id=.../part-*.parquet``, several row groups a file) built columnwise,
    so tens of thousands of rows take milliseconds; ``ids`` defaults to 0..n-1."""
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    sub = storage.join(str(out), f"model_id={model.replace('@', '_')}")
    storage.makedirs(sub)
    videos = [f"vid-{i // 2:06d}" for i in range(n)]  # two clips a video
    for f, start in enumerate(range(0, n, rows_per_file)):
        stop = min(n, start + rows_per_file)
        flat = pa.array(vectors[start:stop].reshape(-1), pa.float32())
        table = pa.table({
            "id": pa.array(ids[start:stop]), "video_id": videos[start:stop], "key": videos[start:stop],
            "shard": ["000000"] * (stop - start), "clip_index": pa.array(np.arange(start, stop) % 2),
            "start_s": pa.array(np.arange(start, stop) % 2, pa.float64()),
            "end_s": pa.array(np.arange(start, stop) % 2 + 1, pa.float64()),
            "model_id": [model] * (stop - start),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
            "captions": [[f"caption of {v}"] for v in videos[start:stop]],
        }, schema=embedding_schema(dim))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=row_group)
        storage.write_bytes(storage.join(sub, f"part-{f:05d}.parquet"), sink.getvalue().to_pybytes())
    storage.write_text(storage.join(sub, "_model.json"), json.dumps({"model_id": model, "dim": dim}))
    return sub


def messy_corpus(out, n: int = 6000, seed: int = 3):
    """Clustered vectors with ids repeated within and across slices and a few unusable rows."""
    vectors = clustered_vectors(n, DIM, seed=seed)
    ids = np.arange(n, dtype=np.int64)
    ids[10] = ids[3]  # repeat within the first slice
    ids[4100] = ids[20]  # repeat across slices: the first occurrence wins
    ids[4200] = ids[5000]  # a later slice's id seen first in an earlier slice
    vectors[30] = 0.0  # bad embedding (zero norm)
    ids[2500] = ids[40]
    vectors[40] = np.nan  # the first occurrence is unusable: the later one keeps the id
    return write_parts(out, vectors, rows_per_file=1500, row_group=500, ids=ids)


def trained_ivf(source, n_train: int = 3000) -> faiss.Index:
    """An empty IVF index trained on the first rows of ``source`` (one quantizer for both builds)."""
    vecs = np.concatenate([b.vectors for b in iter_batches(source, batch_size=1000)])[:n_train]
    index = faiss.index_factory(DIM, FACTORY, faiss.METRIC_INNER_PRODUCT)
    index.train(vecs)
    return index


def in_process(source, trained: faiss.Index) -> tuple[faiss.Index, pa.Table]:
    """The same rows added in one process, in one pass: the reference a distributed build must equal."""
    index = faiss.clone_index(trained)
    seen: set[int] = set()
    metas = []
    for batch in iter_batches(source, batch_size=700, seen_ids=seen):
        index.add_with_ids(batch.vectors, batch.ids)
        metas.append(batch.meta)
    return index, pa.concat_tables(metas)


def assert_same_search(a: faiss.Index, b: faiss.Index, queries: np.ndarray, nprobe: int = 8, k: int = 10):
    for ix in (a, b):
        faiss.extract_index_ivf(ix).nprobe = nprobe
    d_a, i_a = a.search(queries, k)
    d_b, i_b = b.search(queries, k)
    np.testing.assert_array_equal(i_a, i_b)
    np.testing.assert_array_equal(d_a, d_b)


# --------------------------------------------------------------------------------------- no Ray needed
def test_merge_to_ondisk_equals_one_index_and_opens_from_any_folder(tmp_path):
    vectors = clustered_vectors(4000, DIM, seed=1)
    faiss.normalize_L2(vectors)
    trained = faiss.index_factory(DIM, FACTORY, faiss.METRIC_INNER_PRODUCT)
    trained.train(vectors[:2000])
    ids = np.arange(4000, dtype=np.int64) * 7 + 1_000_000  # arbitrary ids: nothing may shift them
    reference = faiss.clone_index(trained)
    reference.add_with_ids(vectors, ids)
    slices, sizes = [], []
    for i, (lo, hi) in enumerate([(0, 1500), (1500, 1501), (1501, 4000)]):
        part = faiss.clone_index(trained)
        part.add_with_ids(vectors[lo:hi], ids[lo:hi])
        faiss.write_index(part, str(tmp_path / f"slice-{i}.faiss"))
        slices.append(tmp_path / f"slice-{i}.faiss")
        sizes.append(ondisk.list_sizes(part))
    (tmp_path / "built").mkdir()
    total = np.sum(sizes, axis=0)
    merged = ondisk.merge_to_ondisk(trained, iter(slices), total, tmp_path / "built" / "m.faiss")
    assert merged.ntotal == 4000 and ondisk.is_ondisk(merged)
    assert_same_search(merged, reference, vectors[::97])
    # Every list holds the same entries in the same order as one in-process add.
    got, want = faiss.extract_index_ivf(merged).invlists, faiss.extract_index_ivf(reference).invlists
    for lst in range(want.nlist):
        n = want.list_size(lst)
        assert got.list_size(lst) == n
        np.testing.assert_array_equal(faiss.rev_swig_ptr(got.get_ids(lst), n),
                                      faiss.rev_swig_ptr(want.get_ids(lst), n))
    del merged, got
    # A store's cache keeps each object in its own folder: the pair still opens, memory-mapped read-only.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "built" / "m.faiss").rename(tmp_path / "a" / "m.faiss")
    (tmp_path / "built" / "m.ivfdata").rename(tmp_path / "b" / "m.ivfdata")
    before = storage.sha256_file(tmp_path / "b" / "m.ivfdata")
    opened = ondisk.read_ondisk(tmp_path / "a" / "m.faiss", tmp_path / "b" / "m.ivfdata")
    assert ondisk.is_ondisk(opened)
    assert_same_search(opened, reference, vectors[::97])
    # A writer gets an in-RAM copy: removing ids never touches the published lists file.
    writable = ondisk.read_ondisk(tmp_path / "a" / "m.faiss", tmp_path / "b" / "m.ivfdata", writable=True)
    assert not ondisk.is_ondisk(writable)
    assert writable.remove_ids(ids[:100]) == 100
    assert storage.sha256_file(tmp_path / "b" / "m.ivfdata") == before
    with pytest.raises(ValueError, match="sizes said"):
        ondisk.merge_to_ondisk(trained, iter(slices[:2]), total, tmp_path / "short.faiss")


def test_the_distributed_chooser_never_picks_fast_scan_codes():
    """Fast-scan lists are packed SIMD blocks: merged list by list into on-disk lists they would be
    scrambled. Under a tight budget the distributed chooser takes PQ / SQ codes (with the float16 copy)."""
    for n, budget in ((10_000_000, "2GB"), (10_000_000, "600MB"), (3_000_000, "1GB"), (1_000_000, "8GB")):
        factory = distributed_factory(n, 256, budget, 0.95)
        assert not is_fast_scan(make_index(factory, 256)), (n, budget, factory)
    assert needs_rerank(distributed_factory(10_000_000, 256, "2GB", 0.95))
    assert is_fast_scan(make_index("IVF16,PQ8x4fs", 32)) and not is_fast_scan(make_index("IVF16,PQ8", 32))


def test_slices_follow_row_groups_and_duplicates_keep_the_first_valid_occurrence(tmp_path):
    source = resolve_embeddings(messy_corpus(tmp_path / "emb"))
    slices = plan_slices(source, slice_rows=1000)  # 4 files x 3 row groups of 500 rows
    assert [s.num_rows for s in slices] == [1000] * 6
    assert [s.offset for s in slices] == list(range(0, 6000, 1000))
    assert slices[1].parts == [(slices[1].parts[0][0], [2]), (slices[1].parts[1][0], [0])]  # spans 2 files
    rows = [sum(len(b.ids) + len(b.errors) for b in iter_batches(s, batch_size=300)) for s in slices]
    assert rows == [1000] * 6
    assert [s.num_rows for s in plan_slices(source, slice_rows=1)] == [500] * 12  # a row group is indivisible
    claimed = claimed_ids([np.array([1, 2, 2, 3]), np.array([3, 4, 1]), np.array([4, 5, 3])])
    assert [c.tolist() for c in claimed] == [[], [1, 3], [3, 4]]
    with pytest.raises(ValueError, match="slice_rows"):
        plan_slices(source, 0)


# ------------------------------------------------------------------------------------------ local Ray
def test_distributed_build_equals_in_process_build(ray_local, tmp_path):
    source = resolve_embeddings(messy_corpus(tmp_path / "emb"))
    trained = trained_ivf(source)
    reference, ref_ids = in_process(source, trained)
    out = tmp_path / "idx"
    version = store.new_version_name(out)
    stage = store.staging_dir(out, version)
    part = build_distributed(source, (str(out), version), stage, factory=FACTORY, slice_rows=1000,
                             trained=faiss.clone_index(trained), num_probes=64, progress=False)
    assert part["ids"].equals(ref_ids)
    reasons = sorted((e["reason"], e["id"]) for e in part["errors"])
    assert reasons == [("bad_embedding", 30), ("bad_embedding", 40),
                       ("duplicate_id", 3), ("duplicate_id", 20), ("duplicate_id", 5000)]
    assert not storage.exists(storage.join(store.version_uri(out, version), "_slices"))
    merged = ondisk.read_ondisk(stage / "index.faiss", stage / "index.ivfdata")
    assert_same_search(merged, reference, clustered_vectors(50, DIM, seed=9))
    tasks = part["info"]["distributed"]["tasks"]
    assert [t["rows"] for t in tasks] == [1000] * 6 and all(t["peak_rss_bytes"] > 0 for t in tasks)


def test_build_index_distributed_publishes_opens_and_deletes(ray_local, tmp_path):
    source = resolve_embeddings(messy_corpus(tmp_path / "emb"))
    meta = build_index(tmp_path / "emb", tmp_path / "idx", distributed=True, slice_rows=2000, num_probes=64,
                       progress=False)
    shard = meta["shards"][0]
    assert meta["count"] == 5995 and meta["errors"] == 5 and shard["ivfdata"] == "index.ivfdata"
    assert meta["factory"].startswith("IVF") and meta["recall"] >= 0.9
    files = set(store.describe(tmp_path / "idx")["files"])
    assert {"index.faiss", "index.ivfdata", "ids.arrow", "probe.npz"} <= files
    build_index(tmp_path / "emb", tmp_path / "single", num_probes=64, progress=False)
    vi = VideoIndex.open(tmp_path / "idx")
    assert ondisk.is_ondisk(vi.indexes[0])
    distributed_ids = store.read_ids(store.version_dir(tmp_path / "idx"))
    assert distributed_ids.equals(store.read_ids(store.version_dir(tmp_path / "single")))
    batches = list(iter_batches(source))
    vectors, ids = np.concatenate([b.vectors for b in batches]), np.concatenate([b.ids for b in batches])
    query = vectors[[int(np.flatnonzero(ids == i)[0]) for i in (100, 2000)]]  # rows 100 and 2000
    hits = vi.search(query, k=3)
    assert [h[0].video_id for h in hits] == ["vid-000050", "vid-001000"]
    # A delete tombstones the rows and shares the on-disk lists; they stay intact.
    after = delete_videos(tmp_path / "idx", ["vid-000050"])
    assert after["count"] == 5993 and after["shards"][0]["ivfdata"] == "index.ivfdata"
    shared = store.describe(tmp_path / "idx")["files"]["index.ivfdata"]
    assert shared["version"] == meta["version"]
    assert VideoIndex.open(tmp_path / "idx").search(query, k=1)[0][0].video_id != "vid-000050"
    assert VideoIndex.open(tmp_path / "idx", version=meta["version"]).search(query, k=1)[0][0].video_id == \
        "vid-000050"
    with pytest.raises(ValueError, match="IVF factory"):
        build_index(tmp_path / "emb", tmp_path / "flat", factory="Flat", distributed=True, progress=False)
    with pytest.raises(ValueError, match="fast-scan"):
        build_index(tmp_path / "emb", tmp_path / "fs", factory="IVF16,PQ8x4fs", distributed=True,
                    progress=False)
    with pytest.raises(ValueError, match="one on-disk index"):
        build_index(tmp_path / "emb", tmp_path / "flat", distributed=True, shards=2, progress=False)


def test_distributed_build_with_lossy_codes_merges_the_float16_copy_and_reranks(ray_local, tmp_path):
    """PQ codes: every add task writes its slice's float16 copy; the merged copy holds exactly the index's
    ids in ascending order, with the rows an in-process copy holds, and the search re-ranks against it."""
    source = resolve_embeddings(messy_corpus(tmp_path / "emb"))
    meta = build_index(tmp_path / "emb", tmp_path / "idx", factory="IVF16,PQ8", distributed=True,
                       slice_rows=2000, num_probes=64, progress=False)
    shard = meta["shards"][0]
    assert shard["rerank"]["vectors"] == "index.refine.npy" and shard["rerank"]["depth"] >= 10, shard
    assert {"index.refine.npy", "index.refine-ids.npy"} <= set(store.describe(tmp_path / "idx")["files"])
    assert not storage.exists(storage.join(store.version_uri(tmp_path / "idx", meta["version"]), "_slices"))
    vi = VideoIndex.open(tmp_path / "idx")
    refine = vi.refines[0]
    index_ids = np.sort(store.read_ids(store.version_dir(tmp_path / "idx")).column("id").to_numpy())
    assert np.array_equal(refine.ids, index_ids)
    batches = list(iter_batches(source, seen_ids=set()))
    vectors = np.concatenate([b.vectors for b in batches])
    ids = np.concatenate([b.ids for b in batches])
    expected = vectors[np.argsort(ids)].astype(np.float16)
    assert np.array_equal(np.asarray(refine.vectors), expected)
    # Exact scores: a stored vector's own row scores ~1 and comes first, which PQ codes alone do not promise.
    query = vectors[[int(np.flatnonzero(ids == i)[0]) for i in (100, 2000, 4001)]]
    hits = vi.search(query, k=1)
    assert [h[0].video_id for h in hits] == ["vid-000050", "vid-001000", "vid-002000"]
    assert all(abs(h[0].score - 1.0) < 2e-3 for h in hits), hits


def test_add_task_memory_grows_with_the_slice_not_the_corpus(ray_local, tmp_path):
    """Each add task's peak RSS above the RSS it started from is about the same for a corpus 16x larger."""
    dim, slice_rows = 256, 8192
    peaks, raw = {}, {}
    for n in (16384, 262144):
        vectors = clustered_vectors(n, dim, seed=n)
        emb = write_parts(tmp_path / f"emb{n}", vectors, rows_per_file=8192, row_group=8192)
        source = resolve_embeddings(emb)
        out = tmp_path / f"idx{n}"
        version = store.new_version_name(out)
        part = build_distributed(source, (str(out), version), store.staging_dir(out, version),
                                 factory="IVF64,Flat", slice_rows=slice_rows, num_probes=32, progress=False,
                                 batch_size=1024)  # small batches: what stays is the slice's lists
        tasks = part["info"]["distributed"]["tasks"]
        assert len(tasks) == n // slice_rows
        peaks[n] = max(t["peak_rss_bytes"] - t["rss_start_bytes"] for t in tasks)
        raw[n] = vectors.nbytes
    grown = peaks[262144] - peaks[16384]
    print(f"[memory] add task peak growth: {peaks} bytes; corpus raw {raw}")
    assert peaks[16384] > 0
    # The corpus grew by 240 MiB of float32; a task that held it would grow by at least that much.
    assert grown < 0.25 * (raw[262144] - raw[16384]), (peaks, raw)
    assert peaks[262144] < 0.5 * raw[262144], (peaks, raw)


# ------------------------------------------------------------------------------- 3-node cluster, over S3
@pytest.mark.slow
def test_distributed_job_on_three_nodes_over_s3_equals_in_process(cluster3, s3_bucket):  # noqa: F811
    """``jobs.index build --distributed`` submitted to a 3-node cluster with lossy codes (SQ8): slices are
    added on several nodes, each task puts its lists and its float16 copy on S3, the driver merges both, the
    version is published to S3 and opens from there; its ids and search results equal an in-process build of
    the same data over the same trained quantizer, and the search re-ranks against the merged copy."""
    emb, out = storage.join(s3_bucket, "emb"), storage.join(s3_bucket, "idx")
    messy_corpus(emb)
    result = cluster3.run([sys.executable, "-m", "jobs.index", "build", "--embeddings", emb, "--output", out,
                           "--distributed", "--slice-rows", "1000", "--probes", "64",
                           "--factory", "IVF32,SQ8"], timeout=600)
    assert result.ok, result.tail(6000)
    vi = VideoIndex.open(out)
    shard = vi.meta["shards"][0]
    assert vi.meta["count"] == 5995 and ondisk.is_ondisk(vi.indexes[0])
    assert len({t["node"] for t in shard["distributed"]["tasks"]}) >= 2, shard["distributed"]["tasks"]
    assert not storage.exists(storage.join(vi.version_dir, "_slices"))
    assert shard["rerank"]["vectors"] == "index.refine.npy", shard
    index_ids = np.sort(store.read_ids(vi.version_dir).column("id").to_numpy())
    assert np.array_equal(vi.refines[0].ids, index_ids)
    hits = vi.search(np.asarray(vi.refines[0].vectors[:3], np.float32), k=1)  # stored rows score ~1 exactly
    assert all(abs(h[0].score - 1.0) < 2e-3 for h in hits), hits
    _vdir, _meta, (copy,), ids = store.load_version(out, mmap=False)  # the same quantizer, lists in RAM
    copy.reset()
    reference, ref_ids = in_process(resolve_embeddings(emb), copy)
    # ids.arrow keeps a video's rows together (sorted by video, then id): compare the rows, not their order.
    assert ids.select(ref_ids.column_names).sort_by("id").equals(ref_ids.sort_by("id"))
    assert_same_search(vi.indexes[0], reference, clustered_vectors(50, DIM, seed=9))
