"""The demo's HTML report: the metrics table, every query with its hits, a thumbnail of each hit's best
clip, timestamps and the generated captions, in one self-contained page; :func:`metrics_rows` is the same
metrics table for the console."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from torchvision.io import encode_png

from pipeline.decode import decode_frames
from pipeline.shard_tar import read_tar_member

ShardLookup = dict[str, tuple[str, str]]


def shard_lookup(ingest_dir: Path) -> ShardLookup:
    """video_id → (tar path, key) from ingest's per-shard Parquet indexes."""
    out = {}
    for index in sorted((ingest_dir / "shards").glob("*.parquet")):
        for row in pq.read_table(index, columns=["video_id", "key"]).to_pylist():
            out[row["video_id"]] = (str(index.with_suffix(".tar")), row["key"])
    return out


def _fmt(metrics: dict[str, Any], *keys: str, fmt: str = "{:.3f}") -> str:
    """``KEY value`` pairs of ``metrics`` that are present, in ``fmt`` (``R@1`` from ``t2v_R@1``...)."""
    return "  ".join(f"{k.split('_', 1)[-1]} {fmt.format(metrics[k])}" for k in keys
                     if isinstance(metrics.get(k), (int, float)))


def metrics_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The demo's metrics (``metrics.json``) as (what, figures) rows: retrieval on the test split, the example
    queries, the index, caption quality and whether the captions are about their video."""
    rows = []
    test = metrics.get("retrieval_test") or {}
    if test:
        rows.append(("text → video, test split", _fmt(test, "t2v_R@1", "t2v_R@5", "t2v_R@10") + "  "
                     + _fmt(test, "t2v_MdR", fmt="{:.1f}") + f"  ({int(test.get('num_texts', 0))} captions, "
                     f"{int(test.get('num_videos', 0))} videos; a video of the caption's class counts)"))
        rows.append(("video → text, test split", _fmt(test, "v2t_R@1", "v2t_R@5", "v2t_R@10")))
    rows.append(("example queries", f"right class at rank 1: {metrics.get('query_hit@1', 0.0):.2f}"))
    index = metrics.get("index") or {}
    rows.append(("index", f"{index.get('factory')} over {index.get('count')} vectors"))
    cap = metrics.get("caption_test") or {}
    if cap:
        rows.append(("captions, test split", _fmt(cap, "BLEU-4", "CIDEr-D", "ROUGE-L", "METEOR-exact")
                     .replace("METEOR-exact", "METEOR (exact)")))
    ground = metrics.get("caption_grounding") or {}
    if ground:
        g = ground
        rows.append(("caption diversity", f"{g['distinct']} distinct captions for {g['videos']} videos "
                     f"({g['distinct_ratio']:.2f}); the most frequent one is "
                     f"{g['top_caption_share']:.0%} of them"))
        rows.append(("caption names the video's", f"colour {g['colour']:.2f}  shape {g['shape']:.2f}  "
                     f"direction {g['direction']:.2f}  all three {g['all_three']:.2f}"))
    return rows


def format_rows(rows: list[tuple[str, str]]) -> str:
    """Two aligned text columns."""
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def thumbnail_png(lookup: ShardLookup, video_id: str, at_s: float, size: int = 96) -> str:
    """A base64 PNG of the frame shown at ``at_s`` seconds (decoded by seeking, like every stage)."""
    tar_path, key = lookup[video_id]
    data = read_tar_member(tar_path, f"{key}.mp4")
    frame = decode_frames(data, [max(at_s, 0.0)], size=size)[0]
    png = encode_png(torch.from_numpy(frame).permute(2, 0, 1).contiguous())
    return base64.b64encode(bytes(png.numpy())).decode()


def hits_table(res: dict[str, Any], lookup: ShardLookup, generated: dict[str, str]) -> list[str]:
    """The HTML of one query: a heading and a row per hit."""
    parts = [f"<h3>“{html.escape(res['query'])}”</h3><table><tr><th>#</th><th>frame</th>"
             "<th>video</th><th>score</th><th>best clip</th><th>generated caption</th>"
             "<th>ingest caption</th></tr>"]
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
    return parts


def write_report(path: Path, results: list[dict], metrics: dict[str, Any], timings: str,
                 lookup: ShardLookup, generated: dict[str, str]) -> None:
    """A self-contained HTML page: every query, its hits with thumbnails, timestamps and captions."""
    parts = ["<!doctype html><meta charset='utf-8'><title>vidsift demo</title>",
             "<style>body{font-family:sans-serif;margin:2em}td{vertical-align:top;padding:4px 8px}"
             ".ok{color:#080}.no{color:#a00}img{image-rendering:pixelated;width:96px}</style>",
             "<h1>vidsift demo</h1>", "<h2>Metrics</h2><table>"]
    parts += [f"<tr><th align='left'>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>"
              for name, value in metrics_rows(metrics)]
    parts += ["</table><h2>Stages</h2><pre>", html.escape(timings), "</pre><h2>Queries</h2>"]
    for res in results:
        parts += hits_table(res, lookup, generated)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
