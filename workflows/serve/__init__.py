"""The search service (issue #17): an HTTP API + page over a vidsift index, hot-swapping new versions.

``python -m jobs.serve --index URI`` → :func:`serve_index`; :func:`build_app` gives the ASGI app itself.
"""

from runtime.lazy import exports_on_first_use

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
__getattr__ = exports_on_first_use(__name__, _ON_FIRST_USE, globals())

__all__ = ["LiveIndex", "QueryLog", "Snapshot", "SnapshotLoader", "build_app", "create_app", "serve_index",
           "serving_in_thread"]
