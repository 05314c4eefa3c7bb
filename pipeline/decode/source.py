"""What a decoder reads: a path, bytes or a file object (``Source``), named for error messages and opened
with PyAV."""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

import av

from pipeline.decode.errors import VideoDecodeError

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


def describe_source(source: Source) -> str:
    """Short human-readable name of a source for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<file object {getattr(source, 'name', type(source).__name__)}>"


def normalize_source(source: Source) -> str | bytes | BinaryIO:
    """Path -> str; bytes-like -> bytes; seekable file object -> itself; other streams -> their bytes."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise VideoDecodeError("missing", f"{path}: no such file")
        return path
    if isinstance(source, (bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, bytes):
        if not source:
            raise VideoDecodeError("not_a_video", "empty bytes")
        return source
    if hasattr(source, "read"):
        if hasattr(source, "seekable") and source.seekable():
            return source
        return source.read()
    raise TypeError(f"video source must be a path, bytes or a file object, got {type(source).__name__}")


def open_av(source: str | bytes | BinaryIO) -> av.container.InputContainer:
    if isinstance(source, bytes):
        return av.open(io.BytesIO(source), "r")
    if hasattr(source, "seek"):
        source.seek(0)
    return av.open(source, "r")


def open_container(src: str | bytes | BinaryIO, name: str) -> av.container.InputContainer:
    """:func:`open_av`, with open failures as ``VideoDecodeError("not_a_video")`` naming the input."""
    try:
        return open_av(src)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoDecodeError("not_a_video", f"{name}: {exc}") from exc
