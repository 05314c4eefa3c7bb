"""Shard inventory: which samples of which split live in which shard (``OUT/shards/NNNNNN.tar`` and its
``.parquet`` sidecar). It fixes the number of steps of an epoch so every data-parallel worker runs the same
number of steps (an uneven last batch would hang DDP's all-reduce)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq


def shards_folder(shards: str | os.PathLike) -> Path:
    """Accept the ingest output folder (with ``shards/``) or the ``shards/`` folder itself."""
    root = Path(shards)
    if (root / "shards").is_dir():
        root = root / "shards"
    if not root.is_dir():
        raise FileNotFoundError(f"shard folder {str(shards)!r} does not exist")
    if not sorted(root.glob("*.tar")):
        raise FileNotFoundError(f"shard folder {str(root)!r} holds no .tar shards (run jobs.ingest first)")
    return root


def shard_inventory(shards: str | os.PathLike) -> dict[str, dict[str, int]]:
    """``{tar path: {split: count}}`` from the per-shard parquet sidecars written by ingest."""
    root = shards_folder(shards)
    inventory: dict[str, dict[str, int]] = {}
    for tar in sorted(root.glob("*.tar")):
        sidecar = tar.with_suffix(".parquet")
        if not sidecar.is_file():
            raise FileNotFoundError(f"shard {str(tar)!r} has no parquet sidecar {sidecar.name!r}")
        table = (
            pq.read_table(sidecar, columns=["split"]) if "split" in pq.read_schema(sidecar).names else None
        )
        counts: dict[str, int] = {}
        if table is None:
            counts["None"] = pq.read_metadata(sidecar).num_rows
        else:
            for split in table.column("split").to_pylist():
                counts[str(split)] = counts.get(str(split), 0) + 1
        inventory[str(tar)] = counts
    return inventory


def split_count(inventory: dict[str, dict[str, int]], split: str) -> int:
    return sum(c.get(split, 0) for c in inventory.values())


def shards_with(inventory: dict[str, dict[str, int]], split: str) -> list[str]:
    """Tar paths holding at least one sample of ``split``."""
    return [tar for tar, counts in inventory.items() if counts.get(split, 0) > 0]
