"""Token ids for a resent conversation that reuse exactly what this server generated.

A stateless client (any OpenAI SDK) sends the whole history every turn, with the assistant's
earlier replies as text. Re-tokenising that text need not give back the ids the model produced
(BPE merges differ across a reply's boundaries), and one differing token breaks the prefix
match for everything after it. So the server remembers, per tenant, the ids behind each reply it
generated, and rebuilds the prompt turn by turn the way a session does: template delta of the
messages up to each remembered reply, then that reply's exact ids.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from cadenza.session.manager import SessionManager


class GenerationMemory:
    """Bounded LRU of ``(tenant, reply text) -> generated token ids``. Thread-safe."""

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(tenant: str, text: str) -> bytes:
        return hashlib.sha256(f"{tenant}\0{text}".encode()).digest()

    def remember(self, tenant: str, text: str, token_ids: Sequence[int]) -> None:
        if not text or not token_ids:
            return
        key = self._key(tenant, text)
        with self._lock:
            self._items[key] = tuple(token_ids)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def lookup(self, tenant: str, text: str) -> list[int] | None:
        key = self._key(tenant, text)
        with self._lock:
            ids = self._items.get(key)
            if ids is not None:
                self._items.move_to_end(key)
        return list(ids) if ids is not None else None

    def __len__(self) -> int:
        return len(self._items)


def conversation_token_ids(
    sessions: SessionManager,
    messages: list[dict[str, Any]],
    memory: GenerationMemory,
    tenant: str,
) -> list[int]:
    """The prompt for ``messages`` (generation prompt appended), with every assistant reply
    this server generated for ``tenant`` spliced in as its exact token ids."""
    try:
        return _spliced(sessions, messages, memory, tenant)
    except ValueError:  # the template rewrites earlier turns: render the whole conversation
        return sessions.require_tokenizer().encode_chat(messages, add_generation_prompt=True)


def _spliced(
    sessions: SessionManager,
    messages: list[dict[str, Any]],
    memory: GenerationMemory,
    tenant: str,
) -> list[int]:
    tokens: list[int] = []
    prior: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content")
        ids = None
        if message.get("role") == "assistant" and isinstance(content, str) and pending:
            ids = memory.lookup(tenant, content)
        if ids is None:
            pending.append(message)
            continue
        tokens += sessions.template_delta(prior, pending, tokens) + ids
        prior += pending + [message]
        pending = []
    return tokens + sessions.template_delta(prior, pending, tokens)
