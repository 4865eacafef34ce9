"""Tool-call retention through the server, on an injected clock (Continuum): a session whose
turns call a quick tool gets its KV pinned for about the tool's learned duration when the
turn ends; one whose tool takes minutes gets no pin, so its KV goes down a tier like any idle
session's."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from tests.server_harness import running_server

from cadenza.engine_api import GetLoad, HintSession
from cadenza.session.layer import SessionLayer
from cadenza.session.store import ConversationStore
from cadenza.session.tool_ttl import ToolTTLLearner

PARAMS = {
    "type": "object",
    "properties": {"q": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["q"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": PARAMS}}
    for name in ("grep", "build")
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_agent(base: str, session: str, tool: str, steps: int, clock: FakeClock, took_s: float):
    """``steps`` agent steps on ``session``, each ending in a forced call of ``tool`` whose
    result comes back ``took_s`` later (on the fake clock)."""
    messages: list[dict] = [{"role": "user", "content": f"Use {tool}."}]
    for _ in range(steps):
        reply = httpx.post(
            base + "/v1/chat/completions",
            json={
                "model": "tiny-chat",
                "messages": messages,
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": tool}},
                "parallel_tool_calls": False,
                "max_tokens": 64,
                "session_id": session,
            },
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        (call,) = reply.json()["choices"][0]["message"]["tool_calls"]
        clock.now += took_s
        messages = [{"role": "tool", "tool_call_id": call["id"], "content": "ok"}]


@pytest.fixture()
def server(tiny_chat_source):
    """A server whose session layer runs on a fake clock (tools not seen yet get no pin), and
    a record of the pins it sends to the engine."""
    with running_server(tiny_chat_source, num_blocks=256) as running:
        clock = FakeClock()
        running.state.session_layer = SessionLayer(
            ConversationStore(":memory:"),
            tiny_chat_source.tokenizer,
            clock=clock,
            tool_ttl=ToolTTLLearner(default_ttl_s=0.0),
        )
        engine = running.state.engine
        call = engine.call
        pins: list[float] = []

        async def recording_call(command):
            if isinstance(command, HintSession):
                pins.append(command.ttl_s)
            return await call(command)

        engine.call = recording_call  # type: ignore[method-assign]
        yield running, clock, pins


def pinned(running) -> int:
    return asyncio.run(_load(running)).device_blocks_pinned


async def _load(running):
    return await running.state.engine.call(GetLoad())


def test_a_quick_tool_gets_a_pin_of_about_its_duration(server):
    running, clock, pins = server
    layer = running.state.sessions
    run_agent(running.base_url, "quick", "grep", 4, clock, took_s=3.0)
    assert layer.tool_ttl.observed("", "grep") == pytest.approx([3.0, 3.0, 3.0])
    # Once learned (three calls), the turn ending in the fourth call pins the session's KV
    # for about the tool's duration.
    (ttl,) = pins
    assert 3.0 <= ttl <= 4.0 and ttl == layer.tool_ttl.ttl("", "grep")
    assert pinned(running) > 0


def test_a_tool_that_takes_minutes_gets_no_pin(server):
    running, clock, pins = server
    layer = running.state.sessions
    run_agent(running.base_url, "slow", "build", 4, clock, took_s=240.0)
    assert layer.tool_ttl.ttl("", "build") == 0.0
    assert pins == [] and pinned(running) == 0
