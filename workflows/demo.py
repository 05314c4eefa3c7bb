"""The demo run: the whole vidsift pipeline on Ray over a synthetic corpus, with an HTML report.

synth → ingest → train the retrieval encoder (the recipe's ``train_config``, Ray Train) → embed (Ray Data)
→ index (FAISS) → train the captioner (the recipe's ``caption_config``: SwinBERT, same trainer; with
``caption_backbone: retrieval`` it reads the video tower of the encoder just trained) → caption the test
split → query → measure → report → serve. ``configs/demo.yaml`` trains ``configs/train/tiny-meanP-3d-p4.yaml``
(CLIP4Clip meanP with 4 px 3-D tube patches) and captions with ``configs/train/demo-caption-clip4clip.yaml``
over its video tower; ``configs/demo-tiny.yaml`` runs the same recipes for a few steps. Prints example
queries with their top hits and a table of the retrieval and caption metrics (caption diversity and
per-attribute correctness included), writes ``WORKDIR/report.html`` (``workflows.report``) and
``WORKDIR/metrics.json``, and ends by serving the search page over its index (``workflows.serve``) until
Ctrl-C, unless the recipe says ``serve: false`` (``--no-serve``). Every stage is idempotent, so a rerun over
the same workdir only redoes what is missing. Every inference stage (embed, the index's text encoder,
caption, the search service) is given the checkpoint the demo trained, explicitly: nothing runs on a random
init.

:func:`run_demo` runs the named steps of :data:`STEPS` in order over one :class:`DemoState`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import yaml

from index import VideoIndex, build_index
from pipeline.caption_layout import CAPTIONS_FILE
from pipeline.caption_metrics import evaluate_captions, tokenize
from pipeline.ingest import run_ingest
from pipeline.training import load_train_config
from runtime.ray_connect import connect_ray
from synthetic import COLOUR_WORDS, DIRECTION_WORDS, SHAPE_WORDS, generate_corpus
from workflows.caption import run_caption
from workflows.embed import run_embed
from workflows.report import format_rows, metrics_rows, shard_lookup, write_report
from workflows.serve import build_app, serving_in_thread
from workflows.train import run_training

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
# The words of the synthetic captions for each attribute (value -> synonyms), to read a generated caption.
ATTRIBUTE_WORDS = {"colour": COLOUR_WORDS, "shape": SHAPE_WORDS, "direction": DIRECTION_WORDS}


def load_demo_config(path: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The demo recipe (configs/demo.yaml) with command-line overrides applied."""
    cfg = yaml.safe_load(Path(path or DEFAULT_CONFIG).read_text())
    for key, value in overrides.items():
        if value is not None:
            cfg[key] = value
    return cfg


class StageTimer:
    """Prints a header per stage and keeps (stage, seconds, summary) rows for the final table."""

    def __init__(self):
        self.rows: list[tuple[str, float, str]] = []

    def run(self, name: str, fn, describe=lambda r: ""):
        print(f"\n=== [{len(self.rows) + 1}] {name} ===", flush=True)
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        self.rows.append((name, seconds, describe(result)))
        print(f"=== {name}: {seconds:.1f}s {self.rows[-1][2]}", flush=True)
        return result

    def table(self) -> str:
        lines = [f"{'stage':<10} {'seconds':>8}  summary", "-" * 72]
        lines += [f"{n:<10} {s:>8.1f}  {d}" for n, s, d in self.rows]
        lines.append(f"{'total':<10} {sum(s for _, s, _ in self.rows):>8.1f}")
        return "\n".join(lines)

    def seconds(self) -> dict[str, float]:
        """Seconds per stage (the table's column) and their ``total``."""
        out = {name: round(sec, 1) for name, sec, _ in self.rows}
        out["total"] = round(sum(sec for _, sec, _ in self.rows), 1)
        return out


