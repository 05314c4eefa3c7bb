"""Search-service benchmark: the real ``python -m jobs.serve`` process on 127.0.0.1, driven by 1, 8 and 32
concurrent keep-alive clients (threads + http.client) sending k=10 text queries, then k=1,000 and k=10,000
requests one at a time, then k=10 with ``where=`` filters (every video passing; one video, new each request),
then 8 clients while a new index version is published (failed requests must be 0). Then the abusive-client
scenario against a second service started with the default limits (``--max-k``, ``--max-depth``,
``--max-ranked``...): 8 normal k=10 clients alone, then the same clients while one more client loops the
heaviest request those limits accept (p99 with it ≤ 3 × alone, no failed normal request), and the service's
RSS after 100 and after 10,000 abusive requests (over-limit, malformed, cross-site, new filters, unknown
videos, the heaviest accepted one every 50th).

The index: ``--videos`` synthetic Gaussian-mixture vectors (one clip each, captions) for a seeded random
CLIP4Clip-meanP-tiny whose checkpoint is saved and passed to the service with ``--pretrained`` (the vectors
are not decoded videos: the service's cost is the text encode + FAISS + HTTP, not the corpus).

    python -m bench.serve                          # 20,000 videos, writes docs/data/serve.json
    python -m bench.serve --videos 5000 --requests 100 --json /tmp/serve.json
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from bench.record import BenchRecord, add_record_args, col  # noqa: E402
from index import add_embeddings, build_index  # noqa: E402
from index.testing import clustered_vectors, write_embeddings  # noqa: E402

MODEL = "clip4clip-meanP-tiny"
REPO = Path(__file__).resolve().parents[1]
WORDS = [("red", "blue", "green", "yellow"), ("circle", "square", "triangle"),
         ("left", "right", "up", "down")]
QUERIES = [f"a {c} {s} moves {d}" for c, s, d in itertools.product(*WORDS)]


def build(work: Path, videos: int) -> tuple[Path, Path, str]:
    """The checkpoint (seeded random init, saved) and a Flat index over ``videos`` synthetic vectors."""
    model, _, _ = models.create_model(MODEL, seed=0)
    ckpt = models.save_checkpoint(model, work / "c4c-random-seed0.pt")
    dim = int(model.encode_text(["x"]).shape[1])
    emb = write_embeddings(work / "emb", clustered_vectors(videos, dim, seed=1, clusters=64),
                           model_id=model.model_id, model_name=MODEL, pretrained=str(ckpt),
                           video_prefix="bench", rows_per_file=50_000)
    build_index(emb, work / "idx", factory="Flat", progress=False)
    return work / "idx", ckpt, model.model_id


# The latency rows time big-k requests one after another: no heavy-lane time budget there (the abusive
# scenario runs the defaults, budget included).
BIG_K_FLAGS = ("--max-k", "10000", "--max-depth", "10000", "--max-ranked", "10000", "--heavy-share", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(index: Path, ckpt: Path, port: int, log: Path, flags=BIG_K_FLAGS) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.serve", "--index", str(index), "--pretrained", str(ckpt),
           "--port", str(port), "--poll-s", "0.5", *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jobs.serve exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            get(http.client.HTTPConnection("127.0.0.1", port, timeout=5), "/healthz")
            return proc
        except OSError:
            time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("jobs.serve did not answer /healthz within 180 s")


def get(conn: http.client.HTTPConnection, path: str) -> dict:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
    return json.loads(body)


def run_clients(port: int, clients: int, per_client: int, k: int, versions: list | None = None,
                until: threading.Event | None = None, where=None) -> dict:
    """``clients`` threads, each ``per_client`` requests (or, with ``until``, as many as fit until it is
    set) on one keep-alive connection: latencies and q/s. ``where(c, i)`` gives request i of client c a
    ``where=`` filter."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, bad, seen = [], [], []
        for i in itertools.count() if until is not None else range(per_client):
            if until is not None and until.is_set():
                break
            q = quote(QUERIES[(c * 7 + i) % len(QUERIES)])
            path = f"/search?q={q}&k={k}" + (f"&where={quote(where(c, i))}" if where else "")
            t0 = time.perf_counter()
            try:
                seen.append(get(conn, path)["version"])
                mine.append(time.perf_counter() - t0)
            except (OSError, RuntimeError, http.client.HTTPException) as exc:
                bad.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        with lock:
            latencies.extend(mine)
            failures.extend(bad)
            if versions is not None:
                versions.extend(seen)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return {"clients": clients, "k": k, "filter": "", "requests": len(latencies) + len(failures),
            "failed": len(failures),
            "qps": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "max_ms": float(ms.max()) if len(ms) else None, "errors": failures[:5]}


