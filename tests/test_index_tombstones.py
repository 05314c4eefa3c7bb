"""Deletes as tombstones (new bytes ∝ deleted rows, FAISS files shared), filtered search, upsert over
tombstones, retention of shared files, and compaction (real FAISS, no Ray)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index import VideoIndex, add_embeddings, build_index, compact_index, delete_videos, store
from index.moments import WINDOW_CLIP_BASE
from index.rows import TOMBSTONES_FILE
from index.testing import clustered_vectors, write_embeddings
from index.upsert import upsert_embeddings

DIM = 16


def version_path(root: Path, version: str) -> Path:
    return root / "versions" / version


def own_bytes(root: Path, version: str) -> dict[str, int]:
    """Files physically inside a version's folder (what its publish wrote), but index.json."""
    folder = version_path(root, version)
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.name != "index.json"}


def windowed_embeddings(out: Path, videos: int, windows: int = 6, seed: int = 0) -> tuple[Path, np.ndarray]:
    """``videos`` videos of ``windows`` window rows each (clip_index >= WINDOW_CLIP_BASE, 2 s apart);
    returns the folder and the vectors (row j = video j // windows)."""
    vecs = clustered_vectors(videos * windows, DIM, seed=seed)
    write_embeddings(out, vecs, clips_per_video=windows, model_id="toy@abc")
    sub = next(out.iterdir())
    for part in sorted(sub.glob("part-*.parquet")):
        table = pq.read_table(part)
        clip = table.column("clip_index").to_numpy()
        for name, values in (("clip_index", pa.array(clip + WINDOW_CLIP_BASE, pa.int64())),
                             ("start_s", pa.array(2.0 * clip)), ("end_s", pa.array(2.0 * clip + 4.0))):
            table = table.set_column(table.schema.get_field_index(name), name, values)
        pq.write_table(table, part)
    return out, vecs


@pytest.fixture
def ivf_index(tmp_path):
    emb, vecs = windowed_embeddings(tmp_path / "emb", videos=400, windows=5, seed=1)
    meta = build_index(emb, tmp_path / "idx", factory="IVF16,Flat", num_probes=64, progress=False)
    return tmp_path / "idx", meta, vecs


def test_delete_publishes_only_tombstones_and_shares_the_faiss_files(ivf_index):
    root, first, vecs = ivf_index
    base_files = json.loads((version_path(root, first["version"]) / "index.json").read_text())["files"]
    faiss_mtime = (version_path(root, first["version"]) / "index.faiss").stat().st_mtime_ns
    small = delete_videos(root, ["vid-000001", "vid-000002"])
    large = delete_videos(root, [f"vid-{v:06d}" for v in range(100, 140)])
    for meta, deleted_rows in ((small, 10), (large, 210)):  # large carries small's 10 forward
        files = own_bytes(root, meta["version"])
        assert set(files) == {TOMBSTONES_FILE, store.PROBE_FILE}, files  # no FAISS / ids file rewritten
        on_disk = json.loads((version_path(root, meta["version"]) / "index.json").read_text())
        assert on_disk["files"]["index.faiss"] == {**base_files["index.faiss"], "version": first["version"]}
        assert on_disk["files"]["ids.arrow"]["version"] == first["version"]  # references never chain
        assert on_disk["tombstones"]["count"] == deleted_rows
        assert on_disk["count"] == first["count"] - deleted_rows and on_disk["stored_count"] == first["count"]
    assert (version_path(root, first["version"]) / "index.faiss").stat().st_mtime_ns == faiss_mtime
    # New bytes: the probe set is fixed-size; the tombstones grow with the deleted rows, not the corpus.
    probe = own_bytes(root, small["version"])[store.PROBE_FILE]
    assert own_bytes(root, large["version"])[store.PROBE_FILE] == probe
    tomb_small = own_bytes(root, small["version"])[TOMBSTONES_FILE]
    tomb_large = own_bytes(root, large["version"])[TOMBSTONES_FILE]
    assert tomb_small < tomb_large < tomb_small + 16 * 210
    assert tomb_large < base_files["index.faiss"]["size"] / 20
    assert large["last_operation"]["deleted_rows"] == 200 and large["last_operation"]["not_found"] == []
    again = delete_videos(root, ["vid-000001", "no-such-video"])  # already deleted: nothing new
    assert again["last_operation"]["deleted_rows"] == 0
    assert again["last_operation"]["not_found"] == ["no-such-video", "vid-000001"]


