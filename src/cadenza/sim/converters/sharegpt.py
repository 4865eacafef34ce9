"""ShareGPT multi-turn conversations → session traces with modelled user timing.

ShareGPT has the text and turn structure of real conversations but no timing, so timing is
modelled:

* **Session starts** are a Poisson process of ``session_rate`` sessions per second; the first
  session starts at 0.
* **Think time** before each follow-up, counted from the end of the previous reply (the trace's
  ``think_s``), by one of two models:

  - ``"pensieve"``: Exp(mean ``mean_think_s`` = 60 s), as in the Pensieve evaluation;
  - ``"symphony"`` (default): reading time of the previous reply + typing time of the next user
    message, as SYMPHONY describes its chat workload (its constants are not public). The rates
    here: reading 200 words/min (silent reading of non-fiction averages 238 wpm in Brysbaert,
    "How many words do we read per minute?", J. Memory and Language 2019; 200 is the usual
    round, slightly conservative figure) and typing 40 words/min (the common figure for an
    average typist; Dhakal et al., "Observations on Typing from 136 Million Keystrokes", CHI
    2018, measured about 52 wpm when copying text, and composing a message is slower),
    at 4/3 tokens per word (about 0.75 words per token for English BPE vocabularies):
    4.44 tokens/s reading, 0.89 tokens/s typing. Typing is capped at ``max_typing_s`` (60 s by
    default; a choice, not a measurement): ShareGPT user messages have a long tail of pasted
    text (p99 ~1.3k tokens) that nobody types for 25 minutes. This model draws no random
    numbers.

* **Hints**: a follow-up's ``hint_lead_s`` is its typing time (SYMPHONY sends the hint when the
  user starts typing), capped at the think time (a hint is not sent before the previous reply
  ends). A first turn has no hint: there is no session state yet to move. Each hint is dropped
  with probability ``missing_hint_fraction``.

Token counts: the ``count_tokens`` callable when given, else the record's ``n_tokens`` when
present, else :func:`cadenza.bench.sharegpt_source.estimate_tokens` (about 4 bytes per token);
at least 1. A trailing user message with no reply is dropped (a turn needs an output).

The random draws are made in a fixed order from one ``random.Random(seed)`` (per session: the
start gap, then per follow-up an exponential and a uniform, whatever the model), so traces with
the same seed but other rates, think models or missing-hint fractions are the same draws used
differently: a higher missing fraction drops a superset of the hints.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from cadenza.bench.sharegpt_source import estimate_tokens, resolve_sharegpt_source
from cadenza.sim.converters._common import check_fraction, check_limit, check_rate, round_s
from cadenza.sim.trace import TraceTurn

ThinkModel = Literal["pensieve", "symphony"]
THINK_MODELS: Final[tuple[str, ...]] = get_args(ThinkModel)

TOKENS_PER_WORD: Final = 4 / 3
READING_TOKENS_PER_S: Final = 200 * TOKENS_PER_WORD / 60  # 200 words/min ≈ 4.44 tokens/s
TYPING_TOKENS_PER_S: Final = 40 * TOKENS_PER_WORD / 60  # 40 words/min ≈ 0.89 tokens/s
PENSIEVE_MEAN_THINK_S: Final = 60.0
DEFAULT_MAX_TYPING_S: Final = 60.0

_ROLES: Final = ("user", "assistant")


@dataclass(frozen=True)
class ChatTurn:
    """One user message (its text and tokens) and the tokens of the reply to it."""

    text: str
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class ShareGPTConversation:
    conversation_id: str
    turns: tuple[ChatTurn, ...]


def _message_tokens(
    message: dict[str, Any], count_tokens: Callable[[str], int] | None, where: str
) -> int:
    content = message["content"]
    if count_tokens is not None:
        return max(1, int(count_tokens(content)))
    n = message.get("n_tokens")
    if n is None:
        return estimate_tokens(content)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{where}: n_tokens must be an integer >= 0, got {n!r}")
    return max(1, n)


def parse_conversation(
    record: Any, where: str, count_tokens: Callable[[str], int] | None = None
) -> ShareGPTConversation:
    """One record of the multi-turn schema (``id``, alternating ``messages``) as chat turns."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    conv_id = record.get("id")
    if isinstance(conv_id, bool) or not isinstance(conv_id, str | int):
        raise ValueError(f"{where}: missing or non-string 'id'")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    tokens: list[int] = []
    texts: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] is not an object with a string 'content'")
        if message.get("role") != _ROLES[i % 2]:
            raise ValueError(
                f"{where}: messages[{i}] has role {message.get('role')!r}, expected "
                f"{_ROLES[i % 2]!r} (roles must alternate, starting with 'user')"
            )
        texts.append(message["content"])
        tokens.append(_message_tokens(message, count_tokens, f"{where}: messages[{i}]"))
    turns = tuple(
        ChatTurn(text=texts[j], input_tokens=tokens[j], output_tokens=tokens[j + 1])
        for j in range(0, len(messages) - 1, 2)  # a trailing user message has no reply
    )
    return ShareGPTConversation(conversation_id=str(conv_id), turns=turns)


