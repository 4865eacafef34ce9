"""`cadenza bench tiers`: copy bandwidths against the machine, and TTFT by where history lives.

* Host↔device and disk copy bandwidth of the swap engine (grouped copies of 256 blocks),
  next to the machine's memcpy and sequential file bandwidth measured in the same run.
* TTFT of a turn with ~2,000 tokens of cached history against the same message with no history
  and against a stateless recompute of the same history; and a turn whose history is on host,
  with and without a hint sent ahead of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from cadenza.bench.workloads import load_sharegpt
from cadenza.config import ModelConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model to measure")
    parser.add_argument(
        "--history-tokens", type=int, default=2000, help="cached history of the TTFT cases"
    )
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each case")
    parser.add_argument(
        "--copy-blocks", type=int, default=256, help="blocks per copy in the bandwidth runs"
    )
    parser.add_argument("--disk-path", default=None, help="default: a temporary directory")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default")
    parser.add_argument(
        "--out-dir", default="docs/benchmarks", help="where the JSON and markdown go"
    )
    parser.add_argument(
        "--large-shape",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the history turn on a Llama-3.2-1B-shaped random model (~10 GB RAM)",
    )
    parser.set_defaults(func=run)


def _bandwidth(source, n: int, disk_dir: Path, threads: int | None) -> dict[str, float]:
    from cadenza.core.transfer import JobKind, Tier, TransferItem, TransferJob
    from cadenza.kvstore.bandwidth import measure_disk_gbps, measure_memcpy_gbps
    from cadenza.llm import LLM

    memcpy = measure_memcpy_gbps(256)
    disk_w, disk_r = measure_disk_gbps(disk_dir, 256)
    llm = LLM(
        source=source,
        num_kv_blocks=n + 8,
        host_num_blocks=n,
        disk_num_blocks=4 * n,
        kv_disk_path=str(disk_dir / "tier"),
        kv_cost_model="linear",
        num_threads=threads,
    )
    swap = llm.engine.swap
    swap.device_kv.normal_()

    def job(kind: JobKind, src: Tier, dst: Tier, salt: int) -> TransferJob:
        items = []
        for i in range(n):
            key = (salt * 1_000_003 + i).to_bytes(32, "little")
            src_slot = -1 if src == Tier.DISK else i
            dst_slot = -1 if dst == Tier.DISK else i
            items.append(TransferItem(key, bytes(32), (i,), 0, src, src_slot, dst, dst_slot))
        return TransferJob(kind, items)

    def timed(kind: JobKind, src: Tier, dst: Tier, salt: int) -> float:
        best = 0.0
        for r in range(3):
            j = job(kind, src, dst, salt + (r if dst == Tier.DISK else 0))
            swap.run_now(j)
            assert all(i.ok for i in j.items), j.error
            best = max(best, j.bytes_moved / 1e9 / j.seconds)
        return best

    result = {
        "memcpy_gbps": memcpy,
        "disk_seq_write_gbps": disk_w,
        "disk_seq_read_gbps": disk_r,
        "device_to_host_gbps": timed(JobKind.OFFLOAD, Tier.DEVICE, Tier.HOST, 0),
        "host_to_device_gbps": timed(JobKind.FETCH, Tier.HOST, Tier.DEVICE, 0),
        "device_to_disk_gbps": timed(JobKind.PERSIST, Tier.DEVICE, Tier.DISK, 10),
        "disk_to_device_gbps": timed(JobKind.FETCH, Tier.DISK, Tier.DEVICE, 10),
        "block_bytes": swap.block_bytes,
        "blocks_per_copy": n,
    }
    llm.close()
    return result


def _texts(tokenizer, history_tokens: int) -> tuple[str, str]:
    """A long first message of about ``history_tokens`` tokens and a short follow-up."""
    parts: list[str] = []
    follow_up = ""
    for conv in load_sharegpt(limit=200, min_turns=2):
        follow_up = follow_up or conv.turns[1].user[:300]
        parts.append(conv.turns[0].user)
        if len(tokenizer.encode("\n\n".join(parts))) >= history_tokens:
            break
    ids = tokenizer.encode("\n\n".join(parts))[:history_tokens]
    return tokenizer.decode(ids), follow_up


def _ttft(out) -> float:
    return float(out.metrics["ttft_s"])


def llama_3_2_1b_shape(vocab_size: int) -> ModelConfig:
    """Llama-3.2-1B's dimensions (random weights; the vocabulary of the tokenizer used)."""
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_ids=(2,),
        name="llama-3.2-1b-shape",
    )


