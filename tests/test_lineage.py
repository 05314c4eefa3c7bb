"""Lineage: the embeddings record the shard tars they came from, index.json records its embeddings, shard
tars and model, and the service finds previews and ingest metadata from ``--index`` alone (``--shards``
overrides; a moved tree is a degraded reason, never a crash; artifacts without lineage still need the flag).

One chain for the module: the session's ingested corpus copied into this module's folder (so that it can be
moved) → ``run_embed`` with a saved checkpoint → ``build_index`` → the real Starlette app over HTTP, and
``python -m jobs.serve --index`` in a subprocess."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, free_port
from PIL import Image
from test_serve import call, write_generated_captions

import models
from index import add_embeddings, build_index, store
from index.annotations import record_captions, recorded_captions
from index.embeddings import SHARD_URI_COLUMN
from index.testing import clustered_vectors, write_embeddings, write_synthetic_version
from pipeline.embedding import LINEAGE_COLUMNS, list_parts, read_embeddings, shard_label
from pipeline.shard_tar import list_shards
from runtime import storage
from workflows.embed import run_embed
from workflows.serve import build_app, serving_in_thread
from workflows.serve.catalog import build_catalog

MODEL = "clip4clip-meanP-tiny"
SAMPLING = {"num_clips": 2, "frames_per_clip": 2, "mode": "eval"}
QUERY = "/search?q=a+red+circle+moves+left&k=10"


@pytest.fixture(scope="module")
def chain(ray_local, ingested_shards, tmp_path_factory):
    """ingest (copied here) → embed (saved checkpoint) → index: the paths of each artifact."""
    tmp = tmp_path_factory.mktemp("lineage")
    ingest = tmp / "ingest"
    shutil.copytree(ingested_shards, ingest)
    model, _, _ = models.create_model(MODEL, seed=0)
    ckpt = models.save_checkpoint(model, tmp / "c4c.pt")
    summary = run_embed(str(ingest), MODEL, str(tmp / "emb"), pretrained=str(ckpt), sampling=SAMPLING,
                        batch_size=4)
    assert summary["errors"] == 0 and summary["videos"] > 0
    meta = build_index(tmp / "emb", tmp / "idx", factory="Flat", progress=False)
    return {"tmp": tmp, "ingest": ingest, "ckpt": ckpt, "partition": summary["partition"],
            "index": tmp / "idx", "meta": meta, "tars": list_shards(str(ingest))}


@contextlib.contextmanager
def moved(tree: Path, to: Path):
    """``tree`` renamed to ``to`` for the block (a moved ingest folder), then put back."""
    tree.rename(to)
    try:
        yield to
    finally:
        to.rename(tree)


def test_lineage_columns_agree():
    """index/ reads the column pipeline/embedding writes (the layers do not import each other)."""
    assert LINEAGE_COLUMNS == (SHARD_URI_COLUMN,)


def test_embeddings_record_their_shard_tars(chain):
    tars = chain["tars"]
    assert all(os.path.isabs(t) for t in tars)
    for part in list_parts(chain["partition"]):
        table = pq.read_table(part, columns=["shard", SHARD_URI_COLUMN])
        (uri,) = set(table.column(SHARD_URI_COLUMN).to_pylist())  # one shard tar a part
        assert uri in tars and {shard_label(uri)} == set(table.column("shard").to_pylist())
    table = read_embeddings(chain["partition"])
    assert sorted(set(table.column(SHARD_URI_COLUMN).to_pylist())) == sorted(tars)


def test_index_records_embeddings_shards_and_model(chain):
    lineage = store.read_meta(store.version_dir(chain["index"], chain["meta"]["version"]))["lineage"]
    assert lineage["embeddings"] == [chain["partition"]]
    assert lineage["shards"] == sorted(chain["tars"]) and lineage["unrecorded"] == []
    assert lineage["model"]["checkpoint"] == str(chain["ckpt"].absolute())
    assert lineage["model"]["model_name"] == MODEL and lineage["model"]["random_init"] is False
    assert lineage["model"]["model_id"] == chain["meta"]["model_id"]


def _assert_preview_and_metadata(base: str) -> dict:
    status, body = call(base, QUERY)
    assert status == 200 and len(body["hits"]) == 10
    assert all(h["preview_url"] and h["preview_url"].startswith("/previews/") for h in body["hits"])
    hit = body["hits"][0]
    status, data = call(base, hit["preview_url"])
    assert status == 200 and Image.open(io.BytesIO(data)).format == "WEBP"
    status, video = call(base, f"/videos/{hit['video_id']}")
    assert status == 200 and video["has_preview"]
    # ingest metadata (from the shard's NNNNNN.parquet, not from the index): fps, size, codec, split
    assert video["metadata"]["fps"] == 10 and video["metadata"]["width"] == 64 and video["metadata"]["split"]
    return hit


def test_service_with_index_only_finds_previews_and_metadata(chain):
    app = build_app(str(chain["index"]), poll_s=0, cache_dir=str(chain["tmp"] / "previews-a"))
    with serving_in_thread(app) as base:
        _assert_preview_and_metadata(base)
        status, info = call(base, "/version")
        assert info["previews"] and info["shards_from"] == "lineage" and info["previews_note"] is None
        assert call(base, "/healthz")[1]["status"] == "ok"


def test_moved_tree_is_degraded_and_shards_flag_overrides(chain):
    tmp = chain["tmp"]
    with moved(chain["ingest"], tmp / "ingest-moved") as where:
        app = build_app(str(chain["index"]), poll_s=0, cache_dir=str(tmp / "previews-b"))
        with serving_in_thread(app) as base:
            health = call(base, "/healthz")[1]
            assert health["status"] == "degraded" and health["version"] == chain["meta"]["version"]
            assert "cannot be read (moved or deleted?)" in health["reason"] and "--shards" in health["reason"]
            assert chain["tars"][0] in health["reason"] or any(t in health["reason"] for t in chain["tars"])
            status, body = call(base, QUERY)  # searches still answer, without previews
            assert status == 200 and len(body["hits"]) == 10
            assert all(h["preview_url"] is None for h in body["hits"])
            vid = body["hits"][0]["video_id"]
            status, err = call(base, f"/previews/{vid}.webp?start=0&end=1")
            assert status == 404 and "cannot be read (moved or deleted?)" in err["error"]
            status, info = call(base, "/version")
            assert not info["previews"] and "--shards" in info["previews_note"]
        # --shards says where the tree is now: it overrides the recorded URIs
        app = build_app(str(chain["index"]), poll_s=0, shards=[str(where)], cache_dir=str(tmp / "previews-c"))
        with serving_in_thread(app) as base:
            hit = _assert_preview_and_metadata(base)
            assert call(base, "/healthz")[1]["status"] == "ok"
            assert call(base, "/version")[1]["shards_from"] == "flags"
            tar, _key = app.state.live.current.catalog.sources[hit["video_id"]]
            assert tar.startswith(str(where) + os.sep)


def test_shards_flag_overrides_reachable_lineage(chain, tmp_path):
    """Given --shards, the service reads those (a copy here) even though the recorded tars are reachable."""
    copy = tmp_path / "copy"
    shutil.copytree(chain["ingest"], copy)
    app = build_app(str(chain["index"]), poll_s=0, shards=[str(copy)], cache_dir=str(tmp_path / "previews"))
    sources = app.state.live.current.catalog.sources
    assert sources and all(tar.startswith(str(copy) + os.sep) for tar, _ in sources.values())
    app.state.live.stop()


def test_jobs_serve_with_index_only(chain):
    """``python -m jobs.serve --index X``: no other flag; previews and metadata come from the lineage."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", "--index", str(chain["index"]), "--port",
                             str(port), "--poll-s", "0", "--preview-cache", str(chain["tmp"] / "previews-d")],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            with contextlib.suppress(OSError):
                if call(base, "/healthz", timeout=2)[0] == 200:
                    break
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            assert time.time() < deadline, "jobs.serve did not start"
            time.sleep(0.3)
        _assert_preview_and_metadata(base)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_add_merges_lineage_and_names_unrecorded_embeddings(chain, tmp_path):
    """An add keeps the recorded shards and names the embeddings that record none (written by another
    writer, or before lineage): their videos need --shards for previews, and the note says so."""
    root = tmp_path / "idx"
    shutil.copytree(chain["index"], root)
    extra = tmp_path / "extra"
    write_embeddings(extra, clustered_vectors(3, chain["meta"]["dim"], seed=4), video_prefix="extra",
                     model_id=chain["meta"]["model_id"], model_name=MODEL, start_id=10_000)
    meta = add_embeddings(root, extra, progress=False)
    lineage = meta["lineage"]
    assert lineage["shards"] == sorted(chain["tars"])
    assert lineage["embeddings"][0] == chain["partition"] and len(lineage["embeddings"]) == 2
    assert lineage["embeddings"][1].startswith(str(extra / "model_id="))
    assert lineage["unrecorded"] and all(u.startswith(str(extra)) for u in lineage["unrecorded"])
    catalog = build_catalog(store.read_ids(store.version_dir(root, meta["version"]), meta), meta=meta)
    assert catalog.shards_from == "lineage" and catalog.degraded is None
    assert "extra-000000" not in catalog.sources and len(catalog.sources) == len(catalog) - 3
    assert "3 of" in catalog.previews_note and "record no shard tar" in catalog.previews_note


