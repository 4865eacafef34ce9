"""Recorded SWE-agent trajectories as session traces (one session per trajectory file).

SWE-agent (MIT licence, github.com/SWE-agent/SWE-agent) writes one ``.traj`` JSON file per task:

* ``trajectory``: the steps, each with ``response`` (the model's whole output: thought and
  command), ``thought``, ``action``, ``observation`` (the tool's output) and ``execution_time``
  (seconds the command ran; recent versions);
* ``history``: every message the model was shown, in order: the system prompt, demonstrations
  (``is_demo: true``), the task (the first other user message), then replies and observations.
  Without ``history``, the first step's ``query`` (or older ``messages``) is used instead.

mini-SWE-agent (MIT licence) files (``trajectory_format`` ``mini-swe-agent-*``) have only
``messages``: system, task, then alternating assistant replies and user observations; they carry
no tool times.

A trajectory becomes one session: step 1's input is the task, step k's input is step k-1's
observation, each step's output is its ``response``; the system prompt and demonstrations are
the shared prefix (its id is a hash of their text, so trajectories with the same prompt share
it); ``tool_s`` is the step's ``execution_time``, or ``default_tool_s`` where it is absent or 0.
Token counts are ``count(text)``: by default characters / 4 rounded up (OpenAI's rule of thumb
for English and code), or a real tokenizer's count. Every count is at least 1 (an empty
observation still costs the template's tokens).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadenza.sim.converters._common import round_s
from cadenza.sim.trace import TraceTurn, write_trace

TokenCounter = Callable[[str], int]


def chars_over_4(text: str) -> int:
    """The default token estimate: characters / 4, rounded up."""
    return math.ceil(len(text) / 4)


@dataclass(frozen=True)
class _Step:
    response: str
    observation: str
    execution_s: float | None


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return "" if content is None else str(content)


def _prefix_and_task(messages: Sequence[Any], where: str) -> tuple[str, str, int]:
    """The system prompt and demonstrations, the task, and the index after the task."""
    prefix: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            continue
        role = message.get("role")
        if role == "system" or message.get("is_demo"):
            prefix.append(_text(message.get("content")))
        elif role == "user":
            return "\n".join(prefix), _text(message.get("content")), i + 1
    raise ValueError(f"{where}: no task (no user message after the system prompt and demos)")


def _swe_agent_steps(data: Mapping[str, Any]) -> list[_Step]:
    steps = []
    for step in data.get("trajectory") or []:
        response = step.get("response")
        if not response:
            response = "\n".join(x for x in (step.get("thought"), step.get("action")) if x)
        seconds = step.get("execution_time")
        steps.append(
            _Step(
                _text(response),
                _text(step.get("observation")),
                float(seconds) if isinstance(seconds, int | float) else None,
            )
        )
    return steps


def _mini_steps(messages: Sequence[Any], start: int) -> list[_Step]:
    """Assistant replies, each with the user message after it (its observation)."""
    steps: list[_Step] = []
    for i in range(start, len(messages)):
        message = messages[i]
        if not isinstance(message, Mapping) or message.get("role") != "assistant":
            continue
        after = messages[i + 1] if i + 1 < len(messages) else None
        observation = ""
        if isinstance(after, Mapping) and after.get("role") in ("user", "tool"):
            observation = _text(after.get("content"))
        steps.append(_Step(_text(message.get("content")), observation, None))
    return steps


def _messages(data: Mapping[str, Any]) -> list[Any]:
    if data.get("history"):
        return list(data["history"])
    if data.get("messages") and not data.get("trajectory"):
        return list(data["messages"])
    first = (data.get("trajectory") or [{}])[0]
    return list(first.get("query") or first.get("messages") or [])


def convert_trajectory(
    data: Mapping[str, Any],
    session_id: str,
    *,
    arrival_s: float = 0.0,
    count: TokenCounter = chars_over_4,
    default_tool_s: float = 2.0,
    include_text: bool = False,
    where: str = "trajectory",
) -> list[TraceTurn]:
    """One trajectory (a parsed ``.traj`` file) as the turns of session ``session_id``."""
    messages = _messages(data)
    prefix, task, after_task = _prefix_and_task(messages, where)
    steps = _swe_agent_steps(data) if data.get("trajectory") else _mini_steps(messages, after_task)
    if not steps:
        raise ValueError(f"{where}: the trajectory has no steps")
    prefix_tokens = count(prefix) if prefix else 0
    prefix_id = None
    if prefix_tokens:
        prefix_id = "swe-agent-" + hashlib.sha256(prefix.encode()).hexdigest()[:12]
    turns = []
    new_input = task
    for k, step in enumerate(steps):
        last = k == len(steps) - 1
        tool_s = step.execution_s if step.execution_s else default_tool_s
        turns.append(
            TraceTurn(
                session_id=session_id,
                arrival_s=round_s(arrival_s) if k == 0 else None,
                think_s=None if k == 0 else 0.0,
                input_tokens=max(1, count(new_input)),
                output_tokens=max(1, count(step.response)),
                shared_prefix_id=prefix_id,
                shared_prefix_tokens=prefix_tokens,
                tool_s=None if last else round_s(tool_s),
                text=new_input if include_text else None,
            )
        )
        new_input = step.observation
    return turns


def convert_files(
    paths: Sequence[str | Path],
    *,
    start_interval_s: float = 0.0,
    count: TokenCounter = chars_over_4,
    default_tool_s: float = 2.0,
    include_text: bool = False,
) -> list[TraceTurn]:
    """Every file as one session (named after the file), started ``start_interval_s`` apart."""
    turns: list[TraceTurn] = []
    for i, raw_path in enumerate(paths):
        path = Path(raw_path)
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a JSON object")
        name = path.name.removesuffix(".json").removesuffix(".traj")
        turns += convert_trajectory(
            data,
            f"swe-{i}-{name}",
            arrival_s=i * start_interval_s,
            count=count,
            default_tool_s=default_tool_s,
            include_text=include_text,
            where=str(path),
        )
    return turns


def _tokenizer_counter(path: str) -> TokenCounter:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cadenza.sim.converters.swe_agent",
        description="SWE-agent / mini-SWE-agent trajectories to a session trace",
    )
    parser.add_argument("files", nargs="+", help=".traj / .traj.json files")
    parser.add_argument("--out", required=True, help="trace file (.jsonl or .jsonl.gz)")
    parser.add_argument("--tool-s", type=float, default=2.0, help="tool time without a record")
    parser.add_argument("--start-interval-s", type=float, default=0.0)
    parser.add_argument("--tokenizer-json", default=None, help="count with this tokenizer")
    parser.add_argument("--text", action="store_true", help="keep each turn's input text")
    args = parser.parse_args(argv)
    count = _tokenizer_counter(args.tokenizer_json) if args.tokenizer_json else chars_over_4
    turns = convert_files(
        args.files,
        start_interval_s=args.start_interval_s,
        count=count,
        default_tool_s=args.tool_s,
        include_text=args.text,
    )
    print(write_trace(args.out, turns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
