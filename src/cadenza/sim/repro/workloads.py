"""The workloads of the reproductions, built with the trace converters.

* **Conversations**: ShareGPT (``--data``, else the shared sample, else the installed
  package); without any, the project's synthetic ShareGPT-schema conversations.
* **Chat users** (SYMPHONY): sessions whose think times and hint leads follow the converter's
  ``symphony`` model (reading + typing) scaled by ``think_scale``; session starts are Poisson,
  or the Azure 2023 conversation trace's arrival instants rescaled in time (bursty), at the
  rate that keeps ``users`` sessions open on average (Little's law over the mean session span).
* **Pensieve sessions**: the same construction with the converter's ``pensieve`` think model
  (Exp(60 s)), no hints.
* **Single requests** (MELL): ShareGPT turns as independent requests with lengths x10, Poisson;
  or the Azure conversation trace as recorded.
* **Agent programs** (Continuum): the ``agents`` generator, and the same programs with each
  tool call turned into think time of the next step (no retention pin).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path

from cadenza.bench.sharegpt_source import default_data_dir
from cadenza.bench.sharegpt_synthetic import synthetic_sharegpt_records
from cadenza.sim.converters.agents import AgentWorkload, generate_agents
from cadenza.sim.converters.azure import read_azure
from cadenza.sim.converters.sharegpt import (
    ShareGPTConversation,
    ThinkModel,
    parse_conversation,
    read_sharegpt,
    think_and_typing,
)
from cadenza.sim.repro.common import Options
from cadenza.sim.trace import TraceTurn

AZURE_CONV = Path("azure_llm_2023") / "AzureLLMInferenceTrace_conv.csv"


# ------------------------------------------------------------------------------ sources


def synthetic_conversations(n: int, seed: int) -> list[ShareGPTConversation]:
    """The project's synthetic ShareGPT-schema conversations (``bench.sharegpt_synthetic``)."""
    records = synthetic_sharegpt_records(n, seed)
    return [parse_conversation(r, f"synthetic:{i}") for i, r in enumerate(records)]


def conversations(options: Options, limit: int | None = None) -> tuple[list, str]:
    """ShareGPT conversations (at least 2 turns: there is a follow-up to hint) and where they
    came from; synthetic ones when no source is available."""
    try:
        convs = read_sharegpt(options.data, limit=limit, min_turns=2, max_turns=16)
        source = options.data or "ShareGPT (default source)"
    except FileNotFoundError:
        convs, source = [], ""
    if not convs:
        convs = synthetic_conversations(limit or 200, options.seed)
        source = "synthetic ShareGPT-shaped conversations (no ShareGPT source found)"
    return convs, source


def azure_offsets(options: Options) -> tuple[list[float], str]:
    """Arrival instants of the Azure 2023 conversation trace (seconds from its first
    request); a synthetic bursty stand-in when the file is absent."""
    path = Path(options.azure) if options.azure else default_data_dir() / AZURE_CONV
    if path.is_file():
        return sorted(r.offset_s for r in read_azure(path)), str(path)
    return synthetic_bursts(20_000, options.seed), "synthetic bursts (no Azure trace found)"


def synthetic_bursts(n: int, seed: int) -> list[float]:
    """A two-state modulated Poisson process: rate 1, with bursts at rate 4 a fifth of the
    time (states last Exp(30 s))."""
    rng = random.Random(seed)
    t, out, burst, switch = 0.0, [], False, rng.expovariate(1 / 30)
    while len(out) < n:
        t += rng.expovariate(4.0 if burst else 1.0)
        if t > switch:
            burst = rng.random() < 0.2
            switch = t + rng.expovariate(1 / 30)
        out.append(t)
    return out


# ------------------------------------------------------------------------------ chat users


@dataclass(frozen=True)
class ChatLoad:
    users: int
    arrive_s: float  # turns arrive during [0, arrive_s + tail_s)
    think_scale: float = 1.0
    arrival: str = "poisson"  # or "azure"
    service_s_per_token: float = 0.015  # reply time per output token, for nominal timing
    missing_hints: float = 0.0
    tail_s: float = 0.0
    think: ThinkModel = "symphony"  # or "pensieve": Exp(mean_think_s)
    mean_think_s: float = 60.0


