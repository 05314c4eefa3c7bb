"""The one way every stage gets a Ray: join the cluster it runs on, or start a private local one."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray

REPO_ROOT = Path(__file__).resolve().parents[1]


def cluster_address() -> str | None:
    """The cluster this process belongs to: ``RAY_ADDRESS`` (``ray job submit`` sets it for the driver)."""
    return os.environ.get("RAY_ADDRESS") or None


def connect_ray(
    num_cpus: int | None = None, log_to_driver: bool = False, **local_kwargs: Any
) -> tuple[bool, float]:
    """Make sure this process is connected to Ray; returns ``(started_here, seconds)``.

    * already connected (a test session's shared Ray, a caller that set one up): used as it is;
    * inside ``ray job submit`` or with ``RAY_ADDRESS`` set: join that cluster (``num_cpus`` is the
      cluster's business there and is ignored);
    * otherwise: a private local Ray with ``num_cpus`` CPUs that never attaches to another cluster on the
      machine by accident (``address="local"``). Its workers import this checkout (``PYTHONPATH``).

    ``log_to_driver`` forwards the workers' output to this process in both cases (the trainer's step lines);
    ``local_kwargs`` go to the local ``ray.init`` only (e.g. ``object_store_memory``).
    """
    if ray.is_initialized():
        return False, 0.0
    t0 = time.perf_counter()
    address = cluster_address()
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        kwargs = {
            "address": "local",
            "num_cpus": num_cpus,
            "include_dashboard": False,
            "log_to_driver": log_to_driver,
            "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}},
            **local_kwargs,
        }
        ray.init(**kwargs)
    return True, time.perf_counter() - t0
