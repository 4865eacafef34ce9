"""``cadenza simulate``: run a session trace on the discrete-event simulator, or calibrate its
CPU cost model on this machine.

    cadenza simulate --trace t.jsonl --out metrics.json --workers 16 --routing symphony \\
        --cost-model gpu --gpu H100 --model llama-3.1-8b --seed 0
    cadenza simulate calibrate --out cal.json
    cadenza simulate --trace t.jsonl --out m.json --cost-model cpu --calibration cal.json
    cadenza simulate gpu-check --gpu H200      # the roofline against this engine on a GPU
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cadenza.cluster.placement import POLICY_NAMES
from cadenza.sim import gpu_check, speed
from cadenza.sim.hardware import GPUS
from cadenza.sim.model_shapes import MODELS
from cadenza.sim.out_path import out_file_problem
from cadenza.sim.repro.cli import add_reproduce_parser
from cadenza.sim.setup import COST_MODELS, SimConfig


def default_calibration_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cadenza" / "sim-cpu-calibration.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cadenza simulate [--trace ...]`` and ``cadenza simulate calibrate``; sets ``func``."""
    d = SimConfig()
    parser.add_argument("--trace", help="a session trace (.jsonl or .jsonl.gz) to run")
    parser.add_argument("--out", help="where to write the metrics JSON (default: stdout)")
    parser.add_argument(
        "--workers", type=int, default=d.workers, help="simulated workers (default: %(default)s)"
    )
    parser.add_argument(
        "--routing",
        choices=POLICY_NAMES,
        default=d.routing,
        help="placement policy (default: %(default)s)",
    )
    parser.add_argument(
        "--cost-model",
        choices=COST_MODELS,
        default=d.cost_model,
        help="cpu: this engine on this machine (calibrated); gpu: a roofline of --model on --gpu"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--gpu",
        choices=list(GPUS),
        default=None,
        help=f"GPU of each worker, with --cost-model gpu (default: {d.gpu})",
    )
    parser.add_argument(
        "--model",
        choices=list(MODELS),
        default=None,
        help="model shape (default: smollm2-135m for cpu, llama-3.1-8b for gpu)",
    )
    for flag, kind, default, text in (
        ("--seed", int, d.seed, "seed of token ids and samples"),
        ("--block-size", int, d.block_size, "tokens per block"),
        ("--host-gib", float, d.host_gib, "host KV tier GiB"),
        ("--disk-gib", float, d.disk_gib, "disk KV tier GiB"),
        ("--max-num-batched-tokens", int, d.max_num_batched_tokens, "step budget"),
        ("--max-num-seqs", int, d.max_num_seqs, "running cap"),
    ):
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default: {default})")
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="device KV blocks per worker (default: fit)"
    )
    parser.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help=f"device KV pool GiB, with --cost-model cpu (default: {d.kv_cache_gib}; gpu: what"
        " the GPU holds)",
    )
    parser.add_argument(
        "--eviction",
        choices=("cost", "lru"),
        default=d.eviction,
        help="device eviction policy of every worker (default: %(default)s)",
    )
    parser.add_argument(
        "--network-gbps", type=float, default=None, help="per-worker network (gpu 100, cpu 10)"
    )
    parser.add_argument(
        "--network-latency-s",
        type=float,
        default=None,
        help="one-way latency of a migration between workers, s (default: per cost model)",
    )
    parser.add_argument(
        "--retention-ttl-s",
        type=float,
        default=d.retention_ttl_s,
        help="KV retention after a turn without tool_s in the trace (default: %(default)s)",
    )
    parser.add_argument(
        "--calibration",
        default=None,
        help="cpu calibration file (default: the one `calibrate` wrote, else built-in)",
    )
    parser.add_argument(
        "--gpu-param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="roofline parameter, e.g. matmul_efficiency=0.5 (repeatable)",
    )
    run_defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    sub = parser.add_subparsers(
        dest="simulate_command", help="subcommands (each has its own --help)"
    )
    cal = sub.add_parser("calibrate", help="fit the cpu cost model to this engine here")
    cal.add_argument(
        "--out", dest="cal_out", default=None, help=f"default: {default_calibration_path()}"
    )
    cal.add_argument(
        "--model",
        dest="cal_model",
        default="smollm2-135m",
        help="the model the engine profiles (default: %(default)s, embedded; other shapes are"
        " priced with --cost-model gpu)",
    )
    cal.add_argument("--num-threads", type=int, default=None, help="torch threads")
    cal.add_argument("--quick", action="store_true", help="fewer shapes (about a third)")
    cal.add_argument(
        "--disk-dir", default=None, help="where to probe disk bandwidth (default: the temp dir)"
    )
    speed.add_parser(sub)  # cadenza simulate speed (sim/speed.py)
    gpu_check.add_parser(sub)  # cadenza simulate gpu-check (sim/gpu_check.py)
    add_reproduce_parser(sub)  # cadenza simulate reproduce NAME
    parser.set_defaults(func=run)
    for command in sub.choices.values():
        command.set_defaults(func=_refusing_run_flags(command.get_default("func"), run_defaults))


