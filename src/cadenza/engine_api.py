"""The typed engine API: commands a server or router sends to an engine, and their results.

Every command and result is a plain picklable dataclass, so the same API works in-process (the
single-node server's engine thread), across a pipe, or to a Ray actor. The engine never sees
text templates or the durable conversation history: a caller that owns the history (the server
now, the cluster router next) builds a turn's token ids and passes them with the session id.

``LLMEngine.handle(command)`` executes a command; ``EngineRequest`` is submitted with
``AddRequest`` and its outputs come back as ``RequestOutput`` objects (pushed to a stream
in-process, or collected with ``PullOutputs`` by a remote caller).

This module imports neither torch nor the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cadenza.core.engine_core import LoadSnapshot
from cadenza.core.kv_events import KVEvent
from cadenza.core.sampling_params import SamplingParams
from cadenza.kvstore.kv_export import KVExport


@dataclass(frozen=True)
class EngineRequest:
    """One request: a prompt (text, or token ids) with its sampling parameters. A session turn
    sets ``session_id`` and ``num_history_tokens`` (how many leading tokens are the session's
    stored history, whose KV may be cached anywhere) and optionally a retention TTL."""

    request_id: str
    prompt: str | tuple[int, ...]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    session_id: str | None = None
    num_history_tokens: int = 0
    retention_ttl_s: float = 0.0
    priority: int = 0
    cache_salt: str | None = None
    arrival_time: float | None = None
    # Tokens this request already generated on another engine (a failed-over or live-migrated
    # request): they follow the prompt and count as output (max_tokens, penalties, the seeded
    # sampling step), so the continuation is the one an uninterrupted run would produce.
    resume_token_ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, request_id: str, prompt: str | list[int] | tuple[int, ...], **kw: Any):
        return cls(request_id, prompt if isinstance(prompt, str) else tuple(prompt), **kw)


@dataclass(frozen=True)
class AddRequest:
    request: EngineRequest


@dataclass(frozen=True)
class AbortRequest:
    request_id: str
    reason: str = "client"  # client (disconnect / cancel), error, shutdown, migrated
    # Export the request's KV (its full blocks, as ``ExportKV`` would) in the same engine step
    # it is stopped in: the stop-and-copy of a live migration.
    export: bool = False


@dataclass(frozen=True)
class HintSession:
    """The session's next turn is coming; ``history`` is its stored token history."""

    session_id: str
    history: tuple[int, ...]
    cache_salt: str | None = None
    expected_arrival_s: float | None = None
    ttl_s: float | None = None


@dataclass(frozen=True)
class EndSession:
    session_id: str
    history: tuple[int, ...]
    cache_salt: str | None = None


@dataclass(frozen=True)
class ExportKV:
    session_id: str
    history: tuple[int, ...]
    cache_salt: str | None = None


@dataclass(frozen=True)
class ImportKV:
    export: KVExport


@dataclass(frozen=True)
class GetLoad:
    pass


@dataclass(frozen=True)
class GetStats:
    pass


@dataclass(frozen=True)
class DrainEvents:
    pass


@dataclass(frozen=True)
class PullOutputs:
    """Outputs produced since the last pull (for a caller that does not get them pushed)."""


EngineCommand = (
    AddRequest
    | AbortRequest
    | HintSession
    | EndSession
    | ExportKV
    | ImportKV
    | GetLoad
    | GetStats
    | DrainEvents
    | PullOutputs
)


@dataclass(frozen=True)
class HintResult:
    blocks_by_tier: dict[str, int]


@dataclass(frozen=True)
class ImportResult:
    """What an import installed: blocks by tier, and layer chunks / blocks it rejected."""

    num_blocks: int
    installed_by_tier: dict[str, int]
    rejected_chunks: int
    rejected_blocks: int
    num_tokens: int


@dataclass
class EngineStats:
    """Counters an engine reports for metrics (all plain numbers, picklable)."""

    load: LoadSnapshot
    num_aborted: dict[str, int]
    prefix_queries: int
    prefix_hits: int
    device_cached_blocks: int
    device_usage: float  # referenced blocks / all blocks (vLLM's kv_cache_usage_perc)
    tier_stats: dict[str, Any]
    disk_stats: dict[str, Any] | None
    disk_capacity_bytes: int
    disk_used_bytes: int
    import_rejected_chunks: int
    host_checksum_failures: int


__all__ = [
    "AbortRequest",
    "AddRequest",
    "DrainEvents",
    "EndSession",
    "EngineCommand",
    "EngineRequest",
    "EngineStats",
    "ExportKV",
    "GetLoad",
    "GetStats",
    "HintResult",
    "HintSession",
    "ImportKV",
    "ImportResult",
    "KVEvent",
    "KVExport",
    "LoadSnapshot",
    "PullOutputs",
]
