"""Multi-node: a head + 2 worker nodes (tests/cluster_fixtures.py), every URI on S3 (moto's server), every
stage submitted with ``ray job submit --working-dir .``, and worker nodes lost in the middle of ingest and
embed.

One corpus for the module and one cluster for the run (a cluster start costs ~1 min on 2 cores):
tests/test_index_distributed.py runs its cluster test on the same one, just before these. The jobs run
with ``HOME`` and ``TMPDIR`` pointed at fresh folders, so "nothing on local disk outside caches and temp"
is checked by looking at what appeared there and in the job's working-dir copies.
"""

from __future__ import annotations

import json
import os
import site
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from cluster_fixtures import cluster3  # noqa: F401  (one cluster for both modules: SharedResource)
from conftest import REPO_ROOT, free_port

from runtime import storage
from synthetic import generate_corpus

pytestmark = pytest.mark.slow

N_VIDEOS = 24
MODEL = "clip4clip-meanP-tiny"
QUERY = "a red circle moves to the left"

NODES_SCRIPT = """
import json, os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
ray.init()
@ray.remote(num_cpus=0)
def where():
    return ray.get_runtime_context().get_node_id(), os.environ.get("AWS_ENDPOINT_URL")
alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
print("NODES " + json.dumps(ray.get([where.options(scheduling_strategy=On(n, soft=False)).remote()
                                     for n in alive])))
"""


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bucket(s3_server):
    """A bucket for the module; this process's AWS_* variables point at the S3 server meanwhile."""
    import boto3  # test-only client; vidsift reaches S3 through runtime.storage

    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.items():
            mp.setenv(key, value)
        name = f"vs-cluster-{free_port()}"
        boto3.client("s3").create_bucket(Bucket=name)
        yield f"s3://{name}"


@pytest.fixture(scope="module")
def corpus(bucket, tmp_path_factory):
    """24 synthetic videos (2-3 s, 64 px) made locally, then uploaded with their manifest to the bucket."""
    local = tmp_path_factory.mktemp("cluster_corpus")
    generate_corpus(local, n=N_VIDEOS, seed=11, min_duration=2.0, max_duration=3.0, size=64, fps=10,
                    keyframe_interval=1.0)
    remote = storage.join(bucket, "corpus")
    for path in sorted((local / "videos").glob("*.mp4")):
        storage.upload(path, storage.join(remote, "videos", path.name))
    storage.upload(local / "manifest.parquet", storage.join(remote, "manifest.parquet"))
    return {"manifest": storage.join(remote, "manifest.parquet"), "local": local}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """``HOME`` and ``TMPDIR`` for the jobs: what they write outside the store must land in caches / temp."""
    root = tmp_path_factory.mktemp("job_sandbox")
    (root / "home").mkdir()
    (root / "tmp").mkdir()
    env = {"HOME": str(root / "home"), "TMPDIR": str(root / "tmp"),
           "PYTHONUSERBASE": site.getuserbase()}  # user site-packages stay importable with another HOME
    return {"root": root, "env": env}


# ---------------------------------------------------------------------------------------------- helpers
def run_job(cluster3, entrypoint: list[str], env: dict, timeout: float = 600):  # noqa: F811
    result = cluster3.run(entrypoint, env_vars=env, timeout=timeout)
    print(f"[cluster] {entrypoint[2]} {' '.join(entrypoint[3:5])}: {result.status} in {result.wall_s:.1f} s")
    assert result.ok, result.tail(6000)
    return result


def ingest_cmd(manifest: str, output: str, samples_per_shard: int, workers: int) -> list[str]:
    return ["python", "-m", "jobs.ingest", "--input", manifest, "--output", output,
            "--samples-per-shard", str(samples_per_shard), "--workers", str(workers)]


def embed_cmd(shards: str, pretrained: str, output: str) -> list[str]:
    return ["python", "-m", "jobs.embed", "--shards", shards, "--model", MODEL, "--pretrained", pretrained,
            "--output", output, "--batch-size", "4"]


