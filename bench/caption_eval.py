"""Caption quality of SwinBERT checkpoints on a split, and the retrieval gain of caption reranking.

    python -m bench.caption_eval --shards DIR --checkpoints A.pt [B.pt ...] [--split test] [--beam 3]
        [--index INDEX_DIR --rerank-weight 0.5 --k 10] [--output REPORT.md] [--json PATH]

Per checkpoint: BLEU-4 / CIDEr-D / ROUGE-L / METEOR(exact) of the generated captions against the ingest
captions of the split (pipeline.caption_metrics), and captioning throughput. With ``--index``: for every
video of the split, its first caption is the query; R@1 / R@5 of ``VideoIndex.search`` without and with the
caption reranker (a hit is correct when its ``caption_class`` equals the query video's — same caption set),
on all queries and on the *hard* ones (the baseline top-k holds a distractor of the same ``hard_group``
but another ``caption_class``: same shapes and colours, different motion), and on the *hard split*: the
bi-encoder's top-k restricted to the query video's ``hard_group`` (every candidate has the query's shapes and
colours; only the motion tells them apart). The gain is reported as the difference against the un-reranked
baseline measured in the same run.

The hard split is filtered by ground truth: its candidates are chosen with the corpus labels (the query
video's ``hard_group``), which no deployed search has, so the reranker only has to read the direction of
motion among videos already known to match the query's shapes and colours. Its R@1 is a diagnostic of that,
not a retrieval figure; the script prints this beside the figures and records it in the JSON's filtering.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bench.record import BenchRecord, add_record_args, col
from index import VideoIndex
from models import create_model
from pipeline.caption_metrics import evaluate_captions
from pipeline.captioning import checkpoint_model_name, checkpoint_sampling
from workflows.rerank import ShardFramesLookup, make_reranker

HARD_SPLIT_CAVEAT = (
    "hard_split is pre-filtered by ground truth: the candidates are restricted, using the corpus labels, to "
    "the query video's hard_group (the videos with its shapes and colours), so only the direction of motion "
    "is left to decide; the 'all' group has no such filter")
GROUP_FILTERING = {
    "all": "none: every query, the bi-encoder's top k",
    "hard": "only queries whose baseline top k holds a same-hard_group video of another class",
    "hard_split": "candidates restricted BY GROUND TRUTH to the query video's hard_group (same shapes and "
                  "colours), then the top k",
}


def caption_split(model, lookup, beam: int, batch_size: int = 16):
    """Generated captions for every video of ``lookup``; returns (ids, hypotheses, references, seconds)."""
    ids = lookup.video_ids()
    hyps: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        frames = torch.stack([lookup(v)[0] for v in chunk])
        mask = torch.stack([lookup(v)[1] for v in chunk])
        with torch.inference_mode():
            hyps += model.generate(frames, mask, beam_size=beam)[0]
    seconds = time.perf_counter() - start
    refs = [lookup.records[v]["captions"] for v in ids]
    return ids, hyps, refs, seconds


def rerank_gain(index_dir: str, model, lookup, weight: float, k: int) -> dict[str, float]:
    """R@1 / R@5 without and with caption reranking of ``index_dir``'s hits (see :func:`rerank_metrics`)."""
    index = VideoIndex.open(index_dir)
    reranker = make_reranker(model, lookup, weight=weight)
    return rerank_metrics(lambda q: index.search(q, k=len(index)), reranker, lookup.records,
                          lookup.video_ids(), k)


def rerank_metrics(search, reranker, records: dict, video_ids: list[str], k: int) -> dict[str, float]:
    """R@1 / R@5 of ``search`` and of ``reranker`` over its top ``k``, on three query groups.

    ``search(query)`` ranks videos (objects with ``video_id``), ``reranker(query, hits)`` reorders hits,
    ``records[video_id]`` holds ``captions``, ``caption_class`` and ``hard_group``. Each video's first caption
    is a query; a hit is correct when its ``caption_class`` is the query video's. Groups: ``all``; ``hard``
    (the top ``k`` holds a same-``hard_group`` video of another class); ``hard_split`` (the ranking restricted
    to the query video's ``hard_group``, then its top ``k``: only the motion tells candidates apart).
    """
    stats = {group: {"n": 0, "base@1": 0, "rr@1": 0, "base@5": 0, "rr@5": 0}
             for group in ("all", "hard", "hard_split")}

    def count(group: str, base: list, reranked: list, target: str) -> None:
        def correct(hits, n):
            return any(records[h.video_id].get("caption_class", h.video_id) == target for h in hits[:n])

        s = stats[group]
        s["n"] += 1
        s["base@1"] += correct(base, 1)
        s["rr@1"] += correct(reranked, 1)
        s["base@5"] += correct(base, 5)
        s["rr@5"] += correct(reranked, 5)

    for vid in video_ids:
        rec = records[vid]
        if not rec.get("captions"):
            continue
        query, target = rec["captions"][0], rec.get("caption_class", vid)
        # The index may hold every split: rank the whole index once, keep this split's hits.
        ranked = [h for h in search(query) if h.video_id in records]
        base = ranked[:k]
        reranked = reranker(query, list(base))
        count("all", base, reranked, target)
        if any(records[h.video_id].get("hard_group") == rec.get("hard_group")
               and records[h.video_id].get("caption_class") != target for h in base):
            count("hard", base, reranked, target)
        group_of = rec.get("hard_group")
        if group_of is not None:
            same_group = [h for h in ranked if records[h.video_id].get("hard_group") == group_of][:k]
            count("hard_split", same_group, reranker(query, list(same_group)), target)
    out: dict[str, float] = {}
    for group, s in stats.items():
        n = max(s["n"], 1)
        out[f"{group}_queries"] = s["n"]
        for key in ("base@1", "rr@1", "base@5", "rr@5"):
            out[f"{group}_{key}"] = s[key] / n
        out[f"{group}_gain@1"] = (s["rr@1"] - s["base@1"]) / n
    return out


