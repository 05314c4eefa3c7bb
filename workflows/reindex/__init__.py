"""Nightly incremental reindex of a video source: delta detection, a run lock, and idempotent steps.

A composition layer: it wires ingest (``pipeline.ingest``), embed (``workflows.embed``) and the FAISS index
(``index``). Modules: ``config`` (DEFAULT_CONFIG, load_config, errors), ``workdir`` (layout, state file,
atomic JSON), ``lock`` (RunLock), ``scan`` (read + hash the source), ``delta`` (what changed, the delta's
ingest manifest), ``tables`` (embedding rows, index version copies), ``validate`` (the scratch index vs the
live rows) and ``run`` (:func:`run_reindex`: the steps over a :class:`ReindexRun`).
"""

from workflows.reindex.config import (
    DEFAULT_CONFIG,
    ReindexError,
    ReindexInputError,
    check_pretrained,
    load_config,
    merge_config,
)
from workflows.reindex.delta import Delta, compute_delta
from workflows.reindex.lock import LockHeldError, LockLostError, RunLock
from workflows.reindex.run import (
    CRASH_ENV,
    STEPS,
    ReindexRun,
    SimulatedCrash,
    execute,
    prepare_run,
    run_reindex,
)
from workflows.reindex.scan import file_signature, hash_file, scan_source
from workflows.reindex.tables import collect_rows
from workflows.reindex.validate import validate_index
from workflows.reindex.workdir import Workdir

__all__ = [
    "CRASH_ENV",
    "DEFAULT_CONFIG",
    "STEPS",
    "Delta",
    "LockHeldError",
    "LockLostError",
    "ReindexError",
    "ReindexInputError",
    "ReindexRun",
    "RunLock",
    "SimulatedCrash",
    "check_pretrained",
    "Workdir",
    "collect_rows",
    "compute_delta",
    "execute",
    "file_signature",
    "hash_file",
    "load_config",
    "merge_config",
    "prepare_run",
    "run_reindex",
    "scan_source",
    "validate_index",
]
