"""Caption a shard corpus with a SwinBERT checkpoint (Ray Data), optionally scoring the ingest captions.

    python -m jobs.caption --shards DIR --pretrained CKPT --output DIR [--score-captions] [--beam N]

read shards → decode + sparse sample (``DecodeClipsStage``, CPU) → ``CaptionStage`` (an actor holding the
model) → ``OUTPUT/captions.parquet`` (``video_id``, ``key``, ``caption``, ``score``, ``model_id``) and, with
``--score-captions``, ``OUTPUT/caption_scores.parquet`` (``video_id``, ``caption``, ``score``, ``model_id``;
one row per ingest caption). Rows that cannot be decoded or captioned go to ``OUTPUT/errors.parquet``
(``key``, ``video_id``, ``reason``, ``message``): every input sample ends in exactly one of the two.
Outputs are written atomically and rewritten whole, so reruns give the same files.

``rerank_hits`` / ``make_reranker`` turn the captioner into a ``VideoIndex.search(..., rerank=...)`` hook.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs.cli import print_summary

CAPTION_COLUMNS = ("video_id", "key", "caption", "score", "model_id")
SCORE_COLUMNS = ("video_id", "caption", "score", "model_id")
ERROR_COLUMNS = ("key", "video_id", "reason", "message")


def checkpoint_model_name(pretrained: str | os.PathLike) -> str:
    """The registered model name a vidsift checkpoint was saved from."""
    from models.registry import load_checkpoint

    return str(load_checkpoint(pretrained)["model_name"])


def checkpoint_sampling(pretrained: str | os.PathLike, num_frames: int) -> dict[str, Any]:
    """The eval sampling the captioner was trained with (recorded in the checkpoint by ``jobs.train``), so
    captioning and scoring see frames spaced as in training; :func:`caption_sampling` when the checkpoint
    records none or one that does not give the model its ``num_frames`` frames."""
    from models.registry import recorded_eval_sampling

    recorded = recorded_eval_sampling(pretrained)
    if recorded and recorded.get("mode", "eval") == "eval" and (
        int(recorded.get("num_clips", 1)) * int(recorded.get("frames_per_clip", 0)) == num_frames
    ):
        return recorded
    return caption_sampling(num_frames)


def caption_sampling(
    num_frames: int, num_clips: int = 1, frames_per_clip: int | None = None
) -> dict[str, Any]:
    """Eval-mode (deterministic) sparse sampling giving the captioner ``num_frames`` frames in total:
    by default one clip of ``num_frames`` evenly spread frames (SwinBERT's sparse sampling)."""
    if frames_per_clip is None:
        if num_frames % num_clips:
            raise ValueError(f"num_clips={num_clips} does not divide the model's {num_frames} frames")
        frames_per_clip = num_frames // num_clips
    return {"num_clips": int(num_clips), "frames_per_clip": int(frames_per_clip), "mode": "eval"}


class CaptionStage:
    """Ray Data ``map_batches`` class: decoded clips → generated caption (+ scores of the ingest captions).

    Input: the columns of ``pipeline.datasets.DecodeClipsStage`` (``key``, ``video_id``, ``frames`` uint8
    ``[B, N, T, H, W, 3]``, ``mask``, ``captions`` JSON, ``error``, ``error_message``). Output keeps ``key``,
    ``video_id``, ``error``/``error_message`` and adds ``caption``, ``score``, ``caption_scores`` (JSON list
    of ``[caption, score]``; empty unless ``score_captions``). Rows that arrive with an error, or fail here,
    carry it on with an empty caption.
    """

    def __init__(
        self,
        pretrained: str,
        beam_size: int = 1,
        max_length: int | None = None,
        score_captions: bool = False,
        device: str | None = None,
        min_length: int = 3,
    ):
        import torch

        from models import create_model

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.transform, _ = create_model(checkpoint_model_name(pretrained), pretrained=pretrained)
        self.model.to(self.device).eval()
        self.model_id = self.model.model_id
        self.beam_size = int(beam_size)
        self.max_length = max_length
        self.min_length = int(min_length)
        self.score_captions = bool(score_captions)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        keys = [str(k) for k in batch["key"]]
        n = len(keys)
        errors = [str(e or "") for e in batch.get("error", [""] * n)]
        messages = [str(m or "") for m in batch.get("error_message", [""] * n)]
        captions, scores, scored = [""] * n, [float("nan")] * n, ["[]"] * n
        ok = [i for i in range(n) if not errors[i]]
        if ok:
            try:
                frames = self.transform(np.asarray(batch["frames"])[ok]).to(self.device)
                mask = torch.as_tensor(np.asarray(batch["mask"])[ok]).to(self.device)
                with torch.inference_mode():
                    out, out_scores = self.model.generate(
                        frames, mask, max_length=self.max_length, beam_size=self.beam_size,
                        min_length=self.min_length,
                    )
                    refs = [json.loads(batch["captions"][i]) if self.score_captions else [] for i in ok]
                    ref_scores = self._score(frames, mask, refs) if self.score_captions else None
                for j, i in enumerate(ok):
                    captions[i], scores[i] = out[j], float(out_scores[j])
                    if ref_scores is not None:
                        scored[i] = json.dumps([[c, float(s)] for c, s in zip(refs[j], ref_scores[j])])
            except Exception as exc:  # noqa: BLE001 - the batch's rows become error records, never vanish
                for i in ok:
                    errors[i], messages[i] = "caption_error", f"{type(exc).__name__}: {exc}"
        return {
            "key": np.array(keys, dtype=object),
            "video_id": np.array([str(v) for v in batch.get("video_id", keys)], dtype=object),
            "caption": np.array(captions, dtype=object),
            "score": np.array(scores, dtype=np.float64),
            "caption_scores": np.array(scored, dtype=object),
            "error": np.array(errors, dtype=object),
            "error_message": np.array(messages, dtype=object),
        }

    def _score(self, frames, mask, refs: list[list[str]]) -> list[list[float]]:
        has = [j for j, r in enumerate(refs) if r]
        out: list[list[float]] = [[] for _ in refs]
        if has:
            scores = self.model.score_captions(frames[has], mask[has], [refs[j] for j in has])
            for j, s in zip(has, scores):
                out[j] = s.tolist()
        return out


def _write_parquet(
    rows: list[dict[str, Any]], columns: Sequence[str], path: Path, types: dict[str, Any]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, types.get(c, pa.string())) for c in columns])
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def run_caption(
    shards: str | Sequence[str],
    pretrained: str,
    output: str,
    score_captions: bool = False,
    beam_size: int = 1,
    max_length: int | None = None,
    split: str | None = None,
    batch_size: int = 8,
    min_length: int = 3,
    num_clips: int = 1,
    decoders: int = 1,
    backend: str | None = None,
    progress_every: float = 5.0,
) -> dict[str, Any]:
    """Caption every sample of ``shards``; returns the run summary (counts, files, throughput)."""
    import pyarrow as pa
    import ray

    from models import create_model
    from pipeline.datasets import DecodeClipsStage, list_shards, read_shards_ray

    if beam_size < 1:
        raise ValueError(f"--beam must be >= 1, got {beam_size}")
    if not Path(pretrained).is_file():
        raise FileNotFoundError(f"checkpoint {pretrained!r} does not exist")
    name = checkpoint_model_name(pretrained)
    probe, transform, _ = create_model(name, pretrained=pretrained)
    model_id, num_frames = probe.model_id, probe.num_frames
    del probe
    sampling = checkpoint_sampling(pretrained, num_frames) if num_clips == 1 else caption_sampling(
        num_frames, num_clips
    )
    tar_paths = list_shards(shards)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[caption] model {model_id}: {len(tar_paths)} shards, sampling {sampling}, beam {beam_size}")
    if not ray.is_initialized():
        ray.init(address="auto" if os.environ.get("RAY_ADDRESS") else "local", log_to_driver=False)
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) > 0
    # Both stages are actors holding CPUs for the whole run; the shard read tasks need one more CPU. On
    # a small cluster scale the actors' reservations down so the pipeline cannot starve itself.
    decode_cpus, caption_cpus = 1.0, 0.0 if use_gpu else 1.0
    total_cpus = float(resources.get("CPU", 1))
    wanted = decoders * decode_cpus + caption_cpus + 1.0
    if wanted > total_cpus:
        scale = max(total_cpus - 1.0, 0.5) / (wanted - 1.0)
        decode_cpus, caption_cpus = decode_cpus * scale, caption_cpus * scale
        print(f"[caption] {total_cpus:g} CPUs: actors reserve {decode_cpus:.2f} (decode) / "
              f"{caption_cpus:.2f} (caption) CPUs")
    ds = read_shards_ray(tar_paths, split=split)
    ds = ds.map_batches(
        DecodeClipsStage,
        fn_constructor_kwargs={"sampling": sampling, "size": transform.image_size, "backend": backend},
        batch_size=batch_size,
        concurrency=decoders,
        num_cpus=decode_cpus,
    )
    ds = ds.map_batches(
        CaptionStage,
        fn_constructor_kwargs={
            "pretrained": str(pretrained),
            "beam_size": beam_size,
            "max_length": max_length,
            "min_length": min_length,
            "score_captions": score_captions,
        },
        batch_size=batch_size,
        concurrency=1,
        num_gpus=1 if use_gpu else 0,
        num_cpus=caption_cpus,
    )
    caption_rows, score_rows, error_rows = [], [], []
    start = last = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["key"])):
            key, video_id = str(batch["key"][i]), str(batch["video_id"][i])
            if batch["error"][i]:
                error_rows.append(
                    {
                        "key": key,
                        "video_id": video_id,
                        "reason": str(batch["error"][i]),
                        "message": str(batch["error_message"][i]),
                    }
                )
                continue
            caption_rows.append(
                {
                    "video_id": video_id,
                    "key": key,
                    "caption": str(batch["caption"][i]),
                    "score": float(batch["score"][i]),
                    "model_id": model_id,
                }
            )
            for cap, s in json.loads(batch["caption_scores"][i]):
                score_rows.append(
                    {"video_id": video_id, "caption": cap, "score": float(s), "model_id": model_id}
                )
        now = time.perf_counter()
        if now - last >= progress_every:
            done = len(caption_rows) + len(error_rows)
            print(
                f"[caption] {done} videos, {done / (now - start):.2f} videos/s, errors {len(error_rows)}",
                flush=True,
            )
            last = now
    caption_rows.sort(key=lambda r: r["key"])
    score_rows.sort(key=lambda r: (r["video_id"], r["caption"]))
    error_rows.sort(key=lambda r: r["key"])
    types = {"score": pa.float64()}
    _write_parquet(caption_rows, CAPTION_COLUMNS, out / "captions.parquet", types)
    if score_captions:
        _write_parquet(score_rows, SCORE_COLUMNS, out / "caption_scores.parquet", types)
    _write_parquet(error_rows, ERROR_COLUMNS, out / "errors.parquet", {})
    elapsed = time.perf_counter() - start
    summary = {
        "model_id": model_id,
        "shards": len(tar_paths),
        "videos": len(caption_rows),
        "errors": len(error_rows),
        "scored_captions": len(score_rows),
        "beam": beam_size,
        "seconds": round(elapsed, 2),
        "videos_per_s": round(len(caption_rows) / elapsed, 3) if elapsed > 0 else 0.0,
        "output": str(out),
    }
    tmp = out / f"._summary.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "_summary.json")
    return summary


