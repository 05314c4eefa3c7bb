"""A three-node Ray cluster on this machine, for multi-node tests (imported by tests/test_cluster.py).

``cluster3`` (one for the run's tests that use it, conftest.SharedResource: a cluster start costs tens of
seconds on 2 cores) starts a head and two worker nodes as separate node processes with
``ray.cluster_utils.Cluster`` (one raylet + object store each, its own CPUs and a custom resource naming
it), the head with a dashboard on 127.0.0.1 so that
``ray job submit --address http://127.0.0.1:<port> --working-dir .`` works (auth disabled). Every port is a
free one and the cluster has its own temp dir, so it never touches another Ray on the machine; teardown
removes exactly the nodes it started.

:class:`Cluster3` submits jobs (the store's ``AWS_*`` configuration and ``RAY_AUTH_MODE`` travel in the
job's ``--runtime-env-json`` ``env_vars``: nodes started before the S3 server know nothing of it), waits
for them, and removes / adds worker nodes while a job runs (node loss).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SharedResource, free_port

NODE_CPUS = 2  # logical CPUs per node: 6 in all (2 real cores): room for ingest tasks / embed actors + driver
OBJECT_STORE = 96 * 1024**2
EXCLUDES = [".git", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "/runs", "/data"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# The GCS declares a killed node dead after this many failed 1 s health checks (Ray's default: 5 of 3 s), so
# the node-loss tests' retries start ~10 s sooner; each check's own timeout stays Ray's (10 s) under load.
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}


@dataclass
class JobResult:
    submission_id: str
    status: str
    logs: str
    wall_s: float
    submit_output: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"

    def tail(self, n: int = 4000) -> str:
        return f"[{self.submission_id} {self.status}]\n{self.submit_output[-1000:]}\n{self.logs[-n:]}"


@dataclass
class Cluster3:
    """A running three-node cluster: ``address`` is the dashboard (job submission) URL."""

    cluster: object  # ray.cluster_utils.Cluster
    address: str
    temp_dir: Path
    job_env: dict[str, str]  # env_vars of every job: store config + RAY_AUTH_MODE + VIDSIFT_CACHE
    cli_env: dict[str, str]  # env of the `ray job ...` CLI processes
    _added: int = 2
    removed: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------ nodes
    def workers(self) -> list:
        return sorted(self.cluster.worker_nodes, key=lambda n: n.node_id)

    def node_ids(self) -> set[str]:
        return {n.node_id for n in self.cluster.list_all_nodes()}

    def add_worker(self):
        """Start one more worker node (its own raylet, CPUs and a ``vs_worker_<n>`` resource)."""
        self._added += 1
        return self.cluster.add_node(**_node_args(self.temp_dir, f"vs_worker_{self._added}"))

    def remove_worker(self, node=None) -> str:
        """Kill a worker node's processes (raylet, object store, its workers): a node lost mid-run."""
        node = node or self.workers()[0]
        node_id = node.node_id
        self.cluster.remove_node(node, allow_graceful=False)
        self.removed.append(node_id)
        return node_id

    # ------------------------------------------------------------------------------------------- jobs
    def runtime_env(self, env_vars: dict[str, str] | None = None) -> dict:
        return {"excludes": EXCLUDES, "env_vars": {**self.job_env, **(env_vars or {})}}

    def submit(self, entrypoint: list[str], env_vars: dict[str, str] | None = None,
               submission_id: str | None = None) -> str:
        """``ray job submit --no-wait --working-dir <repo>``; returns the submission id."""
        submission_id = submission_id or f"vs-{int(time.time() * 1000)}-{free_port()}"
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--no-wait",
            "--address", self.address, "--working-dir", str(REPO_ROOT),
            "--submission-id", submission_id,
            "--runtime-env-json", json.dumps(self.runtime_env(env_vars)),
            "--", *entrypoint,
        ]
        deadline = time.time() + 120
        while True:  # the head's job agent may still be starting: "try again later"
            proc = subprocess.run(cmd, env=self.cli_env, capture_output=True, text=True, timeout=180,
                                  cwd=REPO_ROOT)
            out = proc.stdout + proc.stderr
            if proc.returncode == 0:
                return submission_id
            if "No available agent" not in out or time.time() > deadline:
                raise RuntimeError(f"ray job submit failed ({proc.returncode}):\n{out[-3000:]}")
            time.sleep(3)

    def status(self, submission_id: str) -> str:
        return self._get(f"/api/jobs/{submission_id}")["status"]

    def logs(self, submission_id: str) -> str:
        return self._get(f"/api/jobs/{submission_id}/logs").get("logs", "")

    def wait(self, submission_id: str, timeout: float = 600, t0: float | None = None) -> JobResult:
        t0 = time.perf_counter() if t0 is None else t0
        deadline = time.time() + timeout
        status = self.status(submission_id)
        while status not in TERMINAL and time.time() < deadline:
            time.sleep(1)
            status = self.status(submission_id)
        if status not in TERMINAL:
            self.stop(submission_id)
        return JobResult(submission_id, status, self.logs(submission_id), time.perf_counter() - t0)

    def run(self, entrypoint: list[str], env_vars: dict[str, str] | None = None,
            timeout: float = 600) -> JobResult:
        """Submit ``entrypoint`` and wait for it: ``JobResult(status, logs, wall_s)``."""
        t0 = time.perf_counter()
        return self.wait(self.submit(entrypoint, env_vars), timeout, t0)

    def stop(self, submission_id: str) -> None:
        with contextlib.suppress(Exception):
            req = urllib.request.Request(f"{self.address}/api/jobs/{submission_id}/stop", method="POST")
            urllib.request.urlopen(req, timeout=10).close()

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.address}{path}", timeout=30) as resp:
            return json.loads(resp.read())


