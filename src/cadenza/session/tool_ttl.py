"""Learned tool-call TTLs (Continuum): how long to pin a session's KV while its tool runs.

When an agent's turn ends in a tool call, its next turn comes back once the tool returns. If
the tool is quick, keeping the session's KV pinned on the device through the call saves the
whole prefill of the next step; if it takes minutes, pinning only crowds out everyone else, and
the KV should go down a tier (host, disk) like any idle session's.

The learner keeps, per tenant and tool name, the recent durations observed (from the end of the
turn that called the tool to the arrival of the turn that carries its result) and answers a
TTL: a high quantile of them times a margin (soft: the pin is a hint to the eviction policy,
never a reservation), and **no pin at all** when that TTL would exceed ``max_pin_s`` — a tool
that takes minutes gets none. Until a tool has ``min_samples`` observations it gets
``default_ttl_s``. Durations come from the caller's clock, so tests drive it on virtual time.

Torch-free; kept by the server on its event loop.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class PendingCall:
    tenant: str
    tool: str
    called_at: float


class ToolTTLLearner:
    def __init__(
        self,
        *,
        quantile: float = 0.9,
        margin: float = 1.1,
        max_pin_s: float = 60.0,
        default_ttl_s: float = 10.0,
        min_samples: int = 3,
        window: int = 64,
        max_pending: int = 100_000,
    ) -> None:
        if not 0 < quantile <= 1 or margin < 1 or max_pin_s <= 0 or min_samples < 1:
            raise ValueError("need 0 < quantile <= 1, margin >= 1, max_pin_s > 0, min_samples >= 1")
        self.quantile = quantile
        self.margin = margin
        self.max_pin_s = max_pin_s
        self.default_ttl_s = default_ttl_s
        self.min_samples = min_samples
        self.window = window
        self.max_pending = max_pending
        self._durations: dict[tuple[str, str], deque[float]] = {}
        self._pending: dict[str, PendingCall] = {}

    def ttl(self, tenant: str, tool: str) -> float:
        """Seconds to pin a session whose turn just called ``tool`` (0: do not pin)."""
        samples = self._durations.get((tenant, tool))
        if samples is None or len(samples) < self.min_samples:
            return min(self.default_ttl_s, self.max_pin_s)
        ordered = sorted(samples)
        rank = max(math.ceil(self.quantile * len(ordered)) - 1, 0)
        ttl = ordered[rank] * self.margin
        return ttl if ttl <= self.max_pin_s else 0.0

    def tool_called(self, session_id: str, tenant: str, tools: list[str], now: float) -> float:
        """A turn of ``session_id`` ended calling ``tools`` (parallel calls: the slowest one
        decides); returns the TTL to pin the session's KV for."""
        if not tools:
            return 0.0
        if len(self._pending) >= self.max_pending:  # forget the oldest unanswered calls
            for key in list(self._pending)[: self.max_pending // 10 or 1]:
                del self._pending[key]
        ttls = [self.ttl(tenant, t) for t in tools]
        slowest = tools[max(range(len(tools)), key=lambda i: (ttls[i] == 0.0, ttls[i]))]
        self._pending[session_id] = PendingCall(tenant, slowest, now)
        return 0.0 if any(t == 0.0 for t in ttls) else max(ttls)

    def turn_arrived(self, session_id: str, now: float) -> float | None:
        """The session's next turn arrived: the tool's duration is learned (returned)."""
        call = self._pending.pop(session_id, None)
        if call is None:
            return None
        duration = max(now - call.called_at, 0.0)
        samples = self._durations.setdefault((call.tenant, call.tool), deque(maxlen=self.window))
        samples.append(duration)
        return duration

    def forget(self, session_id: str) -> None:
        self._pending.pop(session_id, None)

    def observed(self, tenant: str, tool: str) -> list[float]:
        return list(self._durations.get((tenant, tool), ()))
