"""The wave-3 seams between the index and the service (docs/architecture.md, "Seams"): the Searcher the
service asks for hits, and the one publish that every writer goes through."""

from __future__ import annotations

import numpy as np
import pytest

from index import store
from index.build import build_index
from index.query import VideoIndex
from index.searcher import RankedResult, Searcher
from index.testing import clustered_vectors, write_embeddings


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("seams")
    vectors = clustered_vectors(600, 16, seed=3)
    write_embeddings(root / "emb", vectors, clips_per_video=3)
    build_index(str(root / "emb"), str(root / "idx"))
    return root / "idx", vectors


def test_video_index_is_a_searcher_and_rank_equals_search(small_index):
    root, vectors = small_index
    index = VideoIndex.open(root)
    assert isinstance(index, Searcher)
    queries = vectors[:5] + 0.01
    ranked = index.rank(queries, k=7)
    assert isinstance(ranked, RankedResult) and not ranked.partial and ranked.missing_shards == ()
    expected = index.search(queries, k=7)
    assert [[h.video_id for h in hits] for hits in ranked.hits] == [[h.video_id for h in hits]
                                                                   for hits in expected]
    allowed = np.arange(0, 60, dtype=np.int64)  # the first 20 videos' clips
    filtered = index.rank(queries, k=3, allowed_ids=allowed).hits
    assert all(int(h.video_id.rsplit("-", 1)[1]) < 20 for hits in filtered for h in hits)


def test_publish_refuses_when_current_moved(small_index, tmp_path):
    root, _ = small_index
    before = store.read_current(root)
    version = store.new_version_name(root)
    stage = store.staging_dir(root, version)
    (stage / "note.txt").write_text("x")
    meta = dict(store.read_meta(store.version_dir(root)))
    with pytest.raises(store.PublishConflict, match="CURRENT moved"):
        store.publish(root, stage, meta, version, expected_current="000000-not-the-current-one")
    assert store.read_current(root) == before
    store.discard_stage(root, stage, version)
