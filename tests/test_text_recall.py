"""The recall promise for the queries users send (issue #17, item 6): builds tune nprobe / efSearch on text
queries (caption embeddings from ``jobs.embed --with-text``, a service's query log) and record which query
set they used; the service writes that query log."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import models
from index import VideoIndex, build_index, store
from index.testing import write_embeddings
from index.tuning import read_caption_vectors, read_query_log, recall_at_k
from workflows.serve import QueryLog, build_app, serving_in_thread

DIM = 32
MODEL = "clip4clip-meanP-tiny"


def gap_corpus(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clustered "video" vectors, and for each a "text" vector that describes it from elsewhere in the
    space: the same cluster direction, a shared modality offset and more noise (as text/video embeddings)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(48, DIM))
    labels = rng.integers(0, len(centers), n)
    videos = centers[labels] + 0.45 * rng.normal(size=(n, DIM))
    gap = rng.normal(size=DIM)
    gap = 0.8 * np.sqrt(DIM) * gap / np.linalg.norm(gap)  # as long as a cluster direction
    texts = centers[labels] + gap + 0.8 * rng.normal(size=(n, DIM))
    return videos.astype(np.float32), texts.astype(np.float32)


def write_captions(folder, texts: np.ndarray, video_ids: list[str]) -> None:
    """Caption embeddings as ``jobs.embed --with-text`` writes them (video_id, caption, embedding)."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = pa.array(np.asarray(texts, np.float32).reshape(-1), pa.float32())
    table = pa.table({"video_id": video_ids, "caption": [f"caption {i}" for i in range(len(texts))],
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, texts.shape[1])})
    pq.write_table(table, folder / "part-000000.parquet")


