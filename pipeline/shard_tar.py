"""Shard tars on any store (through :mod:`runtime.storage`): the list of a run's complete shards, one
member's bytes, the member names, and the open streams webdataset's tar reader consumes. The one place that
lists and opens shard tars (no torch here: the service's shard replicas and light Ray tasks import it)."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from runtime import storage
from runtime.errors import UnreadableInput

log = logging.getLogger(__name__)

# What reading a shard tar raises on bad data (webdataset passes it to the dataset's handler).
TAR_FAILURES = (tarfile.TarError, OSError, EOFError, ValueError)


class BadTar(UnreadableInput):
    """A shard tar (or a member of it) that cannot be read; reason ``bad_tar``."""

    reason = "bad_tar"


class MissingMember(BadTar):
    """The tar has no member of that name, or the member is not a regular file; reason ``missing_member``."""

    reason = "missing_member"


class MemberTooLarge(BadTar):
    """The member is larger than the caller reads whole; reason ``too_large``."""

    reason = "too_large"


def read_tar_member(tar_uri: str | os.PathLike, name: str, max_bytes: int | None = None) -> bytes:
    """The bytes of member ``name`` of a shard tar; :class:`MissingMember` naming the tar when it is not
    there (or is not a file), :class:`MemberTooLarge` before reading one over ``max_bytes``."""
    with storage.open_input(tar_uri) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        try:
            member = tar.extractfile(name)
        except KeyError:
            raise MissingMember(f"{os.fspath(tar_uri)} has no member {name!r}") from None
        if member is None:
            raise MissingMember(f"{os.fspath(tar_uri)}: {name!r} is not a file")
        size = tar.getmember(name).size
        if max_bytes is not None and size > max_bytes:
            raise MemberTooLarge(f"{os.fspath(tar_uri)}: {name!r} is {size:,} bytes")
        return member.read()


def tar_member_names(tar_uri: str | os.PathLike) -> Iterator[str]:
    """Every member name of a shard tar in tar order, streamed (no member is read into memory)."""
    with storage.open_input(tar_uri) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for member in tar:
            yield member.name


def open_shard_streams(
    sources: Iterable[str | Mapping[str, Any]],
    handler: Callable[[Exception], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """``{"url", "stream"}`` for each shard URI (or ``{"url": ...}`` dict), opened through
    :mod:`runtime.storage`, for webdataset's ``tar_file_expander``: it reads tars on any store (webdataset's
    own opener knows local files, ``pipe:`` and http only). Each stream is closed when the next is asked
    for. A shard that cannot be opened goes to ``handler`` (True: skip it; False: stop); without one it
    raises. Usable as a stage: ``wds.DataPipeline(wds.SimpleShardList(urls), open_shard_streams,
    tar_file_expander, group_by_keys)``."""
    for source in sources:
        url = os.fspath(source["url"] if isinstance(source, Mapping) else source)
        with contextlib.ExitStack() as stack:
            try:
                stream = stack.enter_context(storage.open_input(url))
            except Exception as exn:  # what the handler does with it is its call (webdataset's contract)
                exn.args = exn.args + (url,)
                if handler is None:
                    raise
                if handler(exn):
                    continue
                return
            yield {"url": url, "stream": stream}


def list_shards(shards: str | os.PathLike | Sequence[str]) -> list[str]:
    """Shard tar paths/URIs from a list, a ``{000000..000009}`` brace pattern, a glob, or a folder (its
    ``shards/*.tar`` when present, else ``*.tar``), on any store. Sorted, so every consumer sees the same
    list. In a folder of ingest shards only tars with their index (``NNNNNN.parquet``, written last: the
    shard's completion marker) count; a tar without one is a shard still being (re)written."""
    if isinstance(shards, (list, tuple)):
        out = [os.fspath(s) for s in shards]
    else:
        spec = os.fspath(shards)
        fs, path = storage.filesystem(spec)
        if "{" not in spec and not any(ch in spec for ch in "*?[") and fs.isdir(path):
            out = _folder_shards(spec)
        elif "{" in spec:
            import braceexpand  # why: only brace patterns need it

            out = list(braceexpand.braceexpand(spec))
        elif storage.is_local(spec):
            out = sorted(glob.glob(spec))
        else:
            out = sorted(fs.unstrip_protocol(p) for p in fs.glob(path))
    if not out:
        raise FileNotFoundError(f"no shard tars found for {shards!r}")
    return out


def _folder_shards(folder: str) -> list[str]:
    """The tars of an ingest output (``shards/``) or of a folder of tars, complete shards only."""
    sub = storage.join(folder, "shards")
    tars = storage.list_files(sub, ".tar")
    if tars:
        folder = sub
    else:
        tars = storage.list_files(folder, ".tar")
    markers = {storage.name(u) for u in storage.list_files(folder, ".parquet")}
    if not markers:  # a hand-made folder of tars: no index files at all
        return tars
    complete = [t for t in tars if storage.name(t)[: -len(".tar")] + ".parquet" in markers]
    if len(complete) < len(tars):
        log.warning("%s: %d shard tar(s) without their index (incomplete) left out",
                    folder, len(tars) - len(complete))
    return complete
