"""The embeddings reader (index/embeddings.py): Parquet's streaming reader over the part files, every row in
order, typed as the first file's schema, with bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index.distributed import plan_slices
from index.embeddings import iter_batches, read_record_batches, resolve_embeddings

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["id", "video_id", "captions", "embedding"]


def _vectors(n: int, dim: int, seed: int) -> pa.Array:
    flat = np.random.default_rng(seed).standard_normal(n * dim).astype(np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)


def test_reader_keeps_order_row_groups_and_the_first_files_types(tmp_path):
    dim = 4
    first = pa.table({"id": pa.array(range(10), pa.int64()), "video_id": [f"v{i}" for i in range(10)],
                      "captions": [[f"c{i}"] for i in range(10)], "embedding": _vectors(10, dim, 0)})
    pq.write_table(first, tmp_path / "part-00000.parquet", row_group_size=4)  # row groups of 4, 4, 2
    # A later writer: no captions column, variable-size lists holding the same vectors.
    second_vectors = _vectors(3, dim, 1)
    second = pa.table({"id": pa.array([10, 11, 12], pa.int64()), "video_id": ["v10", "v11", "v12"],
                       "embedding": second_vectors.cast(pa.list_(pa.float32()))})
    pq.write_table(second, tmp_path / "part-00001.parquet")
    source = resolve_embeddings(tmp_path)
    batches = list(read_record_batches(source.dataset(), COLUMNS, batch_size=3))
    assert max(b.num_rows for b in batches) == 3
    table = pa.Table.from_batches(batches)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert table.column("id").to_pylist() == list(range(13))
    assert table.column("captions").to_pylist() == [[f"c{i}"] for i in range(10)] + [None] * 3
    expected = np.concatenate([first.column("embedding").combine_chunks().flatten().to_numpy(),
                               second_vectors.flatten().to_numpy()])
    np.testing.assert_array_equal(table.column("embedding").combine_chunks().flatten().to_numpy(), expected)

    # A slice names row groups: exactly their rows, in order (the distributed build's add tasks read this).
    slices = plan_slices(source, slice_rows=4)
    assert [s.num_rows for s in slices] == [4, 4, 2, 3]
    assert [int(i) for b in iter_batches(slices[1], batch_size=3) for i in b.ids] == [4, 5, 6, 7]


def test_a_part_file_whose_vectors_cannot_take_the_first_files_type_is_named(tmp_path):
    first = pa.table({"id": pa.array([1], pa.int64()), "video_id": ["a"], "embedding": _vectors(1, 4, 0)})
    pq.write_table(first, tmp_path / "part-00000.parquet")
    short = pa.array([[1.0, 2.0]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"id": pa.array([2], pa.int64()), "video_id": ["b"], "embedding": short}),
                   tmp_path / "part-00001.parquet")
    source = resolve_embeddings(tmp_path)
    with pytest.raises(ValueError, match=r"part-00001\.parquet.*'embedding'"):
        list(iter_batches(source))


READ_IN_A_FRESH_PROCESS = """
import json, sys
from index.distributed import _memory, _reset_peak
from index.embeddings import iter_batches, resolve_embeddings
source = resolve_embeddings(sys.argv[1])
start = _reset_peak()
rows = sum(len(b.ids) for b in iter_batches(source, batch_size=4096))
print(json.dumps({"rows": rows, "grown": _memory()["peak_rss_bytes"] - start}))
"""


def test_reading_a_large_row_group_holds_about_its_batches_not_the_row_group(tmp_path):
    """One 64 MiB row group read in 4,096-row batches, in a fresh process (memory this one freed would be
    reused unseen). Arrow's dataset scanner, the reader before this one, decodes the whole row group before
    cutting batches from it: measured 4.8x its bytes at the peak; this reader 1.3x."""
    n, dim = 65536, 256
    table = pa.table({"id": pa.array(np.arange(n), pa.int64()), "video_id": [f"v{i // 4}" for i in range(n)],
                      "embedding": _vectors(n, dim, 2)})
    pq.write_table(table, tmp_path / "part-00000.parquet", row_group_size=n)
    group_bytes = n * dim * 4
    done = subprocess.run([sys.executable, "-c", READ_IN_A_FRESH_PROCESS, str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO, check=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[memory] read one {group_bytes / 2**20:.0f} MiB row group: peak RSS grew "
          f"{result['grown'] / 2**20:.0f} MiB")
    assert result["rows"] == n
    assert result["grown"] < 2.5 * group_bytes, result
