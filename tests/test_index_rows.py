"""Opening a version maps its files: the serving process's own (anonymous) memory does not grow with the
corpus, and row lookups (hits, captions, moments, id filters) work on the mapped Arrow columns."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from index import VideoIndex, store
from index.rows import HELPER_COLUMNS, ColumnParts, RowTable, prepare_rows
from index.testing import write_synthetic_version

REPO = Path(__file__).resolve().parents[1]
# Run in a fresh interpreter: anonymous memory (RssAnon) before and after opening + 20 queries.
PROBE = """
import json, sys
import numpy as np
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
from index import VideoIndex
rng = np.random.default_rng(1)
queries = rng.normal(size=(20, 8)).astype(np.float32)
before = anon()
index = VideoIndex.open(sys.argv[1])
opened = anon()
hits = index.search(queries, k=10)
assert all(len(h) == 10 and h[0].moments and h[0].caption for h in hits)
print(json.dumps({"open": opened - before, "total": anon() - before, "rows": len(index)}))
"""


def anon_growth(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(root)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def python_rows_cost(root: Path) -> int:
    """Bytes the ids' Python objects took when VideoIndex turned every video_id and caption into one."""
    table = store.read_ids(store.version_dir(root))
    tracemalloc.start()
    video_ids = table.column("video_id").to_pylist()
    captions = table.column("captions").to_pylist()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del video_ids, captions
    return size


def test_open_memory_does_not_grow_with_the_corpus(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    write_synthetic_version(small, 20_000)
    write_synthetic_version(large, 200_000)
    grew = {name: anon_growth(root) for name, root in (("small", small), ("large", large))}
    assert grew["small"]["rows"] == 20_000 and grew["large"]["rows"] == 200_000
    extra_rows_cost = python_rows_cost(large) - python_rows_cost(small)
    assert extra_rows_cost > 20_000_000  # 180,000 more rows of Python strings and lists
    extra = grew["large"]["total"] - grew["small"]["total"]
    assert extra < 0.05 * extra_rows_cost, (grew, extra_rows_cost)


def test_row_table_lookups_match_the_ids_table():
    rng = np.random.default_rng(3)
    n = 500
    ids = rng.permutation(10_000)[:n].astype(np.int64)
    video = np.array([f"v{int(i) % 37:03d}" for i in range(n)])
    starts = [None if i % 11 == 0 else float(i) for i in range(n)]
    table = pa.table({"id": ids, "video_id": video, "clip_index": np.arange(n) % 7 - 1,
                      "start_s": pa.array(starts, pa.float64()),
                      "captions": pa.array([[f"c{i}"] if i % 5 else [] for i in range(n)])})
    rows = RowTable(table)
    assert set(HELPER_COLUMNS) <= set(rows.table.column_names) and len(rows) == n
    found = rows.rows_of(np.concatenate([ids[:50], [-5, 10_001]]))
    assert (found[-2:] == -1).all()
    assert rows.column("id", found[:50]) == ids[:50].tolist()
    assert rows.column("video_id", found[:50]) == video[:50].tolist()
    assert np.isnan(rows.numbers("start_s", rows.rows_of(ids[[0, 11]]))).all()
    for i in (0, 7, 123):
        same_video = np.flatnonzero(video == video[i])
        members = rows.video_rows(int(rows.rows_of(ids[[i]])[0]))
        assert sorted(rows.column("id", members)) == sorted(ids[same_video].tolist())
        assert len(set(rows.video_keys(members).tolist())) == 1
    assert rows.column("no_such_column", found[:3]) == [None, None, None]
    assert prepare_rows(rows.table).equals(rows.table)  # preparing twice changes nothing


class _CountingPart:
    """An ids part that counts how often each of its columns is read."""

    def __init__(self, table: pa.Table):
        self.table, self.schema, self.reads = table, table.schema, {}

    def column(self, name: str) -> pa.ChunkedArray:
        self.reads[name] = self.reads.get(name, 0) + 1
        return self.table.column(name)


def test_column_parts_read_each_column_once_and_sort_as_one_table():
    """A sharded build's driver sorts its shards' ids a column at a time (index.rows.ColumnParts)."""
    rng = np.random.default_rng(4)
    n = 600
    table = pa.table({"id": rng.permutation(5000)[:n].astype(np.int64),
                      "video_id": [f"v{int(i) % 41:03d}" for i in rng.permutation(n)],
                      "captions": pa.array([[f"c{i}"] if i % 3 else [] for i in range(n)]),
                      "start_s": rng.random(n)})
    parts = [_CountingPart(table.slice(a, b - a)) for a, b in ((0, 250), (250, 251), (251, n))]
    prepared = prepare_rows(ColumnParts(parts))
    assert prepared.equals(prepare_rows(table))
    assert all(part.reads == dict.fromkeys(table.column_names, 1) for part in parts)
    other = pa.table({"id": pa.array([1], pa.int32()), "video_id": ["v"], "captions": pa.array([["c"]]),
                      "start_s": [0.0]})
    with pytest.raises(ValueError, match="differ in schema"):
        ColumnParts([table, other])


def test_an_old_version_with_ids_parquet_still_opens(tmp_path):
    """Versions published before ids.arrow keep their ids.parquet: read into Arrow and prepared in memory."""
    import pyarrow.parquet as pq

    root = tmp_path / "idx"
    version = write_synthetic_version(root, 3_000)
    vdir = root / "versions" / version
    meta = json.loads((vdir / "index.json").read_text())
    table = store.read_ids(str(vdir))
    pq.write_table(table, vdir / "ids.parquet")
    (vdir / "ids.arrow").unlink()
    files = meta["files"]
    files["ids.parquet"] = store.file_record(vdir / "ids.parquet")
    del files["ids.arrow"]
    (vdir / "index.json").write_text(json.dumps(meta))
    index = VideoIndex.open(root)
    hit = index.search(np.ones(8, np.float32), k=3)
    assert len(hit) == 3 and hit[0].moments and hit[0].caption.startswith("caption ")
    assert store.read_ids(str(vdir)).num_rows == 3_000


def test_a_truncated_ids_file_is_a_clear_error(tmp_path):
    root = tmp_path / "idx"
    version = write_synthetic_version(root, 1_000)
    path = root / "versions" / version / "ids.arrow"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(store.CorruptIndexError, match="ids.arrow"):
        VideoIndex.open(root)
