"""Start the search service: build the live index and the app, then serve it with uvicorn (default) or as a
Ray Serve deployment (``ray_serve=True``: the same ASGI app behind Ray Serve's HTTP proxy)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import ray
import uvicorn

from runtime import storage
from runtime.ray_connect import connect_ray
from runtime.threads import set_torch_threads
from workflows.serve.access import Access, access_for
from workflows.serve.app import create_app
from workflows.serve.fanout import FanoutPlan, FanoutSnapshotLoader, deploy_shards, deployments_for
from workflows.serve.live import LiveIndex, SnapshotLoader
from workflows.serve.pool import PoolConfig
from workflows.serve.previews import DEFAULT_CACHE_BYTES, PreviewMaker
from workflows.serve.queries import Limits
from workflows.serve.querylog import QueryLog

log = logging.getLogger(__name__)
# How long a thread may hold the GIL while another waits (CPython's default is 5 ms). A heavy search's
# Python work (collapsing clips, building hit dicts) holds it in its pool thread; a small search needs it a
# handful of times per request (parse, hop, hits, JSON, reply), so at 5 ms each its latency next to a heavy
# request grows by tens of ms; at 1 ms by a few. Set only in a serving process (serve_index, a Serve replica).
SERVING_SWITCH_INTERVAL_S = 0.001


def build_app(index: str, pretrained: str | None = None, allow_random_init: bool = False,
              shards: Sequence[str] = (), max_k: int | None = None, poll_s: float = 5.0,
              cache_dir: str | None = None, torch_threads: int = 1, query_log: str | None = None,
              captions: Sequence[str] = (), limits: Limits = Limits(), pool: PoolConfig = PoolConfig(),
              access: Access = Access(), expose_sources: bool = False,
              preview_cache_bytes: int = DEFAULT_CACHE_BYTES, fanout: FanoutPlan | None = None):
    """The ASGI app over the index at ``index`` (its CURRENT version is loaded and checked now);
    ``query_log`` is a folder/URI the texts of answered searches are logged to (:mod:`.querylog`);
    ``captions`` are ``jobs.caption`` output folders whose generated captions the hits carry; ``limits``,
    ``pool`` and ``access`` are :func:`create_app`'s (``max_k`` overrides ``limits.max_k``, raising the
    other limits to it where they are lower); ``expose_sources`` shows the ingest source URIs; ``fanout``
    searches through those shard deployments (:mod:`.fanout`) instead of opening every shard here."""
    if max_k is not None:
        limits = dataclasses.replace(limits, max_k=max_k, max_depth=max(limits.max_depth, max_k),
                                     max_ranked=max(limits.max_ranked, max_k))
    # One intra-op thread: a query's text encode is ~2 ms on one thread; on 2 shared cores more threads
    # only contend (measured 100x slower with 2 under load).
    set_torch_threads(torch_threads)
    root = storage.normalize(index)
    loader_args = (root, pretrained, allow_random_init, shards, captions, expose_sources)
    loader = SnapshotLoader(*loader_args) if fanout is None else FanoutSnapshotLoader(fanout, *loader_args)
    live = LiveIndex(root, loader.load, poll_s=poll_s)
    # the shards come from --shards or from each version's lineage (index.json): any version may have some
    previews = PreviewMaker(cache_dir or Path(tempfile.gettempdir()) / "vidsift-previews",
                            cache_bytes=preview_cache_bytes)
    log_to = QueryLog(query_log) if query_log else None
    return create_app(live, previews, limits=limits, query_log=log_to, pool=pool, access=access)


def serve_index(index: str, host: str = "127.0.0.1", port: int = 8000, ray_serve: bool = False,
                allowed_hosts: Sequence[str] = (), auth_token_file: str | None = None,
                insecure_open: bool = False, shards_per_deployment: int = 0, shard_replicas: int = 1,
                shard_cpus: float = 1.0, **options) -> int:
    """Serve until interrupted; ``options`` are :func:`build_app`'s; the access rules come from the bound
    ``host`` and the flags (:func:`workflows.serve.access.access_for`). ``shards_per_deployment`` > 0 (Ray
    Serve only) fans searches out over shard deployments of ``shard_replicas`` replicas. Returns an exit
    status."""
    if shards_per_deployment and not ray_serve:
        raise ValueError("fan-out over shard deployments (--fanout-shards-per-deployment) needs --ray-serve")
    options["access"] = access_for(host, allowed_hosts, auth_token_file, insecure_open)
    if ray_serve:
        fanout = (shards_per_deployment, shard_replicas, shard_cpus) if shards_per_deployment else None
        return _serve_with_ray(index, host, port, options, fanout)
    app = build_serving_app(index, **options)
    print(f"[serve] index version {app.state.live.current.version} on http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, **_fast_http())
    return 0


def build_serving_app(index: str, **options):
    """:func:`build_app` in a process that does nothing but serve it: also sets the GIL switch interval."""
    sys.setswitchinterval(SERVING_SWITCH_INTERVAL_S)
    return build_app(index, **options)


def _fast_http() -> dict[str, str]:
    """uvloop + httptools when installed (uvicorn[standard], which ray[serve] brings): ~2x h11's rate."""
    options = {}
    with contextlib.suppress(ImportError):
        import httptools  # noqa: F401  (probe only)

        options["http"] = "httptools"
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401  (probe only)

        options["loop"] = "uvloop"
    return options


INGRESS_CPUS = 1.0  # what Serve reserves for the service's own deployment (its default num_cpus)


def _serve_with_ray(index: str, host: str, port: int, options: dict, fanout: tuple | None = None) -> int:
    """The app as a Ray Serve deployment until SIGINT/SIGTERM; then Serve, and a Ray started here, stop."""
    from ray import serve  # optional: only --ray-serve starts Ray Serve's controller and proxy

    started_here, _ = connect_ray()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops it as cleanly as Ctrl-C
    try:
        serve.start(http_options={"host": host, "port": port})
        if fanout is not None:  # the shard deployments first: the ingress opens its searcher over them
            per_deployment, replicas, cpus = fanout
            options = dict(options, fanout=deploy_shards(index, deployments_for(index, per_deployment),
                                                         replicas, cpus, reserve_cpus=INGRESS_CPUS))
        deployment = serve.deployment(serve.ingress(lambda: build_serving_app(index, **options))(),
                                      name="vidsift-search")
        serve.run(deployment.bind(), name="vidsift", route_prefix="/", blocking=False)
        print(f"[serve] Ray Serve deployment 'vidsift-search' on http://{host}:{port}/", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM via _raise_interrupt: the normal way to stop serving
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(Exception):  # the deployment may not have started; Ray must still stop
            serve.shutdown()
        if started_here:
            ray.shutdown()
    print("[serve] Ray Serve stopped", flush=True)
    return 0


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def serving_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread of this process (tests, notebooks); yields its base URL and
    stops it on exit."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, **_fast_http())
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="vidsift-serve", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the search service did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
