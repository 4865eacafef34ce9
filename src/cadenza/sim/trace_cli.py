"""``cadenza trace convert | summary``: make session traces from public workloads, inspect them.

Also runnable alone: ``python -m cadenza.sim.trace_cli convert --from agents --out a.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final, cast

from cadenza.sim.out_path import out_file_problem
from cadenza.sim.trace import TraceTurn, read_trace, summarize, write_trace

SOURCES: Final = ("sharegpt", "mooncake", "azure", "agents")
DEFAULT_RATE: Final = {"sharegpt": 1.0, "agents": 0.1}

# Flags that only one source reads (by argparse dest); giving one to another source is an error.
_SOURCE_FLAGS: Final = {
    "input": ("sharegpt", "mooncake", "azure"),
    "rate": ("sharegpt", "agents"),
    "missing_hints": ("sharegpt", "agents"),
    "think": ("sharegpt",),
    "mean_think_s": ("sharegpt",),
    "max_typing_s": ("sharegpt",),
    "min_turns": ("sharegpt",),
    "max_turns": ("sharegpt",),
    "no_text": ("sharegpt",),
    "timing": ("mooncake",),
    "assumed_tpot_s": ("mooncake",),
    "turns_per_session": ("azure",),
    "grouping": ("azure",),
    "min_steps": ("agents",),
    "max_steps": ("agents",),
    "system_prompt_tokens": ("agents",),
    "tool_median_s": ("agents",),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``convert`` and ``summary`` subcommands, on the ``trace`` parser; sets ``func``."""
    sub = parser.add_subparsers(dest="trace_command", required=True, help="what to do")
    convert = sub.add_parser("convert", help="convert a workload into a session trace")
    _add_convert_arguments(convert)
    summary = sub.add_parser("summary", help="print the totals of a session trace")
    summary.add_argument("file", help="a session trace (.jsonl or .jsonl.gz)")
    summary.add_argument("--json", action="store_true", help="print the totals as JSON")
    parser.set_defaults(func=run)


def _add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from", dest="source", choices=SOURCES, required=True, help="the workload to convert"
    )
    p.add_argument(
        "--out", required=True, help="the trace to write (.jsonl, or .jsonl.gz to gzip it)"
    )
    p.add_argument(
        "--input",
        default=None,
        help="the source file (mooncake, azure: required; sharegpt: default the shared sample)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="sessions started per second, Poisson (sharegpt: default 1; agents: default 0.1)",
    )
    p.add_argument(
        "--sessions", type=int, default=None, help="keep at most this many sessions (the first)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    p.add_argument(
        "--missing-hints",
        type=float,
        default=None,
        help="fraction of hints dropped at random (sharegpt, agents; default 0)",
    )
    chat = p.add_argument_group("sharegpt")
    chat.add_argument(
        "--think",
        choices=("pensieve", "symphony"),
        default=None,
        help="think times: Exp(mean) or reading + typing time (default symphony)",
    )
    chat.add_argument(
        "--mean-think-s", type=float, default=None, help="mean of the pensieve model (default 60)"
    )
    chat.add_argument(
        "--max-typing-s",
        type=float,
        default=None,
        help="cap on a message's typing time (default 60; inf: no cap)",
    )
    chat.add_argument("--min-turns", type=int, default=None, help="skip shorter conversations")
    chat.add_argument("--max-turns", type=int, default=None, help="cut longer conversations")
    chat.add_argument(
        "--no-text", action="store_true", default=None, help="leave the message text out"
    )
    mooncake = p.add_argument_group("mooncake")
    mooncake.add_argument(
        "--timing",
        choices=("arrival", "think"),
        default=None,
        help="later turns keep their recorded arrival, or get think times (default arrival)",
    )
    mooncake.add_argument(
        "--assumed-tpot-s",
        type=float,
        default=None,
        help="with --timing think: seconds per output token taken off each gap (default 0)",
    )
    azure = p.add_argument_group("azure")
    azure.add_argument(
        "--turns-per-session",
        type=int,
        default=None,
        help="group requests into synthetic sessions of this many turns (default 1)",
    )
    azure.add_argument(
        "--grouping",
        choices=("consecutive", "strided"),
        default=None,
        help="which requests form a synthetic session (default consecutive)",
    )
    agents = p.add_argument_group("agents")
    agents.add_argument("--min-steps", type=int, default=None, help="fewest steps (default 10)")
    agents.add_argument("--max-steps", type=int, default=None, help="most steps (default 30)")
    agents.add_argument(
        "--system-prompt-tokens",
        type=int,
        default=None,
        help="tokens of the shared system prompt (default 2000)",
    )
    agents.add_argument(
        "--tool-median-s", type=float, default=None, help="median tool-call time (default 2)"
    )


