"""Embedding on object storage (moto's S3 server: the real S3 HTTP API): the Ray workers write each shard's
part object, the driver keeps only bookkeeping, the partition is a clean Parquet dataset for every common
reader, and reruns are idempotent (skipped shards, no duplicate rows)."""

from __future__ import annotations

import pandas as pd
import pyarrow.dataset as pads
import pytest

import workflows.embed as embed_workflow
from index import build_index, store
from pipeline.captioning import CaptionTables
from pipeline.embedding import (
    BOOKKEEPING_COLUMNS,
    EMBEDDING_COLUMNS,
    VIDEO_ROW,
    read_embed_errors,
    read_embeddings,
    read_model_card,
    shard_label,
    staging_dir,
)
from pipeline.shard_tar import list_shards
from runtime import storage
from workflows.serve.catalog import build_catalog
from workflows.serve.previews import PreviewMaker

MODEL = "clip4clip-meanP-tiny"
SAMPLING = {"num_clips": 2, "frames_per_clip": 2, "mode": "eval"}


def _embed(shards, out: str, monkeypatch) -> tuple[dict, embed_workflow.EmbedRun]:
    """run_embed, keeping the run state so the test can see what reached the driver."""
    seen = {}
    finish = embed_workflow.finish_embed

    def keep_run(run, with_text):
        seen["run"] = run
        return finish(run, with_text)

    monkeypatch.setattr(embed_workflow, "finish_embed", keep_run)
    summary = embed_workflow.run_embed(shards, MODEL, out, sampling=SAMPLING, batch_size=4,
                                       allow_random_init=True)
    return summary, seen["run"]


def _part_objects(partition: str) -> dict[str, bytes]:
    return {storage.name(u): storage.read_bytes(u) for u in storage.list_files(partition, ".parquet")}


@pytest.mark.slow
def test_embed_local_shards_to_s3(s3_bucket, ray_local, ingested_shards, monkeypatch):
    tars = list_shards(ingested_shards)
    summary, run = _embed(str(ingested_shards), f"{s3_bucket}/emb", monkeypatch)
    partition = run.partition
    assert partition.startswith(f"{s3_bucket}/emb/model_id=")
    # One part object per shard, the card, and nothing else: no folders, no fragments left behind.
    labels = sorted(shard_label(t) for t in tars)
    assert [storage.name(u) for u in storage.list_files(partition)] == [
        "_model.json", *(f"part-{label}.parquet" for label in labels)]
    assert storage.list_dirs(partition) == [] and storage.list_dirs(staging_dir(partition)) == []
    assert read_model_card(partition)["random_init"] is True
    # The driver loop saw bookkeeping only (shard, key, rows, error, fragment), never a vector.
    assert run.driver_columns == set(BOOKKEEPING_COLUMNS)
    table = read_embeddings(partition)
    videos = sum(pd.read_parquet(t[: -len(".tar")] + ".parquet").shape[0] for t in tars)
    assert summary["videos"] == videos == table.column("clip_index").to_pylist().count(VIDEO_ROW)
    assert table.num_rows == summary["videos"] + summary["clips"] == videos * (1 + SAMPLING["num_clips"])
    assert summary["errors"] == read_embed_errors(partition).num_rows == 0
    # Every reader gets the embedding table, all of it, straight from the partition URI.
    fs, path = storage.arrow_filesystem(partition)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    assert dataset.schema.names == list(EMBEDDING_COLUMNS) and dataset.count_rows() == table.num_rows
    frame = pd.read_parquet(partition)  # pandas → fsspec/s3fs, endpoint from AWS_ENDPOINT_URL
    assert list(frame.columns) == list(EMBEDDING_COLUMNS) and len(frame) == table.num_rows
    ds = ray_local.data.read_parquet(partition, runtime_env={"env_vars": storage.storage_env()})
    assert set(ds.schema().names) == set(EMBEDDING_COLUMNS) and ds.count() == table.num_rows
    # Rerun: every shard skipped, no object rewritten.
    before = _part_objects(partition)
    again, _ = _embed(str(ingested_shards), f"{s3_bucket}/emb", monkeypatch)
    assert again["shards_embedded"] == 0 and again["videos"] == 0
    assert _part_objects(partition) == before
    # A lost part (a run killed before that shard's put) is redone alone, without duplicate rows.
    lost = f"part-{labels[0]}.parquet"
    storage.remove(storage.join(partition, lost))
    third, _ = _embed(str(ingested_shards), f"{s3_bucket}/emb", monkeypatch)
    assert third["shards_embedded"] == 1 and third["videos"] == pd.read_parquet(
        tars[0][: -len(".tar")] + ".parquet").shape[0]
    ids = read_embeddings(partition).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == table.num_rows
    assert set(_part_objects(partition)) == set(before)


