"""Synthetic agent programs (SWE-agent-like tool loops) as session traces.

A program is a session of N steps. Step 1 sends the task; every step is an LLM call whose reply
asks for a tool, the tool runs for ``tool_s``, and its output (an observation) is the next step's
new input. The last step's reply ends the program (no tool call). All programs start with one
shared system prompt (``shared_prefix_id="agent-system"``: instructions, tool documentation, a
demonstration). Programs start as a Poisson process. The next step follows the tool call after
``orchestration_s`` (default 0: the agent framework calls the model at once).

Hints: the framework knows a step will follow as soon as it starts a tool call, so step k's
``hint_lead_s`` is step k-1's ``tool_s`` + ``orchestration_s`` (SYMPHONY's agents hint their
next hop ahead of time; it measured a 5.8 s lead, and the default tool times here average
3.3 s). Each hint is dropped with probability ``missing_hint_fraction``.

The default magnitudes are SWE-agent-like orders of magnitude, not fitted to a trace: 10–30
steps (uniform), task 200–1,500 tokens and observations 200–2,000 tokens (log-uniform: most
tool outputs are short, some are whole files or test logs), replies 100–400 tokens (uniform:
a thought plus one command), tool calls lognormal with a 2 s median and sigma 1, clipped to
0.5–30 s (quick shell commands, some test runs), a 2,000-token system prompt.

Deterministic for a seed: the draws are made in a fixed order from one ``random.Random(seed)``
(per program: the start gap, the number of steps, the task size, then per step the reply, the
tool time, the observation size and the hint's uniform, the last step included), so changing the
rate or the missing-hint fraction reuses the same draws.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from cadenza.sim.converters._common import check_fraction, check_rate, round_s
from cadenza.sim.trace import TraceTurn

SYSTEM_PREFIX_ID = "agent-system"


@dataclass(frozen=True)
class AgentWorkload:
    """Parameters of the generator; ranges are inclusive ``(low, high)``."""

    programs: int = 100
    rate: float = 0.1  # programs started per second (Poisson)
    steps: tuple[int, int] = (10, 30)
    system_prompt_tokens: int = 2000
    task_tokens: tuple[int, int] = (200, 1500)
    reply_tokens: tuple[int, int] = (100, 400)
    observation_tokens: tuple[int, int] = (200, 2000)
    tool_median_s: float = 2.0
    tool_sigma: float = 1.0
    tool_s_range: tuple[float, float] = (0.5, 30.0)
    orchestration_s: float = 0.0
    missing_hint_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.programs < 0:
            raise ValueError(f"programs must be >= 0, got {self.programs}")
        check_rate("rate", self.rate)
        check_fraction("missing_hint_fraction", self.missing_hint_fraction)
        for name in ("steps", "task_tokens", "reply_tokens", "observation_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be a range 1 <= low <= high, got {(low, high)}")
        low_s, high_s = self.tool_s_range
        if not 0 <= low_s <= high_s or not math.isfinite(high_s):
            raise ValueError(f"tool_s_range must be 0 <= low <= high, got {self.tool_s_range}")
        check_rate("tool_median_s", self.tool_median_s)
        if not (self.tool_sigma >= 0 and math.isfinite(self.tool_sigma)):
            raise ValueError(f"tool_sigma must be >= 0, got {self.tool_sigma}")
        if self.system_prompt_tokens < 0 or not self.orchestration_s >= 0:
            raise ValueError("system_prompt_tokens and orchestration_s must be >= 0")


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def generate_agents(workload: AgentWorkload | None = None) -> list[TraceTurn]:
    """The trace of ``workload``'s programs, program by program (see the module docstring)."""
    w = workload or AgentWorkload()
    rng = random.Random(w.seed)
    has_prefix = w.system_prompt_tokens > 0
    out: list[TraceTurn] = []
    start = 0.0
    for p in range(w.programs):
        gap = rng.expovariate(1.0)
        if p > 0:
            start += gap / w.rate
        steps = rng.randint(*w.steps)
        new_input = _log_uniform(rng, *w.task_tokens)
        previous_tool_s = 0.0
        for step in range(steps):
            reply = rng.randint(*w.reply_tokens)
            tool_s = w.tool_median_s * rng.lognormvariate(0.0, w.tool_sigma)
            tool_s = min(max(tool_s, w.tool_s_range[0]), w.tool_s_range[1])
            observation = _log_uniform(rng, *w.observation_tokens)
            hinted = rng.random() >= w.missing_hint_fraction
            last = step == steps - 1
            lead_s = None if step == 0 else round_s(previous_tool_s + w.orchestration_s)
            out.append(
                TraceTurn(
                    session_id=f"agent-{p}",
                    arrival_s=round_s(start) if step == 0 else None,
                    think_s=None if step == 0 else w.orchestration_s,
                    input_tokens=new_input,
                    output_tokens=reply,
                    shared_prefix_id=SYSTEM_PREFIX_ID if has_prefix else None,
                    shared_prefix_tokens=w.system_prompt_tokens,
                    hint_lead_s=lead_s if hinted else None,
                    tool_s=None if last else round_s(tool_s),
                )
            )
            previous_tool_s = round_s(tool_s)
            new_input = observation
    return out
