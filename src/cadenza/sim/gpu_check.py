"""``cadenza simulate gpu-check``: the GPU roofline against this engine's CUDA path.

The simulator prices GPU steps with a roofline (``sim/roofline.py``) whose efficiencies are
typical of vLLM-class engines. This command measures how far that is from what this engine
does on a real GPU: it builds the real ``LLMEngine`` on the device with one priced model's
shape (Llama-3.1-8B by default) and random weights drawn on the device
(``random_model_source``: a step's time does not depend on the weights' values, and no
checkpoint can be fetched), runs the CPU calibration's workload (prefills of growing length,
decode batches of growing width at short and long contexts, mixed steps;
``calibrate.profile_engine``) after one unrecorded pass to compile the kernels, and prices
every measured step's shape with the roofline of the named GPU.

    cadenza simulate gpu-check --gpu H200 --model llama-3.1-8b --out-dir docs/benchmarks

Writes ``sim-gpu-check.json``, ``.md`` and ``.png`` (``gpu_check_report``): the roofline's
error by kind of step, and the per-step overhead that would make it exact. ``--device cpu``
runs the same pipeline without a GPU (for its tests; the roofline then prices a GPU the steps
did not run on, so its error means nothing).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cadenza.sim.hardware import GPUS, GPUSpec
from cadenza.sim.model_shapes import MODELS, ModelShape, model_shape
from cadenza.sim.roofline import RooflineCost, RooflineParams
from cadenza.sim.step_cost import StepShape, decode_shape

SCHEMA = "cadenza.sim-gpu-check/1"
GPU_DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
MAX_MODEL_LEN = 4096
KINDS = ("prefill", "decode", "mixed")
BUSY_PROMPT = 64  # prompt tokens of each sequence in the decode batch ``gpu_busy`` profiles


def step_kind(shape: StepShape) -> str:
    if shape.decode_seqs == 0:
        return "prefill"
    return "decode" if shape.prefill_tokens == 0 else "mixed"


def model_config(shape: ModelShape) -> Any:
    """A ``ModelConfig`` with ``shape``'s sizes (Llama-3.x RoPE where the vocabulary says
    Llama 3; the rotation's constants do not change a step's time)."""
    from cadenza.config import ModelConfig, RopeScaling

    llama3 = shape.vocab_size > 100_000
    return ModelConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        rope_theta=500000.0 if llama3 else 10000.0,
        rope_scaling=RopeScaling() if llama3 else None,
        max_position_embeddings=min(shape.max_context, MAX_MODEL_LEN),
        tie_word_embeddings=shape.tied_embeddings,
        eos_token_ids=(),
        name=shape.name,
    )


def build_engine(shape: ModelShape, device: str, kv_cache_gib: float) -> Any:
    from cadenza.config import EngineConfig
    from cadenza.engine import LLMEngine

    config = EngineConfig.from_options(
        model=shape.name,
        device=device,
        dtype="float32" if device == "cpu" else "bfloat16",
        enable_prefix_caching=False,
        max_num_seqs=max(GPU_DECODE_BATCHES),
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory_gib=kv_cache_gib,
        kv_cost_model="linear",  # no start-up profile: nothing here evicts
        kv_host_gib=min(4.0, kv_cache_gib / 4),  # room for ``link_speeds``' copies
    )
    import torch

    from cadenza.model.source import random_model_source

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return LLMEngine(config, random_model_source(model_config(shape), device=device, dtype=dtype))


def price(samples: list[tuple[StepShape, float]], roofline: RooflineCost) -> list[dict[str, Any]]:
    """Each measured step with its shape, kind and the roofline's price of that shape."""
    rows = []
    for shape, measured in samples:
        predicted = roofline.step_seconds(shape)
        rows.append(
            {
                "kind": step_kind(shape),
                **asdict(shape),
                "measured_s": measured,
                "roofline_s": predicted,
                "error": (predicted - measured) / measured,
            }
        )
    return rows


def summarize(rows: list[dict[str, Any]], params: RooflineParams) -> dict[str, Any]:
    """By kind of step (and over all): how many, the median and worst error of the roofline
    (predicted minus measured, over measured), the median measured / predicted ratio, and the
    per-step overhead that would make the median step of that kind exact (the roofline's own
    overhead is ``params.step_overhead_s``)."""
    out: dict[str, Any] = {}
    for kind in (*KINDS, "all"):
        chosen = [r for r in rows if kind in ("all", r["kind"])]
        if not chosen:
            continue
        errors = [abs(r["error"]) for r in chosen]
        implied = [params.step_overhead_s + r["measured_s"] - r["roofline_s"] for r in chosen]
        out[kind] = {
            "steps": len(chosen),
            "median_abs_error": statistics.median(errors),
            "worst_abs_error": max(errors),
            "median_measured_over_roofline": statistics.median(
                r["measured_s"] / r["roofline_s"] for r in chosen
            ),
            "median_measured_s": statistics.median(r["measured_s"] for r in chosen),
            "implied_step_overhead_s": statistics.median(implied),
        }
    return out


