"""``cadenza simulate speed``: how fast the simulator runs, against workers and requests.

Replays slices of the Mooncake conversation trace (converted as ``cadenza trace convert --from
mooncake`` does) on the simulator and times each run; the headline is the issue's target: one
hour of the trace (every turn) on 16 simulated workers in under 5 minutes of CPU time.

    cadenza simulate speed --input conversation_trace.jsonl --out-dir docs/benchmarks
    cadenza simulate speed --trace my-trace.jsonl --workers 1,2,4 --requests 100,200 --no-headline

Writes ``sim-speed.json``, ``.md`` and ``.png`` (``speed_report``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from cadenza.cluster.placement import POLICY_NAMES
from cadenza.sim.hardware import GPUS
from cadenza.sim.model_shapes import MODELS
from cadenza.sim.speed_run import TARGET_CPU_S, Grid, SpeedPoint, machine, run_grid
from cadenza.sim.trace import TraceTurn

MOONCAKE_RELATIVE = Path("mooncake") / "conversation_trace.jsonl"
MOONCAKE_URL = (
    "https://github.com/kvcache-ai/Mooncake/blob/main/FAST25-release/traces/"
    "conversation_trace.jsonl"
)


def default_input() -> Path:
    """The Mooncake conversation trace in the shared data directory (``$CADENZA_DATA_DIR``,
    else ``<repo>/../shared/data``)."""
    from cadenza.bench.sharegpt_source import default_data_dir

    return default_data_dir() / MOONCAKE_RELATIVE


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_parser(sub: Any) -> None:
    """Register ``speed`` on ``cadenza simulate``'s subcommands."""
    add_arguments(sub.add_parser("speed", help="time the simulator against workers and requests"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        dest="speed_input",
        metavar="FILE",
        default=None,
        help=f"the Mooncake conversation trace (default: <data dir>/{MOONCAKE_RELATIVE})",
    )
    parser.add_argument(
        "--trace",
        dest="speed_trace",
        metavar="FILE",
        default=None,
        help="a session trace to replay instead of converting --input",
    )
    parser.add_argument(
        "--workers",
        dest="speed_workers",
        metavar="N,N,...",
        type=_ints,
        default=(1, 2, 4, 8, 16),
        help="the worker sweep (default 1,2,4,8,16)",
    )
    parser.add_argument(
        "--sweep-requests",
        dest="speed_sweep_requests",
        metavar="N",
        type=int,
        default=500,
        help="turns the worker sweep replays (default 500)",
    )
    parser.add_argument(
        "--requests",
        dest="speed_requests",
        metavar="N,N,...",
        type=_ints,
        default=(250, 500, 1000, 2000, 4000),
        help="the request sweep on 16 workers (default 250,500,1000,2000,4000)",
    )
    parser.add_argument(
        "--no-headline",
        dest="speed_headline",
        action="store_false",
        help="skip the headline run (every turn on 16 workers)",
    )
    parser.add_argument(
        "--routing",
        dest="speed_routing",
        choices=POLICY_NAMES,
        default="kv-aware",
        help="placement policy of every timed run (default: %(default)s)",
    )
    parser.add_argument(
        "--gpu",
        dest="speed_gpu",
        choices=list(GPUS),
        default="A100-80GB",
        help="GPU of each simulated worker (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        dest="speed_model",
        choices=list(MODELS),
        default="llama-3.1-8b",
        help="model shape (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", dest="speed_seed", metavar="N", type=int, default=0, help="simulation seed"
    )
    parser.add_argument(
        "--block-size",
        dest="speed_block_size",
        metavar="N",
        type=int,
        default=16,
        help="tokens per KV block (default: %(default)s, vLLM's; the cost grows with blocks)",
    )
    parser.add_argument(
        "--num-blocks",
        dest="speed_num_blocks",
        metavar="N",
        type=int,
        default=None,
        help="device KV blocks per worker (default: what the GPU holds)",
    )
    parser.add_argument(
        "--out-dir",
        dest="speed_out_dir",
        metavar="DIR",
        default="docs/benchmarks",
        help="where to write (default docs/benchmarks)",
    )
    parser.add_argument(
        "--name", dest="speed_name", metavar="STEM", default="sim-speed", help="file stem"
    )
    parser.set_defaults(func=run)


def load_turns(args: argparse.Namespace) -> tuple[list[TraceTurn], str]:
    """The trace to replay and a description of where it came from; raises FileNotFoundError
    with what to pass when there is none."""
    from cadenza.sim.trace import read_trace

    if args.speed_trace:
        return read_trace(args.speed_trace), f"session trace {args.speed_trace}"
    path = Path(args.speed_input) if args.speed_input else default_input()
    if not path.is_file():
        raise FileNotFoundError(
            f"the Mooncake conversation trace is not at {path}: download it ({MOONCAKE_URL})"
            " and pass --input /path/to/conversation_trace.jsonl (or set CADENZA_DATA_DIR to"
            f" the directory holding {MOONCAKE_RELATIVE}), or pass --trace with a session trace"
        )
    from cadenza.sim.converters.mooncake import convert_mooncake

    return convert_mooncake(path), f"Mooncake conversation trace {path.name}"


def build_doc(
    args: argparse.Namespace,
    turns: list[TraceTurn],
    source: str,
    points: list[SpeedPoint],
    machine_info: dict[str, Any],
) -> dict[str, Any]:
    return {
        "meta": {
            "command": "cadenza simulate speed " + shlex.join(sys.argv[3:])
            if sys.argv[1:3] == ["simulate", "speed"]
            else "cadenza simulate speed",
            "trace": {
                "source": source,
                "turns": len(turns),
                "sessions": len({t.session_id for t in turns}),
            },
            "settings": {
                "routing": args.speed_routing,
                "cost_model": "gpu",
                "gpu": args.speed_gpu,
                "model": args.speed_model,
                "seed": args.speed_seed,
                "num_blocks": args.speed_num_blocks,
                "block_size": args.speed_block_size,
                "sweep_requests": args.speed_sweep_requests,
            },
            "machine": machine_info,
            "target_cpu_s": TARGET_CPU_S,
        },
        "points": [p.to_json() for p in points],
    }


def run(args: argparse.Namespace) -> int:
    from cadenza.sim.setup import SimConfig
    from cadenza.sim.speed_report import headline_text, write_report

    try:
        if args.speed_block_size <= 0:
            raise ValueError(f"--block-size must be positive; got {args.speed_block_size}")
        turns, source = load_turns(args)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"cadenza simulate speed: {e}", file=sys.stderr)
        return 2
    base = SimConfig(
        routing=args.speed_routing,
        cost_model="gpu",
        gpu=args.speed_gpu,
        model=args.speed_model,
        seed=args.speed_seed,
        num_blocks=args.speed_num_blocks,
        block_size=args.speed_block_size,
    )
    grid = Grid(
        workers=args.speed_workers,
        sweep_requests=args.speed_sweep_requests,
        requests=args.speed_requests,
        headline=args.speed_headline,
    )

    def progress(p: SpeedPoint) -> None:
        print(
            f"{p.sweep:>8}: {p.workers:>2} workers, {p.requests:>6,} turns:"
            f" {p.cpu_s:8.1f} s CPU {p.wall_s:8.1f} s wall, {p.events_per_s:,.0f} events/s",
            file=sys.stderr,
            flush=True,
        )

    info = machine()
    points = run_grid(base, turns, grid, progress)
    info["load_average_end"] = machine()["load_average"]
    doc = build_doc(args, turns, source, points, info)
    paths = write_report(doc, Path(args.speed_out_dir), args.speed_name)
    print(headline_text(doc).replace("**", ""), file=sys.stderr)
    print("wrote " + ", ".join(os.fspath(p) for p in paths), file=sys.stderr)
    return 0
