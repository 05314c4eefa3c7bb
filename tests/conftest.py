"""Shared fixtures: one local Ray per test module, one `ray start --head` for job-submit tests,
and one small synthetic corpus + its ingested shards that every stage's tests reuse.

Suite speed (``make test`` runs ``pytest -n 2 --dist loadgroup``, pytest-xdist):

- ``SharedResource``: a costly service (the job-submit head, the three-node cluster) starts for the first
  test that asks for it and stops right after the last one in the run's order, not at session end; the
  modules that use one run next to each other (``pytest_collection_modifyitems``).
- Under xdist every test carries an ``xdist_group``: its module (module-scoped fixtures are built once), or
  the shared resource its module uses (one worker owns it). The groups with ``slow`` tests come first in
  the collection; xdist then sends groups by their number of tests (its default ``--loadscope-reorder``),
  so the order here breaks its ties. Sending the slow groups first (``--no-loadscope-reorder``) ran the
  heaviest end-to-end groups side by side and made each slower; the suite was no faster (one run each).
- Session data (corpus, ingested shards) is built once per run and shared by the workers (``built_once``).
"""

from __future__ import annotations

import os

# One intra-op thread per process, set before torch, FAISS or numpy's BLAS load here, and inherited by
# every process a test starts (Ray's workers and nodes, job drivers, subprocesses). The suite runs two
# pytest workers beside Ray's processes on two cores: a thread the kernel parks holds its OpenMP siblings
# at every op's barrier (runtime/threads.py: 32x slower with two threads beside two busy processes).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["VIDSIFT_MAX_THREADS"] = "1"

import atexit  # noqa: E402
import contextlib
import fcntl
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray

from pipeline.ingest import run_ingest
from synthetic import generate_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]
# Local copies of remote artifacts go to a cache of this run (each pytest process's own, inherited by the
# processes it starts), removed when that process exits: never the user's ~/.cache/vidsift, which the suite
# filled with copies of its throwaway S3 buckets' indexes.
os.environ["VIDSIFT_CACHE"] = _TEST_CACHE = tempfile.mkdtemp(prefix="vidsift-test-cache-")
atexit.register(shutil.rmtree, _TEST_CACHE, ignore_errors=True)
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


def _stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """End exactly the process group this fixture started: SIGTERM, then SIGKILL after ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


class SharedResource:
    """A service several modules' tests use, started by the first test that asks for it (``get``) and
    stopped after the last such test of this run (``pytest_runtest_teardown``): a session fixture would keep
    it, idle, until the session ends (a three-node cluster holds ~1 GiB and keeps a core busy polling).

    ``start(*args)`` is a context manager yielding the handle; its exit stops the service. The name is the
    fixture's: the collection hook finds the last test that requests it."""

    registry: dict[str, SharedResource] = {}

    def __init__(self, name: str, start: Callable[..., contextlib.AbstractContextManager]):
        self.name, self._start = name, start
        self._stack: contextlib.ExitStack | None = None
        self._handle = None
        self.starts = 0
        SharedResource.registry[name] = self

    @property
    def running(self) -> bool:
        return self._stack is not None

    def get(self, *args):
        """The handle, starting the service with ``start(*args)`` first when it is not running."""
        if self._stack is None:
            stack = contextlib.ExitStack()
            self._handle = stack.enter_context(self._start(*args))
            self._stack, self.starts = stack, self.starts + 1
        return self._handle

    def stop(self) -> None:
        stack, self._stack, self._handle = self._stack, None, None
        if stack is not None:
            stack.close()


# The fixtures that hand out a SharedResource, and the xdist group of the modules that use them: one worker
# runs them all, so two multi-node clusters (and their jobs' drivers) never run at once on 2 cores.
SHARED_FIXTURES = {"ray_head": "ray-clusters", "cluster3": "ray-clusters"}
_LAST_USER: dict[str, pytest.Item] = {}  # shared fixture -> the last test of this run that requests it


def _module_resource(tests: list[pytest.Item]) -> str | None:
    """The shared resource a module's tests use (the first of SHARED_FIXTURES any of them requests)."""
    used = {name for item in tests for name in getattr(item, "fixturenames", ()) if name in SHARED_FIXTURES}
    return next((name for name in SHARED_FIXTURES if name in used), None)


def _first_index(keys: list[str]) -> dict[str, int]:
    return {k: i for i, k in reversed(list(enumerate(keys)))}


