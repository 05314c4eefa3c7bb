"""The decoding API every stage calls: pick a backend, decode the frames shown at requested times (exact or
keyframe mode), resize; plus the full sequential decode used as the reference."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np

from pipeline.decode.backend import DecoderBackend, DecodeResult
from pipeline.decode.errors import VideoDecodeError
from pipeline.decode.frames import Size, crop_resize, rotate_frame, size_hw
from pipeline.decode.probe import VideoMeta, probe_video
from pipeline.decode.pyav import PyAVBackend
from pipeline.decode.source import Source, describe_source, normalize_source, open_av
from pipeline.decode.torchcodec import TorchCodecBackend, torchcodec_available

log = logging.getLogger(__name__)


def available_backends() -> list[str]:
    """Backends that import on this machine, preferred first."""
    return (["torchcodec"] if torchcodec_available() else []) + ["pyav"]


def get_backend(backend: str | DecoderBackend | None = None, device: str = "cpu") -> DecoderBackend:
    """Backend by name (``"torchcodec"``, ``"pyav"``), or the default (torchcodec when it imports).

    ``device="cuda"`` selects NVDEC in torchcodec when CUDA is available (CPU otherwise).
    """
    if isinstance(backend, DecoderBackend):
        return backend
    name = backend or available_backends()[0]
    if name == "torchcodec":
        if not torchcodec_available():
            raise ValueError("backend='torchcodec': torchcodec does not import here; use backend='pyav'")
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                log.info("device=%s requested but CUDA is unavailable; decoding on CPU", device)
                device = "cpu"
        return TorchCodecBackend(device=device)
    if name == "pyav":
        return PyAVBackend()
    raise ValueError(f"backend={backend!r}: expected one of {['torchcodec', 'pyav']}")


def decode(
    source: Source,
    times: Sequence[float] | np.ndarray,
    size: Size = None,
    backend: str | DecoderBackend | None = None,
    keyframe_mode: bool = False,
    meta: VideoMeta | None = None,
    device: str = "cpu",
) -> DecodeResult:
    """Decode the frames shown at ``times`` (seconds); see the module docstring. Full result object."""
    times_arr = np.asarray(times, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(times_arr)):
        raise ValueError(f"decode {describe_source(source)}: times must be finite, got {times_arr}")
    impl = get_backend(backend, device=device)
    if isinstance(source, Path):
        source = str(source)
    if len(times_arr) == 0:
        hw = size_hw(size) or (0, 0)
        return DecodeResult(np.zeros((0, *hw, 3), np.uint8), times_arr, times_arr, 0)
    try:
        if keyframe_mode:
            if meta is None:
                meta = probe_video(source, keyframes_only=True)
            result = impl.decode_keyframes(source, times_arr, meta)
        else:
            result = impl.decode_times(source, times_arr, meta)
    except av.error.FFmpegError as exc:
        raise VideoDecodeError("decode_error", f"{describe_source(source)}: {exc}") from exc
    result.frames = crop_resize(result.frames, size)
    return result


def decode_frames(
    source: Source,
    times: Sequence[float] | np.ndarray,
    size: Size = None,
    backend: str | DecoderBackend | None = None,
    meta: VideoMeta | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """uint8 ``[len(times), H, W, 3]``: for each time the frame whose presentation interval contains it."""
    return decode(source, times, size=size, backend=backend, meta=meta, device=device).frames


def decode_keyframes(
    source: Source,
    times: Sequence[float] | np.ndarray,
    size: Size = None,
    backend: str | DecoderBackend | None = None,
    meta: VideoMeta | None = None,
    device: str = "cpu",
) -> DecodeResult:
    """Keyframe mode: each time snapped to the nearest keyframe (one keyframe decode per output frame);
    ``time_error`` holds keyframe time minus requested time."""
    return decode(source, times, size=size, backend=backend, keyframe_mode=True, meta=meta, device=device)


def estimate_frames_decoded(meta: VideoMeta, times: Sequence[float] | np.ndarray) -> int:
    """Frames a forward-only decoder with keyframe seeks (ours; torchcodec's) decodes to serve ``times``."""
    key_idx = meta.keyframe_indices
    pos, total = -1, 0
    for target in np.unique(meta.frame_index_at(times)):
        kf = int(key_idx[np.searchsorted(key_idx, target, side="right") - 1])
        start = kf if (pos < 0 or kf > pos or target <= pos) else pos + 1
        total += int(target) - start + 1
        pos = int(target)
    return total


def decode_all_frames(source: Source, backend: str = "pyav") -> np.ndarray:
    """Every frame, sequentially, in presentation order (reference for tests and the full-decode baseline)."""
    src = normalize_source(source)
    if backend == "torchcodec":
        decoder = TorchCodecBackend()._decoder(src)
        return decoder.get_frames_in_range(0, len(decoder)).data.numpy()
    with open_av(src) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        frames = [(f.pts, rotate_frame(f.to_ndarray(format="rgb24"), f.rotation or 0.0))
                  for f in container.decode(stream)]
    frames.sort(key=lambda pf: -1 if pf[0] is None else pf[0])
    return np.stack([f for _, f in frames])