def _node_args(temp_dir: Path, resource: str, head: bool = False) -> dict:
    args = {
        "num_cpus": NODE_CPUS,
        "resources": {resource: 1},
        "object_store_memory": OBJECT_STORE,
        "node_manager_port": free_port(),
        "object_manager_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(),
        "metrics_agent_port": free_port(),
        "runtime_env_agent_port": free_port(),
        # Nodes on one machine share the session dir: each unpacks the job's working dir in its own folder.
        "runtime_env_dir_name": f"runtime_resources_{resource}",
    }
    if head:
        args.update(temp_dir=str(temp_dir), include_dashboard=True, dashboard_host="127.0.0.1",
                    dashboard_port=free_port(), gcs_server_port=free_port(),
                    ray_client_server_port=free_port(), _system_config=HEALTH_CHECKS)
    return args


def _wait_dashboard(address: str, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=3) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"no dashboard at {address}")
        time.sleep(1)


@contextlib.contextmanager
def _keep_driver_ray_state():
    """Leave this process's Ray state as it was, whatever Cluster() does to it.

    - Cluster() writes (and its shutdown deletes) /tmp/ray/ray_current_cluster, which ``ray.init("auto")``
      elsewhere on the machine reads: put back whatever was there before.
    - A new node points the process-wide internal KV client at its GCS when none is set, and
      ``Cluster.shutdown()`` resets it to None. When this session's ``ray_local`` driver is connected, that
      reset cuts it off from its own GCS: later Ray Data / Ray Train runs in the session hang or fail. Put
      back the client that was there before.
    """
    from ray._common.utils import get_ray_address_file  # test helper: Ray's own path for that file
    from ray.experimental import internal_kv  # test helper: the process-wide KV client Cluster() resets

    path = Path(get_ray_address_file(None))
    before = path.read_text() if path.exists() else None
    kv_client = internal_kv.global_gcs_client
    try:
        yield
    finally:
        if kv_client is None:
            internal_kv._internal_kv_reset()
        else:
            internal_kv._initialize_internal_kv(kv_client)
        if before is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            with contextlib.suppress(OSError):
                path.write_text(before)


def start_cluster3(storage_env: dict[str, str], cache_dir: Path) -> tuple[Cluster3, object]:
    from ray.cluster_utils import Cluster  # imported on use: only the cluster tests start one

    temp_dir = Path(tempfile.mkdtemp(prefix="vs_c3_", dir="/tmp"))
    with _keep_driver_ray_state():
        cluster = Cluster(initialize_head=True, head_node_args=_node_args(temp_dir, "vs_head", head=True))
        # The job supervisor resolves its driver's RAY_ADDRESS from <temp dir>/ray_current_cluster; Cluster()
        # writes only the machine-wide /tmp/ray one (put back below), so a job could join another cluster.
        (temp_dir / "ray_current_cluster").write_text(cluster.gcs_address)
        try:
            for i in (1, 2):
                cluster.add_node(**_node_args(temp_dir, f"vs_worker_{i}"))
            cluster.wait_for_nodes(timeout=120)
            address = f"http://{cluster.head_node.webui_url}"
            if not address.startswith("http://127.0.0.1"):
                address = f"http://127.0.0.1:{address.rsplit(':', 1)[1]}"
            _wait_dashboard(address)
        except BaseException:
            cluster.shutdown()
            raise
    job_env = {**storage_env, "RAY_AUTH_MODE": "disabled", "VIDSIFT_CACHE": str(cache_dir)}
    cli_env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cli_env.pop("RAY_ADDRESS", None)
    return Cluster3(cluster, address, temp_dir, job_env, cli_env), cluster


@contextlib.contextmanager
def _cluster3_running(storage_env: dict[str, str], cache_dir: Path) -> Iterator[Cluster3]:
    """``start_cluster3`` with ``RAY_AUTH_MODE`` set for the node processes it starts; its exit removes
    exactly the nodes it started."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # read by the node processes started here (add_worker too)
        mp.delenv("RAY_ADDRESS", raising=False)
        handle, cluster = start_cluster3(storage_env, cache_dir)
        try:
            yield handle
        finally:
            with _keep_driver_ray_state():
                cluster.shutdown()
            shutil.rmtree(handle.temp_dir, ignore_errors=True)  # the nodes' session logs (~25 MB a run)


CLUSTER3 = SharedResource("cluster3", _cluster3_running)


@pytest.fixture
def cluster3(s3_server, tmp_path_factory):
    """A head + 2 worker nodes (``NODE_CPUS`` each), dashboard on 127.0.0.1: one for every test of the run
    that asks for it (tests/test_cluster.py and tests/test_index_distributed.py run next to each other),
    started by the first and stopped after the last (conftest.SharedResource)."""
    if not CLUSTER3.running:
        return CLUSTER3.get(s3_server, tmp_path_factory.mktemp("vidsift_cache"))
    return CLUSTER3.get()
