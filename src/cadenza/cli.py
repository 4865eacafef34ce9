"""`cadenza serve | generate | chat [--offline] | bench engine | replay | tiers`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cadenza.config_args import add_engine_arguments, engine_options_from_args

if TYPE_CHECKING:
    from cadenza.core.sampling_params import SamplingParams
    from cadenza.llm import LLM


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="most tokens to generate per reply (default: %(default)s)",
    )
    sampling.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature (0: greedy; default: %(default)s)",
    )
    sampling.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off; default: 1.0)"
    )
    sampling.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample from the k likeliest tokens (0: off; default: 0)",
    )
    sampling.add_argument("--seed", type=int, default=None, help="sampling seed (unset: random)")


def _build_llm(args: argparse.Namespace) -> LLM:
    from cadenza.llm import LLM

    return LLM(**engine_options_from_args(args))


def _sampling(args: argparse.Namespace) -> SamplingParams:
    from cadenza.core.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _build_llm(args)
    params = _sampling(args)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        outputs = llm.generate(args.prompt, params)
    print(outputs[0].outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if not args.offline:
        from cadenza.client.chat import run_chat

        return run_chat(args)
    import uuid

    llm = _build_llm(args)
    params = _sampling(args)
    session = args.session or f"chat-{uuid.uuid4().hex[:8]}"
    pending: list[dict[str, str]] = []
    if args.system and not llm.sessions.history(session):
        pending.append({"role": "system", "content": args.system})
    print(f"cadenza chat (offline, {args.model}, session {session}). Empty line or Ctrl-D quits.")
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            print()
            llm.close()
            return 0
        if not user:
            llm.close()
            return 0
        pending.append({"role": "user", "content": user})
        start = time.monotonic()
        request_id = llm.add_turn(session, pending, params)
        pending = []
        first = None
        out = None
        print("assistant> ", end="", flush=True)
        while llm.engine.has_unfinished_requests():
            for out in llm.step():
                if out.request_id != request_id:
                    continue
                first = first or time.monotonic()
                print(out.outputs[0].delta_text, end="", flush=True)
        ttft = (first - start) if first else float("nan")
        cached = out.num_cached_tokens if out is not None else 0
        total = len(out.prompt_token_ids) if out is not None else 0
        print(f"\n  [ttft {ttft * 1000:.0f} ms, {cached}/{total} prompt tokens cached]")


def build_parser() -> argparse.ArgumentParser:
    """The ``cadenza`` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="cadenza", description="Cadenza stateful LLM serving")
    sub = parser.add_subparsers(dest="command", required=True, help="what to run")

    gen = sub.add_parser("generate", help="one-shot generation on the offline engine")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_engine_arguments(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat",
        help="interactive terminal chat",
        description="Interactive terminal chat: type a message and press Enter; an empty line"
        " or Ctrl-D ends the chat.",
    )
    chat.add_argument("--offline", action="store_true", help="run the engine in this process")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument(
        "--session", default=None, help="session id to continue (with --session-store)"
    )
    add_engine_arguments(chat)
    _add_sampling_args(chat)
    from cadenza.client.chat import add_arguments as add_chat_client_args

    add_chat_client_args(chat)
    chat.set_defaults(func=cmd_chat)

    from cadenza.sim.trace_cli import add_arguments as add_trace_args

    add_trace_args(sub.add_parser("trace", help="session traces: convert workloads, print totals"))

    from cadenza.sim.simulate_cli import add_arguments as add_simulate_args

    add_simulate_args(
        sub.add_parser("simulate", help="run a session trace on the simulator; calibrate it")
    )

    serve = sub.add_parser("serve", help="the OpenAI-compatible stateful server")
    from cadenza.server.serve import SERVE_HELP_OVERRIDES
    from cadenza.server.serve import add_arguments as add_serve_args

    add_engine_arguments(serve, SERVE_HELP_OVERRIDES)
    from cadenza.server.serve import run as run_server

    add_serve_args(serve)
    serve.set_defaults(func=run_server)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, help="which benchmark")
    from cadenza.bench.engine_bench import add_arguments as add_engine_bench_args

    engine_bench = bench_sub.add_parser("engine", help="prefill/decode throughput vs transformers")
    add_engine_bench_args(engine_bench)
    from cadenza.bench.replay import add_arguments as add_replay_args

    replay = bench_sub.add_parser("replay", help="multi-turn ShareGPT replay over the KV tiers")
    add_replay_args(replay)
    from cadenza.bench.tier_probe import add_arguments as add_tier_args

    tiers = bench_sub.add_parser("tiers", help="KV copy bandwidth and TTFT by history location")
    add_tier_args(tiers)
    from cadenza.bench.serve_bench import add_arguments as add_serve_bench_args

    serve_bench = bench_sub.add_parser("serve", help="multi-turn HTTP load: Cadenza vs baselines")
    add_serve_bench_args(serve_bench)
    from cadenza.bench.cluster_bench import add_arguments as add_cluster_bench_args

    add_cluster_bench_args(
        bench_sub.add_parser("cluster", help="multi-worker cluster: routing policies side by side")
    )
    from cadenza.bench.migration_bench import add_arguments as add_migration_bench_args

    add_migration_bench_args(
        bench_sub.add_parser("migration", help="KV move vs recompute; live-migration downtime")
    )
    from cadenza.bench.agents_bench import add_arguments as add_agents_bench_args

    add_agents_bench_args(
        bench_sub.add_parser(
            "agents", help="agent programs: sessions vs resending history vs no cache"
        )
    )
    from cadenza.sim.validate import add_arguments as add_sim_validation_args

    add_sim_validation_args(
        bench_sub.add_parser(
            "sim-validation", help="the CPU-calibrated simulator against the real engine"
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:  # bad input, a missing or unwritable path
        print(f"cadenza: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
