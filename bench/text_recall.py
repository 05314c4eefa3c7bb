"""Recall@k on held-out TEXT queries (issue #17, item 6): an IVF index tuned on caption embeddings (what
``build_index`` does when ``jobs.embed --with-text`` wrote them) against the same index tuned the old way, on
held-out video vectors, both measured on text queries neither build saw.

The corpus: ``--videos`` synthetic video specs (``synthetic.make_spec``, profile ``full``) with their
ingest captions (``make_captions``, 2-5 paraphrases). Captions are encoded by the project's text encoder
(CLIP4Clip-meanP-tiny, seeded random init: real text vectors, untrained). Decoding and embedding
``--videos`` videos does not fit the time budget, so a video's vectors are made from its first caption's
vector the way contrastive encoders place them (the text/video "modality gap", Liang et al. 2022): that
vector, plus one offset shared by every video vector (``--gap``), plus per-video noise (what the caption does
not say: position, size, background; ``--video-noise``), plus per-clip noise for its ``--clips`` clips
(``--clip-noise``). Text queries get none of these: they lie off the video manifold, as users' queries do.
The JSON reports the resulting cosines (``extra.gap_stats``), so the gap can be judged.

Queries: the tuning set is the first-caption embeddings of the first half of the videos, written where
``jobs.embed --with-text`` writes caption embeddings (``_text/``), so the build finds them on its own and
samples 1,000; the held-out set is ``--heldout`` paraphrases drawn with another seed for the other half of the
videos, minus every caption string of the first half. No headline row: the figures are in docs/index.md.

    python -m bench.text_recall      # 25,000 videos x 4 clips; writes docs/data/text_recall.json
    python -m bench.text_recall --videos 5000 --json /tmp/text_recall.json
    python -m bench.text_recall --no-captions --factory IVF1024,PQ64x4fs --json /tmp/text_recall_nocap.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from bench.record import BenchRecord, add_record_args, col  # noqa: E402
from index import VideoIndex, build_index  # noqa: E402
from index.testing import write_embeddings  # noqa: E402
from index.tuning import NPROBE_CANDIDATES, apply_search_params, recall_at_k  # noqa: E402
from runtime.threads import set_torch_threads  # noqa: E402
from synthetic import make_captions, make_config, make_spec  # noqa: E402

MODEL = "clip4clip-meanP-tiny"
PROFILE = "full"


def captions(videos: int, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """Each video's ingest captions, and another draw of paraphrases of the same semantics (user queries) for
    the second half of the videos."""
    cfg = make_config(seed=seed, profile=PROFILE)
    specs = [make_spec(cfg, i) for i in range(videos)]
    return ([make_captions(s, PROFILE, seed) for s in specs],
            [make_captions(s, PROFILE, seed + 1_000_003) for s in specs[videos // 2:]])


def encode(texts: list[str], batch: int = 512) -> tuple[dict[str, np.ndarray], str]:
    """Unit text vectors of the distinct ``texts`` from the project's text encoder (seeded random init)."""
    set_torch_threads(2)
    model, _, _ = models.create_model(MODEL, seed=0)
    model.eval()
    distinct = sorted(set(texts))
    out = []
    with torch.no_grad():
        for i in range(0, len(distinct), batch):
            out.append(model.encode_text(distinct[i:i + batch]).float().numpy())
    vecs = np.concatenate(out)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return dict(zip(distinct, vecs)), model.model_id


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def video_vectors(caps: list[list[str]], text: dict[str, np.ndarray], args) -> np.ndarray:
    """``[videos * clips, D]`` clip vectors: the video's first caption + shared gap + per-video and per-clip
    noise (one caption a video: encoding all 2-5 would take most of the time budget)."""
    rng = np.random.default_rng(args.seed)
    dim = len(next(iter(text.values())))
    first = np.stack([text[cs[0]] for cs in caps])
    gap = args.gap * unit(rng.normal(size=dim))
    per_video = first + gap + args.video_noise * unit(rng.normal(size=(len(caps), dim)))
    clips = per_video[:, None, :] + args.clip_noise * unit(rng.normal(size=(len(caps), args.clips, dim)))
    return unit(clips.reshape(-1, dim)).astype(np.float32)


