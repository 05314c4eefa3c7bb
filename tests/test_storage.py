"""runtime.storage on a local folder and on a real S3 HTTP API (moto server): the same calls, the same
atomicity guarantees."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from runtime import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def test_uri_helpers():
    assert storage.join("s3://b/x", "y", "z.json") == "s3://b/x/y/z.json"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.is_local("/tmp/a") and storage.is_local("file:///tmp/a") and not storage.is_local("s3://b")
    assert storage.local_path("file:///tmp/a") .as_posix() == "/tmp/a"
    assert storage.name("s3://b/x/y.tar") == "y.tar" and storage.parent("s3://b/x/y.tar") == "s3://b/x"
    with pytest.raises(ValueError, match="not a local path"):
        storage.local_path("s3://b/x")


def test_write_read_list_remove(root):
    storage.write_bytes(storage.join(root, "a", "one.bin"), b"1")
    storage.write_json(storage.join(root, "a", "two.json"), {"k": [1, 2]})
    storage.write_text(storage.join(root, "a", "sub", "three.txt"), "3")
    assert storage.read_bytes(storage.join(root, "a", "one.bin")) == b"1"
    assert storage.read_json(storage.join(root, "a", "two.json")) == {"k": [1, 2]}
    assert storage.read_json(storage.join(root, "a", "missing.json"), default=None) is None
    with pytest.raises(FileNotFoundError):
        storage.read_json(storage.join(root, "a", "missing.json"))
    assert [storage.name(u) for u in storage.list_files(storage.join(root, "a"))] == ["one.bin", "two.json"]
    assert [storage.name(u) for u in storage.list_files(storage.join(root, "a"), ".json")] == ["two.json"]
    assert [storage.name(u) for u in storage.list_dirs(storage.join(root, "a"))] == ["sub"]
    assert storage.list_files(storage.join(root, "nothing-here")) == []
    storage.remove(storage.join(root, "a", "one.bin"))
    storage.remove(storage.join(root, "a", "one.bin"))  # absent is fine
    assert not storage.exists(storage.join(root, "a", "one.bin"))
    storage.remove(storage.join(root, "a"), recursive=True)
    assert storage.list_files(storage.join(root, "a")) == []


def test_parquet_round_trip_and_dataset(root):
    table = pa.table({"id": [1, 2, 3], "v": ["a", "b", "c"]})
    storage.write_parquet(table, storage.join(root, "ds", "part-0.parquet"))
    storage.write_parquet(table, storage.join(root, "ds", "part-1.parquet"))
    assert storage.read_parquet(storage.join(root, "ds", "part-0.parquet")).equals(table)
    fs, path = storage.arrow_filesystem(storage.join(root, "ds"))
    assert ds.dataset(path, filesystem=fs, format="parquet").count_rows() == 6


def test_open_output_is_all_or_nothing(root, tmp_path):
    target = storage.join(root, "out", "big.bin")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_output(target) as fh:
            fh.write(b"half")
            raise RuntimeError("boom")
    assert not storage.exists(target)
    with storage.open_output(target) as fh:
        fh.write(b"whole")
    assert storage.read_bytes(target) == b"whole"
    local = tmp_path / "f.bin"
    local.write_bytes(b"x" * 1000)
    storage.upload(local, storage.join(root, "out", "up.bin"))
    assert storage.read_bytes(storage.join(root, "out", "up.bin")) == b"x" * 1000


def test_create_exclusive_has_one_winner(root):
    lock = storage.join(root, "locks", "run.lock")
    assert storage.create_exclusive(lock, b"first") is True
    assert storage.create_exclusive(lock, b"second") is False
    assert storage.read_bytes(lock) == b"first"


def test_cached_copy_verifies_checksum(root, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    uri = storage.join(root, "model.pt")
    storage.write_bytes(uri, b"weights")
    good = storage.sha256_file(storage.cached_copy(uri))
    copy = storage.cached_copy(uri, sha256=good)
    assert copy.read_bytes() == b"weights"
    with pytest.raises(ValueError, match="sha256"):
        storage.cached_copy(uri, sha256="0" * 64)


def test_read_bytes_limit_empty_and_missing(root):
    storage.write_bytes(storage.join(root, "ten.bin"), b"0123456789")
    storage.write_bytes(storage.join(root, "empty.bin"), b"")
    assert storage.read_bytes(storage.join(root, "ten.bin")) == b"0123456789"
    assert storage.read_bytes(storage.join(root, "ten.bin"), limit=4) == b"0123"
    assert storage.read_bytes(storage.join(root, "ten.bin"), limit=50) == b"0123456789"
    # S3 answers 416 to a range on an empty object: still read as empty, with or without a limit
    assert storage.read_bytes(storage.join(root, "empty.bin")) == b""
    assert storage.read_bytes(storage.join(root, "empty.bin"), limit=4) == b""
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing.bin"), limit=4)


def test_read_bytes_is_one_request_on_s3(s3_bucket):
    """An object is read in one GET: no size lookup (HEAD) before it, which doubled ingest's requests."""
    uri = storage.join(s3_bucket, "clip.mp4")
    storage.write_bytes(uri, b"x" * 1000)
    fs, _ = storage.filesystem(uri)
    calls: list[str] = []
    fs.s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    assert storage.read_bytes(uri) == b"x" * 1000
    assert storage.read_bytes(uri, limit=11) == b"x" * 11
    assert calls == ["GetObject", "GetObject"]


def test_compare_and_swap_and_remove_if(root):
    uri = storage.join(root, "ptr", "CURRENT")
    assert storage.compare_and_swap(uri, b"v0\n", b"v1\n") is False  # absent, not v0
    assert not storage.exists(uri)
    assert storage.compare_and_swap(uri, None, b"v1\n") is True
    assert storage.compare_and_swap(uri, None, b"other\n") is False  # exists now
    assert storage.compare_and_swap(uri, b"v0\n", b"v2\n") is False and storage.read_bytes(uri) == b"v1\n"
    assert storage.compare_and_swap(uri, b"v1\n", b"v2\n") is True and storage.read_bytes(uri) == b"v2\n"
    assert storage.remove_if(uri, b"v1\n") is False and storage.exists(uri)
    assert storage.remove_if(uri, b"v2\n") is True and not storage.exists(uri)
    assert storage.remove_if(uri, b"v2\n") is False


def test_conditional_writes_are_refused_where_the_store_has_none():
    assert storage.supports_conditional_writes("/tmp/x") and storage.supports_conditional_writes("s3://b/x")
    for uri in ("memory://vidsift-test/lock", "gs://bucket/lock"):
        assert not storage.supports_conditional_writes(uri)
        for call, args in ((storage.create_exclusive, (uri, b"x")), (storage.remove_if, (uri, b"x")),
                           (storage.compare_and_swap, (uri, None, b"x"))):
            with pytest.raises(storage.ConditionalWriteUnsupported, match="no conditional writes"):
                call(*args)
