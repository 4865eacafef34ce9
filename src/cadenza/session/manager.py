"""Sessions: turn a conversation's next message into the exact token sequence to run.

A turn's sequence is the stored token ids of every earlier turn (what was fed and what was
generated, exactly) followed by the chat-template delta for the new messages. Reuse therefore
never depends on re-tokenising text the model generated: the KV of the previous turn is a prefix
of the new sequence by construction, whatever the tokenizer would make of the decoded text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cadenza.model.tokenizer import Tokenizer
from cadenza.session.store import ConversationStore


@dataclass(frozen=True)
class Retention:
    """Keep a session's KV on the device for ``ttl_s`` after a turn (a tool call in flight);
    higher ``priority`` wins ties. Soft: under pressure pinned KV goes last, not never."""

    ttl_s: float = 0.0
    priority: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ttl_s <= 24 * 3600:
            raise ValueError("retention.ttl_s must be between 0 and 86400 seconds")

    @classmethod
    def parse(cls, value: Retention | dict[str, Any] | None) -> Retention | None:
        if value is None or isinstance(value, Retention):
            return value
        if not isinstance(value, dict):
            raise ValueError("retention must be an object like {'ttl_s': 30, 'priority': 0}")
        unknown = set(value) - {"ttl_s", "priority"}
        if unknown:
            raise ValueError(f"unknown retention fields: {sorted(unknown)}")
        try:
            return cls(float(value.get("ttl_s", 0.0)), int(value.get("priority", 0)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid retention {value!r}: {exc}") from None


@dataclass(frozen=True)
class TurnPlan:
    session_id: str
    turn_index: int
    request_id: str
    token_ids: list[int]  # history + delta: the whole sequence this turn runs
    num_history_tokens: int
    input_token_ids: list[int]  # the delta this turn adds before generating


class SessionNamespaceError(ValueError):
    """The session id belongs to another API (a Responses chain or conversation is never
    continued through chat completions, and vice versa)."""


class SessionManager:
    def __init__(self, store: ConversationStore, tokenizer: Tokenizer | None) -> None:
        self.store = store
        self.tokenizer = tokenizer

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; chat sessions need one")
        return self.tokenizer

    def begin_turn(
        self,
        session_id: str,
        new_messages: Sequence[dict[str, Any]],
        request_id: str,
        *,
        tenant: str = "",
        api: str = "chat",
        tools: list[dict[str, Any]] | None = None,
    ) -> TurnPlan:
        """Record the turn as pending and return the sequence to run (``tools``: rendered by
        the chat template, for templates that use them)."""
        if not new_messages:
            raise ValueError("a turn needs at least one new message")
        self._open(session_id, tenant, api)
        history = self.store.history_token_ids(session_id)
        prior = self.store.messages(session_id)
        delta = self.template_delta(prior, list(new_messages), history, tools)
        index = self.store.begin_turn(session_id, request_id, delta, list(new_messages))
        return TurnPlan(session_id, index, request_id, history + delta, len(history), delta)

    def begin_raw_turn(
        self,
        session_id: str,
        input_token_ids: Sequence[int],
        request_id: str,
        *,
        tenant: str = "",
        api: str = "chat",
    ) -> TurnPlan:
        """A turn given as token ids to append (completions-style sessions)."""
        self._open(session_id, tenant, api)
        history = self.store.history_token_ids(session_id)
        delta = [int(t) for t in input_token_ids]
        index = self.store.begin_turn(session_id, request_id, delta, [])
        return TurnPlan(session_id, index, request_id, history + delta, len(history), delta)

    def _open(self, session_id: str, tenant: str, api: str) -> None:
        record = self.store.get_or_create_session(session_id, tenant=tenant, metadata={"api": api})
        owner = record.metadata.get("api", "chat")
        if owner != api:
            raise SessionNamespaceError(
                f"session {session_id.rpartition(':')[2]!r} belongs to the {owner} API and cannot"
                f" be continued through {api}; use another session id"
            )

    def complete_turn(
        self, plan: TurnPlan, output_token_ids: Sequence[int], text: str, finish_reason: str | None
    ) -> None:
        self.store.complete_turn(
            plan.session_id, plan.turn_index, list(output_token_ids), text, finish_reason
        )

    def abort_turn(self, plan: TurnPlan, reason: str = "aborted") -> None:
        self.store.abort_turn(plan.session_id, plan.turn_index, reason)

    # ---------------------------------------------------------------------- template delta
    def template_delta(
        self,
        prior_messages: list[dict[str, Any]],
        new_messages: list[dict[str, Any]],
        history: list[int],
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        tok = self.require_tokenizer()
        if not prior_messages:
            return tok.encode_chat(new_messages, add_generation_prompt=True, tools=tools)
        before = tok.apply_chat_template(prior_messages, add_generation_prompt=False, tools=tools)
        after = tok.apply_chat_template(
            prior_messages + new_messages, add_generation_prompt=True, tools=tools
        )
        if not after.startswith(before):
            raise ValueError(
                "this model's chat template rewrites earlier turns, so a session cannot extend "
                "its history; resend the full conversation without a session id"
            )
        # The stored history ends where generation stopped: at an end-of-turn token, or
        # mid-reply (length limit). Close the reply the way the template would, then append.
        eos_ids = tok.eos_token_ids
        eos_text = tok.decode([eos_ids[0]], skip_special_tokens=False) if eos_ids else ""
        cut = before.rfind(eos_text) if eos_text else -1
        closing = before[cut + len(eos_text) :] if cut >= 0 else ""
        if history and eos_text and history[-1] not in eos_ids:
            closing = eos_text + closing
        return tok.encode(closing + after[len(before) :])
