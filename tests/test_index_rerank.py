"""Compressed codes + exact float16 re-rank: the chooser, the re-rank's order, (nprobe, R) tuning on off-data
queries without captions, deletes / adds / compaction of a re-ranked index."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index import VideoIndex, add_embeddings, build_index, compact_index, delete_videos, store
from index import rerank as rerank_module
from index.embeddings import resolve_embeddings
from index.factory import choose_factory, estimate_memory, needs_rerank
from index.part import build_part
from index.rerank import RefineVectors, RefineWriter, candidate_scores, rerank
from index.testing import write_embeddings
from index.tuning import recall_at_k
from workflows.serve.fanout import ShardSet

REPO = Path(__file__).resolve().parents[1]
DIM, VIDEOS, CLIPS = 32, 1500, 4
FACTORY = "IVF32,PQ8x4fs"


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    """Clustered clip vectors (semantic + shared offset + noise) and text-like queries off them: the
    semantic vectors plus noise, without the offset (bench/scale_corpus.py's model, small)."""
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(24, DIM)))
    sem = _unit(centres[rng.integers(0, len(centres), VIDEOS)] + 0.7 * _unit(rng.normal(size=(VIDEOS, DIM))))
    per_video = sem + 0.6 * _unit(rng.normal(size=DIM)) + 0.45 * _unit(rng.normal(size=(VIDEOS, DIM)))
    clips = _unit(per_video[:, None, :] + 0.3 * _unit(rng.normal(size=(VIDEOS, CLIPS, DIM)))).reshape(-1, DIM)
    queries = _unit(sem[:200] + 0.45 * _unit(rng.normal(size=(200, DIM))))
    return clips, queries


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    vectors, _ = corpus
    work = tmp_path_factory.mktemp("rerank")
    emb = write_embeddings(work / "emb", vectors, clips_per_video=CLIPS, rows_per_file=2000)
    meta = build_index(emb, work / "idx", factory=FACTORY, progress=False, num_probes=200)
    return work, emb, meta