def pick_queries(manifest: pd.DataFrame, count: int) -> list[dict[str, Any]]:
    """Test-split captions of distinct caption classes, each with the set of videos that match it."""
    test = manifest[manifest["split"] == "test"]
    queries = []
    for cls, group in sorted(test.groupby("caption_class"), key=lambda kv: kv[0]):
        caption = list(group.iloc[0]["captions"])[0]
        relevant = set(manifest[manifest["caption_class"] == cls]["video_id"])
        queries.append({"text": caption, "caption_class": cls, "relevant": relevant})
        if len(queries) == count:
            break
    return queries


@dataclasses.dataclass
class DemoState:
    """One demo run: the workdir and recipe, then what each step produced."""

    work: Path
    cfg: dict[str, Any]
    timer: StageTimer = dataclasses.field(default_factory=StageTimer)
    manifest: pd.DataFrame | None = None
    train_cfg: Any = None  # pipeline.training.TrainConfig of the retrieval encoder
    train_summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    emb_summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    index_meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    cap_summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    generated: dict[str, str] = dataclasses.field(default_factory=dict)  # video_id -> generated caption
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # query, hits, relevant
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    url: str | None = None  # the search page's base URL while the last step serves it
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)  # ends the serving step

    def path(self, name: str) -> Path:
        """Where a stage writes under the workdir (synth, ingest, train, emb, index, caption-train, ...)."""
        return self.work / name


def synthesize(s: DemoState) -> None:
    """The synthetic corpus (mp4 + manifest) of the recipe."""
    cfg = s.cfg
    manifest = s.timer.run("synth", lambda: generate_corpus(
        s.path("synth"), n=cfg["n"], seed=cfg["seed"], min_duration=cfg["min_duration"],
        max_duration=cfg["max_duration"], size=cfg["size"], fps=cfg["fps"],
        keyframe_interval=cfg["keyframe_interval"], profile=cfg["profile"]),
        lambda m: f"{len(m)} videos, {m['caption_class'].nunique()} caption classes")
    s.manifest = manifest if isinstance(manifest, pd.DataFrame) else pd.read_parquet(
        s.path("synth") / "manifest.parquet")


def ingest(s: DemoState) -> None:
    """Shard the corpus (WebDataset tars + per-shard Parquet indexes)."""
    s.timer.run("ingest", lambda: run_ingest(input=str(s.path("synth") / "manifest.parquet"),
                                             output=str(s.path("ingest")),
                                             samples_per_shard=s.cfg["samples_per_shard"]),
                lambda r: f"{r.get('samples', '?')} samples, {r.get('errors', '?')} errors")


def train_retrieval(s: DemoState) -> None:
    """Train the retrieval encoder of ``train_config`` (skipped when the workdir already holds it)."""
    train_dir = s.path("train")
    s.train_cfg = load_train_config(REPO / s.cfg["train_config"], s.cfg.get("train_overrides") or {})
    if (train_dir / "summary.json").exists() and (train_dir / "model.pt").exists():
        s.train_summary = s.timer.run("train", lambda: json.loads((train_dir / "summary.json").read_text()),
                                      lambda r: "(already trained)")
    else:
        s.train_summary = s.timer.run("train", lambda: run_training(str(s.path("ingest")), str(train_dir),
                                                                    s.train_cfg),
                                      lambda r: f"{r['steps']} steps")


def embed_and_index(s: DemoState) -> None:
    """Embed every video with the trained encoder, then build the FAISS index over the embeddings."""
    model_path = str(s.path("train") / "model.pt")
    s.emb_summary = s.timer.run("embed", lambda: run_embed(str(s.path("ingest")), s.train_cfg.model,
                                                           str(s.path("emb")), pretrained=model_path,
                                                           batch_size=32),
                                lambda r: f"{r['videos']} new videos, {r['errors_total']} errors")
    s.index_meta = s.timer.run("index", lambda: build_index(s.emb_summary["partition"], str(s.path("index"))),
                               lambda m: f"{m.get('factory')} over {m.get('count')} vectors")


