"""`cadenza bench replay`: multi-turn ShareGPT replay against the engine, tiers on and off.

Sessions start as a Poisson process and think for exponential times between turns; every turn
sends only its new user message (the session supplies the exact history). The same workload
runs under several configurations in one process, one after another:

* ``stateless`` — caching off: every turn recomputes its whole history (the vLLM-recompute
  baseline);
* ``tiers-cost`` / ``tiers-lru`` — device capacity for a fraction of the replay's session KV,
  a host tier for another fraction, and a disk tier, with each eviction policy;
* ``resident`` — a device large enough that nothing is evicted (the step-time baseline for
  "copies are hidden behind compute").

Idle gaps are skipped (the clock jumps to the next event when the engine has nothing to do),
so think times shape the interleaving without costing wall time.
"""

from __future__ import annotations

import argparse
import heapq
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cadenza.bench.replay_report import summarize_turns, write_replay_report
from cadenza.bench.workloads import Conversation, load_sharegpt, plan_sessions, truncate_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=None, help="ShareGPT jsonl(.gz); default: the sample")
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--min-turns", type=int, default=3)
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-chars", type=int, default=600, help="truncate each user message")
    parser.add_argument("--max-output", type=int, default=16, help="tokens generated per turn")
    parser.add_argument("--session-rate", type=float, default=2.0, help="sessions per second")
    parser.add_argument("--think-mean", type=float, default=5.0, help="seconds between turns")
    parser.add_argument("--device-frac", type=float, default=0.2, help="device KV / session KV")
    parser.add_argument("--host-frac", type=float, default=0.5, help="host KV / session KV")
    parser.add_argument("--disk-path", default=None, help="default: a temporary directory")
    parser.add_argument("--configs", default="stateless,tiers-cost,tiers-lru,resident")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="docs/benchmarks")
    parser.add_argument("--name", default="replay")
    parser.set_defaults(func=run)