def gpu_busy(
    engine: Any, device: str, roofline: RooflineCost, batch: int = 8, steps: int = 12
) -> dict[str, Any] | None:
    """Where a decode step's time goes: over ``steps`` plain decode steps of ``batch``
    sequences of ``BUSY_PROMPT`` tokens, the device's kernel time (read by torch's profiler)
    against the steps' wall time and against the roofline's price of those steps without its
    fixed overheads, and kernels launched per step. None on the CPU; ``{"error": ...}`` where
    the profiler cannot read the device. The profiler adds host time per launch, so the busy
    share it gives is a floor."""
    if not device.startswith("cuda"):
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from cadenza.core.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"busy-{i}", [16 + i] * BUSY_PROMPT, params)
    engine.step()  # the batch's prefill (one step: 512 tokens)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall = time.perf_counter() - start
        kernels = [a for a in prof.key_averages() if a.device_type == DeviceType.CUDA]
        busy_us = sum(a.self_device_time_total for a in kernels)
        launches = sum(a.count for a in kernels)
    except Exception as e:  # noqa: BLE001 - a diagnostic: report why it is missing
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        while engine.has_unfinished_requests():
            engine.step()
    # Decode step k (k = 1..steps) computes each sequence's token at position BUSY_PROMPT + k
    # - 1, attending BUSY_PROMPT + k positions (``step_cost.step_shape`` of that plan).
    p = roofline.params
    priced = [
        roofline.step_seconds(decode_shape(batch, batch * (BUSY_PROMPT + k)))
        - p.step_overhead_s
        - p.seq_overhead_s * batch
        for k in range(1, steps + 1)
    ]
    return {
        "batch": batch,
        "steps": steps,
        "prompt_tokens": BUSY_PROMPT,
        "roofline_compute_s_per_step": sum(priced) / steps,
        "step_wall_s": wall / steps,
        "kernel_s_per_step": busy_us * 1e-6 / steps,
        "busy_share": busy_us * 1e-6 / wall,
        "kernels_per_step": launches / steps,
    }