def test_older_artifacts_without_lineage_need_the_flag(chain, tmp_path):
    """An index.json without ``lineage`` (built before it was recorded) serves without previews, and the
    note says that --shards is needed; with the flag it has them."""
    vdir = store.version_dir(chain["index"], chain["meta"]["version"])
    meta = {k: v for k, v in store.read_meta(vdir).items() if k != "lineage"}
    ids = store.read_ids(vdir, meta)
    old = build_catalog(ids, meta={**meta, "version": "v-old"})
    assert old.sources == {} and old.shards_from is None and old.degraded is None
    assert "'v-old' records no lineage" in old.previews_note and "--shards" in old.previews_note
    flagged = build_catalog(ids, shards=[str(chain["ingest"])], meta=meta)
    assert len(flagged.sources) == len(flagged) and flagged.previews_note is None
    # embeddings written without the shard_uri column (an older jobs.embed) give an index with no shards
    emb = tmp_path / "emb"
    write_embeddings(emb, clustered_vectors(4, 8, seed=1), model_id="m@0", model_name=MODEL)
    built = build_index(emb, tmp_path / "idx", factory="Flat", progress=False)
    assert built["lineage"]["shards"] == [] and built["lineage"]["unrecorded"]
    catalog = build_catalog(store.read_ids(store.version_dir(tmp_path / "idx", built["version"]), built),
                            meta=built)
    assert catalog.shards_from is None and "predate lineage" in catalog.previews_note