def _session_kv_blocks(tokenizer, conversations: list[Conversation], max_output: int) -> list[int]:
    """Blocks each conversation's final history needs (reference replies cut to max_output)."""
    sizes = []
    for conv in conversations:
        messages: list[dict[str, str]] = []
        for turn in conv.turns:
            reply = tokenizer.decode(tokenizer.encode(turn.assistant)[:max_output])
            messages += [
                {"role": "user", "content": turn.user},
                {"role": "assistant", "content": reply},
            ]
        tokens = tokenizer.encode_chat(messages, add_generation_prompt=False)
        sizes.append(len(tokens) // 16 + 2)
    return sizes


def _drive(llm, conversations: list[Conversation], plans, max_output: int) -> dict[str, Any]:
    from cadenza.core.sampling_params import SamplingParams

    engine = llm.engine
    events: list[tuple[float, int, int]] = [(p.start_s, i, 0) for i, p in enumerate(plans)]
    heapq.heapify(events)
    start = time.monotonic()
    skipped = 0.0
    live: dict[str, tuple[int, int]] = {}
    turns: list[dict[str, Any]] = []
    step_times: list[float] = []
    history_len: dict[int, int] = {}
    while events or live:
        now = time.monotonic() - start + skipped
        while events and events[0][0] <= now:
            _, i, t = heapq.heappop(events)
            turn = conversations[i].turns[t]
            reply_len = len(llm.get_tokenizer().encode(turn.assistant))
            params = SamplingParams(
                temperature=0.0, max_tokens=max(1, min(reply_len, max_output)), ignore_eos=True
            )
            rid = engine.add_turn(f"s{i}", [{"role": "user", "content": turn.user}], params)
            live[rid] = (i, t)
        if not engine.has_unfinished_requests():
            if events:
                skipped += max(0.0, events[0][0] - now)
            continue
        t0 = time.perf_counter()
        outputs = engine.step()
        dt = time.perf_counter() - t0
        if outputs:
            step_times.append(dt)
        for out in outputs:
            if not out.finished:
                continue
            i, t = live.pop(out.request_id)
            prompt = len(out.prompt_token_ids)
            turns.append(
                {
                    "session": f"s{i}",
                    "turn": t,
                    "history_tokens": history_len.get(i, 0),
                    "prompt_tokens": prompt,
                    "ttft_s": out.metrics.get("ttft_s", float("nan")),
                    "cached_tokens": out.num_cached_tokens,
                    "redundant_tokens": out.num_redundant_tokens,
                    "cached_by_tier": out.cached_tokens_by_tier,
                }
            )
            history_len[i] = prompt + len(out.outputs[0].token_ids)
            if t + 1 < len(conversations[i].turns):
                done_at = time.monotonic() - start + skipped
                heapq.heappush(events, (done_at + plans[i].think_s[t], i, t + 1))
    return {"turns": turns, "step_times": step_times, "wall_s": time.monotonic() - start}


def _summary(result: dict[str, Any], llm) -> dict[str, Any]:
    turns = result["turns"]
    history = sum(max(t["history_tokens"] - 1, 0) for t in turns)
    redundant = sum(t["redundant_tokens"] for t in turns)
    hits = {
        tier: sum(t["cached_by_tier"].get(tier, 0) for t in turns)
        for tier in ("device", "host", "disk")
    }
    stats = llm.engine.tiers.stats
    disk = llm.engine.disk.stats if llm.engine.disk is not None else None
    ttft = summarize_turns(turns)
    return {
        "turns": len(turns),
        "history_tokens": history,
        "redundant_prefill_tokens": redundant,
        "redundant_fraction": redundant / history if history else 0.0,
        "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
        "hit_tokens": hits,
        "recomputed_tokens": redundant,
        "swap_in_bytes": stats.swap_in_bytes,
        "swap_out_bytes": stats.swap_out_bytes,
        "disk_write_bytes": disk.bytes_written if disk else 0,
        "disk_read_bytes": disk.bytes_read if disk else 0,
        "swap_in_gbps": stats.swap_in_bytes / 1e9 / stats.swap_in_seconds
        if stats.swap_in_seconds
        else 0.0,
        "swap_out_gbps": stats.swap_out_bytes / 1e9 / stats.swap_out_seconds
        if stats.swap_out_seconds
        else 0.0,
        "dropped_blocks": stats.dropped_blocks,
        "preemptions": llm.engine.scheduler.num_preemptions,
        "ttft_p50_s": ttft["ttft_p50_s"],
        "ttft_p90_s": ttft["ttft_p90_s"],
        "step_time_median_s": statistics.median(result["step_times"])
        if result["step_times"]
        else 0.0,
        "wall_s": result["wall_s"],
    }


def run(args: argparse.Namespace) -> int:
    from cadenza.llm import LLM
    from cadenza.model.source import load_model_source

    source = load_model_source(args.model)
    tok = source.tokenizer
    if tok is None:
        raise ValueError("the replay needs a model with a tokenizer")
    conversations = load_sharegpt(
        args.data, limit=args.conversations, min_turns=args.min_turns, max_turns=args.max_turns
    )
    conversations = [
        Conversation(
            c.conversation_id,
            tuple(type(t)(truncate_text(t.user, args.max_chars), t.assistant) for t in c.turns),
        )
        for c in conversations
    ]
    plans = plan_sessions(
        conversations, session_rate=args.session_rate, mean_think_s=args.think_mean, seed=args.seed
    )
    sizes = _session_kv_blocks(tok, conversations, args.max_output)
    total = sum(sizes)
    device = max(int(args.device_frac * total), 2 * max(sizes) + 16)
    host = int(args.host_frac * total)
    disk_root = Path(args.disk_path or tempfile.mkdtemp(prefix="cadenza-replay-"))
    configs: dict[str, dict[str, Any]] = {
        "stateless": {"num_kv_blocks": device, "enable_prefix_caching": False},
        "tiers-cost": {
            "num_kv_blocks": device,
            "host_num_blocks": host,
            "disk_num_blocks": 4 * total,
            "kv_eviction_policy": "cost",
        },
        "tiers-lru": {
            "num_kv_blocks": device,
            "host_num_blocks": host,
            "disk_num_blocks": 4 * total,
            "kv_eviction_policy": "lru",
        },
        "resident": {"num_kv_blocks": 2 * total + 64},
    }
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in configs]
    if unknown:
        raise ValueError(f"unknown replay configs {unknown}; choose from {sorted(configs)}")
    runs = []
    for name in wanted:
        config = dict(configs[name])
        if "disk_num_blocks" in config:
            path = disk_root / name
            shutil.rmtree(path, ignore_errors=True)
            config["kv_disk_path"] = str(path)
        print(f"[replay] {name}: {config}", flush=True)
        llm = LLM(source=source, num_threads=args.threads, **config)
        try:
            result = _drive(llm, conversations, plans, args.max_output)
            summary = _summary(result, llm)
        finally:
            llm.close()
        print(f"[replay] {name}: {summary}", flush=True)
        runs.append({"name": name, "config": config, "summary": summary, "turns": result["turns"]})
    meta = {
        "model": args.model,
        "conversations": len(conversations),
        "turns": sum(len(c.turns) for c in conversations),
        "session_kv_blocks": total,
        "device_blocks": device,
        "host_blocks": host,
        "session_rate_per_s": args.session_rate,
        "think_mean_s": args.think_mean,
        "max_chars": args.max_chars,
        "max_output": args.max_output,
        "command": "cadenza bench replay "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k not in ("func", "command", "bench_command") and v is not None
        ),
    }
    paths = write_replay_report({"meta": meta, "runs": runs}, args.out_dir, args.name)
    print(f"[replay] wrote {', '.join(str(p) for p in paths.values())}")
    return 0
