"""bench/gpu.py: the dry run (every section at toy size on CPU, so the GPU script cannot rot), the section
runner (budgets, failures), the refusal without CUDA, and GPU-only checks that run where CUDA is present."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import gpu

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False here): runs on the GPU machine only"

# Per-section tables every dry run must fill (the sections table lists all six).
SECTION_TABLES = {"decode": ["decode"], "embed": ["embed"], "pipeline": ["pipeline_paths", "pipeline_floors"],
                  "train": ["train"], "faiss": ["faiss"], "scaling": ["scaling"]}


def _numbers(rows: list[dict]) -> list[float]:
    return [v for r in rows for v in r.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_dry_run_runs_every_section_on_cpu(tmp_path):
    """``python -m bench.gpu --dry-run`` runs all six sections on CPU and writes the envelope: every section
    ok, every table filled with finite figures, the dry run labelled as such."""
    out = tmp_path / "gpu.json"
    budgets = [arg for name in gpu.SECTIONS for arg in ("--budget", f"{name}=900")]  # a loaded CI machine
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--out", str(out), "--workdir",
                           str(tmp_path / "work"), *budgets], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    envelope = json.loads(out.read_text())
    tables = envelope["tables"]
    statuses = {r["section"]: r for r in tables["sections"]["rows"]}
    assert list(statuses) == list(gpu.SECTIONS)
    assert all(r["status"] == "ok" for r in statuses.values()), statuses
    for section, names in SECTION_TABLES.items():
        for name in names:
            rows = tables[name]["rows"]
            assert rows, f"{section}: table {name} is empty"
            assert all(math.isfinite(v) for v in _numbers(rows)), rows
    assert {r["arm"] for r in tables["embed"]["rows"]} == {"fp32", "bf16 autocast"}
    assert {r["workers"] for r in tables["scaling"]["rows"]} == {1, 2}
    assert {r["stage"] for r in tables["scaling"]["rows"]} == {"ingest (transcode)", "decode"}
    assert envelope["extra"]["dry_run"] is True and envelope["extra"]["device"] == "cpu"
    assert all("dry run" in h["stage"] for h in envelope["headline"])
    assert "DRY RUN" in proc.stdout


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is present: the refusal only happens on a machine without a GPU")
def test_real_run_refuses_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--out", str(out), "--sections", "embed"])
    message = str(exc.value.code)
    assert "CUDA is not available" in message and "--dry-run" in message
    assert not out.exists()


def _settings(tmp_path, **budgets) -> gpu.Settings:
    args = gpu.parse_args(["--dry-run", "--workdir", str(tmp_path / "work")])
    settings = gpu.settings_for(args)
    settings.budgets.update(budgets)
    return settings


def test_a_section_over_budget_stops_at_its_next_step_and_keeps_its_rows(tmp_path):
    """The runner's budget: a section asks before each step; past the budget it stops there, and the rows it
    measured so far stay."""
    def section(settings, budget, out):
        for step in range(1000):
            if not budget.allows(f"step {step}"):
                return
            t0 = time.perf_counter()
            np.linalg.svd(np.random.default_rng(step).standard_normal((64, 64)))
            out.add("steps", {"step": step, "seconds": time.perf_counter() - t0})
            time.sleep(0.02)

    out = gpu.SectionOut()
    status = gpu.run_section("embed", section, _settings(tmp_path, embed=0.3), out)
    assert status["status"] == "over budget"
    kept = len(out.tables["steps"])
    assert 1 <= kept < 1000
    assert status["detail"] == f"stopped before step {kept}"


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """A section that raises becomes an error row naming the exception; the next section runs and the
    envelope is written; the exit status says a section failed."""
    def broken(settings, budget, out):
        out.add("decode", {"video": "v", "arm": "a", "frames_per_s": 1.0, "vs_cpu": 1.0,
                           "mean_abs_diff": 0.0})
        raise ValueError("decoder exploded on purpose")

    monkeypatch.setitem(gpu.SECTION_FUNCTIONS, "decode", broken)
    out = tmp_path / "gpu.json"
    code = gpu.main(["--dry-run", "--sections", "decode,train", "--out", str(out),
                     "--workdir", str(tmp_path / "work")])
    assert code == 1
    tables = json.loads(out.read_text())["tables"]
    statuses = {r["section"]: r for r in tables["sections"]["rows"]}
    assert statuses["decode"]["status"] == "error"
    assert statuses["decode"]["detail"] == "ValueError: decoder exploded on purpose"
    assert statuses["train"]["status"] == "ok"
    assert len(tables["decode"]["rows"]) == 1  # what it measured before failing is kept
    assert {r["arm"] for r in tables["train"]["rows"]} == {"fp32", "bf16 autocast"}


def test_budget_flags_and_section_names_are_checked():
    args = gpu.parse_args(["--dry-run", "--budget", "faiss=5", "--sections", "faiss,decode"])
    assert args.budget == {"faiss": 5.0} and args.sections == ["faiss", "decode"]
    with pytest.raises(SystemExit):
        gpu.parse_args(["--budget", "nvdec=5"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--sections", "decode,warp"])


def test_dry_run_never_writes_the_docs_figures():
    assert gpu.parse_args(["--dry-run"]).json != REPO_ROOT / "docs" / "data" / "gpu.json"
    assert gpu.parse_args([]).json == REPO_ROOT / "docs" / "data" / "gpu.json"


# ---------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)
def test_nvdec_gives_the_cpu_decoders_frames(tmp_path):
    path = tmp_path / "v.mp4"
    gpu.make_video(path, 2, keyint_s=1, fps=30, size=(224, 398))
    meta = gpu.probe_video(str(path))
    times = meta.frame_times + 0.5 / meta.fps
    cpu = gpu.TorchCodecBackend("cpu", num_threads=4).decode_times(str(path), times, meta).frames
    nvdec = gpu.TorchCodecBackend("cuda").decode_times(str(path), times, meta).frames
    assert nvdec.shape == cpu.shape
    assert np.abs(nvdec.astype(np.int16) - cpu.astype(np.int16)).mean() < 3.0  # colour conversion only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)
def test_faiss_gpu_index_finds_what_the_cpu_index_finds():
    import faiss

    assert faiss.get_num_gpus() > 0, "faiss-gpu is not the faiss installed (docs/gpu.md: install)"
    xb = gpu.make_vectors(50_000, 64, seed=1)
    xq = xb[:200] + 0.01
    on_gpu = gpu.faiss_arm("IVF256,PQ16", xb, xq, nprobe=16, device="cuda", threads=4)
    on_cpu = gpu.faiss_arm("IVF256,PQ16", xb, xq, nprobe=16, device="cpu", threads=4)
    truth = np.arange(200)[:, None]
    assert gpu.recall_at_k(on_gpu["found"][:, :10], truth, 10) >= 0.9
    assert gpu.recall_at_k(on_cpu["found"][:, :10], truth, 10) >= 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)
def test_busy_sampler_reads_nvml_while_the_gpu_works():
    x = torch.randn(4096, 4096, device="cuda")
    with gpu.BusySampler("cuda", interval_s=0.05) as busy:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.5:
            x = (x @ x).clamp_(-1, 1)
        torch.cuda.synchronize()
    assert busy.source == "nvml"
    assert busy.busy_mean() > 50 and busy.memory_max_mb() > 64
