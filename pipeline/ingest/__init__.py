"""Ingest raw videos into WebDataset shards with Ray: read, hash, probe, validate, transcode, write.

Plan (driver, deterministic): read the input rows, flag bad URIs and duplicate ids, sort by id, assign
sanitised keys, cut shards by count and declared bytes. Work (Ray, one task per shard): ``IngestShardStage``
writes one whole shard straight to the output URI (a folder, ``s3://``, ``gs://``... through
:mod:`runtime.storage`) -- ``shards/NNNNNN.tar`` (``{key}.mp4`` + ``{key}.json``),
``shard_errors/NNNNNN.parquet`` and, last, the index ``shards/NNNNNN.parquet`` whose metadata carries the
shard fingerprint (the shard's completion marker). Each file/object appears complete or not at all (local:
temp + rename; object stores: one complete PUT), so a killed task leaves no half shard. A rerun skips shards
whose index + tar match the plan's fingerprint and redoes the rest. Finally ``errors.parquet`` and, last,
``manifest.json`` are written and ``samples + errors == inputs`` is checked.

Modules: :mod:`~pipeline.ingest.layout` (format, schemas, config, shard URIs, listings),
:mod:`~pipeline.ingest.plan` (rows -> shards), :mod:`~pipeline.ingest.sample` (one video),
:mod:`~pipeline.ingest.tarwriter` (deterministic tar), :mod:`~pipeline.ingest.shard` (one shard task),
:mod:`~pipeline.ingest.run` (``run_ingest`` as named steps over :class:`IngestState`).
"""

from pipeline.ingest.layout import (
    CRASH_ENV,
    ERROR_SCHEMA,
    FORMAT_VERSION,
    REASONS,
    SAMPLE_SCHEMA,
    SHARD_DIGITS,
    IngestConfig,
    IngestIncompleteError,
    dumps_json,
    error_row,
    shard_name,
)
from pipeline.ingest.plan import DuplicateId, plan_inputs, plan_shards, shard_fingerprint
from pipeline.ingest.run import (
    IngestRequest,
    IngestState,
    format_summary,
    ingest,
    make_config,
    run_ingest,
)
from pipeline.ingest.sample import process_sample, read_source
from pipeline.ingest.shard import IngestShardStage, completed_shard
from pipeline.ingest.tarwriter import TarShardWriter
from pipeline.inputs import InputError

__all__ = [
    "CRASH_ENV",
    "ERROR_SCHEMA",
    "FORMAT_VERSION",
    "REASONS",
    "SAMPLE_SCHEMA",
    "SHARD_DIGITS",
    "DuplicateId",
    "IngestConfig",
    "IngestIncompleteError",
    "IngestRequest",
    "IngestShardStage",
    "IngestState",
    "InputError",
    "TarShardWriter",
    "completed_shard",
    "dumps_json",
    "error_row",
    "format_summary",
    "ingest",
    "make_config",
    "plan_inputs",
    "plan_shards",
    "process_sample",
    "read_source",
    "run_ingest",
    "shard_fingerprint",
    "shard_name",
]
