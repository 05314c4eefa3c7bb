"""Batch embedding of shards into Parquet: the encoder stage, the workers' part writers, the incremental plan.

Data flow (wired, with every resource, in ``workflows/embed.py``): shards → skip keys that are already
embedded → :class:`DecodeShardClipsStage` (:class:`pipeline.decode_stage.DecodeClipsStage` plus the shard
column) → :class:`EncodeClipsStage` (an actor pool, GPUs when there are any) → :func:`write_shard_fragments`
(Ray tasks: each encoded block goes to storage as one fragment object per shard, and only bookkeeping rows
— shard, key, rows, error, fragment URI — travel on to the driver) → :func:`finalize_shard` (a Ray task the
driver launches once every key of a shard is accounted for: merges the shard's fragments, drops duplicate
ids left by retried tasks, writes the shard's error part and then ``part-<shard>.parquet``, one complete
object each). The driver never holds a vector.

Layout of an embeddings output ``OUT`` (every path a URI, see :mod:`runtime.storage`)::

    OUT/model_id=<id>/part-<shard>.parquet         the embedding rows: a clean Parquet dataset
    OUT/model_id=<id>/_model.json                  the model card (not Parquet; readers skip ``_`` names)
    OUT/_errors/model_id=<id>/part-<shard>.parquet error rows per shard (itself a clean dataset)
    OUT/_text/model_id=<id>/part-<shard>.parquet   caption text embeddings (``--with-text``)
    OUT/_staging/model_id=<id>/<shard>/frag-*.parquet  in-flight fragments, removed once the part exists

Error tables, text embeddings and fragments live *beside* the partition, not inside it, so that every
reader — ``pyarrow.dataset``, ``pandas.read_parquet``, ``ray.data.read_parquet``, DuckDB (whose directory
and glob readers do not skip ``_`` names) and autofaiss — gets exactly the embedding table from the
partition folder. Other code finds these files through :func:`list_parts`, :func:`read_embed_errors`,
:func:`errors_dir`, :func:`remove_shard_outputs` and :func:`read_model_card`, never by name.

A shard's part is written last and in one put, so after a crash the next run sees each shard either
complete or absent, and redoes only the absent ones: no duplicate rows, no missing rows. Rows are keyed by a
stable ``id`` (int64 hash of video id + clip index).

One module a job (``pipeline/embedding/``): ``layout`` (names, folders, schema, ids), ``plan`` (what is
left to do), ``decode`` (the decode stage), ``stages`` (the encode stage), ``windows`` (``--windows`` rows),
``parts`` (writers, readers).
"""


from pipeline.embedding.layout import (
    EMBEDDING_COLUMNS,
    ERROR_COLUMNS,
    ERROR_ROW,
    ERROR_SCHEMA,
    ERRORS_ROOT,
    LINEAGE_COLUMNS,
    MODEL_CARD,
    PART_PREFIX,
    STAGING_ROOT,
    TEXT_ROOT,
    VIDEO_ROW,
    WINDOW_CLIP_BASE,
    embedding_schema,
    errors_dir,
    iter_partition_dirs,
    list_parts,
    model_partition,
    part_uri,
    read_model_card,
    shard_label,
    stable_id,
    staging_dir,
    text_dir,
    write_model_card,
)
from pipeline.embedding.parts import (
    BOOKKEEPING_COLUMNS,
    PARTS_COLUMNS,
    clear_staging,
    encoded_table,
    finalize_shard,
    fragment_schema,
    merge_fragments,
    read_embed_errors,
    read_embeddings,
    remove_shard_outputs,
    write_shard_fragments,
)
from pipeline.embedding.plan import (
    ShardWork,
    add_shard_and_skip_done,
    existing_video_ids,
    plan_shards,
    shard_durations,
    shard_index_uri,
    shard_keys,
)
from runtime.lazy import exports_on_first_use

# The encode stage imports torch and the model registry, the decode stages PyAV: seconds of CPU in every
# process that imports this package. Ray's workers for the light tasks (write fragments, finalize a shard's
# part) import it for their functions, and a node's restarted tasks start many workers at once (measured:
# ~20 finalize workers on a 2-core node took ~45 s to start). So the stages load on first use (PEP 562),
# and ``import pipeline.embedding.parts`` costs pyarrow, not torch.
_ON_FIRST_USE = {
    "DecodeShardClipsStage": "decode",
    "EncodeClipsStage": "stages",
    "WINDOW_DECODE_GROUP": "windows",
    "DecodeWindowsStage": "windows",
    "plan_windows": "windows",
    "window_clip_plan": "windows",
    "window_span": "windows",
}
__getattr__ = exports_on_first_use(__name__, _ON_FIRST_USE, globals())

__all__ = [
    "BOOKKEEPING_COLUMNS",
    "DecodeShardClipsStage",
    "DecodeWindowsStage",
    "EMBEDDING_COLUMNS",
    "ERRORS_ROOT",
    "LINEAGE_COLUMNS",
    "ERROR_COLUMNS",
    "ERROR_ROW",
    "ERROR_SCHEMA",
    "EncodeClipsStage",
    "MODEL_CARD",
    "PARTS_COLUMNS",
    "PART_PREFIX",
    "STAGING_ROOT",
    "ShardWork",
    "TEXT_ROOT",
    "VIDEO_ROW",
    "WINDOW_CLIP_BASE",
    "WINDOW_DECODE_GROUP",
    "add_shard_and_skip_done",
    "clear_staging",
    "embedding_schema",
    "encoded_table",
    "errors_dir",
    "existing_video_ids",
    "finalize_shard",
    "fragment_schema",
    "iter_partition_dirs",
    "list_parts",
    "merge_fragments",
    "model_partition",
    "part_uri",
    "plan_shards",
    "plan_windows",
    "read_embed_errors",
    "read_embeddings",
    "read_model_card",
    "remove_shard_outputs",
    "shard_durations",
    "shard_index_uri",
    "shard_keys",
    "shard_label",
    "stable_id",
    "staging_dir",
    "text_dir",
    "window_clip_plan",
    "window_span",
    "write_model_card",
    "write_shard_fragments",
]
