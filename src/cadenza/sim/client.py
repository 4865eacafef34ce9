"""The simulated clients: replay a session trace turn by turn on the virtual clock.

A session's turns are sequential. A turn arrives at its ``arrival_s`` (or when the previous
turn and its tool call finished, if later), or ``think_s`` after that moment. Its prompt is the
session's history — the shared prefix, every earlier prompt delta and every token the engine
generated — plus the turn's new input tokens; the reply runs to the trace's output length
(``max_tokens``, ``ignore_eos``). A hint goes out ``hint_lead_s`` before the arrival, but not
before the previous turn's answer (a client cannot type before it has read the answer; an
agent's hint comes when its tool call starts, so the lead covers the tool's time). A turn
asks the cluster to retain its KV for its tool call (``retention_ttl_s = tool_s``; else the
run's default TTL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cadenza.cluster.placement import Placement
from cadenza.core.hashing import BlockHash, extend_block_hashes, hash_seed
from cadenza.core.request import Request
from cadenza.core.sampling_params import SamplingParams
from cadenza.sim.clock import EventQueue
from cadenza.sim.metrics import TurnRecord
from cadenza.sim.sim_router import SimRouter
from cadenza.sim.synthetic_tokens import synthetic_tokens
from cadenza.sim.trace import TraceTurn
from cadenza.sim.worker import SimWorker


@dataclass
class _Session:
    session_id: str
    turns: list[TraceTurn]
    history: list[int] = field(default_factory=list)
    keys: list[BlockHash] = field(default_factory=list)
    next_turn: int = 0


@dataclass
class _InFlight:
    session: _Session
    turn: int
    arrival_s: float
    submitted_s: float
    worker: SimWorker
    placement: str
    tool_s: float
    history_tokens: int
    first_token_s: float | None = None


class TraceClient:
    def __init__(
        self,
        turns: Sequence[TraceTurn],
        events: EventQueue,
        router: SimRouter,
        *,
        seed: int,
        vocab_size: int,
        block_size: int,
        fingerprint: str,
        retention_ttl_s: float,
        kick: Callable[[SimWorker], None],
    ) -> None:
        self.events = events
        self.router = router
        self.seed = seed
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.hash_seed = hash_seed(fingerprint, None)
        self.retention_ttl_s = retention_ttl_s
        self.kick = kick
        self.sessions: dict[str, _Session] = {}
        for turn in turns:
            self.sessions.setdefault(turn.session_id, _Session(turn.session_id, [])).turns.append(
                turn
            )
        self.in_flight: dict[str, _InFlight] = {}
        self.records: list[TurnRecord] = []
        self.rejected: list[tuple[str, int, str]] = []
        self._prefixes: dict[str, list[int]] = {}

    def start(self) -> None:
        for session in self.sessions.values():
            self._schedule(session, ready=0.0)

    # ------------------------------------------------------------------ arrivals
    def _schedule(self, session: _Session, ready: float, answered: float | None = None) -> None:
        """Schedule the session's next turn: it arrives at ``ready`` (the previous answer plus
        its tool call) or later; its hint may go out as early as ``answered`` (the previous
        answer itself: an agent's hint comes when its tool call starts)."""
        if session.next_turn >= len(session.turns):
            self.router.forget(session.session_id)
            session.history, session.keys = [], []  # nothing reads them again: free them
            return
        turn = session.turns[session.next_turn]
        if turn.arrival_s is not None:
            arrival = max(turn.arrival_s, ready)
        else:
            arrival = ready + (turn.think_s or 0.0)
        if turn.hint_lead_s is not None:
            earliest = ready if answered is None else answered
            hint_at = max(earliest, arrival - turn.hint_lead_s, self.events.now)
            self.events.at(hint_at, lambda: self._hint(session, arrival))
        self.events.at(arrival, lambda: self._arrive(session, arrival))

    def _hint(self, session: _Session, arrival: float) -> None:
        lead = max(arrival - self.events.now, 0.0)
        self.router.hint(session.session_id, session.history, session.keys, lead)

    def _arrive(self, session: _Session, arrival: float) -> None:
        index = session.next_turn
        turn = session.turns[index]
        if not session.history and turn.shared_prefix_id is not None:
            session.history = list(self._prefix(turn.shared_prefix_id, turn.shared_prefix_tokens))
        history_tokens = len(session.history)
        new = synthetic_tokens(
            f"{self.seed}/{session.session_id}/{index}", turn.input_tokens, self.vocab_size
        )
        tokens = session.history + new
        extend_block_hashes(session.keys, tokens, self.block_size, self.hash_seed)

        def submit(worker: SimWorker, placement: Placement) -> None:
            self._submit(session, index, arrival, tokens, history_tokens, worker, placement)

        self.router.route(session.session_id, tokens, session.keys, submit)

    def _prefix(self, prefix_id: str, n: int) -> list[int]:
        if prefix_id not in self._prefixes:
            label = f"{self.seed}/prefix/{prefix_id}"
            self._prefixes[prefix_id] = synthetic_tokens(label, n, self.vocab_size)
        return self._prefixes[prefix_id]

    def _submit(
        self,
        session: _Session,
        index: int,
        arrival: float,
        tokens: list[int],
        history_tokens: int,
        worker: SimWorker,
        placement: Placement,
    ) -> None:
        turn = session.turns[index]
        rid = f"{session.session_id}#{index}"
        ttl = turn.tool_s if turn.tool_s is not None else self.retention_ttl_s
        worker.clock.sync(self.events.now)
        try:
            worker.core.add_request(
                rid,
                tokens,
                SamplingParams(max_tokens=turn.output_tokens, ignore_eos=True),
                arrival_time=arrival,
                session_id=session.session_id,
                num_history_tokens=max(history_tokens - 1, 0),
                retention_ttl_s=ttl,
                block_hashes=session.keys,  # the keys of ``tokens``, computed at arrival
            )
        except ValueError as e:  # longer than this model's context or the KV pool
            self.rejected.append((session.session_id, index, str(e)))
            session.next_turn = len(session.turns)  # the conversation cannot go on
            self.router.forget(session.session_id)
            return
        self.in_flight[rid] = _InFlight(
            session,
            index,
            arrival,
            self.events.now,
            worker,
            placement.reason,
            turn.tool_s or 0.0,
            history_tokens,
        )
        worker.turns += 1
        self.kick(worker)

    # ------------------------------------------------------------------ replies
    def on_token(self, request: Request, t: float) -> None:
        flight = self.in_flight.get(request.request_id)
        if flight is None:
            return
        if flight.first_token_s is None:
            flight.first_token_s = t
        if not request.is_finished:
            return
        del self.in_flight[request.request_id]
        session = flight.session
        self.records.append(
            TurnRecord(
                session_id=session.session_id,
                turn=flight.turn,
                worker=flight.worker.worker_id,
                arrival_s=flight.arrival_s,
                submitted_s=flight.submitted_s,
                first_token_s=flight.first_token_s,
                finish_s=t,
                prompt_tokens=request.num_prompt_tokens,
                history_tokens=flight.history_tokens,
                output_tokens=request.num_output_tokens,
                cached_tokens=max(request.num_cached_tokens, 0),
                cached_by_tier=dict(request.cached_by_tier),
                redundant_tokens=request.num_redundant_tokens,
                placement=flight.placement,
            )
        )
        session.history = list(request.all_token_ids)
        # The request keyed every full block of its tokens, with this client's seed.
        session.keys = list(request.block_hashes)
        session.next_turn += 1
        self._schedule(session, ready=t + flight.tool_s, answered=t)
