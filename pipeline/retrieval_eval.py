"""Text-to-video / video-to-text retrieval metrics from a similarity matrix (numpy only).

The similarity matrix is ``[num_texts, num_videos]``: row ``i`` is one caption, column ``j`` one video.
``text_to_video[i]`` names the video caption ``i`` belongs to, so a video may have several captions
(MSR-VTT test has 1 per video in 1k-A, 20 in the full split; the synthetic corpus has 2-5).

Ranks are 1-based and ties count *against* the query: the rank of a query is one plus the number of
wrong candidates scoring at least as high as the best correct one. A model that scores everything
equally therefore gets the worst rank, never a lucky R@1.

``equivalence`` (an array of class keys, one per video, e.g. the synthetic ``caption_class``): videos
sharing a key carry identical caption sets, so for a caption every video of its class is a correct
answer (t2v), and for a video every caption of any video of its class is correct (v2t). Without it,
only the caption's own video (t2v) / the video's own captions (v2t) are correct — the standard
MSR-VTT protocol.

v2t with several captions per video uses the best-ranked correct caption (as CLIP4Clip's
multi-sentence evaluation does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_KS = (1, 5, 10)


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor without importing torch
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be numeric, got an object array")
    return arr


def similarity_matrix(text_embeddings: Any, video_embeddings: Any, normalize: bool = True) -> np.ndarray:
    """Cosine (``normalize=True``) or dot-product similarities ``[num_texts, num_videos]`` (float64)."""
    t = _as_numpy(text_embeddings, "text_embeddings").astype(np.float64)
    v = _as_numpy(video_embeddings, "video_embeddings").astype(np.float64)
    if t.ndim != 2 or v.ndim != 2 or t.shape[1] != v.shape[1]:
        raise ValueError(f"embeddings must be [N, D] and [M, D] with the same D, got {t.shape} and {v.shape}")
    if normalize:
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return t @ v.T


def _validate(sim: np.ndarray, text_to_video: np.ndarray, equivalence: np.ndarray | None) -> None:
    if sim.ndim != 2:
        raise ValueError(f"similarity matrix must be 2-D [num_texts, num_videos], got shape {sim.shape}")
    num_texts, num_videos = sim.shape
    if num_texts == 0 or num_videos == 0:
        raise ValueError(f"similarity matrix is empty (shape {sim.shape})")
    if not np.all(np.isfinite(sim)):
        raise ValueError("similarity matrix contains NaN or inf")
    if text_to_video.shape != (num_texts,):
        raise ValueError(
            f"text_to_video must have one entry per text row ({num_texts}), got shape {text_to_video.shape}"
        )
    if not np.issubdtype(text_to_video.dtype, np.integer):
        raise TypeError(f"text_to_video must hold integer video indices, got dtype {text_to_video.dtype}")
    if text_to_video.min() < 0 or text_to_video.max() >= num_videos:
        raise ValueError(
            f"text_to_video holds indices outside [0, {num_videos}): min {text_to_video.min()}, "
            f"max {text_to_video.max()}"
        )
    if equivalence is not None and len(equivalence) != num_videos:
        raise ValueError(
            f"equivalence must have one class key per video column ({num_videos}), got {len(equivalence)}"
        )


def _correct_mask(text_to_video: np.ndarray, num_videos: int, equivalence: np.ndarray | None) -> np.ndarray:
    """Boolean ``[num_texts, num_videos]``: is video ``j`` a correct answer for caption ``i``."""
    num_texts = len(text_to_video)
    if equivalence is None:
        mask = np.zeros((num_texts, num_videos), dtype=bool)
        mask[np.arange(num_texts), text_to_video] = True
        return mask
    _, class_ids = np.unique(np.asarray(equivalence), return_inverse=True)
    class_ids = class_ids.reshape(-1)
    return class_ids[text_to_video][:, None] == class_ids[None, :]


def _ranks(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Per row: 1 + number of wrong candidates scoring >= the best correct candidate (ties pessimistic)."""
    if not np.all(correct.any(axis=1)):
        bad = int(np.flatnonzero(~correct.any(axis=1))[0])
        raise ValueError(f"query {bad} has no correct candidate (a video without captions?)")
    best_correct = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)
    wrong_above = (~correct) & (scores >= best_correct)
    return 1 + wrong_above.sum(axis=1)


