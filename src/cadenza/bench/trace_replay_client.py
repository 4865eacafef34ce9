"""The open-loop trace client of the real-engine replay: the simulator's client on the wall clock.

Each session is one coroutine that walks its turns in order, with exactly the semantics of the
simulated client (``cadenza.sim.client``):

* a turn arrives at its ``arrival_s`` (or when the previous turn and its tool call finished, if
  later), or ``think_s`` after that moment; times count from the start of the replay;
* its prompt is the session's history (the shared prefix, every earlier prompt and every token
  the engine generated) plus the turn's new input tokens, whose ids are the simulator's
  synthetic ones (``synthetic_tokens(f"{seed}/{session}/{turn}")``), so both sides process the
  same token counts and share KV exactly where the trace says;
* the reply runs to the trace's output length (``max_tokens``, ``ignore_eos``);
* a hint (``HintSession``) goes out ``hint_lead_s`` before the arrival, but not before the
  previous turn's reply (as the simulator counts it: an agent's hint comes when its tool
  call starts); it is
  sent in the background so a slow engine never delays the arrival behind it, but it is
  handed to the engine before a turn arriving at the same moment;
* the turn asks for its KV to be retained for its tool call (``retention_ttl_s = tool_s``;
  else the run's default TTL);
* after its last turn (or a turn the engine refused) the session ends (``EndSession``: the
  router forgets it, its pins lapse).

The engine is anything with the engine API's ``generate(EngineRequest)`` and ``call(command)``:
the single-node ``AsyncEngine`` or the cluster router ``ClusterEngine``. A turn's times are
arrival (scheduled, not when the event loop got to it: the replay is open-loop), submission
(the engine accepted it: the router placed it, after any KV move it waited for), first token
and last token as this client saw them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cadenza.core.sampling_params import SamplingParams
from cadenza.engine_api import EndSession, EngineRequest, HintSession
from cadenza.server.worker_header import WORKER_OF_REQUEST
from cadenza.sim.metrics import TurnRecord
from cadenza.sim.synthetic_tokens import synthetic_tokens
from cadenza.sim.trace import TraceTurn


class EngineAPI(Protocol):
    """What the client drives: ``AsyncEngine`` and ``ClusterEngine`` both answer these."""

    def generate(self, request: EngineRequest) -> Any: ...

    async def call(self, command: Any) -> Any: ...


class _Placed(dict[str, str]):
    """The holder the engine writes the worker id into (``set_worker``) once the request is
    placed; it remembers when, which is the turn's submission time."""

    def __init__(self, clock: Any) -> None:
        super().__init__()
        self._clock = clock
        self.at: float | None = None

    def __setitem__(self, key: str, value: str) -> None:
        if self.at is None:
            self.at = self._clock()
        super().__setitem__(key, value)


@dataclass
class ClientResult:
    records: list[TurnRecord] = field(default_factory=list)
    rejected: list[tuple[str, int, str]] = field(default_factory=list)
    hints_sent: int = 0
    advice_errors: int = 0  # hints and session ends the engine refused


