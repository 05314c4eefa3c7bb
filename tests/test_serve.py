"""The search service (workflows/serve): endpoints, filters, previews, bad input → 4xx JSON while the
service keeps answering, and a live index swap under a querying client with no failed request."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, free_port
from PIL import Image

import models
from index import VideoIndex, add_embeddings, build_index
from index.testing import clustered_vectors, write_embeddings
from workflows.serve import LiveIndex, SnapshotLoader, build_app, serving_in_thread
from workflows.serve.previews import PreviewError, PreviewMaker

MODEL = "clip4clip-meanP-tiny"
CLIPS = 2  # per video: [0, 1] s and [1, 2] s


def make_service_index(tmp: Path, shards: Path) -> tuple[Path, Path, list[str]]:
    """A Flat index over the ingested videos (2 clips each, captions) plus 3 videos that are not in any
    shard (no preview), for a saved seeded random CLIP4Clip; returns (index, checkpoint, shard video ids)."""
    model, _, _ = models.create_model(MODEL, seed=0)
    ckpt = models.save_checkpoint(model, tmp / "c4c.pt")
    ids = _shard_video_ids(shards)
    assert ids[0] == "synth-000000" and ids[-1] == f"synth-{len(ids) - 1:06d}"
    dim = model.encode_text(["x"]).shape[1]
    emb = tmp / "emb"
    write_embeddings(emb, clustered_vectors(len(ids) * CLIPS, dim, seed=3), clips_per_video=CLIPS,
                     model_id=model.model_id, model_name=MODEL, pretrained=str(ckpt), video_prefix="synth",
                     captions=[[f"synthetic video {v}"] for v in range(len(ids))])
    write_embeddings(emb, clustered_vectors(3, dim, seed=4), model_id=model.model_id, model_name=MODEL,
                     pretrained=str(ckpt), video_prefix="extra", start_id=10_000)
    build_index(emb, tmp / "idx", factory="Flat", progress=False)
    return tmp / "idx", ckpt, ids


def write_generated_captions(folder: Path, video_ids: list[str]) -> Path:
    """A ``jobs.caption`` output folder (its ``captions.parquet``) captioning every other video."""
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"video_id": v, "key": v, "caption": f"generated for {v}", "score": -1.0, "model_id": "cap@0"}
            for v in video_ids[::2]]
    pq.write_table(pa.Table.from_pylist(rows), folder / "captions.parquet")
    return folder


def _shard_video_ids(shards: Path) -> list[str]:
    tables = [pq.read_table(p, columns=["video_id"]) for p in sorted(shards.rglob("0*.parquet"))]
    return sorted(v for t in tables for v in t.column(0).to_pylist())


def call(base: str, path: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, dict | bytes]:
    """(status, JSON or bytes) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(base + path, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, kind, data = response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as err:
        status, kind, data = err.code, err.headers.get("Content-Type", ""), err.read()
    return status, json.loads(data) if "json" in kind else data


@pytest.fixture(scope="module")
def service(ingested_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    index, ckpt, ids = make_service_index(tmp, ingested_shards)
    app = build_app(str(index), pretrained=str(ckpt), shards=[str(ingested_shards)], poll_s=0.2,
                    cache_dir=str(tmp / "previews"), max_k=500,
                    captions=[str(write_generated_captions(tmp / "captions", ids))])
    with serving_in_thread(app) as base:
        yield {"base": base, "index": index, "ids": ids, "tmp": tmp, "app": app,
               "model_id": app.state.live.current.index.model_id}


def test_search_get_post_and_pages(service):
    base = service["base"]
    status, info = call(base, "/version")
    assert status == 200 and info["count"] == len(service["ids"]) * CLIPS + 3
    status, body = call(base, "/search?q=a+red+circle+moves+left&k=10")
    assert status == 200 and body["version"] == info["version"] and len(body["hits"]) == 10
    hits = body["hits"]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert len({h["video_id"] for h in hits}) == 10
    for h in hits:
        assert {"video_id", "score", "start_s", "end_s", "preview_url"} <= set(h)
        assert h["end_s"] > h["start_s"]
        if h["video_id"].startswith("synth"):
            assert h["preview_url"].startswith("/previews/") and h["caption"].startswith("synthetic video")
        else:
            assert h["preview_url"] is None
    status, page2 = call(base, "/search?q=a+red+circle+moves+left&k=5&offset=5")
    assert [h["video_id"] for h in page2["hits"]] == [h["video_id"] for h in hits[5:]]
    status, single = call(base, "/search", json.dumps({"q": "a red circle moves left", "k": 3}).encode())
    assert status == 200 and [h["video_id"] for h in single["hits"]] == [h["video_id"] for h in hits[:3]]
    status, batch = call(base, "/search", json.dumps({"queries": ["a red circle moves left", "blue"],
                                                      "k": 4}).encode())
    assert status == 200 and [r["query"] for r in batch["results"]] == ["a red circle moves left", "blue"]
    assert [h["video_id"] for h in batch["results"][0]["hits"]] == [h["video_id"] for h in hits[:4]]
    status, everything = call(base, "/search?q=anything&k=500")
    assert status == 200 and len(everything["hits"]) == len(service["ids"]) + 3  # all videos, once each


def test_videos_health_and_page(service):
    base = service["base"]
    status, video = call(base, "/videos/synth-000002")
    assert status == 200 and video["captions"] == ["synthetic video 2"]
    assert [(m["start_s"], m["end_s"]) for m in video["moments"]] == [(0.0, 1.0), (1.0, 2.0)]
    assert 2.0 <= video["metadata"]["duration"] <= 4.0 and video["has_preview"]
    status, missing = call(base, "/videos/no-such-video")
    assert status == 404 and "no-such-video" in missing["error"]
    version = call(base, "/version")[1]["version"]
    health = {"status": "ok", "ok": True, "version": version, "newest": version}
    assert call(base, "/healthz") == (200, health)
    assert "source" not in video["metadata"]  # the ingest source URI is hidden without --expose-sources
    status, html = call(base, "/")
    assert status == 200 and b'id="search-form"' in html and b"http" not in html.split(b"<body>")[1]
    assert call(base, "/static/app.js")[0] == 200 and call(base, "/static/style.css")[0] == 200


def test_filters_on_duration_and_metadata(service):
    base = service["base"]
    status, info = call(base, "/version")
    assert {"duration", "video_id", "key"} <= set(info["filter_columns"])
    status, body = call(base, "/search?q=a+video&k=50&min_duration=2.5&max_duration=3.5")
    assert status == 200 and body["hits"]
    for h in body["hits"]:
        assert 2.5 <= call(base, f"/videos/{h['video_id']}")[1]["metadata"]["duration"] <= 3.5
    status, one = call(base, "/search?q=a+video&k=5&where=video_id:synth-000007")
    assert status == 200 and [h["video_id"] for h in one["hits"]] == ["synth-000007"]
    status, none = call(base, "/search?q=a+video&k=5&where=video_id:synth-000007&min_duration=99")
    assert status == 200 and none["hits"] == []
    split = call(base, "/videos/synth-000002")[1]["metadata"]["split"]  # an ingest manifest column
    status, by_split = call(base, f"/search?q=a+video&k=50&where=split:{split}&max_duration=3.5")
    assert status == 200 and by_split["hits"]
    for h in by_split["hits"]:
        meta = call(base, f"/videos/{h['video_id']}")[1]["metadata"]
        assert meta["split"] == split and meta["duration"] <= 3.5
    status, posted = call(base, "/search", json.dumps({"q": "a video", "where": {"num_clips": "2"}, "k": 50})
                          .encode())
    assert status == 200 and {h["video_id"][:5] for h in posted["hits"]} == {"synth"}


def test_filters_rank_only_passing_videos_and_pages_agree(service):
    """A filter that excludes most of the unfiltered top k still fills the page with passing videos, in the
    order of the full ranking, and offset pages are slices of that one ranking."""
    base, k, q = service["base"], 4, "a+blue+triangle+grows"
    ranking = [h["video_id"] for h in call(base, f"/search?q={q}&k=500")[1]["hits"]]
    duration = {v: call(base, f"/videos/{v}")[1]["metadata"]["duration"] for v in ranking}
    best = (-1, "", [])
    for t in sorted(set(duration.values())):
        rules = (("max_duration", lambda d, t=t: d <= t), ("min_duration", lambda d, t=t: d >= t))
        for name, passes in rules:
            passing = [v for v in ranking if passes(duration[v])]
            excluded = sum(not passes(duration[v]) for v in ranking[:k])
            if len(passing) >= 3 * k and excluded > best[0]:
                best = (excluded, f"{name}={t!r}", passing)
    excluded, flt, passing = best
    assert excluded > k // 2, best  # the filter removes most of the unfiltered top k
    status, body = call(base, f"/search?q={q}&k={k}&{flt}")
    hits = body["hits"]
    assert status == 200 and [h["video_id"] for h in hits] == passing[:k]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    pages = [call(base, f"/search?q={q}&k={k}&offset={o}&{flt}")[1]["hits"] for o in (k, 2 * k)]
    assert [h["video_id"] for page in pages for h in page] == passing[k:3 * k]
    status, whole = call(base, f"/search?q={q}&k={3 * k}&{flt}")
    assert [h["video_id"] for h in whole["hits"]] == passing[:3 * k]
    assert [h["score"] for h in whole["hits"]] == [h["score"] for h in hits + pages[0] + pages[1]]


def test_preview_is_an_animated_webp_and_cached(service):
    base = service["base"]
    hit = next(h for h in call(base, "/search?q=a+video&k=10")[1]["hits"] if h["preview_url"])
    t0 = time.perf_counter()
    status, data = call(base, hit["preview_url"])
    first = time.perf_counter() - t0
    assert status == 200 and isinstance(data, bytes)
    image = Image.open(io.BytesIO(data))
    assert image.format == "WEBP" and image.n_frames > 1 and image.size[0] > 0
    t0 = time.perf_counter()
    assert call(base, hit["preview_url"]) == (200, data)
    assert len(list((service["tmp"] / "previews").glob("*.webp"))) == 1
    assert time.perf_counter() - t0 < max(first, 0.5)
    status, err = call(base, "/previews/extra-000000.webp?start=0&end=1")
    assert status == 404 and "cannot reach its video" in err["error"]


def test_previews_only_of_listed_windows(service):
    """A window the index does not list for the video is refused before any decode: clients cannot make
    the service decode and cache one file per millisecond."""
    base, vid = service["base"], service["ids"][3]
    catalog = service["app"].state.live.current.catalog
    assert catalog.preview_window(vid, 0.0, 1.0) == (0.0, 1.0)
    assert catalog.preview_window(vid, 0.0004, 2.0) == (0.0, 2.0)  # adjacent windows merged: one moment
    assert catalog.preview_window(vid, 0.5, 1.0) is None and catalog.preview_window(vid, 1.0, 1.0) is None
    status, err = call(base, f"/previews/{vid}.webp?start=0.123&end=0.987")
    assert status == 404 and "windows the index lists" in err["error"]
    files = len(list((service["tmp"] / "previews").glob("*.webp")))
    for ms in range(1, 21):  # every millisecond is a new window: none of them is listed
        assert call(base, f"/previews/{vid}.webp?start={ms / 1000:.3f}&end=1")[0] == 404
    assert len(list((service["tmp"] / "previews").glob("*.webp"))) == files


def test_preview_cache_never_exceeds_its_cap(service, tmp_path):
    """Windows of 6 videos through a cache capped at about two previews: the folder never holds more than
    the cap, the oldest go first, the newest is kept; a second maker adopts the folder within its cap."""
    catalog = service["app"].state.live.current.catalog
    videos = [v for v in service["ids"] if v in catalog.sources][:6]
    size = len(PreviewMaker(tmp_path / "probe").render(catalog.sources[videos[0]], 0.0, 1.0))
    cap = 2 * size + size // 2
    maker = PreviewMaker(tmp_path / "capped", cache_bytes=cap)
    for vid in videos:
        maker.render(catalog.sources[vid], 0.0, 1.0)
        on_disk = sum(f.stat().st_size for f in (tmp_path / "capped").glob("*.webp"))
        assert on_disk <= cap and maker.status()["bytes"] == on_disk
    assert maker.status()["evicted"] >= 2 and 1 <= maker.status()["files"] <= 3
    again = PreviewMaker(tmp_path / "capped", cache_bytes=size + 1)  # a restart with a smaller cap
    assert sum(f.stat().st_size for f in (tmp_path / "capped").glob("*.webp")) <= size + 1
    assert again.status()["files"] <= 1


def test_one_window_requested_together_is_decoded_once_and_big_members_are_refused(service, tmp_path):
    catalog = service["app"].state.live.current.catalog
    source = catalog.sources[service["ids"][5]]
    maker = PreviewMaker(tmp_path / "together")
    barrier, results = threading.Barrier(4), []

    def render():
        barrier.wait(timeout=60)
        results.append(maker.render(source, 1.0, 2.0))

    threads = [threading.Thread(target=render) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 4 and len(set(results)) == 1 and maker.status()["files"] == 1
    small = PreviewMaker(tmp_path / "small", max_member_bytes=1000)
    with pytest.raises(PreviewError, match="previews are made only of videos up to 1,000 bytes") as err:
        small.render(source, 0.0, 1.0)
    assert err.value.status == 413 and small.status()["files"] == 0


BIG = "x" * (2 * 1024 * 1024)
BAD_INPUTS = [
    ("empty query", "/search?q=%20&k=5", None, 400, "empty query"),
    ("missing query", "/search?k=5", None, 400, "missing query"),
    ("k zero", "/search?q=cat&k=0", None, 400, "k must be >= 1"),
    ("k negative", "/search?q=cat&k=-3", None, 400, "k must be >= 1"),
    ("k not a number", "/search?q=cat&k=ten", None, 400, "k must be an integer"),
    ("k above max", "/search?q=cat&k=501", None, 400, "maximum k of 500"),
    ("unknown filter column", "/search?q=cat&where=colour:red", None, 400, "unknown filter column 'colour'"),
    ("where without colon", "/search?q=cat&where=colour", None, 400, "COLUMN:VALUE"),
    ("numeric column, text value", "/search?q=cat&where=duration:long", None, 400, "duration is numeric"),
    ("bad duration", "/search?q=cat&min_duration=soon", None, 400, "min_duration must be a number"),
    ("inverted durations", "/search?q=cat&min_duration=5&max_duration=1", None, 400, "above max_duration"),
    ("unknown parameter", "/search?q=cat&colour=red", None, 400, "unknown parameter"),
    ("malformed JSON", "/search", b'{"q": "cat", "k": ', 400, "malformed JSON"),
    ("JSON not an object", "/search", b'["cat"]', 400, "must be an object"),
    ("JSON k a string", "/search", b'{"q": "cat", "k": "many"}', 400, "k must be an integer"),
    ("JSON empty batch", "/search", b'{"queries": []}', 400, "non-empty list"),
    ("JSON empty query in batch", "/search", b'{"queries": ["cat", " "]}', 400, "empty query at position 1"),
    ("2 MB query POST", "/search", json.dumps({"q": BIG}).encode(), 413, "request body is over"),
    ("long query GET", "/search?q=" + "x" * 2000, None, 413, "the limit is 1,000"),
    ("40 kB query GET", "/search?q=" + "x" * 40_000, None, 413, "query string is 40,002 bytes"),
    ("unknown route", "/nope", None, 404, "Not Found"),
]


@pytest.mark.parametrize("name,path,body,status,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_4xx_json_and_the_service_keeps_answering(service, name, path, body, status, message):
    got, payload = call(service["base"], path, body)
    assert got == status and isinstance(payload, dict), (got, payload)
    assert message in payload["error"] and payload["status"] == status
    assert call(service["base"], "/healthz")[0] == 200
    assert call(service["base"], "/search?q=still+answering&k=2")[0] == 200


def test_a_2mb_url_is_refused_by_the_http_parser_and_the_service_keeps_answering(service):
    """A URL this long never reaches the app: uvicorn's parser answers a plain-text 400 (docs/serve.md)."""
    status, payload = call(service["base"], "/search?q=" + BIG)
    assert 400 <= status < 500
    assert call(service["base"], "/healthz")[0] == 200
    assert call(service["base"], "/search?q=still+answering&k=2")[0] == 200


def test_weights_are_required_and_a_bad_version_is_never_served(tmp_path):
    model, _, _ = models.create_model(MODEL, seed=0)
    emb = write_embeddings(tmp_path / "emb", clustered_vectors(6, 64, seed=5), model_id=model.model_id,
                           model_name=MODEL)  # no checkpoint recorded
    build_index(emb, tmp_path / "idx", factory="Flat", progress=False)
    with pytest.raises(models.MissingWeightsError, match="--allow-random-init"):
        SnapshotLoader(str(tmp_path / "idx")).load()
    root = str(tmp_path / "idx")
    live = LiveIndex(root, SnapshotLoader(root, allow_random_init=True).load, poll_s=0)
    good = live.current.version
    (tmp_path / "idx" / "CURRENT").write_text("999999-missing\n")  # names a version that does not exist
    assert live.check_now() is False and live.current.version == good
    assert "999999-missing" in live.status()["last_error"]
    assert live.check_now() is False  # not retried before retry_s


def test_publishing_a_version_swaps_live_with_no_failed_request(service):
    """Runs last: it changes the served index."""
    base = service["base"]
    before = call(base, "/version")[1]["version"]
    seen, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                status, body = call(base, "/search?q=a+green+square&k=5")
                seen.append(body["version"]) if status == 200 else failures.append((status, body))
            except Exception as exc:  # noqa: BLE001 — every failure is counted, none may happen
                failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    new = write_embeddings(service["tmp"] / "emb2", clustered_vectors(4, 64, seed=9), model_name=MODEL,
                           model_id=service["model_id"], video_prefix="fresh", start_id=50_000)
    published = add_embeddings(service["index"], new)["version"]
    deadline = time.time() + 60
    while call(base, "/version")[1]["version"] != published and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert failures == [] and before in seen and published in seen
    assert call(base, "/version")[1]["swaps"] == 1
    status, fresh = call(base, "/videos/fresh-000002")
    assert status == 200 and fresh["version"] == published


def test_ray_serve_answers_healthz_and_search(tmp_path):
    """``--ray-serve`` for real: a private local Ray + Ray Serve on 127.0.0.1 serve the same answers as the
    in-process index; SIGTERM stops Serve and the Ray the service started (bounded waits throughout)."""
    model, _, _ = models.create_model(MODEL, seed=0)
    ckpt = models.save_checkpoint(model, tmp_path / "c4c.pt")
    emb = write_embeddings(tmp_path / "emb", clustered_vectors(40, 64, seed=6), clips_per_video=2,
                           model_id=model.model_id, model_name=MODEL, pretrained=str(ckpt))
    build_index(emb, tmp_path / "idx", factory="Flat", progress=False)
    expected = VideoIndex.open(tmp_path / "idx", encoder=model).search("a red circle moves left", k=5)
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "jobs.serve", "--index", str(tmp_path / "idx"), "--ray-serve",
           "--poll-s", "0", "--host", "127.0.0.1", "--port", str(port)]
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 240
            while True:
                with contextlib.suppress(OSError):
                    if call(base, "/healthz", timeout=5)[0] == 200:
                        break
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "Ray Serve did not answer /healthz in 240 s"
                time.sleep(1)
            status, health = call(base, "/healthz")
            version = VideoIndex.open(tmp_path / "idx").version
            assert status == 200 and health == {"status": "ok", "ok": True, "version": version,
                                                "newest": version}
            status, body = call(base, "/search?q=a+red+circle+moves+left&k=5")
            assert status == 200 and body["version"] == version
            assert [h["video_id"] for h in body["hits"]] == [h.video_id for h in expected]
            assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)
            assert call(base, "/search?q=&k=5")[0] == 400
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert "Ray Serve stopped" in log_path.read_text()


def test_catalog_id_filter_is_skipped_when_every_video_passes():
    """A filter every video passes ranks like no filter, without an id selector over every row."""
    import pyarrow as pa

    from workflows.serve.catalog import build_catalog
    from workflows.serve.queries import Filters

    ids = pa.Table.from_pylist([{"id": i, "video_id": f"v{i // 2}", "shard": "000000", "clip_index": i % 2,
                                 "start_s": float(i % 2), "end_s": float(i % 2 + 1)} for i in range(6)])
    catalog = build_catalog(ids)
    assert catalog.allowed_ids(Filters(where=(("shard", "000000"),))) is None
    assert catalog.allowed_ids(Filters(where=(("video_id", "v1"),))).tolist() == [2, 3]
    assert catalog.allowed_ids(Filters(min_duration=5.0)).tolist() == []


def test_hits_carry_the_generated_caption_of_serve_captions(service):
    """--captions: a captioned video's hits and /videos/{id} carry what the captioner wrote; others do not."""
    base, ids = service["base"], service["ids"]
    hits = call(base, "/search?q=a+video&k=500")[1]["hits"]
    by_id = {h["video_id"]: h for h in hits}
    assert by_id[ids[0]]["generated_caption"] == f"generated for {ids[0]}"
    assert "generated_caption" not in by_id[ids[1]] and "generated_caption" not in by_id["extra-000000"]
    assert by_id[ids[0]]["caption"] == "synthetic video 0"  # the index caption stays as it was
    assert call(base, f"/videos/{ids[2]}")[1]["generated_caption"] == f"generated for {ids[2]}"
    assert call(base, f"/videos/{ids[1]}")[1]["generated_caption"] is None


def test_captions_folder_without_captions_is_refused(service, tmp_path):
    with pytest.raises(FileNotFoundError, match="--captions .*no captions.parquet"):
        build_app(str(service["index"]), pretrained=None, allow_random_init=True, poll_s=0,
                  captions=[str(tmp_path)])
