"""Moment retrieval benchmark (issue #16, docs/benchmarks/moments.md): the whole user path on held-out long
videos whose queries are phrased in a way no training caption is.

synth (``long`` profile; the ``test`` split's timed captions use HELDOUT_SEGMENT_TEMPLATES) → ingest →
train ``configs/train/tiny-moments.yaml`` (or reuse ``--train-dir``'s ``model.pt``) → separate ingests of
held-out videos (part of ``val`` to choose the merge threshold, all of ``test`` to measure) → ``embed
--windows`` and a sparse clip-only embedding of the same test videos → one FAISS index each →
``VideoIndex.search(text, k, moments_per_video=M, rel_threshold=r)`` for one query per test segment →
:func:`pipeline.moment_eval.moment_metrics` (R1@0.5/0.7, R5@0.5/0.7, video R@1), index size per hour of video,
query latency against the clip-only index.

    python -m bench.moments --workdir runs/moments           # ~30 min on 2 cores (training ~15 of them)
    python -m bench.moments --workdir runs/moments --pretrained runs/train/model.pt   # measure a model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import REPO, BenchRecord, add_record_args, col  # noqa: E402
from index import VideoIndex, build_index  # noqa: E402
from pipeline.datasets import segment_class  # noqa: E402
from pipeline.ingest import run_ingest  # noqa: E402
from pipeline.moment_eval import MomentQuery, Span, moment_metrics, relevant_segments  # noqa: E402
from pipeline.training import load_train_config  # noqa: E402
from synthetic import generate_corpus  # noqa: E402
from workflows.embed import run_embed  # noqa: E402
from workflows.train import run_training  # noqa: E402

REL_THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
FLOOR_R1_05 = 0.8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "moments")
    p.add_argument("--n", type=int, default=1200, help="long videos in the corpus (70/10/20 split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=str(REPO / "configs" / "train" / "tiny-moments.yaml"))
    p.add_argument("--train-dir", type=Path, default=None,
                   help="training run folder (default WORKDIR/train); its model.pt is reused when present")
    p.add_argument("--pretrained", type=Path, default=None,
                   help="a trained model.pt to measure (its folder's summary.json gives the training "
                        "figures); nothing is trained")
    p.add_argument("--val-videos", type=int, default=60, help="val videos that choose rel_threshold")
    p.add_argument("--test-videos", type=int, default=0, help="test videos measured (0 = all)")
    p.add_argument("--moments-per-video", type=int, default=5)
    p.add_argument("-k", type=int, default=10, help="videos per query")
    p.add_argument("--window-s", type=float, default=None, help="window (default: the recorded clip span)")
    p.add_argument("--stride-s", type=float, default=None, help="window stride (default: half the window)")
    p.add_argument("--latency-repeats", type=int, default=3)
    add_record_args(p, "moments")
    return p.parse_args(argv)


def corpus(args) -> pd.DataFrame:
    """The long corpus (videos already there and valid are kept) and its full ingest."""
    synth = args.workdir / "synth"
    manifest = generate_corpus(synth, n=args.n, seed=args.seed, min_duration=20.0, max_duration=30.0,
                               size=64, fps=8, keyframe_interval=1.0, profile="long", workers=2)
    run_ingest(input=str(synth / "manifest.parquet"), output=str(args.workdir / "ingest"),
               samples_per_shard=100)
    return manifest


def train(args) -> tuple[Path, dict[str, Any]]:
    """``model.pt`` of the training run (trained here unless the folder already holds one) + summary."""
    if args.pretrained is not None:
        if not args.pretrained.is_file():
            raise FileNotFoundError(f"--pretrained {args.pretrained}: no such file")
        summary_path = args.pretrained.parent / "summary.json"
        return args.pretrained, json.loads(summary_path.read_text()) if summary_path.exists() else {}
    train_dir = args.train_dir or args.workdir / "train"
    if not (train_dir / "model.pt").exists():
        run_training(str(args.workdir / "ingest"), str(train_dir), load_train_config(args.config))
    return train_dir / "model.pt", json.loads((train_dir / "summary.json").read_text())


def held_out(args, manifest: pd.DataFrame, split: str, count: int) -> tuple[pd.DataFrame, str]:
    """The first ``count`` videos of ``split`` (0 = all), ingested on their own (their own index)."""
    rows = manifest[manifest["split"] == split].sort_values("video_id")
    rows = rows.head(count) if count > 0 else rows
    sub = rows.copy()
    sub["path"] = [str((args.workdir / "synth" / p).resolve()) for p in sub["path"]]
    path = args.workdir / f"manifest-{split}-{len(rows)}.parquet"
    sub.to_parquet(path, index=False)
    out = args.workdir / f"ingest-{split}-{len(rows)}"  # one folder per subset: never mixed with another
    run_ingest(input=str(path), output=str(out), samples_per_shard=100)
    return rows, str(out)


def embed_index(args, shards: str, model_pt: Path, model: str, name: str, windows: bool) -> dict[str, Any]:
    """Embed ``shards`` (``--windows`` or sparse clips) and build its index; sizes of the index files."""
    emb = run_embed(shards, model, str(args.workdir / f"emb-{name}"), pretrained=str(model_pt), batch_size=32,
                    windows=windows, window_s=args.window_s if windows else None,
                    stride_s=args.stride_s if windows else None)
    out = args.workdir / f"index-{name}"
    meta = build_index(emb["partition"], str(out), progress=False)
    version_dir = out / "versions" / meta["version"]
    size = sum(f.stat().st_size for f in version_dir.rglob("*") if f.is_file())
    return {"embed": emb, "meta": meta, "dir": out, "bytes": size, "count": int(meta["count"])}


def segment_queries(rows: pd.DataFrame) -> tuple[list[str], list[list[Span]]]:
    """One query per timed caption of ``rows`` (its caption text) and its relevant segments (same class)."""
    spans, classes, texts = [], [], []
    for row in rows.to_dict("records"):
        record = {"caption_class": row["caption_class"], "segments": list(row["segments"])}
        for i, seg in enumerate(record["segments"]):
            spans.append(Span(str(row["video_id"]), float(seg["start_s"]), float(seg["end_s"])))
            classes.append(segment_class(record, i))
            texts.append(str(seg["caption"]))
    return texts, [relevant_segments(spans, classes, i) for i in range(len(spans))]


def search_queries(index: VideoIndex, vectors: np.ndarray, texts: list[str], relevant: list[list[Span]],
                   args, rel_threshold: float) -> list[MomentQuery]:
    """Search every query; returned moments = all moments of the returned videos ranked by their score
    (ties: video rank), except the first, which is the first hit's best moment: what the user sees."""
    out = []
    for vector, text, rel in zip(vectors, texts, relevant):
        hits = index.search(vector, k=args.k, moments_per_video=args.moments_per_video,
                            rel_threshold=rel_threshold)
        ranked = sorted(((-m.score, r, Span(h.video_id, m.start_s, m.end_s))
                         for r, h in enumerate(hits) for m in (h.moments or [])), key=lambda x: x[:2])
        moments = [s for _, _, s in ranked]
        if hits and hits[0].start_s is not None:
            first = Span(hits[0].video_id, float(hits[0].start_s), float(hits[0].end_s))
            moments = [first] + [m for m in moments if m != first]
        out.append(MomentQuery(text, rel, moments, [h.video_id for h in hits]))
    return out