# ------------------------------------------------------------------------------------------------ rerank
FramesLookup = Callable[[str], tuple[Any, Any]]


def rerank_hits(
    model, query_text: str, hits: list, frames_lookup: FramesLookup, weight: float = 1.0, batch_size: int = 16
) -> list:
    """Rescore retrieval ``hits`` with the captioner: ``score = retrieval score + weight x L(query | video)``
    where ``L`` is the length-normalised caption log-likelihood (``model.score_captions``); sorted best first.

    ``hits``: ``index.query.Hit`` objects or dicts with ``video_id`` and ``score``; the same kind comes back
    (dicts gain ``retrieval_score`` and ``caption_score``). ``frames_lookup(video_id)`` returns the
    model-ready ``(frames [T, 3, S, S] or [N, T, 3, S, S] float, mask)``; a video it cannot find raises.
    """
    import torch

    if not isinstance(query_text, str) or not query_text.strip():
        raise ValueError(f"rerank needs the query text, got {query_text!r}")
    if not hits:
        return []
    ids = [h["video_id"] if isinstance(h, Mapping) else h.video_id for h in hits]
    caption_scores: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        pairs = []
        for vid in chunk:
            try:
                pairs.append(frames_lookup(vid))
            except KeyError as exc:
                raise KeyError(f"rerank: no frames for video {vid!r} ({exc})") from exc
        frames = torch.stack([torch.as_tensor(f) for f, _ in pairs]).to(device)
        mask = torch.stack([torch.as_tensor(m).bool() for _, m in pairs]).to(device)
        with torch.inference_mode():
            caption_scores += model.score_captions(frames, mask, [query_text] * len(chunk)).tolist()
    out = []
    for hit, cs in zip(hits, caption_scores):
        if isinstance(hit, Mapping):
            base = float(hit["score"])
            out.append({**hit, "score": base + weight * cs, "retrieval_score": base, "caption_score": cs})
        else:
            out.append(dataclasses.replace(hit, score=float(hit.score) + weight * cs))
    return sorted(out, key=lambda h: -(h["score"] if isinstance(h, Mapping) else h.score))