def _float(args: argparse.Namespace, name: str, default: float) -> float:
    value = getattr(args, name)
    return default if value is None else float(value)


def _int(args: argparse.Namespace, name: str, default: int) -> int:
    value = getattr(args, name)
    return default if value is None else int(value)


def _str(args: argparse.Namespace, name: str, default: str) -> str:
    value = getattr(args, name)
    return default if value is None else str(value)


def _check_flags(args: argparse.Namespace) -> None:
    for name, sources in _SOURCE_FLAGS.items():
        if getattr(args, name) is not None and args.source not in sources:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} does not apply to --from {args.source}")
    if args.source in ("mooncake", "azure") and args.input is None:
        raise ValueError(f"--from {args.source} needs --input")
    if args.input is not None and not Path(args.input).is_file():
        raise ValueError(f"--input {args.input}: no such file")
    if args.sessions is not None and args.sessions < 1:
        raise ValueError(f"--sessions must be at least 1; got {args.sessions}")
    for low, high in (("min_turns", "max_turns"), ("min_steps", "max_steps")):
        a, b = getattr(args, low, None), getattr(args, high, None)
        if a is not None and b is not None and a > b:
            raise ValueError(
                f"--{low.replace('_', '-')} {a} is above --{high.replace('_', '-')} {b}"
            )


def convert(args: argparse.Namespace) -> list[TraceTurn]:
    """The turns that ``trace convert`` with these arguments writes."""
    _check_flags(args)
    if args.source == "sharegpt":
        from cadenza.sim.converters.sharegpt import ThinkModel, convert_sharegpt

        return convert_sharegpt(
            args.input,
            session_rate=_float(args, "rate", DEFAULT_RATE["sharegpt"]),
            sessions=args.sessions,
            min_turns=_int(args, "min_turns", 1),
            max_turns=args.max_turns,
            think=cast(ThinkModel, _str(args, "think", "symphony")),
            mean_think_s=_float(args, "mean_think_s", 60.0),
            max_typing_s=_float(args, "max_typing_s", 60.0),
            missing_hint_fraction=_float(args, "missing_hints", 0.0),
            include_text=not args.no_text,
            seed=args.seed,
        )
    if args.source == "mooncake":
        from cadenza.sim.converters.mooncake import Timing, convert_mooncake

        return convert_mooncake(
            args.input,
            timing=cast(Timing, _str(args, "timing", "arrival")),
            assumed_tpot_s=_float(args, "assumed_tpot_s", 0.0),
            sessions=args.sessions,
        )
    if args.source == "azure":
        from cadenza.sim.converters.azure import Grouping, convert_azure

        return convert_azure(
            args.input,
            turns_per_session=_int(args, "turns_per_session", 1),
            grouping=cast(Grouping, _str(args, "grouping", "consecutive")),
            sessions=args.sessions,
        )
    from cadenza.sim.converters.agents import AgentWorkload, generate_agents

    defaults = AgentWorkload()
    return generate_agents(
        AgentWorkload(
            programs=defaults.programs if args.sessions is None else args.sessions,
            rate=_float(args, "rate", DEFAULT_RATE["agents"]),
            steps=(
                _int(args, "min_steps", defaults.steps[0]),
                _int(args, "max_steps", defaults.steps[1]),
            ),
            system_prompt_tokens=_int(args, "system_prompt_tokens", defaults.system_prompt_tokens),
            tool_median_s=_float(args, "tool_median_s", defaults.tool_median_s),
            missing_hint_fraction=_float(args, "missing_hints", 0.0),
            seed=args.seed,
        )
    )


def run(args: argparse.Namespace) -> int:
    """Run ``trace convert`` or ``trace summary``; errors are raised as ``ValueError``."""
    if args.trace_command == "convert":
        problem = out_file_problem(args.out)
        if problem is not None:
            raise ValueError(problem)
        turns = convert(args)
        if not turns:
            raise ValueError("no turns to write: no session passed the filters")
        path = write_trace(args.out, turns)
        print(f"wrote {path}: {summarize(turns).format()}")
        return 0
    summary = summarize(read_trace(args.file))
    if args.json:
        print(json.dumps(dataclasses.asdict(summary)))
    else:
        print(summary.format())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cadenza trace", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"cadenza trace: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
