"""How many intra-op threads a process's torch and FAISS use: what the stage asks for, capped by
``VIDSIFT_MAX_THREADS`` when it is set.

Why a cap: an OpenMP parallel region (every torch op on CPU, every multi-query FAISS search) ends at a barrier
that waits for all its threads. When more busy processes than cores share a machine (test workers beside a
Ray cluster, a node packed with actors), the kernel parks one of a region's threads and its siblings wait at
the barrier for a whole time slice, op after op. Measured on 2 cores beside 2 busy processes: 300 training
steps of a small MLP took 0.21 s with one thread and 6.8 s with two (0.71 s with ``OMP_WAIT_POLICY=PASSIVE``).
The test suite sets the cap to 1 (tests/conftest.py); a user packing many processes on a node can too.
"""

from __future__ import annotations

import os

ENV = "VIDSIFT_MAX_THREADS"


def thread_cap() -> int | None:
    """``VIDSIFT_MAX_THREADS`` as a positive int, None when unset or empty; anything else is an error naming
    the variable (a typo must not silently mean "no cap")."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        cap = int(raw)
    except ValueError:
        cap = 0
    if cap < 1:
        raise ValueError(f"{ENV}={raw!r}: expected a positive number of threads")
    return cap


def intra_op_threads(requested: int | None = None) -> int:
    """``requested`` threads (None or 0: every core of this machine), at least 1, capped by
    :func:`thread_cap`."""
    wanted = max(1, int(requested or os.cpu_count() or 1))
    cap = thread_cap()
    return min(wanted, cap) if cap else wanted


def set_torch_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to :func:`intra_op_threads` of ``requested``; returns the count set."""
    import torch  # lazily: runtime is imported by processes that never load torch

    threads = intra_op_threads(requested)
    torch.set_num_threads(threads)
    return threads


def set_faiss_threads(requested: int | None = None) -> int:
    """Set FAISS's OpenMP threads to :func:`intra_op_threads` of ``requested``; returns the count set."""
    import faiss

    threads = intra_op_threads(requested)
    faiss.omp_set_num_threads(threads)
    return threads
