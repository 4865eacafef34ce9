"""The Mooncake (Kimi, FAST'25) traces → session traces, sessions recovered from prefix hashes.

A Mooncake line is ``{"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}``,
where ``hash_ids`` are chained hashes of the prompt's 512-token blocks: an equal id means an
identical prompt up to the end of that block. Sessions are not labelled; they are recovered:

* **Next turn.** A request continues an earlier request P when its ``hash_ids`` start with all of
  P's *complete* blocks and its prompt is longer than P's. P's last block is usually partial
  (its hash covers fewer than 512 tokens, so it never reappears once the conversation grows):
  demanding P's full ``hash_ids`` finds 12 continuations in the conversation trace, demanding
  its complete blocks finds 3,835 (after forks, below). The longest such prefix wins, and among
  requests with that prefix the most recent one. The match must go beyond the shared system
  block (block 0), so a request of at most 1,024 tokens (block 0 + one partial block) has no
  recoverable next turn.
* **Forks.** A session is a chain. A request whose best match already has a next turn (a retry
  or an edited message) starts a new session; its reuse of the shared history beyond block 0 is
  lost (140 requests, 1.2% of the conversation trace; 782, 20%, of the synthetic one, whose
  requests share prefixes as trees rather than chains).
* **Tokens.** Block 0 (present on every conversation request) is the shared system prompt:
  ``shared_prefix_id="mooncake-system"``, 512 tokens, not counted in ``input_tokens``. A first
  turn's ``input_tokens`` is the rest of its prompt. A next turn's ``input_tokens`` is its prompt
  minus what the trace format already counts as history (P's prompt and P's reply), so the
  replayed prompt has the recorded length; when P's reply was not fully re-sent that difference
  is <= 0 and is raised to 1 (337 of the 3,835 continuations, by at most P's reply), which
  :attr:`Recovery.clamped_inputs` counts. A reply of 0 tokens is raised to 1 (a turn needs an
  output).
* **Timing.** ``timing="arrival"`` (default) keeps every turn's recorded arrival as ``arrival_s``.
  The trace's value is its real load shape, the turn pairing is an inference, and Kimi's turn
  durations are unknown, so rebuilding arrivals from think times would distort the load and
  import errors of the pairing. A replay that is slower than Kimi still keeps each session
  sequential (a turn waits for the previous one, see :mod:`cadenza.sim.trace`).
  ``timing="think"`` is for closed-loop runs: later turns get ``think_s`` = the recorded gap
  minus an estimate of P's duration (P's output tokens x ``assumed_tpot_s``, default 0: the
  gap), at least 0.

The synthetic Mooncake trace has the same format and converts the same way.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

from cadenza.sim.converters._common import check_limit, round_s
from cadenza.sim.trace import TraceTurn

BLOCK_TOKENS: Final = 512
SYSTEM_BLOCK_ID: Final = 0
SYSTEM_PREFIX_ID: Final = "mooncake-system"

Timing = Literal["arrival", "think"]
TIMINGS: Final[tuple[str, ...]] = get_args(Timing)


@dataclass(frozen=True)
class MooncakeRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    @property
    def complete_blocks(self) -> int:
        """How many of the prompt's blocks are full 512-token blocks."""
        return min(len(self.hash_ids), self.input_length // BLOCK_TOKENS)

    @property
    def has_system_block(self) -> bool:
        return (
            self.input_length >= BLOCK_TOKENS
            and bool(self.hash_ids)
            and self.hash_ids[0] == SYSTEM_BLOCK_ID
        )


@dataclass(frozen=True)
class Recovery:
    """Recovered sessions: ``previous[i]`` is the request that request ``i`` continues, or None
    when ``i`` starts a session."""

    previous: tuple[int | None, ...]
    forks: int  # requests whose best match already had a next turn (they start sessions)
    clamped_inputs: int = 0  # next turns whose new input was <= 0, raised to 1 (by the trace)


def _int(record: dict[str, Any], key: str, where: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {key} must be an integer >= 0, got {value!r}")
    return value


def parse_request(record: Any, where: str) -> MooncakeRequest:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    timestamp = record.get("timestamp")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise ValueError(f"{where}: timestamp must be a number of milliseconds, got {timestamp!r}")
    if not (math.isfinite(timestamp) and timestamp >= 0):
        raise ValueError(f"{where}: timestamp must be finite and >= 0, got {timestamp!r}")
    hash_ids = record.get("hash_ids")
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
    ):
        raise ValueError(f"{where}: hash_ids must be a list of integers")
    return MooncakeRequest(
        timestamp_ms=float(timestamp),
        input_length=_int(record, "input_length", where),
        output_length=_int(record, "output_length", where),
        hash_ids=tuple(hash_ids),
    )


def read_mooncake(path: str | os.PathLike[str]) -> list[MooncakeRequest]:
    """The requests of a Mooncake trace file, in file order; errors name the line."""
    source = Path(path)
    out: list[MooncakeRequest] = []
    with open(source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{source}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
            out.append(parse_request(record, where))
    return out


def recover_sessions(requests: Sequence[MooncakeRequest]) -> Recovery:
    """Pair each request with the earlier request it continues (rules in the module docstring).

    ``requests`` must be in arrival order. Chained hashes make a block id name its whole prefix,
    so an index from a block id to the latest request whose complete blocks end there finds the
    longest match in one pass over each request's ids (longest first).
    """
    ends_at: dict[int, tuple[int, int]] = {}  # block id -> (position, latest request ending there)
    has_next: set[int] = set()
    previous: list[int | None] = []
    forks = 0
    for i, request in enumerate(requests):
        if i and request.timestamp_ms < requests[i - 1].timestamp_ms:
            raise ValueError(f"request {i} arrives before request {i - 1}; sort by timestamp")
        shortest = 2 if request.has_system_block else 1  # a match must go beyond block 0
        match: int | None = None
        for k in range(len(request.hash_ids), shortest - 1, -1):
            hit = ends_at.get(request.hash_ids[k - 1])
            if hit is not None and hit[0] == k - 1:
                match = hit[1]
                break
        if match is not None and (
            match in has_next or requests[match].input_length >= request.input_length
        ):
            forks += 1
            match = None
        if match is not None:
            has_next.add(match)
        previous.append(match)
        complete = request.complete_blocks
        if complete >= shortest:
            ends_at[request.hash_ids[complete - 1]] = (complete - 1, i)
    return Recovery(previous=tuple(previous), forks=forks)


def mooncake_to_trace(
    requests: Sequence[MooncakeRequest],
    *,
    timing: Timing = "arrival",
    assumed_tpot_s: float = 0.0,
    sessions: int | None = None,
) -> tuple[list[TraceTurn], Recovery]:
    """The trace of ``requests`` (in arrival order) and the recovery it came from.

    Turns are in request order; ``sessions`` keeps the first that many sessions (by start).
    """
    if timing not in TIMINGS:
        raise ValueError(f"unknown timing {timing!r}; choose from {', '.join(TIMINGS)}")
    if not (assumed_tpot_s >= 0 and math.isfinite(assumed_tpot_s)):
        raise ValueError(f"assumed_tpot_s must be a finite number >= 0, got {assumed_tpot_s}")
    check_limit("sessions", sessions)
    recovery = recover_sessions(requests)
    t0 = requests[0].timestamp_ms if requests else 0.0
    session_of: list[str] = []
    has_prefix: dict[str, bool] = {}  # session -> whether it starts with the system block
    clamped = 0
    out: list[TraceTurn] = []
    for i, request in enumerate(requests):
        prev = recovery.previous[i]
        if prev is None:
            sid = f"mooncake-{i}"
            if sessions is not None and len(has_prefix) >= sessions:
                session_of.append("")  # a dropped session: its next turns are dropped too
                continue
            has_prefix[sid] = request.has_system_block
            new_tokens = request.input_length - (BLOCK_TOKENS if has_prefix[sid] else 0)
            think_s = None
        else:
            sid = session_of[prev]
            p = requests[prev]
            new_tokens = request.input_length - p.input_length - p.output_length
            gap = (request.timestamp_ms - p.timestamp_ms) / 1000.0
            think_s = max(0.0, gap - p.output_length * assumed_tpot_s)
        session_of.append(sid)
        if not sid:
            continue
        clamped += prev is not None and new_tokens <= 0
        absolute = think_s is None or timing == "arrival"
        out.append(
            TraceTurn(
                session_id=sid,
                arrival_s=round_s((request.timestamp_ms - t0) / 1000.0) if absolute else None,
                think_s=None if absolute else round_s(think_s or 0.0),
                input_tokens=max(1, new_tokens),
                output_tokens=max(1, request.output_length),
                shared_prefix_id=SYSTEM_PREFIX_ID if has_prefix[sid] else None,
                shared_prefix_tokens=BLOCK_TOKENS if has_prefix[sid] else 0,
            )
        )
    recovery = Recovery(recovery.previous, recovery.forks, clamped)
    return out, recovery


def convert_mooncake(
    path: str | os.PathLike[str],
    *,
    timing: Timing = "arrival",
    assumed_tpot_s: float = 0.0,
    sessions: int | None = None,
) -> list[TraceTurn]:
    """Read a Mooncake trace, sort it by arrival (stable) and convert it
    (:func:`mooncake_to_trace`)."""
    requests = sorted(read_mooncake(path), key=lambda r: r.timestamp_ms)
    turns, _ = mooncake_to_trace(
        requests, timing=timing, assumed_tpot_s=assumed_tpot_s, sessions=sessions
    )
    return turns
