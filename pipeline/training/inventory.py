"""Shard inventory: which samples of which split live in which shard (``OUT/shards/NNNNNN.tar`` and its
``.parquet`` index, on any store: a folder, ``s3://``, ``gs://``...). It fixes the number of steps of an
epoch so every data-parallel worker runs the same number of steps (an uneven last batch would hang DDP's
all-reduce)."""

from __future__ import annotations

import os

from runtime import storage


def shards_folder(shards: str | os.PathLike) -> str:
    """Accept the ingest output folder/URI (with ``shards/``) or the ``shards/`` folder itself."""
    root = os.fspath(shards)
    if storage.list_files(storage.join(root, "shards"), ".tar"):
        return storage.join(root, "shards")
    if not storage.exists(root):
        raise FileNotFoundError(f"shard folder {root!r} does not exist")
    if not storage.list_files(root, ".tar"):
        raise FileNotFoundError(f"shard folder {root!r} holds no .tar shards (run jobs.ingest first)")
    return root


def shard_inventory(shards: str | os.PathLike) -> dict[str, dict[str, int]]:
    """``{tar path/URI: {split: count}}`` from the per-shard parquet index files written by ingest."""
    root = shards_folder(shards)
    indexes = set(storage.list_files(root, ".parquet"))
    inventory: dict[str, dict[str, int]] = {}
    for tar in storage.list_files(root, ".tar"):
        sidecar = tar[: -len(".tar")] + ".parquet"
        if sidecar not in indexes:
            raise FileNotFoundError(f"shard {tar!r} has no parquet sidecar {storage.name(sidecar)!r}")
        table = storage.read_parquet(sidecar)
        counts: dict[str, int] = {}
        if "split" not in table.column_names:
            counts["None"] = table.num_rows
        else:
            for split in table.column("split").to_pylist():
                counts[str(split)] = counts.get(str(split), 0) + 1
        inventory[tar] = counts
    return inventory


def split_count(inventory: dict[str, dict[str, int]], split: str) -> int:
    return sum(c.get(split, 0) for c in inventory.values())


def shards_with(inventory: dict[str, dict[str, int]], split: str) -> list[str]:
    """Tar paths holding at least one sample of ``split``."""
    return [tar for tar, counts in inventory.items() if counts.get(split, 0) > 0]