def test_a_delete_whose_parent_is_pruned_under_it_applies_to_the_new_current(ivf_index, tmp_path,
                                                                               monkeypatch):
    """Another writer publishes a version with its own files while the delete reads its parent, and prunes the
    parent: the delete is applied again to the new CURRENT (the publish race test once saw it fail with
    'index file ... is missing')."""
    root, first, vecs = ivf_index
    new = write_embeddings(tmp_path / "new", clustered_vectors(20, DIM, seed=5), clips_per_video=5,
                           model_id="toy@abc", start_id=90_000, video_prefix="new")
    real_read_probe, added = store.read_probe, []

    def read_probe_while_another_writer_publishes(vdir, meta):
        if not added:
            added.append(None)  # once: the add reads probes too
            # a full add writes its own files, so keep=1 prunes the parent
            added[0] = add_embeddings(root, new, keep=1, upsert=False, progress=False)
            assert not version_path(root, first["version"]).exists()
        return real_read_probe(vdir, meta)

    monkeypatch.setattr(store, "read_probe", read_probe_while_another_writer_publishes)
    meta = delete_videos(root, ["vid-000003"], keep=1)
    assert meta["parent_version"] == added[0]["version"] and store.read_current(root) == meta["version"]
    assert meta["count"] == first["count"] + 20 - 5 and meta["last_operation"]["deleted_rows"] == 5


@pytest.mark.parametrize("writer", ["upsert", "compact"])
def test_upsert_and_compaction_whose_parent_is_pruned_apply_to_the_new_current(ivf_index, tmp_path,
                                                                               monkeypatch, writer):
    """As a delete: another writer prunes the parent between the writer's read of CURRENT and its parent."""
    root, first, _ = ivf_index
    delete_videos(root, [f"vid-{v:06d}" for v in range(0, 120)])  # 30 % tombstoned: compaction is due
    parent = store.read_current(root)
    new = write_embeddings(tmp_path / "new", clustered_vectors(20, DIM, seed=6), clips_per_video=5,
                           model_id="toy@abc", start_id=95_000, video_prefix="new")
    real_read_meta, added = store.read_meta, []

    def read_meta_while_another_writer_publishes(vdir):
        if not added and parent in str(vdir):
            added.append(None)
            added[0] = add_embeddings(root, new, keep=1, upsert=False, progress=False)  # prunes the parent
            assert not version_path(root, parent).exists()
        return real_read_meta(vdir)

    monkeypatch.setattr(store, "read_meta", read_meta_while_another_writer_publishes)
    more = write_embeddings(tmp_path / "more", clustered_vectors(10, DIM, seed=7), clips_per_video=5,
                            model_id="toy@abc", start_id=97_000, video_prefix="more")
    if writer == "upsert":
        meta = upsert_embeddings(root, more, keep=1, progress=False)  # a delta shard on CURRENT
        assert meta["parent_version"] == added[0]["version"] and meta["count"] == added[0]["count"] + 10
    else:  # the add removed the tombstoned rows for real: nothing left to compact on the new CURRENT
        assert compact_index(root, threshold=0.2, keep=1, progress=False) is None
    assert store.read_meta(store.version_dir(root, store.read_current(root)))["count"] == (
        added[0]["count"] + (10 if writer == "upsert" else 0))


