"""The decode stage of an embed run: :class:`pipeline.decode_stage.DecodeClipsStage` with the shard column
(the windows' stage, :mod:`pipeline.embedding.windows`, builds on it). No torch: decode actors import this."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.decode_stage import DecodeClipsStage


class DecodeShardClipsStage(DecodeClipsStage):
    """:class:`pipeline.decode_stage.DecodeClipsStage` that also carries the ``shard`` column through, so each
    encoded row can be filed under the shard it came from. Its parameters (the error policy included) are
    the base stage's."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = super().__call__(batch)
        out["shard"] = np.asarray(batch["shard"], dtype=object)
        return out
