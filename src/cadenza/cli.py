"""`cadenza serve | generate | chat [--offline] | bench engine | replay | tiers`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="alias smollm2-135m (embedded default), a .gguf file, or a Hugging Face directory",
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=1.0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument(
        "--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false"
    )
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument(
        "--linear-backend",
        default="auto",
        choices=["auto", "torch", "onednn"],
        help="matmul kernels: auto packs float32 CPU weights for oneDNN",
    )
    tiers = parser.add_argument_group("KV tiers and sessions")
    tiers.add_argument("--kv-host-gib", type=float, default=0.0, help="host RAM KV tier size")
    tiers.add_argument("--kv-disk-gib", type=float, default=0.0, help="disk KV tier size")
    tiers.add_argument("--kv-disk-path", default=None, help="directory of the disk KV tier")
    tiers.add_argument("--kv-eviction-policy", default="cost", choices=["cost", "lru"])
    tiers.add_argument(
        "--session-store", default=None, help="SQLite file of the conversation store"
    )


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def _build_llm(args: argparse.Namespace):
    from cadenza.llm import LLM

    return LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=args.enable_prefix_caching,
        num_threads=args.num_threads,
        linear_backend=args.linear_backend,
        kv_host_gib=args.kv_host_gib,
        kv_disk_gib=args.kv_disk_gib,
        kv_disk_path=args.kv_disk_path,
        kv_eviction_policy=args.kv_eviction_policy,
        session_store_path=args.session_store,
    )


def _sampling(args: argparse.Namespace):
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
    engine = llm.engine
    session = args.session or f"chat-{uuid.uuid4().hex[:8]}"
    pending: list[dict[str, str]] = []
    if args.system and not engine.store.history_token_ids(session):
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
        request_id = engine.add_turn(session, pending, params)
        pending = []
        first = None
        out = None
        print("assistant> ", end="", flush=True)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                first = first or time.monotonic()
                print(out.outputs[0].delta_text, end="", flush=True)
        ttft = (first - start) if first else float("nan")
        cached = out.num_cached_tokens if out is not None else 0
        total = len(out.prompt_token_ids) if out is not None else 0
        print(f"\n  [ttft {ttft * 1000:.0f} ms, {cached}/{total} prompt tokens cached]")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cadenza", description="Cadenza stateful LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="one-shot generation on the offline engine")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive terminal chat")
    chat.add_argument("--offline", action="store_true", help="run the engine in this process")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument(
        "--session", default=None, help="session id to continue (with --session-store)"
    )
    _add_engine_args(chat)
    _add_sampling_args(chat)
    from cadenza.client.chat import add_arguments as add_chat_client_args

    add_chat_client_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="the OpenAI-compatible stateful server")
    _add_engine_args(serve)
    from cadenza.server.serve import add_arguments as add_serve_args
    from cadenza.server.serve import run as run_server

    add_serve_args(serve)
    serve.set_defaults(func=run_server)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
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

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"cadenza: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
