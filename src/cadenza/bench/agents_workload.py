"""The workload of ``cadenza bench agents``: agent programs from a session trace, with text.

A trace (:mod:`cadenza.sim.trace`) gives token counts, not text. Each program here is one
session of the trace, its steps in order; every step's new input (the task, then the previous
tool call's observation) and the shared system prompt get deterministic synthetic text of about
the right number of tokens, unless the trace carries the text itself. The text is a sequence of
common lowercase English words, each a single token with its leading space in the byte-level BPE
vocabularies of the models this runs on (SmolLM2's included), drawn by a generator seeded with
the session and step, so no two programs share content except the system prompt, which is drawn
from the prefix id alone. The token counts the server reports are kept per turn, so a report can
show how close the text came.

Pool sizing: the *live KV* is the KV the running programs hold at their end: ``concurrency``
programs of the mean final context (system prompt + every input and reply + the chat template's
few tokens per message), in blocks. A device pool is a fraction of it, but never less than the
longest single program's final context: a request that could never fit the pool is rejected
(HTTP 400) rather than slowed down, so below that floor the benchmark would measure errors.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from cadenza.sim.converters.agents import AgentWorkload, generate_agents
from cadenza.sim.trace import TraceTurn

# The chat template's tokens around one message (role header and end marker), an estimate
# for sizing only; ChatML as SmolLM2 uses it: "<|im_start|>user\n" ... "<|im_end|>\n".
TEMPLATE_TOKENS_PER_MESSAGE = 5
# Extra blocks the pool floor keeps above the longest program, for the template estimate.
FLOOR_SLACK_BLOCKS = 4

_WORD_TEXT = (
    "the of and to in is for on that with as at by from this be are or an was it not but all"
    " can has have will one new more time year work data file line code test case list value"
    " type name user page text form part point state group order number system change world"
    " place water house school light power level model field event table image local price"
    " market report result method action problem program service family office letter river"
    " music story money paper plant green black white small large early late"
)
_WORDS = tuple(_WORD_TEXT.split())


def bench_workload(
    programs: int = 8,
    steps: tuple[int, int] = (6, 10),
    system_prompt_tokens: int = 600,
    task_tokens: tuple[int, int] = (100, 300),
    observation_tokens: tuple[int, int] = (100, 600),
    reply_tokens: tuple[int, int] = (32, 64),
    tool_median_s: float = 2.0,
    tool_s_range: tuple[float, float] = (1.0, 4.0),
    seed: int = 0,
) -> AgentWorkload:
    """The agents generator's workload scaled to a small model on a few CPU cores."""
    return AgentWorkload(
        programs=programs,
        rate=1.0,  # unused: the benchmark starts programs as slots free up (closed loop)
        steps=steps,
        system_prompt_tokens=system_prompt_tokens,
        task_tokens=task_tokens,
        reply_tokens=reply_tokens,
        observation_tokens=observation_tokens,
        tool_median_s=tool_median_s,
        tool_sigma=0.5,
        tool_s_range=tool_s_range,
        seed=seed,
    )


@dataclass(frozen=True)
class Step:
    """One LLM call of a program: its new input, the reply length, then the tool call."""

    input_text: str
    input_tokens: int  # what the trace asked for (the text has about this many)
    output_tokens: int
    think_s: float  # delay before the call (after the previous tool call)
    tool_s: float  # after the reply; 0 for the last step


@dataclass(frozen=True)
class Program:
    """One agent program (a trace session)."""

    program_id: str
    system_text: str
    system_tokens: int
    steps: tuple[Step, ...]

    @property
    def final_context_tokens(self) -> int:
        """Estimated tokens of the last step's context plus its reply (the program's peak)."""
        messages = 1 + 2 * len(self.steps)
        body = self.system_tokens + sum(s.input_tokens + s.output_tokens for s in self.steps)
        return body + TEMPLATE_TOKENS_PER_MESSAGE * messages


def synthetic_text(tokens: int, key: str) -> str:
    """About ``tokens`` tokens of words, the same for the same ``key``."""
    rng = random.Random(key)
    return " ".join(rng.choice(_WORDS) for _ in range(max(tokens, 1)))


def programs_from_trace(turns: Sequence[TraceTurn]) -> list[Program]:
    """The trace's sessions as programs, in order of first appearance."""
    order: list[str] = []
    by_session: dict[str, list[TraceTurn]] = {}
    for turn in turns:
        if turn.session_id not in by_session:
            order.append(turn.session_id)
            by_session[turn.session_id] = []
        by_session[turn.session_id].append(turn)
    programs = []
    for sid in order:
        session = by_session[sid]
        first = session[0]
        prefix_key = first.shared_prefix_id or f"{sid}/system"
        system_tokens = first.shared_prefix_tokens
        steps = tuple(
            Step(
                input_text=turn.text or synthetic_text(turn.input_tokens, f"{sid}/{k}"),
                input_tokens=turn.input_tokens,
                output_tokens=turn.output_tokens,
                think_s=0.0 if k == 0 else float(turn.think_s or 0.0),
                tool_s=0.0 if k == len(session) - 1 else float(turn.tool_s or 0.0),
            )
            for k, turn in enumerate(session)
        )
        system_text = synthetic_text(system_tokens, f"prefix/{prefix_key}") if system_tokens else ""
        programs.append(Program(sid, system_text, system_tokens, steps))
    return programs


def generate_programs(workload: AgentWorkload) -> tuple[list[TraceTurn], list[Program]]:
    """The generator's trace for ``workload`` and its programs."""
    turns = generate_agents(workload)
    return turns, programs_from_trace(turns)


@dataclass(frozen=True)
class PoolPlan:
    """The device pool of one trial, in blocks, and how it was derived."""

    percent: int
    blocks: int
    target_blocks: int  # percent of the live KV, before the floor
    floored: bool


@dataclass(frozen=True)
class LiveKV:
    """The live-KV estimate every pool is a fraction of."""

    concurrency: int
    mean_final_tokens: float
    max_final_tokens: int
    block_size: int

    @property
    def blocks(self) -> int:
        return math.ceil(self.concurrency * self.mean_final_tokens / self.block_size)

    @property
    def floor_blocks(self) -> int:
        return math.ceil(self.max_final_tokens / self.block_size) + FLOOR_SLACK_BLOCKS

    def pool(self, percent: int) -> PoolPlan:
        target = math.ceil(self.blocks * percent / 100)
        return PoolPlan(percent, max(target, self.floor_blocks), target, target < self.floor_blocks)


def live_kv(programs: Sequence[Program], concurrency: int, block_size: int = 16) -> LiveKV:
    """The live KV of ``concurrency`` programs at once (no more than there are programs)."""
    if not programs:
        raise ValueError("no programs")
    if concurrency < 1 or block_size < 1:
        raise ValueError("concurrency and block_size must be >= 1")
    finals = [p.final_context_tokens for p in programs]
    return LiveKV(
        concurrency=min(concurrency, len(programs)),
        mean_final_tokens=sum(finals) / len(finals),
        max_final_tokens=max(finals),
        block_size=block_size,
    )
