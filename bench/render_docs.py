"""Render the tables of docs/ from the JSON envelopes the bench scripts write (docs/data/*.json).

A doc asks for a table with a pair of markers; everything between them is replaced on every render:

    <!-- table:decode.ratios -->          table ``ratios`` of docs/data/decode.json
    <!-- /table:decode.ratios -->
    <!-- table:overview -->               one row per headline of every envelope (docs/benchmarks.md)
    <!-- /table:overview -->

Under each table goes the provenance of its figures: the command, date, commit, machine and load average of
the run, and the sample size, baseline and filtering the script recorded. Rendering is idempotent.

    python -m bench.render_docs            # rewrite the docs in place
    python -m bench.render_docs --check    # exit 1 when a doc is out of date with its JSON
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from bench.record import DATA_DIR, REPO, format_cell

DOCS_DIR = REPO / "docs"
OVERVIEW = "overview"
MARKER = re.compile(r"<!-- table:(?P<name>[\w.\-]+) -->\n(?P<body>.*?)<!-- /table:(?P=name) -->", re.DOTALL)
OPEN = re.compile(r"<!-- table:([\w.\-]+) -->")


class RenderError(ValueError):
    """A marker names a JSON file or table that does not exist, or the markers do not pair up."""


def load(data_dir: Path, stem: str) -> dict:
    path = data_dir / f"{stem}.json"
    if not path.exists():
        raise RenderError(f"{path} does not exist (run the bench script that writes it)")
    return json.loads(path.read_text())


def shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return path.name


def markdown_table(columns: list[dict], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(format_cell(c["label"]) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c["key"]), c.get("fmt")) for c in columns) + " |")
    return lines


def shown_command(env: dict) -> str:
    """The command of the run without its ``--note`` (the note is printed on its own)."""
    argv, shown = list(env.get("argv") or []), []
    while argv:
        arg = argv.pop(0)
        if arg == "--note":
            argv = argv[1:]
        elif not arg.startswith("--note="):
            shown.append(arg)
    stem = Path(env["script"]).stem
    return f"python -m bench.{stem}" + (f" {shlex.join(shown)}" if shown else "")


def provenance(env: dict, source: str) -> str:
    """Where a table's figures come from: one italic paragraph under it."""
    git = env.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" + uncommitted changes" if git.get("dirty") else "")
    m = env.get("machine") or {}
    load = env.get("load_avg") or {}
    start, end = (load.get("start") or [None])[0], (load.get("end") or [None])[0]
    text = (f"Rendered from `{source}`: `{shown_command(env)}`, {env['date_start']} "
            f"({env.get('duration_s')} s of wall time), "
            f"commit {commit}; {m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('ram_gib')} GiB RAM; "
            f"load average (1 min) {start} at start, {end} at end")
    if env.get("note"):
        text += f"; {env['note'].rstrip('.')}"
    return text + "."


def render_table(name: str, data_dir: Path) -> str:
    if name == OVERVIEW:
        return render_overview(data_dir)
    stem, _, table = name.rpartition(".")
    if not stem:
        raise RenderError(f"table name {name!r} is not <json stem>.<table>")
    env = load(data_dir, stem)
    if table not in env.get("tables", {}):
        raise RenderError(f"{stem}.json has no table {table!r} (has: {sorted(env.get('tables', {}))})")
    spec = env["tables"][table]
    lines = [f"**{spec['title']}**", ""] if spec.get("title") else []
    lines += markdown_table(spec["columns"], spec["rows"])
    source = shown_path(data_dir / f"{stem}.json")
    lines += ["", f"*Sample: {spec['sample_size']}. Baseline: {spec['baseline']}. "
                  f"Filtering: {spec['filtering']}. {provenance(env, source)}*"]
    return "\n".join(lines) + "\n"


def render_overview(data_dir: Path) -> str:
    rows = []
    for path in sorted(data_dir.glob("*.json")):
        env = json.loads(path.read_text())
        load = env.get("load_avg") or {}
        shown_load = f"{(load.get('start') or ['?'])[0]} → {(load.get('end') or ['?'])[0]}"
        for h in env.get("headline", []):
            source = f"`{shown_path(path)}` ({env['date_start'][:10]})"
            rows.append({**h, "load": shown_load, "source": source})
    columns = [{"key": k, "label": label, "fmt": None} for k, label in
               [("stage", "stage"), ("floor", "floor"), ("measured", "measured"), ("met", "met?"),
                ("load", "load average (1 min), start → end"), ("source", "source")]]
    lines = markdown_table(columns, rows)
    lines += ["", "*Each row is computed by the bench script and read from the named file; the sample size, "
                  "baseline, filtering and machine load of every figure are printed under its table on the "
                  "detail page.*"]
    return "\n".join(lines) + "\n"


def render_text(text: str, data_dir: Path) -> str:
    """``text`` with every marker block re-rendered from ``data_dir``."""
    opened = OPEN.findall(text)
    closed = re.findall(r"<!-- /table:([\w.\-]+) -->", text)
    if sorted(opened) != sorted(closed) or len(MARKER.findall(text)) != len(opened):
        raise RenderError(f"unpaired table markers: opened {opened}, closed {closed}")
    return MARKER.sub(lambda m: f"<!-- table:{m['name']} -->\n{render_table(m['name'], data_dir)}"
                                f"<!-- /table:{m['name']} -->", text)


def doc_files(docs_dir: Path) -> list[Path]:
    return sorted(p for p in docs_dir.rglob("*.md") if "<!-- table:" in p.read_text())


def render_docs(docs: list[Path], data_dir: Path, check: bool) -> list[Path]:
    """Re-render ``docs``; with ``check`` write nothing. Returns the docs that were (or would be) changed."""
    changed = []
    for doc in docs:
        old = doc.read_text()
        try:
            new = render_text(old, data_dir)
        except RenderError as exc:
            raise RenderError(f"{doc}: {exc}") from exc
        if new != old:
            changed.append(doc)
            if not check:
                doc.write_text(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a doc is out of date; write nothing")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--docs-dir", type=Path, default=DOCS_DIR, help="every *.md below it with markers")
    args = p.parse_args(argv)
    try:
        changed = render_docs(doc_files(args.docs_dir), args.data_dir, args.check)
    except RenderError as exc:
        print(f"render_docs: {exc}", file=sys.stderr)
        return 2
    for doc in changed:
        print(f"{'out of date' if args.check else 'rendered'}: {shown_path(doc)}")
    if args.check and changed:
        print("run: python -m bench.render_docs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