def test_deleted_videos_never_come_back(ivf_index):
    root, first, vecs = ivf_index
    gone = [f"vid-{v:06d}" for v in range(0, 400, 3)]  # a third of the videos
    gone_set = set(gone)
    delete_videos(root, gone)
    index = VideoIndex.open(root)
    assert len(index) == first["count"] - 5 * len(gone)
    queries = vecs[[5 * v + 2 for v in range(0, 60, 1)]]  # half of them are the deleted videos' own rows
    for hits in index.search(queries, k=20):
        assert len(hits) == 20 and not gone_set & {h.video_id for h in hits}
        for h in hits:  # moments are made of live windows only
            assert h.moments and all(0.0 <= m.start_s < m.end_s <= 12.0 for m in h.moments)
    _, raw = index.search_vectors(vecs[:100], 30)  # the clip-level search filters them too
    assert len(index.dead_ids) == 5 * len(gone) and not np.isin(raw, index.dead_ids).any()
    # An id filter naming deleted rows finds only the live ones among them.
    table = store.read_row_table(index.version_dir, index.meta).table
    vids = np.asarray(table.column("video_id").to_pylist())
    ids = table.column("id").to_numpy()
    some = np.isin(vids, ["vid-000000", "vid-000001", "vid-000003", "vid-000004"])
    for hits in index.search(queries[:5], k=10, allowed_ids=ids[some]):
        assert {h.video_id for h in hits} == {"vid-000001", "vid-000004"}
    only_dead = ids[np.isin(vids, ["vid-000000", "vid-000003"])]
    assert index.search(queries[0], k=5, allowed_ids=only_dead) == []
    # The catalog / validation view of the version (store.read_ids) leaves the tombstoned rows out.
    live = store.read_ids(index.version_dir, index.meta)
    assert live.num_rows == len(index) and not gone_set & set(live.column("video_id").to_pylist())
    # The version before the delete still opens and still finds them.
    old = VideoIndex.open(root, version=first["version"])
    assert old.search(vecs[2], k=1)[0].video_id == "vid-000000"


def test_upsert_over_tombstones_and_retention_keeps_shared_files(ivf_index, tmp_path):
    root, first, vecs = ivf_index
    delete_videos(root, ["vid-000007"], keep=2)
    delete_videos(root, ["vid-000008"], keep=2)
    third = delete_videos(root, ["vid-000009"], keep=2)
    # keep=2 retains the last two deletes; the build they refer to stays (its files are in use).
    assert store.list_versions(root)[-2:] == [store.list_versions(root)[-2], third["version"]]
    assert (version_path(root, first["version"]) / "index.faiss").exists()
    assert len(VideoIndex.open(root)) == first["count"] - 15
    moved = clustered_vectors(5, DIM, seed=9)
    up = write_embeddings(tmp_path / "up", moved, clips_per_video=5, model_id="toy@abc", start_id=50_000)
    added = add_embeddings(root, up, keep=2, progress=False)  # re-embeds vid-000000
    assert added["count"] == first["count"] - 15 and added["last_operation"]["replaced"] == 5
    assert "tombstones" not in added  # an add writes a new version holding only live rows
    index = VideoIndex.open(root)
    assert index.search(moved[0], k=1)[0].video_id == "vid-000000"
    assert index.search(moved[0], k=1)[0].id == 50_000
    deleted = {"vid-000007", "vid-000008", "vid-000009"}
    assert all(h.video_id not in deleted for h in index.search(vecs[37], 10))
    # Nothing refers to the build any more: the next publish prunes it.
    delete_videos(root, ["vid-000010"], keep=2)
    assert first["version"] not in store.list_versions(root)
    assert not version_path(root, first["version"]).exists()


def test_compaction_restores_rows_and_ranks_like_before(ivf_index):
    root, first, vecs = ivf_index
    delete_videos(root, [f"vid-{v:06d}" for v in range(0, 40)])  # 10 % of the rows
    assert compact_index(root, threshold=0.2, progress=False) is None
    tombstoned = delete_videos(root, [f"vid-{v:06d}" for v in range(40, 120)])  # 30 %
    before = VideoIndex.open(root)
    queries = vecs[::37] + 0.01
    expected = before.search(queries, k=10)
    compacted = compact_index(root, threshold=0.2, progress=False)
    assert compacted is not None and compacted["parent_version"] == tombstoned["version"]
    assert "tombstones" not in compacted and compacted["count"] == first["count"] - 600
    rewritten = {p.name for p in version_path(root, compacted["version"]).iterdir()}
    assert rewritten >= {"index.faiss", "ids.arrow"}
    after = VideoIndex.open(root)
    assert after.indexes[0].ntotal == len(after) == first["count"] - 600  # FAISS holds live rows only
    got = after.search(queries, k=10)
    for a, b in zip(expected, got):  # same trained lists, same codes: the same ranking
        assert [(h.video_id, round(h.score, 5)) for h in a] == [(h.video_id, round(h.score, 5)) for h in b]
    assert after.meta["recall"] > 0.9
    assert VideoIndex.open(root, version=tombstoned["version"]).search(queries[0], 1)  # still opens


