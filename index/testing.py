"""Test/benchmark helpers: write embeddings Parquet in the docs/interfaces.md schema (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from index import store
from index.moments import WINDOW_CLIP_BASE
from runtime import storage


def embedding_schema(dim: int, dtype=pa.float32()) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.int64()),
            ("video_id", pa.string()),
            ("key", pa.string()),
            ("shard", pa.string()),
            ("clip_index", pa.int64()),
            ("start_s", pa.float64()),
            ("end_s", pa.float64()),
            ("model_id", pa.string()),
            ("embedding", pa.list_(dtype, dim)),
            ("captions", pa.list_(pa.string())),
        ]
    )


def clustered_vectors(n: int, dim: int, seed: int = 0, clusters: int = 16, noise: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, size=n)
    return (centers[labels] + noise * rng.normal(size=(n, dim))).astype(np.float32)


def write_embeddings(
    out: Path | str,
    vectors: np.ndarray,
    clips_per_video: int = 1,
    model_id: str = "toy@000000",
    model_name: str | None = None,
    pretrained: str | None = None,
    start_id: int = 0,
    video_prefix: str = "vid",
    rows_per_file: int = 1000,
    captions=None,
) -> Path:
    """Write ``vectors`` as ``out/model_id=<id>/part-*.parquet`` + ``_model.json`` (``out``: any store's
    URI); returns ``out``."""
    dim = vectors.shape[1]
    sub = storage.join(out, f"model_id={model_id.replace('@', '_')}")
    storage.makedirs(sub)
    rows = []
    for j, vec in enumerate(vectors):
        v, c = divmod(j, clips_per_video)
        vid = f"{video_prefix}-{v:06d}"
        rows.append(
            {
                "id": start_id + j,
                "video_id": vid,
                "key": vid,
                "shard": "000000",
                "clip_index": c,
                "start_s": float(c),
                "end_s": float(c + 1),
                "model_id": model_id,
                "embedding": vec.tolist(),
                "captions": captions[v] if captions is not None else [f"caption of {vid}"],
            }
        )
    schema = embedding_schema(dim)
    for f, start in enumerate(range(0, len(rows), rows_per_file)):
        table = pa.Table.from_pylist(rows[start : start + rows_per_file], schema=schema)
        storage.write_parquet(table, storage.join(sub, f"part-{start_id:08d}-{f:04d}.parquet"))
    storage.write_text(
        storage.join(sub, "_model.json"),
        json.dumps({"model_id": model_id, "model_name": model_name, "pretrained": pretrained, "dim": dim}),
    )
    return out if isinstance(out, str) else Path(out)


def write_synthetic_version(root: Path | str, rows: int, dim: int = 8, windows_per_video: int = 10,
                            seed: int = 0) -> str:
    """Publish a version of ``rows`` random unit vectors (``IVF16,Flat``) whose ids table looks like
    a windowed corpus: ``windows_per_video`` window rows per video, each with a caption. For open-time and
    memory tests at corpus sizes a build would take too long to reach; returns the version name."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(rows, dtype=np.int64) * 7 + 3  # not row positions: lookups must go through the ids
    index = faiss.index_factory(dim, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[:4096])
    index.add_with_ids(vectors, ids)
    window = np.arange(rows) % windows_per_video
    video = np.char.add("video-", (np.arange(rows) // windows_per_video).astype(str))
    table = pa.table({
        "id": ids, "video_id": video, "key": video, "clip_index": WINDOW_CLIP_BASE + window,
        "start_s": 2.0 * window, "end_s": 2.0 * window + 4.0,
        "captions": pa.array([[f"caption {i} of a synthetic window"] for i in range(rows)]),
        "shard": np.zeros(rows, np.int32),
    })
    root = storage.normalize(root)
    params = {"nprobe": 16}  # every list: exact
    shard = {"file": store.INDEX_FILE, "factory": "IVF16,Flat", "search_params": params, "count": rows}
    meta = {"dim": dim, "count": rows, "metric": "inner_product", "factory": "IVF16,Flat",
            "search_params": params, "shards": [shard]}
    with store.staged_version(root) as (version, stage):
        store.write_version_files(stage, [index], table, meta)
        store.publish(root, stage, meta, version, expected_current=store.read_current(root, missing_ok=True))
    return version