@pytest.hookimpl(tryfirst=True)  # before xdist's worker hook, which turns xdist_group marks into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the modules so that each shared resource's modules run next to each other (they keep their
    order inside, and so do the tests of a module); under xdist, put each test in its module's group or
    its shared resource's, and send the groups that hold ``slow`` tests first (the longest work starts
    first; the quick modules fill in around it)."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    resource = {path: _module_resource(tests) or path for path, tests in modules.items()}
    group = {path: SHARED_FIXTURES.get(resource[path], path) for path in modules}
    first_of_group = _first_index(list(group.values()))
    first_of_resource = _first_index(list(resource.values()))
    slow_groups = {group[p] for p, tests in modules.items()
                   if any(t.get_closest_marker("slow") for t in tests)}
    # An xdist worker (config.workerinput) is where the groups take effect; the controller passes -n.
    xdist = hasattr(config, "workerinput") or bool(getattr(config.option, "numprocesses", None))

    def key(path: str) -> tuple:
        # Among a resource's modules, one whose first test already uses it goes after one whose users come
        # last: the resource starts late in the first and stays up through the next.
        starts_with_user = resource[path] in getattr(modules[path][0], "fixturenames", ())
        return ((group[path] not in slow_groups) if xdist else False, first_of_group[group[path]],
                first_of_resource[resource[path]], starts_with_user)

    items[:] = [item for path in sorted(modules, key=key) for item in modules[path]]
    _LAST_USER.clear()
    for item in items:
        for name in SHARED_FIXTURES:
            if name in getattr(item, "fixturenames", ()):
                _LAST_USER[name] = item  # the item, not its node id: xdist appends @group to that
        if xdist:
            item.add_marker(pytest.mark.xdist_group(group[item.nodeid.split("::", 1)[0]]))


@pytest.hookimpl(trylast=True)  # after pytest's own teardown of the test's fixtures
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop a shared resource this test was the last user of."""
    for name, last in _LAST_USER.items():
        if item is last and name in SharedResource.registry:
            SharedResource.registry[name].stop()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A run cut short (``-x``, Ctrl-C) never reached the last user: stop what is still up."""
    for resource in SharedResource.registry.values():
        resource.stop()


@contextlib.contextmanager
def built_once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """``(folder, needs_building)`` for session data every xdist worker of this run shares: the first
    worker builds it under an exclusive lock while the others wait, then they all read it. The folder
    path is the same for every worker (the ingest output records the corpus's absolute paths). The
    caller builds inside the ``with`` when ``needs_building``; a build that raises is redone by the next."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-<user>/pytest-<n>/: the run's folder above each worker's own
    folder, done = root / f"shared_{name}", root / f"shared_{name}.done"
    with open(root / f"shared_{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        needs_building = not done.exists()
        if needs_building:
            if folder.exists():  # a build that failed half-way: start over
                shutil.rmtree(folder)
            folder.mkdir()
        yield folder, needs_building
        done.touch()


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


@contextlib.contextmanager
def _ray_head_process() -> Iterator[dict]:
    """A private `ray start --head` (auth disabled) for `ray job submit` tests.

    Yields the dashboard address. The head runs in its own process group with `--block`, so stopping it
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
    try:
        _wait_http(f"{address}/api/version", proc, "ray head")
        yield {"address": address, "env": env, "gcs_address": f"127.0.0.1:{gcs_port}"}
    finally:
        # `ray start --block` never exits on SIGTERM by itself (the run always waited the full grace): the
        # head holds nothing a test reads after it, so its group is killed after a short one.
        _stop_group(proc, grace_s=3)
        shutil.rmtree(temp_dir, ignore_errors=True)  # its session logs (~25 MB a run, left in /tmp before)


RAY_HEAD = SharedResource("ray_head", _ray_head_process)


@pytest.fixture
def ray_head():
    """The job-submit head (``_ray_head_process``), shared by every test that asks for it in this run and
    stopped after the last one."""
    return RAY_HEAD.get()


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
    """A small deterministic synthetic corpus (24 videos, 2-4 s, 64 px, 1 s keyframes), made once per run."""
    with built_once(tmp_path_factory, "synth") as (out, needs_building):
        if needs_building:
            generate_corpus(out, n=24, seed=7, min_duration=2.0, max_duration=4.0, size=64, fps=10,
                            keyframe_interval=1.0)
    return out


@pytest.fixture(scope="session")
def ingested_shards(synthetic_corpus, s3_server, tmp_path_factory):
    """The synthetic corpus ingested into WebDataset shards (8 samples a shard), once per run: on the
    module's Ray when one is up, else on a private one that ``run_ingest`` starts and stops."""
    with built_once(tmp_path_factory, "ingested") as (out, needs_building):
        if needs_building:
            os.environ.update(s3_server)  # whichever Ray runs it starts with the store configuration
            run_ingest(input=str(synthetic_corpus / "manifest.parquet"), output=str(out),
                       samples_per_shard=8)
    return out
