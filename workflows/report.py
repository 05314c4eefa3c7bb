"""The demo's HTML report: every query with its hits, a thumbnail of each hit's best clip, timestamps and
the generated captions, in one self-contained page."""

from __future__ import annotations

import base64
import html
import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from torchvision.io import encode_png

from pipeline.decode import decode_frames

ShardLookup = dict[str, tuple[str, str]]


def shard_lookup(ingest_dir: Path) -> ShardLookup:
    """video_id → (tar path, key) from ingest's per-shard Parquet indexes."""
    out = {}
    for index in sorted((ingest_dir / "shards").glob("*.parquet")):
        for row in pq.read_table(index, columns=["video_id", "key"]).to_pylist():
            out[row["video_id"]] = (str(index.with_suffix(".tar")), row["key"])
    return out


def thumbnail_png(lookup: ShardLookup, video_id: str, at_s: float, size: int = 96) -> str:
    """A base64 PNG of the frame shown at ``at_s`` seconds (decoded by seeking, like every stage)."""
    tar_path, key = lookup[video_id]
    with tarfile.open(tar_path) as tar:
        data = tar.extractfile(f"{key}.mp4").read()
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
             "<h1>vidsift demo</h1>", "<h2>Metrics</h2><pre>", html.escape(json.dumps(metrics, indent=2)),
             "</pre><h2>Stages</h2><pre>", html.escape(timings), "</pre><h2>Queries</h2>"]
    for res in results:
        parts += hits_table(res, lookup, generated)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
