"""cluster.yaml and the KubeRay manifests parse and say what a user needs; the CLI maps every stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs import cli

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_has_required_keys_and_installs_vidsift():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert key in cfg, f"cluster.yaml lacks {key}"
    node_types = cfg["available_node_types"]
    assert cfg["head_node_type"] in node_types
    workers = {n: t for n, t in node_types.items() if n != cfg["head_node_type"]}
    assert workers, "no worker node types"
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= cfg["max_workers"], name
        assert "InstanceType" in spec["node_config"], name
    gpu_types = [n for n, t in workers.items() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu_types, "no GPU worker type for training/embedding"
    setup = " && ".join(cfg["setup_commands"])
    # The setup must install this project (editable, from the synced repo) and the FFmpeg torchcodec loads.
    mount_target = next(t for t, src in cfg["file_mounts"].items() if src == ".")
    assert f"cd {mount_target}" in setup and "pip install" in setup and "-e" in setup
    assert "ffmpeg" in setup
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


@pytest.mark.parametrize("path,kind", [("deploy/rayjob-ingest.yaml", "RayJob"),
                                       ("deploy/raycronjob-reindex.yaml", "RayCronJob")])
def test_kuberay_manifests(path, kind):
    doc = yaml.safe_load((ROOT / path).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    job = doc["spec"] if kind == "RayJob" else doc["spec"]["jobTemplate"]
    assert job["entrypoint"].startswith("python -m jobs.")
    module = job["entrypoint"].split()[2]
    assert (ROOT / (module.replace(".", "/") + ".py")).exists()
    assert "headGroupSpec" in job["rayClusterSpec"]
    if kind == "RayCronJob":
        assert len(doc["spec"]["schedule"].split()) == 5


def test_cli_lists_stages_and_rejects_unknown(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for stage in cli.STAGES:
        assert stage in out
    assert cli.main(["no-such-stage"]) == 2
    assert "unknown stage" in capsys.readouterr().err


@pytest.mark.parametrize("stage", sorted(cli.STAGES))
def test_every_stage_has_help(stage):
    """`vidsift <stage> --help` works for every stage (argparse exits 0 after printing usage)."""
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", stage, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout.lower()
