"""Captioning: the caption stage on a hand-made batch (pipeline.captioning), the Ray Data job end to end
(jobs.caption → workflows.caption), the rerank hooks (workflows.rerank)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from index.annotations import recorded_captions
from index.testing import write_synthetic_version
from jobs.caption import main
from models import MissingWeightsError, RandomInitWarning, create_model, save_checkpoint
from models.swinbert import checkpoint_extra
from pipeline.captioning import CaptionStage, caption_sampling, checkpoint_sampling
from pipeline.datasets import ShardClipDataset
from pipeline.decode_stage import DecodeClipsStage
from pipeline.shard_tar import list_shards
from pipeline.training.captioner import train_captioner
from runtime.errors import DecodeFailure
from workflows.rerank import ShardFramesLookup, make_reranker, rerank_hits

SMALL = {"image_size": 32, "num_frames": 4}


@pytest.fixture(scope="module")
def checkpoint(ingested_shards, tmp_path_factory):
    """A tiny captioner trained a few steps on the corpus' train videos, saved as a vidsift checkpoint."""
    torch.manual_seed(0)
    model, transform, _ = create_model("swinbert-tiny", **SMALL)
    ds = ShardClipDataset(ingested_shards, sampling=caption_sampling(4), size=32, split="train",
                          shuffle_shards=False)
    samples = [s for _, s in zip(range(4), ds)]
    frames = transform(np.stack([s["frames"] for s in samples]))
    mask = torch.as_tensor(np.stack([s["mask"] for s in samples]))
    train_captioner(model, [(frames, mask, [s["captions"][0] for s in samples])], steps=5, lr=1e-3)
    path = tmp_path_factory.mktemp("ckpt") / "swinbert-small.pt"
    save_checkpoint(model, path, extra=checkpoint_extra(model))
    return path


def _raw_batch(shard: Path) -> dict:
    with tarfile.open(shard) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    keys = sorted({name.split(".")[0] for name in files})[:3]
    return {"key": np.array(keys, dtype=object),
            "mp4": np.array([files[f"{k}.mp4"] for k in keys], dtype=object),
            "json": np.array([files[f"{k}.json"] for k in keys], dtype=object)}


def test_caption_stage_on_hand_made_batch(ingested_shards, checkpoint):
    shard = Path(list_shards(ingested_shards)[0])
    raw = _raw_batch(shard)
    raw["mp4"][1] = b"not a video at all" * 10
    decoded = DecodeClipsStage(sampling=caption_sampling(4), size=32)(raw)
    stage = CaptionStage(str(checkpoint), beam_size=2, score_captions=True)
    out = stage(decoded)
    assert list(out["key"]) == list(raw["key"])
    assert out["error"][1] and not out["error"][0] and not out["error"][2]
    assert out["caption"][1] == "" and np.isnan(out["score"][1])
    for i in (0, 2):
        assert isinstance(out["caption"][i], str) and np.isfinite(out["score"][i]) and out["score"][i] < 0
        pairs = json.loads(out["caption_scores"][i])
        refs = json.loads(decoded["captions"][i])
        assert [c for c, _ in pairs] == refs and all(s < 0 for _, s in pairs)
    # The stage's numbers are the model's own (same frames, same beam search).
    frames = stage.transform(decoded["frames"][[0]])
    caps, again = stage.model.generate(frames, torch.as_tensor(decoded["mask"][[0]]), beam_size=2)
    assert caps[0] == out["caption"][0] and float(again[0]) == pytest.approx(out["score"][0], abs=1e-5)


def test_caption_stage_error_policy(ingested_shards, checkpoint):
    """Only named input failures become error rows: under on_error="raise" the undecodable video raises
    naming its key, and a fault of the model itself raises under the default policy instead of turning
    the batch into error rows."""
    raw = _raw_batch(Path(list_shards(ingested_shards)[0]))
    raw["mp4"][1] = b"not a video at all" * 10
    decoded = DecodeClipsStage(sampling=caption_sampling(4), size=32)(raw)
    strict = CaptionStage(str(checkpoint), on_error="raise")
    with pytest.raises(DecodeFailure, match=str(raw["key"][1])):
        strict(decoded)
    with pytest.raises(ValueError, match="unknown error policy"):
        CaptionStage(str(checkpoint), on_error="skip")

    def broken_generate(*args, **kwargs):
        raise RuntimeError("a bug in generation")

    lenient = CaptionStage(str(checkpoint))
    lenient.model.generate = broken_generate
    with pytest.raises(RuntimeError, match="a bug in generation"):
        lenient(decoded)


def _corrupt_copy(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True)
    dst = dst_dir / src.name
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        first = None
        for member in tin:
            data = tin.extractfile(member).read()
            if member.name.endswith(".mp4") and first is None:
                first, data = member.name.split(".")[0], b"\x00garbage" * 50
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dst


