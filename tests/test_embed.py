"""Batch embedding: real local Ray over real shards, incremental reruns, error rows, exact embeddings."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.embed import main as embed_main
from models import create_model
from pipeline.embedding import (
    EMBEDDING_COLUMNS,
    VIDEO_ROW,
    EncodeClipsStage,
    errors_dir,
    finalize_shard,
    list_parts,
    model_partition,
    read_embed_errors,
    read_embeddings,
    shard_label,
    stable_id,
    staging_dir,
    text_dir,
    write_shard_fragments,
)
from runtime.errors import DecodeFailure
from workflows.embed import embed_captions, run_embed

MODEL = "clip4clip-meanP-tiny"
SAMPLING = {"num_clips": 2, "frames_per_clip": 2, "mode": "eval"}


@pytest.fixture(scope="module")
def embedded(ingested_shards, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb")
    summary = run_embed(str(ingested_shards), MODEL, str(out), sampling=SAMPLING, batch_size=4,
                        allow_random_init=True)
    return out, summary


def _partition(out: Path) -> Path:
    (part,) = list(out.glob("model_id=*"))
    return part


def test_every_video_embedded_once_with_clip_rows(embedded, ingested_shards):
    out, summary = embedded
    expected = sum(pq.read_metadata(p).num_rows for p in (ingested_shards / "shards").glob("*.parquet"))
    table = read_embeddings(_partition(out)).to_pylist()
    videos = [r for r in table if r["clip_index"] == VIDEO_ROW]
    assert summary["videos"] == expected == len(videos) == len({r["video_id"] for r in videos})
    assert summary["errors"] == 0
    assert len(table) - len(videos) == summary["clips"] == expected * SAMPLING["num_clips"]
    # start-up (cluster join, actors, model load) is reported apart from the throughput it hides
    assert 0 < summary["startup_s"] <= summary["seconds"]
    ids = [r["id"] for r in table]
    assert len(set(ids)) == len(ids)
    for r in table:
        assert r["id"] == stable_id(r["video_id"], r["clip_index"])
        assert r["model_id"] == summary["model_id"]
        assert 0.0 <= r["start_s"] <= r["end_s"]
        assert r["captions"], "ingest captions travel with the embeddings"
        assert abs(np.linalg.norm(r["embedding"]) - 1.0) < 1e-4
    card = json.loads((_partition(out) / "_model.json").read_text())
    assert card["model_name"] == MODEL and card["model_id"] == summary["model_id"]
    schema = pq.read_schema(next(_partition(out).glob("part-*.parquet")))
    emb_type = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.value_type == pa.float32()
    assert emb_type.list_size == len(table[0]["embedding"])


def test_rerun_embeds_nothing_and_changes_nothing(embedded, ingested_shards):
    out, _ = embedded
    parts = sorted(_partition(out).glob("part-*.parquet"))
    before = {p.name: p.read_bytes() for p in parts}
    summary = run_embed(str(ingested_shards), MODEL, str(out), sampling=SAMPLING, batch_size=4,
                        allow_random_init=True)
    assert summary["videos"] == 0 and summary["shards_embedded"] == 0
    assert {p.name: p.read_bytes() for p in sorted(_partition(out).glob("part-*.parquet"))} == before


def test_crash_and_rerun_redoes_only_the_missing_shard(embedded, ingested_shards, tmp_path):
    out, _ = embedded
    copy = tmp_path / "emb"
    shutil.copytree(out, copy)
    partition = _partition(copy)
    victim = sorted(partition.glob("part-*.parquet"))[0]
    before = read_embeddings(partition)
    victim.unlink()  # as if the run died before this shard's file was renamed into place
    summary = run_embed(str(ingested_shards), MODEL, str(copy), sampling=SAMPLING, batch_size=4,
                        allow_random_init=True)
    assert summary["shards_embedded"] == 1
    after = read_embeddings(partition)
    assert sorted(after.column("id").to_pylist()) == sorted(before.column("id").to_pylist())


def _corrupt_shard(src_tar: Path, dst_dir: Path) -> Path:
    """A copy of a shard whose first video's bytes are garbage (its json still says it is fine)."""
    dst_dir.mkdir(parents=True)
    dst = dst_dir / src_tar.name
    with tarfile.open(src_tar) as tin, tarfile.open(dst, "w") as tout:
        first = None
        for member in tin:
            data = tin.extractfile(member).read()
            if member.name.endswith(".mp4") and first is None:
                first = member.name.split(".")[0]
                data = b"\x00\x01 not a video " * 64
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dst