def caption(s: DemoState) -> None:
    """Train the captioner of ``caption_config`` (unless done), then caption ``caption_split``."""
    cap_dir = s.path("caption-train")
    overrides = dict(s.cfg.get("caption_overrides") or {})
    backbone = s.cfg.get("caption_backbone")
    if backbone == "retrieval":  # the captioner reads the video tower of the encoder trained above
        overrides["backbone_pretrained"] = str(s.path("train") / "model.pt")
    elif backbone is not None:
        raise ValueError(f"demo recipe: caption_backbone {backbone!r} must be 'retrieval' or absent")
    cap_cfg = load_train_config(REPO / s.cfg["caption_config"], overrides)
    if (cap_dir / "model.pt").exists():
        s.timer.run("cap-train", lambda: None, lambda r: "(already trained)")
    else:
        s.timer.run("cap-train", lambda: run_training(str(s.path("ingest")), str(cap_dir), cap_cfg),
                    lambda r: f"{r['steps']} steps")
    captions_out = s.path("captions")
    # Caption the held-out test split (the caption metrics' references); `caption_split: null` does all.
    s.cap_summary = s.timer.run(
        "caption", lambda: run_caption(str(s.path("ingest")), str(cap_dir / "model.pt"), str(captions_out),
                                       split=s.cfg.get("caption_split"), index=str(s.path("index"))),
        lambda r: f"{r.get('captioned', r.get('videos', '?'))} videos captioned")
    for row in pq.read_table(captions_out / CAPTIONS_FILE).to_pylist():
        s.generated[row["video_id"]] = row["caption"]


def query(s: DemoState) -> None:
    """Search the index with one test caption per caption class (text encoder: the trained checkpoint)."""
    index = VideoIndex.open(s.path("index"), pretrained=str(s.path("train") / "model.pt"))
    queries = pick_queries(s.manifest, s.cfg["queries"])

    def query_all():
        for q in queries:
            hits = index.search(q["text"], k=s.cfg["top_k"])
            s.results.append({"query": q["text"], "hits": hits, "relevant": q["relevant"]})
        return s.results

    s.timer.run("query", query_all, lambda r: f"{len(r)} queries")


def measure(s: DemoState) -> None:
    """The report's metrics: retrieval (training's test split), query hit@1, index, caption metrics."""
    records = pd.read_parquet(s.path("synth") / "manifest.parquet").to_dict("records")
    refs = {row["video_id"]: list(row["captions"]) for row in records}
    test_ids = {row["video_id"] for row in records if row["split"] == "test"}
    order = sorted(v for v in s.generated if v in test_ids)
    hyps = [s.generated[v] for v in order]
    cap_metrics = evaluate_captions(hyps, [refs[v] for v in order]) if order else {}
    hit1 = sum(r["hits"][0].video_id in r["relevant"] for r in s.results) / max(len(s.results), 1)
    by_id = {row["video_id"]: row for row in records}
    s.metrics = {
        "retrieval_test": s.train_summary.get("test"),
        "query_hit@1": hit1,
        "index": {k: s.index_meta.get(k) for k in ("factory", "count", "recall", "search_params")},
        "caption_test": cap_metrics,
        "caption_grounding": caption_grounding(hyps, [by_id[v] for v in order]) if order else {},
        "caption_examples": [{"video_id": v, "caption_class": by_id[v]["caption_class"],
                              "generated": s.generated[v]} for v in order[:6]],
        "caption_summary": {k: v for k, v in s.cap_summary.items() if isinstance(v, (int, float, str))},
        "corpus": {split: int(count) for split, count in s.manifest["split"].value_counts().items()},
        "stage_seconds": s.timer.seconds(),
    }


def named_values(caption: str, words: dict[str, list[str]], values: set[str]) -> set[str]:
    """Which of ``values`` (e.g. the corpus' colours) a caption names with any of its synonyms."""
    text = f" {' '.join(tokenize(caption))} "
    return {v for v in values if any(f" {' '.join(tokenize(w))} " in text for w in words.get(v, ()))}