@pytest.mark.slow
def test_caption_job_end_to_end(ingested_shards, checkpoint, ray_local, tmp_path, capsys):
    shards = [Path(p) for p in list_shards(ingested_shards)]
    bad = _corrupt_copy(shards[0], tmp_path / "in" / "shards")
    for p in shards[1:]:
        (tmp_path / "in" / "shards" / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    argv = ["--shards", str(tmp_path / "in"), "--pretrained", str(checkpoint), "--output", str(out),
            "--score-captions", "--beam", "2", "--batch-size", "4"]
    assert main(argv) == 0
    assert "[caption] summary" in capsys.readouterr().out
    captions = pq.read_table(out / "captions.parquet")
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    scores = pq.read_table(out / "caption_scores.parquet")
    assert captions.column_names == ["video_id", "key", "caption", "score", "model_id"]
    assert scores.column_names == ["video_id", "caption", "score", "model_id"]
    tars = list_shards(tmp_path / "in")
    n_samples = sum(1 for p in tars for m in tarfile.open(p) if m.name.endswith(".mp4"))
    assert captions.num_rows + len(errors) == n_samples and len(errors) == 1  # nothing lost
    assert errors[0]["reason"] and errors[0]["message"]
    with tarfile.open(bad) as tar:
        assert errors[0]["key"] == next(m.name.split(".")[0] for m in tar if m.name.endswith(".mp4"))
    model_ids = set(captions.column("model_id").to_pylist()) | set(scores.column("model_id").to_pylist())
    assert len(model_ids) == 1 and next(iter(model_ids)).startswith("swinbert-tiny@")
    assert all(s < 0 for s in captions.column("score").to_pylist())
    # Every ingest caption of every captioned video is scored.
    meta = {}
    for p in list_shards(tmp_path / "in"):
        with tarfile.open(p) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(m).read())
                    meta[rec["video_id"]] = rec["captions"]
    expected = sum(len(meta[v]) for v in captions.column("video_id").to_pylist())
    assert scores.num_rows == expected
    # Rerun, now recorded under an index: identical outputs (eval sampling is deterministic, files are
    # rewritten whole), and the index names the run (its search service shows the captions, test_lineage).
    first = (out / "captions.parquet").read_bytes()
    index_root = tmp_path / "idx"
    write_synthetic_version(index_root, rows=64)
    for _ in range(2):  # a rerun into the same folder rewrites its own record
        assert main([*argv, "--index", str(index_root)]) == 0
    assert pq.read_table(out / "captions.parquet").equals(pq.read_table(io.BytesIO(first)))
    assert recorded_captions(str(index_root)) == [str(out)]
    (record,) = (index_root / "annotations").glob("captions-*.json")
    record = json.loads(record.read_text())
    assert record["model_id"] == next(iter(model_ids)) and record["videos"] == captions.num_rows
    assert sorted(record["shards"]) == sorted(tars) and record["pretrained"] == str(checkpoint)