def test_corrupt_sample_is_recorded_not_fatal(ingested_shards, ray_local, tmp_path):
    src = sorted((ingested_shards / "shards").glob("*.tar"))[0]
    shard = _corrupt_shard(src, tmp_path / "bad" / "shards")
    out = tmp_path / "emb"
    summary = run_embed(str(shard.parent), MODEL, str(out), sampling=SAMPLING, batch_size=4,
                        allow_random_init=True)
    partition = _partition(out)
    errors = read_embed_errors(partition).to_pylist()
    assert summary["errors"] == summary["errors_total"] == len(errors) == 1
    assert errors[0]["reason"] and errors[0]["message"] and errors[0]["shard"] == shard_label(shard)
    with tarfile.open(shard) as tar:
        n_videos = sum(1 for m in tar if m.name.endswith(".mp4"))
    assert summary["videos"] == n_videos - 1  # every other video still embedded


def test_new_shard_dir_embeds_only_new_videos(embedded, ingested_shards, tmp_path):
    out, _ = embedded
    copy = tmp_path / "emb"
    shutil.copytree(out, copy)
    # Same videos re-ingested under another folder name: same ids and content hashes → nothing to embed.
    again = tmp_path / "ingest2"
    shutil.copytree(ingested_shards, again)
    summary = run_embed([str(p) for p in sorted((ingested_shards / "shards").glob("*.tar"))]
                        + [str(p) for p in sorted((again / "shards").glob("*.tar"))],
                        MODEL, str(copy), sampling=SAMPLING, batch_size=4, allow_random_init=True)
    assert summary["videos"] == 0
    assert len(read_embeddings(_partition(copy), video_level=True)) == len(
        read_embeddings(_partition(out), video_level=True))


