"""bench/scale.py's dry run end to end (a tiny corpus through every build, serving sweep, the fan-out, the
cost model, the plot and the record), so the script cannot rot; and its record renders into docs/scale.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from bench.render_docs import render_text


@pytest.mark.slow
def test_bench_scale_dry_run(tmp_path):
    """``bench/scale.py --dry-run`` end to end (tiny corpus: every build, serve sweep, fan-out, plot and
    record), so the script cannot rot. First in the module: it starts its own Ray before the fixture's."""
    out, png = tmp_path / "scale.json", tmp_path / "scale.png"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--dry-run", "--json", str(out), "--plot",
                           str(png), "--workdir", str(tmp_path / "work")], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    systems = {r["system"]: r for r in record["tables"]["systems"]["rows"]}
    assert set(systems) == {"vidsift", "hnsw", "lancedb"}
    for row in systems.values():
        assert 0 <= row["recall"] <= 1 and row["p50_ms"] > 0 and row["qps"] > 0 and row["build_s"] > 0
        assert row["bytes_per_vector"] > 0 and row["anon_x"] > 0
    # codes + re-rank under the dry run's budget (0.25 x raw), tuned to 0.95: the ground truth must agree
    assert systems["vidsift"]["recall"] > 0.9 and "re-rank" in systems["vidsift"]["setting"]
    fan = {r["mode"]: r for r in record["tables"]["fanout"]["rows"]}
    assert set(fan) == {"1 process", "2 shard deployments", "4 shard deployments"}
    assert all(r["identical"] == "yes" for r in fan.values())
    assert [r["stage"] for r in record["tables"]["cost"]["rows"]][0].startswith("ingest")
    floors = [h["floor"] for h in record["headline"]]  # the floors, each with the dry run's figure
    assert len(floors) == 6 and all("4,000" in h["measured"] or "not run" in h["measured"]
                                    for h in record["headline"]), record["headline"]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    _renders_into_scale_md(out, tmp_path / "data")
    _replots_from_records(out, tmp_path)


def _replots_from_records(record_path, tmp_path) -> None:
    """``--replot`` draws the plot of several records' sizes without measuring; a file that is not a
    bench.scale record is an error naming it."""
    png, other = tmp_path / "replot.png", tmp_path / "other.json"
    other.write_text(json.dumps({"extra": {}}))
    run = [sys.executable, "-m", "bench.scale", "--plot", str(png), "--replot"]
    proc = subprocess.run([*run, str(record_path), str(record_path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.read_bytes()[:4] == b"\x89PNG"
    proc = subprocess.run([*run, str(other)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "other.json: no extra.results" in proc.stderr, proc.stderr[-2000:]


def _renders_into_scale_md(record_path, data_dir) -> None:
    """The record's three tables render (bench.render_docs) as docs/scale.md's markers ask for them."""
    names = ("scale.systems", "scale.fanout", "scale.cost")
    data_dir.mkdir()
    (data_dir / "scale.json").write_text(record_path.read_text())
    text = "".join(f"<!-- table:{n} -->\n<!-- /table:{n} -->\n" for n in names)
    rendered = render_text(text, data_dir)
    for needle in ("| 4,000 | vidsift |", "| 4,000 | 4 shard deployments |", "| index build |"):
        assert needle in rendered, rendered


@pytest.mark.slow
def test_bench_scale_hops_dry_run(tmp_path):
    """``bench/scale_hops.py --dry-run``: one process vs 2 and 4 shard deployments (by value, by reference,
    bare ping) with every hop timed, and 1 vs 2 replicas; the record has both tables."""
    out = tmp_path / "hops.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "bench.scale_hops", "--dry-run", "--json", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    hops = {r["mode"]: r for r in record["tables"]["hops"]["rows"]}
    assert "1 process" in hops and "4 deployments, by value" in hops and "2 deployments, bare ping" in hops
    assert "4 deployments, bare ping, Serve's thread pool" in hops  # the replicas' settings' baseline
    for mode in ("2 deployments, by value", "4 deployments, by reference (Serve's default)",
                 "4 deployments, by value, Serve's thread pool"):
        row = hops[mode]
        assert row["p50_ms"] > 0 and all(row[f"{h}_ms"] is not None for h in ("request", "replica", "reply"))
        assert row["replica_ms"] >= 0 and row["request_ms"] > 0 and row["reply_ms"] > 0
    replicas = record["tables"]["replicas"]["rows"]
    assert [r["replicas"] for r in replicas] == [None, 1, 2] and all(r["qps"] > 0 for r in replicas)
    assert replicas[2]["served_by"] == 2  # both replicas answered
    assert record["headline"][0]["stage"].startswith("fan-out over 4 shard deployments")