def test_compaction_of_a_flat_index_equals_a_fresh_build_of_the_kept_rows(tmp_path):
    vecs = clustered_vectors(900, DIM, seed=4)
    emb = write_embeddings(tmp_path / "emb", vecs, clips_per_video=3, model_id="toy@abc")
    build_index(emb, tmp_path / "idx", factory="Flat", progress=False)
    gone = [f"vid-{v:06d}" for v in range(0, 300, 2)]  # half the videos
    delete_videos(tmp_path / "idx", gone)
    compacted = compact_index(tmp_path / "idx", progress=False)
    kept_rows = np.concatenate([np.arange(3 * v, 3 * v + 3) for v in range(1, 300, 2)])
    kept = write_embeddings(tmp_path / "kept", vecs[kept_rows], clips_per_video=3, model_id="toy@abc",
                            start_id=0)
    fresh_meta = build_index(kept, tmp_path / "fresh", factory="Flat", progress=False)
    assert compacted["count"] == fresh_meta["count"] == 450
    queries = clustered_vectors(20, DIM, seed=8)
    fresh = VideoIndex.open(tmp_path / "fresh").search(queries, k=8)
    got = VideoIndex.open(tmp_path / "idx").search(queries, k=8)
    names = {f"vid-{i:06d}": f"vid-{v:06d}" for i, v in enumerate(range(1, 300, 2))}  # kept's renumbering
    for a, b in zip(fresh, got):
        assert [(names[h.video_id], round(h.score, 5)) for h in a] == [
            (h.video_id, round(h.score, 5)) for h in b]


def test_a_corrupt_tombstone_file_is_a_clear_error(ivf_index):
    root, _first, _vecs = ivf_index
    meta = delete_videos(root, ["vid-000001"])
    (version_path(root, meta["version"]) / TOMBSTONES_FILE).write_bytes(b"not parquet")
    with pytest.raises(store.CorruptIndexError, match="tombstones.parquet"):
        VideoIndex.open(root)
    assert os.path.exists(version_path(root, meta["version"]))


def test_delete_and_compaction_on_s3_share_objects_across_versions(s3_bucket, tmp_path, monkeypatch):
    from runtime import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    vecs = clustered_vectors(300, DIM, seed=6)
    emb = write_embeddings(tmp_path / "emb", vecs, clips_per_video=3, model_id="toy@abc")
    idx = f"{s3_bucket}/idx"
    first = build_index(emb, idx, factory="Flat", progress=False)
    gone = [f"vid-{v:06d}" for v in range(0, 100, 4)]
    deleted = delete_videos(idx, gone)
    objects = {storage.name(u) for u in storage.list_files(store.version_uri(idx, deleted["version"]))}
    assert objects == {TOMBSTONES_FILE, store.PROBE_FILE, "index.json"}
    index = VideoIndex.open(idx)  # the FAISS / ids objects come from the first version's prefix
    assert len(index) == 300 - 75
    for hits in index.search(vecs[::9], k=10):
        assert not set(gone) & {h.video_id for h in hits}
    compacted = compact_index(idx, threshold=0.2, progress=False)
    assert compacted["count"] == 225 and VideoIndex.open(idx).indexes[0].ntotal == 225
    assert VideoIndex.open(idx, version=first["version"]).search(vecs[0], k=1)[0].video_id == "vid-000000"