@pytest.mark.slow
def test_embed_s3_shards(s3_bucket, ray_local, ingested_shards, monkeypatch, tmp_path):
    """Shards on S3 in (listed by pipeline.shard_tar.list_shards), embeddings on S3 out, and the lineage
    chain on S3: index.json records the s3:// shard tars and the catalog reads previews from them."""
    for tar in list_shards(ingested_shards):
        for suffix in (".tar", ".parquet"):
            local = tar[: -len(".tar")] + suffix
            storage.upload(local, f"{s3_bucket}/ingest/shards/{storage.name(local)}")
    shards = f"{s3_bucket}/ingest"
    remote = list_shards(shards)  # listing s3 shards is part of what is tested: a failure fails the test
    assert [storage.name(t) for t in remote] == [storage.name(t) for t in list_shards(ingested_shards)]
    summary, run = _embed(shards, f"{s3_bucket}/emb", monkeypatch)
    assert summary["errors"] == 0 and summary["shards_embedded"] == len(remote)
    assert sorted(storage.name(u) for u in storage.list_files(run.partition, ".parquet")) == [
        f"part-ingest-{storage.name(t)[: -len('.tar')]}.parquet" for t in remote]
    assert run.driver_columns == set(BOOKKEEPING_COLUMNS)
    table = read_embeddings(run.partition)
    assert len(set(table.column("id").to_pylist())) == table.num_rows
    assert summary["videos"] == len(set(table.column("video_id").to_pylist()))
    # Lineage on S3: the rows record the s3:// shard tars; the index records them; they resolve.
    assert sorted(set(table.column("shard_uri").to_pylist())) == sorted(remote)
    assert all(t.startswith(f"{s3_bucket}/ingest/shards/") for t in remote)
    meta = build_index(f"{s3_bucket}/emb", f"{s3_bucket}/idx", factory="Flat", progress=False)
    assert meta["lineage"]["shards"] == sorted(remote) and meta["lineage"]["embeddings"] == [run.partition]
    ids = store.read_ids(store.version_dir(f"{s3_bucket}/idx", meta["version"]), meta)
    catalog = build_catalog(ids, meta=meta)
    assert catalog.shards_from == "lineage" and catalog.degraded is None and catalog.previews_note is None
    assert len(catalog.sources) == summary["videos"] and catalog.videos["synth-000000"]["fps"] == 10
    tar, key = catalog.sources["synth-000000"]
    assert tar in remote
    webp = PreviewMaker(tmp_path / "previews").render((tar, key), 0.0, 1.0)
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"


def test_caption_tables_on_s3(s3_bucket):
    """The caption tables go to any store, one complete object each."""
    tables = CaptionTables("swinbert-tiny@x")
    tables.add_batch({"key": ["k1", "k0"], "video_id": ["v1", "v0"], "caption": ["a", ""],
                      "score": [-1.0, float("nan")], "caption_scores": ['[["a red circle", -2.0]]', "[]"],
                      "error": ["", "decode_error"], "error_message": ["", "boom"]})
    out = f"{s3_bucket}/captions"
    tables.write(out, score_captions=True)
    names = [storage.name(u) for u in storage.list_files(out)]
    assert names == ["caption_scores.parquet", "captions.parquet", "errors.parquet"]
    assert storage.read_parquet(storage.join(out, "captions.parquet")).column("key").to_pylist() == ["k1"]
    assert storage.read_parquet(storage.join(out, "errors.parquet")).column("key").to_pylist() == ["k0"]
    assert storage.read_parquet(storage.join(out, "caption_scores.parquet")).num_rows == 1
