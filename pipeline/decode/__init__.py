"""Frame-exact sparse video decoding behind one backend interface (torchcodec, PyAV).

``decode_frames(source, times)`` returns, for every requested time, the frame whose presentation interval
``[pts_i, pts_{i+1})`` contains it (times before the first frame give the first frame, times after the last
give the last). Every backend gives the same frame for the same request; only colour conversion may differ
by a grey level or so between the libraries.

Speed comes from never decoding more than needed: requests are sorted and de-duplicated, the decoder seeks
to the keyframe before a requested frame only when that keyframe lies after the last decoded frame, and
otherwise decodes forward; nothing after the last requested frame is decoded. **Keyframe mode**
(:func:`decode_keyframes`) snaps every request to the nearest keyframe instead, so each output frame costs
exactly one keyframe decode (the keyframe packet alone, then a decoder flush), and reports the time error.

Rotation metadata is applied (frames come out upright, as torchcodec does). Resizing (``size``: int = square
side, or ``(H, W)``) centre-crops the decoded frame to the output aspect ratio and then resizes it with
antialiased bilinear interpolation; normalisation belongs to the model transform.

One module a job (``pipeline/decode/``): ``errors`` (``VideoDecodeError``), ``source`` (what is read),
``frames`` (rotation, crop + resize), ``probe`` (``VideoMeta``, ``probe_video``, ``keyframe_meta``),
``backend`` (the interface), one file a backend (``pyav``, ``torchcodec``), ``api`` (``decode`` and friends).
"""

from pipeline.decode.api import (
    available_backends,
    decode,
    decode_all_frames,
    decode_frames,
    decode_keyframes,
    estimate_frames_decoded,
    get_backend,
)
from pipeline.decode.backend import DecoderBackend, DecodeResult
from pipeline.decode.errors import (
    NotAVideoError,
    OutOfLimits,
    UnreadableVideo,
    VideoDecodeError,
    VideoDecodeFailure,
)
from pipeline.decode.frames import Size, crop_resize
from pipeline.decode.probe import VideoMeta, keyframe_meta, probe_video
from pipeline.decode.pyav import PyAVBackend
from pipeline.decode.source import Source, describe_source, normalize_source
from pipeline.decode.torchcodec import TorchCodecBackend

__all__ = [
    "DecodeResult", "DecoderBackend", "NotAVideoError", "OutOfLimits", "PyAVBackend", "Size", "Source",
    "TorchCodecBackend", "UnreadableVideo", "VideoDecodeError", "VideoDecodeFailure", "VideoMeta",
    "available_backends", "crop_resize", "decode", "decode_all_frames", "decode_frames", "decode_keyframes",
    "describe_source", "estimate_frames_decoded", "get_backend", "keyframe_meta", "normalize_source",
    "probe_video",
]  # fmt: skip