def flop_ratio_floor(
    config: ModelConfig, history: int, cached_new: int, fresh: int, fresh_cached: int = 0
) -> float:
    """FLOPs of a turn of ``cached_new`` tokens after ``history`` cached ones, over FLOPs of a
    fresh ``fresh``-token prompt whose first ``fresh_cached`` tokens hit the prefix cache: the
    TTFT ratio a compute-bound engine cannot beat, since the new tokens must still attend over
    the whole history."""
    c = config
    d, kv = c.resolved_head_dim, c.num_key_value_heads
    per_layer = (
        c.hidden_size * c.num_attention_heads * d * 2  # q and o projections
        + c.hidden_size * kv * d * 2  # k and v projections
        + c.hidden_size * c.intermediate_size * 3  # gate, up, down
    )
    linear = 2 * per_layer * c.num_hidden_layers

    def attention(start: int, n: int) -> float:
        # 4 FLOPs per (query, key, head, dim): QK^T and PV, multiply and add.
        keys = n * start + n * (n + 1) / 2
        return 4 * keys * c.num_attention_heads * d * c.num_hidden_layers

    cached = cached_new * linear + attention(history, cached_new)
    computed = fresh - fresh_cached
    return cached / (computed * linear + attention(fresh_cached, computed))


def _session_ttfts(source, args: argparse.Namespace, repeats: int) -> dict[str, Any]:
    """Device hit, same message without history, and stateless recompute, for ``source``."""
    from cadenza.core.sampling_params import SamplingParams
    from cadenza.llm import LLM

    tok = source.tokenizer
    first, follow = _texts(tok, args.history_tokens - 60)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    setup = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    device_hit, no_history, prefix_cached, recompute = [], [], [], []
    history_len = cached_prompt = fresh_prompt = fresh_hit = 0
    with LLM(
        source=source, num_threads=args.threads, num_kv_blocks=1024, kv_cost_model="linear"
    ) as llm:
        llm.chat([{"role": "user", "content": follow}], one)  # warm up
        for r in range(repeats):
            sid = f"h{r}"
            # A distinct first message per session: no turn may hit another session's blocks.
            opener = [{"role": "user", "content": f"[{sid}] {first}"}]
            llm.chat(opener, setup, session_id=sid)
            history_len = len(llm.sessions.store.history_token_ids(sid))
            # A distinct message per repetition, so its blocks are never already cached.
            user = [{"role": "user", "content": f"({r + 1}) {follow}"}]
            out = llm.chat(user, one, session_id=sid)[0]
            device_hit.append(_ttft(out))
            cached_prompt = len(out.prompt_token_ids)
            # The same message opening a new conversation: only the blocks it shares with
            # every conversation (the system prompt) come from the prefix cache.
            out = llm.chat(user, one, session_id=f"fresh{r}")[0]
            prefix_cached.append(_ttft(out))
            fresh_prompt, fresh_hit = len(out.prompt_token_ids), out.num_cached_tokens
            # ... and computed from scratch (nothing cached at all).
            cold = {"prompt_token_ids": out.prompt_token_ids, "cache_salt": f"cold-{r}"}
            no_history.append(_ttft(llm.generate(cold, one)[0]))
            full = llm.sessions.store.history_token_ids(sid)
            stateless = {"prompt_token_ids": full, "cache_salt": f"nocache-{r}"}
            recompute.append(_ttft(llm.generate(stateless, one)[0]))
    med = statistics.median
    new_tokens = cached_prompt - history_len + 1
    return {
        "model": source.config.name,
        "history_tokens": history_len,
        "cached_turn_prompt_tokens": cached_prompt,
        "fresh_prompt_tokens": fresh_prompt,
        "fresh_prompt_prefix_cached_tokens": fresh_hit,
        "ttft_device_hit_s": med(device_hit),
        "ttft_no_history_s": med(no_history),
        "ttft_no_history_prefix_cached_s": med(prefix_cached),
        "ttft_stateless_recompute_s": med(recompute),
        "ratio_cached_vs_no_history": med(device_hit) / med(no_history),
        "ratio_cached_vs_no_history_prefix_cached": med(device_hit) / med(prefix_cached),
        "ratio_cached_vs_recompute": med(device_hit) / med(recompute),
        "flop_floor_cached_vs_no_history": flop_ratio_floor(
            source.config, history_len - 1, new_tokens, fresh_prompt
        ),
        "flop_floor_cached_vs_no_history_prefix_cached": flop_ratio_floor(
            source.config, history_len - 1, new_tokens, fresh_prompt, fresh_hit
        ),
        "samples": {
            "device_hit": device_hit,
            "no_history": no_history,
            "no_history_prefix_cached": prefix_cached,
            "recompute": recompute,
        },
    }