def test_embeddings_equal_direct_model_call(embedded, ingested_shards):
    """The pipeline's vectors are the model's vectors on the same frames (no drift through Ray)."""
    from pipeline.clips import sample_clips
    from pipeline.sampling import SamplingConfig

    out, _ = embedded
    rows = read_embeddings(_partition(out)).to_pylist()
    tar_path = sorted((ingested_shards / "shards").glob("*.tar"))[0]
    with tarfile.open(tar_path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    key = sorted(n.split(".")[0] for n in members if n.endswith(".mp4"))[0]
    record = json.loads(members[f"{key}.json"])
    model, transform, _ = create_model(MODEL, seed=0)  # the seeded init every encoder actor builds
    model.eval()
    clip = sample_clips(members[f"{key}.mp4"], SamplingConfig(**SAMPLING), size=transform.image_size,
                        meta=record)
    with torch.inference_mode():
        x = transform(clip.frames[None])
        m = torch.as_tensor(clip.mask[None])
        direct_clips = model.encode_clips(x, m)[0].numpy()
        direct_video = model.embed_batch(x, m)[0].numpy()
    mine = {r["clip_index"]: np.asarray(r["embedding"]) for r in rows if r["key"] == key}
    np.testing.assert_allclose(mine[VIDEO_ROW], direct_video, atol=1e-5)
    for c in range(SAMPLING["num_clips"]):
        np.testing.assert_allclose(mine[c], direct_clips[c], atol=1e-5)


def test_encode_stage_runs_on_a_hand_made_batch():
    """The encoder stage works without a cluster; failed decodes come out as one error row."""
    stage = EncodeClipsStage(MODEL, allow_random_init=True)
    size = stage.transform.image_size
    frames = np.random.default_rng(0).integers(0, 255, (2, 2, 2, size, size, 3), dtype=np.uint8)
    mask = np.ones((2, 2, 2), dtype=bool)
    mask[1] = False
    batch = {"key": np.array(["a", "b"], dtype=object), "video_id": np.array(["va", "vb"], dtype=object),
             "shard": np.array(["s", "s"], dtype=object), "frames": frames, "mask": mask,
             "times": np.zeros((2, 2, 2)), "captions": np.array(['["x"]', '["y"]'], dtype=object),
             "json": np.array(['{"sha256": "h"}', "{}"], dtype=object),
             "error": np.array(["", "decode_error"], dtype=object),
             "error_message": np.array(["", "boom"], dtype=object)}
    out = stage(batch)
    assert list(out["key"]) == ["a", "a", "a", "b"]
    assert list(out["clip_index"]) == [0, 1, VIDEO_ROW, -2]
    assert list(out["error"]) == ["", "", "", "decode_error"]
    assert out["embedding"].shape[0] == 4


def test_encode_stage_error_policy():
    """on_error="raise" turns the failed input into an exception naming it; an unknown policy is refused;
    a fault of the model itself raises under the default policy too (it never becomes an error row)."""
    strict = EncodeClipsStage(MODEL, on_error="raise", allow_random_init=True)
    size = strict.transform.image_size
    mask = np.zeros((1, 1, 2), dtype=bool)
    batch = {"key": np.array(["b"], dtype=object), "video_id": np.array(["vb"], dtype=object),
             "shard": np.array(["s"], dtype=object), "frames": np.zeros((1, 1, 2, size, size, 3), np.uint8),
             "mask": mask, "times": np.zeros((1, 1, 2)), "captions": np.array(['["y"]'], dtype=object),
             "json": np.array(["{}"], dtype=object), "error": np.array(["decode_error"], dtype=object),
             "error_message": np.array(["boom"], dtype=object)}
    with pytest.raises(DecodeFailure, match="b .*decode_error: boom"):
        strict(batch)
    with pytest.raises(ValueError, match="unknown error policy"):
        EncodeClipsStage(MODEL, on_error="ignore", allow_random_init=True)
    lenient = EncodeClipsStage(MODEL, allow_random_init=True)

    def broken_model(frames, mask):
        raise RuntimeError("a bug in the encoder")

    lenient.embed = broken_model
    good = dict(batch, mask=np.ones((1, 1, 2), dtype=bool), error=np.array([""], dtype=object),
                error_message=np.array([""], dtype=object))
    with pytest.raises(RuntimeError, match="a bug in the encoder"):
        lenient(good)


def test_partition_name_is_path_safe():
    assert model_partition("clip4clip-meanP-tiny@abc123") == "model_id=clip4clip-meanP-tiny@abc123"
    assert "/" not in model_partition("../../etc/passwd@x")


def test_index_builds_from_embed_output_with_caption_embeddings(embedded, tmp_path):
    """The index reads the embed job's output as is: video/clip parts only, caption embeddings ignored,
    and text queries go through the model named in _model.json."""
    from index import VideoIndex, build_index

    out, summary = embedded
    copy = tmp_path / "emb"
    shutil.copytree(out, copy)
    partition = _partition(copy)
    assert embed_captions(str(partition), MODEL, None, allow_random_init=True) > 0
    assert len(list(Path(text_dir(partition)).glob("part-*.parquet"))) == len(list_parts(partition))
    assert [p.name for p in partition.iterdir() if not p.name.startswith("part-")] == ["_model.json"]
    meta = build_index(copy, tmp_path / "idx", progress=False)
    assert meta["count"] == len(read_embeddings(partition)) and meta["model_id"] == summary["model_id"]
    index = VideoIndex.open(tmp_path / "idx", allow_random_init=True)  # the tests' seeded random encoder
    hits = index.search("a red circle moves to the left", k=3)
    assert len(hits) == 3


def test_progress_steady_rate_excludes_startup(monkeypatch):
    """Videos/s after the first output: a slow start-up must not drag the steady-state figure down."""
    import runtime.progress as rp

    clock = iter([0.0, 10.0, 12.0, 14.0])  # start, first output (10 s of start-up), then 2 s per 20 videos
    monkeypatch.setattr(rp.time, "monotonic", lambda: next(clock))
    progress = rp.Progress("embed", total=60, unit="videos", every_s=1e9, enabled=False)  # no clock reads
    for done in (20, 40, 60):
        progress.set_done(done)
    assert progress.startup_s() == 10.0
    assert progress.steady_rate() == 10.0  # (60 - 20) videos / (14 - 10) s



def test_partition_is_a_clean_parquet_dataset(embedded, ray_local):
    """The partition folder holds only part files (+ the card): every common reader gets the embedding
    table, all rows of it, and never the error table (which lives beside it, under OUT/_errors/)."""
    import pandas as pd
    import pyarrow.dataset as pads

    out, _ = embedded
    partition = _partition(out)
    expected = read_embeddings(partition)
    assert set(Path(errors_dir(partition)).glob("part-*.parquet"))  # error tables exist, elsewhere
    table = pads.dataset(str(partition), format="parquet").to_table()
    assert table.schema.names == list(EMBEDDING_COLUMNS) and table.num_rows == expected.num_rows
    frame = pd.read_parquet(partition)
    assert list(frame.columns) == list(EMBEDDING_COLUMNS) and len(frame) == expected.num_rows
    ds = ray_local.data.read_parquet(str(partition))
    assert set(ds.schema().names) == set(EMBEDDING_COLUMNS) and ds.count() == expected.num_rows
    import duckdb  # a dev dependency (pyproject.toml): missing fails the test

    for source in (f"{partition}", f"{partition}/*.parquet"):
        query = f"select count(*), count(embedding) from read_parquet('{source}')"
        ((rows, cols),) = duckdb.sql(query).fetchall()
        assert rows == cols == expected.num_rows


def _encoded_batch(keys: list[str], shard: str, dim: int = 4) -> dict:
    """An EncodeClipsStage-shaped output batch: two clip rows + one video row per key, or an error row
    for keys starting with "bad"."""
    rows: dict[str, list] = {c: [] for c in ("id", "video_id", "key", "shard", "clip_index", "start_s",
                                             "end_s", "model_id", "sha256", "captions", "embedding",
                                             "error", "error_message")}
    for key in keys:
        clips = [-2] if key.startswith("bad") else [0, 1, VIDEO_ROW]
        for c in clips:
            error = ("decode_error", "x") if c == -2 else ("", "")
            values = (stable_id(f"v{key}", c), f"v{key}", key, shard, c, 0.0, 1.0, "m@1", "h", '["cap"]',
                      np.full(dim, 0.5, np.float32), *error)
            for column, value in zip(rows, values):
                rows[column].append(value)
    out = {k: np.array(v, dtype=object) for k, v in rows.items() if k != "embedding"}
    out["embedding"] = np.stack(rows["embedding"])
    return out


def test_fragments_of_a_retried_task_leave_no_duplicates(tmp_path):
    """Workers write fragments; a retried task (same rows, another split) leaves extra fragments, and the
    shard's part still holds every id once. Finalize is idempotent and refuses a shard with rows missing."""
    partition = str(tmp_path / "emb" / "model_id=m@1")
    first = write_shard_fragments(_encoded_batch(["a", "b", "bad1"], "s0"), partition, dim=4)
    assert sorted(first) == ["error", "fragment", "key", "rows", "shard"]  # bookkeeping only
    assert list(first["rows"]) == [3, 3, 0] and list(first["error"]) == ["", "", "decode_error"]
    write_shard_fragments(_encoded_batch(["b"], "s0"), partition, dim=4)  # the retry's duplicate
    assert len(list(Path(staging_dir(partition, "s0")).glob("frag-*.parquet"))) == 2
    with pytest.raises(RuntimeError, match="no rows for 1 keys"):
        finalize_shard(partition, "s0", 4, expected_keys=["a", "b", "bad1", "c"])
    summary = finalize_shard(partition, "s0", 4, expected_keys=["a", "b", "bad1"])
    assert summary == {"shard": "s0", "videos": 2, "clips": 4, "errors": 1,
                       "path": str(Path(partition) / "part-s0.parquet")}
    table = read_embeddings(partition)
    assert table.num_rows == 6 and len(set(table.column("id").to_pylist())) == 6
    assert read_embed_errors(partition).column("key").to_pylist() == ["bad1"]
    assert not Path(staging_dir(partition, "s0")).exists()
    assert finalize_shard(partition, "s0", 4, expected_keys=["a", "b", "bad1"]) == summary  # a retry


def test_embed_job_without_weights_is_a_usage_error(ingested_shards, tmp_path, capsys):
    """No --pretrained and no --allow-random-init: exit 2 naming --pretrained, nothing written."""
    argv = ["--shards", str(ingested_shards), "--model", MODEL, "--output", str(tmp_path / "o")]
    assert embed_main(argv) == 2
    err = capsys.readouterr().err
    assert "--pretrained" in err and "--allow-random-init" in err
    assert not (tmp_path / "o").exists()
