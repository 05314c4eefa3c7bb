"""Fan-out search on Ray Serve (workflows/serve/fanout.py): the merged answer of shard deployments is the
top k of one process searching every shard, moments of windowed videos included; a blocked or killed shard
replica gives a partial result within the deadline, never a hang; replicas of a shard deployment share its
load; the service runs over it."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import free_port
from ray import serve

import index.query as index_query
import models
from index import VideoIndex, build_index
from index.moments import WINDOW_CLIP_BASE
from index.testing import clustered_vectors, write_embeddings
from workflows.serve import build_app, serving_in_thread
from workflows.serve.fanout import FanoutError, FanoutSearcher, ShardReplica, deploy_shards, deployments_for

MODEL = "clip4clip-meanP-tiny"
CLIPS = 3  # per video


def blocking_shard_class():
    """A shard replica that never answers a search in time: the stand-in for a stuck machine. (Made in a
    function so Ray pickles the class by value: replicas cannot import this test module.)"""

    class BlockingShard(ShardReplica):
        def search(self, *args, **kwargs):
            time.sleep(120)
            return super().search(*args, **kwargs)

    return BlockingShard


@pytest.fixture(scope="module")
def fanout(ray_local, tmp_path_factory):
    """A 4-shard IVF index over a seeded tiny CLIP4Clip's space (every other video embedded as sliding
    windows, so its hits carry moments), Ray Serve (started once) with 2 shard deployments of 2 replicas
    each, plus one blocking shard deployment."""
    tmp = tmp_path_factory.mktemp("fanout")
    model, _, _ = models.create_model(MODEL, seed=0)
    ckpt = models.save_checkpoint(model, tmp / "c4c.pt")
    dim = model.encode_text(["x"]).shape[1]
    vectors = clustered_vectors(600 * CLIPS, dim, seed=5, clusters=24)
    emb = write_embeddings(tmp / "emb", vectors, clips_per_video=CLIPS, model_id=model.model_id,
                           model_name=MODEL, pretrained=str(ckpt), rows_per_file=600)
    _window_every_other_video(emb)
    build_index(emb, tmp / "idx", factory="IVF8,Flat", shards=4, progress=False, text_queries=None)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    # 2 deployments x 2 replicas x 0.25 CPUs: fractions schedule 4 replicas beside the tests on 2 cores
    plan = deploy_shards(str(tmp / "idx"), deployments_for(str(tmp / "idx"), 2), replicas=2, num_cpus=0.25)
    serve.run(serve.deployment(blocking_shard_class(), name="shard", ray_actor_options={"num_cpus": 0})
              .bind(str(tmp / "idx")), name="blocked", route_prefix=None)
    one = VideoIndex.open(tmp / "idx", encoder=model)
    yield {"root": str(tmp / "idx"), "plan": plan, "one": one, "model": model, "vectors": vectors}
    serve.shutdown()


def _queries(n: int, dim: int, seed: int) -> np.ndarray:
    """Text-like queries: off the data (random directions), so the hits spread over every shard."""
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _window_every_other_video(emb) -> None:
    """Make every other video's rows sliding windows (clip_index >= WINDOW_CLIP_BASE, 4 s every 2 s): its
    hits get moments, merged from the windows' scores."""
    for part in sorted(emb.rglob("part-*.parquet")):
        table = pq.read_table(part)
        video = np.array([int(v.rsplit("-", 1)[1]) for v in table.column("video_id").to_pylist()])
        clip = table.column("clip_index").to_numpy()
        windowed = video % 2 == 0
        columns = {"clip_index": np.where(windowed, WINDOW_CLIP_BASE + clip, clip),
                   "start_s": np.where(windowed, 2.0 * clip, clip).astype(float),
                   "end_s": np.where(windowed, 2.0 * clip + 4.0, clip + 1).astype(float)}
        for name, values in columns.items():
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
        pq.write_table(table, part)


def _same(got, want, moments: bool = True) -> None:
    assert [[h.video_id for h in q] for q in got] == [[h.video_id for h in q] for q in want]
    for g, w in zip(got, want):
        assert [h.score for h in g] == pytest.approx([h.score for h in w], abs=1e-6)
        if not moments:  # the ranking only (its shards missed the moments round)
            assert [(h.id, h.num_clips) for h in g] == [(h.id, h.num_clips) for h in w]
            continue
        assert [(h.id, h.clip_index, h.start_s, h.end_s, h.caption, h.num_clips) for h in g] == \
               [(h.id, h.clip_index, h.start_s, h.end_s, h.caption, h.num_clips) for h in w]
        assert [_moments(h) for h in g] == [_moments(h) for h in w]
        assert [[m.score for m in h.moments or []] for h in g] == \
               [pytest.approx([m.score for m in h.moments or []], abs=1e-6) for h in w]


