"""Shared fixtures: one local Ray per test session, one `ray start --head` for job-submit tests,
and one small synthetic corpus + its ingested shards that every stage's tests reuse."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from pipeline.ingest import run_ingest
from pipeline.synthetic import generate_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now (for a private Ray head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray (2 CPUs), started once per session: ray.init costs ~7 s."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        # address="local" never attaches to some other cluster started with `ray start` on this machine.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head():
    """A private `ray start --head` (auth disabled) for `ray job submit` tests.

    Yields the dashboard address. The head runs in its own process group with `--block`, so teardown
    kills exactly this cluster and never another one on the machine (`ray stop` would kill them all).
    """
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    gcs_port, dash_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="vs_ray_", dir="/tmp")
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--port={gcs_port}", f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--include-dashboard=true",
        # Every fixed default port could be held by another Ray on this machine: take free ones.
        *(f"--{flag}={free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port")),
        f"--object-store-memory={256 * 1024**2}",
    ]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash_port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"ray head did not start (exit={proc.poll()})")
        time.sleep(1)
    yield {"address": address, "env": env, "gcs_address": f"127.0.0.1:{gcs_port}"}
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def ray_job_submit(head: dict, entrypoint: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `ray job submit --working-dir <repo> -- <entrypoint>` against ``head`` and wait for it."""
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
        "--address", head["address"], "--working-dir", str(REPO_ROOT),
        "--runtime-env-json", '{"excludes": [".git", "*.egg-info", "__pycache__", ".pytest_cache"]}',
        "--", *entrypoint,
    ]
    return subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT)


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory):
    """A small deterministic synthetic corpus (24 videos, 2-4 s, 64 px, 1 s keyframes)."""
    out = tmp_path_factory.mktemp("synth")
    generate_corpus(out, n=24, seed=7, min_duration=2.0, max_duration=4.0, size=64, fps=10,
                    keyframe_interval=1.0)
    return out


@pytest.fixture(scope="session")
def ingested_shards(synthetic_corpus, ray_local, tmp_path_factory):
    """The synthetic corpus ingested into WebDataset shards (8 samples a shard) on the shared local Ray."""
    out = tmp_path_factory.mktemp("ingested")
    run_ingest(input=str(synthetic_corpus / "manifest.parquet"), output=str(out), samples_per_shard=8)
    return out
