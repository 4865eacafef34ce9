"""`cadenza serve`: the OpenAI-compatible server on uvicorn.

Defaults make a single machine stateful out of the box: a host KV tier, a disk KV tier and the
conversation store under ``--data-dir``, so conversations (and stored responses) survive a
restart and come back with their KV from disk.

Start-up order: check the flags, bind the port (a port in use fails at once, not after the
model has loaded), load the engine, then serve; "serving on" is printed once uvicorn accepts
connections on the port.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadenza.cluster.placement import POLICY_NAMES
from cadenza.config_args import engine_config_from_args

if TYPE_CHECKING:
    import uvicorn

    from cadenza.config import EngineConfig

DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "cadenza"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    server.add_argument(
        "--port", type=int, default=8000, help="TCP port to listen on (default: %(default)s)"
    )
    server.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="a Bearer key; repeat for several tenants (each key is its own cache namespace). "
        "Also read from CADENZA_API_KEYS (comma-separated).",
    )
    server.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send and see (default: the --model value)",
    )
    server.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        help="where the store and the disk KV tier live by default (default: %(default)s)",
    )
    server.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="waiting requests beyond this get 429 with Retry-After (default: %(default)s)",
    )
    server.add_argument(
        "--max-body-mib",
        type=float,
        default=4.0,
        help="largest request body in MiB; a larger one gets 413 (default: %(default)s)",
    )
    server.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level of the server and uvicorn (default: %(default)s)",
    )
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument(
        "--workers",
        type=int,
        default=1,
        help="engine workers; more than 1 starts each as a Ray actor behind a router in this "
        "process (1: the engine runs in-process, no Ray) (default: %(default)s)",
    )
    cluster.add_argument(
        "--worker-threads",
        type=int,
        default=1,
        help="torch threads per cluster worker (default: %(default)s)",
    )
    cluster.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (e.g. ray://host:10001 or auto) instead of starting a local"
        " one; implies the cluster router even with --workers 1",
    )
    cluster.add_argument(
        "--routing",
        default=None,
        choices=list(POLICY_NAMES),
        help="per-turn placement policy of the cluster router (default: symphony with more"
        " than one worker)",
    )
    cluster.add_argument(
        "--cluster-backend",
        default="ray",
        choices=["ray", "local"],
        help="where cluster workers run: Ray actors, or threads of this process (for trying the"
        " router without Ray) (default: %(default)s)",
    )
    cluster.add_argument(
        "--migration-budget-mib",
        type=float,
        default=256.0,
        help="KV bytes in flight per worker for migrations (default: %(default)s)",
    )
    parser.set_defaults(kv_host_gib=2.0, kv_disk_gib=8.0)


# What the engine flags default to under `cadenza serve` (see ``engine_config``).
SERVE_HELP_OVERRIDES = {
    "--session-store": "SQLite file of the durable conversation store (unset:"
    " <data-dir>/store.sqlite)",
    "--kv-disk-path": "directory of the disk KV tier (unset: <data-dir>/kv)",
    "--profile-cache-dir": "where the measured cost profile is cached per model and machine, so"
    " later starts skip profiling (unset: <data-dir>/profiles; 'none' disables)",
}


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine config of the flags; the store, the disk KV tier and the cost-profile cache
    default to files under ``--data-dir``."""
    data = Path(args.data_dir).expanduser()
    overrides: dict[str, Any] = {}
    if args.session_store_path is None:
        data.mkdir(parents=True, exist_ok=True)
        overrides["session_store_path"] = str(data / "store.sqlite")
    if args.kv_disk_gib > 0 and args.kv_disk_path is None:
        overrides["kv_disk_path"] = str(data / "kv")
    if args.profile_cache_dir is None:
        overrides["profile_cache_dir"] = str(data / "profiles")
    return engine_config_from_args(args, **overrides)


def api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key)
    keys += [k.strip() for k in os.environ.get("CADENZA_API_KEYS", "").split(",") if k.strip()]
    return keys


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, not yet listening: binding reserves the port (a
    second server fails here), while clients are refused until uvicorn listens on it."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restart may rebind while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(config: uvicorn.Config, on_started: Callable[[], None]) -> uvicorn.Server:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, calling ``on_started`` once it accepts connections."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                on_started()

    return Server(config)


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def uses_cluster(args: argparse.Namespace) -> bool:
    return args.workers > 1 or args.ray_address is not None


def check_cluster_args(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1; got {args.workers}")
    if args.worker_threads < 1:
        raise ValueError(f"--worker-threads must be at least 1; got {args.worker_threads}")
    if args.routing is not None and not uses_cluster(args):
        raise ValueError("--routing needs a cluster: pass --workers 2 or more (or --ray-address)")


def start_cluster(args: argparse.Namespace, config: EngineConfig) -> Any:
    """Start the workers and the router over them (``ClusterEngine``)."""
    import asyncio

    from cadenza.cluster.router import ClusterEngine

    if args.cluster_backend == "local":
        from cadenza.cluster.worker_handle import LocalWorker, worker_config
        from cadenza.engine import LLMEngine

        def factory(cfg: EngineConfig) -> Any:
            return lambda: LLMEngine(cfg)

        handles: list[Any] = [
            LocalWorker(f"w{i}", factory(worker_config(config, f"w{i}")))
            for i in range(args.workers)
        ]
    else:
        from cadenza.cluster.ray_backend import start_workers

        handles = start_workers(
            args.workers,
            config,
            threads_per_worker=args.worker_threads,
            address=args.ray_address,
        )
    return asyncio.run(
        ClusterEngine.connect(
            handles,
            config,
            routing=args.routing or "symphony",
            max_waiting=args.max_queued_requests,
            migration_budget_bytes=int(args.migration_budget_mib * 2**20),
        )
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from cadenza.engine import LLMEngine
    from cadenza.server.app import build_app
    from cadenza.server.async_engine import AsyncEngine
    from cadenza.server.metrics import ServerMetrics
    from cadenza.server.state import ServerState

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    check_cluster_args(args)
    config = engine_config(args)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(
            f"cadenza: error: cannot listen on {_url(args.host, args.port)} "
            f"(port {args.port}): {reason}",
            file=sys.stderr,
        )
        return 1
    # uvicorn drains on SIGTERM, then re-raises the signal, which would end the process with
    # status -15 after a clean shutdown; SIGTERM is how services are stopped, so exit 0 (also
    # while the model is still loading).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with sock:
        keys = api_keys(args)
        if not keys and args.host not in _LOCAL_HOSTS:
            logging.warning(
                "serving on %s without --api-key: anyone who can reach it can use it", args.host
            )
        name = args.served_model_name or args.model
        metrics = ServerMetrics(name)
        engine: Any
        if uses_cluster(args):
            from cadenza.server.cluster_metrics import ClusterCollector

            engine = start_cluster(args, config)
            engine.on_step = metrics.on_step
            metrics.registry.register(ClusterCollector(engine))
        else:
            engine = AsyncEngine(
                lambda: LLMEngine(config),
                max_waiting=args.max_queued_requests,
                on_step=metrics.on_step,
            )
        state = ServerState.with_keys(
            engine,
            name,
            keys,
            aliases=frozenset({args.model, name}),
            max_body_bytes=int(args.max_body_mib * 2**20),
        )
        state.extras["metrics"] = metrics
        url = _url(args.host, sock.getsockname()[1])

        def announce() -> None:
            print(f"cadenza: serving {name} on {url}/v1", flush=True)

        server_config = uvicorn.Config(
            build_app(state), log_level=args.log_level, timeout_graceful_shutdown=30
        )
        _server(server_config, announce).run(sockets=[sock])
    return 0
