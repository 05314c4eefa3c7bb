"""vidsift encoders: Video Swin, CLIP4Clip (on open_clip), SwinBERT, the VidSwin dual encoder.

Every variant is a JSON file under ``models/configs/`` (:mod:`models.registry`); :func:`create_model`
(:mod:`models.factory`) builds one; :class:`RetrievalModel` (:mod:`models.base`) is the contract of the
retrieval families; :mod:`models.checkpoint` is the one checkpoint format.
"""

from models.base import RetrievalModel
from models.checkpoint import (
    is_vidsift_checkpoint,
    load_checkpoint,
    model_id_for,
    recorded_eval_sampling,
    save_checkpoint,
)
from models.factory import (
    MissingWeightsError,
    RandomInitWarning,
    create_inference_model,
    create_model,
)
from models.pretrained import PretrainedWeightsError, resolve_weights
from models.registry import get_model_config, get_model_entry, list_models
from models.transforms import VideoTransform

__all__ = [
    "MissingWeightsError",
    "PretrainedWeightsError",
    "RandomInitWarning",
    "create_inference_model",
    "RetrievalModel",
    "VideoTransform",
    "create_model",
    "get_model_config",
    "get_model_entry",
    "is_vidsift_checkpoint",
    "list_models",
    "load_checkpoint",
    "model_id_for",
    "recorded_eval_sampling",
    "resolve_weights",
    "save_checkpoint",
]
