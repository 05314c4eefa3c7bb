"""The index a service answers from, swapped live when a new version is published.

A background thread reads the index's ``CURRENT`` pointer every ``poll_s`` seconds. When it names a new
version, that version is opened, checked (dims, count, one real query) and given its catalog, all off the
request path; then the single ``LiveIndex.current`` reference is replaced. A request reads that reference
once and uses that :class:`Snapshot` to the end, so a swap never fails or mixes a request, and every
response names the version that answered it. A version that fails its checks is logged, never served, and
retried only after ``retry_s``; one built by another model than the service's ``--pretrained`` checkpoint is
refused once and never retried (no weights are reloaded for it). While the newest published version is not
served, :meth:`LiveIndex.health` says ``degraded`` and why; a later version that loads clears it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from index import store
from index.query import VideoIndex
from index.searcher import Searcher
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
    ranker: Searcher | None = None  # another searcher over this version (a fan-out over shard replicas)

    @property
    def searcher(self) -> Searcher:
        """What the request path ranks with (:mod:`index.searcher`): ``ranker`` when set, else this
        process's ``VideoIndex``."""
        return self.index if self.ranker is None else self.ranker

    def info(self) -> dict[str, Any]:
        meta = self.index.meta
        return {"version": self.version, "count": len(self.index), "videos": len(self.catalog),
                "dim": self.index.dim, "model_id": self.index.model_id, "model_name": meta.get("model_name"),
                "factory": meta.get("factory"), "loaded_at": self.loaded_at,
                "filter_columns": dict(sorted(self.catalog.kinds.items())),
                "previews": bool(self.catalog.sources), "previews_note": self.catalog.previews_note,
                "shards_from": self.catalog.shards_from, "captions_from": self.catalog.captions_from,
                "captions_note": self.catalog.captions_note}


class ModelMismatch(ValueError):
    """A version built by another model than the service's ``--pretrained`` checkpoint: never servable by
    this process, so it is refused once, not retried."""


class SnapshotLoader:
    """Opens and validates index versions; keeps the text encoder across versions of the same model."""

    def __init__(self, root: str, pretrained: str | None = None, allow_random_init: bool = False,
                 shards: Sequence[str] = (), captions: Sequence[str] = (), expose_sources: bool = False):
        self.root, self.pretrained, self.allow_random_init = root, pretrained, allow_random_init
        self.shards, self.captions, self.expose_sources = list(shards), list(captions), bool(expose_sources)
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
        meta = {**index.meta, "version": index.version}  # the catalog finds the shards through its lineage
        catalog = build_catalog(store.read_ids(index.version_dir, index.meta), self.shards, self.captions,
                                expose_sources=self.expose_sources, meta=meta, index_root=self.root)
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
        loaded = getattr(self._encoder, "model_id", None)
        if self._encoder is not None and loaded == meta.get("model_id"):
            return self._encoder
        if self._encoder is not None and self.pretrained:
            # --pretrained pins the weights: reloading them cannot give another model_id
            raise ModelMismatch(
                f"index version {version or 'CURRENT'!r} was built by model {meta.get('model_id')!r}, but "
                f"this service's --pretrained {self.pretrained!r} is model {loaded!r}: refused (restart the "
                "service with that model's checkpoint, or without --pretrained, to serve it)")
        import models  # here, not at the top: shard replicas import this module and never load an encoder

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
        self.last_error: str | None = None  # why the newest version is not served; None when it is
        self.newest: str = self.current.version  # what CURRENT named at the last check
        self._failed: dict[str, _Failure] = {}
        self._poller = PeriodicThread(self._poll_once, self.poll_s, "vidsift-index-poll")

    def check_now(self) -> bool:
        """Load the version CURRENT names if it is new; True when a swap happened."""
        version = store.read_current(self.root)
        self.newest = version
        if version == self.current.version:
            self.last_error = None  # CURRENT names what is served (again): nothing is wrong
            return False
        failed = self._failed.get(version)
        if failed is not None and (failed.permanent or time.time() - failed.at < self.retry_s):
            self.last_error = failed.error
            return False
        try:
            snapshot = self._load(version)
        except Exception as exc:  # noqa: BLE001 — any failure keeps the old version serving
            permanent = isinstance(exc, ModelMismatch)
            reason = str(exc) if permanent else f"{type(exc).__name__}: {exc}"
            self.last_error = f"version {version!r} not served: {reason}"
            self._failed[version] = _Failure(time.time(), self.last_error, permanent)
            log.error("%s", self.last_error)
            return False
        self.current = snapshot  # the swap: one reference assignment, atomic under the GIL
        self.swaps += 1
        self.last_error = None
        self._failed.pop(version, None)
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

    def health(self) -> dict[str, Any]:
        """``ok`` while the newest published version is served (or still loading); ``degraded``, with the
        reason, while it failed to load or CURRENT cannot be read (the old version still answers), or while
        shard tars the served version's lineage records cannot be read (searches answer, those videos have
        no previews)."""
        error, serving = self.last_error or self.current.catalog.degraded, self.current.version
        body = {"status": "ok" if error is None else "degraded", "ok": error is None, "version": serving,
                "newest": self.newest}
        if error is not None:
            body["reason"] = error
        return body

    def status(self) -> dict[str, Any]:
        return {**self.current.info(), "swaps": self.swaps, "poll_s": self.poll_s, "newest": self.newest,
                "last_error": self.last_error}


@dataclasses.dataclass(frozen=True)
class _Failure:
    at: float  # time.time() of the failed load
    error: str
    permanent: bool  # never retried (ModelMismatch)