def _history_ttft(source, args: argparse.Namespace) -> dict[str, Any]:
    from cadenza.core.sampling_params import SamplingParams
    from cadenza.llm import LLM

    tok = source.tokenizer
    first, follow = _texts(tok, args.history_tokens - 60)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    setup = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    user = [{"role": "user", "content": follow}]
    host_hit, hinted, same_engine_hit = [], [], []
    device = _session_ttfts(source, args, args.repeats)
    filler = SamplingParams(temperature=0.0, max_tokens=1)
    with LLM(
        source=source,
        num_threads=args.threads,
        # Room for about three histories: three filler turns push a session out to host.
        num_kv_blocks=args.history_tokens * 16 // 80,
        host_num_blocks=4096,
        kv_cost_model="linear",
    ) as llm:
        llm.chat(user, one)
        for r in range(args.repeats):
            # Interleaved in one engine, so the three see the same machine conditions.
            for case in ("host", "hinted", "device"):
                sid = f"t{r}-{case}"
                opener = [{"role": "user", "content": f"[{sid}] {first}"}]
                llm.chat(opener, setup, session_id=sid)
                for k in range(3 if case != "device" else 0):  # push it out of the device tier
                    note = f"{sid} {k}: " + first
                    llm.chat([{"role": "user", "content": note}], filler, session_id=f"x{sid}{k}")
                if case == "hinted":
                    llm.hint(sid, expected_arrival_s=0.5)
                # The user's think time: every case starts with the copies it queued landed.
                llm.engine.flush()
                out = llm.chat(user, one, session_id=sid)[0]
                {"host": host_hit, "hinted": hinted, "device": same_engine_hit}[case].append(
                    _ttft(out)
                )
                tiers = out.cached_tokens_by_tier
                if case == "host" and tiers.get("host", 0) == 0:
                    print(f"[tiers] warning: {sid} history was not on host: {tiers}")
                if case == "hinted" and tiers.get("host", 0) + tiers.get("disk", 0):
                    print(f"[tiers] warning: hinted {sid} was not all on device: {tiers}")

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    samples = {
        **device.pop("samples"),
        "host_hit": host_hit,
        "hinted": hinted,
        "same_engine_device_hit": same_engine_hit,
    }
    return {
        **device,
        "ttft_host_hit_s": med(host_hit),
        "ttft_host_hit_with_hint_s": med(hinted),
        "ttft_same_engine_device_hit_s": med(same_engine_hit),
        # Paired by repetition (the three cases of one repetition run back to back), so slow
        # drifts of this shared machine cancel out.
        "ratio_hinted_vs_device_hit": med(_paired(hinted, same_engine_hit)),
        "ratio_host_vs_device_hit": med(_paired(host_hit, same_engine_hit)),
        "samples": samples,
    }


def run(args: argparse.Namespace) -> int:
    from cadenza.model.source import load_model_source

    source = load_model_source(args.model)
    if source.tokenizer is None:
        raise ValueError("this benchmark needs a model with a tokenizer")
    disk_dir = Path(args.disk_path or tempfile.mkdtemp(prefix="cadenza-tiers-"))
    disk_dir.mkdir(parents=True, exist_ok=True)
    bandwidth = _bandwidth(source, args.copy_blocks, disk_dir, args.threads)
    print(f"[tiers] bandwidth: {bandwidth}", flush=True)
    ttft = _history_ttft(source, args)
    print(f"[tiers] ttft: { {k: v for k, v in ttft.items() if k != 'samples'} }", flush=True)
    large = None
    if args.large_shape:
        from cadenza.model.source import random_model_source

        shape = llama_3_2_1b_shape(source.config.vocab_size)
        print(f"[tiers] TTFT on {shape.name} (random weights)", flush=True)
        big = random_model_source(shape, seed=0, tokenizer=source.tokenizer)
        large = _session_ttfts(big, args, max(1, min(args.repeats, 2)))
        del big
        print(f"[tiers] {shape.name}: { {k: v for k, v in large.items() if k != 'samples'} }")
    result = {"model": args.model, "bandwidth": bandwidth, "ttft": ttft, "ttft_large": large}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiers.json").write_text(json.dumps(result, indent=2))
    (out / "tiers.md").write_text(render_markdown(result, args.repeats))
    print(f"[tiers] wrote {out / 'tiers.json'} and {out / 'tiers.md'}")
    return 0


