"""Render the tables of docs/ from the JSON envelopes the bench scripts write (docs/data/*.json).

A doc asks for a table with a pair of markers; everything between them is replaced on every render:

    <!-- table:decode.ratios -->          table ``ratios`` of docs/data/decode.json
    <!-- /table:decode.ratios -->
    <!-- table:overview -->               one row per headline of every envelope (docs/benchmarks.md)
    <!-- /table:overview -->

Under each table goes the provenance of its figures: the command, date, commit, machine and load average of
the run, and the sample size, baseline and filtering the script recorded. A table whose run was not one clean
commit (uncommitted changes, a commit made mid-run, or no git at all) gets a warning above it naming that,
and its overview rows say so; ``--require-clean`` refuses to render such figures at all. Rendering is
idempotent.

    python -m bench.render_docs                    # rewrite the docs in place
    python -m bench.render_docs --check            # exit 1 when a doc is out of date with its JSON
    python -m bench.render_docs --require-clean    # exit 2 when a rendered figure is not from a clean commit
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from bench.record import DATA_DIR, REPO, format_cell, is_clean

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


def dirty_warning(env: dict, source: str) -> str:
    """The line above a table whose figures come from no single clean commit ('' for a clean one)."""
    git = env.get("git") or {}
    if is_clean(git):
        return ""
    if not git.get("commit"):
        what = "outside a git checkout (no commit)"
    else:
        what = f"on commit {git['commit'][:10]} with uncommitted changes"
        if git.get("commit_at_end"):
            what = f"while the tree moved from commit {git['commit'][:10]} to {git['commit_at_end'][:10]}"
        paths = git.get("dirty_paths") or []
        if paths:
            what += " (" + ", ".join(f"`{p}`" for p in paths[:5]) + (", ..." if len(paths) > 5 else "") + ")"
    return (f"> **Not from a clean commit:** the figures below (`{source}`) were measured {what}; no commit "
            f"reproduces them. Re-run `{shown_command(env)}` on a clean checkout.\n\n")


def render_table(name: str, data_dir: Path, require_clean: bool = False) -> str:
    if name == OVERVIEW:
        return render_overview(data_dir, require_clean)
    stem, _, table = name.rpartition(".")
    if not stem:
        raise RenderError(f"table name {name!r} is not <json stem>.<table>")
    env = load(data_dir, stem)
    if table not in env.get("tables", {}):
        raise RenderError(f"{stem}.json has no table {table!r} (has: {sorted(env.get('tables', {}))})")
    spec = env["tables"][table]
    source = shown_path(data_dir / f"{stem}.json")
    check_clean(env, source, require_clean)
    lines = [dirty_warning(env, source).rstrip("\n")] if not is_clean(env.get("git")) else []
    lines += [""] if lines else []
    lines += [f"**{spec['title']}**", ""] if spec.get("title") else []
    lines += markdown_table(spec["columns"], spec["rows"])
    lines += ["", f"*Sample: {spec['sample_size']}. Baseline: {spec['baseline']}. "
                  f"Filtering: {spec['filtering']}. {provenance(env, source)}*"]
    return "\n".join(lines) + "\n"


def check_clean(env: dict, source: str, require_clean: bool) -> None:
    if require_clean and not is_clean(env.get("git")):
        raise RenderError(f"{source} was not measured from a clean commit (git: {env.get('git')}); "
                          "re-run its bench on a clean checkout")


def shown_commit(env: dict) -> str:
    git = env.get("git") or {}
    commit = (git.get("commit") or "no commit")[:10]
    return commit if is_clean(git) else f"**{commit}, not clean**"


def render_overview(data_dir: Path, require_clean: bool = False) -> str:
    rows = []
    for path in sorted(data_dir.glob("*.json")):
        env = json.loads(path.read_text())
        load = env.get("load_avg") or {}
        shown_load = f"{(load.get('start') or ['?'])[0]} → {(load.get('end') or ['?'])[0]}"
        for h in env.get("headline", []):
            check_clean(env, shown_path(path), require_clean)
            source = f"`{shown_path(path)}` ({env['date_start'][:10]})"
            rows.append({**h, "load": shown_load, "commit": shown_commit(env), "source": source})
    columns = [{"key": k, "label": label, "fmt": None} for k, label in
               [("stage", "stage"), ("floor", "floor"), ("measured", "measured"), ("met", "met?"),
                ("load", "load average (1 min), start → end"), ("commit", "commit"), ("source", "source")]]
    lines = markdown_table(columns, rows)
    lines += ["", "*Each row is computed by the bench script and read from the named file; the sample size, "
                  "baseline, filtering and machine load of every figure are printed under its table on the "
                  "detail page.*"]
    return "\n".join(lines) + "\n"


def render_text(text: str, data_dir: Path, require_clean: bool = False) -> str:
    """``text`` with every marker block re-rendered from ``data_dir``."""
    opened = OPEN.findall(text)
    closed = re.findall(r"<!-- /table:([\w.\-]+) -->", text)
    if sorted(opened) != sorted(closed) or len(MARKER.findall(text)) != len(opened):
        raise RenderError(f"unpaired table markers: opened {opened}, closed {closed}")
    def block(m: re.Match) -> str:
        name = m["name"]
        return f"<!-- table:{name} -->\n{render_table(name, data_dir, require_clean)}<!-- /table:{name} -->"

    return MARKER.sub(block, text)


def doc_files(docs_dir: Path) -> list[Path]:
    return sorted(p for p in docs_dir.rglob("*.md") if "<!-- table:" in p.read_text())


def render_docs(docs: list[Path], data_dir: Path, check: bool, require_clean: bool = False) -> list[Path]:
    """Re-render ``docs``; with ``check`` write nothing. Returns the docs that were (or would be) changed."""
    changed = []
    for doc in docs:
        old = doc.read_text()
        try:
            new = render_text(old, data_dir, require_clean)
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
    p.add_argument("--require-clean", action="store_true",
                   help="refuse (exit 2) to render figures not measured from one clean commit")
    args = p.parse_args(argv)
    try:
        changed = render_docs(doc_files(args.docs_dir), args.data_dir, args.check, args.require_clean)
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
