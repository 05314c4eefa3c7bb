"""Encoding frames to bit-exact H.264 mp4, and telling a finished file of a spec from a stale one."""

from __future__ import annotations

import hashlib
import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from synthetic.spec import RenderConfig

# Bump when rendering or encoding changes: it is part of every video's digest, so old files get rebuilt.
GENERATOR_VERSION = 7


# ---------------------------------------------------------------------------------------------------------
# Encoding and validation.
# ---------------------------------------------------------------------------------------------------------
def video_digest(spec: dict[str, Any], cfg: RenderConfig) -> str:
    """Identity of a rendered file: stored in the mp4 comment tag so reruns can tell stale files."""
    payload = {
        "version": GENERATOR_VERSION,
        "spec": spec,
        "size": cfg.size,
        "fps": str(cfg.fps),
        "gop": cfg.gop,
        "seed": cfg.seed,
        "profile": cfg.profile,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def rgb_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[T, H, W, 3]`` -> planar yuv420p ``[T, H*3/2, W]`` (BT.601 limited range, 2x2 chroma mean).

    Integer BT.601 arithmetic in numpy rather than swscale inside the encoder: swscale's rgb24 -> yuv420p
    path gave different bytes for the same input on repeated calls, which broke bit-exact regeneration.
    """
    r, g, b = (frames[..., c].astype(np.int32) for c in range(3))
    t, h, w = r.shape
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    # Chroma from the sum of each 2x2 block (the transform is linear, so this is the mean of U and V).
    rs, gs, bs = (
        q[:, 0::2, 0::2] + q[:, 1::2, 0::2] + q[:, 0::2, 1::2] + q[:, 1::2, 1::2] for q in (r, g, b)
    )
    u = ((-38 * rs - 74 * gs + 112 * bs + 512) >> 10) + 128
    v = ((112 * rs - 94 * gs - 18 * bs + 512) >> 10) + 128
    # Planes back to back (Y, then U, then V), the layout PyAV expects for a [H*3/2, W] yuv420p array.
    luma, chroma = h * w, (h // 2) * (w // 2)
    flat = np.empty((t, luma + 2 * chroma), dtype=np.uint8)
    flat[:, :luma] = y.reshape(t, luma)  # always within [16, 235]: no clipping needed
    flat[:, luma : luma + chroma] = u.reshape(t, chroma)  # within [16, 240]
    flat[:, luma + chroma :] = v.reshape(t, chroma)
    return flat.reshape(t, h * 3 // 2, w)


def encode_mp4(frames: np.ndarray, path: Path, fps: Fraction, gop: int, comment: str = "") -> None:
    """Encode RGB frames [T, H, W, 3] (H, W even) to H.264/yuv420p mp4 at ``path`` (temp file + rename)."""
    import av

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            if comment:
                container.metadata["comment"] = comment
            stream = container.add_stream("libx264", rate=fps)
            stream.width = frames.shape[2]
            stream.height = frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {
                "preset": "veryfast",
                "crf": "20",
                "g": str(gop),
                "keyint_min": str(gop),
                "sc_threshold": "0",  # no scene-cut keyframes: keyframes exactly every `gop` frames
                "threads": "1",  # single-threaded x264 is bit-exact across runs; parallelism is per video
                # mbtree=0: with macroblock-tree rate control x264 gave different bytes for the same input on
                # rare repeated encodes; without it, 800 repeated encodes were bit-identical.
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:mbtree=0",
            }
            for i, planes in enumerate(rgb_to_yuv420p(frames)):
                frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_valid_video(path: Path, digest: str, num_frames: int, size: int) -> bool:
    """True if ``path`` is a finished mp4 of this exact spec (digest tag, frame count, size)."""
    import av

    if not Path(path).is_file():
        return False
    try:
        with av.open(str(path)) as container:
            if container.metadata.get("comment") != digest or not container.streams.video:
                return False
            stream = container.streams.video[0]
            shape = (stream.frames, stream.codec_context.width, stream.codec_context.height)
            if shape != (num_frames, size, size):
                return False
            # The moov box sits at the front (faststart), so a truncated file still "opens": demux every
            # packet (cheap, no decoding) to be sure all the frame data is there.
            packets = sum(1 for packet in container.demux(stream) if packet.size)
            return packets == num_frames
    except (av.error.FFmpegError, OSError):
        return False
