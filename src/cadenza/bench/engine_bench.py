"""`cadenza bench engine`: prefill and decode throughput against Hugging Face transformers.

Both engines run in the same process, on the same weights (the HF model is built from the
state dict Cadenza loaded), with the same thread count, on the same random prompts. Each
figure is the median of ``--repeats`` runs. Decode throughput is measured by difference: the
time to generate ``1 + G`` tokens minus the time to generate 1 (the prefill), for both.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cadenza.bench.roofline import decode_shapes, measure_roofline
from cadenza.core.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model to measure")
    parser.add_argument(
        "--prefill-tokens", type=int, default=1024, help="prompt length of the prefill run"
    )
    parser.add_argument(
        "--decode-batches", default="1,8,32", help="comma-separated decode batch sizes"
    )
    parser.add_argument(
        "--decode-prompt-tokens", type=int, default=128, help="prompt length of each decode row"
    )
    parser.add_argument(
        "--decode-tokens", type=int, default=64, help="tokens generated per decode row"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved repetitions (medians are reported)"
    )
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default")
    parser.add_argument(
        "--out-dir", default="docs/benchmarks", help="where the JSON and markdown go"
    )
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument(
        "--no-torch-gemm",
        action="store_true",
        help="skip the decode run of Cadenza on torch's default GEMM (--linear-backend torch), "
        "which shows how much of the gain is the oneDNN kernels",
    )
    parser.set_defaults(func=run)


def _median_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each function, run interleaved so machine noise hits all alike."""
    for fn in fns:
        fn()  # warm-up
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def _prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (count, length), generator=gen).tolist()


class CadenzaSide:
    def __init__(self, source, max_len: int, linear_backend: str = "auto") -> None:
        from cadenza.llm import LLM

        self.llm = LLM(
            source=source,
            linear_backend=linear_backend,
            enable_prefix_caching=False,
            max_num_batched_tokens=2048,
            max_num_seqs=256,
            max_model_len=max_len,
            kv_cache_memory_gib=2.0,
        )

    def generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        outs = self.llm.generate(prompts, params)
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)


class HFSide:
    def __init__(self, source) -> None:
        from cadenza.model.hf_reference import build_hf_model

        # transformers' own default attention (SDPA): what a user of it would get.
        self.model = build_hf_model(source.config, source.state_dict, attn_implementation="sdpa")
        self.pad = source.config.eos_token_ids[0]

    @torch.inference_mode()
    def forward_last(self, prompts: list[list[int]]) -> None:
        self.model(torch.tensor(prompts), logits_to_keep=1)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        ids = torch.tensor(prompts)
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=self.pad,
        )
        assert out.shape[1] == ids.shape[1] + new_tokens


def run(args: argparse.Namespace) -> int:
    from cadenza.model.source import load_model_source

    if args.threads:
        torch.set_num_threads(args.threads)
    source = load_model_source(args.model)
    config = source.config
    max_len = max(args.prefill_tokens, args.decode_prompt_tokens + args.decode_tokens) + 8
    hf = None if args.no_hf else HFSide(source)
    ours = CadenzaSide(source, max_len)
    torch_gemm = None if args.no_torch_gemm else CadenzaSide(source, max_len, "torch")
    result: dict = {
        "model": config.name,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": vars(args) | {"func": None},
    }

    n = args.prefill_tokens
    prompt = _prompts(config.vocab_size, 1, n, seed=1)
    sides = [lambda: ours.generate(prompt, 1)]
    if hf is not None:
        sides.append(lambda: hf.forward_last(prompt))
    times = _median_times(sides, args.repeats)
    t_ours = times[0]
    prefill = {"tokens": n, "cadenza_tokens_per_s": n / t_ours}
    if hf is not None:
        t_hf = times[1]
        prefill["hf_tokens_per_s"] = n / t_hf
        prefill["ratio_vs_hf"] = t_hf / t_ours
    roof = measure_roofline(config, n)
    prefill["roofline_tokens_per_s"] = roof["tokens_per_s"]
    prefill["fraction_of_roofline"] = roof["seconds"] / t_ours
    result["prefill"] = prefill
    result["roofline"] = roof

    decode = []
    g = args.decode_tokens
    for batch in [int(b) for b in args.decode_batches.split(",")]:
        prompts = _prompts(config.vocab_size, batch, args.decode_prompt_tokens, seed=batch)
        # Decode rate by difference: 1 + g tokens minus 1 token (the prefill), per engine.
        engines = {"cadenza": ours, "hf": hf, "cadenza_torch_gemm": torch_gemm}
        engines = {name: engine for name, engine in engines.items() if engine is not None}
        sides = [
            lambda e=engine, p=prompts, n=n: e.generate(p, n)
            for engine in engines.values()
            for n in (1, 1 + g)
        ]
        medians = iter(_median_times(sides, args.repeats))
        rates = {}
        for name in engines:
            one_token, all_tokens = next(medians), next(medians)
            rates[name] = batch * g / (all_tokens - one_token)
        floor = measure_roofline(config, batch, decode_shapes(config, batch))
        row = {
            "batch": batch,
            "cadenza_tokens_per_s": rates["cadenza"],
            "gemm_floor_tokens_per_s": batch / floor["seconds"],
        }
        row["cadenza_fraction_of_floor"] = (
            row["cadenza_tokens_per_s"] / row["gemm_floor_tokens_per_s"]
        )
        if "hf" in rates:
            row["hf_tokens_per_s"] = rates["hf"]
            row["ratio_vs_hf"] = rates["cadenza"] / rates["hf"]
        if "cadenza_torch_gemm" in rates:
            row["cadenza_torch_gemm_tokens_per_s"] = rates["cadenza_torch_gemm"]
        decode.append(row)
        print(f"decode batch {batch}: {row}", flush=True)
    result["decode"] = decode
    write_report(result, Path(args.out_dir))
    print(json.dumps({"prefill": prefill, "decode": decode}, indent=2))
    return 0