def choose_threshold(args, index: VideoIndex, rows: pd.DataFrame) -> list[dict[str, Any]]:
    """R1@0.5 (then mIoU@1) on the val videos for every rel_threshold of the grid, best first."""
    texts, relevant = segment_queries(rows)
    vectors = index.encode_text(texts)
    table = []
    for r in REL_THRESHOLDS:
        m = moment_metrics(search_queries(index, vectors, texts, relevant, args, r))
        table.append({"rel_threshold": r, **m})
    return sorted(table, key=lambda m: (-m["R1@0.5"], -m["mIoU@1"], m["rel_threshold"]))


def latency(index: VideoIndex, vectors: np.ndarray, repeats: int, **kwargs) -> dict[str, float]:
    """Per-query search time (one query vector at a time, text already encoded): p50 / p95 / mean ms."""
    times = []
    for _ in range(repeats):
        for v in vectors:
            t0 = time.perf_counter()
            index.search(v, **kwargs)
            times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
            "mean_ms": float(np.mean(times)), "searches": len(times)}


def measure(args, model_pt: Path, model: str, manifest: pd.DataFrame) -> dict[str, Any]:
    """Val: choose rel_threshold. Test: windowed vs clip-only index, metrics, sizes, latency."""
    val_rows, val_shards = held_out(args, manifest, "val", args.val_videos)
    val = embed_index(args, val_shards, model_pt, model, f"val{len(val_rows)}-windows", True)
    grid = choose_threshold(args, VideoIndex.open(val["dir"], pretrained=str(model_pt)), val_rows)
    rel = grid[0]["rel_threshold"]
    test_rows, test_shards = held_out(args, manifest, "test", args.test_videos)
    win = embed_index(args, test_shards, model_pt, model, f"test{len(test_rows)}-windows", True)
    clip = embed_index(args, test_shards, model_pt, model, f"test{len(test_rows)}-clips", False)
    win_index = VideoIndex.open(win["dir"], pretrained=str(model_pt))
    clip_index = VideoIndex.open(clip["dir"], pretrained=str(model_pt))
    texts, relevant = segment_queries(test_rows)
    vectors = win_index.encode_text(texts)
    metrics = moment_metrics(search_queries(win_index, vectors, texts, relevant, args, rel))
    clip_queries = search_queries(clip_index, vectors, texts, relevant, args, rel)
    hours = float(test_rows["duration"].sum()) / 3600.0
    lat = {
        "windows + moments": latency(win_index, vectors, args.latency_repeats, k=args.k,
                                     moments_per_video=args.moments_per_video, rel_threshold=rel),
        "windows, no moments": latency(win_index, vectors, args.latency_repeats, k=args.k,
                                       moments_per_video=0),
        "clip-only": latency(clip_index, vectors, args.latency_repeats, k=args.k),
    }
    return {"grid": grid, "rel_threshold": rel, "metrics": metrics,
            "clip_metrics": moment_metrics(clip_queries),
            "hours": hours, "videos": len(test_rows), "segments": len(texts), "val_videos": len(val_rows),
            "val_segments": int(grid[0]["num_queries"]), "latency": lat,
            "indexes": {name: {"bytes": x["bytes"], "vectors": x["count"],
                               "factory": x["meta"].get("factory"), "window": x["embed"].get("windows")}
                        for name, x in (("windows", win), ("clip-only", clip))}}


