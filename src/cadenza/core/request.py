"""A request is a token list and a counter catching up with it.

``num_computed_tokens`` says how many leading tokens have KV in the cache. Each step the
scheduler hands a request some of the missing tokens (a prefill chunk, a recompute after
preemption, or the single newest token of a decode); when the counter reaches the end of the
list, the model samples the next token and the list grows by one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cadenza.core.hashing import BlockHash, extend_block_hashes
from cadenza.core.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self._finished  # type: ignore[attr-defined,no-any-return]


# Read on every request of every step: a plain attribute, not a test of ``value`` (which goes
# through the enum's descriptor each time).
for _status in RequestStatus:
    _status._finished = _status.value in ("stop", "length", "abort")  # type: ignore[attr-defined]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    block_size: int
    hash_seed: BlockHash
    # Largest total length (prompt + output) this request may reach.
    max_total_tokens: int
    arrival_time: float = 0.0
    priority: int = 0
    cache_salt: str | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache when first scheduled (-1: not yet scheduled).
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    block_hashes: list[BlockHash] = field(default_factory=list)
    stop_reason: int | str | None = None

    # Sessions: the turn's session, and how many leading tokens that session had already
    # computed in earlier turns (recomputing any of them is redundant prefill).
    session_id: str | None = None
    num_history_tokens: int = 0
    num_redundant_tokens: int = 0
    # Cached runs after a hole, as token ranges ``(start, end)``, ascending: when the counter
    # reaches a run's start it jumps to its end (the run's blocks were found cached; the holes
    # before them are recomputed).
    skips: list[tuple[int, int]] = field(default_factory=list)
    # Prompt tokens reused from the cache at first admission, by the tier each block came
    # from ("device": a device hit; "host"/"disk": fetched from there for this request); they
    # sum to ``num_cached_tokens``. Empty when nothing was reused.
    cached_by_tier: dict[str, int] = field(default_factory=dict)
    fetch_tried: bool = False
    # The tier ("host" or "disk") of each block, by key, that this request's fetch copied up.
    fetch_sources: dict[BlockHash, str] = field(default_factory=dict)
    # How many later requests were admitted while this one waited for its KV fetch (or for
    # room to fetch into); bounded by the scheduler's ``max_fetch_overtakes``.
    num_overtaken: int = 0
    # Keep this turn's KV pinned on the device for this long after it finishes.
    retention_ttl_s: float = 0.0
    # When the request's program (its session) began: the key of program-level FCFS.
    program_arrival: float = 0.0

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        extend_block_hashes(self.block_hashes, self.all_token_ids, self.block_size, self.hash_seed)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def num_skipped_tokens(self) -> int:
        """Tokens of the cached runs still ahead of the counter (never computed here)."""
        return sum(end - start for start, end in self.skips)

    def segments(self, num_new: int) -> list[tuple[int, int]]:
        """The token ranges the next ``num_new`` tokens cover, jumping over cached runs."""
        pos = self.num_computed_tokens
        left = num_new
        out: list[tuple[int, int]] = []
        for start, end in self.skips:
            if end <= pos:
                continue  # behind the counter (``advance`` drops these)
            n = min(left, start - pos)
            if n > 0:
                out.append((pos, pos + n))
                left -= n
            if left <= 0:
                return out
            pos = end
        n = min(left, self.num_tokens - pos)
        if n > 0:
            out.append((pos, pos + n))
        return out

    def advance(self, segments: list[tuple[int, int]]) -> None:
        """Mark the segments computed (and count history tokens computed again)."""
        for start, end in segments:
            self.num_redundant_tokens += max(0, min(end, self.num_history_tokens) - start)
        self.num_computed_tokens = segments[-1][1]
        skips = self.skips
        while skips and self.num_computed_tokens >= skips[0][0]:
            start, end = skips.pop(0)
            if self.num_computed_tokens == start:
                self.num_computed_tokens = end

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if len(self.all_token_ids) % self.block_size == 0:
            extend_block_hashes(
                self.block_hashes, self.all_token_ids, self.block_size, self.hash_seed
            )

    def check_stop(self) -> RequestStatus | None:
        """The finished status implied by the newest token, if any (stop strings are the
        output processor's job, since they need text)."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        max_tokens = params.max_tokens
        if max_tokens is not None and self.num_output_tokens >= max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.num_tokens >= self.max_total_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
