"""Test-suite wall time per module, against the same modules at a baseline commit in the same run.

Each module runs in its own ``pytest`` process (what a module costs on its own: imports, its Ray, its
fixtures), first at ``--baseline-rev`` (the tree of that commit, exported with ``git archive`` into a temp
dir: nothing in this checkout changes), then here; the modules alternate so that machine load drifts onto
both sides alike. Prints progress and a table of seconds and ratios, and writes ``docs/data/suite.json``.
Exit status 1 when a module fails on this side (the time of a failing run measures nothing).

    python -m bench.suite        # every tests/test_*.py; baseline: where this branch left main
    python -m bench.suite tests/test_train.py --baseline-rev HEAD~3 --json /tmp/suite.json
    python -m bench.suite --no-baseline                     # this tree only (e.g. the whole suite's time)

``--whole`` times the whole suite in one ``pytest`` run each side, the way each tree's ``make test`` runs
it (``--baseline-args``, default none: the branch point ran serially; ``--here-args``, default
``-n 2 --dist loadgroup``: pytest-xdist and tests/conftest.py's groups), so shared fixtures and parallel
workers count. It reports each run's wall time, each module's seconds (the sum of its tests' setup, call
and teardown, from ``--junitxml``) and its share of that sum: other work on the machine moves the wall
time, the shares much less (the load average before and after each run is recorded).

    python -m bench.suite --whole                            # baseline: where this branch left main
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import BenchRecord, add_record_args, col  # noqa: E402
from runtime.progress import Progress  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 12 * 60  # `make test` on 2 cores (issue #27)


def git_rev(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def export_tree(rev: str, dest: Path) -> Path:
    """The files of commit ``rev`` under ``dest`` (``git archive``: this checkout is not touched)."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def time_module(tree: Path, module: str, pytest_args: list[str], timeout_s: float) -> dict:
    """Wall seconds of ``pytest MODULE`` run in ``tree`` (its own interpreter: its own imports and Ray)."""
    if not (tree / module).exists():
        return {"seconds": None, "ok": None, "tail": f"{module} does not exist in {tree}"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module, *pytest_args]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "ok": False, "tail": f"timed out after {timeout_s:.0f} s"}
    seconds = time.perf_counter() - started
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return {"seconds": seconds, "ok": proc.returncode in (0, 5), "tail": tail[0]}  # 5: nothing selected


def measure(modules: list[str], baseline: Path | None, pytest_args: list[str],
            timeout_s: float) -> list[dict]:
    rows = []
    progress = Progress("suite", len(modules), unit="modules", every_s=0)
    for module in modules:
        base = time_module(baseline, module, pytest_args, timeout_s) if baseline else {}
        ours = time_module(REPO, module, pytest_args, timeout_s)
        ratio = (ours["seconds"] / base["seconds"]) if base.get("seconds") and ours["seconds"] else None
        rows.append({"module": module, "baseline_s": base.get("seconds"), "seconds": ours["seconds"],
                     "ratio": ratio, "ok": ours["ok"], "baseline_ok": base.get("ok"), "tail": ours["tail"]})
        progress.update(1, extra=f"{module}: {ours['seconds'] or 0:.1f} s ({ours['tail']})")
    return rows


def module_seconds(junit: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Per test module: the sum of its test cases' times (setup + call + teardown), and how many failed."""
    seconds: dict[str, float] = defaultdict(float)
    failed: dict[str, int] = defaultdict(int)
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").removeprefix("tests.").split(".")[0] + ".py"
        seconds[module] += float(case.get("time") or 0.0)
        failed[module] += int(case.find("failure") is not None or case.find("error") is not None)
    return dict(seconds), dict(failed)


def time_whole(tree: Path, pytest_args: list[str], timeout_s: float) -> dict:
    """Wall seconds of the whole suite in one ``pytest`` run in ``tree``, and its per-module seconds."""
    with tempfile.TemporaryDirectory(prefix="vs_suite_junit_") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *pytest_args, "tests"]
        load_before, started = os.getloadavg()[0], time.perf_counter()
        print(f"[suite] {tree}: {shlex.join(cmd[1:])}", flush=True)
        try:
            proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"seconds": None, "ok": False, "tail": f"timed out after {timeout_s:.0f} s", "modules": {}}
        seconds = time.perf_counter() - started
        modules, failed = module_seconds(junit) if junit.exists() else ({}, {})
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return {"seconds": seconds, "ok": proc.returncode == 0, "tail": tail[0], "modules": modules,
            "failed": failed, "load": [round(load_before, 1), round(os.getloadavg()[0], 1)]}


def whole_rows(base: dict, ours: dict) -> list[dict]:
    """One row per module (seconds and share of the sum, each side), then the sums and the wall times."""
    base_sum, ours_sum = sum(base["modules"].values()), sum(ours["modules"].values())

    def share(value: float | None, total: float) -> float | None:
        return value / total if value is not None and total else None

    def ratio(here: float | None, then: float | None) -> float | None:
        return here / then if here is not None and then else None

    rows = []
    for module in sorted(set(base["modules"]) | set(ours["modules"]),
                         key=lambda m: -base["modules"].get(m, ours["modules"].get(m, 0.0))):
        b, o = base["modules"].get(module), ours["modules"].get(module)
        rows.append({"module": module, "baseline_s": b, "baseline_share": share(b, base_sum), "seconds": o,
                     "share": share(o, ours_sum), "ratio": ratio(o, b),
                     "ok": not ours.get("failed", {}).get(module)})
    rows.append({"module": "all (sum of modules)", "baseline_s": base_sum, "seconds": ours_sum,
                 "ratio": ratio(ours_sum, base_sum), "ok": ours["ok"]})
    rows.append({"module": "wall time of the run", "baseline_s": base["seconds"], "seconds": ours["seconds"],
                 "ratio": ratio(ours["seconds"], base["seconds"]), "ok": ours["ok"]})
    return rows