def _paired(xs: list[float], ys: list[float]) -> list[float]:
    return [x / y for x, y in zip(xs, ys, strict=True)]


def _new_tokens(t: dict[str, Any]) -> int:
    return int(t["cached_turn_prompt_tokens"] - t["history_tokens"] + 1)


def _ratio_lines(t: dict[str, Any]) -> list[str]:
    return [
        f"- cached / no history computed in full: **{t['ratio_cached_vs_no_history']:.2f}×** "
        f"(FLOP floor {t['flop_floor_cached_vs_no_history']:.2f}×)",
        f"- cached / no history with the system prompt cached: "
        f"**{t['ratio_cached_vs_no_history_prefix_cached']:.2f}×** "
        f"(FLOP floor {t['flop_floor_cached_vs_no_history_prefix_cached']:.2f}×)",
        f"- cached / stateless recompute: **{t['ratio_cached_vs_recompute']:.2f}×**",
    ]


def render_markdown(result: dict[str, Any], repeats: int) -> str:
    b, t, large = result["bandwidth"], result["ttft"], result.get("ttft_large")
    lines = [
        "# KV tiers: copy bandwidth and TTFT by history location",
        "",
        f"Model `{result['model']}`; command: `cadenza bench tiers` (medians of {repeats}).",
        "",
        "| copy | GB/s | machine reference | GB/s | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, ref in (
        ("device_to_host", "memcpy"),
        ("host_to_device", "memcpy"),
        ("device_to_disk", "disk_seq_write"),
        ("disk_to_device", "disk_seq_read"),
    ):
        got, base = b[f"{name}_gbps"], b[f"{ref}_gbps"]
        lines.append(f"| {name} | {got:.2f} | {ref} | {base:.2f} | {got / base:.0%} |")
    lines += [
        "",
        f"| turn ({t['history_tokens']} history tokens) | TTFT (ms) |",
        "|---|---|",
        f"| history cached on device ({_new_tokens(t)} new tokens) | "
        f"{t['ttft_device_hit_s'] * 1e3:.1f} |",
        f"| same message, no history, computed in full ({t['fresh_prompt_tokens']} tokens) | "
        f"{t['ttft_no_history_s'] * 1e3:.1f} |",
        f"| same message, no history, shared system-prompt blocks cached "
        f"({t['fresh_prompt_prefix_cached_tokens']} of {t['fresh_prompt_tokens']}) | "
        f"{t['ttft_no_history_prefix_cached_s'] * 1e3:.1f} |",
        f"| stateless recompute of the history | {t['ttft_stateless_recompute_s'] * 1e3:.1f} |",
        f"| tiered engine: history on device | {t['ttft_same_engine_device_hit_s'] * 1e3:.1f} |",
        f"| tiered engine: history on host, no hint | {t['ttft_host_hit_s'] * 1e3:.1f} |",
        f"| tiered engine: history on host, hint ahead | "
        f"{t['ttft_host_hit_with_hint_s'] * 1e3:.1f} |",
        "",
        *_ratio_lines(t),
        f"- hinted host hit / device hit (same engine): **{t['ratio_hinted_vs_device_hit']:.2f}×** "
        "(median of per-repetition ratios; a repetition runs its three tiered cases back to "
        "back, each after the copies it queued have landed)",
        f"- unhinted host hit / device hit (same engine): {t['ratio_host_vs_device_hit']:.2f}×",
        "",
        "The FLOP floor is the ratio a compute-bound engine would show if attention over the "
        "cached history ran as efficiently as the weight GEMMs: the new tokens of the cached "
        "turn must still attend over every history token, which on this model costs "
        "about as much arithmetic as the projections of a short prompt.",
        "",
    ]
    if large is not None:
        lines += [
            f"## The same turn on a {large['model']} model (random weights, same tokenizer)",
            "",
            "The same turn on a model with Llama-3.2-1B's shape, where the history's attention "
            "is a smaller share of the turn's arithmetic:",
            "",
            "| turn | TTFT (ms) |",
            "|---|---|",
            f"| history cached on device | {large['ttft_device_hit_s'] * 1e3:.1f} |",
            f"| same message, no history, computed in full | "
            f"{large['ttft_no_history_s'] * 1e3:.1f} |",
            f"| same message, no history, system-prompt blocks cached | "
            f"{large['ttft_no_history_prefix_cached_s'] * 1e3:.1f} |",
            f"| stateless recompute | {large['ttft_stateless_recompute_s'] * 1e3:.1f} |",
            "",
            *_ratio_lines(large),
            "",
        ]
    return "\n".join(lines)