def ingest_accounting(output: str) -> dict:
    """inputs / samples / errors from the run manifest, and the sample keys found in the per-shard tables."""
    run = storage.read_json(storage.join(output, "manifest.json"))
    keys: list[str] = []
    for shard in storage.list_files(storage.join(output, "shards"), ".parquet"):
        keys += storage.read_parquet(shard, columns=["key"]).column("key").to_pylist()
    summary = run["summary"]
    return {"inputs": summary["inputs"], "samples": summary["samples"], "errors": summary["errors"],
            "rows": len(keys), "duplicates": len(keys) - len(set(keys)), "complete": summary.get("complete")}


def embed_accounting(output: str) -> dict:
    """Rows of the embeddings dataset (read by pyarrow.dataset as it is) and its error rows."""
    partitions = [u for u in storage.list_dirs(output) if storage.name(u).startswith("model_id=")]
    assert len(partitions) == 1, partitions
    fs, path = storage.arrow_filesystem(partitions[0])
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    assert "embedding" in table.column_names, table.schema
    frame = table.select(["id", "video_id", "clip_index"]).to_pandas()
    videos = frame[frame["clip_index"] == -1]["video_id"]
    fsspec_fs, root = storage.filesystem(output)
    error_files = [f for f in fsspec_fs.find(root) if "_errors" in f and f.endswith(".parquet")]
    errors = sum(storage.read_parquet(f"{storage.scheme(output)}://{f}").num_rows for f in error_files)
    return {"rows": len(frame), "videos": int(videos.nunique()), "errors": errors,
            "duplicate_ids": int(frame["id"].duplicated().sum()),
            "duplicate_videos": int(videos.duplicated().sum())}


def count_objects(prefix: str, suffix: str) -> int:
    fs, path = storage.filesystem(prefix)
    try:
        return sum(1 for f in fs.find(path) if f.endswith(suffix))
    except FileNotFoundError:
        return 0


def run_losing_a_node(cluster3, entrypoint, env, progress_prefix, suffix, min_done=1):  # noqa: F811
    """Submit, wait until ``min_done`` outputs exist (the job is mid-run), kill a worker node, add a fresh
    one (capacity for the rest), and wait for the job. Returns the result and what happened when."""
    t0 = time.perf_counter()
    job = cluster3.submit(entrypoint, env_vars=env)
    deadline = time.time() + 420
    while count_objects(progress_prefix, suffix) < min_done:
        status = cluster3.status(job)
        assert status not in {"FAILED", "STOPPED"}, cluster3.logs(job)[-4000:]
        if status == "SUCCEEDED" or time.time() > deadline:
            pytest.fail(f"the job ended (or stalled) before a node could be removed mid-run: {status}")
        time.sleep(0.5)
    done_at_loss = count_objects(progress_prefix, suffix)
    running = cluster3.status(job)
    lost = cluster3.remove_worker()
    removed_at = time.perf_counter() - t0
    cluster3.add_worker()
    result = cluster3.wait(job, timeout=600, t0=t0)
    event = {"removed_node": lost[:12], "removed_at_s": round(removed_at, 1), "done_at_loss": done_at_loss,
             "status_at_loss": running}
    return result, event


def local_writes(cluster3, sandbox) -> list[str]:  # noqa: F811
    """Files the jobs left outside the store, caches and temp: under HOME except .cache, anything in a
    working-dir copy that is not a repository file, any ``s3:`` folder."""
    bad = []
    home = Path(sandbox["env"]["HOME"])
    bad += [str(p) for p in home.rglob("*") if p.is_file() and p.relative_to(home).parts[0] != ".cache"]
    for pkg in cluster3.temp_dir.glob("session_*/runtime_resources*/working_dir_files/_ray_pkg_*"):
        if not pkg.is_dir():
            continue
        for p in pkg.rglob("*"):
            rel = p.relative_to(pkg)
            if p.is_file() and "__pycache__" not in rel.parts and not (REPO_ROOT / rel).exists():
                bad.append(str(p))
    for root in (REPO_ROOT, Path.cwd(), home, *cluster3.temp_dir.glob("session_*/runtime_resources*")):
        bad += [str(p) for p in root.rglob("s3:*")]
    return sorted(set(bad))


