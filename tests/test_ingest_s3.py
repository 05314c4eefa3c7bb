"""Ingest straight to S3 (moto's S3 server: the real HTTP API) on the shared local Ray: the README's
``--input s3://…/manifest.parquet --output s3://bucket/vidsift/ingest`` example, the object layout, the
accounting, an idempotent rerun, a killed task resumed, and the shards read back from S3 by webdataset,
Ray ``read_webdataset``, the training dataset and the shard inventory -- with nothing written locally."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import boto3
import fsspec
import numpy as np
import pytest
import ray
import webdataset as wds

from jobs.ingest import main as ingest_main
from pipeline.datasets import ShardClipDataset
from pipeline.decode_stage import DecodeClipsStage, read_shards_ray
from pipeline.ingest import CRASH_ENV, IngestIncompleteError, run_ingest
from pipeline.sampling import SamplingConfig
from pipeline.shard_tar import list_shards
from pipeline.training.inventory import shard_inventory, split_count
from runtime import storage

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARDS = ("000000", "000001", "000002")
EXPECTED_KEYS = {
    "errors.parquet",
    "manifest.json",
    *(f"shards/{s}.tar" for s in SHARDS),
    *(f"shards/{s}.parquet" for s in SHARDS),
    *(f"shard_errors/{s}.parquet" for s in SHARDS),
}


def objects(uri: str) -> dict[str, dict]:
    """``{key relative to uri: {"etag", "modified", "size"}}`` of every object under ``uri``."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {
        o["Key"][len(prefix):]: {"etag": o["ETag"], "modified": o["LastModified"], "size": o["Size"]}
        for page in pages for o in page.get("Contents", [])
    }


def upload_corpus(corpus: Path, uri: str) -> str:
    """The synthetic corpus (manifest with relative paths + videos) copied under ``uri``."""
    storage.upload(corpus / "manifest.parquet", storage.join(uri, "manifest.parquet"))
    for video in sorted((corpus / "videos").glob("*.mp4")):
        storage.upload(video, storage.join(uri, "videos", video.name))
    return storage.join(uri, "manifest.parquet")


def local_tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """Run from an empty folder, so any local write (a folder named ``s3:``...) shows up."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_readme_example_writes_only_to_s3_and_reruns_idempotently(
    s3_bucket, synthetic_corpus, ray_local, empty_cwd
):
    manifest = upload_corpus(synthetic_corpus, f"{s3_bucket}/raw")
    out = f"{s3_bucket}/vidsift/ingest"
    argv = ["--input", manifest, "--output", out, "--samples-per-shard", "8", "--quiet"]
    assert ingest_main(argv) == 0
    first = objects(out)
    assert set(first) == EXPECTED_KEYS
    run = storage.read_json(storage.join(out, "manifest.json"))
    summary = run["summary"]
    assert summary["inputs"] == 24 and summary["samples"] + summary["errors"] == 24 and summary["complete"]
    assert summary["output"] == out
    assert [s["tar"] for s in run["shards"]] == [f"shards/{s}.tar" for s in SHARDS]
    assert storage.read_parquet(storage.join(out, "errors.parquet")).num_rows == summary["errors"] == 0
    # Every sample holds the bytes of its source video (read from s3), listed in its shard's index.
    for shard in SHARDS:
        data = storage.read_bytes(storage.join(out, "shards", f"{shard}.tar"))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        index = storage.read_parquet(storage.join(out, "shards", f"{shard}.parquet")).to_pylist()
        assert len(members) == 2 * len(index) == 16
        for row in index:
            video = (synthetic_corpus / "videos" / f"{row['video_id']}.mp4").read_bytes()
            assert members[f"{row['key']}.mp4"] == video
            assert row["sha256"] == hashlib.sha256(video).hexdigest()
            assert row["source"] == f"{s3_bucket}/raw/videos/{row['video_id']}.mp4"

    time.sleep(1.1)  # LastModified has one-second resolution
    again = run_ingest(manifest, out, samples_per_shard=8, progress=False)
    assert again["shards_skipped"] == 3 and again["shards_written"] == 0 and again["samples"] == 24
    second = objects(out)
    assert set(second) == EXPECTED_KEYS
    for key in EXPECTED_KEYS - {"errors.parquet", "manifest.json"}:
        assert second[key] == first[key], f"{key} was rewritten by an idempotent rerun"

    # A new plan (12 a shard) replaces the shards and removes the stale ones of the old plan.
    regrouped = run_ingest(manifest, out, samples_per_shard=12, progress=False)
    assert regrouped["shards"] == 2 and regrouped["shards_written"] == 2
    assert {k for k in objects(out) if k.startswith("shard")} == {
        f"{folder}/{s}.{ext}" for s in SHARDS[:2] for folder, ext in
        (("shards", "tar"), ("shards", "parquet"), ("shard_errors", "parquet"))
    }
    # Nothing local: not in the driver's folder, nor a folder named "s3:" where the Ray workers run.
    assert local_tree(empty_cwd) == set() and not list(REPO_ROOT.glob("s3:*"))


def test_killed_task_leaves_no_partial_shard_and_rerun_resumes(
    s3_bucket, synthetic_corpus, ray_local, empty_cwd, tmp_path, monkeypatch
):
    out = f"{s3_bucket}/ingest"
    manifest = str(synthetic_corpus / "manifest.parquet")
    monkeypatch.setenv(CRASH_ENV, f"1:{tmp_path / 'crashed-once'}")
    with pytest.raises(IngestIncompleteError, match="000001"):
        run_ingest(manifest, out, samples_per_shard=8, task_retries=0, progress=False)
    assert (tmp_path / "crashed-once").exists()
    partial = objects(out)
    # The killed task wrote its tar to a local temp file: no object of shard 1 exists, not even a torn one.
    assert not any("000001" in key for key in partial)
    assert {"shards/000000.parquet", "shards/000002.parquet", "manifest.json"} <= set(partial)
    failed = storage.read_json(storage.join(out, "manifest.json"))["summary"]
    assert failed["failed_shards"] == ["000001"] and failed["unfinished"] == 8 and not failed["complete"]
    monkeypatch.delenv(CRASH_ENV)
    summary = run_ingest(manifest, out, samples_per_shard=8, progress=False)
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 2 and summary["complete"]
    assert set(objects(out)) == EXPECTED_KEYS
    for key in ("shards/000000.tar", "shards/000002.tar"):
        assert objects(out)[key] == partial[key]  # finished shards were not redone
    ids = [r["video_id"] for s in SHARDS
           for r in storage.read_parquet(storage.join(out, "shards", f"{s}.parquet")).to_pylist()]
    assert len(ids) == 24 == len(set(ids))  # every input once, no duplicates
    assert local_tree(empty_cwd) == set()


def _gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
    """webdataset's opener for s3:// (its own knows local files, pipe: and http only): fsspec/s3fs."""
    return fsspec.open(url, mode).open()


