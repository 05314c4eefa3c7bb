"""bench/scale.py's corpus: clustered clip vectors written chunk by chunk (Parquet in the embeddings schema
plus one raw float32 file), text-like tuning / held-out queries, and the exact top 10 videos of every held-out
query."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.testing import embedding_schema

MODEL_ID = "scale@000000"
CHUNK_VIDEOS = 25_000
GAP, CENTRE_NOISE, VIDEO_NOISE, CLIP_NOISE, QUERY_NOISE = 0.6, 0.7, 0.45, 0.3, 0.45
K = 10


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _noise(rng: np.random.Generator, shape: tuple, scale: float) -> np.ndarray:
    return scale * unit(rng.normal(size=shape).astype(np.float32))


def write_corpus(work: Path, n: int, dim: int, clips: int, queries: int, seed: int) -> dict:
    """Write the corpus of ``n`` clip vectors under ``work`` (reused when already complete); returns the
    ``spec`` the build/serve processes read and ``stats``."""
    done = work / "corpus.json"
    params = {"n": n, "dim": dim, "clips": clips, "queries": queries, "seed": seed}
    if done.exists() and json.loads(done.read_text()).get("params") == params:
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    videos = n // clips
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(max(64, videos // 64), dim)))
    gap = GAP * unit(rng.normal(size=dim))
    tune_v = np.sort(rng.choice(videos // 2, min(1000, videos // 2), replace=False))
    held_v = np.sort(videos // 2 + rng.choice(videos - videos // 2, queries, replace=False))
    semantic = {}
    raw = np.lib.format.open_memmap(work / "vectors.npy", "w+", np.float32, (videos * clips, dim))
    emb = work / "emb" / f"model_id={MODEL_ID.replace('@', '_')}"
    emb.mkdir(parents=True, exist_ok=True)
    for c, v0 in enumerate(range(0, videos, CHUNK_VIDEOS)):
        v1 = min(videos, v0 + CHUNK_VIDEOS)
        crng = np.random.default_rng([seed, c])
        sem = unit(
            centres[crng.integers(0, len(centres), v1 - v0)] + _noise(crng, (v1 - v0, dim), CENTRE_NOISE)
        )
        for v in np.concatenate([tune_v, held_v]):
            if v0 <= v < v1:
                semantic[int(v)] = sem[v - v0]
        per_video = sem + gap + _noise(crng, sem.shape, VIDEO_NOISE)
        vecs = unit(per_video[:, None, :] + _noise(crng, (v1 - v0, clips, dim), CLIP_NOISE)).reshape(-1, dim)
        raw[v0 * clips : v1 * clips] = vecs
        pq.write_table(_table(vecs, v0, clips, dim), emb / f"part-{c:05d}.parquet")
    raw.flush()
    (emb / "_model.json").write_text(json.dumps({"model_id": MODEL_ID, "model_name": None, "dim": dim}))
    qrng = np.random.default_rng(seed + 1)
    tune = unit(np.stack([semantic[int(v)] for v in tune_v]) + _noise(qrng, (len(tune_v), dim), QUERY_NOISE))
    held = unit(np.stack([semantic[int(v)] for v in held_v]) + _noise(qrng, (len(held_v), dim), QUERY_NOISE))
    _write_tuning(work, tune, tune_v, dim)
    np.save(work / "queries.npy", held)
    truth = exact_top_videos(raw, held, clips)
    np.save(work / "truth.npy", truth)
    stats = {
        "videos": videos,
        "clips": clips,
        "dim": dim,
        "queries": len(held),
        "tuning_queries": len(tune),
        "write_s": round(time.perf_counter() - t0, 1),
        **_gap_stats(raw, held, held_v, clips),
    }
    spec = {
        "work": str(work),
        "emb": str(work / "emb"),
        "vectors": str(work / "vectors.npy"),
        "queries": str(work / "queries.npy"),
        "truth": str(work / "truth.npy"),
        "clips": clips,
        "dim": dim,
        "n": videos * clips,
    }
    out = {"spec": spec, "stats": stats, "params": params}
    done.write_text(json.dumps(out))
    return out


def _table(vecs: np.ndarray, v0: int, clips: int, dim: int) -> pa.Table:
    rows = len(vecs)
    video = v0 + np.arange(rows) // clips
    clip = np.arange(rows) % clips
    vids = pa.array([f"vid-{v:08d}" for v in video])
    return pa.table(
        {
            "id": pa.array(v0 * clips + np.arange(rows), pa.int64()),
            "video_id": vids,
            "key": vids,
            "shard": pa.array(["000000"] * rows),
            "clip_index": pa.array(clip, pa.int64()),
            "start_s": pa.array(clip.astype(np.float64)),
            "end_s": pa.array(clip + 1.0),
            "model_id": pa.array([MODEL_ID] * rows),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim),
            "captions": pa.array([[f"caption of vid-{v:08d}"] for v in video], pa.list_(pa.string())),
        },
        schema=embedding_schema(dim),
    )


def _write_tuning(work: Path, tune: np.ndarray, tune_v: np.ndarray, dim: int) -> None:
    """The tuning queries where ``jobs.embed --with-text`` writes caption embeddings: the build finds them."""
    part = work / "emb" / "_text" / f"model_id={MODEL_ID.replace('@', '_')}"
    part.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "video_id": [f"vid-{v:08d}" for v in tune_v],
                "caption": [f"query for vid-{v:08d}" for v in tune_v],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(tune.reshape(-1)), dim),
            }
        ),
        part / "part-000000.parquet",
    )


def exact_top_videos(raw: np.ndarray, queries: np.ndarray, clips: int, chunk: int = 40_000) -> np.ndarray:
    """``[Q, K]`` video numbers of the exact top ``K`` videos by best clip score (chunks of whole videos)."""
    chunk -= chunk % clips
    best_s = np.full((len(queries), K), -np.inf, np.float32)
    best_v = np.full((len(queries), K), -1, np.int64)
    for start in range(0, len(raw), chunk):
        block = np.asarray(raw[start : start + chunk])
        scores = (queries @ block.T).reshape(len(queries), -1, clips).max(axis=2)
        top = np.argpartition(-scores, min(K, scores.shape[1] - 1), axis=1)[:, :K]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        cand_v = np.concatenate([best_v, top + start // clips], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :K]
        best_s, best_v = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_v, order, 1)
    return best_v


def _gap_stats(raw: np.ndarray, held: np.ndarray, held_v: np.ndarray, clips: int) -> dict:
    """How far queries lie from the clips: cosine to their own video's best clip and to the nearest clip."""
    sample = held[:100]
    own = np.stack([np.asarray(raw[v * clips : (v + 1) * clips]) for v in held_v[:100]])
    step = max(1, len(raw) // 200_000)
    nearest = (sample @ np.asarray(raw[::step]).T).max(axis=1)
    return {
        "cos_query_to_own_best_clip": float(np.mean(np.einsum("qd,qcd->qc", sample, own).max(axis=1))),
        "cos_query_to_nearest_clip_sampled": float(np.mean(nearest)),
    }
