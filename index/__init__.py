"""FAISS indexes over vidsift embeddings: auto-selected, tuned, versioned, incremental, sharded.

``from index import VideoIndex; VideoIndex.open(DIR).search("a red ball", k=10)``.
"""

from index.build import add_embeddings, build_index, needs_retrain
from index.factory import choose_factory, make_index
from index.query import Hit, VideoIndex
from index.store import CorruptIndexError, IndexNotFoundError
from index.tombstones import compact_index, delete_videos

__all__ = [
    "CorruptIndexError",
    "Hit",
    "IndexNotFoundError",
    "VideoIndex",
    "add_embeddings",
    "build_index",
    "choose_factory",
    "compact_index",
    "delete_videos",
    "make_index",
    "needs_retrain",
]
