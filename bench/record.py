"""The result envelope every bench script writes, and the only way figures reach docs/.

A bench run builds a :class:`BenchRecord` when it starts (date, load average, git commit), adds one or more
tables (raw rows plus how to show them: column labels and formats, and what every figure needs next to
it: its sample size, its baseline and any filtering), and writes the envelope as JSON, atomically, to
``--json PATH`` (default ``docs/data/<script>.json``). ``python -m bench.render_docs`` renders the tables
into the docs between ``<!-- table:NAME -->`` markers; no figure in a rendered table is typed by hand.
The envelope's ``git`` says which commit was measured and whether the tree was dirty (uncommitted changes at
the start or the end of the run, or a commit made during it): figures from a dirty tree are rendered under a
warning, and ``render_docs --require-clean`` refuses them.

    record = BenchRecord.start("decode", argv)
    record.table("ratios", columns=[col("video", "video"), col("exact_full", "exact/full", "{:.3f}")],
                 rows=[...], sample_size="8 cells x 5 repeats", baseline="full decode, same run",
                 filtering="none")
    record.write(args.json)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "docs" / "data"
SCHEMA = 1


def col(key: str, label: str, fmt: str | None = None) -> dict[str, str | None]:
    """A column: ``key`` of the row dicts, its header ``label``, and a ``str.format`` spec (``"{:.2f}x"``)."""
    return {"key": key, "label": label, "fmt": fmt}


def format_cell(value: Any, fmt: str | None = None) -> str:
    """One table cell: ``fmt.format(value)`` for numbers, ``–`` for a missing or NaN value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt.format(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    """``min–max`` of ``values`` in ``fmt`` (one value when they are all equal)."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def default_json(script: str) -> Path:
    return DATA_DIR / f"{script}.json"


def add_record_args(parser: argparse.ArgumentParser, script: str) -> None:
    """``--json PATH`` (default ``docs/data/<script>.json``) and ``--note TEXT`` (stored in the envelope)."""
    parser.add_argument("--json", type=Path, default=default_json(script),
                        help=f"write the result envelope here (default: docs/data/{script}.json)")
    parser.add_argument("--note", default="", help="free text stored with the result (e.g. what else ran)")


MAX_DIRTY_PATHS = 20


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """Commit of the tree the bench runs from, whether it has uncommitted changes (tracked or untracked files,
    ignored ones aside) and the first :data:`MAX_DIRTY_PATHS` of them. Outside a git checkout the commit and
    ``dirty`` are None: unknown, which the docs treat as dirty."""
    def run(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=30,
                                  check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    commit = (run("rev-parse", "HEAD") or "").strip()
    status = run("status", "--porcelain") if commit else None
    if status is None:
        return {"commit": None, "dirty": None, "dirty_paths": []}
    paths = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(paths), "dirty_paths": paths[:MAX_DIRTY_PATHS]}


def run_git_state(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """The git state of a whole run: the commit it started from; dirty when the tree was dirty at either end
    or the commit moved during the run (the figures then belong to no single commit)."""
    moved = start.get("commit") != end.get("commit")
    dirty = None if start.get("dirty") is None or end.get("dirty") is None else \
        bool(start["dirty"] or end["dirty"] or moved)
    paths = list(dict.fromkeys((start.get("dirty_paths") or []) + (end.get("dirty_paths") or [])))
    state = {"commit": start.get("commit"), "dirty": dirty, "dirty_paths": paths[:MAX_DIRTY_PATHS]}
    if moved:
        state["commit_at_end"] = end.get("commit")
    return state


def is_clean(git: dict[str, Any] | None) -> bool:
    """Whether a record's figures come from one known commit with no uncommitted changes."""
    return bool(git) and bool(git.get("commit")) and git.get("dirty") is False


def machine() -> dict[str, Any]:
    ram = None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "ram_gib": round(ram, 1) if ram else None, "cpu": cpu,
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _clean(value: Any) -> Any:
    """JSON-safe values: NaN/inf become None, numpy scalars and tuples become plain Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class BenchRecord:
    script: str
    argv: list[str]
    started: str
    load_start: list[float]
    t0: float
    git_start: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    headline: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, script: str, argv: list[str] | None) -> BenchRecord:
        return cls(script=script, argv=list(argv or []), started=_utc(), load_start=_load(),
                   t0=time.perf_counter(), git_start=git_state())

    def table(self, name: str, *, columns: list[dict], rows: list[dict], sample_size: str, baseline: str,
              filtering: str = "none", title: str = "") -> None:
        """Add a table. ``sample_size``, ``baseline`` and ``filtering`` are printed under it in the docs."""
        keys = {c["key"] for c in columns}
        missing = sorted(k for k in keys if not any(k in r for r in rows))
        if missing:
            raise ValueError(f"table {name!r}: no row has the column(s) {missing}")
        self.tables[name] = {"title": title, "columns": columns, "rows": rows, "sample_size": sample_size,
                             "baseline": baseline, "filtering": filtering}

    def add_headline(self, stage: str, floor: str, measured: str, met: str) -> None:
        """One row of the overview table in docs/benchmarks.md (rendered from every envelope)."""
        self.headline.append({"stage": stage, "floor": floor, "measured": measured, "met": met})

    def envelope(self, note: str = "") -> dict[str, Any]:
        command = f"python -m bench.{self.script}" + (f" {shlex.join(self.argv)}" if self.argv else "")
        return _clean({
            "schema": SCHEMA, "script": f"bench/{self.script}.py", "argv": self.argv, "command": command,
            "git": run_git_state(self.git_start, git_state()), "date_start": self.started, "date_end": _utc(),
            "duration_s": round(time.perf_counter() - self.t0, 1), "machine": machine(),
            "load_avg": {"start": self.load_start, "end": _load()}, "note": note,
            "tables": self.tables, "headline": self.headline, "extra": self.extra,
        })

    def write(self, path: str | Path | None, note: str = "") -> Path | None:
        """Write the envelope to ``path`` (tmp file + rename, so readers never see half a file)."""
        if path is None:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        envelope = self.envelope(note)
        tmp.write_text(json.dumps(envelope, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)
        print(f"[bench] wrote {path}")
        if not is_clean(envelope["git"]):
            print(f"[bench] WARNING: not measured from one clean commit (git: {envelope['git']}); the docs "
                  "render these figures marked as such: commit, then re-run on the clean tree",
                  file=sys.stderr)
        return path