def test_chooser_picks_fastscan_codes_under_a_tight_budget():
    n, dim = 1_000_000, 256
    flat = estimate_memory(n, dim, "ivf_flat", 2048)
    assert choose_factory(n, dim, 2 * flat) == "IVF2048,Flat"
    tight = choose_factory(n, dim, flat // 10)
    assert tight == "IVF2048,PQ64x4fs" and needs_rerank(tight)
    assert choose_factory(n, dim, 30_000_000) == "IVF2048,PQ32x4fs"  # 16 B codes + 8 B ids fit, 32 B do not
    # Without the float16 copy (a distributed build's on-disk lists) the old codes stay.
    assert choose_factory(n, dim, flat // 10, rerank=False).startswith("OPQ")
    assert not needs_rerank("IVF2048,Flat") and not needs_rerank("IVF2048,SQfp16")
    assert needs_rerank("IVF2048,SQ8") and needs_rerank("OPQ64_256,IVF2048,PQ64")
    assert not needs_rerank("IVF2048,PQ64x4fs,RFlat")


def test_rerank_gives_the_exact_order_of_its_candidates(tmp_path):
    rng = np.random.default_rng(1)
    vectors = _unit(rng.normal(size=(3000, DIM)))
    ids = rng.permutation(10_000)[:3000].astype(np.int64) * 7 + 3
    writer = RefineWriter(tmp_path, "shard-00000.faiss", DIM)
    for start in range(0, 3000, 700):  # several appends, ids unsorted
        writer.add(vectors[start:start + 700], ids[start:start + 700])
    files = writer.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # the raw file is gone
    refine = RefineVectors(*files.values())
    assert refine.vectors.dtype == np.float16 and isinstance(refine.vectors, np.memmap)
    queries = _unit(rng.normal(size=(5, DIM)))
    cand = np.stack([rng.choice(ids, 50, replace=False) for _ in queries])
    cand[0, -3:] = -1  # padding FAISS leaves when a shard has fewer rows
    scores, top = rerank(queries, cand, refine, 10)
    by_id = dict(zip(ids.tolist(), vectors.astype(np.float16).astype(np.float32)))
    for q, c, s, t in zip(queries, cand, scores, top):
        exact = sorted(((float(by_id[i] @ q), int(i)) for i in c if i >= 0), reverse=True)[:10]
        assert t.tolist() == [i for _, i in exact]
        np.testing.assert_allclose(s, [d for d, _ in exact], rtol=0, atol=1e-5)
        # float16 moves a unit-vector inner product by < 1e-3 from the float32 one
        assert max(abs(float(vectors[list(ids).index(i)] @ q) - d) for d, i in exact) < 1e-3
    with pytest.raises(ValueError, match="not in its float16 refine copy"):
        rerank(queries[:1], np.array([[5]]), refine, 1)


def _mapped_kib(path: Path) -> int:
    """This process's resident pages of the file ``path`` (the Rss of its memory maps in /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_tuning_reranks_the_whole_copy_without_keeping_it_mapped(tmp_path, monkeypatch):
    """Tuning re-ranks every row of the float16 copy at each setting it tries: with ``release_pages`` the
    rows a block read are unmapped before the next (a build task's RSS held the whole copy before)."""
    rng = np.random.default_rng(2)
    n, dim = 80_000, 256  # a 40 MB copy: each block of sorted candidates reads ~1/16 of it
    writer = RefineWriter(tmp_path, "shard-00000.faiss", dim)
    writer.add(_unit(rng.normal(size=(n, dim))), np.arange(n, dtype=np.int64))
    files = writer.finish()
    vectors_path = files[next(iter(files))]
    file_kib = vectors_path.stat().st_size // 1024
    queries = _unit(rng.normal(size=(200, dim)))
    cand = rng.integers(0, n, size=(200, 640))
    kept = RefineVectors(*files.values())
    scores = candidate_scores(queries, cand, kept)
    assert _mapped_kib(vectors_path) > 0.8 * file_kib  # a pass over the whole copy maps all of it
    del kept
    peaks, real_drop = [], rerank_module.drop_mapped_pages
    monkeypatch.setattr(rerank_module, "drop_mapped_pages",
                        lambda array: peaks.append(_mapped_kib(vectors_path)) or real_drop(array))
    released = RefineVectors(*files.values())
    assert np.array_equal(candidate_scores(queries, cand, released, release_pages=True), scores)
    assert len(peaks) > 10 and max(peaks) < 0.25 * file_kib and _mapped_kib(vectors_path) < 0.05 * file_kib


def test_tunes_nprobe_and_depth_without_captions(built, corpus):
    """No caption embeddings: the build tunes (nprobe, R) on its probes and the held-out text-like queries
    still reach the target through the re-rank."""
    work, _, meta = built
    info = meta["shards"][0]
    assert meta["tuning_queries"]["kind"] != "text"
    assert info["rerank"]["dtype"] == "float16" and info["rerank"]["depth"] >= 10
    assert meta["recall"] >= 0.95 and info["recall_target_met"]
    assert all(len(point) == 3 for point in info["tuning_curve"])  # (nprobe, R, recall)
    vectors, queries = corpus
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]  # ids are row numbers
    vi = VideoIndex.open(work / "idx")
    assert recall_at_k(vi.search_vectors(queries, 10)[1], truth, 10) >= 0.95
    # Without the re-rank the same codes and nprobe miss the target by far.
    codes_only = vi.indexes[0].search(queries, 10)[1]
    assert recall_at_k(codes_only, truth, 10) < 0.8
    # A hit's score is the exact (float16) inner product, not the codes' estimate.
    hit = vi.search(queries[0], k=1)[0]
    assert abs(hit.score - float(vectors[hit.id] @ queries[0])) < 1e-3


def test_deletes_adds_and_compaction_keep_the_rerank(built, corpus):
    work, emb, _ = built
    vectors, queries = corpus
    root = work / "idx"
    gone = [f"vid-{v:06d}" for v in range(0, 600)]
    delete_videos(root, gone)
    vi = VideoIndex.open(root)
    hits = vi.search(queries[:50], k=10)
    assert not {h.video_id for hs in hits for h in hs} & set(gone)
    live = np.arange(600 * CLIPS, len(vectors))
    truth = live[np.argsort(-(queries @ vectors[live].T), axis=1)[:, :10]]
    assert recall_at_k(vi.search_vectors(queries, 10)[1], truth, 10) >= 0.95
    meta = compact_index(root, threshold=0.2, progress=False)
    assert meta is not None and meta["shards"][0]["rerank"]
    vi = VideoIndex.open(root)
    assert recall_at_k(vi.search_vectors(queries, 10)[1], truth, 10) >= 0.95
    # An add writes the new rows into the copy (ids after the corpus's own)
    extra = _unit(vectors[:40] + 0.01)
    write_embeddings(work / "more", extra, clips_per_video=CLIPS, start_id=len(vectors), video_prefix="new")
    meta = add_embeddings(root, work / "more", progress=False)
    vi = VideoIndex.open(root)
    top = vi.search(extra[0], k=1)[0]
    assert top.video_id == "new-000000" and abs(top.score - 1.0) < 2e-3
    assert meta["recall"] >= 0.9


def test_a_shard_task_uploads_its_refine_copy(built, tmp_path):
    """What each Ray task of a sharded build does (index.sharded): build one shard and put its FAISS file
    and its float16 copy under the version itself, returning their records for index.json."""
    _, emb, _ = built
    source = resolve_embeddings(emb)
    root = tmp_path / "idx"
    version = store.new_version_name(str(root))
    store.staging_dir(str(root), version)
    part = build_part(source, (1, 2), factory=FACTORY, num_probes=100, progress=False,
                      write_to=(str(root), version))
    vectors_name, ids_name = part["info"]["rerank"]["vectors"], part["info"]["rerank"]["ids"]
    assert (vectors_name, ids_name) == ("shard-00001.refine.npy", "shard-00001.refine-ids.npy")
    assert part["index"] is None and not part["local_files"]
    vdir = root / "versions" / version
    assert set(part["records"]) == {"shard-00001.faiss", vectors_name, ids_name}
    for name, record in part["records"].items():
        assert record == store.file_record(vdir / name)
    refine = RefineVectors(vdir / vectors_name, vdir / ids_name)
    assert len(refine) == part["info"]["count"] and list(refine.ids) == sorted(part["ids"]["id"].to_pylist())


def test_offdata_probes_tune_for_text_without_captions(built, corpus, tmp_path):
    """No captions: probes moved off the data (corpus mean removed, noise added) stand in for text; the build
    tuned on them reaches the target on held-out text-like queries it never saw, and it needs at least the
    nprobe of the old rule (video probes, which find their own clip)."""
    _, emb, _ = built
    vectors, queries = corpus
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    metas = {rule: build_index(emb, tmp_path / rule, factory="IVF32,Flat", progress=False, num_probes=200,
                               text_queries=None, no_text_rule=rule) for rule in ("video", "offdata")}
    assert metas["offdata"]["tuning_queries"] == {"kind": "offdata", "video_probes": 200}
    offdata = metas["offdata"]
    assert offdata["shards"][0]["tuned_on"] == "offdata" and 0 < offdata["video_probe_recall"] <= 1
    assert metas["offdata"]["search_params"]["nprobe"] >= metas["video"]["search_params"]["nprobe"]
    held = recall_at_k(VideoIndex.open(tmp_path / "offdata").search_vectors(queries, 10)[1], truth, 10)
    assert held >= 0.95
    with pytest.raises(ValueError, match="no_text_rule must be one of"):
        build_index(emb, tmp_path / "bad", factory="IVF32,Flat", text_queries=None, no_text_rule="guess")


def test_fanout_shard_replica_reranks_as_one_process(built, corpus):
    """The fan-out's shard replica (workflows/serve/fanout.ShardSet, what each Ray Serve shard deployment
    holds) searches through the same index.query.search_shard: the same re-ranked top list, exact scores."""
    work, _, _ = built
    _, queries = corpus
    vi = VideoIndex.open(work / "idx")
    shard_set = ShardSet(str(work / "idx"), vi.version, [0])
    assert shard_set.refines[0] is not None and shard_set.depths[0] == vi.meta["shards"][0]["rerank"]["depth"]
    got_scores, got_ids = shard_set.search(queries[:20], 10, None, False)[0]  # (scores, ids) of shard 0
    scores, ids = vi.search_vectors(queries[:20], 10)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_scores, scores, rtol=0, atol=1e-6)


FINISH_IN_A_FRESH_PROCESS = """
import json, sys
import numpy as np
from index.distributed import _memory, _reset_peak
from index.rerank import RefineVectors, RefineWriter
n, dim, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
ids = rng.permutation(n).astype(np.int64)
writer = RefineWriter(folder, "shard-00000.faiss", dim)
for start in range(0, n, 16384):  # row i holds the value ids[i] / n in every column
    block = np.repeat((ids[start:start + 16384] / n)[:, None], dim, axis=1)
    writer.add(block, ids[start:start + 16384])
del block
start = _reset_peak()
files = writer.finish()
grown = _memory()["peak_rss_bytes"] - start
refine = RefineVectors(*files.values())
sorted_ok = bool((refine.ids == np.arange(n)).all())
values_ok = bool(np.allclose(refine.vectors[::997, 0], (np.arange(0, n, 997) / n).astype(np.float16)))
print(json.dumps({"grown": grown, "sorted": sorted_ok, "values": values_ok}))
"""


def test_finishing_the_copy_holds_a_chunk_not_the_copy(tmp_path):
    """The float16 copy (128 MiB: 262,144 x 256, appended in id-shuffled order) is sorted by id in a fresh
    process. Reading the raw rows and writing the sorted ones through two memory maps (the writer before
    this one) kept both in the RSS: 2.3x the copy at the peak (measured), most of a 10M build task's peak."""
    n, dim = 262_144, 256
    done = subprocess.run([sys.executable, "-c", FINISH_IN_A_FRESH_PROCESS, str(n), str(dim), str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, check=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    copy_bytes = n * dim * 2
    print(f"[memory] sorting a {copy_bytes / 2**20:.0f} MiB float16 copy: peak RSS grew "
          f"{result['grown'] / 2**20:.0f} MiB")
    assert result["sorted"] and result["values"], result
    assert result["grown"] < 0.5 * copy_bytes, result