def make_reranker(model, frames_lookup: FramesLookup, weight: float = 1.0) -> Callable[[str, list], list]:
    """A ``(query_text, hits) -> hits`` hook for ``VideoIndex.search(..., rerank=...)``."""

    def rerank(query_text: str, hits: list) -> list:
        return rerank_hits(model, query_text, hits, frames_lookup, weight)

    return rerank


class ShardFramesLookup:
    """``video_id -> (frames, mask)`` over a shard corpus, decoded once (eval sampling) and cached.

    Uses ``pipeline.datasets.ShardClipDataset`` with the captioner's sampling and ``transform``; meant for
    evaluation corpora that fit in memory (the frames of every video are kept).
    """

    def __init__(self, shards, transform, num_frames: int, split: str | None = None, num_clips: int = 1,
                 sampling: dict[str, Any] | None = None):
        from pipeline.datasets import ShardClipDataset

        self.dataset = ShardClipDataset(
            shards,
            sampling=sampling or caption_sampling(num_frames, num_clips),
            size=transform.image_size,
            split=split,
            shuffle_shards=False,
        )
        self.transform = transform
        self._cache: dict[str, tuple[Any, Any]] | None = None
        self.records: dict[str, dict[str, Any]] = {}  # video_id -> the sample's json (captions, split, ...)

    def _load(self) -> dict[str, tuple[Any, Any]]:
        import torch

        if self._cache is None:
            self._cache = {}
            for sample in self.dataset:
                self.records[str(sample["video_id"])] = dict(sample["meta"], captions=sample["captions"])
                self._cache[str(sample["video_id"])] = (
                    self.transform(sample["frames"]),
                    torch.as_tensor(sample["mask"]).bool(),
                )
        return self._cache

    def video_ids(self) -> list[str]:
        return sorted(self._load())

    def __call__(self, video_id: str):
        cache = self._load()
        if video_id not in cache:
            raise KeyError(f"video {video_id!r} is not in the shards (or failed to decode)")
        return cache[video_id]