# -------------------------------------------------------------------------------------------------- tests
def test_three_nodes_run_tasks(cluster3):  # noqa: F811
    """A submitted job reaches all three nodes, and each sees the store configuration of the job."""
    result = cluster3.run(["python", "-c", NODES_SCRIPT], timeout=300)
    print(f"[cluster] probe job: {result.wall_s:.1f} s")
    assert result.ok, result.tail()
    line = next(line for line in result.logs.splitlines() if line.startswith("NODES "))
    placed = json.loads(line.split(" ", 1)[1])
    assert {node for node, _ in placed} == cluster3.node_ids() and len(placed) == 3
    assert {endpoint for _, endpoint in placed} == {cluster3.job_env["AWS_ENDPOINT_URL"]}


def test_pipeline_on_s3_losing_a_node_mid_ingest_and_mid_embed(cluster3, bucket, corpus, sandbox):  # noqa: F811
    """ingest → train (2 workers, checkpoints on S3) → embed (--pretrained s3://) → index → query, all s3://,
    with a worker node killed in the middle of ingest and again of embed: every input accounted for, no
    duplicates. One pass through the stages covers both (each job on this cluster costs tens of seconds)."""
    env = sandbox["env"]
    ingest, train = storage.join(bucket, "ingest"), storage.join(bucket, "train")
    emb, idx = storage.join(bucket, "emb"), storage.join(bucket, "idx")

    # One sample a shard: the job is still writing shards when the node goes.
    result, event = run_losing_a_node(cluster3, ingest_cmd(corpus["manifest"], ingest, 1, 6), env,
                                      storage.join(ingest, "shards"), ".tar", min_done=2)
    assert result.ok, result.tail(6000)
    counts = ingest_accounting(ingest)
    print(f"[cluster] node loss mid-ingest: inputs={counts['inputs']} samples={counts['samples']} "
          f"errors={counts['errors']} duplicates={counts['duplicates']} wall={result.wall_s:.1f} s {event}")
    assert counts["samples"] + counts["errors"] == counts["inputs"] == N_VIDEOS, counts
    assert counts["rows"] == counts["samples"] and counts["duplicates"] == 0, counts

    run_job(cluster3, ["python", "-m", "jobs.train", "--shards", ingest, "--config",
                       "configs/train/tiny-meanP.yaml", "--output", train, "--workers", "2",
                       "--max-steps", "2", "--epochs", "1", "--batch-size", "4", "--eval-batch-size", "8",
                       "--dataloader-workers", "0", "--checkpoint-every", "1", "--log-every", "1",
                       "--cpus-per-worker", "1", "--use-gpu", "no"], env)
    model = storage.join(train, "model.pt")
    assert storage.is_file(model)
    assert count_objects(storage.join(train, "ray"), ".pt") + count_objects(storage.join(train, "ray"),
                                                                            ".json") > 0

    result, event = run_losing_a_node(cluster3, embed_cmd(ingest, model, emb), env, emb, ".parquet",
                                      min_done=1)
    assert result.ok, result.tail(6000)
    rows = embed_accounting(emb)
    print(f"[cluster] node loss mid-embed: inputs={N_VIDEOS} videos={rows['videos']} rows={rows['rows']} "
          f"errors={rows['errors']} duplicate_ids={rows['duplicate_ids']} wall={result.wall_s:.1f} s {event}")
    assert rows["videos"] + rows["errors"] == N_VIDEOS, rows
    assert rows["duplicate_ids"] == 0 and rows["duplicate_videos"] == 0, rows
    assert len(cluster3.node_ids()) == 3

    run_job(cluster3, ["python", "-m", "jobs.index", "build", "--embeddings", emb, "--output", idx], env)
    assert storage.is_file(storage.join(idx, "CURRENT"))

    from index.query import VideoIndex  # the query side, here in the test process (cache: VIDSIFT_CACHE)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIDSIFT_CACHE", str(sandbox["root"] / "query_cache"))
        hits = VideoIndex.open(idx).search(QUERY, k=5)
    assert hits and all(h.video_id.startswith("synth-") for h in hits), hits
    print(f"[cluster] query {QUERY!r}: {[(h.video_id, round(h.score, 3)) for h in hits]}")

    leaks = local_writes(cluster3, sandbox)
    assert not leaks, leaks
    assert not os.path.exists(REPO_ROOT / "s3:")