def exact_recall(vi: VideoIndex, db: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    unit = db / np.linalg.norm(db, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(q @ unit.T), axis=1)[:, :k]  # ids are row numbers (write_embeddings start_id=0)
    return recall_at_k(vi.search_vectors(q, k)[1], truth, k)


def test_text_tuned_build_reaches_the_target_on_text_queries(tmp_path):
    videos, texts = gap_corpus(4000)
    emb = write_embeddings(tmp_path / "emb", videos)
    captions = tmp_path / "emb" / "_text" / "model_id=toy_000000"  # beside the partition: found by "auto"
    write_captions(captions, texts[:600], [f"vid-{i:06d}" for i in range(600)])
    meta = build_index(emb, tmp_path / "idx", factory="IVF64,Flat", recall_target=0.95, num_probes=200,
                       progress=False)
    tuning = meta["tuning_queries"]
    assert tuning["kind"] == "text" and tuning["count"] == 600 and tuning["from_query_log"] == 0
    assert tuning["captions"] == {"sources": [str(captions)], "distinct": 600}
    assert tuning["video_probes"] == 200
    assert meta["recall"] >= 0.95 and meta["shards"][0]["recall_target_met"]
    assert meta["shards"][0]["tuned_on"] == "text" and 0 <= meta["video_probe_recall"] <= 1
    on_disk = store.read_meta(store.version_dir(tmp_path / "idx"))
    assert on_disk["tuning_queries"] == tuning and on_disk["recall"] == meta["recall"]
    vi = VideoIndex.open(tmp_path / "idx")
    assert exact_recall(vi, videos, texts[:600]) >= 0.95  # re-measured here, not taken from index.json
    probe = np.load(tmp_path / "idx" / "versions" / meta["version"] / "probe.npz")
    assert len(probe["queries"]) == 600  # add/delete re-measure recall on the text queries
    # Without text queries the build tunes on off-data probes by default, or on held-out video vectors when
    # asked, and says which.
    old = build_index(emb, tmp_path / "idx-video", factory="IVF64,Flat", recall_target=0.95, num_probes=200,
                      text_queries=None, progress=False, no_text_rule="video")
    assert old["tuning_queries"] == {"kind": "video", "video_probes": 200} and "video_probe_recall" not in old
    default = build_index(emb, tmp_path / "idx-default", factory="IVF64,Flat", recall_target=0.95,
                          num_probes=200, text_queries=None, progress=False)
    assert default["tuning_queries"] == {"kind": "offdata", "video_probes": 200}


def test_caption_embeddings_bad_input_is_named(tmp_path):
    videos, texts = gap_corpus(300)
    emb = write_embeddings(tmp_path / "emb", videos)
    write_captions(tmp_path / "wrong-dim", np.ones((4, DIM + 1), np.float32), ["v"] * 4)
    with pytest.raises(ValueError, match=r"wrong-dim.*dim 33, the index has dim 32"):
        build_index(emb, tmp_path / "idx", factory="Flat", text_queries=str(tmp_path / "wrong-dim"))
    write_captions(tmp_path / "zero", np.zeros((2, DIM), np.float32), ["v"] * 2)
    with pytest.raises(ValueError, match="all-zero"):
        read_caption_vectors(str(tmp_path / "zero"), DIM)
    write_captions(tmp_path / "_text" / "model_id=other_1", texts[:5], ["v"] * 5)
    with pytest.raises(ValueError, match="model_id=other_1.*encoded by the index's model"):
        build_index(emb, tmp_path / "idx", text_queries=str(tmp_path / "_text" / "model_id=other_1"))
    with pytest.raises(FileNotFoundError, match="no-such"):
        build_index(emb, tmp_path / "idx", text_queries=str(tmp_path / "no-such"))
    assert not (tmp_path / "idx" / "CURRENT").exists()  # nothing was published


def test_query_log_round_trip_bounds_and_torn_lines(tmp_path):
    log = QueryLog(str(tmp_path / "log"), flush_s=60, max_pending=4)
    log.record(["a red circle", "two blue squares"], "v1")
    log.record(["a red circle", "x", "y"], "v1")  # one over max_pending: dropped, not blocking
    assert log.flush() == 4 and log.flush() == 0 and log.status()["dropped"] == 1
    log.record(["a green triangle"], "v2")
    log.stop()  # writes what is queued
    files = sorted((tmp_path / "log").glob("queries-*.jsonl"))
    assert len(files) == 2 and log.status()["files"] == 2 and log.status()["logged"] == 5
    assert json.loads(files[1].read_text())["version"] == "v2"
    assert read_query_log(str(tmp_path / "log")) == ["a red circle", "two blue squares", "x",
                                                     "a green triangle"]
    (tmp_path / "log" / "queries-torn.jsonl").write_text('{"q": "whole"}\n{"q": "cut sh')
    assert read_query_log(str(tmp_path / "log"))[-1] == "whole"  # the torn last line is skipped
    (tmp_path / "bad.jsonl").write_text('{"q": "fine"}\nnot json\n{"q": "after"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl' line 2: not JSON"):
        read_query_log(str(tmp_path / "bad.jsonl"))
    (tmp_path / "noq.jsonl").write_text('{"text": "no q"}\n')
    with pytest.raises(ValueError, match=r"line 1: needs a non-empty string field 'q'"):
        read_query_log(str(tmp_path / "noq.jsonl"))
    small = QueryLog(str(tmp_path / "small"), max_bytes=110)  # one line is ~70 bytes
    small.record(["a" * 20, "b" * 20], "v")
    assert small.flush() == 1 and small.status()["dropped"] == 1  # the byte budget cuts at whole lines
    with pytest.raises(ValueError, match="is a file"):
        QueryLog(str(tmp_path / "bad.jsonl"))


def test_service_query_log_feeds_the_next_build(tmp_path):
    """The service logs what users search for; the next build tunes on exactly those texts and records it."""
    model, _, _ = models.create_model(MODEL, seed=0)
    ckpt = models.save_checkpoint(model, tmp_path / "c4c.pt")
    dim = model.encode_text(["x"]).shape[1]
    videos = np.random.default_rng(1).normal(size=(600, dim)).astype(np.float32)
    emb = write_embeddings(tmp_path / "emb", videos, clips_per_video=2, model_id=model.model_id,
                           model_name=MODEL, pretrained=str(ckpt))
    build_index(emb, tmp_path / "idx", factory="Flat", progress=False)
    app = build_app(str(tmp_path / "idx"), poll_s=0, query_log=str(tmp_path / "qlog"))
    sent = ["a red circle moves left", "two blue squares", "a yellow diamond grows"]
    with serving_in_thread(app) as base:
        for text in sent + sent[:1]:
            with urllib.request.urlopen(f"{base}/search?q={text.replace(' ', '+')}&k=3", timeout=30) as r:
                assert r.status == 200
        with urllib.request.urlopen(f"{base}/version", timeout=30) as r:
            assert json.loads(r.read())["query_log"]["uri"] == str(tmp_path / "qlog")
    assert read_query_log(str(tmp_path / "qlog")) == sent  # written on shutdown, distinct, in order
    meta = build_index(emb, tmp_path / "idx", factory="IVF8,Flat", recall_target=0.99, num_probes=50,
                       query_log=str(tmp_path / "qlog"), progress=False)
    assert meta["tuning_queries"]["kind"] == "text" and meta["tuning_queries"]["count"] == 3
    assert meta["tuning_queries"]["from_query_log"] == 3 and meta["recall"] >= 0.99
    assert meta["tuning_queries"]["query_log"] == {"sources": [str(tmp_path / "qlog")], "distinct": 3}
    probe = np.load(tmp_path / "idx" / "versions" / meta["version"] / "probe.npz")
    expected = model.encode_text(sent).detach().numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(probe["queries"], expected, atol=1e-5)  # the index's encoder, not another
