"""The main job: the whole vidsift pipeline on local Ray over a synthetic corpus, with an HTML report.

    python -m jobs.demo [--workdir runs/demo] [--config configs/demo.yaml] [--n 600]

synth → ingest → train (CLIP4Clip seqTransf, Ray Train) → embed (Ray Data) → index (FAISS) → caption
(SwinBERT, trained with the same trainer) → query. Prints example queries with their top hits, the retrieval
and caption metrics, and writes ``WORKDIR/report.html`` (queries, hit thumbnails, timestamps, generated
captions). Every stage is idempotent, so a rerun over the same workdir only redoes what is missing.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"


def load_demo_config(path: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The demo recipe (configs/demo.yaml) with command-line overrides applied."""
    cfg = yaml.safe_load(Path(path or DEFAULT_CONFIG).read_text())
    for key, value in overrides.items():
        if value is not None:
            cfg[key] = value
    return cfg


class StageTimer:
    """Prints a header per stage and keeps (stage, seconds, summary) rows for the final table."""

    def __init__(self):
        self.rows: list[tuple[str, float, str]] = []

    def run(self, name: str, fn, describe=lambda r: ""):
        print(f"\n=== [{len(self.rows) + 1}] {name} ===", flush=True)
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        self.rows.append((name, seconds, describe(result)))
        print(f"=== {name}: {seconds:.1f}s {self.rows[-1][2]}", flush=True)
        return result

    def table(self) -> str:
        lines = [f"{'stage':<10} {'seconds':>8}  summary", "-" * 72]
        lines += [f"{n:<10} {s:>8.1f}  {d}" for n, s, d in self.rows]
        lines.append(f"{'total':<10} {sum(s for _, s, _ in self.rows):>8.1f}")
        return "\n".join(lines)


def shard_lookup(ingest_dir: Path) -> dict[str, tuple[str, str]]:
    """video_id → (tar path, key) from ingest's per-shard Parquet indexes."""
    import pyarrow.parquet as pq

    out = {}
    for index in sorted((ingest_dir / "shards").glob("*.parquet")):
        for row in pq.read_table(index, columns=["video_id", "key"]).to_pylist():
            out[row["video_id"]] = (str(index.with_suffix(".tar")), row["key"])
    return out


def thumbnail_png(lookup: dict[str, tuple[str, str]], video_id: str, at_s: float, size: int = 96) -> str:
    """A base64 PNG of the frame shown at ``at_s`` seconds (decoded by seeking, like every stage)."""
    import torch
    from torchvision.io import encode_png

    from pipeline.decode import decode_frames

    tar_path, key = lookup[video_id]
    with tarfile.open(tar_path) as tar:
        data = tar.extractfile(f"{key}.mp4").read()
    frame = decode_frames(data, [max(at_s, 0.0)], size=size)[0]
    png = encode_png(torch.from_numpy(frame).permute(2, 0, 1).contiguous())
    return base64.b64encode(bytes(png.numpy())).decode()


def pick_queries(manifest, count: int) -> list[dict[str, Any]]:
    """Test-split captions of distinct caption classes, each with the set of videos that match it."""
    test = manifest[manifest["split"] == "test"]
    queries = []
    for cls, group in sorted(test.groupby("caption_class"), key=lambda kv: kv[0]):
        caption = list(group.iloc[0]["captions"])[0]
        relevant = set(manifest[manifest["caption_class"] == cls]["video_id"])
        queries.append({"text": caption, "caption_class": cls, "relevant": relevant})
        if len(queries) == count:
            break
    return queries


def write_report(path: Path, results: list[dict], metrics: dict[str, Any], timings: str,
                 lookup, generated: dict[str, str]) -> None:
    """A self-contained HTML page: every query, its hits with thumbnails, timestamps and captions."""
    parts = ["<!doctype html><meta charset='utf-8'><title>vidsift demo</title>",
             "<style>body{font-family:sans-serif;margin:2em}td{vertical-align:top;padding:4px 8px}"
             ".ok{color:#080}.no{color:#a00}img{image-rendering:pixelated;width:96px}</style>",
             "<h1>vidsift demo</h1>", "<h2>Metrics</h2><pre>", html.escape(json.dumps(metrics, indent=2)),
             "</pre><h2>Stages</h2><pre>", html.escape(timings), "</pre><h2>Queries</h2>"]
    for res in results:
        parts.append(f"<h3>“{html.escape(res['query'])}”</h3><table><tr><th>#</th><th>frame</th>"
                     "<th>video</th><th>score</th><th>best clip</th><th>generated caption</th>"
                     "<th>ingest caption</th></tr>")
        for rank, hit in enumerate(res["hits"], 1):
            mid = ((hit.start_s or 0.0) + (hit.end_s or 0.0)) / 2
            img = thumbnail_png(lookup, hit.video_id, mid)
            cls = "ok" if hit.video_id in res["relevant"] else "no"
            parts.append(
                f"<tr><td>{rank}</td><td><img src='data:image/png;base64,{img}'></td>"
                f"<td class='{cls}'>{html.escape(hit.video_id)}</td><td>{hit.score:.3f}</td>"
                f"<td>{hit.start_s:.2f}–{hit.end_s:.2f} s</td>"
                f"<td>{html.escape(generated.get(hit.video_id, '—'))}</td>"
                f"<td>{html.escape(hit.caption or '')}</td></tr>")
        parts.append("</table>")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)