def evaluate_checkpoint(ckpt: str, args) -> dict | None:
    """Caption metrics (with ``--index`` also the rerank figures) of one checkpoint; None: empty split."""
    model, transform, _ = create_model(checkpoint_model_name(ckpt), pretrained=ckpt)
    lookup = ShardFramesLookup(args.shards, transform, num_frames=model.num_frames, split=args.split,
                               sampling=checkpoint_sampling(ckpt, model.num_frames))
    ids, hyps, refs, seconds = caption_split(model, lookup, args.beam)
    if not ids:
        return None
    row = {"checkpoint": Path(ckpt).name, "model_id": model.model_id,
           "sparse_mask": model.sparse_mask is not None, "videos": len(ids),
           **{k: round(v, 4) for k, v in evaluate_captions(hyps, refs).items()},
           "videos_per_s": round(len(ids) / seconds, 2)}
    if args.index:
        row.update({k: round(v, 4) for k, v in
                    rerank_gain(args.index, model, lookup, args.rerank_weight, args.k).items()})
    return row


def rerank_rows(rows: list[dict]) -> list[dict]:
    """One row per (checkpoint, query group) for the rendered rerank table."""
    out = []
    for r in rows:
        for group, filtering in GROUP_FILTERING.items():
            if f"{group}_queries" in r:
                out.append({"model_id": r["model_id"], "group": group, "filtering": filtering,
                            "queries": r[f"{group}_queries"], "base@1": r[f"{group}_base@1"],
                            "rr@1": r[f"{group}_rr@1"], "base@5": r[f"{group}_base@5"],
                            "rr@5": r[f"{group}_rr@5"], "gain@1": r[f"{group}_gain@1"]})
    return out


def record_results(record: BenchRecord, rows: list[dict], args) -> None:
    sample = f"the {args.split} split of {args.shards}: {rows[0]['videos']} videos, beam {args.beam}"
    metric_cols = [col("model_id", "checkpoint"), col("sparse_mask", "sparse mask"), col("videos", "videos")]
    metric_cols += [col(k, k, "{:.4f}") for k in ("BLEU-4", "CIDEr-D", "ROUGE-L", "METEOR-exact")]
    metric_cols.append(col("videos_per_s", "videos/s", "{:.0f}"))
    record.table("captions", columns=metric_cols, rows=rows, sample_size=sample,
                 baseline="the ingest captions of each video are the references", filtering="none")
    if args.index:
        cols = [col("model_id", "checkpoint"), col("group", "query group"), col("filtering", "candidates"),
                col("queries", "queries"), col("base@1", "R@1 bi-encoder", "{:.3f}"),
                col("rr@1", "R@1 reranked", "{:.3f}"), col("base@5", "R@5 bi-encoder", "{:.3f}"),
                col("rr@5", "R@5 reranked", "{:.3f}"), col("gain@1", "gain@1", "{:+.3f}")]
        record.table("rerank", columns=cols, rows=rerank_rows(rows),
                     sample_size=f"{sample}; each video's first caption is a query; a hit is correct "
                                 f"when its caption_class matches; index {args.index}, top k={args.k}, "
                                 f"score = cosine + {args.rerank_weight} x caption log-likelihood",
                     baseline="the bi-encoder's own ranking of the same candidates, same run",
                     filtering=HARD_SPLIT_CAVEAT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--checkpoints", nargs="+", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--index", default=None, help="published VideoIndex dir for the rerank gain")
    p.add_argument("--rerank-weight", type=float, default=0.5)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--output", default=None, help="append the markdown table to this file")
    add_record_args(p, "caption_eval")
    args = p.parse_args(argv)
    record = BenchRecord.start("caption_eval", sys.argv[1:] if argv is None else argv)
    rows = []
    for ckpt in args.checkpoints:
        row = evaluate_checkpoint(ckpt, args)
        if row is None:
            print(f"no videos of split {args.split!r} in {args.shards}", file=sys.stderr)
            return 2
        print(json.dumps(row))
        rows.append(row)
    cols = list(rows[0])
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    text = "\n".join(table)
    if args.index:
        text += f"\n\nNote: {HARD_SPLIT_CAVEAT}."
    print(text)
    if args.output:
        header = (f"\n## caption_eval — {datetime.date.today()} on {platform.node()} "
                  f"({torch.get_num_threads()} threads, CPU; shared machine, timings noisy)\n\n"
                  f"`python -m bench.caption_eval {' '.join(argv or sys.argv[1:])}`\n\n")
        with open(args.output, "a") as fh:
            fh.write(header + text + "\n")
    record_results(record, rows, args)
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