def write_report(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "engine.json").write_text(json.dumps(result, indent=2) + "\n")
    p = result["prefill"]
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"# Engine benchmark: {result['model']}",
        "",
        f"Command: `cadenza bench engine` · {m['processor']} · torch {m['torch']} · "
        f"{m['threads']} threads · float32 · medians of {s['repeats']} interleaved runs. Same "
        "process, same weights, same thread count for both engines; transformers uses its "
        "default SDPA attention.",
        "",
        f"## Prefill ({p['tokens']}-token prompt)",
        "",
        "| | tokens/s | vs transformers | of GEMM roofline |",
        "|---|---:|---:|---:|",
        f"| Cadenza | {p['cadenza_tokens_per_s']:.0f} | {p.get('ratio_vs_hf', float('nan')):.2f}× "
        f"| {p['fraction_of_roofline']:.0%} |",
    ]
    if "hf_tokens_per_s" in p:
        lines.append(
            f"| transformers (forward, last-token logits) | {p['hf_tokens_per_s']:.0f} | 1.00× | |"
        )
    lines.append(f"| GEMM roofline | {p['roofline_tokens_per_s']:.0f} | | 100% |")
    lines += [
        "",
        f"## Decode ({s['decode_prompt_tokens']}-token prompts, {s['decode_tokens']} new tokens, "
        "greedy)",
        "",
        "The GEMM floor is the rate at which this machine runs only the step's matmuls "
        "(projections at m = batch, LM head) on the faster kernel for each: no engine using "
        "them can decode faster. *Cadenza, torch GEMM* is the same engine with "
        "`--linear-backend torch`, the matmul kernels transformers uses.",
        "",
        "| batch | Cadenza tokens/s | transformers `generate` tokens/s | ratio | Cadenza, torch "
        "GEMM tokens/s | ratio | GEMM floor tokens/s | Cadenza of floor |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for row in result["decode"]:
        hf_rate = row.get("hf_tokens_per_s", nan)
        torch_rate = row.get("cadenza_torch_gemm_tokens_per_s", nan)
        torch_ratio = torch_rate / hf_rate
        lines.append(
            f"| {row['batch']} | {row['cadenza_tokens_per_s']:.0f} | {hf_rate:.0f} "
            f"| {row.get('ratio_vs_hf', nan):.2f}× | {torch_rate:.0f} | {torch_ratio:.2f}× "
            f"| {row['gemm_floor_tokens_per_s']:.0f} | {row['cadenza_fraction_of_floor']:.0%} |"
        )
    lines += [
        "",
        "## Roofline shapes",
        "",
        "Prefill shapes; oneDNN runs the weight matmuls on a pre-packed weight, as Cadenza does.",
        "",
        "| GEMM | [batch, m, k, n] | per pass | torch.matmul GFLOP/s | oneDNN GFLOP/s | roofline "
        "uses |",
        "|---|---|---:|---:|---:|---|",
    ]
    for shape in result["roofline"]["shapes"]:
        rates = shape["gflops_per_s_by_kernel"]
        onednn = f"{rates['onednn']:.0f}" if "onednn" in rates else "—"
        lines.append(
            f"| {shape['name']} | {shape['shape']} | {shape['count']} | {rates['torch']:.0f} "
            f"| {onednn} | {shape['kernel']} |"
        )
    (out_dir / "engine.md").write_text("\n".join(lines) + "\n")