def test_service_finds_the_captions_recorded_under_the_index(chain, tmp_path):
    """A caption run recorded under the index (``jobs.caption --index``, ``index.annotations``) is on the
    hits of ``--index`` alone; a recorded folder that is gone is a note, not a crash; ``--captions``
    overrides the records."""
    root = tmp_path / "idx"
    shutil.copytree(chain["index"], root)
    meta = chain["meta"]
    videos = sorted(set(store.read_ids(store.version_dir(root, meta["version"]), meta)
                        .column("video_id").to_pylist()))
    captions = write_generated_captions(tmp_path / "captions", videos)  # every other video
    record_captions(str(root), str(captions), {"model_id": "cap@0"})
    app = build_app(str(root), poll_s=0, cache_dir=str(tmp_path / "previews"))
    with serving_in_thread(app) as base:
        info = call(base, "/version")[1]
        assert info["captions_from"] == "index" and info["captions_note"] is None
        assert call(base, f"/videos/{videos[0]}")[1]["generated_caption"] == f"generated for {videos[0]}"
        assert call(base, f"/videos/{videos[1]}")[1]["generated_caption"] is None
        status, body = call(base, QUERY)
        assert status == 200 and any(h.get("generated_caption") for h in body["hits"])
    gone = tmp_path / "gone"
    record_captions(str(root), str(write_generated_captions(gone, videos[1:])), {"model_id": "cap@1"})
    shutil.rmtree(gone)
    catalog = build_catalog(store.read_ids(store.version_dir(root, meta["version"]), meta), meta=meta,
                            index_root=str(root))
    assert catalog.captions_from == "index" and str(gone) in catalog.captions_note
    assert catalog.generated == {v: f"generated for {v}" for v in videos[::2]}
    flagged = build_catalog(store.read_ids(store.version_dir(root, meta["version"]), meta), meta=meta,
                            index_root=str(root), captions=[str(write_generated_captions(tmp_path / "c2",
                                                                                         videos[1:]))])
    assert flagged.captions_from == "flags" and flagged.generated == {v: f"generated for {v}"
                                                                      for v in videos[1::2]}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_caption_runs_recording_at_once_are_all_kept(where, tmp_path, request):
    """Eight caption runs record themselves under one index at the same moment, each twice (a rerun into the
    same folder): every run is recorded exactly once and none is lost, with no lock (one object an output)."""
    base = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    root = storage.join(base, "idx")
    write_synthetic_version(root, rows=16)
    outputs = [storage.normalize(storage.join(base, f"captions-{i}")) for i in range(8)]
    start = threading.Barrier(2 * len(outputs))

    def record(output: str) -> str:
        start.wait(timeout=60)  # all writers released together
        return record_captions(root, output, {"model_id": "cap@0"})

    with concurrent.futures.ThreadPoolExecutor(2 * len(outputs)) as pool:
        uris = list(pool.map(record, outputs * 2))
    assert len(set(uris)) == len(outputs)
    assert sorted(recorded_captions(root)) == sorted(outputs)
