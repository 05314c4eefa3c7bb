"""ShardClipDataset (torch) and DecodeClipsStage (Ray Data) over real WebDataset tars."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from test_decode import make_video

from pipeline import datasets as datasets_module
from pipeline import decode_stage as decode_stage_module
from pipeline.datasets import ShardClipDataset, collate_clips
from pipeline.decode_stage import BadSample, DecodeClipsStage, _SplitFilter, read_shards_ray
from pipeline.sampling import SamplingConfig
from pipeline.shard_tar import BadTar, list_shards
from runtime.errors import InputError, InvalidMetadata, NotAVideo

SAMPLING = SamplingConfig(num_clips=2, frames_per_clip=2, stride=2, mode="train")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def handmade_shards(tmp_path_factory):
    """3 shards x 4 samples in the documented format; sample 5 has corrupt mp4 bytes, sample 9 bad json."""
    root = tmp_path_factory.mktemp("handmade") / "shards"
    root.mkdir()
    videos = [make_video(num_frames=20 + 2 * i, fps=10, gop=5, size=(32, 48)) for i in range(3)]
    for shard in range(3):
        with tarfile.open(root / f"{shard:06d}.tar", "w") as tar:
            for j in range(4):
                i = shard * 4 + j
                key = f"vid-{i:03d}"
                mp4 = videos[i % 3]
                meta = {"video_id": f"v{i}", "key": key, "duration": (20 + 2 * (i % 3)) / 10, "fps": 10.0,
                        "captions": [f"caption {i}", f"another {i}"], "split": "train" if i % 4 else "test"}
                if i == 5:
                    mp4 = b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50
                json_bytes = json.dumps(meta).encode()
                if i == 9:
                    json_bytes = b"{not json"
                _add(tar, f"{key}.mp4", mp4)
                _add(tar, f"{key}.json", json_bytes)
    return root.parent


def keys_of(dataset) -> list[str]:
    return [s["key"] for s in dataset]


def test_dataset_yields_clips_and_skips_bad_samples(handmade_shards):
    ds = ShardClipDataset(handmade_shards, sampling=SAMPLING, size=16, shuffle_shards=False, seed=1)
    samples = list(ds)
    keys = [s["key"] for s in samples]
    assert sorted(keys) == [f"vid-{i:03d}" for i in range(12) if i not in (5, 9)]
    s = samples[0]
    assert s["frames"].shape == (2, 2, 16, 16, 3) and s["frames"].dtype == np.uint8
    assert s["mask"].shape == (2, 2) and s["mask"].all() and s["times"].shape == (2, 2)
    assert s["captions"] == ["caption 0", "another 0"] and s["meta"]["video_id"] == "v0"
    assert ds.error_counts["bad_json"] == 1 and sum(ds.error_counts.values()) == 2
    assert set(ds.error_counts) <= {"bad_json", "not_a_video", "decode_error"}
    by_key = {e["key"]: e for e in ds.errors}
    assert set(by_key) == {"vid-005", "vid-009"}
    assert by_key["vid-009"]["reason"] == "bad_json" and by_key["vid-005"]["shard"] == "000001.tar"
    assert by_key["vid-005"]["message"]


def test_split_filter_and_collate(handmade_shards):
    ds = ShardClipDataset(handmade_shards, sampling=SAMPLING.to_dict(), size=(16, 24), split="test",
                          shuffle_shards=False)
    keys = keys_of(ds)
    assert keys == ["vid-000", "vid-004", "vid-008"]
    batch = collate_clips(list(ShardClipDataset(handmade_shards, sampling=SAMPLING, size=(16, 24),
                                                split="train", shuffle_shards=False)))
    assert batch["frames"].shape == (7, 2, 2, 16, 24, 3) and batch["frames"].dtype == torch.uint8
    assert batch["mask"].dtype == torch.bool and batch["times"].shape == (7, 2, 2)
    assert isinstance(batch["captions"], list) and batch["captions"][0] == ["caption 1", "another 1"]


def test_epochs_reshuffle_and_train_clips_resample(handmade_shards):
    ds = ShardClipDataset(handmade_shards, sampling=SAMPLING, size=16, shuffle_buffer=4, seed=3)
    ds.set_epoch(0)
    first = list(ds)
    again = list(ds)
    assert [s["key"] for s in first] == [s["key"] for s in again]  # same epoch -> same order, same clips
    np.testing.assert_array_equal(first[0]["times"], again[0]["times"])
    orders = set()
    for epoch in range(1, 5):
        ds.set_epoch(epoch)
        orders.add(tuple(keys_of(ds)))
    assert len(orders) > 1
    ds.set_epoch(1)
    times_1 = {s["key"]: s["times"] for s in ds}
    assert any(not np.array_equal(times_1[s["key"]], s["times"]) for s in first)


@pytest.mark.parametrize(
    "world_size,num_workers,split_by", [(2, 2, "auto"), (1, 3, "shard"), (3, 2, "sample")]
)
def test_every_sample_exactly_once_across_ranks_and_workers(
    handmade_shards, world_size, num_workers, split_by
):
    seen: list[str] = []
    for rank in range(world_size):
        ds = ShardClipDataset(handmade_shards, sampling=SAMPLING, size=8, seed=5, rank=rank,
                              world_size=world_size, split_by=split_by, shuffle_buffer=3)
        ds.set_epoch(2)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=num_workers,
                                             collate_fn=collate_clips, multiprocessing_context="fork")
        for batch in loader:
            seen.extend(batch["key"])
    expected = sorted(f"vid-{i:03d}" for i in range(12) if i not in (5, 9))
    assert sorted(seen) == expected  # no duplicates, nothing missing


def test_list_shards_forms(handmade_shards):
    tars = list_shards(handmade_shards)
    assert [t.rsplit("/", 1)[1] for t in tars] == ["000000.tar", "000001.tar", "000002.tar"]
    assert list_shards(str(handmade_shards / "shards" / "{000000..000001}.tar")) == tars[:2]
    assert list_shards(tars[1:]) == tars[1:]
    with pytest.raises(FileNotFoundError, match="no shard tars"):
        list_shards(str(handmade_shards / "nothing-*.tar"))
    with pytest.raises(ValueError, match="rank"):
        list(ShardClipDataset(handmade_shards, rank=2, world_size=2))


def test_decode_stage_on_handmade_batch():
    good = make_video(num_frames=30, fps=10, gop=10, size=(32, 48))
    meta = {"video_id": "a", "key": "a", "duration": 3.0, "fps": 10.0, "captions": ["x", "y"]}
    batch = {
        "key": np.array(["a", "b", "c", "d"], dtype=object),
        "mp4": np.array([good, b"not a video at all", good, good], dtype=object),
        "json": np.array([json.dumps(meta).encode(), json.dumps({"key": "b"}).encode(), b"{broken",
                          json.dumps(dict(meta, video_id="d", key="d"))], dtype=object),
    }
    stage = DecodeClipsStage(sampling=SamplingConfig(num_clips=2, frames_per_clip=3, mode="train"), size=16,
                             seed=0)
    out = stage(batch)
    assert list(out["key"]) == ["a", "b", "c", "d"]
    assert list(out["error"]) == ["", "not_a_video", "bad_json", ""]
    assert out["error_message"][1] and out["error_message"][2]
    assert out["frames"].shape == (4, 2, 3, 16, 16, 3) and out["frames"].dtype == np.uint8
    assert out["mask"][0].all() and not out["mask"][1].any() and not out["frames"][1].any()
    assert json.loads(out["captions"][0]) == ["x", "y"] and out["video_id"][3] == "d"
    # Seeded by key: rows "a" and "d" hold the same video but different keys -> different clips,
    # and a rerun gives the same clips.
    assert not np.array_equal(out["times"][0], out["times"][3])
    np.testing.assert_array_equal(stage(batch)["times"], out["times"])


def test_ray_stage_records_corrupt_rows(handmade_shards, ray_local):
    ds = read_shards_ray(handmade_shards, override_num_blocks=1)  # one read task: Ray startup dominates
    kwargs = dict(sampling=SAMPLING.to_dict(), size=8)
    decoded = ds.map_batches(DecodeClipsStage, fn_constructor_kwargs=kwargs, batch_size=4, concurrency=1,
                             batch_format="numpy")
    rows = {r["key"]: r for r in decoded.take_all()}
    assert sorted(rows) == [f"vid-{i:03d}" for i in range(12)]  # every row comes out, good or bad
    bad = {k: r["error"] for k, r in rows.items() if r["error"]}
    assert set(bad) == {"vid-005", "vid-009"} and bad["vid-009"] == "bad_json"
    assert rows["vid-005"]["error_message"] and not np.asarray(rows["vid-005"]["mask"]).any()
    assert np.asarray(rows["vid-001"]["frames"]).shape == (2, 2, 8, 8, 3)


def test_ray_split_filter_keeps_unreadable_rows():
    keep_test = _SplitFilter("test")
    assert keep_test({"json": b'{"split": "test"}'}) and not keep_test({"json": b'{"split": "train"}'})
    assert keep_test({"json": b"{broken"})  # kept so that the decode stage records it as an error


@pytest.mark.slow
def test_ray_read_and_decode_stage(ingested_shards, ray_local):
    ds = read_shards_ray(ingested_shards)
    sampling = SamplingConfig(num_clips=2, frames_per_clip=2, mode="eval").to_dict()
    stage_kwargs = dict(sampling=sampling, size=16)
    decoded = ds.map_batches(DecodeClipsStage, fn_constructor_kwargs=stage_kwargs, batch_size=4,
                             concurrency=1, batch_format="numpy")
    rows = decoded.take_all()
    manifest = json.loads((ingested_shards / "manifest.json").read_text())
    shard_paths = list_shards(ingested_shards)
    assert len(rows) == sum(1 for _ in ShardClipDataset(shard_paths, size=8).raw_samples())
    assert len(rows) > 0 and manifest
    assert all(r["error"] == "" for r in rows)
    assert all(np.asarray(r["frames"]).shape == (2, 2, 16, 16, 3) for r in rows)
    assert len({r["key"] for r in rows}) == len(rows)
    train = read_shards_ray(ingested_shards, split="train").count()
    assert train == sum(json.loads(r["json"]).get("split") == "train" for r in rows)
    assert 0 < train < len(rows)


# ------------------------------------------------------------------------------------------- error policy
def _bad_batch():
    good = make_video(num_frames=30, fps=10, gop=10, size=(32, 48))
    meta = {"video_id": "a", "key": "a", "duration": 3.0, "fps": 10.0, "captions": ["x"]}
    return {
        "key": np.array(["a", "b", "c"], dtype=object),
        "mp4": np.array([good, b"not a video at all", good], dtype=object),
        "json": np.array([json.dumps(meta).encode(), json.dumps({"key": "b"}).encode(), b"{broken"],
                         dtype=object),
    }


def test_decode_stage_raise_policy_raises_named_input_failures():
    sampling = SamplingConfig(num_clips=1, frames_per_clip=2, mode="eval")
    batch = _bad_batch()
    strict = DecodeClipsStage(sampling=sampling, size=8, on_error="raise")
    with pytest.raises(NotAVideo, match="not_a_video"):
        strict({k: v[:2] for k, v in batch.items()})
    with pytest.raises(BadSample, match="Expecting property name") as info:
        strict({k: v[2:] for k, v in batch.items()})
    assert isinstance(info.value, InvalidMetadata) and info.value.reason == "bad_json"
    assert list(strict({k: v[:1] for k, v in batch.items()})["error"]) == [""]
    with pytest.raises(ValueError, match="error policy"):
        DecodeClipsStage(sampling=sampling, size=8, on_error="skip")


@pytest.mark.parametrize("bug", [RuntimeError("boom"), KeyError("frames"), ValueError("bad config")])
def test_a_bug_in_decoding_raises_instead_of_becoming_an_error_row(monkeypatch, handmade_shards, bug):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(datasets_module, "sample_clips", broken)  # the torch dataset's decode
    monkeypatch.setattr(decode_stage_module, "sample_clips", broken)  # the Ray Data stage's
    stage = DecodeClipsStage(sampling=SamplingConfig(num_clips=1, frames_per_clip=2, mode="eval"), size=8)
    with pytest.raises(type(bug)):
        stage(_bad_batch())
    with pytest.raises(type(bug)):
        list(ShardClipDataset(handmade_shards, sampling=SAMPLING, size=8, shuffle_shards=False))


def test_dataset_raise_policy_stops_at_the_first_bad_sample(handmade_shards):
    ds = ShardClipDataset(handmade_shards, sampling=SAMPLING, size=8, shuffle_shards=False, on_error="raise")
    with pytest.raises(InputError) as info:
        list(ds)
    assert info.value.reason in ("not_a_video", "decode_error")  # vid-005 comes before vid-009
    skipped = []
    ds = ShardClipDataset(handmade_shards, sampling=SAMPLING, size=8, shuffle_shards=False,
                          on_skip=skipped.append)
    assert len(list(ds)) == 10 and {r["key"] for r in skipped} == {"vid-005", "vid-009"}


def test_a_corrupt_tar_is_recorded_or_raised(handmade_shards, tmp_path):
    torn = tmp_path / "000000.tar"
    torn.write_bytes((handmade_shards / "shards" / "000000.tar").read_bytes()[:700])
    ds = ShardClipDataset([str(torn)], sampling=SAMPLING, size=8, shuffle_shards=False)
    assert list(ds) == [] and ds.error_counts["bad_tar"] >= 1 and set(ds.error_counts) == {"bad_tar"}
    strict = ShardClipDataset([str(torn)], sampling=SAMPLING, size=8, shuffle_shards=False, on_error="raise")
    with pytest.raises(BadTar):
        list(strict)
