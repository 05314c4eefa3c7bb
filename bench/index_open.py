"""Open cost of a published index version as the corpus grows: wall time and the serving process's own
(anonymous) memory, ``VideoIndex.open`` (memory-mapped FAISS + ``ids.arrow``) against a baseline measured in
the same run: main's open before ids.arrow (FAISS files under 256 MiB read into memory, every video_id and
caption turned into Python objects, a dict of window rows per video), replayed on the same files.

Each size is a synthetic version (``index.testing.write_synthetic_version``: IVF16,Flat, dim 8, 10 window
rows a video, a caption each); each measurement runs in a fresh interpreter and reads ``RssAnon`` from
/proc/self/status before and after open (+ 20 k=10 searches with moments for the new path).

    python -m bench.index_open                 # 20k, 200k, 1M rows; writes docs/data/index_open.json
    python -m bench.index_open --rows 20000 200000 --json /tmp/index_open.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from bench.record import BenchRecord, add_record_args, col  # noqa: E402
from index import store  # noqa: E402
from index.testing import write_synthetic_version  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMON = """
import json, sys, time
import numpy as np
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
queries = np.random.default_rng(1).normal(size=(20, 8)).astype(np.float32)
"""
NEW = COMMON + """
from index import VideoIndex
before, t0 = anon(), time.perf_counter()
index = VideoIndex.open(sys.argv[1])
seconds, opened = time.perf_counter() - t0, anon()
hits = index.search(queries, k=10)
assert all(len(h) == 10 and h[0].moments for h in hits)
print(json.dumps({"open_s": seconds, "open_bytes": opened - before, "after_queries_bytes": anon() - before}))
"""
# main (before ids.arrow): store.load_version(mmap=None) + VideoIndex.__init__'s row handling
BASELINE = COMMON + """
import faiss, pyarrow.parquet as pq
from index import store
from index.moments import WINDOW_CLIP_BASE
before, t0 = anon(), time.perf_counter()
vdir = store.version_dir(sys.argv[1]); meta = store.read_meta(vdir)
path = store.local_file(vdir, meta, meta["shards"][0]["file"])
ix = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if path.stat().st_size >= 256 * 2**20 else 0)
ids = pq.read_table(sys.argv[2])
all_ids = ids.column("id").to_numpy(); order = np.argsort(all_ids, kind="stable"); sorted_ids = all_ids[order]
video_id = np.asarray(ids.column("video_id").to_pylist(), dtype=object)
start = ids.column("start_s").to_numpy(zero_copy_only=False)
end = ids.column("end_s").to_numpy(zero_copy_only=False)
clip = ids.column("clip_index").to_numpy(zero_copy_only=False)
captions = ids.column("captions").to_pylist()
rows = np.flatnonzero(np.nan_to_num(clip.astype(float), nan=-1.0) >= WINDOW_CLIP_BASE)
vids = np.asarray([str(v) for v in video_id[rows]], dtype=object)
o = np.argsort(vids, kind="stable"); vids, rows = vids[o], rows[o]
cuts = np.flatnonzero(vids[1:] != vids[:-1]) + 1
windows = {str(g[0]): r for g, r in zip(np.split(vids, cuts), np.split(rows, cuts))}
seconds, opened = time.perf_counter() - t0, anon()
print(json.dumps({"open_s": seconds, "open_bytes": opened - before}))
"""


def probe(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=1800)
    if out.returncode:
        raise RuntimeError(f"probe failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(work: Path, rows: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    root = work / f"idx-{rows}"
    write_synthetic_version(root, rows)
    vdir = store.version_dir(root)
    legacy = work / f"ids-{rows}.parquet"
    pq.write_table(store.read_ids(vdir), legacy)  # main wrote this file; same rows
    raw = rows * 8 * 4
    new = [probe(NEW, str(root)) for _ in range(repeats)]
    base = [probe(BASELINE, str(root), str(legacy)) for _ in range(repeats)]
    best = min(new, key=lambda r: r["open_s"])
    ref = min(base, key=lambda r: r["open_s"])
    row = {"rows": rows, "open_s": best["open_s"], "base_open_s": ref["open_s"],
           "open_mb": best["open_bytes"] / 1e6, "queries_mb": best["after_queries_bytes"] / 1e6,
           "base_open_mb": ref["open_bytes"] / 1e6, "bytes_per_row": best["after_queries_bytes"] / rows,
           "base_bytes_per_row": ref["open_bytes"] / rows,
           "mem_ratio": best["after_queries_bytes"] / max(ref["open_bytes"], 1),
           "time_ratio": best["open_s"] / max(ref["open_s"], 1e-9), "raw_vector_mb": raw / 1e6}
    print(f"[index_open] {rows:,} rows: open {row['open_s'] * 1e3:.1f} ms "
          f"(baseline {row['base_open_s'] * 1e3:.1f} ms), anon +{row['queries_mb']:.1f} MB after queries "
          f"(baseline +{row['base_open_mb']:.1f} MB at open), ratio {row['mem_ratio']:.3f}; "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (best kept)")
    p.add_argument("--work", type=Path, default=None, help="folder for the versions (default: a temp dir)")
    add_record_args(p, "index_open")
    args = p.parse_args(argv)
    record = BenchRecord.start("index_open", sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench-index-open-", dir=args.work) as tmp:
        rows = [measure(Path(tmp), n, args.repeats) for n in args.rows]
    record.table("open", columns=[
        col("rows", "rows", "{:,}"), col("open_s", "open s", "{:.3f}"),
        col("base_open_s", "baseline s", "{:.3f}"),
        col("queries_mb", "anon MB (open + 20 queries)", "{:.1f}"),
        col("base_open_mb", "baseline anon MB (open)", "{:.1f}"), col("bytes_per_row", "B/row", "{:.1f}"),
        col("base_bytes_per_row", "baseline B/row", "{:.1f}"), col("mem_ratio", "memory ratio", "{:.3f}"),
        col("time_ratio", "time ratio", "{:.3f}")],
        rows=rows, sample_size=f"{args.repeats} fresh processes per cell (fastest kept); 20 k=10 queries",
        baseline="main's open before ids.arrow (FAISS < 256 MiB read in, ids as Python objects), same files",
        filtering="none")
    top = rows[-1]
    raw = top["raw_vector_mb"]
    met = top["queries_mb"] <= 0.25 * raw and top["open_s"] <= 2.0
    floor = "anonymous RSS after open + queries <= 0.25 x raw vector bytes; open <= 2 s"
    record.add_headline(
        "index open (serving process)", floor,
        f"{top['rows']:,} rows: +{top['queries_mb']:.1f} MB ({top['queries_mb'] / raw:.2f} x {raw:.0f} MB "
        f"raw at dim 8), open {top['open_s']:.2f} s; main's open +{top['base_open_mb']:.0f} MB",
        "yes" if met else "no")
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
