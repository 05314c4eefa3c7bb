"""``python -m bench.scale_tasks TASK SPEC_JSON OUT_JSON``: one measured process of bench/scale.py (its parent
samples this process tree's RSS); the task's JSON result goes to OUT_JSON.

A task imports only its own module: the fan-out's (Ray Serve and the service, hence torch) adds ~0.7 GB of
RSS to a process, which the build and serving tasks measured as theirs before."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = {"build_vidsift": ("bench.scale_systems", "build_vidsift"),
         "build_hnsw": ("bench.scale_systems", "build_hnsw"),
         "build_lancedb": ("bench.scale_systems", "build_lancedb"),
         "serve": ("bench.scale_systems", "serve"),
         "fanout": ("bench.scale_fanout", "fanout")}


def run(task: str, spec: dict) -> dict:
    module, name = TASKS[task]
    return getattr(importlib.import_module(module), name)(spec)


if __name__ == "__main__":
    result = run(sys.argv[1], json.loads(sys.argv[2]))
    Path(sys.argv[3]).write_text(json.dumps(result, default=float))
