"""Shared fixtures: one local Ray per test module, one `ray start --head` for job-submit tests,
and one small synthetic corpus + its ingested shards that every stage's tests reuse."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray

from pipeline.ingest import run_ingest
from synthetic import generate_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]
# The interpreter running the tests comes first on PATH, as if its virtualenv were activated: `ray job
# submit` entrypoints, `ray start` and every subprocess that says `python` must get the environment that
# has vidsift's dependencies (`make test` runs .venv/bin/python without activating .venv).
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])


def free_port() -> int:
    """A TCP port nobody listens on right now (for a private Ray head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    """Poll ``url`` until it answers; kill ``proc``'s process group and fail the test if it never does."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # any HTTP answer means the server is up
            return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{what} did not start (exit={proc.poll()})")
        time.sleep(0.5)


def _stop_group(proc: subprocess.Popen) -> None:
    """End exactly the process group this fixture started."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _restore_sigint():
    """Put back the SIGINT handler a test found: a library that installs its own (Ray Train's ``fit()`` does,
    and keeps it) must not leave the rest of the session deaf to Ctrl-C."""
    before = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not before:
        signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server (the real S3 HTTP API) on 127.0.0.1, once per session.

    Yields the environment a client needs: only the standard ``AWS_ENDPOINT_URL`` and ``AWS_*`` variables.
    """
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    _wait_http(endpoint, proc, "moto S3 server")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    yield env
    _stop_group(proc)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request):
    """A fresh bucket on the session's S3 server, with this process's AWS_* variables pointing at it.

    Yields ``s3://<bucket>``."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    import boto3  # test-only client; vidsift itself reaches S3 through runtime.storage

    bucket = "vs-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    bucket = f"{bucket}-{free_port()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """A private local Ray (2 CPUs), one per test module that asks for it (``ray.init`` costs ~7 s).

    Not one per session: a driver that lived through many modules (killed workers, actor pools stopped
    mid-run, 120+ task types) stopped receiving actor state updates from its GCS in CI (Ray 2.60: the GCS
    logged "Actor created successfully", the driver never heard, and the reindex scenario and the Ray Train
    tests waited on an actor pool "pending" forever). A fresh driver per module keeps the tests independent.

    The session's S3 server configuration is in this process's environment before Ray starts, so every Ray
    process inherits it: Ray Train's controller actor gets only Ray's own environment, never a job's
    ``worker_runtime_env`` (on a real cluster the store configuration comes from the nodes: IAM roles)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.update(s3_server)
    started_here = not ray.is_initialized()
    if started_here:
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
    if started_here:
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
def ingested_shards(synthetic_corpus, s3_server, tmp_path_factory):
    """The synthetic corpus ingested into WebDataset shards (8 samples a shard), once per session: on the
    module's Ray when one is up, else on a private one that ``run_ingest`` starts and stops."""
    os.environ.update(s3_server)  # whichever Ray runs it starts with the store configuration
    out = tmp_path_factory.mktemp("ingested")
    run_ingest(input=str(synthetic_corpus / "manifest.parquet"), output=str(out), samples_per_shard=8)
    return out
