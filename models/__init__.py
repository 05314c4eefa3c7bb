"""vidsift encoders: Video Swin, CLIP4Clip (on open_clip), SwinBERT, and the registry that names them."""

from models.registry import (
    create_model,
    get_model_config,
    get_model_entry,
    is_vidsift_checkpoint,
    list_models,
    load_checkpoint,
    model_id_for,
    recorded_eval_sampling,
    save_checkpoint,
)

__all__ = [
    "create_model",
    "get_model_config",
    "get_model_entry",
    "is_vidsift_checkpoint",
    "list_models",
    "load_checkpoint",
    "model_id_for",
    "recorded_eval_sampling",
    "save_checkpoint",
]
