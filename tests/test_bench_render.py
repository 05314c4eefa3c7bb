"""bench.record + bench.render_docs: every measured table in docs/ is rendered from a bench's JSON."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from bench import render_docs
from bench.record import BenchRecord, col, format_cell, git_state, is_clean, run_git_state, span
from bench.render_docs import RenderError, render_text

REPO = Path(__file__).resolve().parents[1]
MEASURED_DOCS = [REPO / "docs" / "results.md", REPO / "docs" / "benchmarks.md", REPO / "docs" / "scale.md",
                 *sorted((REPO / "docs" / "benchmarks").glob("*.md"))]


def _record(path: Path, value: float = 1.5) -> dict:
    record = BenchRecord.start("demo", ["--n", "3"])
    record.table("rates", columns=[col("name", "name"), col("rate", "videos/s", "{:.1f}"),
                                   col("ratio", "ratio", "{:.2f}x")],
                 rows=[{"name": "ours", "rate": value, "ratio": 2.0}, {"name": "base", "rate": 0.75,
                                                                       "ratio": float("nan")}],
                 sample_size="3 videos", baseline="base, same run", filtering="none")
    record.add_headline("demo", ">= 1.5x base", f"{value / 0.75:.1f}x", "yes")
    record.write(path, note="test run")
    return json.loads(path.read_text())


DOC = """# Demo

Before.

<!-- table:demo.rates -->
stale
<!-- /table:demo.rates -->

Between.

