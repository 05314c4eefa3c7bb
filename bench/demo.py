"""The demo's figures: run ``python -m jobs.demo --no-serve`` once and record what it measured.

    python -m bench.demo [--config configs/demo.yaml] [--workdir /tmp/vidsift-bench-demo] \
        [--baseline-workdir DIR --baseline-log LOG --baseline-label TEXT]

Runs the demo recipe end to end in a subprocess (its console output goes to ``WORKDIR/demo.log``) and
reads back what the run left: the per-stage seconds of its own stage table, held-out (test split) retrieval
from training (``metrics.json``), and the generated test-split captions (``captions/captions.parquet``)
scored against the manifest's references: CIDEr-D, BLEU-4, distinct captions / videos, the share of the
most frequent caption, and per attribute the fraction of captions that name the video's colour, shape and
direction (``workflows.demo.caption_grounding``). ``--baseline-*`` scores an earlier demo run the same way
(its workdir and console log, e.g. the recipe before a change) as a second row.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from bench.record import BenchRecord, add_record_args, col, format_cell
from pipeline.caption_metrics import evaluate_captions
from workflows.demo import caption_grounding

STAGE = re.compile(r"^=== (?P<name>[\w-]+): (?P<s>[\d.]+)s", re.MULTILINE)
ELAPSED = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?P<t>[\d:.]+)")


def run_demo(config: str, workdir: Path) -> tuple[float, str]:
    """The demo with ``--no-serve``; returns (wall seconds of the process, its console output)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "jobs.demo", "--workdir", str(workdir), "--config", config, "--no-serve"]
    start = time.perf_counter()
    with open(workdir / "demo.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    text = (workdir / "demo.log").read_text()
    if proc.returncode != 0:
        raise SystemExit(f"the demo failed (exit {proc.returncode}); its output:\n{text[-4000:]}")
    return wall, text


def elapsed_seconds(text: str) -> float | None:
    """``/usr/bin/time -v``'s elapsed wall time in a log, in seconds (None when absent)."""
    match = ELAPSED.search(text)
    if not match:
        return None
    seconds = 0.0
    for part in match["t"].split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def score_run(label: str, workdir: Path, log: str, wall_s: float | None) -> dict[str, Any]:
    """One row: stage seconds (from the demo's printed stage lines), test retrieval, caption scores."""
    stages = {m["name"]: float(m["s"]) for m in STAGE.finditer(log)}
    metrics = json.loads((workdir / "metrics.json").read_text())
    test = metrics.get("retrieval_test") or {}
    manifest = pd.read_parquet(workdir / "synth" / "manifest.parquet").set_index("video_id")
    captions = {r["video_id"]: r["caption"] for r in pq.read_table(workdir / "captions" / "captions.parquet")
                .to_pylist() if manifest.loc[r["video_id"], "split"] == "test"}
    order = sorted(captions)
    hyps = [captions[v] for v in order]
    scores = evaluate_captions(hyps, [list(manifest.loc[v, "captions"]) for v in order])
    grounding = caption_grounding(hyps, [manifest.loc[v].to_dict() for v in order])
    return {
        "run": label, "videos": len(manifest), "wall_s": wall_s, "stages_s": sum(stages.values()),
        "train_s": stages.get("train"), "cap_train_s": stages.get("cap-train"),
        "other_s": sum(v for k, v in stages.items() if k not in ("train", "cap-train")),
        "t2v_r1": test.get("t2v_R@1"), "t2v_r5": test.get("t2v_R@5"), "v2t_r1": test.get("v2t_R@1"),
        "test_texts": test.get("num_texts"), "test_videos": test.get("num_videos"),
        "cider": scores["CIDEr-D"], "bleu4": scores["BLEU-4"], "captioned": len(order),
        "distinct": grounding["distinct_ratio"], "top_share": grounding["top_caption_share"],
        "colour": grounding["colour"], "shape": grounding["shape"], "direction": grounding["direction"],
        "all_three": grounding["all_three"],
        "examples": [{"run": label, "video_id": v, "caption_class": manifest.loc[v, "caption_class"],
                      "generated": captions[v]} for v in order[:5]],
        "stages": stages,
    }


TIME_COLUMNS = [
    col("run", "run"), col("videos", "videos"), col("stages_s", "stage table total s", "{:.0f}"),
    col("train_s", "retrieval training s", "{:.0f}"), col("cap_train_s", "captioner training s", "{:.0f}"),
    col("other_s", "other stages s", "{:.0f}"), col("wall_s", "process wall s", "{:.0f}"),
]
QUALITY_COLUMNS = [
    col("run", "run"), col("t2v_r1", "test t2v R@1", "{:.3f}"), col("t2v_r5", "R@5", "{:.3f}"),
    col("v2t_r1", "v2t R@1", "{:.3f}"), col("cider", "CIDEr-D", "{:.3f}"), col("bleu4", "BLEU-4", "{:.3f}"),
    col("distinct", "distinct captions / videos", "{:.3f}"), col("top_share", "top caption share", "{:.3f}"),
    col("colour", "colour named", "{:.3f}"), col("shape", "shape named", "{:.3f}"),
    col("direction", "direction named", "{:.3f}"), col("all_three", "all three", "{:.3f}"),
]
EXAMPLE_COLUMNS = [col("run", "run"), col("video_id", "video"), col("caption_class", "class"),
                   col("generated", "generated caption")]


def record_tables(record: BenchRecord, runs: list[dict[str, Any]], config: str) -> None:
    """The time, quality and example-caption tables of the scored runs (the new run last)."""
    rows = [{k: v for k, v in r.items() if k not in ("examples", "stages")} for r in runs]
    last = rows[-1]
    sample = (f"one run of each recipe; the new run: {last['videos']} synthetic videos, test split "
              f"{last['test_videos']:.0f} videos / {last['test_texts']:.0f} captions (retrieval) and "
              f"{last['captioned']} captioned videos")
    baseline = "the earlier recipe's run (first row), same machine" if len(rows) > 1 else "none"
    record.table("time", columns=TIME_COLUMNS, rows=rows, sample_size=sample, baseline=baseline,
                 title=f"python -m jobs.demo --config {config} --no-serve: seconds per part of the run")
    record.table("quality", columns=QUALITY_COLUMNS, rows=rows, sample_size=sample, baseline=baseline,
                 filtering="t2v R@1/R@5 count a video of the caption's class as correct (caption_class)")
    record.table("examples", columns=EXAMPLE_COLUMNS, rows=[e for r in runs for e in r["examples"]],
                 sample_size="the first 5 test videos by id of each run", baseline=baseline)


def add_headlines(record: BenchRecord, run: dict[str, Any]) -> None:
    """Issue #17's demo floors, checked on the new run: retrieval, time on 2 cores, non-template captions."""
    r1, wall = run["t2v_r1"] or 0.0, run["wall_s"]
    record.add_headline("demo (make demo)", "held-out t2v R@1 >= 0.9", f"{r1:.3f}",
                        "yes" if r1 >= 0.9 else "no")
    record.add_headline("demo (make demo)", "whole run <= 15 min on 2 cores", f"{wall / 60:.1f} min",
                        "yes" if wall <= 15 * 60 else "no")
    record.add_headline("demo (make demo)", "captions not one template: top caption share < 0.5",
                        f"{run['top_share']:.3f} ({run['distinct'] * run['captioned']:.0f} distinct / "
                        f"{run['captioned']} videos; all of colour, shape, direction named: "
                        f"{run['all_three']:.3f})", "yes" if run["top_share"] < 0.5 else "no")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vidsift-bench-demo"))
    p.add_argument("--label", default="configs/demo.yaml (this code)")
    p.add_argument("--baseline-workdir", type=Path, default=None, help="an earlier demo run's workdir")
    p.add_argument("--baseline-log", type=Path, default=None, help="its console log (stage lines, time -v)")
    p.add_argument("--baseline-label", default="earlier recipe")
    p.add_argument("--baseline-wall-s", type=float, default=None,
                   help="its process wall s when the log has no time -v line (an earlier bench JSON's)")
    add_record_args(p, "demo")
    args = p.parse_args(argv)
    record = BenchRecord.start("demo", sys.argv[1:] if argv is None else argv)
    rows = []
    if args.baseline_workdir is not None:
        log = args.baseline_log.read_text() if args.baseline_log else ""
        wall_s = elapsed_seconds(log) if args.baseline_wall_s is None else args.baseline_wall_s
        rows.append(score_run(args.baseline_label, args.baseline_workdir, log, wall_s))
    wall, text = run_demo(args.config, args.workdir)
    rows.append(score_run(args.label, args.workdir, text, wall))
    for row in rows:
        print(" | ".join(format_cell(row[c["key"]], c["fmt"]) for c in TIME_COLUMNS + QUALITY_COLUMNS[1:]))
    record_tables(record, rows, args.config)
    add_headlines(record, rows[-1])
    record.extra["stages"] = {r["run"]: r["stages"] for r in rows}
    record.write(args.json, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