def _moments(hit) -> list[tuple] | None:
    return None if hit.moments is None else [(m.start_s, m.end_s, m.num_windows) for m in hit.moments]


@pytest.mark.slow
def test_fanout_gives_the_top_k_of_one_process(fanout):
    one, root = fanout["one"], fanout["root"]
    searcher = FanoutSearcher(root, None, fanout["plan"].handles(), names=fanout["plan"].apps)
    assert searcher.positions == [[0, 2], [1, 3]] and searcher.version == one.version
    queries = _queries(16, one.dim, seed=1)
    searcher.trace = collections.deque()  # every request's hops: sent <= received <= replied <= back
    searcher.rank(queries[:1], 10, timeout_s=60)
    hops = searcher.trace.pop()
    assert sorted(h["deployment"] for h in hops if h["method"] == "search") == [0, 1]
    assert all(h["sent"] <= h["received"] <= h["replied"] <= h["back"] for h in hops)
    for k in (1, 10, 37):
        result = searcher.rank(queries, k, timeout_s=60)
        assert not result.partial and result.missing_shards == ()
        _same(result.hits, one.rank(queries, k).hits)
    hits = [h for q in result.hits for h in q]
    assert any(h.moments for h in hits) and any(h.moments is None for h in hits)  # windowed and clip videos
    assert any(h.moments and h.moments[0].num_windows > 1 for h in hits)  # merged from several windows
    hit_ids = np.array([h.id for h in hits])
    for group in ((0, 2), (1, 3)):  # both deployments contributed hits
        assert np.isin(hit_ids, _ids_of_shards(root, group)).any()
    # a filter ranks only the allowed rows: a small one makes the probed lists run dry (the exhaustive retry)
    allowed = np.arange(0, len(fanout["vectors"]), 29, dtype=np.int64)
    _same(searcher.rank(queries, 10, allowed_ids=allowed, timeout_s=60).hits,
          one.rank(queries, 10, allowed_ids=allowed).hits)
    assert searcher.rank(queries[:2], 5, allowed_ids=np.array([], np.int64)).hits == [[], []]
    with pytest.raises(ValueError, match="zero norm"):
        searcher.rank(np.zeros((1, one.dim), np.float32), 5)
    with pytest.raises(ValueError, match="has dim 64"):
        searcher.rank(np.ones((1, one.dim + 1), np.float32), 5)


def test_one_process_searches_its_shards_side_by_side(fanout, monkeypatch):
    """``VideoIndex`` searches one query's shards on the shard-search threads (index.query.shard_threads),
    and the answer is the sequential one's, filtered or not; a bad VIDSIFT_SHARD_THREADS names itself."""
    one = fanout["one"]
    queries = _queries(8, one.dim, seed=7)
    allowed = np.arange(0, len(fanout["vectors"]), 13, dtype=np.int64)
    threads: set[str] = set()
    search_shard = index_query.search_shard

    def recording(*args):
        threads.add(threading.current_thread().name)
        return search_shard(*args)

    monkeypatch.setattr(index_query, "search_shard", recording)
    answers = {}
    for setting in ("1", "4"):
        monkeypatch.setenv("VIDSIFT_SHARD_THREADS", setting)
        answers[setting] = [one.search_vectors(queries, 25), one.rank(queries, 10, allowed_ids=allowed).hits]
    sequential, parallel = answers["1"], answers["4"]
    np.testing.assert_array_equal(sequential[0][1], parallel[0][1])
    np.testing.assert_array_equal(sequential[0][0], parallel[0][0])
    _same(parallel[1], sequential[1])
    assert threading.current_thread().name in threads  # "1": in the caller
    assert any(name.startswith("vidsift-shard-search") for name in threads)  # "4": on the pool
    monkeypatch.setenv("VIDSIFT_SHARD_THREADS", "two")
    with pytest.raises(ValueError, match="VIDSIFT_SHARD_THREADS='two'"):
        one.search_vectors(queries, 5)


def test_a_plan_larger_than_the_cluster_is_refused_before_deploying(fanout):
    """4 deployments of 1 CPU on the 2-CPU test Ray: Serve would wait for CPUs forever; refused, naming the
    --shard-cpus that fits."""
    before = set(serve.status().applications)
    with pytest.raises(ValueError, match=r"= 4 CPUs, the Ray cluster has 2: pass --shard-cpus 0\.5"):
        deploy_shards(fanout["root"], 4, replicas=1, num_cpus=1.0, prefix="too-big")
    assert set(serve.status().applications) == before