<!-- table:overview -->
<!-- /table:overview -->
After.
"""


def test_envelope_has_provenance_and_is_written_atomically(tmp_path):
    env = _record(tmp_path / "demo.json")
    assert env["script"] == "bench/demo.py" and env["command"] == "python -m bench.demo --n 3"
    assert set(env["machine"]) >= {"nproc", "ram_gib", "cpu"} and env["machine"]["nproc"] >= 1
    assert len(env["load_avg"]["start"]) == 3 and len(env["load_avg"]["end"]) == 3
    assert env["git"]["commit"] is None or len(env["git"]["commit"]) == 40
    table = env["tables"]["rates"]
    shown = (table["sample_size"], table["baseline"], table["filtering"])
    assert shown == ("3 videos", "base, same run", "none")
    assert table["rows"][1]["ratio"] is None  # NaN is stored as null (valid JSON)
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"]  # no temp file left behind


def test_table_rejects_a_column_no_row_has():
    record = BenchRecord.start("demo", [])
    with pytest.raises(ValueError, match="no row has the column"):
        record.table("t", columns=[col("missing", "m")], rows=[{"x": 1}], sample_size="1", baseline="none")


def test_format_cell_and_span():
    assert format_cell(1.234, "{:.2f}x") == "1.23x"
    assert format_cell(None) == format_cell(float("nan"), "{:.1f}") == "–"
    assert format_cell("a|b") == "a\\|b"
    assert span([0.5, 0.25, 1.0], "{:.2f}") == "0.25–1.00" and span([2.0, 2.0]) == "2.00"


def test_render_check_and_idempotence(tmp_path):
    data, docs = tmp_path / "data", tmp_path / "docs"
    docs.mkdir()
    _record(data / "demo.json")
    doc = docs / "page.md"
    doc.write_text(DOC)
    argv = ["--data-dir", str(data), "--docs-dir", str(docs)]
    assert render_docs.main(["--check", *argv]) == 1
    assert doc.read_text() == DOC  # --check writes nothing
    assert render_docs.main(argv) == 0
    text = doc.read_text()
    assert "| ours | 1.5 | 2.00x |" in text and "| base | 0.8 | – |" in text
    assert "*Sample: 3 videos. Baseline: base, same run. Filtering: none." in text
    assert "`python -m bench.demo --n 3`" in text and "test run" in text
    assert "| demo | >= 1.5x base | 2.0x | yes | " in text  # the overview row
    assert text.startswith("# Demo\n\nBefore.\n") and text.endswith("After.\n") and "stale" not in text
    assert render_docs.main(["--check", *argv]) == 0
    assert render_text(text, data) == text  # idempotent
    _record(data / "demo.json", value=3.0)  # a new run makes the doc stale again
    assert render_docs.main(["--check", *argv]) == 1


def test_render_errors_name_the_problem(tmp_path):
    _record(tmp_path / "demo.json")
    with pytest.raises(RenderError, match="has no table 'nope'"):
        render_text("<!-- table:demo.nope -->\n<!-- /table:demo.nope -->\n", tmp_path)
    with pytest.raises(RenderError, match="does not exist"):
        render_text("<!-- table:other.rates -->\n<!-- /table:other.rates -->\n", tmp_path)
    with pytest.raises(RenderError, match="unpaired"):
        render_text("<!-- table:demo.rates -->\n", tmp_path)


def test_repo_docs_are_up_to_date_with_docs_data():
    """The committed docs equal a fresh render of docs/data (run `python -m bench.render_docs` if not)."""
    assert render_docs.main(["--check"]) == 0


def test_measured_docs_hold_no_hand_typed_tables():
    """Every table row in the results and benchmark pages sits between render markers; hand-typed tables of
    earlier sessions live in docs/history.md."""
    offenders = []
    for doc in MEASURED_DOCS:
        inside = None
        for n, line in enumerate(doc.read_text().splitlines(), start=1):
            if m := re.match(r"<!-- table:([\w.\-]+) -->", line):
                inside = m[1]
            elif line.startswith("<!-- /table:"):
                inside = None
            elif line.lstrip().startswith("|") and inside is None:
                offenders.append(f"{doc.relative_to(REPO)}:{n}")
    assert offenders == []


def test_shown_command_leaves_out_the_note():
    argv = ["--repeats", "3", "--note", "busy box", "--note=x", "--k", "a b"]
    env = {"script": "bench/decode.py", "argv": argv}
    assert render_docs.shown_command(env) == "python -m bench.decode --repeats 3 --k 'a b'"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_git_state_names_the_commit_and_every_kind_of_dirt(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert git_state(repo) == {"commit": None, "dirty": None, "dirty_paths": []}  # not a checkout: unknown
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("a")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-qm", "a")
    head = _git(repo, "rev-parse", "HEAD")
    clean = git_state(repo)
    assert clean == {"commit": head, "dirty": False, "dirty_paths": []} and is_clean(clean)
    (repo / "a.txt").write_text("changed")
    (repo / "new.txt").write_text("untracked")
    dirty = git_state(repo)
    assert dirty["commit"] == head and dirty["dirty"] is True and not is_clean(dirty)
    assert sorted(dirty["dirty_paths"]) == ["a.txt", "new.txt"]
    # Clean at both ends, but committed mid-run: the figures belong to neither commit.
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "b")
    moved = run_git_state(clean, git_state(repo))
    assert moved["dirty"] is True and moved["commit"] == head and moved["commit_at_end"] != head
    assert run_git_state(clean, clean) == clean
    assert run_git_state(clean, dirty)["dirty"] is True and not is_clean({"commit": None, "dirty": None})


def _with_git(path: Path, git: dict) -> None:
    env = json.loads(path.read_text())
    env["git"] = git
    path.write_text(json.dumps(env))


def test_dirty_figures_are_marked_loudly_and_refused_on_request(tmp_path, capsys):
    data, docs = tmp_path / "data", tmp_path / "docs"
    docs.mkdir()
    _record(data / "demo.json")
    (docs / "page.md").write_text(DOC)
    argv = ["--data-dir", str(data), "--docs-dir", str(docs)]
    _with_git(data / "demo.json", {"commit": "a" * 40, "dirty": True, "dirty_paths": ["bench/demo.py"]})
    assert render_docs.main(["--require-clean", *argv]) == 2
    assert "demo.json was not measured from a clean commit" in capsys.readouterr().err
    assert (docs / "page.md").read_text() == DOC  # refused: nothing written
    assert render_docs.main(argv) == 0
    text = (docs / "page.md").read_text()
    assert "> **Not from a clean commit:**" in text
    assert "aaaaaaaaaa with uncommitted changes (`bench/demo.py`)" in text
    assert "| **aaaaaaaaaa, not clean** |" in text  # the overview row says so too
    _with_git(data / "demo.json", {"commit": None, "dirty": None, "dirty_paths": []})
    assert render_docs.main(argv) == 0 and "outside a git checkout" in (docs / "page.md").read_text()
    _with_git(data / "demo.json", {"commit": "b" * 40, "dirty": False, "dirty_paths": []})
    assert render_docs.main(["--require-clean", *argv]) == 0
    text = (docs / "page.md").read_text()
    assert "Not from a clean commit" not in text and "| bbbbbbbbbb |" in text