def scaled_turns(
    conv: ShareGPTConversation, load: ChatLoad, unit_exps: Sequence[float] = ()
) -> list[tuple[float, float]]:
    """(think_s, hint_lead_s) before each follow-up, by the converter's ``load.think`` model
    (an exponential think time takes its Exp(1) draw from ``unit_exps``, else its mean),
    scaled by ``load.think_scale``."""
    out = []
    for k in range(1, len(conv.turns)):
        unit = unit_exps[k] if unit_exps else 1.0
        think, lead = think_and_typing(
            load.think, conv.turns[k - 1], conv.turns[k], unit, mean_think_s=load.mean_think_s
        )
        out.append((think * load.think_scale, lead * load.think_scale))
    return out


def nominal_offsets(
    conv: ShareGPTConversation, load: ChatLoad, unit_exps: Sequence[float] = ()
) -> list[float]:
    """Each turn's arrival after the session's start, if every reply took
    ``service_s_per_token`` per output token."""
    out, t = [0.0], 0.0
    thinks = scaled_turns(conv, load, unit_exps)
    for prev, (think, _) in zip(conv.turns, thinks, strict=False):
        t += prev.output_tokens * load.service_s_per_token + think
        out.append(t)
    return out


def session_span_s(conv: ShareGPTConversation, load: ChatLoad) -> float:
    return nominal_offsets(conv, load)[-1] + conv.turns[-1].output_tokens * load.service_s_per_token


def mean_span_s(convs: Sequence[ShareGPTConversation], load: ChatLoad) -> float:
    return sum(session_span_s(c, load) for c in convs) / len(convs)


def turn_rate(convs: Sequence[ShareGPTConversation], load: ChatLoad) -> float:
    """Turns per second in the steady state of ``load``."""
    turns = sum(len(c.turns) for c in convs) / len(convs)
    return load.users / mean_span_s(convs, load) * turns


def session_starts(
    rate: float, begin: float, end: float, arrival: str, offsets: Sequence[float], seed: int
) -> list[float]:
    """Session starts in ``[begin, end)``: Poisson at ``rate``, or the Azure instants
    rescaled in time to mean ``rate``."""
    if arrival == "poisson":
        rng = random.Random(seed)
        t, out = begin, []
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                return out
            out.append(t)
    if arrival != "azure":
        raise ValueError(f"arrival must be poisson or azure, got {arrival!r}")
    native = len(offsets) / max(offsets[-1] - offsets[0], 1e-9)
    stretch = native / rate  # Azure's seconds -> ours, so the mean rate is ``rate``
    starts = [begin + (o - offsets[0]) * stretch for o in offsets]
    return [s for s in starts if s < end]


def chat_trace(
    convs: Sequence[ShareGPTConversation],
    load: ChatLoad,
    offsets: Sequence[float] = (),
    seed: int = 0,
) -> tuple[list[TraceTurn], dict[str, float]]:
    """Sessions of ``convs`` (cycled) keeping ``load.users`` open on average from time 0.

    Sessions start before 0 too (as far back as the longest session), so the trace begins
    in a steady state: a session already under way at 0 enters at its first turn due after
    0, with its earlier turns as a history prefix of its own (``shared_prefix_id`` = the
    session) that no worker holds yet; it has no hint for that turn. Turns due after
    ``arrive_s + tail_s`` are cut (by nominal timing)."""
    span = mean_span_s(convs, load)
    rate = load.users / span
    longest = max(session_span_s(c, load) for c in convs)
    end = load.arrive_s + load.tail_s
    starts = session_starts(rate, -longest, end, load.arrival, offsets, seed)
    rng = random.Random(seed + 1)
    turns: list[TraceTurn] = []
    for i, (start, conv) in enumerate(zip(starts, cycle(convs), strict=False)):
        sid = f"{conv.conversation_id}~{i}"
        units = [rng.expovariate(1.0) for _ in conv.turns] if load.think == "pensieve" else []
        leads = [None, *scaled_turns(conv, load, units)]
        nominal = [start + o for o in nominal_offsets(conv, load, units)]
        prefix = 0
        first = True
        for k, (turn, at) in enumerate(zip(conv.turns, nominal, strict=True)):
            hinted = load.think == "symphony" and rng.random() >= load.missing_hints
            if at < 0:
                prefix += turn.input_tokens + turn.output_tokens
                continue
            if at >= end:
                break
            shared = {"shared_prefix_id": f"history:{sid}", "shared_prefix_tokens": prefix}
            common = dict(shared) if prefix else {}
            if first:
                turns.append(
                    TraceTurn(
                        sid,
                        turn.input_tokens,
                        turn.output_tokens,
                        arrival_s=round(at, 6),
                        **common,  # type: ignore[arg-type]
                    )
                )
                first = False
                continue
            think, lead = leads[k]  # type: ignore[misc]
            turns.append(
                TraceTurn(
                    sid,
                    turn.input_tokens,
                    turn.output_tokens,
                    think_s=round(think, 6),
                    hint_lead_s=round(lead, 6) if hinted else None,
                    **common,  # type: ignore[arg-type]
                )
            )
    info = {
        "session_span_s": span,
        "session_rate": rate,
        "sessions": float(len({t.session_id for t in turns})),
        "turn_rate": turn_rate(convs, load),
    }
    return turns, info