# --------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidsift caption", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="shard dir (or its shards/ folder), glob or brace pattern")
    p.add_argument("--pretrained", required=True, help="SwinBERT vidsift checkpoint (models.save_checkpoint)")
    p.add_argument("--output", required=True, help="output folder for captions.parquet / errors.parquet")
    p.add_argument(
        "--score-captions",
        action="store_true",
        help="also score every ingest caption → caption_scores.parquet",
    )
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--max-length", type=int, default=None, help="max generated tokens (default: model's)")
    p.add_argument("--min-length", type=int, default=3, help="no end-of-caption before this many tokens")
    p.add_argument("--split", default=None, help="only samples of this split (train/val/test)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per decode/caption batch")
    p.add_argument("--num-clips", type=int, default=1, help="clips the model's frames are spread over")
    p.add_argument("--decoders", type=int, default=1, help="decode actors (CPU)")
    p.add_argument("--backend", choices=["torchcodec", "pyav"], default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run_caption(
            args.shards,
            args.pretrained,
            args.output,
            score_captions=args.score_captions,
            beam_size=args.beam,
            max_length=args.max_length,
            min_length=args.min_length,
            split=args.split,
            batch_size=args.batch_size,
            num_clips=args.num_clips,
            decoders=args.decoders,
            backend=args.backend,
        )
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"vidsift caption: error: {exc}", file=sys.stderr)
        return 2
    print_summary("caption", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
