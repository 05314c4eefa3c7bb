"""Sanitised, stable, unique sample keys for WebDataset tar members.

A key may hold only ``[A-Za-z0-9_-]``: no ``/`` or ``..`` (path traversal in tar readers), no dots
(webdataset splits member names at the first dot), no control characters, no leading ``_``/``-``
(``__key__``-style names are reserved by webdataset; a leading ``-`` looks like a shell option).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

MAX_SLUG_CHARS = 64
HASH_CHARS = 10
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def id_hash(video_id: str, chars: int = HASH_CHARS) -> str:
    """Short hex digest of the original id (sha1 of its UTF-8 bytes)."""
    return hashlib.sha1(str(video_id).encode("utf-8", "surrogatepass")).hexdigest()[:chars]


def slugify(video_id: str) -> str:
    """The id folded to ASCII ``[A-Za-z0-9_-]`` (may be empty)."""
    text = unicodedata.normalize("NFKD", str(video_id)).encode("ascii", "ignore").decode("ascii")
    text = _UNSAFE.sub("_", text)
    text = re.sub(r"_+", "_", text).strip("_-")
    return text[:MAX_SLUG_CHARS].rstrip("_-")


def is_safe_key(key: str) -> bool:
    """True when ``key`` can be used verbatim as a tar member stem."""
    return bool(_SAFE_KEY.match(key)) and len(key) <= MAX_SLUG_CHARS + 1 + 2 * HASH_CHARS


def sanitize_key(video_id: str) -> str:
    """Key for one id: the id itself when already safe, else ``slug-<hash of the original id>``."""
    video_id = str(video_id)
    slug = slugify(video_id)
    if slug == video_id and is_safe_key(slug):
        return slug
    return f"{slug or 'video'}-{id_hash(video_id)}"


def assign_keys(video_ids: list[str]) -> dict[str, str]:
    """Map each (unique) id to a unique key; deterministic for the same set of ids.

    Ids are visited in sorted order; a key already taken (an unchanged id that happens to look like another
    id's ``slug-hash``) gets a longer hash until it is free, so the result does not depend on input order.
    """
    keys: dict[str, str] = {}
    taken: set[str] = set()
    for video_id in sorted(set(map(str, video_ids))):
        key = sanitize_key(video_id)
        chars = HASH_CHARS
        while key in taken:
            chars += 4
            key = f"{slugify(video_id) or 'video'}-{id_hash(video_id, chars)}"
        keys[video_id] = key
        taken.add(key)
    return keys
