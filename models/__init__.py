"""vidsift encoders: Video Swin, CLIP4Clip (on open_clip), SwinBERT, and the registry that names them."""

from models.registry import (
    create_model,
    get_model_config,
    list_models,
    load_checkpoint,
    model_id_for,
    register_model,
    save_checkpoint,
)

__all__ = [
    "create_model",
    "get_model_config",
    "list_models",
    "load_checkpoint",
    "model_id_for",
    "register_model",
    "save_checkpoint",
]