class TraceClient:
    def __init__(
        self,
        engine: EngineAPI,
        turns: Sequence[TraceTurn],
        *,
        seed: int,
        vocab_size: int,
        retention_ttl_s: float,
        default_worker: str = "w0",
    ) -> None:
        self.engine = engine
        self.seed = seed
        self.vocab_size = vocab_size
        self.retention_ttl_s = retention_ttl_s
        self.default_worker = default_worker
        self.sessions: dict[str, list[TraceTurn]] = {}
        for turn in turns:
            self.sessions.setdefault(turn.session_id, []).append(turn)
        self._prefixes: dict[str, list[int]] = {}
        self.result = ClientResult()
        self._start = 0.0
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ time
    def now(self) -> float:
        """Seconds since the replay started."""
        return time.monotonic() - self._start

    async def _sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------ the run
    async def run(self) -> ClientResult:
        self._start = time.monotonic()
        await asyncio.gather(*(self._session(sid, turns) for sid, turns in self.sessions.items()))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        return self.result

    def _prefix(self, prefix_id: str, n: int) -> list[int]:
        if prefix_id not in self._prefixes:
            label = f"{self.seed}/prefix/{prefix_id}"
            self._prefixes[prefix_id] = synthetic_tokens(label, n, self.vocab_size)
        return self._prefixes[prefix_id]

    async def _session(self, sid: str, turns: list[TraceTurn]) -> None:
        history: list[int] = []
        ready = answered = 0.0  # previous answer plus its tool call; the previous answer
        for index, turn in enumerate(turns):
            if turn.arrival_s is not None:
                arrival = max(turn.arrival_s, ready)
            else:
                arrival = ready + (turn.think_s or 0.0)
            if turn.hint_lead_s is not None:
                # An agent's hint comes when its tool call starts, i.e. at the previous answer.
                hint_at = max(answered, arrival - turn.hint_lead_s, self.now())
                await self._sleep_until(hint_at)
                self._spawn(self._hint(sid, tuple(history), arrival))
                # Let the hint reach the engine before a turn arriving at the same moment (the
                # simulator's event queue runs the hint, scheduled first, first too).
                await asyncio.sleep(0)
            await self._sleep_until(arrival)
            if not history and turn.shared_prefix_id is not None:
                history = list(self._prefix(turn.shared_prefix_id, turn.shared_prefix_tokens))
            new = synthetic_tokens(f"{self.seed}/{sid}/{index}", turn.input_tokens, self.vocab_size)
            tokens = history + new
            outcome = await self._turn(sid, index, turn, arrival, tokens, len(history))
            if outcome is None:
                break  # rejected: the conversation cannot go on
            history, finish = outcome
            answered, ready = finish, finish + (turn.tool_s or 0.0)
        try:
            await self.engine.call(EndSession(sid, tuple(history)))
        except Exception:  # advice only: a failed end costs nothing but pins
            self.result.advice_errors += 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _hint(self, sid: str, history: tuple[int, ...], arrival: float) -> None:
        lead = max(arrival - self.now(), 0.0)
        try:
            await self.engine.call(HintSession(sid, history, expected_arrival_s=lead))
            self.result.hints_sent += 1
        except Exception:  # hints are advice (a failed one costs performance only)
            self.result.advice_errors += 1

    async def _turn(
        self,
        sid: str,
        index: int,
        turn: TraceTurn,
        arrival: float,
        tokens: list[int],
        history_tokens: int,
    ) -> tuple[list[int], float] | None:
        ttl = turn.tool_s if turn.tool_s is not None else self.retention_ttl_s
        request = EngineRequest(
            f"{sid}#{index}",
            tuple(tokens),
            SamplingParams(max_tokens=turn.output_tokens, ignore_eos=True),
            session_id=sid,
            num_history_tokens=max(history_tokens - 1, 0),
            retention_ttl_s=ttl,
            arrival_time=self._start + arrival,
        )
        placed = _Placed(self.now)
        token = WORKER_OF_REQUEST.set(placed)
        first: float | None = None
        last = None
        try:
            async for out in self.engine.generate(request):
                if first is None and out.outputs[0].token_ids:
                    first = self.now()
                last = out
        except ValueError as e:  # longer than the model's context or the KV pool
            self.result.rejected.append((sid, index, str(e)))
            return None
        finally:
            WORKER_OF_REQUEST.reset(token)
        finish = self.now()
        assert last is not None and last.finished
        output = list(last.outputs[0].token_ids)
        self.result.records.append(
            TurnRecord(
                session_id=sid,
                turn=index,
                worker=placed.get("worker") or self.default_worker,
                arrival_s=arrival,
                submitted_s=placed.at if placed.at is not None else arrival,
                first_token_s=first if first is not None else finish,
                finish_s=finish,
                prompt_tokens=len(tokens),
                history_tokens=history_tokens,
                output_tokens=len(output),
                cached_tokens=max(last.num_cached_tokens, 0),
                cached_by_tier=dict(last.cached_tokens_by_tier),
                redundant_tokens=last.num_redundant_tokens,
            )
        )
        return tokens + output, finish
