"""The seam between the index and the search service: what the service asks for hits.

Two implementations answer it: :class:`index.query.VideoIndex` (one process, every shard memory-mapped) and
the fan-out searcher on Ray Serve (shard deployments plus a merge of their top k, ``workflows/serve/``).
The service's request path (caps, the bounded pool, the deadline: ``workflows/serve/``) wraps whichever it
has; it never looks inside. docs/architecture.md, "Seams", records who owns which side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass
class RankedResult:
    """One ranking per query vector, best first.

    ``partial`` is True when some shards did not answer within the deadline (or failed): the hits are then
    the best of the shards that did, and ``missing_shards`` names the others. A one-process searcher is
    never partial.
    """

    hits: list[list[Any]]  # index.query.Hit (not imported: index.query implements this seam)
    partial: bool = False
    missing_shards: tuple[str, ...] = ()


@runtime_checkable
class Searcher(Protocol):
    """What the service searches: an opened index version, whatever holds its shards."""

    @property
    def version(self) -> str: ...

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32 query vectors from the index's own text encoder."""

    def rank(self, vectors: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
             timeout_s: float | None = None) -> RankedResult:
        """The top ``k`` videos for each row of ``vectors`` (``[Q, dim]``), ranked only among the rows whose
        FAISS id is in ``allowed_ids`` when given; shards that have not answered after ``timeout_s`` are left
        out and reported (``RankedResult.partial``)."""
