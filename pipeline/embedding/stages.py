"""The encode stage of an embed run: an actor pool over the decoded clips (the decode stages, which need no
torch, are :mod:`pipeline.embedding.decode`)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from models import create_inference_model
from pipeline.embedding.layout import ERROR_ROW, VIDEO_ROW, WINDOW_CLIP_BASE, stable_id
from runtime.errors import DecodeFailure, ErrorPolicy, check_policy
from runtime.threads import set_torch_threads


class EncodeClipsStage:
    """Ray Data ``map_batches`` class: decoded clips → one row per clip plus one video-level row.

    Input: the columns of :class:`pipeline.decode_stage.DecodeClipsStage` plus ``shard``. Output: flat rows
    with the embedding schema (``embedding`` as ``[R, D]``). A row that arrives with a decode error, or
    without a single valid frame, is an input failure: under ``on_error="record"`` (the default) it comes out
    as one row with ``error`` set and an empty embedding, so the writer can record it and nothing is lost;
    under ``"raise"`` it raises :class:`runtime.errors.DecodeFailure` naming the key. Anything that goes wrong
    in the model itself is a bug and always raises.

    ``threads``: torch threads of this process (the workflow passes it; default every core of the node).
    The model comes from :func:`models.create_inference_model`: trained weights (``pretrained``, a URI on
    any store) are required unless ``allow_random_init``, and then the init is seeded (seed 0), so the
    driver and every encoder actor hold the same weights and reruns keep the same model id.
    """

    def __init__(self, model_name: str, pretrained: str | None = None, device: str | None = None,
                 dtype: str = "float32", threads: int | None = None, on_error: ErrorPolicy = "record",
                 allow_random_init: bool = False):
        self.on_error = check_policy(on_error)
        # Ray pins actor threads to the CPUs they asked for; an encoder that owns the node's compute
        # should use every core (decode actors ask for fractions and mostly wait on I/O).
        set_torch_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, transform, _ = create_inference_model(model_name, pretrained, allow_random_init, seed=0)
        self.model = model.to(self.device).eval()
        self.transform = transform
        self.model_id = model.model_id
        self.dtype = np.float16 if dtype == "float16" else np.float32
        self.dim: int | None = None

    def embed(self, frames: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[B, N, T, H, W, 3]`` + ``[B, N, T]`` → (clip ``[B, N, D]``, video ``[B, D]``) float32."""
        with torch.inference_mode():
            x = self.transform(frames).to(self.device)
            m = torch.as_tensor(mask, device=self.device)
            clips = self.model.encode_clips(x, m)
            video = self.model.video_from_clips(clips, m)  # one forward: aggregate the clip rows
        return clips.float().cpu().numpy(), video.float().cpu().numpy()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        errors = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in errors], dtype=bool)
        mask = np.asarray(batch["mask"], dtype=bool)
        ok &= mask.any(axis=(1, 2))
        clip_emb = video_emb = None
        if ok.any():
            clip_emb, video_emb = self.embed(np.asarray(batch["frames"])[ok], mask[ok])
            self.dim = video_emb.shape[1]
        dim = self.dim or 0
        rows: dict[str, list] = {c: [] for c in ("id", "video_id", "key", "shard", "clip_index", "start_s",
                                                 "end_s", "model_id", "sha256", "captions", "embedding",
                                                 "error", "error_message", "parts", "part_done")}
        times = np.asarray(batch["times"], dtype=np.float64)
        j = 0
        # decoded rows per video (several on a --windows run); part_done marks each decoded row's first row
        parts = np.asarray(batch["parts"] if "parts" in batch else np.ones(len(batch["key"])), np.int64)
        for i, key in enumerate(batch["key"]):
            before = len(rows["id"])
            record = json.loads(batch["json"][i]) if batch["json"][i] else {}
            common = {"video_id": str(batch["video_id"][i]), "key": str(key), "shard": str(batch["shard"][i]),
                      "model_id": self.model_id, "sha256": str(record.get("sha256", "")),
                      "captions": str(batch["captions"][i])}
            if not ok[i]:
                reason = errors[i] or "no_valid_frames"
                message = str(batch["error_message"][i]) or "no frame of this video could be decoded"
                if self.on_error == "raise":
                    raise DecodeFailure(f"{key} (shard {common['shard']}): {reason}: {message}")
                self._append(rows, common, ERROR_ROW, 0.0, 0.0, np.zeros(dim, np.float32), reason, message)
            else:
                self._append_video(rows, common, batch, i, times[i], mask[i], clip_emb[j], video_emb[j])
                j += 1
            added = len(rows["id"]) - before
            rows["parts"] += [int(parts[i])] * added
            rows["part_done"] += [1] + [0] * (added - 1)
        out = {k: np.array(v, dtype=object) for k, v in rows.items() if k != "embedding"}
        out["id"] = np.array(rows["id"], dtype=np.int64)
        out["clip_index"] = np.array(rows["clip_index"], dtype=np.int64)
        out["start_s"] = np.array(rows["start_s"], dtype=np.float64)
        out["end_s"] = np.array(rows["end_s"], dtype=np.float64)
        if "parts" in batch:  # a --windows run: bookkeeping of the video's decoded rows
            out["parts"] = np.array(rows["parts"], dtype=np.int64)
            out["part_done"] = np.array(rows["part_done"], dtype=np.int64)
        else:
            del out["parts"], out["part_done"]
        out["embedding"] = (np.stack(rows["embedding"]).astype(self.dtype) if rows["embedding"]
                            else np.zeros((0, dim), self.dtype))
        return out

    def _append_video(self, rows, common, batch, i, times, mask, clip_emb, video_emb) -> None:
        """The rows of one decoded input row: its clip rows and video row; on a ``--windows`` run (columns
        ``window_index`` / ``window_bounds``) a window row gives window rows only, the sparse row only the
        video row."""
        windows = np.asarray(batch["window_index"][i]) if "window_index" in batch else None
        valid_clips = mask.any(axis=1)
        if windows is not None and windows.max() >= 0:
            bounds = np.asarray(batch["window_bounds"][i], dtype=np.float64)
            for c in np.flatnonzero(valid_clips & (windows >= 0)):
                self._append(rows, common, WINDOW_CLIP_BASE + int(windows[c]), bounds[c, 0], bounds[c, 1],
                             clip_emb[c], "", "")
            return
        if windows is None:
            for c in np.flatnonzero(valid_clips):
                start, end = _clip_span(times[c], mask[c])
                self._append(rows, common, int(c), start, end, clip_emb[c], "", "")
        start, end = _clip_span(times.ravel(), mask.ravel())
        self._append(rows, common, VIDEO_ROW, start, end, video_emb, "", "")

    @staticmethod
    def _append(rows, common, clip_index, start, end, emb, reason, message) -> None:
        rows["id"].append(stable_id(common["video_id"], clip_index))
        for k, v in common.items():
            rows[k].append(v)
        rows["clip_index"].append(clip_index)
        rows["start_s"].append(float(start))
        rows["end_s"].append(float(end))
        rows["embedding"].append(np.asarray(emb, dtype=np.float32))
        rows["error"].append(reason)
        rows["error_message"].append(message)


def _clip_span(times: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    valid = times[mask] if mask.any() else times
    return float(valid.min()), float(valid.max())