def read_sharegpt(
    path: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    min_turns: int = 1,
    max_turns: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> list[ShareGPTConversation]:
    """Conversations from ``path`` (or the default source, see
    :func:`cadenza.bench.sharegpt_source.resolve_sharegpt_source`), in file order: each cut to
    ``max_turns``, dropped below ``min_turns``, at most ``limit`` of them."""
    check_limit("limit", limit)
    if min_turns < 1:
        raise ValueError(f"min_turns must be >= 1, got {min_turns}")
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    out: list[ShareGPTConversation] = []
    if limit == 0:
        return out
    for where, record in resolve_sharegpt_source(path).records():
        conv = parse_conversation(record, where, count_tokens)
        if max_turns is not None and len(conv.turns) > max_turns:
            conv = ShareGPTConversation(conv.conversation_id, conv.turns[:max_turns])
        if len(conv.turns) < min_turns:
            continue
        out.append(conv)
        if limit is not None and len(out) >= limit:
            break
    return out


def think_and_typing(
    think: ThinkModel,
    previous: ChatTurn,
    current: ChatTurn,
    unit_exp: float,
    *,
    mean_think_s: float = PENSIEVE_MEAN_THINK_S,
    reading_tokens_per_s: float = READING_TOKENS_PER_S,
    typing_tokens_per_s: float = TYPING_TOKENS_PER_S,
    max_typing_s: float | None = DEFAULT_MAX_TYPING_S,
) -> tuple[float, float]:
    """``(think_s, hint_lead_s)`` before ``current``; ``unit_exp`` is an Exp(1) draw."""
    typing = current.input_tokens / typing_tokens_per_s
    if max_typing_s is not None:
        typing = min(typing, max_typing_s)
    if think == "pensieve":
        think_s = mean_think_s * unit_exp
    elif think == "symphony":
        think_s = previous.output_tokens / reading_tokens_per_s + typing
    else:
        raise ValueError(f"unknown think model {think!r}; choose from {', '.join(THINK_MODELS)}")
    return think_s, min(typing, think_s)


def conversations_to_trace(
    conversations: Sequence[ShareGPTConversation],
    *,
    session_rate: float,
    think: ThinkModel = "symphony",
    mean_think_s: float = PENSIEVE_MEAN_THINK_S,
    reading_tokens_per_s: float = READING_TOKENS_PER_S,
    typing_tokens_per_s: float = TYPING_TOKENS_PER_S,
    max_typing_s: float | None = DEFAULT_MAX_TYPING_S,
    missing_hint_fraction: float = 0.0,
    include_text: bool = True,
    seed: int = 0,
) -> list[TraceTurn]:
    """The trace of ``conversations`` (timing as in the module docstring), session by session."""
    check_rate("session_rate", session_rate)
    check_rate("reading_tokens_per_s", reading_tokens_per_s)
    check_rate("typing_tokens_per_s", typing_tokens_per_s)
    check_fraction("missing_hint_fraction", missing_hint_fraction)
    if think not in THINK_MODELS:
        raise ValueError(f"unknown think model {think!r}; choose from {', '.join(THINK_MODELS)}")
    if not mean_think_s >= 0:
        raise ValueError(f"mean_think_s must be >= 0, got {mean_think_s}")
    if max_typing_s is not None and not max_typing_s >= 0:
        raise ValueError(f"max_typing_s must be >= 0, got {max_typing_s}")
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    out: list[TraceTurn] = []
    start = 0.0
    for i, conv in enumerate(conversations):
        gap = rng.expovariate(1.0)
        if i > 0:
            start += gap / session_rate
        seen[conv.conversation_id] = seen.get(conv.conversation_id, 0) + 1
        sid = conv.conversation_id
        if seen[sid] > 1:
            sid = f"{sid}~{seen[sid]}"  # ids repeat in some sources; sessions must not merge
        for k, turn in enumerate(conv.turns):
            text = turn.text if include_text else None
            if k == 0:
                out.append(
                    TraceTurn(
                        session_id=sid,
                        arrival_s=round_s(start),
                        input_tokens=turn.input_tokens,
                        output_tokens=turn.output_tokens,
                        text=text,
                    )
                )
                continue
            unit_exp, unit_uniform = rng.expovariate(1.0), rng.random()
            think_s, lead_s = think_and_typing(
                think,
                conv.turns[k - 1],
                turn,
                unit_exp,
                mean_think_s=mean_think_s,
                reading_tokens_per_s=reading_tokens_per_s,
                typing_tokens_per_s=typing_tokens_per_s,
                max_typing_s=max_typing_s,
            )
            hinted = unit_uniform >= missing_hint_fraction
            out.append(
                TraceTurn(
                    session_id=sid,
                    think_s=round_s(think_s),
                    input_tokens=turn.input_tokens,
                    output_tokens=turn.output_tokens,
                    hint_lead_s=round_s(lead_s) if hinted else None,
                    text=text,
                )
            )
    return out


def convert_sharegpt(
    path: str | os.PathLike[str] | None = None,
    *,
    session_rate: float,
    sessions: int | None = None,
    min_turns: int = 1,
    max_turns: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    think: ThinkModel = "symphony",
    mean_think_s: float = PENSIEVE_MEAN_THINK_S,
    max_typing_s: float | None = DEFAULT_MAX_TYPING_S,
    missing_hint_fraction: float = 0.0,
    include_text: bool = True,
    seed: int = 0,
) -> list[TraceTurn]:
    """Read ShareGPT conversations (:func:`read_sharegpt`) and time them
    (:func:`conversations_to_trace`)."""
    conversations = read_sharegpt(
        path, limit=sessions, min_turns=min_turns, max_turns=max_turns, count_tokens=count_tokens
    )
    return conversations_to_trace(
        conversations,
        session_rate=session_rate,
        think=think,
        mean_think_s=mean_think_s,
        max_typing_s=max_typing_s,
        missing_hint_fraction=missing_hint_fraction,
        include_text=include_text,
        seed=seed,
    )
