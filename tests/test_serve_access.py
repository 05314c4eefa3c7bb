"""Same-origin and access: foreign Host headers (DNS rebinding) are refused, ``--auth-token-file`` makes
the API need a bearer token, a non-loopback bind needs a token or ``--insecure-open``, a 500 does not echo
the exception, and the ingest source URIs stay hidden unless ``--expose-sources``."""

from __future__ import annotations

import io
import json
import tarfile
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import models
from index import build_index
from index.testing import clustered_vectors, write_embeddings
from jobs import serve as serve_job
from workflows.serve import build_app, serving_in_thread
from workflows.serve.access import Access, access_for, host_name
from workflows.serve.catalog import build_catalog

MODEL = "clip4clip-meanP-tiny"
TOKEN = "t0ken-for-the-access-tests-7f3a"


def call(url: str, headers: dict | None = None) -> tuple[int, dict | bytes, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, data, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        status, data, got = err.code, err.read(), dict(err.headers)
    return status, json.loads(data) if "json" in got.get("content-type", "") else data, got


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-access")
    model, _, _ = models.create_model(MODEL, seed=0)
    ckpt = models.save_checkpoint(model, tmp / "c4c.pt")
    emb = write_embeddings(tmp / "emb", clustered_vectors(8, 64, seed=2), model_id=model.model_id,
                           model_name=MODEL, pretrained=str(ckpt), video_prefix="v")
    build_index(emb, tmp / "idx", factory="Flat", progress=False)
    return tmp / "idx", ckpt, tmp


def test_foreign_host_headers_are_refused(index):
    app = build_app(str(index[0]), pretrained=str(index[1]), poll_s=0)
    with serving_in_thread(app) as base:
        port = base.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            assert call(base + "/search?q=a+cat&k=1", {"Host": host})[0] == 200, host
        status, body, _ = call(base + "/search?q=a+cat&k=1", {"Host": f"rebound.attacker.example:{port}"})
        assert status == 400 and "Host 'rebound.attacker.example:" in body["error"]
        assert "--allowed-host" in body["error"]
        assert call(base + "/", {"Host": "rebound.attacker.example"})[0] == 400  # the page too


def test_allowed_host_replaces_the_list(index):
    access = access_for("127.0.0.1", ["search.example.org"])
    app = build_app(str(index[0]), pretrained=str(index[1]), poll_s=0, access=access)
    with serving_in_thread(app) as base:
        assert call(base + "/healthz", {"Host": "search.example.org:443"})[0] == 200
        assert call(base + "/healthz", {"Host": "127.0.0.1"})[0] == 400


def test_a_token_file_makes_the_api_need_the_bearer_token(index):
    token_file = index[2] / "token"
    token_file.write_text(TOKEN + "\n")
    app = build_app(str(index[0]), pretrained=str(index[1]), poll_s=0,
                    access=access_for("127.0.0.1", token_file=str(token_file)))
    with serving_in_thread(app) as base:
        for path in ("/search?q=a+cat&k=1", "/version", "/videos/v-000001", "/previews/v-000001.webp"):
            status, body, headers = call(base + path)
            assert status == 401 and "Authorization: Bearer" in body["error"], path
            assert headers["www-authenticate"] == "Bearer"
            assert call(base + path, {"Authorization": "Bearer not-the-token"})[0] == 401
        assert call(base + "/search?q=a+cat&k=1", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        for path in ("/", "/static/app.js", "/healthz"):  # the page's own files and the health probe
            assert call(base + path)[0] == 200, path


def test_binding_beyond_loopback_needs_a_token_or_insecure_open(index, tmp_path, capsys):
    with pytest.raises(ValueError, match="--auth-token-file FILE .* or --insecure-open"):
        access_for("0.0.0.0")
    assert access_for("0.0.0.0", insecure_open=True) == Access(allowed_hosts=None, token=None)
    assert access_for("10.1.2.3", insecure_open=True).allowed_hosts == frozenset({"10.1.2.3"})
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ValueError, match="at least 16 characters"):
        access_for("0.0.0.0", token_file=str(short))
    code = serve_job.main(["--index", str(index[0]), "--host", "0.0.0.0", "--port", "1"])
    assert code == 2 and "reaches beyond this machine" in capsys.readouterr().err
    assert host_name("[::1]:8000") == "::1" and host_name("Example.ORG:80") == "example.org"


def test_a_500_does_not_echo_the_exception(index):
    app = build_app(str(index[0]), pretrained=str(index[1]), poll_s=0)

    async def broken(request):
        raise RuntimeError("s3://private-bucket/secret-key is unreadable")

    app.add_route("/broken", broken)
    with serving_in_thread(app) as base:
        status, body, _ = call(base + "/broken")
        assert status == 500 and body == {"error": "internal error (logged by the service)", "status": 500}
        assert call(base + "/healthz")[0] == 200


def test_source_uris_are_hidden_unless_exposed(tmp_path):
    """The ingest ``source`` column (raw URIs) is neither metadata nor a filter column by default."""
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        info = tarfile.TarInfo("v0.mp4")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\0\0\0\0"))
    pq.write_table(pa.Table.from_pylist([{"video_id": "v0", "key": "v0", "source": "s3://raw/v0.mp4?sig=x",
                                          "duration": 2.0}]), shards / "000000.parquet")
    ids = pa.Table.from_pylist([{"id": 0, "video_id": "v0", "key": "v0", "shard": "000000", "clip_index": 0,
                                 "start_s": 0.0, "end_s": 1.0}])
    hidden = build_catalog(ids, [str(shards)])
    assert "source" not in hidden.describe("v0")["metadata"] and "source" not in hidden.kinds
    assert hidden.describe("v0")["has_preview"] and hidden.videos["v0"]["duration"] == 2.0
    shown = build_catalog(ids, [str(shards)], expose_sources=True)
    assert shown.describe("v0")["metadata"]["source"] == "s3://raw/v0.mp4?sig=x"
