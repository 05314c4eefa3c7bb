"""The service under hostile requests: every over-limit request is a 4xx naming the limit, a full search
pool is a 503 with Retry-After, a search past its deadline is a 503, heavy searches stay within their share
of the service's time (503 with Retry-After beyond it), and 8 normal clients lose no request while another
client loops the heaviest request the limits accept. Latency ratios and RSS: bench.serve."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import models
from index import build_index
from index.searcher import RankedResult
from index.testing import clustered_vectors, write_embeddings
from workflows.serve import LiveIndex, SnapshotLoader, build_app, create_app, serving_in_thread
from workflows.serve.pool import MAX_REFUSAL_DELAY_S, Overloaded, PoolConfig, TimeBudget
from workflows.serve.queries import Limits

MODEL = "clip4clip-meanP-tiny"
VIDEOS = 3_000
LIMITS = Limits(max_k=200, max_depth=400, max_ranked=800, max_where=2, max_batch=8)


def call(base: str, path: str, body: bytes | None = None, content_type: str | None = "application/json",
         timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, JSON, headers) of one request; HTTP errors are answers too."""
    headers = {"Content-Type": content_type} if content_type and body is not None else {}
    request = urllib.request.Request(base + path, data=body, headers=headers,
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("serve-limits")
    model, _, _ = models.create_model(MODEL, seed=0)
    ckpt = models.save_checkpoint(model, tmp / "c4c.pt")
    emb = write_embeddings(tmp / "emb", clustered_vectors(VIDEOS, 64, seed=11, clusters=32),
                           model_id=model.model_id, model_name=MODEL, pretrained=str(ckpt), video_prefix="v")
    build_index(emb, tmp / "idx", factory="Flat", progress=False)
    return tmp / "idx", ckpt


@pytest.fixture(scope="module")
def base(index):
    app = build_app(str(index[0]), pretrained=str(index[1]), poll_s=0, limits=LIMITS)
    with serving_in_thread(app) as url:
        yield url


def worst_accepted() -> bytes:
    """The heaviest request LIMITS accept: the most queries of the deepest page within max_ranked."""
    queries = [f"a {c} square moves left" for c in ("red", "blue", "green", "yellow")]
    k, offset = LIMITS.max_k, LIMITS.max_depth - LIMITS.max_k
    return json.dumps({"queries": queries[:LIMITS.max_ranked // LIMITS.max_depth], "k": k,
                       "offset": offset}).encode()


def test_the_worst_accepted_request_is_accepted(base):
    status, body, _ = call(base, "/search", worst_accepted())
    assert status == 200, body
    assert [len(r["hits"]) for r in body["results"]] == [LIMITS.max_k] * 2
    assert body["partial"] is False and body["missing_shards"] == []


ABUSE = [
    ("k above max_k", "/search?q=cat&k=201", None, "application/json", 400, "maximum k of 200"),
    ("offset + k above max_depth", "/search?q=cat&k=200&offset=201", None, None, 400, "(max_depth) of 400"),
    ("a huge offset", "/search?q=cat&k=1&offset=100000", None, None, 400, "max_depth"),
    ("queries x depth above max_ranked", "/search", json.dumps(
        {"queries": ["a", "b", "c"], "k": 200, "offset": 100}).encode(), "application/json", 400,
     "3 queries × (offset + k = 300) = 900 ranked videos is above this service's limit (max_ranked) of 800"),
    ("batch above max_batch", "/search", json.dumps({"queries": ["cat"] * 9}).encode(), "application/json",
     413, "the limit is 8"),
    ("where conditions above max_where", "/search?q=cat&where=key:a&where=key:b&where=key:c", None, None, 400,
     "3 where conditions; the limit (max_where) is 2"),
    ("POST as text/plain (a cross-site simple request)", "/search", b'{"q": "cat"}', "text/plain", 415,
     "needs Content-Type: application/json"),
    ("POST as a form", "/search", b"q=cat", "application/x-www-form-urlencoded", 415, "application/json"),
]


@pytest.mark.parametrize("name,path,body,kind,status,message", ABUSE, ids=[a[0] for a in ABUSE])
def test_each_abusive_request_is_a_4xx_naming_the_limit(base, name, path, body, kind, status, message):
    got, payload, _ = call(base, path, body, content_type=kind)
    assert (got, payload["status"]) == (status, status) and message in payload["error"], payload
    assert call(base, "/search?q=still+answering&k=2")[0] == 200


def test_a_full_pool_answers_503_with_retry_after(index):
    """One heavy thread, no queue: heavy requests sent together by 4 clients (released by a Barrier, again
    until a 503 is seen, 20 s at most) find the lane busy; the refusals are 503s with Retry-After, and a
    light request still gets an answer meanwhile (it has its own lane)."""
    pool = PoolConfig(heavy_workers=1, heavy_queue=0, light_ranked=10, heavy_share=1.0)  # no time budget
    app = build_app(str(index[0]), pretrained=str(index[1]), poll_s=0, limits=LIMITS, pool=pool)
    with serving_in_thread(app) as url:
        answers: list[tuple[int, dict, dict]] = []
        barrier = threading.Barrier(4)

        def heavy():
            for _ in range(20):
                barrier.wait(timeout=60)
                answers.append(call(url, "/search", worst_accepted()))
                barrier.wait(timeout=60)
                if any(a[0] == 503 for a in answers):
                    return

        threads = [threading.Thread(target=heavy) for _ in range(4)]
        for t in threads:
            t.start()
        light = call(url, "/search?q=a+cat&k=5")
        for t in threads:
            t.join(timeout=120)
        assert light[0] == 200
        assert {a[0] for a in answers} <= {200, 503} and any(a[0] == 200 for a in answers)
        busy = [a for a in answers if a[0] == 503]
        assert busy, "4 heavy requests at once never found the 1-thread, 0-queue lane full"
        assert all(a[2]["retry-after"] == "1" and "the service is busy" in a[1]["error"] for a in busy)
        status = call(url, "/version")[1]["search_pool"]
        assert status["heavy"]["refused"] == len(busy) and status["heavy"]["capacity"] == 1


def test_a_search_past_its_deadline_is_a_503(index):
    app = build_app(str(index[0]), pretrained=str(index[1]), poll_s=0, limits=LIMITS,
                    pool=PoolConfig(deadline_s=0.001))
    with serving_in_thread(app) as url:
        status, body, headers = call(url, "/search", worst_accepted())
        assert status == 503 and "deadline" in body["error"] and headers["retry-after"] == "1"
        time.sleep(0.5)  # the expired search finishes in its thread and frees its place
        assert call(url, "/version")[1]["search_pool"]["heavy"]["in_flight"] == 0


class ManualClock:
    """A clock the test moves: the budget's arithmetic, checked exactly."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_time_budget_refuses_for_d_times_one_over_share_minus_one():
    clock = ManualClock()
    budget = TimeBudget(share=0.25, burst_s=0.01, clock=clock)
    budget.admit()  # idle: credit
    clock.now += 0.4  # a request ran 0.4 s: it earned 0.1 s while it ran, on top of the 0.01 s burst
    budget.pay(0.4)
    with pytest.raises(Overloaded) as refused:
        budget.admit()
    assert "may use 25% of its time" in str(refused.value) and refused.value.retry_after_s == 2
    cooldown = 0.4 * (1 / 0.25 - 1) - 0.01 / 0.25  # d × (1/share − 1), less what the burst covered
    clock.now += cooldown - 0.02
    with pytest.raises(Overloaded):
        budget.admit()
    clock.now += 0.04
    budget.admit()
    assert budget.status()["throttled"] == 2 and budget.status()["busy_s"] == 0.4
    clock.now += 3600  # credit fills up to the burst, never beyond
    assert budget.status()["credit_s"] == 0.01


def test_heavy_searches_past_their_share_get_503_and_light_ones_do_not(index):
    """A service whose heavy lane may be busy 10 % of the time, with no burst to speak of: the idle service
    answers the heaviest request; the next one at once is a 503 naming the share, sent when the refusal ends
    (1 s at most) with Retry-After covering the rest; a light search is answered meanwhile; after
    Retry-After the heavy lane answers again."""
    pool = PoolConfig(heavy_share=0.1, heavy_burst_s=0.001)
    app = build_app(str(index[0]), pretrained=str(index[1]), poll_s=0, limits=LIMITS, pool=pool)
    with serving_in_thread(app) as url:
        assert call(url, "/search", worst_accepted())[0] == 200
        refused: list = []

        def refused_heavy() -> None:
            answer = call(url, "/search", worst_accepted())
            refused.append((time.monotonic(), answer))

        heavy = threading.Thread(target=refused_heavy)
        t0 = time.monotonic()
        heavy.start()
        light = call(url, "/search?q=a+cat&k=10")
        heavy.join(timeout=60)
        answered_at, (status, body, headers) = refused[0]
        assert light[0] == 200 and status == 503 and "may use 10% of its time" in body["error"], body
        wait_s = float(re.search(r"refused for ([0-9.]+) s", body["error"]).group(1))
        assert answered_at - t0 >= min(wait_s, MAX_REFUSAL_DELAY_S) - 0.06
        assert int(headers["retry-after"]) >= 1
        assert call(url, "/version")[1]["search_pool"]["heavy"]["budget"]["throttled"] == 1
        time.sleep(int(headers["retry-after"]))
        assert call(url, "/search", worst_accepted())[0] == 200


def test_normal_clients_lose_nothing_while_one_client_loops_the_worst_request(base):
    """8 normal clients (k=10, 25 requests each) while a 9th loops the worst accepted request, and a new
    where= filter each time, until they are done and it has been refused for its share (60 s at most): no
    normal request fails, and the heavy lane was busy no more than its share of the time (plus the burst and
    the one request admitted last). Latency next to the abuser: bench.serve (a ratio needs a quiet
    machine)."""
    failures, done, stop = [], [], threading.Event()
    heavy_answers: list[int] = []
    heavy_s: list[float] = []
    before = call(base, "/version")[1]["search_pool"]["heavy"]["budget"]

    def normal(c: int) -> None:
        for i in range(25):
            status, body, _ = call(base, f"/search?q=a+red+circle+{c}+{i}&k=10")
            if status != 200 or len(body["hits"]) != 10:
                failures.append((status, body))
        done.append(c)

    def abusive() -> None:
        deadline = time.monotonic() + 60
        i = 0
        while not (stop.is_set() and 503 in heavy_answers) and time.monotonic() < deadline:
            t0 = time.monotonic()
            heavy_answers.append(call(base, "/search", worst_accepted())[0])
            heavy_s.append(time.monotonic() - t0)
            filtered = f"/search?q=a+cat&k={LIMITS.max_k}&where=key:v-{i:06d}&where=num_clips:1"
            heavy_answers.append(call(base, filtered)[0])
            i += 1

    t0 = time.monotonic()
    hog = threading.Thread(target=abusive)
    hog.start()
    clients = [threading.Thread(target=normal, args=(c,)) for c in range(8)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=120)
    stop.set()
    hog.join(timeout=120)
    wall = time.monotonic() - t0
    assert len(done) == 8 and failures == []
    assert set(heavy_answers) == {200, 503}, heavy_answers
    after = call(base, "/version")[1]["search_pool"]["heavy"]["budget"]
    busy = after["busy_s"] - before["busy_s"]
    assert after["throttled"] > before["throttled"]
    assert busy <= after["share"] * wall + after["burst_s"] + max(heavy_s), (busy, wall, after)


def test_the_filter_cache_stays_bounded_and_right_under_racing_threads():
    """8 threads released together ask for 400 distinct filters (the pool runs searches on several threads):
    no error, every answer right, and the cache never holds more than ALLOWED_CACHE filters."""
    import pyarrow as pa

    from workflows.serve.catalog import ALLOWED_CACHE, build_catalog
    from workflows.serve.queries import Filters

    ids = pa.Table.from_pylist([{"id": i, "video_id": f"v{i}", "shard": "000000", "clip_index": 0,
                                 "start_s": 0.0, "end_s": 1.0 + i % 7} for i in range(200)])
    catalog = build_catalog(ids)
    barrier, errors, sizes = threading.Barrier(8), [], []

    def ask(t: int) -> None:
        barrier.wait(timeout=60)
        for i in range(50):
            video = (t * 50 + i) % 200
            try:
                got = catalog.allowed_ids(Filters(where=(("video_id", f"v{video}"),)))
                assert got.tolist() == [video]
            except Exception as exc:  # noqa: BLE001 — every failure is collected, none may happen
                errors.append(repr(exc))
            sizes.append(len(catalog._allowed))

    threads = [threading.Thread(target=ask, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(sizes) == 400 and max(sizes) <= ALLOWED_CACHE


class WithoutOddVideos:
    """A searcher that lost a shard: it ranks (for real, with the index) only the even-numbered videos and
    reports the shard of the odd ones missing, as a fan-out searcher does when a shard misses the deadline."""

    def __init__(self, index):
        self.index = index
        self.present = np.arange(0, VIDEOS, 2, dtype=np.int64)  # one clip per video: FAISS id = video number

    @property
    def version(self) -> str:
        return self.index.version

    def encode_text(self, texts):
        return self.index.encode_text(texts)

    def rank(self, vectors, k, allowed_ids=None, timeout_s=None) -> RankedResult:
        allowed = self.present if allowed_ids is None else np.intersect1d(allowed_ids, self.present)
        return RankedResult(self.index.rank(vectors, k, allowed_ids=allowed).hits, True, ("odd-videos",))


def test_a_partial_ranking_is_answered_as_partial(index):
    loader = SnapshotLoader(str(index[0]), pretrained=str(index[1]))

    def load(version):
        snapshot = loader.load(version)
        return dataclasses.replace(snapshot, ranker=WithoutOddVideos(snapshot.index))

    app = create_app(LiveIndex(str(index[0]), load, poll_s=0), limits=LIMITS)
    with serving_in_thread(app) as url:
        status, body, _ = call(url, "/search?q=a+red+circle&k=20")
        assert status == 200 and body["partial"] is True and body["missing_shards"] == ["odd-videos"]
        assert len(body["hits"]) == 20 and all(int(h["video_id"].rsplit("-", 1)[1]) % 2 == 0
                                               for h in body["hits"])
