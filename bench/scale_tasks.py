"""``python -m bench.scale_tasks TASK SPEC_JSON OUT_JSON``: one measured process of bench/scale.py (its parent
samples this process tree's RSS); the task's JSON result goes to OUT_JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import scale_fanout, scale_systems  # noqa: E402

TASKS = {"build_vidsift": scale_systems.build_vidsift, "build_hnsw": scale_systems.build_hnsw,
         "build_lancedb": scale_systems.build_lancedb, "serve": scale_systems.serve,
         "fanout": scale_fanout.fanout}

if __name__ == "__main__":
    result = TASKS[sys.argv[1]](json.loads(sys.argv[2]))
    Path(sys.argv[3]).write_text(json.dumps(result, default=float))