def link_speeds(engine: Any, device: str, blocks: int = 256, repeats: int = 3) -> dict | None:
    """The device <-> host leg of every offload, fetch and migration on this machine: the
    engine's own swap engine copies ``blocks`` KV blocks device -> host (an offload, each host
    slot checksummed) and back (a fetch, each slot verified first), best of ``repeats``; beside
    it, one plain pinned copy of the same bytes, and the simulator's modelled link of the GPU.
    Run after the profile: it overwrites device blocks the idle engine no longer reads. None
    without a host tier."""
    import torch

    from cadenza.core.transfer import JobKind, Tier, TransferItem, TransferJob

    swap = engine.swap
    if swap.host_kv is None:
        return None
    n = min(blocks, swap.host_kv.shape[2], engine.runner.num_blocks)
    size = n * swap.block_bytes

    def timed(kind: JobKind, src: Tier, dst: Tier) -> float:
        best = float("inf")
        for _ in range(repeats):
            items = [
                TransferItem(i.to_bytes(8, "little"), b"", (), 0, src, i, dst, i) for i in range(n)
            ]
            job = TransferJob(kind, items)
            swap.run_now(job)
            if job.error or not all(i.ok for i in items):
                raise RuntimeError(f"{kind.value} of {n} blocks failed: {job.error}")
            best = min(best, job.seconds)
        return size / best / 1e9

    out = {
        "blocks": n,
        "bytes": size,
        "device_to_host_gbps": timed(JobKind.OFFLOAD, Tier.DEVICE, Tier.HOST),
        "host_to_device_gbps": timed(JobKind.FETCH, Tier.HOST, Tier.DEVICE),
    }
    if device.startswith("cuda"):
        flat = engine.runner.kv_caches.view(-1)[: size // engine.runner.kv_caches.element_size()]
        pinned = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        for name, dst, src in (
            ("raw_device_to_host_gbps", pinned, flat),
            ("raw_host_to_device_gbps", flat, pinned),
        ):
            best = float("inf")
            for _ in range(repeats):
                torch.cuda.synchronize()
                start = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            out[name] = size / best / 1e9
    return out


def run_check(
    shape: ModelShape,
    gpu: GPUSpec,
    *,
    device: str,
    params: RooflineParams,
    quick: bool = False,
    kv_cache_gib: float = 16.0,
    log: Any = None,
) -> dict[str, Any]:
    """Measure ``shape`` on ``device`` and price each step on ``gpu``; the report's document."""
    import torch

    from cadenza.sim.calibrate import profile_engine

    start = time.perf_counter()
    engine = build_engine(shape, device, kv_cache_gib)
    built = time.perf_counter() - start
    if log:
        log(f"engine built in {built:.1f} s on {device_name(device)}")
    batches = GPU_DECODE_BATCHES if device != "cpu" else GPU_DECODE_BATCHES[:3]
    samples = profile_engine(engine, quick=quick, decode_batches=batches, warm_up=True)
    roofline = RooflineCost(shape, gpu, params)
    rows = price(samples, roofline)
    busy = gpu_busy(engine, device, roofline)
    links = link_speeds(engine, device)
    return {
        "schema": SCHEMA,
        "meta": {
            "model": shape.name,
            "gpu": gpu.name,
            "device": device,
            "device_name": device_name(device),
            "roofline_params": asdict(params),
            "quick": quick,
            "engine_build_s": built,
            "profile_s": time.perf_counter() - start - built,
            "attention_backend": engine.runner.attention.name,
            "python": platform.python_version(),
            "torch": str(torch.__version__),
        },
        "summary": summarize(rows, params),
        "decode_gpu_busy": busy,
        "links": links and {**links, "modelled_pcie_gbps": gpu.pcie_bytes_per_s / 1e9},
        "steps": rows,
    }


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def add_parser(sub: Any) -> None:
    """Register ``gpu-check`` on ``cadenza simulate``'s subcommands."""
    parser = sub.add_parser(
        "gpu-check",
        help="measure this engine on a CUDA GPU and the roofline's error against it",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument(
        "--gpu", dest="check_gpu", choices=list(GPUS), required=True, help="the GPU it runs on"
    )
    parser.add_argument(
        "--model",
        dest="check_model",
        choices=[m for m in MODELS if m != "smollm2-135m"],
        default="llama-3.1-8b",
        help="model shape, random weights (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default="cuda", help="cuda, cuda:N, or cpu (tests only) (default: cuda)"
    )
    parser.add_argument(
        "--kv-cache-gib",
        dest="check_kv_gib",
        type=float,
        default=16.0,
        metavar="GIB",
        help="device KV pool (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes (about a third)")
    parser.add_argument(
        "--gpu-param",
        dest="check_gpu_param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="roofline parameter to check, e.g. matmul_efficiency=0.7 (repeatable)",
    )
    parser.add_argument("--out-dir", default="docs/benchmarks", help="(default: %(default)s)")
    parser.add_argument("--name", default="sim-gpu-check", help="base name of the result files")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cadenza.sim.gpu_check_report import write_report

    try:
        params = RooflineParams().updated(args.check_gpu_param)
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(
                    "no CUDA device here: gpu-check measures this engine on a GPU (--device"
                    " cpu runs the pipeline only, for tests)"
                )
        elif args.device != "cpu":
            raise ValueError(f"--device must be cuda, cuda:N or cpu; got {args.device!r}")
        shape = model_shape(args.check_model)
        doc = run_check(
            shape,
            GPUS[args.check_gpu],
            device=args.device,
            params=params,
            quick=args.quick,
            kv_cache_gib=args.check_kv_gib,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except ValueError as e:
        print(f"cadenza simulate gpu-check: {e}", file=sys.stderr)
        return 2
    doc["meta"]["command"] = " ".join(["cadenza", "simulate", "gpu-check", *_flags(args)])
    paths = write_report(doc, Path(args.out_dir), args.name)
    for kind, s in doc["summary"].items():
        print(
            f"{kind}: {s['steps']} steps, roofline error median {s['median_abs_error']:.0%}"
            f" (measured / roofline {s['median_measured_over_roofline']:.2f}x)",
            file=sys.stderr,
        )
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def _flags(args: argparse.Namespace) -> list[str]:
    flags = ["--gpu", args.check_gpu, "--model", args.check_model]
    if args.device != "cuda":
        flags += ["--device", args.device]
    if args.quick:
        flags.append("--quick")
    for item in args.check_gpu_param:
        flags += ["--gpu-param", item]
    return flags