def _refusing_run_flags(
    func: Callable[[argparse.Namespace], int] | None, run_defaults: dict[str, object]
) -> Callable[[argparse.Namespace], int]:
    """A subcommand's entry point that first refuses the run's flags given before it
    (``cadenza simulate --seed 5 speed``): the subcommand has its own, and would ignore them."""
    target = func or run

    @functools.wraps(target)
    def guarded(args: argparse.Namespace) -> int:
        given = [
            "--" + dest.replace("_", "-")
            for dest, default in run_defaults.items()
            if getattr(args, dest, default) != default
        ]
        if given:
            print(
                f"cadenza simulate {args.simulate_command}: {', '.join(given)} belong(s) to"
                f" `cadenza simulate --trace`; put the subcommand's own flags after"
                f" {args.simulate_command!r} (see its --help)",
                file=sys.stderr,
            )
            return 2
        return target(args)

    return guarded


def _config(args: argparse.Namespace) -> SimConfig:
    if args.gpu is not None and args.cost_model != "gpu":
        raise ValueError(
            f"--gpu {args.gpu} prices steps on a GPU: add --cost-model gpu (the default cost"
            f" model, cpu, is this engine on this machine)"
        )
    if args.kv_cache_gib is not None and args.cost_model != "cpu":
        raise ValueError(
            "--kv-cache-gib sizes the cpu cost model's pool; with --cost-model gpu the pool is"
            " what --gpu holds (set it with --num-blocks or --gpu-param memory_utilization=...)"
        )
    calibration = args.calibration
    if calibration is None and args.cost_model == "cpu" and default_calibration_path().exists():
        calibration = str(default_calibration_path())
    return SimConfig(
        workers=args.workers,
        routing=args.routing,
        cost_model=args.cost_model,
        gpu=args.gpu or SimConfig.gpu,
        model=args.model,
        seed=args.seed,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_gib=args.kv_cache_gib if args.kv_cache_gib is not None else SimConfig.kv_cache_gib,
        host_gib=args.host_gib,
        disk_gib=args.disk_gib,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        eviction=args.eviction,
        network_gbps=args.network_gbps,
        network_latency_s=args.network_latency_s,
        retention_ttl_s=args.retention_ttl_s,
        calibration=calibration,
        gpu_params=tuple(args.gpu_param),
    )


def run(args: argparse.Namespace) -> int:
    if args.simulate_command == "calibrate":
        return _calibrate(args)
    if not args.trace:
        print(
            "cadenza simulate: --trace FILE is required (or: cadenza simulate calibrate)",
            file=sys.stderr,
        )
        return 2
    from cadenza.sim.metrics import dumps_metrics
    from cadenza.sim.simulator import simulate
    from cadenza.sim.trace import read_trace

    try:
        problem = out_file_problem(args.out) if args.out else None
        if problem is not None:
            raise ValueError(problem)
        config = _config(args)
        turns = read_trace(args.trace)
        start = time.perf_counter()
        metrics = simulate(config, turns)
    except (ValueError, OSError) as e:
        print(f"cadenza simulate: {e}", file=sys.stderr)
        return 2
    text = dumps_metrics(metrics)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        wall = time.perf_counter() - start
        print(
            f"simulated {metrics['turns']} of {len(turns)} turns{_not_run(metrics)} over"
            f" {metrics['duration_s']:.1f} virtual s in {wall:.1f} s; mean TTFT"
            f" {metrics['ttft_s']['mean']:.3f} s; metrics in {args.out}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
    return 0


def _not_run(metrics: dict) -> str:
    n = metrics["rejected_turns"]
    if not n:
        return ""
    return f" ({n} not run: a turn longer than the context or the KV pool ends its session)"


def _calibrate(args: argparse.Namespace) -> int:
    from cadenza.sim.calibrate import calibrate, write_calibration

    out = args.cal_out or default_calibration_path()
    problem = out_file_problem(out)
    if problem is None and args.disk_dir is not None and not Path(args.disk_dir).is_dir():
        problem = f"--disk-dir {args.disk_dir} is not a directory"
    if problem is not None:
        print(f"cadenza simulate calibrate: {problem}", file=sys.stderr)
        return 2
    calibration, machine = calibrate(
        args.cal_model, num_threads=args.num_threads, quick=args.quick, disk_dir=args.disk_dir
    )
    path = write_calibration(out, calibration, machine)
    c = calibration
    print(
        f"{c.num_samples} steps: {c.describe()} (median error {c.median_rel_error:.0%});"
        f" memcpy {c.memcpy_bytes_per_s / 1e9:.1f} GB/s, disk read"
        f" {c.disk_read_bytes_per_s / 1e9:.1f} / write {c.disk_write_bytes_per_s / 1e9:.1f} GB/s;"
        f" written to {path}"
    )
    return 0