def test_a_blocked_shard_gives_a_partial_result_by_the_deadline(fanout):
    one, plan = fanout["one"], fanout["plan"]
    handles = [plan.handles()[0], serve.get_deployment_handle("shard", app_name="blocked")]
    searcher = FanoutSearcher(fanout["root"], None, handles, names=[plan.apps[0], "blocked"])
    queries = _queries(4, one.dim, seed=2)
    t0 = time.monotonic()
    result = searcher.rank(queries, 10, timeout_s=3)
    assert time.monotonic() - t0 < 10
    # the moments round comes after the deadline the blocked deployment used up: named, not hidden
    late_moments = ("blocked", f"{plan.apps[0]} (moments)")
    assert result.partial and result.missing_shards in (("blocked",), late_moments)
    # what came back is exactly the one-process answer restricted to the shards that answered (0 and 2)
    allowed = _ids_of_shards(fanout["root"], (0, 2))
    _same(result.hits, one.rank(queries, 10, allowed_ids=allowed).hits,
          moments=result.missing_shards != late_moments)
    health = {h["deployment"]: h for h in searcher.health(timeout_s=2)}
    assert health[plan.apps[0]]["ok"] and health[plan.apps[0]]["shards"] == [0, 2]
    assert health[plan.apps[0]]["open"] in ([], [[one.version, [0, 2]]])  # which replica answered
    # a shard replica answers on the thread of Ray's actor event loop, where Serve receives the request
    # (REPLICA_ENV, async methods): not on a second loop's thread, nor a thread pool's
    assert health[plan.apps[0]]["thread"] == "AsyncIO Thread: default", health[plan.apps[0]]["thread"]
    assert isinstance(health["blocked"]["ok"], bool)  # busy but alive: answered, or a timeout error
    only_blocked = FanoutSearcher(fanout["root"], None, handles[1:], names=["blocked"])
    with pytest.raises(FanoutError, match="blocked"):
        only_blocked.rank(queries, 10, timeout_s=2)


def test_a_killed_shard_replica_gives_a_partial_result_not_a_hang(fanout):
    plan = fanout["plan"]
    handles = [plan.handles()[1], serve.get_deployment_handle("shard", app_name="blocked")]
    searcher = FanoutSearcher(fanout["root"], None, handles, names=[plan.apps[1], "blocked"])
    queries = _queries(2, fanout["one"].dim, seed=3)
    done = {}

    def ask():
        done["result"] = searcher.rank(queries, 10, timeout_s=90)
        done["at"] = time.monotonic()

    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(2)  # the blocked replica now holds the request
    killed_at = time.monotonic()
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "blocked" in a["name"] and "REPLICA" in a["name"]]
    assert replicas, ray.util.list_named_actors(all_namespaces=True)
    for actor in replicas:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the search hung on a dead shard replica"
    assert done["at"] - killed_at < 30
    assert done["result"].partial and done["result"].missing_shards == ("blocked",)
    assert all(q for q in done["result"].hits)


def test_replicas_of_a_shard_deployment_share_its_load(fanout):
    plan = fanout["plan"]
    searcher = FanoutSearcher(fanout["root"], None, plan.handles(), names=plan.apps)
    queries = _queries(32, fanout["one"].dim, seed=4)
    expected = fanout["one"].rank(queries, 5).hits
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: searcher.rank(queries[i:i + 1], 5, timeout_s=60), range(32)))
    _same([r.hits[0] for r in results], expected)
    # each of the 2 deployments has 2 replicas; concurrent searches reach all 4
    assert len(searcher.served_by) == 4, searcher.served_by
    assert sum(searcher.served_by.values()) == 2 * 32


def test_the_service_answers_through_the_shard_deployments(fanout):
    root, one = fanout["root"], fanout["one"]
    app = build_app(root, allow_random_init=False, poll_s=0, fanout=fanout["plan"])
    snapshot = app.state.live.current
    assert isinstance(snapshot.index, FanoutSearcher) and snapshot.version == one.version
    text = "a red circle moves left"
    want = one.search(text, k=5)
    with serving_in_thread(app) as base:
        url = f"{base}/search?q={urllib.parse.quote(text)}&k=5"
        with urllib.request.urlopen(url, timeout=60) as response:
            body = json.loads(response.read())
    assert body["version"] == one.version
    assert [h["video_id"] for h in body["hits"]] == [h.video_id for h in want]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in want], abs=1e-5)


def _ids_of_shards(root: str, shards: tuple[int, ...]) -> np.ndarray:
    from index import store

    table = store.read_ids(store.version_dir(root))
    keep = np.isin(table.column("shard").to_numpy(), shards)
    return table.column("id").to_numpy()[keep]
