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
import time
from pathlib import Path
from typing import Any

from cadenza.bench.workloads import load_sharegpt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--history-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copy-blocks", type=int, default=256)
    parser.add_argument("--disk-path", default=None, help="default: a temporary directory")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", default="docs/benchmarks")
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


def _history_ttft(source, args: argparse.Namespace) -> dict[str, Any]:
    from cadenza.core.sampling_params import SamplingParams
    from cadenza.llm import LLM

    tok = source.tokenizer
    first, follow = _texts(tok, args.history_tokens - 60)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    setup = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    user = [{"role": "user", "content": follow}]
    device_hit, no_history, recompute, host_hit, hinted = [], [], [], [], []
    history_len = 0
    with LLM(source=source, num_threads=args.threads, num_kv_blocks=1024) as llm:
        llm.chat(user, one)  # warm up
        for r in range(args.repeats):
            sid = f"h{r}"
            llm.chat([{"role": "user", "content": first}], setup, session_id=sid)
            history_len = len(llm.engine.store.history_token_ids(sid))
            device_hit.append(_ttft(llm.chat(user, one, session_id=sid)[0]))
            no_history.append(_ttft(llm.chat(user, one, session_id=f"fresh{r}")[0]))
            full = llm.engine.store.history_token_ids(sid)
            stateless = {"prompt_token_ids": full, "cache_salt": f"nocache-{r}"}
            recompute.append(_ttft(llm.generate(stateless, one)[0]))
    filler = SamplingParams(temperature=0.0, max_tokens=1)
    with LLM(
        source=source,
        num_threads=args.threads,
        num_kv_blocks=400,
        host_num_blocks=4096,
        kv_cost_model="linear",
    ) as llm:
        llm.chat(user, one)
        for r in range(args.repeats):
            for hint in (False, True):
                sid = f"t{r}-{hint}"
                llm.chat([{"role": "user", "content": first}], setup, session_id=sid)
                for k in range(3):  # push it out of the device tier
                    note = f"{sid} {k}: " + first
                    llm.chat([{"role": "user", "content": note}], filler, session_id=f"x{sid}{k}")
                if hint:
                    llm.hint(sid, expected_arrival_s=0.5)
                    deadline = time.monotonic() + 10
                    while llm.engine.tiers.num_pending_jobs and time.monotonic() < deadline:
                        llm.engine.tiers.poll(wait_s=0.05)
                out = llm.chat(user, one, session_id=sid)[0]
                (hinted if hint else host_hit).append(_ttft(out))
                tiers = out.cached_tokens_by_tier
                if not hint and tiers.get("host", 0) == 0:
                    print(f"[tiers] warning: {sid} history was not on host: {tiers}")

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    return {
        "history_tokens": history_len,
        "ttft_device_hit_s": med(device_hit),
        "ttft_no_history_s": med(no_history),
        "ttft_stateless_recompute_s": med(recompute),
        "ttft_host_hit_s": med(host_hit),
        "ttft_host_hit_with_hint_s": med(hinted),
        "ratio_cached_vs_no_history": med(device_hit) / med(no_history),
        "ratio_cached_vs_recompute": med(device_hit) / med(recompute),
        "ratio_hinted_vs_device_hit": med(hinted) / med(device_hit),
        "ratio_host_vs_device_hit": med(host_hit) / med(device_hit),
        "samples": {
            "device_hit": device_hit,
            "no_history": no_history,
            "recompute": recompute,
            "host_hit": host_hit,
            "hinted": hinted,
        },
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
    result = {"model": args.model, "bandwidth": bandwidth, "ttft": ttft}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiers.json").write_text(json.dumps(result, indent=2))
    b, t = bandwidth, ttft
    lines = [
        "# KV tiers: copy bandwidth and TTFT by history location",
        "",
        f"Model `{args.model}`; command: `cadenza bench tiers` (medians of {args.repeats}).",
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
        f"| history cached on device | {t['ttft_device_hit_s'] * 1e3:.1f} |",
        f"| same message, no history | {t['ttft_no_history_s'] * 1e3:.1f} |",
        f"| stateless recompute of the history | {t['ttft_stateless_recompute_s'] * 1e3:.1f} |",
        f"| history on host, no hint | {t['ttft_host_hit_s'] * 1e3:.1f} |",
        f"| history on host, hint sent ahead | {t['ttft_host_hit_with_hint_s'] * 1e3:.1f} |",
        "",
        f"- cached / no history: **{t['ratio_cached_vs_no_history']:.2f}×**",
        f"- cached / stateless recompute: **{t['ratio_cached_vs_recompute']:.2f}×**",
        f"- hinted host hit / device hit: **{t['ratio_hinted_vs_device_hit']:.2f}×**",
        f"- unhinted host hit / device hit: {t['ratio_host_vs_device_hit']:.2f}×",
        "",
    ]
    (out / "tiers.md").write_text("\n".join(lines))
    print(f"[tiers] wrote {out / 'tiers.json'} and {out / 'tiers.md'}")
    return 0
