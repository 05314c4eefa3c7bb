"""End-to-end fine-tuning of retrieval encoders (CLIP4Clip, Video Swin) and SwinBERT with Ray Train: the
pieces. The driver (``TorchTrainer``, resume, export) is :func:`workflows.train.run_training`.

Modules, in the order the loop uses them:

- :mod:`~pipeline.training.config` — :class:`TrainConfig`, the recipe (YAML in ``configs/train/``).
- :mod:`~pipeline.training.inventory` — which samples of which split live in which shard; it fixes the
  number of steps of an epoch so every data-parallel worker runs the same number of steps.
- :mod:`~pipeline.training.data` — streamed, decoded, class-distinct batches of clips from the tars.
- :mod:`~pipeline.training.objectives` — :class:`RetrievalObjective` (symmetric InfoNCE over the global
  batch) and :class:`CaptionObjective` (SwinBERT's MLM loss), each one ``nn.Module`` for DDP.
- :mod:`~pipeline.training.optim` — AdamW over the model's parameter groups, warmup + cosine, AMP dtype.
- :mod:`~pipeline.training.state` — RNG states, the ``state.pt`` checkpoint file, export of ``model.pt``.
- :mod:`~pipeline.training.evaluation` — retrieval / caption metrics of a split, gathered over workers.
- :mod:`~pipeline.training.loop` — :func:`train_loop_per_worker`, the Ray Train worker, as named steps
  over a :class:`WorkerState`.
"""

from pipeline.training.config import TASKS, TrainConfig, load_train_config, with_sampling_flags
from pipeline.training.data import (
    collate,
    distinct_batches,
    eval_batches,
    iterate_samples,
    make_dataset,
    meta_key,
    train_batches,
)
from pipeline.training.evaluation import (
    embed_split,
    encode_split,
    evaluate_caption,
    evaluate_retrieval,
    summarize_metrics,
)
from pipeline.training.inventory import shard_inventory, shards_folder, shards_with, split_count
from pipeline.training.loop import WorkerState, train_loop_per_worker
from pipeline.training.objectives import CaptionObjective, RetrievalObjective, build_objective
from pipeline.training.optim import amp_dtype, build_optimizer, frozen_until, parameter_groups, warmup_cosine
from pipeline.training.state import (
    STATE_FILE,
    STATE_FORMAT,
    checkpoint_dirs,
    export_model,
    load_state_file,
    optimizer_digest,
    rng_state,
    seed_everything,
    set_rng_state,
)

__all__ = [
    "STATE_FILE",
    "STATE_FORMAT",
    "TASKS",
    "CaptionObjective",
    "RetrievalObjective",
    "TrainConfig",
    "WorkerState",
    "amp_dtype",
    "build_objective",
    "build_optimizer",
    "checkpoint_dirs",
    "collate",
    "distinct_batches",
    "embed_split",
    "encode_split",
    "eval_batches",
    "evaluate_caption",
    "evaluate_retrieval",
    "export_model",
    "frozen_until",
    "iterate_samples",
    "load_state_file",
    "load_train_config",
    "make_dataset",
    "meta_key",
    "optimizer_digest",
    "parameter_groups",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "shard_inventory",
    "shards_folder",
    "shards_with",
    "split_count",
    "summarize_metrics",
    "train_batches",
    "train_loop_per_worker",
    "warmup_cosine",
    "with_sampling_flags",
]