def caption_grounding(hyps: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Is a caption about its video, not a template? Distinct captions per video, the share of the most
    frequent caption, and per attribute (colour, shape, direction) the fraction of videos whose caption
    names exactly the video's value and no other value of the corpus."""
    top = Counter(hyps).most_common(1)[0][1] if hyps else 0
    out: dict[str, Any] = {"videos": len(hyps), "distinct": len(set(hyps)),
                           "distinct_ratio": len(set(hyps)) / max(len(hyps), 1),
                           "top_caption_share": top / max(len(hyps), 1)}
    all_right = [True] * len(hyps)
    for attribute, words in ATTRIBUTE_WORDS.items():
        values = {row.get(attribute) for row in rows} - {None}
        right = [named_values(h, words, values) == {row.get(attribute)} for h, row in zip(hyps, rows)]
        out[attribute] = sum(right) / max(len(right), 1)
        all_right = [a and b for a, b in zip(all_right, right)]
    out["all_three"] = sum(all_right) / max(len(all_right), 1)
    return out


def report(s: DemoState) -> None:
    """Print the example queries, metrics and stage table; write report.html and metrics.json."""
    print("\n=== example queries ===")
    for res in s.results:
        print(f"\n“{res['query']}”")
        for rank, hit in enumerate(res["hits"], 1):
            mark = "✓" if hit.video_id in res["relevant"] else "✗"
            generated = s.generated.get(hit.video_id, "—")
            print(f"  {rank}. {mark} {hit.video_id}  score {hit.score:.3f}  "
                  f"clip {hit.start_s:.2f}–{hit.end_s:.2f}s  | generated: {generated}")
    print("\n=== generated captions (test split) ===")
    for example in s.metrics.get("caption_examples", []):
        print(f"  {example['video_id']}  {example['caption_class']:<22} → {example['generated']}")
    print("\n=== metrics ===")
    print(format_rows(metrics_rows(s.metrics)))
    print("\n=== stages ===")
    print(s.timer.table())
    path = s.path("report.html")
    write_report(path, s.results, s.metrics, s.timer.table(), shard_lookup(s.path("ingest")), s.generated)
    print(f"\nreport: {path}")
    s.path("metrics.json").write_text(json.dumps(s.metrics, indent=2, default=str))
    print(f"metrics: {s.path('metrics.json')}", flush=True)


def serve(s: DemoState) -> None:
    """The last step: serve the search page over the demo's index and print its URL; blocks until Ctrl-C or
    ``s.stop``. ``serve: false`` skips it. The index alone leads to the rest (its lineage: the trained text
    encoder, the shards' previews and metadata; the caption run recorded under it: generated captions)."""
    if not s.cfg.get("serve", True):
        print(f"\nnot serving (--no-serve); to search this index: python -m jobs.serve --index "
              f"{s.path('index')}", flush=True)
        return
    app = build_app(str(s.path("index")), cache_dir=str(s.path("previews")))
    port = int(s.cfg.get("port", 8000))
    try:
        with serving_in_thread(app, host=s.cfg.get("host", "127.0.0.1"), port=port) as url:
            s.url = url
            example = "+".join(str(s.results[0]["query"]).split()) if s.results else "a+red+circle"
            print(f"\n=== search page: {url}/ ===\nthe index of this run, searched with its trained text "
                  f"encoder; the API: {url}/search?q={example}&k=5\n(Ctrl-C stops it)", flush=True)
            while not s.stop.wait(0.5):  # timed waits: Ctrl-C reaches this (main) thread between them
                pass
    except KeyboardInterrupt:
        print("\nstopped serving", flush=True)
    except RuntimeError as exc:
        if s.url is not None:
            raise
        raise RuntimeError(f"could not serve on port {port} ({exc}); rerun the same command with --port N "
                           "(the finished stages are not redone) or --no-serve") from exc


STEPS: tuple[Callable[[DemoState], None], ...] = (
    synthesize, ingest, train_retrieval, embed_and_index, caption, query, measure, report, serve,
)


def run_demo(workdir: str | Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run every stage in order on Ray (the job's cluster, else a private local one); returns the metrics
    written to the report (after serving, when the recipe serves)."""
    state = DemoState(work=Path(workdir).resolve(), cfg=cfg)
    state.work.mkdir(parents=True, exist_ok=True)
    connect_ray()
    for step in STEPS:
        step(state)
    return state.metrics
