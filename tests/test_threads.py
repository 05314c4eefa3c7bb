"""runtime/threads.py: a stage's torch / FAISS threads, capped by VIDSIFT_MAX_THREADS; and the suite's own
processes run one intra-op thread (tests/conftest.py), its children too."""

from __future__ import annotations

import os
import subprocess
import sys

import faiss
import pytest
import torch
from conftest import REPO_ROOT

from runtime import threads


def test_the_cap_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    assert threads.thread_cap() is None
    assert threads.intra_op_threads(None) == (os.cpu_count() or 1)
    assert threads.intra_op_threads(0) == (os.cpu_count() or 1) and threads.intra_op_threads(3) == 3
    monkeypatch.setenv(threads.ENV, " 2 ")
    assert threads.thread_cap() == 2
    assert threads.intra_op_threads(8) == 2 and threads.intra_op_threads(1) == 1


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5"])
def test_a_cap_that_is_not_a_positive_count_is_an_error_naming_it(monkeypatch, raw):
    monkeypatch.setenv(threads.ENV, raw)
    with pytest.raises(ValueError, match=rf"VIDSIFT_MAX_THREADS={raw!r}: expected a positive number"):
        threads.intra_op_threads(4)


def test_setters_apply_the_capped_count(monkeypatch):
    before_torch, before_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        monkeypatch.setenv(threads.ENV, "1")
        assert threads.set_torch_threads(4) == 1 and torch.get_num_threads() == 1
        assert threads.set_faiss_threads(4) == 1 and faiss.omp_get_max_threads() == 1
        monkeypatch.setenv(threads.ENV, "2")
        assert threads.set_torch_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before_torch)
        faiss.omp_set_num_threads(before_faiss)


def test_the_suite_and_its_children_run_one_intra_op_thread():
    """Set once in tests/conftest.py, before torch / FAISS load: this process and every process it starts."""
    assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
    script = ("import faiss, torch; from runtime.threads import set_torch_threads; "
              "print(torch.get_num_threads(), faiss.omp_get_max_threads(), set_torch_threads())")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split() == ["1", "1", "1"]
