"""A minimal deterministic USTAR writer for shard tars."""

from __future__ import annotations

import hashlib
import tarfile


class TarShardWriter:
    """Minimal deterministic USTAR writer: fixed mtime/uid/gid/mode, one ``write`` per header and payload
    (``tarfile.addfile`` copies in 16 KiB chunks), sha256 and size of the tar computed as it is written."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def _write(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        self.f.write(data)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        self._write(data)
        if len(data) % tarfile.BLOCKSIZE:
            self._write(tarfile.NUL * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        """End-of-archive marker (two zero blocks), padded to a whole record like tar(1) does."""
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
        remainder = (self.size + len(end)) % tarfile.RECORDSIZE
        self._write(end + (tarfile.NUL * (tarfile.RECORDSIZE - remainder) if remainder else b""))