def tables(record: BenchRecord, res: dict[str, Any], summary: dict[str, Any], args) -> None:
    """The envelope's tables: metrics, index size, latency, threshold grid."""
    m, c = res["metrics"], res["clip_metrics"]
    sample = (f"{res['segments']} queries = timed captions of {res['videos']} held-out test videos "
              f"({res['hours']:.2f} h), phrased with templates no training caption uses")
    rows = [{"index": "windows (embed --windows)", **m}, {"index": "clip-only (sparse clips)", **c}]
    record.table("metrics", title="moment retrieval on held-out long videos", columns=[
        col("index", "index"), col("R1@0.5", "R1@0.5", "{:.3f}"), col("R1@0.7", "R1@0.7", "{:.3f}"),
        col("R5@0.5", "R5@0.5", "{:.3f}"), col("R5@0.7", "R5@0.7", "{:.3f}"),
        col("video_R@1", "video R@1", "{:.3f}"), col("mIoU@1", "mIoU@1", "{:.3f}")], rows=rows,
        sample_size=sample, baseline="clip-only index of the same videos and checkpoint (its hits carry the "
        "matched sparse clip's span)", filtering=f"rel_threshold {res['rel_threshold']:g} chosen on "
        f"{res['val_segments']} segments of {res['val_videos']} val videos; k={args.k}, "
        f"{args.moments_per_video} moments per video")
    seg = summary.get("test") or {}
    record.table("segments", title="segment-level retrieval in the trainer (test split)", columns=[
        col("split", "split"), col("t2v_R@1", "t2v R@1", "{:.3f}"), col("t2v_R@5", "t2v R@5", "{:.3f}"),
        col("t2v_R@10", "t2v R@10", "{:.3f}"), col("num_videos", "segments", "{:.0f}"),
        col("wall_s", "training wall s", "{:.0f}"), col("steps", "steps", "{:.0f}")],
        rows=[{"split": "test", **{k: seg.get(k) for k in ("t2v_R@1", "t2v_R@5", "t2v_R@10", "num_videos")},
               "wall_s": summary.get("wall_s"), "steps": summary.get("steps")}],
        sample_size="every timed caption of the test split (one eval clip inside each span)",
        baseline="none", filtering="equivalence: segments of the same event class count as correct")
    hours = res["hours"]
    size_rows = [{"index": name, "factory": x["factory"], "vectors": x["vectors"], "bytes": x["bytes"],
                  "vectors_per_hour": x["vectors"] / hours, "mb_per_hour": x["bytes"] / hours / 1e6}
                 for name, x in res["indexes"].items()]
    record.table("size", title="index size per hour of video", columns=[
        col("index", "index"), col("factory", "factory"), col("vectors", "vectors", "{:,}"),
        col("vectors_per_hour", "vectors / hour", "{:,.0f}"), col("mb_per_hour", "MB / hour", "{:.2f}")],
        rows=size_rows, sample_size=sample, baseline="clip-only index", filtering="index version folder")
    lat_rows = [{"index": name, **v} for name, v in res["latency"].items()]
    record.table("latency", title="query latency (text already encoded, one query at a time)", columns=[
        col("index", "search"), col("p50_ms", "p50 ms", "{:.2f}"), col("p95_ms", "p95 ms", "{:.2f}"),
        col("mean_ms", "mean ms", "{:.2f}"), col("searches", "searches", "{:,}")], rows=lat_rows,
        sample_size=f"{res['segments']} queries x {args.latency_repeats} repeats", baseline="clip-only index",
        filtering="none")
    record.table("threshold", title="merge threshold on the val videos", columns=[
        col("rel_threshold", "rel_threshold", "{:g}"), col("R1@0.5", "R1@0.5", "{:.3f}"),
        col("R1@0.7", "R1@0.7", "{:.3f}"), col("mIoU@1", "mIoU@1", "{:.3f}")],
        rows=sorted(res["grid"], key=lambda g: g["rel_threshold"]),
        sample_size=f"{res['val_segments']} segments of {res['val_videos']} val videos", baseline="none",
        filtering="the best R1@0.5 (then mIoU@1) is used on test")


def main(argv=None) -> int:
    args = parse_args(argv)
    record = BenchRecord.start("moments", sys.argv[1:] if argv is None else argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    manifest = corpus(args)
    model_pt, summary = train(args)
    model = summary.get("model") or load_train_config(args.config).model
    res = measure(args, model_pt, model, manifest)
    tables(record, res, summary, args)
    r1 = res["metrics"]["R1@0.5"]
    record.add_headline("moments", f"R1@0.5 >= {FLOOR_R1_05} (held-out videos and query phrasing)",
                        f"{r1:.3f} over {res['segments']} queries", "yes" if r1 >= FLOOR_R1_05 else "no")
    record.extra.update({"result": res, "train_summary": {k: summary.get(k) for k in
                                                          ("steps", "wall_s", "epochs_done", "test", "val")}})
    record.write(args.json, note=args.note)
    print(json.dumps({"metrics": res["metrics"], "rel_threshold": res["rel_threshold"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
