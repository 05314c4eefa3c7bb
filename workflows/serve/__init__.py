"""The search service (issue #17): an HTTP API + page over a vidsift index, hot-swapping new versions.

``python -m jobs.serve --index URI`` → :func:`serve_index`; :func:`build_app` gives the ASGI app itself.
"""

import importlib

# Loaded on first use (PEP 562): a shard deployment's replica imports workflows.serve.fanout, and with it
# this package; it searches FAISS files and needs neither the web app nor the text encoder (torch).
_ON_FIRST_USE = {
    "create_app": "app",
    "LiveIndex": "live",
    "Snapshot": "live",
    "SnapshotLoader": "live",
    "QueryLog": "querylog",
    "build_app": "run",
    "serve_index": "run",
    "serving_in_thread": "run",
}


def __getattr__(name: str):
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = ["LiveIndex", "QueryLog", "Snapshot", "SnapshotLoader", "build_app", "create_app", "serve_index",
           "serving_in_thread"]
