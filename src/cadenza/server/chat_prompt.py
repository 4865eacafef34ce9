"""Token ids for a resent conversation that reuse exactly what this server generated.

A stateless client (any OpenAI SDK) sends the whole history every turn, with the assistant's
earlier replies as text. Re-tokenising that text need not give back the ids the model produced
(BPE merges differ across a reply's boundaries), and one differing token breaks the prefix
match for everything after it. So the server remembers, per tenant, the ids behind each reply it
generated, and rebuilds the prompt turn by turn the way a session does: template delta of the
messages up to each remembered reply, then that reply's exact ids. A reply that called tools
comes back as ``tool_calls`` (content null): it is remembered under its call ids, which the
client sends back unchanged.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from cadenza.session.manager import SessionManager
from cadenza.tools.template import ToolContext


def reply_key(message: dict[str, Any]) -> str | None:
    """What identifies an assistant reply when a client sends it back: its tool call ids
    when it made calls, else its text."""
    calls = message.get("tool_calls")
    if calls:
        ids = [c.get("id") or "" for c in calls if isinstance(c, dict)]
        return "\0tool_calls:" + ",".join(ids) if all(ids) else None
    content = message.get("content")
    return content if isinstance(content, str) else None


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
    tools: ToolContext | None = None,
) -> list[int]:
    """The prompt for ``messages`` (generation prompt appended), with every assistant reply
    this server generated for ``tenant`` spliced in as its exact token ids."""
    if tools is not None:
        messages = tools.with_prompt(messages)
    template_tools = tools.template_tools() if tools is not None else None
    try:
        return _spliced(sessions, messages, memory, tenant, tools)
    except ValueError:  # the template rewrites earlier turns: render the whole conversation
        rendered = [tools.convert(m) for m in messages] if tools is not None else messages
        return sessions.require_tokenizer().encode_chat(
            rendered, add_generation_prompt=True, tools=template_tools
        )


def _spliced(
    sessions: SessionManager,
    messages: list[dict[str, Any]],
    memory: GenerationMemory,
    tenant: str,
    tools: ToolContext | None,
) -> list[int]:
    template_tools = tools.template_tools() if tools is not None else None
    tokens: list[int] = []
    prior: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    for message in messages:
        key = reply_key(message) if message.get("role") == "assistant" else None
        ids = memory.lookup(tenant, key) if key is not None and pending else None
        rendered = tools.convert(message) if tools is not None else message
        if ids is None:
            pending.append(rendered)
            continue
        tokens += sessions.template_delta(prior, pending, tokens, template_tools) + ids
        prior += pending + [rendered]
        pending = []
    return tokens + sessions.template_delta(prior, pending, tokens, template_tools)
