"""The torchcodec backend: ``VideoDecoder`` exact seeks (``get_frames_played_at``); NVDEC on cuda."""

from __future__ import annotations

import av
import numpy as np

from pipeline.decode.backend import DecoderBackend, DecodeResult, nearest_keyframe_indices
from pipeline.decode.errors import VideoDecodeError
from pipeline.decode.probe import VideoMeta
from pipeline.decode.pyav import decode_keyframe_packets
from pipeline.decode.source import describe_source, normalize_source


class TorchCodecBackend(DecoderBackend):
    """torchcodec ``VideoDecoder`` (exact seeks, ``get_frames_played_at``); NVDEC via ``device="cuda"``."""

    name = "torchcodec"

    def __init__(self, device: str = "cpu", num_threads: int = 0):
        # 0 = FFmpeg picks (like PyAV and decord do); use 1 when many DataLoader workers / Ray actors already
        # share the cores.
        self.device = device
        self.num_threads = num_threads

    def _decoder(self, source, seek_mode: str = "exact"):
        from torchcodec.decoders import VideoDecoder

        src = normalize_source(source)
        if hasattr(src, "seek"):
            src.seek(0)
        try:
            return VideoDecoder(
                src, dimension_order="NHWC", seek_mode=seek_mode, device=self.device,
                num_ffmpeg_threads=self.num_threads,
            )
        except (RuntimeError, ValueError) as exc:
            raise VideoDecodeError("not_a_video", f"{describe_source(source)}: {exc}") from exc

    def decode_times(self, source, times: np.ndarray, meta: VideoMeta | None) -> DecodeResult:
        decoder = self._decoder(source)
        md = decoder.metadata
        begin = float(md.begin_stream_seconds or 0.0)
        end = float(md.end_stream_seconds)
        query = np.clip(np.asarray(times, dtype=np.float64), begin, np.nextafter(end, -np.inf))
        try:
            batch = decoder.get_frames_played_at(seconds=query.tolist())
        except RuntimeError as exc:
            raise VideoDecodeError("decode_error", f"{describe_source(source)}: {exc}") from exc
        frames = batch.data.cpu().numpy()
        ft = batch.pts_seconds.cpu().numpy().astype(np.float64)
        return DecodeResult(frames, ft, np.zeros(len(query)), -1)

    def decode_keyframes(self, source, times: np.ndarray, meta: VideoMeta) -> DecodeResult:
        kidx = nearest_keyframe_indices(meta, times)
        kt = meta.frame_times[kidx]
        if not str(self.device).startswith("cuda"):
            # torchcodec has no decode-one-packet call: its seek-then-decode-to-pts waits out the B-frame
            # reorder delay (2-4 frames per keyframe). On CPU both libraries run the same FFmpeg decoder,
            # so keyframe mode sends the single keyframe packet through PyAV and flushes (same pixels).
            uniq, inverse = np.unique(kidx, return_inverse=True)
            try:
                frames = decode_keyframe_packets(source, meta, uniq)
            except av.error.FFmpegError:
                frames = None
            if frames is not None:
                out = np.stack(frames)[inverse]
                return DecodeResult(out, kt, kt - np.asarray(times, dtype=np.float64), len(uniq))
        # Approximate mode skips the full-file scan; each request is a keyframe pts, so every frame is
        # one seek + one keyframe decode (plus the decoder's reorder delay).
        decoder = self._decoder(source, seek_mode="approximate")
        uniq, inverse = np.unique(kt, return_inverse=True)
        try:
            batch = decoder.get_frames_played_at(seconds=uniq.tolist())
        except RuntimeError as exc:
            raise VideoDecodeError("decode_error", f"{describe_source(source)}: {exc}") from exc
        frames = batch.data.cpu().numpy()[inverse]
        return DecodeResult(frames, kt, kt - np.asarray(times, dtype=np.float64), -1)


def torchcodec_available() -> bool:
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (missing ffmpeg libs) means "not available"
        return False
    return True