def summarize_ranks(ranks: np.ndarray, prefix: str, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{prefix}_R@k`` (fractions in [0, 1]), ``{prefix}_MdR``, ``{prefix}_MnR`` from 1-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no ranks to summarise")
    out = {f"{prefix}_R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out[f"{prefix}_MdR"] = float(np.median(ranks))
    out[f"{prefix}_MnR"] = float(np.mean(ranks))
    return out


def retrieval_ranks(
    sim: Any, text_to_video: Any, equivalence: Sequence[Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(t2v_ranks [num_texts], v2t_ranks [num_videos])`` for a ``[num_texts, num_videos]`` matrix.

    Every video must own at least one caption (otherwise v2t has no correct answer and this raises).
    """
    sim = _as_numpy(sim, "sim").astype(np.float64)
    text_to_video = np.asarray(_as_numpy(text_to_video, "text_to_video")).reshape(-1)
    if text_to_video.size and not np.issubdtype(text_to_video.dtype, np.integer):
        raise TypeError(f"text_to_video must hold integer video indices, got dtype {text_to_video.dtype}")
    equivalence = None if equivalence is None else np.asarray(list(equivalence))
    _validate(sim, text_to_video, equivalence)
    correct = _correct_mask(text_to_video, sim.shape[1], equivalence)
    t2v = _ranks(sim, correct)
    v2t = _ranks(sim.T, correct.T)
    return t2v, v2t


def retrieval_metrics(
    sim: Any,
    text_to_video: Any | None = None,
    equivalence: Sequence[Any] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """t2v and v2t R@k, median rank (MdR) and mean rank (MnR) of a ``[num_texts, num_videos]`` matrix.

    ``text_to_video`` defaults to the identity (square matrix, caption ``i`` describes video ``i``).
    Returns ``t2v_R@1``, ``t2v_R@5``, ``t2v_R@10``, ``t2v_MdR``, ``t2v_MnR``, the same for ``v2t``, and
    ``num_texts`` / ``num_videos``. Recalls are fractions (0.43 = 43 %).
    """
    sim = _as_numpy(sim, "sim")
    if text_to_video is None:
        if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
            raise ValueError(f"text_to_video is required unless the matrix is square, got shape {sim.shape}")
        text_to_video = np.arange(sim.shape[0])
    t2v, v2t = retrieval_ranks(sim, text_to_video, equivalence)
    out: dict[str, float] = {}
    out.update(summarize_ranks(t2v, "t2v", ks))
    out.update(summarize_ranks(v2t, "v2t", ks))
    out["num_texts"] = float(sim.shape[0])
    out["num_videos"] = float(sim.shape[1])
    return out


def flatten_captions(captions_per_video: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """``[[c, ...], ...]`` per video → (flat caption list, ``text_to_video`` index array)."""
    texts: list[str] = []
    owners: list[int] = []
    for j, caps in enumerate(captions_per_video):
        if isinstance(caps, str):
            raise TypeError(f"captions of video {j} must be a list of strings, got one string {caps!r}")
        caps = [c for c in caps if isinstance(c, str) and c.strip()]
        if not caps:
            raise ValueError(f"video {j} has no non-empty caption")
        texts.extend(caps)
        owners.extend([j] * len(caps))
    return texts, np.asarray(owners, dtype=np.int64)


def evaluate_embeddings(
    text_embeddings: Any,
    text_to_video: Any,
    video_embeddings: Any,
    equivalence: Sequence[Any] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Cosine-similarity retrieval metrics from caption and video embeddings (see retrieval_metrics)."""
    sim = similarity_matrix(text_embeddings, video_embeddings)
    return retrieval_metrics(sim, text_to_video, equivalence=equivalence, ks=ks)


def attribute_accuracy(
    text_embeddings: Any,
    text_classes: Sequence[str],
    video_embeddings: Any,
    video_classes: Sequence[str],
    attributes: Sequence[str],
    sep: str = "|",
) -> dict[str, float]:
    """Which attribute a retrieval model gets right: each video is assigned the class whose mean caption
    embedding (the class prototype) is nearest, and every ``sep``-separated field of the class key (e.g.
    ``colour|shape|direction``) is scored on its own. Returns ``{"class": acc, attribute: acc, ...}``.
    """
    text = _as_numpy(text_embeddings, "text_embeddings").astype(np.float64)
    video = _as_numpy(video_embeddings, "video_embeddings").astype(np.float64)
    text_classes = [str(c) for c in text_classes]
    video_classes = [str(c) for c in video_classes]
    if len(text_classes) != len(text) or len(video_classes) != len(video):
        raise ValueError(f"{len(text_classes)} text classes for {len(text)} texts, "
                         f"{len(video_classes)} video classes for {len(video)} videos")
    names = sorted(set(text_classes))
    for key in {*names, *video_classes}:
        if len(key.split(sep)) != len(attributes):
            raise ValueError(f"class key {key!r} does not have the fields {list(attributes)}")
    owner = np.array([names.index(c) for c in text_classes])
    protos = np.stack([text[owner == i].mean(axis=0) for i in range(len(names))])
    protos /= np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    video = video / np.maximum(np.linalg.norm(video, axis=1, keepdims=True), 1e-12)
    predicted = [names[i] for i in (video @ protos.T).argmax(axis=1)]
    out = {"class": float(np.mean([p == t for p, t in zip(predicted, video_classes)]))}
    pairs = [(p.split(sep), t.split(sep)) for p, t in zip(predicted, video_classes)]
    for j, name in enumerate(attributes):
        out[name] = float(np.mean([p[j] == t[j] for p, t in pairs]))
    return out


def format_metrics(metrics: dict[str, float], prefix: str = "") -> str:
    """One human-readable line: ``t2v R@1 80.0 R@5 ... | v2t ...`` (recalls in %)."""
    parts = []
    for direction in ("t2v", "v2t"):
        keys = [k for k in metrics if k.startswith(f"{prefix}{direction}_")]
        if not keys:
            continue
        items = []
        for k in keys:
            name = k[len(prefix) + len(direction) + 1 :]
            value = metrics[k]
            items.append(f"{name} {100 * value:.1f}" if name.startswith("R@") else f"{name} {value:.1f}")
        parts.append(f"{direction} " + " ".join(items))
    return " | ".join(parts)