def record_whole(record: BenchRecord, base: dict, ours: dict, rev: str, here_args: str) -> None:
    record.table("whole", columns=[col("module", "module"), col("baseline_s", f"s at {rev}", "{:.1f}"),
                                   col("baseline_share", "share", "{:.1%}"),
                                   col("seconds", "s here", "{:.1f}"), col("share", "share", "{:.1%}"),
                                   col("ratio", "here/baseline", "{:.2f}x"), col("ok", "passed")],
                 rows=whole_rows(base, ours), sample_size="one whole-suite run each side (load average "
                 f"before/after: baseline {base.get('load')}, here {ours.get('load')})",
                 baseline=f"the whole suite at {rev} in one pytest run, just before this tree's",
                 filtering=f"here: pytest {here_args}")
    wall, then = ours["seconds"], base["seconds"]
    measured = f"{wall / 60:.1f} min" if wall else "failed"
    if wall and then:
        measured += f" ({wall / then:.2f}x of {then / 60:.1f} min)"
    record.add_headline("test suite (one pytest run, as `make test`)", f"<= {TARGET_S // 60} min on 2 cores",
                        measured, "yes" if ours["ok"] and wall and wall <= TARGET_S else "no")


def run_whole(args: argparse.Namespace, record: BenchRecord, rev: str) -> int:
    with tempfile.TemporaryDirectory(prefix="vs_suite_base_") as tmp:
        baseline = export_tree(rev, Path(tmp))
        base = time_whole(baseline, shlex.split(args.baseline_args), args.timeout)
    ours = time_whole(REPO, shlex.split(args.here_args), args.timeout)
    for name, run in (("baseline", base), ("here", ours)):
        print(f"  {name:<9} {run['seconds'] or 0:8.1f} s  load {run.get('load')}  {run['tail']}")
    record_whole(record, base, ours, rev, args.here_args)
    record.write(args.json, note=args.note)
    return 0 if ours["ok"] else 1


def record_rows(record: BenchRecord, rows: list[dict], rev: str | None) -> None:
    total = sum(r["seconds"] or 0 for r in rows)
    base_total = sum(r["baseline_s"] or 0 for r in rows) if rev else None
    rows = rows + [{"module": "all (sum)", "baseline_s": base_total, "seconds": total,
                    "ratio": total / base_total if base_total else None,
                    "ok": all(r["ok"] for r in rows), "baseline_ok": None, "tail": ""}]
    record.table("modules", columns=[col("module", "module"), col("baseline_s", f"s at {rev}", "{:.1f}"),
                                     col("seconds", "s here", "{:.1f}"), col("ratio", "here/baseline",
                                                                              "{:.2f}x"),
                                     col("ok", "passed")],
                 rows=rows, sample_size="one run of each module, each in its own pytest process",
                 baseline=f"the same modules at {rev}, alternating with this tree" if rev else "none",
                 filtering="none")
    record.add_headline("test suite (sum of modules)", f"<= {TARGET_S // 60} min on 2 cores",
                        f"{total / 60:.1f} min", "yes" if total <= TARGET_S else "no")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help="test modules (default: every tests/test_*.py)")
    p.add_argument("--baseline-rev", default=None,
                   help="commit to compare with (default: git merge-base HEAD main)")
    p.add_argument("--no-baseline", action="store_true", help="time this tree only")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-m \"not slow\"'")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    p.add_argument("--whole", action="store_true", help="the whole suite in one pytest run each side")
    p.add_argument("--baseline-args", default="--timeout=900",
                   help="--whole: the baseline's pytest arguments (its make test)")
    p.add_argument("--here-args", default="--timeout=900 -n 2 --dist loadgroup",
                   help="--whole: this tree's pytest arguments (make test)")
    add_record_args(p, "suite")
    args = p.parse_args(argv)
    record = BenchRecord.start("suite", sys.argv[1:] if argv is None else argv)
    modules = args.modules or sorted(str(m.relative_to(REPO)) for m in (REPO / "tests").glob("test_*.py"))
    rev = None if args.no_baseline else (args.baseline_rev or git_rev("merge-base", "HEAD", "main"))
    if args.whole:
        return run_whole(args, record, rev or "HEAD")
    with tempfile.TemporaryDirectory(prefix="vs_suite_base_") as tmp:
        baseline = export_tree(rev, Path(tmp)) if rev else None
        rows = measure(modules, baseline, shlex.split(args.pytest_args), args.timeout)
    for r in rows:
        base = f"{r['baseline_s']:.1f} s" if r["baseline_s"] else "-"
        print(f"  {r['module']:<36} {base:>9} -> {r['seconds'] or 0:7.1f} s"
              + (f"  ({r['ratio']:.2f}x)" if r["ratio"] else "") + ("" if r["ok"] else "  FAILED"))
    record_rows(record, rows, rev)
    record.write(args.json, note=args.note)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