def with_hint_lead(turns: Sequence[TraceTurn], lead_s: float) -> list[TraceTurn]:
    """Every hint sent ``lead_s`` ahead (at most the think time: not before the reply)."""
    out = []
    for t in turns:
        if t.hint_lead_s is not None:
            t = dataclasses.replace(t, hint_lead_s=round(min(lead_s, t.think_s or 0.0), 6))
        out.append(t)
    return out


def drop_hints(turns: Sequence[TraceTurn], fraction: float, seed: int) -> list[TraceTurn]:
    """Each hint dropped with probability ``fraction`` (a fixed draw per turn, so a larger
    fraction drops a superset)."""
    rng = random.Random(seed)
    out = []
    for t in turns:
        u = rng.random()
        if t.hint_lead_s is not None and u < fraction:
            t = dataclasses.replace(t, hint_lead_s=None)
        out.append(t)
    return out


# ------------------------------------------------------------------------------ Pensieve


# ------------------------------------------------------------------------------ MELL


def single_requests(
    convs: Sequence[ShareGPTConversation],
    rate: float,
    arrive_s: float,
    length_scale: int,
    max_tokens: int,
    seed: int,
) -> list[TraceTurn]:
    """Every turn of ``convs`` (cycled) as an independent request, lengths times
    ``length_scale``, dropping requests longer than ``max_tokens``; Poisson at ``rate``."""
    pool = [
        (t.input_tokens * length_scale, t.output_tokens * length_scale)
        for c in convs
        for t in c.turns
        if (t.input_tokens + t.output_tokens) * length_scale <= max_tokens
    ]
    rng = random.Random(seed)
    t, out = 0.0, []
    for i, (prompt, reply) in enumerate(cycle(pool)):
        t += rng.expovariate(rate)
        if t >= arrive_s:
            break
        out.append(TraceTurn(f"req-{i}", prompt, reply, arrival_s=round(t, 6)))
    return out


def azure_requests(options: Options, arrive_s: float, max_tokens: int) -> tuple[list, str]:
    """The Azure conversation trace's requests (recorded arrivals and lengths) in its first
    ``arrive_s`` seconds, dropping any longer than ``max_tokens``."""
    path = Path(options.azure) if options.azure else default_data_dir() / AZURE_CONV
    if not path.is_file():
        offsets = synthetic_bursts(int(arrive_s * 5), options.seed)
        rng = random.Random(options.seed)
        requests = [
            (o, max(1, int(rng.expovariate(1 / 1155))), max(1, int(rng.expovariate(1 / 211))))
            for o in offsets
        ]
        source = "synthetic bursts with Azure conv mean lengths (no Azure trace found)"
    else:
        requests = [(r.offset_s, r.context_tokens, r.generated_tokens) for r in read_azure(path)]
        source = str(path)
    out = []
    for i, (offset, prompt, reply) in enumerate(sorted(requests)):
        if offset >= arrive_s:
            break
        prompt, reply = max(1, prompt), max(1, reply)
        if prompt + reply <= max_tokens:
            out.append(TraceTurn(f"az-{i}", prompt, reply, arrival_s=round(offset, 6)))
    return out, source


# ------------------------------------------------------------------------------ agents


def agent_trace(programs: int, rate: float, seed: int, **overrides: object) -> list[TraceTurn]:
    return generate_agents(AgentWorkload(programs=programs, rate=rate, seed=seed, **overrides))  # type: ignore[arg-type]


def unpinned(turns: Sequence[TraceTurn], keep_below_s: float = -1.0) -> list[TraceTurn]:
    """The same programs with each tool call longer than ``keep_below_s`` turned into think
    time before the next step: the arrival is unchanged, but the turn asks for no retention
    pin (the client pins a turn's KV for its ``tool_s``)."""
    out: list[TraceTurn] = []
    carry: dict[str, float] = {}
    for t in turns:
        extra = carry.pop(t.session_id, 0.0)
        if extra:
            t = dataclasses.replace(t, think_s=round((t.think_s or 0.0) + extra, 6))
        if t.tool_s is not None and t.tool_s > keep_below_s:
            carry[t.session_id] = t.tool_s
            t = dataclasses.replace(t, tool_s=None)
        out.append(t)
    return out
