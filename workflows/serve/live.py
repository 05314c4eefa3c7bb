"""The index a service answers from, swapped live when a new version is published.

A background thread reads the index's ``CURRENT`` pointer every ``poll_s`` seconds. When it names a new
version, that version is opened, checked (dims, count, one real query) and given its catalog, all off the
request path; then the single ``LiveIndex.current`` reference is replaced. A request reads that reference
once and uses that :class:`Snapshot` to the end, so a swap never fails or mixes a request, and every
response names the version that answered it. A version that fails its checks is logged, never served, and
retried only after ``retry_s``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import models
from index import store
from index.query import VideoIndex
from runtime.periodic import PeriodicThread
from workflows.serve.catalog import Catalog, build_catalog

log = logging.getLogger(__name__)
VALIDATION_QUERY = "a video"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One loaded, validated index version and its catalog."""

    index: VideoIndex
    catalog: Catalog
    version: str
    loaded_at: float

    def info(self) -> dict[str, Any]:
        meta = self.index.meta
        return {"version": self.version, "count": len(self.index), "videos": len(self.catalog),
                "dim": self.index.dim, "model_id": self.index.model_id, "model_name": meta.get("model_name"),
                "factory": meta.get("factory"), "loaded_at": self.loaded_at,
                "filter_columns": dict(sorted(self.catalog.kinds.items())),
                "previews": bool(self.catalog.sources)}


class SnapshotLoader:
    """Opens and validates index versions; keeps the text encoder across versions of the same model."""

    def __init__(self, root: str, pretrained: str | None = None, allow_random_init: bool = False,
                 shards: Sequence[str] = (), captions: Sequence[str] = ()):
        self.root, self.pretrained, self.allow_random_init = root, pretrained, allow_random_init
        self.shards, self.captions = list(shards), list(captions)
        self._encoder = None

    def load(self, version: str | None = None) -> Snapshot:
        """Open ``version`` (CURRENT when None) with the encoder, check that it answers, build its catalog."""
        index = self.open_index(version, self._encoder_for(version))
        if len(index) == 0:
            raise store.CorruptIndexError(f"index version {index.version!r} is empty")
        vector = index.encode_text([VALIDATION_QUERY])
        if vector.shape != (1, index.dim) or not np.isfinite(vector).all():
            raise store.CorruptIndexError(
                f"index version {index.version!r}: the text encoder gives {vector.shape}, "
                f"index dim {index.dim}")
        if not index.search(vector[0], k=1):
            raise store.CorruptIndexError(f"index version {index.version!r}: no hit for a probe query")
        catalog = build_catalog(store.read_ids(index.version_dir, index.meta), self.shards, self.captions)
        return Snapshot(index, catalog, index.version, time.time())

    def open_index(self, version: str | None, encoder) -> VideoIndex:
        """The searcher of ``version`` (a one-process ``VideoIndex``; the fan-out loader overrides it)."""
        return VideoIndex.open(self.root, version=version, encoder=encoder, pretrained=self.pretrained,
                               allow_random_init=self.allow_random_init)

    def _encoder_for(self, version: str | None):
        """The encoder of the last version when the new one records the same model, else a new one."""
        meta = store.read_meta(store.version_dir(self.root, version))
        name = meta.get("model_name")
        if not name:
            raise ValueError(f"index {self.root!r} records no model_name: a text search service needs one")
        if self._encoder is not None and getattr(self._encoder, "model_id", None) == meta.get("model_id"):
            return self._encoder
        encoder, _transform, _tokenizer = models.create_inference_model(
            name, pretrained=self.pretrained or meta.get("pretrained"),
            allow_random_init=self.allow_random_init, seed=0)
        encoder.eval()
        self._encoder = encoder
        return encoder


class LiveIndex:
    """The current :class:`Snapshot`, replaced atomically by a polling thread when CURRENT moves."""

    def __init__(self, root: str, load: Callable[[str | None], Snapshot], poll_s: float = 5.0,
                 retry_s: float = 60.0):
        self.root, self._load, self.poll_s, self.retry_s = root, load, float(poll_s), float(retry_s)
        self.current: Snapshot = load(None)
        self.swaps = 0
        self.last_error: str | None = None
        self._failed: dict[str, float] = {}  # version → when it failed its checks
        self._poller = PeriodicThread(self._poll_once, self.poll_s, "vidsift-index-poll")

    def check_now(self) -> bool:
        """Load the version CURRENT names if it is new; True when a swap happened."""
        version = store.read_current(self.root)
        if version == self.current.version:
            return False
        if time.time() - self._failed.get(version, -float("inf")) < self.retry_s:
            return False
        try:
            snapshot = self._load(version)
        except Exception as exc:  # noqa: BLE001 — any failure keeps the old version serving
            self._failed[version] = time.time()
            self.last_error = f"version {version!r} not served: {type(exc).__name__}: {exc}"
            log.error("%s", self.last_error)
            return False
        self.current = snapshot  # the swap: one reference assignment, atomic under the GIL
        self.swaps += 1
        log.warning("now serving index version %s (%d vectors)", snapshot.version, len(snapshot.index))
        return True

    def start(self) -> LiveIndex:
        if self.poll_s > 0:
            self._poller.start()
        return self

    def stop(self) -> None:
        self._poller.stop()

    def _poll_once(self) -> None:
        try:
            self.check_now()
        except Exception as exc:  # noqa: BLE001 — a store hiccup must not end the poller
            self.last_error = f"reading CURRENT failed: {type(exc).__name__}: {exc}"
            log.error("%s", self.last_error)

    def status(self) -> dict[str, Any]:
        return {**self.current.info(), "swaps": self.swaps, "poll_s": self.poll_s,
                "last_error": self.last_error}