def run_demo(workdir: str | Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run every stage in order on local Ray; returns the metrics written to the report."""
    import pandas as pd
    import pyarrow.parquet as pq
    import ray

    from index import VideoIndex, build_index
    from jobs.caption import run_caption
    from jobs.embed import run_embed
    from pipeline.caption_metrics import evaluate_captions
    from pipeline.ingest import run_ingest
    from pipeline.synthetic import generate_corpus
    from pipeline.training import load_train_config, run_training

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    if not ray.is_initialized():
        # Under `ray job submit` RAY_ADDRESS names the job's cluster; standalone, start a private local one.
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)

    synth = work / "synth"
    manifest = timer.run("synth", lambda: generate_corpus(
        synth, n=cfg["n"], seed=cfg["seed"], min_duration=cfg["min_duration"],
        max_duration=cfg["max_duration"], size=cfg["size"], fps=cfg["fps"],
        keyframe_interval=cfg["keyframe_interval"], profile=cfg["profile"]),
        lambda m: f"{len(m)} videos, {m['caption_class'].nunique()} caption classes")
    ingest = work / "ingest"
    timer.run("ingest", lambda: run_ingest(input=str(synth / "manifest.parquet"), output=str(ingest),
                                           samples_per_shard=cfg["samples_per_shard"]),
              lambda s: f"{s.get('samples', '?')} samples, {s.get('errors', '?')} errors")

    train_dir = work / "train"
    train_cfg = load_train_config(REPO / cfg["train_config"], cfg.get("train_overrides") or {})
    if (train_dir / "summary.json").exists() and (train_dir / "model.pt").exists():
        train_summary = timer.run("train", lambda: json.loads((train_dir / "summary.json").read_text()),
                                  lambda s: "(already trained)")
    else:
        train_summary = timer.run("train", lambda: run_training(str(ingest), str(train_dir), train_cfg),
                                  lambda s: f"{s['steps']} steps")
    model_path = str(train_dir / "model.pt")

    emb = work / "emb"
    emb_summary = timer.run("embed", lambda: run_embed(str(ingest), train_cfg.model, str(emb),
                                                       pretrained=model_path, batch_size=32),
                            lambda s: f"{s['videos']} new videos, {s['errors_total']} errors")
    index_dir = work / "index"
    index_meta = timer.run("index", lambda: build_index(emb_summary["partition"], str(index_dir)),
                           lambda m: f"{m.get('factory')} over {m.get('count')} vectors")

    cap_dir = work / "caption-train"
    cap_cfg = load_train_config(REPO / cfg["caption_config"], cfg.get("caption_overrides") or {})
    if (cap_dir / "model.pt").exists():
        timer.run("cap-train", lambda: None, lambda s: "(already trained)")
    else:
        timer.run("cap-train", lambda: run_training(str(ingest), str(cap_dir), cap_cfg),
                  lambda s: f"{s['steps']} steps")
    captions_out = work / "captions"
    # Caption the held-out test split (the caption metrics' references); `caption_split: null` does all.
    cap_summary = timer.run("caption", lambda: run_caption(str(ingest), str(cap_dir / "model.pt"),
                                                           str(captions_out), split=cfg.get("caption_split")),
                            lambda s: f"{s.get('captioned', s.get('videos', '?'))} videos captioned")
    generated = {}
    for row in pq.read_table(captions_out / "captions.parquet").to_pylist():
        generated[row["video_id"]] = row["caption"]

    index = VideoIndex.open(index_dir)
    queries = pick_queries(manifest if isinstance(manifest, pd.DataFrame)
                           else pd.read_parquet(synth / "manifest.parquet"), cfg["queries"])
    results = []

    def query_all():
        for q in queries:
            hits = index.search(q["text"], k=cfg["top_k"])
            results.append({"query": q["text"], "hits": hits, "relevant": q["relevant"]})
        return results

    timer.run("query", query_all, lambda r: f"{len(r)} queries")
    records = pd.read_parquet(synth / "manifest.parquet").to_dict("records")
    refs = {row["video_id"]: list(row["captions"]) for row in records}
    test_ids = {row["video_id"] for row in records if row["split"] == "test"}
    order = sorted(v for v in generated if v in test_ids)
    cap_metrics = evaluate_captions([generated[v] for v in order], [refs[v] for v in order]) if order else {}
    metrics = {
        "retrieval_test": train_summary.get("test"),
        "query_hit@1": sum(r["hits"][0].video_id in r["relevant"] for r in results) / max(len(results), 1),
        "index": {k: index_meta.get(k) for k in ("factory", "count", "recall", "search_params")},
        "caption_test": cap_metrics,
        "caption_summary": {k: v for k, v in cap_summary.items() if isinstance(v, (int, float, str))},
    }
    lookup = shard_lookup(ingest)
    print("\n=== example queries ===")
    for res in results:
        print(f"\n“{res['query']}”")
        for rank, hit in enumerate(res["hits"], 1):
            mark = "✓" if hit.video_id in res["relevant"] else "✗"
            print(f"  {rank}. {mark} {hit.video_id}  score {hit.score:.3f}  "
                  f"clip {hit.start_s:.2f}–{hit.end_s:.2f}s  | generated: {generated.get(hit.video_id, '—')}")
    print("\n=== metrics ===")
    print(json.dumps(metrics, indent=2, default=str))
    print("\n=== stages ===")
    print(timer.table())
    report = work / "report.html"
    write_report(report, results, metrics, timer.table(), lookup, generated)
    print(f"\nreport: {report}")
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vidsift demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="everything the demo writes goes here")
    p.add_argument("--config", default=None, help=f"demo recipe (default {DEFAULT_CONFIG.relative_to(REPO)})")
    p.add_argument("--n", type=int, default=None, help="number of synthetic videos")
    p.add_argument("--queries", type=int, default=None, help="example queries to show")
    args = p.parse_args(argv)
    cfg = load_demo_config(args.config, {"n": args.n, "queries": args.queries})
    run_demo(args.workdir, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