def write_corpus(work: Path, args) -> dict:
    t0 = time.perf_counter()
    caps, paraphrases = captions(args.videos, args.seed)
    half = args.videos // 2
    seen = {c for cs in caps[:half] for c in cs}  # held-out strings are none of the first half's captions
    held = sorted({c for cs in paraphrases for c in cs} - seen)
    rng = np.random.default_rng(args.seed + 1)
    held = [held[i] for i in sorted(rng.choice(len(held), min(args.heldout, len(held)), replace=False))]
    text, model_id = encode([cs[0] for cs in caps] + held)
    vectors = video_vectors(caps, text, args)
    emb = write_embeddings(work / "emb", vectors, clips_per_video=args.clips, model_id=model_id,
                           model_name=MODEL, rows_per_file=50_000, captions=caps)
    tune = [(f"vid-{v:06d}", caps[v][0]) for v in range(half)]
    part = work / "emb" / "_text" / f"model_id={model_id.replace('@', '_')}"  # as --with-text writes it
    part.mkdir(parents=True)
    flat = pa.array(np.stack([text[c] for _, c in tune]).reshape(-1), pa.float32())
    pq.write_table(pa.table({"video_id": [v for v, _ in tune], "caption": [c for _, c in tune],
                             "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])}),
                   part / "part-000000.parquet")
    heldout = np.stack([text[c] for c in held])
    own = vectors.reshape(args.videos, args.clips, -1)
    step = max(1, args.videos // 200)
    gap_stats = {
        "cos_caption_to_own_video_best_clip": float(np.mean(
            [max(own[v] @ text[caps[v][0]]) for v in range(0, args.videos, step)])),
        "cos_heldout_text_to_nearest_clip": float(np.mean(np.max(heldout[:200] @ vectors.T, axis=1))),
        "cos_video_clip_to_nearest_other_video": float(np.mean(
            [np.sort(own[v, 0] @ vectors.T)[-args.clips - 1] for v in range(0, args.videos, step)])),
    }
    return {"emb": emb, "vectors": vectors, "heldout": heldout, "tuning_captions": len({c for _, c in tune}),
            "heldout_count": len(held), "gap_stats": gap_stats, "corpus_s": time.perf_counter() - t0}


def heldout_recall(vi: VideoIndex, queries: np.ndarray, truth: np.ndarray, k: int) -> float:
    return recall_at_k(vi.search_vectors(queries, k)[1], truth, k)


def measure(work: Path, corpus: dict, args) -> dict:
    """Build the same IVF index twice (tuned on video probes / on caption text); measure both on held-out
    text."""
    k, queries = args.k, corpus["heldout"]
    truth = np.argsort(-(queries @ corpus["vectors"].T), axis=1)[:, :k]  # ids are row numbers
    builds = {}
    # --no-captions: the build never sees a caption; the old rule (video probes) vs off-data probes.
    plans = ((("video", None, "video"), ("text", None, "offdata")) if args.no_captions
             else (("video", None, "video"), ("text", "auto", "video")))
    for name, text_queries, rule in plans:
        meta = build_index(corpus["emb"], work / f"idx-{name}", factory=args.factory,
                           recall_target=args.recall, k=k, num_probes=args.probes, text_queries=text_queries,
                           seed=args.seed, progress=False, no_text_rule=rule)
        vi = VideoIndex.open(work / f"idx-{name}")
        t0 = time.perf_counter()
        recall = heldout_recall(vi, queries, truth, k)
        per_query_ms = (time.perf_counter() - t0) * 1000 / len(queries)
        builds[name] = {"tuned_on": meta["tuning_queries"]["kind"], "tuning_count":
                        meta["tuning_queries"].get("count", meta["tuning_queries"]["video_probes"]),
                        "params": meta["search_params"], "nprobe": meta["search_params"].get("nprobe"),
                        "tuning_recall": meta["recall"], "heldout_recall": recall, "target": args.recall,
                        "met": recall >= args.recall, "search_ms_per_query": per_query_ms,
                        "video_probe_recall": meta.get("video_probe_recall", meta["recall"]),
                        "build_s": meta["build_time_s"], "tuning_curve": meta["shards"][0]["tuning_curve"],
                        "rerank_depth": (meta["shards"][0].get("rerank") or {}).get("depth")}
    if any(b["rerank_depth"] for b in builds.values()):
        return {"builds": builds, "curve": []}  # (nprobe, R) curves: in each build's tuning_curve
    vi = VideoIndex.open(work / "idx-text")
    video_probe = dict(builds["video"]["tuning_curve"])
    text_tune = dict(builds["text"]["tuning_curve"])
    curve = []
    top = max(builds["text"]["nprobe"] or 1, builds["video"]["nprobe"] or 1)
    for nprobe in [c for c in NPROBE_CANDIDATES if c <= 2 * top]:
        apply_search_params(vi.indexes[0], {"nprobe": nprobe})
        curve.append({"nprobe": nprobe, "video_probes": video_probe.get(nprobe),
                      "tuning_text": text_tune.get(nprobe),
                      "heldout_text": heldout_recall(vi, queries, truth, k)})
    return {"builds": builds, "curve": curve}


def record_results(record: BenchRecord, corpus: dict, results: dict, args) -> None:
    b = results["builds"]
    second = "off-data probes, no captions" if args.no_captions else "caption text embeddings (now)"
    rows = [{**b[name], "label": label} for name, label in
            (("video", "held-out video vectors (before)"), ("text", second))]
    versus = (f"{b['text']['tuning_count']} off-data probes (no caption seen)" if args.no_captions else
              f"{b['text']['tuning_count']} of the {corpus['tuning_captions']:,} distinct first captions of "
              "half the videos")
    sample = (f"{args.videos:,} synthetic videos x {args.clips} clips = {args.videos * args.clips:,} "
              f"{corpus['vectors'].shape[1]}-d vectors, {args.factory}; tuned on "
              f"{b['video']['tuning_count']} held-out video vectors vs {versus}; measured on "
              f"{corpus['heldout_count']:,} held-out paraphrases of the other half (disjoint strings); exact "
              f"top-{args.k} by brute force")
    record.table("tuning", columns=[
        col("label", "tuned on"), col("tuning_count", "tuning queries"), col("nprobe", "nprobe"),
        col("tuning_recall", f"recall@{args.k} on its tuning set", "{:.3f}"),
        col("heldout_recall", f"recall@{args.k}, held-out text", "{:.3f}"), col("target", "target"),
        col("met", "met"), col("rerank_depth", "re-rank depth R"),
        col("search_ms_per_query", "ms / query (batched)", "{:.3f}")],
        rows=rows, sample_size=sample, baseline="the same index tuned the old way (held-out video vectors)",
        filtering="none")
    if results["curve"]:  # re-ranked builds have (nprobe, R, recall) curves: in extra.results
        record.table("curve", columns=[
            col("nprobe", "nprobe"), col("video_probes", f"recall@{args.k}, video probes", "{:.3f}"),
            col("tuning_text", f"recall@{args.k}, " + ("off-data probes" if args.no_captions
                                                        else "tuning captions"), "{:.3f}"),
            col("heldout_text", f"recall@{args.k}, held-out text", "{:.3f}")],
            rows=results["curve"], sample_size=sample,
            baseline="video probes (the old tuning set); empty cells: the tuner stopped before that nprobe",
            filtering="none")
    how_text = "tuned on off-data probes, no captions" if args.no_captions else "tuned on caption text"
    for name, how in (("text", how_text), ("video", "tuned on video vectors, the old way")):
        record.add_headline(
            "FAISS index, text queries", f"recall@{args.k} >= {args.recall} on held-out text queries ({how})",
            f"{b[name]['heldout_recall']:.3f} at nprobe {b[name]['nprobe']} ({corpus['heldout_count']:,} "
            f"queries)", "yes" if b[name]["met"] else "no")
    record.extra.update(results=results, gap_stats=corpus["gap_stats"], corpus_s=corpus["corpus_s"],
                        settings={k: getattr(args, k) for k in ("gap", "video_noise", "clip_noise", "seed")})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=25_000)
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--factory", default="IVF1024,Flat")
    p.add_argument("--recall", type=float, default=0.95, help="the recall@k target the builds tune to")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--probes", type=int, default=256, help="held-out video vectors of the old tuning")
    p.add_argument("--heldout", type=int, default=2000, help="held-out text queries measured")
    p.add_argument("--gap", type=float, default=1.0, help="length of the shared video offset (unit vectors)")
    p.add_argument("--video-noise", type=float, default=0.6)
    p.add_argument("--clip-noise", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-captions", action="store_true",
                   help="neither build sees a caption: video probes (old rule) vs off-data probes")
    p.add_argument("--workdir", default="/tmp/vidsift_bench_text_recall")
    add_record_args(p, "text_recall")
    args = p.parse_args(argv)
    record = BenchRecord.start("text_recall", sys.argv[1:] if argv is None else argv)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    corpus = write_corpus(work, args)
    results = measure(work, corpus, args)
    print(json.dumps({"gap_stats": corpus["gap_stats"], **results}, indent=1, default=float))
    record_results(record, corpus, results, args)
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
