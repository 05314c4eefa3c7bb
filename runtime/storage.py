"""Every artifact is a URI: plain paths, ``file://``, ``s3://``, ``gs://`` (anything fsspec knows).

This is the one module that knows which store it is writing to. Endpoint and credentials come from the
standard configuration only (``AWS_ENDPOINT_URL``, ``AWS_*`` variables, ``~/.aws``, instance roles; for GCS
``GOOGLE_APPLICATION_CREDENTIALS`` / metadata server): nothing here takes a key or an endpoint.

Atomicity rules (docs/storage.md):

* a write is complete or absent: local files go to a temp name in the same folder and are renamed; objects
  are written in one PUT (or a multipart upload that the store completes atomically) — an object store
  never shows half an object;
* a set of objects (a shard and its index, an index version) is published by writing a marker / pointer
  object LAST (``manifest.json``, ``CURRENT``); readers trust only what the marker names;
* conditional writes (:func:`create_exclusive`, :func:`compare_and_swap`, :func:`remove_if`; local: a
  ``flock`` around read-compare-rename; S3: ``If-None-Match: *`` / ``If-Match: <ETag>``) are the primitives
  behind locks and ``CURRENT``; other stores raise :class:`ConditionalWriteUnsupported`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import fsspec.asyn
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

CACHE_ENV = "VIDSIFT_CACHE"  # where remote artifacts are cached locally (default ~/.cache/vidsift)
# The standard configuration a store client reads; Ray workers get the driver's copy (storage_env()).
STORAGE_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "FSSPEC_")
_MISSING = object()
_OPEN_END = 1 << 62  # an open-ended byte range: no size lookup before the read


def storage_env() -> dict[str, str]:
    """This process's store configuration (``AWS_*``, ``GOOGLE_*``, ``VIDSIFT_CACHE``...), for Ray workers.

    Pass it as ``runtime_env={"env_vars": storage_env()}`` where tasks, actors or datasets touch storage, so
    a worker started before the variables were set (or on another node) reaches the same store.
    """
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES) or k == CACHE_ENV}


# ------------------------------------------------------------------------------------------------ URIs
def scheme(uri: str | os.PathLike) -> str:
    """``""`` for a local path (or ``file://``), else the URI scheme (``s3``, ``gs``, ``memory``...)."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    if len(parsed.scheme) <= 1 or parsed.scheme == "file":  # "C:" drive letters are local too
        return ""
    return parsed.scheme


def is_local(uri: str | os.PathLike) -> bool:
    return scheme(uri) == ""


def local_path(uri: str | os.PathLike) -> Path:
    """The filesystem path of a local URI; ``ValueError`` for a remote one."""
    text = os.fspath(uri)
    if not is_local(text):
        raise ValueError(f"{text!r} is not a local path")
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` with ``/`` separators, keeping the scheme (``s3://b/x`` + ``y`` → ``s3://b/x/y``)."""
    text = os.fspath(base)
    if is_local(text):
        return str(local_path(text).joinpath(*parts))
    return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])


def name(uri: str | os.PathLike) -> str:
    """The last path component."""
    return os.fspath(uri).rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str | os.PathLike) -> str:
    text = os.fspath(uri).rstrip("/")
    if is_local(text):
        return str(local_path(text).parent)
    return text.rsplit("/", 1)[0]


def normalize(uri: str | os.PathLike) -> str:
    """A local path made absolute (so Ray workers resolve it as the driver meant), a remote URI unchanged."""
    text = os.fspath(uri)
    return str(local_path(text).absolute()) if is_local(text) else text.rstrip("/")


# ----------------------------------------------------------------------------------------- filesystems
def filesystem(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fsspec filesystem, path inside it)``. Listings are never cached: other nodes write too."""
    text = os.fspath(uri)
    if is_local(text):
        return fsspec.filesystem("file"), str(local_path(text).absolute())
    options = {"use_listings_cache": False} if scheme(text) in ("s3", "gs", "gcs") else {}
    fs, path = fsspec.core.url_to_fs(text, **options)
    return fs, path


def arrow_filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path)`` for pyarrow.dataset / Parquet / Ray Data readers and writers."""
    text = os.fspath(uri)
    if is_local(text):
        return pafs.LocalFileSystem(), str(local_path(text).absolute())
    # Remote stores go through the same fsspec client as everything else. (pyarrow's own S3 client fails
    # CompleteMultipartUpload against some S3-compatible servers, moto 5 among them, even for empty files.)
    fs, path = filesystem(text)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# --------------------------------------------------------------------------------------------- reading
def exists(uri: str | os.PathLike) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def is_file(uri: str | os.PathLike) -> bool:
    fs, path = filesystem(uri)
    return fs.isfile(path)


def list_files(uri: str | os.PathLike, suffix: str = "") -> list[str]:
    """Full URIs of the files directly under ``uri`` ending in ``suffix``, sorted; ``[]`` when absent."""
    text = os.fspath(uri)
    fs, path = filesystem(text)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = sorted(name(e["name"]) for e in entries if e["type"] == "file" and e["name"].endswith(suffix))
    return [join(text, n) for n in names]


def list_dirs(uri: str | os.PathLike) -> list[str]:
    """Full URIs of the folders (prefixes) directly under ``uri``, sorted; ``[]`` when absent."""
    text = os.fspath(uri)
    fs, path = filesystem(text)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [join(text, n) for n in sorted(name(e["name"]) for e in entries if e["type"] == "directory")]


def read_bytes(uri: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes at ``uri`` (at most ``limit`` of them): ONE request on an object store.

    A ranged GET: without a range s3fs first asks for the size (a HEAD) to split big reads. Objects
    larger than s3fs's block size are therefore read in one stream, not in concurrent parts.
    """
    fs, path = filesystem(uri)
    if is_local(uri):
        with fs.open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    try:
        return fs.cat_file(path, start=0, end=_OPEN_END if limit is None else limit)
    except OSError as exc:
        # S3 answers 416 to any range on an empty object (s3fs: EINVAL, "range is not satisfiable")
        if isinstance(exc, FileNotFoundError) or exc.errno != errno.EINVAL:
            raise
        return fs.cat_file(path)


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str | os.PathLike, default: Any = _MISSING) -> Any:
    """The parsed JSON at ``uri``; ``default`` when it does not exist (if given)."""
    try:
        return json.loads(read_bytes(uri))
    except FileNotFoundError:
        if default is _MISSING:
            raise
        return default


def read_parquet(uri: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    fs, path = arrow_filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


@contextlib.contextmanager
def open_input(uri: str | os.PathLike, mode: str = "rb") -> Iterator[Any]:
    """A readable file object (streamed for remote stores)."""
    fs, path = filesystem(uri)
    with fs.open(path, mode) as fh:
        yield fh


# --------------------------------------------------------------------------------------------- writing
def makedirs(uri: str | os.PathLike) -> None:
    """Create a local folder (and parents); object stores have no folders, so nothing to do there."""
    if is_local(uri):
        local_path(uri).mkdir(parents=True, exist_ok=True)


def _local_atomic_write(path: Path, data: bytes, fsync: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(uri: str | os.PathLike, data: bytes, fsync: bool = False) -> str:
    """Write a complete file/object atomically (local: temp + rename; remote: one PUT). Returns the URI."""
    text = os.fspath(uri)
    if is_local(text):
        _local_atomic_write(local_path(text), data, fsync)
    else:
        fs, path = filesystem(text)
        fs.pipe_file(path, data)
    return text


def write_text(uri: str | os.PathLike, text: str, fsync: bool = False) -> str:
    return write_bytes(uri, text.encode("utf-8"), fsync=fsync)


def write_json(uri: str | os.PathLike, payload: Any, fsync: bool = False) -> str:
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    return write_text(uri, text, fsync=fsync)


def write_parquet(table: pa.Table, uri: str | os.PathLike, **kwargs: Any) -> str:
    """Serialise in memory, then one atomic write (a Parquet footer must never be missing on a reader)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)
    return write_bytes(uri, sink.getvalue().to_pybytes())


def upload(local_file: str | os.PathLike, uri: str | os.PathLike, fsync: bool = False) -> str:
    """Copy a finished local file to ``uri`` as one complete object / an atomically renamed file."""
    text = os.fspath(uri)
    if is_local(text):
        target = local_path(text)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(local_file, tmp)
            if fsync:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    else:
        fs, path = filesystem(text)
        fs.put_file(os.fspath(local_file), path)  # multipart uploads are completed (made visible) at the end
    return text


@contextlib.contextmanager
def open_output(uri: str | os.PathLike, fsync: bool = False) -> Iterator[io.BufferedWriter]:
    """Write through a local temp file that becomes ``uri`` only when the block ends without error."""
    text = os.fspath(uri)
    fd, tmp = tempfile.mkstemp(prefix="vidsift-out-", suffix=".tmp", dir=_staging_dir(text))
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        if is_local(text):
            target = local_path(text)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        else:
            upload(tmp, text)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _staging_dir(uri: str) -> str | None:
    """Stage local outputs next to their target (same filesystem: rename is atomic); remote ones in /tmp."""
    if is_local(uri):
        folder = local_path(uri).parent
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)
    return None


# ------------------------------------------------------------------------------------ conditional writes
class ConditionalWriteUnsupported(NotImplementedError):
    """The store cannot write conditionally (no atomic create / compare-and-swap): a lock or an index
    publish there could let two writers both succeed, so vidsift refuses (docs/storage.md, "Conditional
    writes")."""


_CONDITIONAL_SCHEMES = ("s3", "s3a")  # plus local folders
_S3_CONDITION_FAILED = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"}
_S3_NOT_IMPLEMENTED = {"NotImplemented", "501"}


def supports_conditional_writes(uri: str | os.PathLike) -> bool:
    """Whether :func:`create_exclusive` / :func:`compare_and_swap` / :func:`remove_if` are atomic on the
    store of ``uri``: a local folder (flock) or S3 (``If-None-Match`` / ``If-Match``)."""
    return is_local(uri) or scheme(uri) in _CONDITIONAL_SCHEMES


def _require_conditional(text: str, operation: str) -> None:
    if not supports_conditional_writes(text):
        raise ConditionalWriteUnsupported(
            f"{text!r}: cannot {operation}: the {scheme(text)!r} store has no conditional writes in vidsift "
            "(supported: local folders, S3 with If-None-Match / If-Match); refusing rather than letting two "
            "writers both succeed (docs/storage.md)")


@contextlib.contextmanager
def _local_guard(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``.NAME.lock`` beside ``path`` for one read-compare-write. Every
    conditional write of ``path`` takes it, so they are atomic across threads (each opens its own file
    description) and processes; the kernel drops it when a holder dies, so it never goes stale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _read_local(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception (s3fs keeps botocore's ClientError as ``__cause__``)."""
    for err in (exc, exc.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            return str(code or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return None


def _s3_conditional(fs: Any, uri: str, method: str, **kwargs: Any) -> bool:
    """One conditional S3 request: True when it was applied, False when its condition failed."""
    try:
        fs.call_s3(method, **kwargs)
    except (OSError, ValueError) as exc:
        code = _s3_error_code(exc)
        if code in _S3_CONDITION_FAILED:
            return False
        if code in _S3_NOT_IMPLEMENTED:
            raise ConditionalWriteUnsupported(
                f"{uri!r}: the S3 endpoint does not implement conditional requests ({code}); refusing "
                "(docs/storage.md)") from exc
        raise
    finally:
        fs.invalidate_cache(kwargs["Bucket"] + "/" + kwargs["Key"])
    return True


def _s3_read(fs: Any, bucket: str, key: str) -> tuple[bytes | None, str | None]:
    """``(content, ETag)`` of an object from ONE GET (so the ETag is the content's); ``(None, None)``."""

    async def get() -> tuple[bytes | None, str | None]:
        try:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None, None
        try:
            return await resp["Body"].read(), resp["ETag"]
        finally:
            resp["Body"].close()

    return fsspec.asyn.sync(fs.loop, get)


def _s3_target(text: str) -> tuple[Any, str, str]:
    fs, path = filesystem(text)
    bucket, key, _ = fs.split_path(path)
    return fs, bucket, key


def create_exclusive(uri: str | os.PathLike, data: bytes) -> bool:
    """Create ``uri`` only if it does not exist; ``False`` when it already does (someone else won).

    Local: under the file's flock guard, then an atomic rename (a reader never sees it half written). S3:
    ``PUT`` with ``If-None-Match: *`` (AWS S3 since 2024, MinIO, moto). Any other store raises
    :class:`ConditionalWriteUnsupported`: fsspec's generic ``mode="create"`` is exists-then-write, which
    lets two callers both succeed.
    """
    text = os.fspath(uri)
    _require_conditional(text, "create it exclusively")
    if is_local(text):
        path = local_path(text)
        with _local_guard(path):
            if path.exists():
                return False
            _local_atomic_write(path, data, fsync=True)
        return True
    fs, bucket, key = _s3_target(text)
    return _s3_conditional(fs, text, "put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")


def compare_and_swap(uri: str | os.PathLike, expected: bytes | None, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if it holds exactly ``expected`` (None: only if it does not exist);
    ``False`` (nothing written) when it holds anything else, or changed while we looked.

    Local: read, compare and rename under the file's flock guard. S3: one GET gives the content and its
    ETag, then ``PUT`` with ``If-Match: <ETag>`` (``If-None-Match: *`` when absent): a write in between
    fails the PUT (412/409). Other stores raise :class:`ConditionalWriteUnsupported`.
    """
    text = os.fspath(uri)
    _require_conditional(text, "compare-and-swap it")
    if is_local(text):
        path = local_path(text)
        with _local_guard(path):
            if _read_local(path) != expected:
                return False
            _local_atomic_write(path, data, fsync=True)
        return True
    fs, bucket, key = _s3_target(text)
    current, etag = _s3_read(fs, bucket, key)
    if current != expected:
        return False
    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
    return _s3_conditional(fs, text, "put_object", Bucket=bucket, Key=key, Body=data, **condition)


def remove_if(uri: str | os.PathLike, expected: bytes) -> bool:
    """Delete ``uri`` only if it holds exactly ``expected`` (S3: ``DELETE`` with ``If-Match``); ``False``
    when it holds anything else or is gone."""
    text = os.fspath(uri)
    _require_conditional(text, "remove it conditionally")
    if is_local(text):
        path = local_path(text)
        with _local_guard(path):
            if _read_local(path) != expected:
                return False
            path.unlink()
        return True
    fs, bucket, key = _s3_target(text)
    current, etag = _s3_read(fs, bucket, key)
    if current != expected:
        return False
    return _s3_conditional(fs, text, "delete_object", Bucket=bucket, Key=key, IfMatch=etag)


def modified(uri: str | os.PathLike) -> float:
    """Last-modified time of a file / object (unix seconds)."""
    fs, path = filesystem(uri)
    return fs.modified(path).timestamp()


def remove(uri: str | os.PathLike, recursive: bool = False) -> None:
    """Delete a file (or a whole folder / prefix with ``recursive``); absent is fine."""
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        if recursive:
            fs.rm(path, recursive=True)
        else:
            fs.rm_file(path)


# ----------------------------------------------------------------------------------------- local cache
def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vidsift")


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cached_copy(uri: str | os.PathLike, sha256: str | None = None) -> Path:
    """A local path holding the content of ``uri``: the file itself when local, else a cached download.

    The cache key is the URI (and the expected digest); with ``sha256`` a cached or fresh copy is verified
    and a mismatch is an error naming the URI, so queries run at local speed on verified bytes.
    """
    text = os.fspath(uri)
    if is_local(text):
        path = local_path(text)
        if sha256 and sha256_file(path) != sha256:
            raise ValueError(f"{text!r}: sha256 mismatch (expected {sha256})")
        return path
    fs, path = filesystem(text)
    # The key names the object's current version (ETag, else size + mtime: one HEAD request), so an object
    # rewritten at the same URI (a retrained model.pt) is never served stale from the cache.
    info = fs.info(path)
    version = info.get("ETag") or info.get("etag") or info.get("generation") or info.get("md5Hash")
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
    version = version or f"{info.get('size')}:{modified}"
    key = hashlib.sha256(f"{text}\0{version}\0{sha256 or ''}".encode()).hexdigest()[:24]
    target = cache_dir() / key / name(text)
    if target.is_file() and (not sha256 or sha256_file(target) == sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        fs.get_file(path, tmp)
        if sha256 and sha256_file(tmp) != sha256:
            raise ValueError(f"{text!r}: downloaded copy fails its sha256 check (expected {sha256})")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target