def swap_under_load(port: int, work: Path, model_id: str) -> dict:
    """8 clients query while a new version (500 more videos) is built and published into the same index;
    they go on until the service answers from it, plus 2 s."""
    versions: list[str] = []
    result: dict = {}
    stop = threading.Event()
    load = threading.Thread(target=lambda: result.update(run_clients(port, 8, 0, 10, versions, until=stop)))
    load.start()
    time.sleep(2.0)
    new = write_embeddings(work / "emb2", clustered_vectors(500, 64, seed=2, clusters=64), model_id=model_id,
                           model_name=MODEL, video_prefix="fresh", start_id=10_000_000)
    t0 = time.perf_counter()
    published = add_embeddings(work / "idx", new)["version"]
    result["publish_s"] = time.perf_counter() - t0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    deadline = time.time() + 60
    while get(conn, "/version")["version"] != published and time.time() < deadline:
        time.sleep(0.1)
    result["swap_seen_s"] = time.perf_counter() - t0
    time.sleep(2.0)
    stop.set()
    load.join()
    result["published"] = published
    result["versions_seen"] = sorted(set(versions))
    result["served_new"] = published in versions
    return result


def filtered_rows(port: int, args) -> list[dict]:
    """k=10 with a ``where=`` filter ranked inside FAISS: one every video passes (its id list is built once,
    then cached), and one naming a different single video on every request (built on every request)."""
    every = {"filter": "where=shard:000000 (every video)", "where": lambda c, i: "shard:000000"}
    single = {"filter": "where=key:<one video>, new each request",
              "where": lambda c, i: f"key:bench-{(c * 1000 + i * 37) % args.videos:06d}"}
    out = []
    for clients, spec in ((1, every), (8, every), (1, single)):
        row = run_clients(port, clients, max(10, args.requests // clients), 10, where=spec["where"])
        out.append({**row, "filter": spec["filter"]})
    return out


def measure(args, work: Path) -> dict:
    index, ckpt, model_id = build(work, args.videos)
    port = free_port()
    proc = start_service(index, ckpt, port, work / "serve.log")
    try:
        run_clients(port, 2, 25, 10)  # warm-up: encoder, FAISS, connections
        rows = [run_clients(port, c, max(10, args.requests // c), 10) for c in (1, 8, 32)]
        rows += [run_clients(port, 1, args.big_k_requests, k) for k in (1_000, 10_000)]
        rows += filtered_rows(port, args)
        swap = swap_under_load(port, work, model_id)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the service this bench started, by its process group
        proc.wait(timeout=30)
    return {"rows": rows, "swap": swap, "abuse": abusive_scenario(index, ckpt, work, args)}


def abusive_scenario(index: Path, ckpt: Path, work: Path, args) -> dict:
    """A service with the default limits: 8 normal clients alone, then with one client looping the heaviest
    accepted request; then the service's RSS after 100 and 10,000 abusive requests."""
    port = free_port()
    proc = start_service(index, ckpt, port, work / "serve-defaults.log", flags=())
    try:
        limits = get(http.client.HTTPConnection("127.0.0.1", port, timeout=60), "/version")["limits"]
        run_clients(port, 2, 25, 10)  # warm-up
        per_client = max(10, args.abuse_requests // 8)
        alone = run_clients(port, 8, per_client, 10)
        heavy_lane = get(http.client.HTTPConnection("127.0.0.1", port, timeout=60), "/version")
        # The abusive client is a process of its own: a thread looping fast 503s would contend for this
        # process's GIL with the normal clients' threads, and slow them on the client side.
        context = multiprocessing.get_context("spawn")
        started, stop, results = context.Event(), context.Event(), context.Queue()
        hog = context.Process(target=loop_heaviest, args=(port, limits, started, stop, results))
        hog.start()
        if not started.wait(timeout=120):
            raise RuntimeError("the abusive client process sent no request within 120 s")
        time.sleep(1.0)  # the abusive client is going, past the heavy lane's burst, before the normal ones
        t0 = time.perf_counter()
        with_abuse = run_clients(port, 8, per_client, 10)
        wall = time.perf_counter() - t0
        stop.set()
        heavy = results.get(timeout=120)
        hog.join(timeout=60)
        budget = heavy_budget(port, heavy_lane, wall)
        rss = rss_after_abuse(port, proc.pid, limits)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    statuses = sorted({s for s, _ in heavy})
    answered = [ms for s, ms in heavy if s == 200]
    return {"limits": limits, "heaviest": heaviest_body(limits, 0).decode(), "alone": alone,
            "with_abuse": with_abuse, "heavy_requests": len(heavy), "heavy_statuses": statuses,
            "heavy_answers": {str(c): sum(1 for s, _ in heavy if s == c) for c in statuses},
            "heavy_p50_ms": float(np.percentile(answered, 50)) if answered else None, **budget,
            "p99_ratio": with_abuse["p99_ms"] / alone["p99_ms"], **rss}


def heavy_budget(port: int, before: dict, wall_s: float) -> dict:
    """The heavy lane's time budget and how much of the normal clients' run it was busy (``busy_share``)."""
    after = get(http.client.HTTPConnection("127.0.0.1", port, timeout=60), "/version")
    spent = [v["search_pool"]["heavy"].get("budget") for v in (before, after)]
    if spent[1] is None:
        return {"heavy_share": 1.0, "busy_share": None}
    return {"heavy_share": spent[1]["share"], "heavy_burst_s": spent[1]["burst_s"],
            "busy_share": (spent[1]["busy_s"] - spent[0]["busy_s"]) / wall_s}


def heaviest_body(limits: dict, i: int) -> bytes:
    """The most work the limits accept: ``max_ranked // max_depth`` queries of the deepest page, with a
    duration filter never seen before (every video passes it, but it is a pass over the catalog)."""
    queries = [QUERIES[(i + j) % len(QUERIES)] for j in range(limits["max_ranked"] // limits["max_depth"])]
    return json.dumps({"queries": queries, "k": limits["max_k"],
                       "offset": limits["max_depth"] - limits["max_k"],
                       "min_duration": round(1e-6 * (i + 1), 6)}).encode()


def loop_heaviest(port: int, limits: dict, started, stop, results) -> None:
    """The abusive client (a process): the heaviest accepted request in a loop, ignoring Retry-After, until
    ``stop`` is set (``started`` once the first is answered); then ``[(status, ms)]`` on ``results``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    out = []
    for i in itertools.count():
        if stop.is_set():
            break
        t0 = time.perf_counter()
        status = post(conn, "/search", heaviest_body(limits, i))
        out.append((status, (time.perf_counter() - t0) * 1000))
        started.set()
    results.put(out)


def post(conn: http.client.HTTPConnection, path: str, body: bytes, kind: str = "application/json") -> int:
    conn.request("POST", path, body, {"Content-Type": kind})
    response = conn.getresponse()
    response.read()
    return response.status


def abusive_request(conn: http.client.HTTPConnection, limits: dict, i: int) -> int:
    """Request ``i`` of the abusive mix (one kind after another; the heaviest accepted one every 50th)."""
    if i % 50 == 49:
        return post(conn, "/search", heaviest_body(limits, i))
    over_k, depth = limits["max_k"] + 1, limits["max_depth"]
    kinds = [f"/search?q=a&k={over_k}", f"/search?q=a&k=10&offset={depth}",
             f"/search?q=a+cat&k=10&where=key:bench-{i:06d}",  # a filter never seen before: answered
             "/search?q=a&" + "&".join(f"where=key:x{j}" for j in range(limits["max_where"] + 1)),
             f"/videos/no-such-video-{i}", f"/previews/bench-{i % 1000:06d}.webp?start=0.{i:03d}&end=1"]
    kind = i % (len(kinds) + 3)
    if kind == len(kinds):
        return post(conn, "/search", b'{"q": "a cat", "k": ', "application/json")  # malformed
    if kind == len(kinds) + 1:
        return post(conn, "/search", b'{"q": "a cat"}', "text/plain")  # a cross-site simple POST
    if kind == len(kinds) + 2:
        return post(conn, "/search", json.dumps({"queries": ["x"] * (limits["max_batch"] + 1)}).encode())
    conn.request("GET", kinds[kind])
    response = conn.getresponse()
    response.read()
    return response.status


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def rss_after_abuse(port: int, pid: int, limits: dict, total: int = 10_000) -> dict:
    """The service's RSS after 100 and after ``total`` abusive requests from one client; every answer must
    be a refusal (4xx / 503) or, for the accepted kinds, a 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    statuses: dict[int, int] = {}
    rss, t0 = {}, time.perf_counter()
    for i in range(total):
        status = abusive_request(conn, limits, i)
        statuses[status] = statuses.get(status, 0) + 1
        if i + 1 in (100, total):
            rss[i + 1] = rss_mb(pid)
        if (i + 1) % 2000 == 0:
            rate = (i + 1) / (time.perf_counter() - t0)
            print(f"[bench.serve] abusive requests {i + 1:,}/{total:,} {rate:.0f}/s "
                  f"ETA {(total - i - 1) / rate:.0f}s RSS {rss_mb(pid):.0f} MB", flush=True)
    return {"rss_100_mb": rss[100], "rss_10000_mb": rss[total], "rss_ratio": rss[total] / rss[100],
            "abusive_statuses": {str(k): v for k, v in sorted(statuses.items())}}


def record_results(record: BenchRecord, results: dict, args) -> None:
    rows = [{**r, "scenario": ", ".join([f"{r['clients']} client(s)", f"k={r['k']:,}"] + [r["filter"]] * bool(
        r.get("filter")))} for r in results["rows"]]
    record.table("latency", columns=[col("scenario", "clients, k"), col("requests", "requests"),
                                     col("qps", "q/s", "{:.0f}"), col("p50_ms", "p50 ms", "{:.1f}"),
                                     col("p99_ms", "p99 ms", "{:.1f}"), col("max_ms", "max ms", "{:.1f}"),
                                     col("failed", "failed")],
                 rows=rows, sample_size=f"{args.videos:,} videos x 1 clip, 64-d Flat index; k=10 rows: "
                 f"{args.requests} requests split over the clients (min 10 each), 48 distinct query texts; "
                 f"k=1,000 / 10,000 rows: {args.big_k_requests} sequential requests each; filtered rows: "
                 "as the k=10 rows, ranked inside FAISS over the passing ids (none when every video passes)",
                 baseline="none (absolute latency against the issue's floors)",
                 filtering="none; 50 warm-up requests not counted")
    s = results["swap"]
    record.table("swap", columns=[col("requests", "requests"), col("failed", "failed"),
                                  col("versions", "versions answered"),
                                  col("publish_s", "publish s", "{:.1f}"),
                                  col("swap_seen_s", "publish → served s", "{:.1f}"),
                                  col("p99_ms", "p99 ms during swap", "{:.1f}")],
                 rows=[{**s, "versions": len(s["versions_seen"])}],
                 sample_size="8 clients, k=10, from 2 s before add_embeddings publishes a new version "
                             "(+500 videos) until 2 s after the service (polling CURRENT every 0.5 s) "
                             "serves it",
                 baseline="none", filtering="none")
    record_abuse(record, results["abuse"], args)
    record.extra["results"] = results
    one, eight, big = rows[0], rows[1], rows[4]
    heads = [("1 client, k=10: p50 <= 15 ms", f"{one['p50_ms']:.1f} ms", one["p50_ms"] <= 15),
             ("8 clients, k=10: >= 150 q/s", f"{eight['qps']:.0f} q/s", eight["qps"] >= 150),
             ("8 clients, k=10: p99 <= 100 ms", f"{eight['p99_ms']:.1f} ms", eight["p99_ms"] <= 100),
             ("k=10,000: one request <= 1 s (median)", f"{big['p50_ms']:.0f} ms (max {big['max_ms']:.0f})",
              big["p50_ms"] <= 1000),
             ("publish mid-run: 0 failed requests", f"{s['failed']} of {s['requests']} failed, new version "
              f"{'served' if s['served_new'] else 'NOT served'}", s["failed"] == 0 and s["served_new"])]
    for floor, measured, met in heads:
        record.add_headline("search service", floor, measured, "yes" if met else "no")


def record_abuse(record: BenchRecord, abuse: dict, args) -> None:
    limits = abuse["limits"]
    rows = [{**abuse["alone"], "scenario": "8 normal clients alone"},
            {**abuse["with_abuse"], "scenario": "8 normal clients + 1 looping the heaviest accepted request"}]
    answers = ", ".join(f"{n:,} x {s}" for s, n in abuse["heavy_answers"].items())
    p50 = "–" if abuse["heavy_p50_ms"] is None else f"{abuse['heavy_p50_ms']:.0f} ms"
    budget = ("no heavy-lane time budget" if abuse["busy_share"] is None else
              f"heavy-lane time budget {abuse['heavy_share']:.0%} (burst {abuse['heavy_burst_s']} s), busy "
              f"{abuse['busy_share']:.0%} of the normal clients' run")
    heavy = (f"POST of {limits['max_ranked'] // limits['max_depth']} queries, k={limits['max_k']:,}, "
             f"offset={limits['max_depth'] - limits['max_k']:,} and a new min_duration filter (the most the "
             f"default limits accept: max_ranked {limits['max_ranked']:,}) in a loop from its own process, "
             f"ignoring Retry-After: {answers}; p50 of the 200s {p50}; {budget}")
    record.table("abuse", columns=[col("scenario", "scenario"), col("requests", "normal requests"),
                                   col("failed", "failed"), col("qps", "q/s", "{:.0f}"),
                                   col("p50_ms", "p50 ms", "{:.1f}"), col("p99_ms", "p99 ms", "{:.1f}"),
                                   col("max_ms", "max ms", "{:.1f}")],
                 rows=rows, sample_size=f"{args.videos:,} videos; normal: k=10 GET, {args.abuse_requests} "
                 f"requests over 8 keep-alive clients per row; abusive: {heavy}",
                 baseline="the same 8 clients alone, same service, same run",
                 filtering="none; 50 warm-up requests not counted")
    answers = ", ".join(f"{k}: {v}" for k, v in abuse["abusive_statuses"].items())
    mix = ("10,000 abusive requests from one client, in turn: k over max_k, offset + k over max_depth, a "
           "where= filter never seen before, too many where conditions, an unknown video, a preview window "
           "nobody lists, malformed JSON, a text/plain POST, a batch over max_batch; the heaviest accepted "
           "request every 50th")
    record.table("abuse_rss", columns=[col("rss_100_mb", "RSS after 100 MB", "{:.0f}"),
                                       col("rss_10000_mb", "RSS after 10,000 MB", "{:.0f}"),
                                       col("rss_ratio", "ratio", "{:.3f}"), col("statuses", "answers")],
                 rows=[{**abuse, "statuses": answers}], sample_size=mix,
                 baseline="the service's RSS after the first 100 of them", filtering="none")
    alone, loaded = abuse["alone"], abuse["with_abuse"]
    for floor, measured, met in [
        ("abusive client: normal p99 <= 3 x alone", f"{loaded['p99_ms']:.1f} ms vs {alone['p99_ms']:.1f} ms "
         f"({abuse['p99_ratio']:.2f}x)", abuse["p99_ratio"] <= 3),
        ("abusive client: 0 failed normal requests", f"{loaded['failed']} of {loaded['requests']}",
         loaded["failed"] == 0 and alone["failed"] == 0),
        ("RSS after 10,000 abusive requests <= 1.1 x after 100",
         f"{abuse['rss_10000_mb']:.0f} MB vs {abuse['rss_100_mb']:.0f} MB ({abuse['rss_ratio']:.3f}x)",
         abuse["rss_ratio"] <= 1.1)]:
        record.add_headline("search service", floor, measured, "yes" if met else "no")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=20_000)
    p.add_argument("--requests", type=int, default=800, help="k=10 requests per concurrency level")
    p.add_argument("--big-k-requests", type=int, default=10)
    p.add_argument("--abuse-requests", type=int, default=800,
                   help="normal k=10 requests (over 8 clients) alone and again with the abusive client")
    p.add_argument("--workdir", default="/tmp/vidsift_bench_serve")
    add_record_args(p, "serve")
    args = p.parse_args(argv)
    record = BenchRecord.start("serve", sys.argv[1:] if argv is None else argv)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = measure(args, work)
    print(json.dumps(results, indent=1, default=float))
    record_results(record, results, args)
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