def test_s3_shards_are_read_by_webdataset_ray_and_the_training_readers(
    s3_bucket, synthetic_corpus, ray_local, empty_cwd, monkeypatch
):
    out = f"{s3_bucket}/ingest"
    run_ingest(str(synthetic_corpus / "manifest.parquet"), out, samples_per_shard=8, progress=False)
    urls = list_shards(out)
    assert urls == [f"{out}/shards/{s}.tar" for s in SHARDS]

    # Plain webdataset, straight from s3 (an s3 opener registered the documented way).
    monkeypatch.setitem(wds.gopen_schemes, "s3", _gopen_fsspec)
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 24
    assert all(json.loads(s["json"])["key"] == s["__key__"] and s["mp4"][4:8] == b"ftyp" for s in samples)

    # Ray Data's own reader with the store's pyarrow filesystem (workers get the store's settings).
    fs, _ = storage.arrow_filesystem(urls[0])
    paths = [storage.arrow_filesystem(u)[1] for u in urls]
    ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None,
                                  runtime_env={"env_vars": storage.storage_env()})
    assert {r["__key__"] for r in ds.take_all()} == {s["__key__"] for s in samples}

    # vidsift's readers: read_shards_ray + DecodeClipsStage, ShardClipDataset, the shard inventory.
    batch = read_shards_ray(out, override_num_blocks=1).take_batch(3, batch_format="numpy")
    decoded = DecodeClipsStage(sampling=SamplingConfig(num_clips=1, frames_per_clip=2, mode="eval"),
                               size=8)(batch)
    assert list(decoded["error"]) == ["", "", ""] and np.asarray(decoded["mask"]).all()
    dataset = ShardClipDataset(out, size=8, shuffle_shards=False)
    assert sorted(s["__key__"] for s in dataset.raw_samples()) == sorted(s["__key__"] for s in samples)
    inventory = shard_inventory(out)
    assert list(inventory) == urls and sum(sum(c.values()) for c in inventory.values()) == 24
    assert split_count(inventory, "train") == sum(json.loads(s["json"])["split"] == "train" for s in samples)
    assert local_tree(empty_cwd) == set() and "AWS_ENDPOINT_URL" in os.environ
