"""The PyAV backend (libav* through Cython): seeks by pts with our own keyframe bookkeeping; also the keyframe
fast path (one packet + flush) that the torchcodec backend uses on CPU."""

from __future__ import annotations

import av
import numpy as np

from pipeline.decode.backend import DecoderBackend, DecodeResult, nearest_keyframe_indices
from pipeline.decode.errors import VideoDecodeError
from pipeline.decode.frames import rotate_frame
from pipeline.decode.probe import VideoMeta, probe_video
from pipeline.decode.source import describe_source, normalize_source, open_container


class PyAVBackend(DecoderBackend):
    """PyAV (libav* through Cython): seeks by pts with our own keyframe bookkeeping."""

    name = "pyav"

    def __init__(self, thread_type: str = "SLICE"):
        self.thread_type = thread_type

    def decode_times(self, source, times: np.ndarray, meta: VideoMeta | None) -> DecodeResult:
        if meta is None or meta.keyframes_only:
            meta = probe_video(source)
        idx = meta.frame_index_at(times)
        frames, decoded = self.decode_indices(source, np.unique(idx), meta)
        lookup = {int(i): f for i, f in zip(np.unique(idx), frames)}
        out = np.stack([lookup[int(i)] for i in idx]) if len(idx) else np.zeros((0, 1, 1, 3), np.uint8)
        ft = meta.frame_times[idx]
        return DecodeResult(out, ft, np.zeros(len(idx)), decoded)

    def decode_keyframes(self, source, times: np.ndarray, meta: VideoMeta) -> DecodeResult:
        kidx = nearest_keyframe_indices(meta, times)
        uniq = np.unique(kidx)
        try:
            frames = decode_keyframe_packets(source, meta, uniq)
        except av.error.FFmpegError:
            frames = None
        if frames is not None:
            decoded = len(uniq)
        else:
            frames, decoded = self.decode_indices(source, uniq, meta, keyframes_only=True)
        lookup = {int(i): f for i, f in zip(uniq, frames)}
        out = np.stack([lookup[int(i)] for i in kidx])
        ft = meta.frame_times[kidx]
        return DecodeResult(out, ft, ft - np.asarray(times, dtype=np.float64), decoded)

    def _open(self, src, name: str, keyframes_only: bool):
        container = open_container(src, name)
        stream = container.streams.video[0]
        stream.thread_type = self.thread_type
        if keyframes_only:
            # The decoder drops non-key frames itself: after a seek the first output is the keyframe.
            # (Demuxer-level discard would be cheaper, but the mp4 demuxer then mis-times B-frame streams.)
            stream.codec_context.skip_frame = "NONKEY"
        return container, stream

    def decode_indices(
        self, source, indices: np.ndarray, meta: VideoMeta, keyframes_only: bool = False
    ) -> tuple[list[np.ndarray], int]:
        """Decode the frames at sorted unique ``indices``; returns (frames, number of frames decoded)."""
        src = normalize_source(source)
        name = describe_source(source)
        key_idx = meta.keyframe_indices
        pts_to_index = {int(p): i for i, p in enumerate(meta.pts)} if meta.has_timestamps else None
        out: list[np.ndarray] = []
        decoded = 0
        seekable = meta.has_timestamps
        container = stream = None
        try:
            frames_iter = None
            pos = -1  # index of the last frame taken from frames_iter
            seq_count = -1  # frames seen since (re)opening, for streams without timestamps
            for target in indices:
                target = int(target)
                kf = int(key_idx[np.searchsorted(key_idx, target, side="right") - 1])
                if container is None or (not seekable and target <= pos):
                    if container is not None:
                        container.close()
                    container, stream = self._open(src, name, keyframes_only)
                    frames_iter = _iter_frames(container, stream)
                    pos, seq_count = -1, -1
                if seekable and (kf > pos or target <= pos):
                    try:
                        container.seek(int(meta.pts[kf]), stream=stream, backward=True, any_frame=False)
                        frames_iter = _iter_frames(container, stream)
                    except av.error.FFmpegError:
                        # e.g. a stream without an index: decode from the start instead
                        seekable = False
                        container.close()
                        container, stream = self._open(src, name, keyframes_only)
                        frames_iter = _iter_frames(container, stream)
                        pos, seq_count = -1, -1
                frame = None
                for vf in frames_iter:
                    decoded += 1
                    seq_count += 1
                    if pts_to_index is not None and vf.pts is not None:
                        cur = pts_to_index.get(int(vf.pts))
                        if cur is None:
                            continue  # a frame outside the probed stream (should not happen)
                    else:
                        cur = seq_count
                    pos = cur
                    if cur >= target:
                        frame = vf
                        break
                if frame is None:
                    raise VideoDecodeError(
                        "decode_error", f"{name}: frame {target} (t={meta.frame_times[target]:.3f}s) missing"
                    )
                if pos != target and not keyframes_only:
                    raise VideoDecodeError(
                        "decode_error", f"{name}: decoder skipped frame {target}, landed on {pos}"
                    )
                out.append(rotate_frame(frame.to_ndarray(format="rgb24"), frame.rotation or 0.0))
        finally:
            if container is not None:
                container.close()
        return out, decoded


def _iter_frames(container, stream):
    try:
        for packet in container.demux(stream):
            yield from packet.decode()
    except av.error.InvalidDataError:
        return


def decode_keyframe_packets(source, meta: VideoMeta, kidx: np.ndarray) -> list[np.ndarray] | None:
    """One decoded picture per sorted unique keyframe index: seek to its pts, send that single packet and
    flush the decoder, so the keyframe comes out at once. Waiting for the next packets instead (what a
    decode-until-pts loop does) costs the B-frame reorder delay -- 2-4 more frames per keyframe -- and
    with ``skip_frame=NONKEY`` even the *next* keyframe. ``None`` when the stream cannot be served this way
    (no timestamps, a seek that does not land on the keyframe): callers fall back to decoding forward."""
    if not meta.has_timestamps or len(meta.pts) != len(meta.frame_times):
        return None
    src = normalize_source(source)
    name = describe_source(source)
    container = open_container(src, name)
    out: list[np.ndarray] = []
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"  # frame threads would add their own output delay
        decoder = stream.codec_context
        for i in kidx:
            target = int(meta.pts[int(i)])
            container.seek(target, stream=stream, backward=True, any_frame=False)  # also flushes the decoder
            frames = None
            for packet in container.demux(stream):
                if packet.pts is None or packet.pts < target:
                    continue  # leading packets of the GOP before the keyframe in decode order
                if packet.pts > target or not packet.is_keyframe:
                    return None  # the keyframe is not where the probe put it: decode forward instead
                frames = list(packet.decode()) + list(decoder.decode(None))
                break
            if not frames:
                return None
            out.append(rotate_frame(frames[0].to_ndarray(format="rgb24"), frames[0].rotation or 0.0))
    return out
