"""Shard tars on any store (through :mod:`runtime.storage`): one member's bytes, the member names, and the
open streams webdataset's tar reader consumes. The one place that opens a shard tar."""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from runtime import storage
from runtime.errors import UnreadableInput

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