def test_caption_job_bad_inputs(tmp_path, ingested_shards, checkpoint, capsys):
    assert main(["--shards", str(ingested_shards), "--pretrained", str(tmp_path / "none.pt"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # A real checkpoint and a shard folder without tars: a usage error naming the folder, before Ray starts
    # or anything is written.
    (tmp_path / "empty").mkdir()
    assert main(["--shards", str(tmp_path / "empty"), "--pretrained", str(checkpoint),
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no shard tars found" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "o").exists()
    assert main(["--shards", str(ingested_shards), "--pretrained", str(checkpoint),
                 "--output", str(tmp_path / "o"), "--beam", "0"]) == 2
    assert "--beam must be >= 1" in capsys.readouterr().err
    # --index that is no index: named, before anything is written
    assert main(["--shards", str(ingested_shards), "--pretrained", str(checkpoint),
                 "--output", str(tmp_path / "o"), "--index", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "--index" in err and str(tmp_path / "empty") in err and "no CURRENT" in err
    assert not (tmp_path / "o").exists()


def test_caption_job_refuses_a_random_captioner(ingested_shards, tmp_path, capsys):
    """Without --pretrained (and without --allow-random-init) the job is a usage error naming the flag,
    before Ray starts or anything is written."""
    assert main(["--shards", str(ingested_shards), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--pretrained" in err and "--allow-random-init" in err
    assert not (tmp_path / "o").exists()


def test_caption_stage_random_init_only_on_request():
    """The stage builds a seeded random captioner only when asked to, and says so."""
    with pytest.raises(MissingWeightsError, match="--pretrained"):
        CaptionStage(None, model_name="swinbert-tiny")
    with pytest.warns(RandomInitWarning, match="SEEDED RANDOM INIT"):
        stage = CaptionStage(None, model_name="swinbert-tiny", allow_random_init=True)
    assert stage.model_id.startswith("swinbert-tiny@")


def test_rerank_hits_rescores_and_sorts(ingested_shards, checkpoint):
    model, transform, _ = create_model("swinbert-tiny", pretrained=checkpoint)
    lookup = ShardFramesLookup(ingested_shards, transform, num_frames=model.num_frames, split="test")
    ids = lookup.video_ids()[:4]
    assert len(ids) >= 2
    hits = [{"video_id": v, "score": 0.5 - 0.1 * i, "clip_index": -1} for i, v in enumerate(ids)]
    query = "a red circle moves left"
    reranked = rerank_hits(model, query, hits, lookup, weight=0.5)
    assert sorted(h["video_id"] for h in reranked) == sorted(ids)
    assert [h["score"] for h in reranked] == sorted((h["score"] for h in reranked), reverse=True)
    frames = torch.stack([lookup(v)[0] for v in ids])
    mask = torch.stack([lookup(v)[1] for v in ids])
    direct = dict(zip(ids, model.score_captions(frames, mask, [query] * len(ids)).tolist()))
    for h in reranked:
        assert h["caption_score"] == pytest.approx(direct[h["video_id"]], abs=1e-5)
        assert h["score"] == pytest.approx(h["retrieval_score"] + 0.5 * h["caption_score"], abs=1e-6)
        assert h["clip_index"] == -1  # other fields are kept
    # Weight 0 keeps the retrieval order; the hook form works on index Hit objects too.
    assert [h["video_id"] for h in rerank_hits(model, query, hits, lookup, weight=0.0)] == ids
    from index.query import Hit

    hook = make_reranker(model, lookup, weight=0.5)
    objs = hook(query, [Hit(video_id=h["video_id"], score=h["score"]) for h in hits])
    assert [o.video_id for o in objs] == [h["video_id"] for h in reranked]
    with pytest.raises(KeyError, match="no frames for video"):
        rerank_hits(model, query, [{"video_id": "nope", "score": 1.0}], lookup)
    with pytest.raises(ValueError, match="needs the query text"):
        rerank_hits(model, "", hits, lookup)


def test_checkpoint_sampling_follows_training(tmp_path, checkpoint):
    """Captioning and scoring sample frames as the captioner was trained (jobs.train records it)."""
    model, _, _ = create_model("swinbert-tiny", pretrained=checkpoint)
    assert checkpoint_sampling(checkpoint, model.num_frames) == caption_sampling(4)  # nothing recorded
    trained = {"num_clips": 1, "frames_per_clip": 4, "fps": 4.0, "mode": "eval"}
    path = tmp_path / "trained.pt"
    recorded = json.dumps({"eval_sampling": trained})  # the trainer stores its config as JSON text
    save_checkpoint(model, path, extra=checkpoint_extra(model, train_config=recorded))
    assert checkpoint_sampling(path, model.num_frames) == trained
    # a recorded sampling that would not give the model its frame count is not used
    wrong = {"num_clips": 2, "frames_per_clip": 4, "mode": "eval"}
    save_checkpoint(model, path, extra=checkpoint_extra(model, train_config={"eval_sampling": wrong}))
    assert checkpoint_sampling(path, model.num_frames) == caption_sampling(4)


def test_rerank_metrics_hard_split_counts_only_the_query_group():
    """bench.caption_eval.rerank_metrics: a motion-blind search ranks the wrong direction first; a reranker
    that reads the motion fixes R@1 on the hard split, and the gain is measured against that baseline."""
    from types import SimpleNamespace

    from bench.caption_eval import rerank_metrics

    records = {}
    for colour in ("red", "blue"):
        for direction in ("left", "right"):
            for i in range(2):
                vid = f"{colour}-{direction}-{i}"
                records[vid] = {"captions": [f"a {colour} circle moves {direction}"],
                                "caption_class": f"{colour}|circle|{direction}",
                                "hard_group": f"{colour}|circle"}
    order = sorted(records, key=lambda v: (v.split("-")[2], v.split("-")[1] != "right", v))

    def search(query):  # blind to motion, and puts every "right" video first
        colour = query.split()[1]
        return [SimpleNamespace(video_id=v) for v in sorted(order, key=lambda v: not v.startswith(colour))]

    def reranker(query, hits):  # reads the motion: the query's direction first
        wanted = query.split()[-1]
        return sorted(hits, key=lambda h: records[h.video_id]["caption_class"].split("|")[2] != wanted)

    out = rerank_metrics(search, reranker, records, sorted(records), k=2)
    assert out["hard_split_queries"] == 8
    assert out["hard_split_base@1"] == 0.5  # "right" queries are right by luck, "left" ones wrong
    assert out["hard_split_rr@1"] == 1.0 and out["hard_split_gain@1"] == 0.5
    # without a reranker that helps, the gain is zero
    same = rerank_metrics(search, lambda q, hits: list(hits), records, sorted(records), k=2)
    assert same["hard_split_gain@1"] == 0.0 and same["all_rr@1"] == same["all_base@1"]
