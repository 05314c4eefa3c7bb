"""The backend interface every decoding library implements, and its result."""

from __future__ import annotations

import abc
import dataclasses

import numpy as np

from pipeline.decode.probe import VideoMeta


@dataclasses.dataclass
class DecodeResult:
    """``frames`` uint8 ``[K, H, W, 3]``; ``frame_times`` pts (s) of the frame returned for each request;
    ``time_error`` = frame_times - requested (0 in exact mode up to the frame interval);
    ``frames_decoded``: frames the decoder produced (-1 when the backend cannot tell)."""

    frames: np.ndarray
    frame_times: np.ndarray
    time_error: np.ndarray
    frames_decoded: int = -1


class DecoderBackend(abc.ABC):
    """One decoding library: exact-mode and keyframe-mode decoding of requested times."""

    name = "base"

    @abc.abstractmethod
    def decode_times(self, source, times: np.ndarray, meta: VideoMeta | None) -> DecodeResult:
        """Exact mode: for each time, the frame whose presentation interval contains it."""

    @abc.abstractmethod
    def decode_keyframes(self, source, times: np.ndarray, meta: VideoMeta) -> DecodeResult:
        """Keyframe mode: each time snapped to the nearest keyframe, with the time error."""


def nearest_keyframe_indices(meta: VideoMeta, times: np.ndarray) -> np.ndarray:
    kt = meta.keyframe_times
    times = np.asarray(times, dtype=np.float64)
    right = np.clip(np.searchsorted(kt, times), 0, len(kt) - 1)
    left = np.clip(right - 1, 0, len(kt) - 1)
    pick = np.where(np.abs(kt[left] - times) <= np.abs(kt[right] - times), left, right)
    return meta.keyframe_indices[pick]
