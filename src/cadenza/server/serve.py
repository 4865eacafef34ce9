"""`cadenza serve`: the OpenAI-compatible server on uvicorn.

Defaults make a single machine stateful out of the box: a host KV tier, a disk KV tier and the
conversation store under ``--data-dir``, so conversations (and stored responses) survive a
restart and come back with their KV from disk.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "cadenza"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="a Bearer key; repeat for several tenants (each key is its own cache namespace). "
        "Also read from CADENZA_API_KEYS (comma-separated).",
    )
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        help="where the store and the disk KV tier live by default",
    )
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="waiting requests beyond this get 429 with Retry-After",
    )
    parser.add_argument("--max-body-mib", type=float, default=4.0)
    parser.add_argument("--log-level", default="info")
    parser.set_defaults(kv_host_gib=2.0, kv_disk_gib=8.0)


def engine_factory(args: argparse.Namespace) -> Callable[[], Any]:
    """Builds the engine on the engine thread (it owns the model and the store)."""
    from cadenza.cli import _build_llm

    data = Path(args.data_dir).expanduser()
    if args.session_store is None:
        data.mkdir(parents=True, exist_ok=True)
        args.session_store = str(data / "store.sqlite")
    if args.kv_disk_gib > 0 and args.kv_disk_path is None:
        args.kv_disk_path = str(data / "kv")
    return lambda: _build_llm(args).engine


def api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key)
    keys += [k.strip() for k in os.environ.get("CADENZA_API_KEYS", "").split(",") if k.strip()]
    return keys


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from cadenza.server.app import build_app
    from cadenza.server.async_engine import AsyncEngine
    from cadenza.server.metrics import ServerMetrics
    from cadenza.server.state import ServerState

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    keys = api_keys(args)
    if not keys and args.host not in _LOCAL_HOSTS:
        logging.warning(
            "serving on %s without --api-key: anyone who can reach it can use it", args.host
        )
    name = args.served_model_name or args.model
    metrics = ServerMetrics(name)
    engine = AsyncEngine(
        engine_factory(args), max_waiting=args.max_queued_requests, on_step=metrics.on_step
    )
    state = ServerState.with_keys(
        engine,
        name,
        keys,
        aliases=frozenset({args.model, name}),
        max_body_bytes=int(args.max_body_mib * 2**20),
    )
    state.extras["metrics"] = metrics
    app = build_app(state)
    print(f"cadenza: serving {name} on http://{args.host}:{args.port}/v1", flush=True)
    # uvicorn drains on SIGTERM, then re-raises the signal, which would end the process with
    # status -15 after a clean shutdown; SIGTERM is how services are stopped, so exit 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=30,
    )
    return 0
