"""The traces the simulator is validated on: small enough for SmolLM2 on two CPU cores.

Three workloads, each at several loads (session rates):

* ``chat`` — ShareGPT conversations (``--data``: a ShareGPT file; else made-up conversations of
  ShareGPT's shape, ``bench.sharegpt_synthetic``) through the ShareGPT converter with
  SYMPHONY's reading + typing think times and typing-time hints;
* ``chat-exp`` — the same conversations with Pensieve's exponential think times and no hints
  (the KV must be found where the cache left it, or recomputed);
* ``agents`` — the synthetic agent generator: a shared system prompt, tool calls between
  steps, hints one tool call ahead.

A real conversation is hundreds of tokens a message and a minute of thinking; replayed on a
135M-parameter model on a CPU that is hours. So every trace is **shrunk** the same way for
both sides: token counts capped (``max_input``, ``max_output``) and every time (arrivals,
think, hint leads, tool calls) multiplied by ``time_scale``. The shape — who shares what KV,
which turn follows which, which are hinted — is the converter's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from cadenza.sim.trace import TraceTurn

KINDS = ("chat", "chat-exp", "agents")


@dataclass(frozen=True)
class Shrink:
    max_input: int = 48
    max_output: int = 12
    time_scale: float = 0.1


@dataclass(frozen=True)
class TraceSpec:
    """One workload at one load: ``kind`` (:data:`KINDS`), ``sessions`` of at most
    ``max_turns`` turns started at ``rate`` per second of the shrunk trace (the generator is
    asked for ``rate * time_scale`` before the times are scaled)."""

    kind: str
    sessions: int
    rate: float
    max_turns: int = 4
    seed: int = 0
    shrink: Shrink = Shrink()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"trace kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.sessions <= 0 or self.rate <= 0 or self.max_turns <= 0:
            raise ValueError("sessions, rate and max_turns must be positive")

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.rate:g}"


def shrink(turns: Sequence[TraceTurn], s: Shrink) -> list[TraceTurn]:
    """``turns`` with token counts capped and every time scaled (text dropped)."""

    def scaled(x: float | None) -> float | None:
        return None if x is None else round(x * s.time_scale, 6)

    return [
        dataclasses.replace(
            t,
            input_tokens=min(t.input_tokens, s.max_input),
            output_tokens=min(t.output_tokens, s.max_output),
            arrival_s=scaled(t.arrival_s),
            think_s=scaled(t.think_s),
            hint_lead_s=scaled(t.hint_lead_s),
            tool_s=scaled(t.tool_s),
            text=None,
        )
        for t in turns
    ]


def _conversations(data: str | None, count: int, max_turns: int, seed: int):  # noqa: ANN202
    from cadenza.sim.converters.sharegpt import parse_conversation, read_sharegpt

    if data is not None:
        return read_sharegpt(data, limit=count, min_turns=2, max_turns=max_turns)
    from cadenza.bench.sharegpt_synthetic import synthetic_sharegpt_records

    out = []
    for i, record in enumerate(synthetic_sharegpt_records(4 * count + 8, seed=seed)):
        conv = parse_conversation(record, f"synthetic {i}")
        if len(conv.turns) < 2:
            continue
        out.append(dataclasses.replace(conv, turns=conv.turns[:max_turns]))
        if len(out) == count:
            break
    return out


def make_trace(spec: TraceSpec, data: str | None = None) -> list[TraceTurn]:
    """The shrunk trace of ``spec`` (``data``: a ShareGPT file for the chat kinds)."""
    if spec.kind == "agents":
        from cadenza.sim.converters.agents import AgentWorkload, generate_agents

        workload = AgentWorkload(
            programs=spec.sessions,
            rate=spec.rate * spec.shrink.time_scale,
            steps=(2, spec.max_turns),
            system_prompt_tokens=4 * spec.shrink.max_input,
            task_tokens=(spec.shrink.max_input // 2, 4 * spec.shrink.max_input),
            reply_tokens=(spec.shrink.max_output // 2, 2 * spec.shrink.max_output),
            observation_tokens=(spec.shrink.max_input // 4, 2 * spec.shrink.max_input),
            seed=spec.seed,
        )
        return shrink(generate_agents(workload), spec.shrink)
    from cadenza.sim.converters.sharegpt import conversations_to_trace

    conversations = _conversations(data, spec.sessions, spec.max_turns, spec.seed)
    turns = conversations_to_trace(
        conversations,
        session_rate=spec.rate * spec.shrink.time_scale,
        think="symphony" if spec.kind == "chat" else "pensieve",
        mean_think_s=30.0,
        missing_hint_fraction=0.0 if spec.kind == "chat" else 1.0,
        include_text=False,
        seed=spec.seed,
    )
    return shrink(turns, spec.shrink)
