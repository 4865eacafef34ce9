"""Start the real server (uvicorn, real sockets) on a free port inside the test process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from cadenza.config import CacheConfig, EngineConfig, SchedulerConfig
from cadenza.engine import LLMEngine
from cadenza.model.source import ModelSource
from cadenza.server.app import build_app
from cadenza.server.async_engine import AsyncEngine
from cadenza.server.metrics import ServerMetrics
from cadenza.server.state import ServerState
from cadenza.session.store import ConversationStore

MODEL = "tiny-chat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    state: ServerState
    server: uvicorn.Server

    @property
    def engine(self) -> LLMEngine:
        assert self.state.engine.engine is not None
        return self.state.engine.engine  # type: ignore[return-value]

    @property
    def store(self) -> ConversationStore:
        """The durable conversation store (the session layer's, above the engine)."""
        return self.state.sessions.store


def engine_config(store: str | None = None, model: str = MODEL, **cache: Any) -> EngineConfig:
    scheduler = {k: cache.pop(k) for k in ("max_num_seqs", "max_num_batched_tokens") if k in cache}
    cache.setdefault("num_blocks", 256)
    return EngineConfig(
        model=model,
        cache=CacheConfig(**cache),
        scheduler=SchedulerConfig(**scheduler),
        session_store_path=store,
        kv_cost_model="linear",
        num_threads=1,
    )


@contextlib.contextmanager
def running_server(
    source: ModelSource,
    *,
    api_keys: list[str] | None = None,
    store: str | None = None,
    max_waiting: int = 256,
    max_body_bytes: int = 1 << 20,
    metrics: bool = True,
    model: str = MODEL,
    **cache: Any,
) -> Iterator[RunningServer]:
    config = engine_config(store, model, **cache)
    server_metrics = ServerMetrics(model) if metrics else None
    engine = AsyncEngine(
        lambda: LLMEngine(config, source),
        max_waiting=max_waiting,
        on_step=server_metrics.on_step if server_metrics is not None else None,
    )
    state = ServerState.with_keys(engine, model, api_keys or [], max_body_bytes=max_body_bytes)
    if server_metrics is not None:
        state.extras["metrics"] = server_metrics
    with serving(state) as (base_url, server):
        yield RunningServer(base_url, state, server)


@contextlib.contextmanager
def serving(state: ServerState, timeout_s: float = 30.0) -> Iterator[tuple[str, uvicorn.Server]]:
    """The app around ``state`` on uvicorn in a thread, on a free port; stopped on exit."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout_s)
