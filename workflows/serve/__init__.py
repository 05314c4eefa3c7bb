"""The search service (issue #17): an HTTP API + page over a vidsift index, hot-swapping new versions.

``python -m jobs.serve --index URI`` → :func:`serve_index`; :func:`build_app` gives the ASGI app itself.
"""

from workflows.serve.app import create_app
from workflows.serve.live import LiveIndex, Snapshot, SnapshotLoader
from workflows.serve.querylog import QueryLog
from workflows.serve.run import build_app, serve_index, serving_in_thread

__all__ = ["LiveIndex", "QueryLog", "Snapshot", "SnapshotLoader", "build_app", "create_app", "serve_index",
           "serving_in_thread"]
