"""VideoIndex query API: vectors and text (real tiny CLIP4Clip), clip→video collapsing, rerank, errors."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

import index.query as index_query
from index import Hit, VideoIndex, build_index
from index.testing import clustered_vectors, write_embeddings

DIM = 32


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory):
    """60 videos × 5 clips; clip 0 of each video is the one closest to the video's anchor vector."""
    tmp = tmp_path_factory.mktemp("qidx")
    rng = np.random.default_rng(0)
    anchors = clustered_vectors(60, DIM, seed=21, clusters=6)
    clips = []
    for a in anchors:
        for c in range(5):
            clips.append(a + (0.05 + 0.4 * c) * rng.normal(size=DIM).astype(np.float32))
    emb = write_embeddings(tmp / "emb", np.stack(clips), clips_per_video=5, model_id="toy@abc",
                           captions=[[f"video number {v}", "another"] for v in range(60)])
    build_index(emb, tmp / "idx", factory="Flat", num_probes=16, progress=False)
    return tmp / "idx", anchors, np.stack(clips)


def test_vector_search_collapses_clips_to_videos(clip_index):
    path, anchors, clips = clip_index
    index = VideoIndex.open(path)
    hits = index.search(anchors[3], k=10)
    assert isinstance(hits, list) and all(isinstance(h, Hit) for h in hits)
    assert len(hits) == 10 and len({h.video_id for h in hits}) == 10  # k distinct videos despite 5 clips each
    top = hits[0]
    assert top.video_id == "vid-000003" and top.clip_index == 0
    assert (top.start_s, top.end_s) == (0.0, 1.0) and top.caption == "video number 3"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # The max score equals the exact cosine with the best clip.
    q = anchors[3] / np.linalg.norm(anchors[3])
    best = max(float(q @ (c / np.linalg.norm(c))) for c in clips[15:20])
    assert top.score == pytest.approx(best, abs=1e-5)
    # Batched vectors → one list per query; mean aggregation scores ≤ max aggregation scores.
    batch = index.search(anchors[:4], k=3)
    assert len(batch) == 4 and [b[0].video_id for b in batch] == [f"vid-{i:06d}" for i in range(4)]
    mean_hits = index.search(anchors[3], k=10, aggregate="mean")
    by_id = {h.video_id: h.score for h in hits}
    assert all(h.score <= by_id.get(h.video_id, 1.0) + 1e-6 for h in mean_hits)
    assert any(h.num_clips > 1 for h in mean_hits)
    # A memory-mapped open gives the same answers.
    mapped = VideoIndex.open(path, mmap=True).search(anchors[3], k=10)
    assert [(h.video_id, round(h.score, 5)) for h in mapped] == [
        (h.video_id, round(h.score, 5)) for h in hits]


def test_rerank_hook_reorders(clip_index):
    path, anchors, _ = clip_index
    index = VideoIndex.open(path)
    seen = {}

    def prefer_last(query_text, hits):
        seen["text"] = query_text
        return [Hit(**{**h.to_dict(), "score": float(i)}) for i, h in enumerate(hits)]

    plain = index.search(anchors[5], k=5)
    reranked = index.search(anchors[5], k=5, rerank=prefer_last)
    assert seen["text"] is None
    assert reranked[0].video_id != plain[0].video_id and reranked[0].score > reranked[-1].score
    with pytest.raises(TypeError, match="rerank"):
        index.search(anchors[5], k=5, rerank=lambda q, h: None)


def test_query_errors_are_clear(clip_index):
    path, anchors, _ = clip_index
    index = VideoIndex.open(path)
    with pytest.raises(ValueError, match="dim 7"):
        index.search(np.ones(7, np.float32), k=3)
    with pytest.raises(ValueError, match="empty"):
        index.search([], k=3)
    with pytest.raises(ValueError, match="empty"):
        index.search(np.zeros((0, DIM), np.float32), k=3)
    with pytest.raises(ValueError, match="empty text query"):
        index.search(["ok", "  "], k=3)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full(DIM, np.nan, np.float32), k=3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(anchors[0], k=0)
    with pytest.raises(ValueError, match="no model_name"):
        index.search("a query needs a text encoder", k=3)


@pytest.fixture(scope="module")
def text_index(tmp_path_factory):
    """Real tiny CLIP4Clip: checkpoint saved here, video embeddings from encode_video on random frames."""
    import models

    tmp = tmp_path_factory.mktemp("textidx")
    torch.manual_seed(0)
    model, transform, _ = models.create_model("clip4clip-meanP-tiny")
    model.eval()
    ckpt = models.save_checkpoint(model, tmp / "c4c.pt")
    frames = np.random.default_rng(0).integers(0, 255, size=(12, 4, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        video_emb = model.encode_video(torch.as_tensor(transform(frames))).numpy()
    emb = write_embeddings(tmp / "emb", video_emb, model_id=model.model_id, model_name="clip4clip-meanP-tiny",
                           pretrained=str(ckpt))
    build_index(emb, tmp / "idx", progress=False)
    return tmp / "idx", model, video_emb, ckpt


def test_text_query_with_real_model(text_index):
    path, model, video_emb, _ = text_index
    index = VideoIndex.open(path)  # builds the encoder from index.json's model_name + pretrained
    texts = ["a red square moving left", "two blue circles"]
    results = index.search(texts, k=5)
    with torch.no_grad():
        text_emb = model.encode_text(texts).numpy()
    for hits, t in zip(results, text_emb):
        exact = np.argsort(-(video_emb @ t))[:5]
        assert [h.video_id for h in hits] == [f"vid-{i:06d}" for i in exact]
        assert hits[0].score == pytest.approx(float(video_emb[exact[0]] @ t), abs=1e-4)
    single = index.search("a red square moving left", k=3)
    assert [h.video_id for h in single] == [h.video_id for h in results[0][:3]]
    # The encoder passed in is used; one with other weights (different model_id) is refused.
    assert VideoIndex.open(path, encoder=model).search(texts[0], k=1)[0].video_id == results[0][0].video_id
    import models

    other, _, _ = models.create_model("clip4clip-meanP-tiny")
    with pytest.raises(ValueError, match="does not match the index's model_id"):
        VideoIndex.open(path, encoder=other)


def test_cli_text_query(text_index, capsys):
    from jobs.index import main

    path, _, _, _ = text_index
    assert main(["query", "--index", str(path), "--text", "a green triangle", "-k", "4"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert line["query"] == "a green triangle" and len(line["hits"]) == 4
    assert {"video_id", "score", "start_s", "end_s", "caption"} <= set(line["hits"][0])


def test_a_forked_child_gets_its_own_shard_search_pool():
    """A process forked after the shard-search pool started (multiprocessing's fork, a pre-fork server)
    searches on a pool of its own: an executor inherited from the parent counts the parent's threads as
    idle, and the child's search would wait forever on a thread that does not exist there."""
    assert index_query._shard_pool().submit(os.getpid).result() == os.getpid()  # the parent's pool is up
    pid = os.fork()
    if pid == 0:  # the child: exit 0 when its search ran, 3 when it waited 20 s
        signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
        signal.alarm(20)
        os._exit(0 if index_query._shard_pool().submit(os.getpid).result() == os.getpid() else 4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
