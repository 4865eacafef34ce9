"""``cadenza bench agents``: agent programs over HTTP, sessions against resending the history.

The workload is synthetic agent programs (:mod:`cadenza.sim.converters.agents`, scaled by
:func:`cadenza.bench.agents_workload.bench_workload`) or any session trace (``--trace``, e.g.
recorded SWE-agent trajectories converted by :mod:`cadenza.sim.converters.swe_agent`), run
closed loop by :mod:`cadenza.bench.agents_client` against three servers:

* ``sessions`` (a): ``cadenza serve`` as shipped (host and disk tiers on), the programs chained
  through the Responses API (``previous_response_id``, only the new input sent);
* ``resend`` (b): ``cadenza serve --kv-host-gib 0 --kv-disk-gib 0``, the whole history resent
  to ``/v1/chat/completions`` every step: a device-only prefix cache, vLLM's default setup;
* ``no-cache`` (c): as (b) with ``--no-enable-prefix-caching``: every step recomputes.

Each at a device KV pool (``--num-kv-blocks``) of 100%, 50% and 25% of the live KV (see
:mod:`cadenza.bench.agents_workload`), each trial on a fresh server with its own data
directory, trials ordered pool by pool so the modes compared at one pool run close together.
Every trial runs the same programs with the same text and reply lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from cadenza.bench.agents_client import AgentTrialConfig, run_agents
from cadenza.bench.agents_summary import summarize_agents_trial
from cadenza.bench.agents_workload import (
    LiveKV,
    PoolPlan,
    Program,
    bench_workload,
    generate_programs,
    live_kv,
    programs_from_trace,
)
from cadenza.bench.cluster_scrape import diff_metrics, scrape
from cadenza.bench.serve_bench import (
    ServerProcess,
    SystemSpec,
    _interrupt,
    _loadavg,
    free_port,
    thread_env,
)
from cadenza.bench.serve_bench import _say as say
from cadenza.sim.trace import read_trace, write_trace

MODES = ("sessions", "resend", "no-cache")
MODE_LABELS = {
    "sessions": "(a) sessions: Responses chain, tiers on",
    "resend": "(b) history resent, device-only prefix cache",
    "no-cache": "(c) history resent, no prefix cache",
}
POOLS = (100, 50, 25)
BLOCK_SIZE = 16


def _range(kind: type) -> Any:
    def parse(text: str) -> tuple[Any, Any]:
        parts = [kind(x) for x in text.split(",")]
        if len(parts) != 2 or parts[0] > parts[1]:
            raise argparse.ArgumentTypeError(f"expected LOW,HIGH with LOW <= HIGH, got {text!r}")
        return parts[0], parts[1]

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model every server serves")
    parser.add_argument(
        "--trace",
        default=None,
        help="run this session trace's sessions as the programs (the generator flags and "
        "--programs are then unused; arrival times are ignored: the loop is closed)",
    )
    parser.add_argument("--programs", type=int, default=12, help="agent programs per trial")
    parser.add_argument("--concurrency", type=int, default=6, help="programs running at once")
    ints, floats = _range(int), _range(float)
    parser.add_argument("--steps", type=ints, default=(6, 10), help="LLM steps per program")
    parser.add_argument("--system-prompt-tokens", type=int, default=600, help="shared prefix")
    parser.add_argument("--task-tokens", type=ints, default=(100, 300), help="first input")
    parser.add_argument(
        "--observation-tokens", type=ints, default=(100, 600), help="tool outputs (log-uniform)"
    )
    parser.add_argument("--reply-tokens", type=ints, default=(32, 64), help="exact reply sizes")
    parser.add_argument("--tool-median-s", type=float, default=2.0, help="lognormal median")
    parser.add_argument("--tool-s-range", type=floats, default=(1.0, 4.0), help="tool clip")
    parser.add_argument("--seed", type=int, default=0, help="seed of the program generator")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument(
        "--pools", default=",".join(map(str, POOLS)), help="device pools, percent of live KV"
    )
    parser.add_argument("--threads", type=int, default=2, help="threads of every server")
    parser.add_argument(
        "--trial-timeout-s", type=float, default=420.0, help="bound on one trial's programs"
    )
    parser.add_argument(
        "--start-timeout-s",
        type=float,
        default=300.0,
        help="how long a server may take to start, s (default: %(default)s)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=0.15,
        help="at the 100%% pool, (a) may be this fraction worse than (b) and still pass",
    )
    parser.add_argument("--sessions-args", default="", help="extra `cadenza serve` flags for (a)")
    parser.add_argument(
        "--baseline-args", default="", help="extra `cadenza serve` flags for (b) and (c)"
    )
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    parser.add_argument("--out-dir", default="docs/benchmarks", help="where results go")
    parser.add_argument("--name", default=None, help="file stem (default: agents[-quick])")
    parser.add_argument(
        "--no-progress", action="store_true", help="no live progress line on stderr"
    )
    parser.add_argument(
        "--render-only", default=None, metavar="JSON", help="re-render a previous run's JSON"
    )
    parser.set_defaults(func=run)


def apply_quick(args: argparse.Namespace) -> None:
    """Shrink everything for a smoke run of a few minutes (two pools unless --pools is set)."""
    args.programs, args.concurrency = 4, 4
    args.steps, args.system_prompt_tokens = (2, 3), 200
    args.task_tokens, args.observation_tokens = (40, 80), (40, 120)
    args.reply_tokens, args.tool_median_s, args.tool_s_range = (8, 12), 0.5, (0.2, 1.0)
    args.trial_timeout_s = min(args.trial_timeout_s, 40.0)
    if args.pools == ",".join(map(str, POOLS)):
        args.pools = "100,25"


def parse_modes(text: str) -> list[str]:
    modes = [x.strip() for x in text.split(",") if x.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"--modes must be a list of {', '.join(MODES)}, got {text!r}")
    return modes


def parse_pools(text: str) -> list[int]:
    pools = [int(x) for x in text.split(",") if x.strip()]
    if not pools or any(p <= 0 for p in pools):
        raise ValueError(f"--pools must be positive percentages, got {text!r}")
    return pools


def load_programs(args: argparse.Namespace) -> tuple[list[Any], list[Program]]:
    if args.trace:
        turns = read_trace(args.trace)
        return turns, programs_from_trace(turns)
    workload = bench_workload(
        programs=args.programs,
        steps=args.steps,
        system_prompt_tokens=args.system_prompt_tokens,
        task_tokens=args.task_tokens,
        observation_tokens=args.observation_tokens,
        reply_tokens=args.reply_tokens,
        tool_median_s=args.tool_median_s,
        tool_s_range=args.tool_s_range,
        seed=args.seed,
    )
    return generate_programs(workload)


def server_spec(
    mode: str, args: argparse.Namespace, port: int, data_dir: Path, pool: PoolPlan
) -> SystemSpec:
    """How to start the server of ``mode`` at ``pool``."""
    cmd = [sys.executable, "-m", "cadenza.cli", "serve", "--model", args.model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--num-threads", str(args.threads)]
    cmd += ["--data-dir", str(data_dir), "--log-level", "warning"]
    cmd += ["--profile-cache-dir", str(data_dir.parent / "profiles")]
    cmd += ["--num-kv-blocks", str(pool.blocks)]
    if mode == "sessions":
        cmd += shlex.split(args.sessions_args or "")
    else:
        cmd += ["--kv-host-gib", "0", "--kv-disk-gib", "0"]
        if mode == "no-cache":
            cmd.append("--no-enable-prefix-caching")
        cmd += shlex.split(args.baseline_args or "")
    api = "session" if mode == "sessions" else "stateless"
    return SystemSpec(mode, MODE_LABELS[mode], api, cmd, env=thread_env(args.threads))


def run_trial(
    mode: str, pool: PoolPlan, args: argparse.Namespace, programs: list[Program], work: Path
) -> dict[str, Any]:
    """One (mode, pool) trial on a fresh server."""
    port = free_port()
    data_dir = work / f"{mode}-{pool.percent}"
    spec = server_spec(mode, args, port, data_dir, pool)
    trial: dict[str, Any] = {
        "mode": mode,
        "pool": asdict(pool),
        "status": "skipped",
        "server_command": shlex.join(spec.command),
    }
    server = ServerProcess(spec, f"http://127.0.0.1:{port}", work / f"{mode}-{pool.percent}.log")
    label = f"[{mode} @ {pool.percent}%]"
    say(f"{label} starting server ({pool.blocks} device blocks)")
    try:
        started = time.monotonic()
        server.start(args.start_timeout_s)
        trial["startup_s"] = time.monotonic() - started
        for _ in range(2):
            server.probe()
        before = scrape(server.base_url)
        cfg = AgentTrialConfig(
            base_url=server.base_url,
            model=server.model_name or args.model,
            api="responses" if mode == "sessions" else "chat",
            concurrency=args.concurrency,
            timeout_s=args.trial_timeout_s,
            label=label,
            progress=not args.no_progress,
        )
        trial["loadavg_before"] = _loadavg()
        raw = run_agents(cfg, programs)
        trial["loadavg_after"] = _loadavg()
        diff = diff_metrics(before, scrape(server.base_url))
    except (RuntimeError, httpx.HTTPError) as exc:
        trial["skip_reason"] = f"{type(exc).__name__}: {exc}"
        say(f"{label} skipped: {trial['skip_reason']}")
        return trial
    finally:
        server.stop()
    trial.update(status="ok", summary=summarize_agents_trial(raw, diff), **raw)
    s = trial["summary"]
    say(
        f"{label} p90 TTFT {s['ttft_p90_s']:.2f} s, mean JCT {s['jct_mean_s']:.1f} s, "
        f"{s['jobs_finished']}/{s['jobs']} jobs, cached {100 * s['cached_fraction']:.0f}%, "
        f"outside engine {1000 * s['outside_engine_s']:.0f} ms/step"
    )
    return trial


def estimate_s(args: argparse.Namespace, trials: int) -> float:
    """An upper bound on the run: every trial at its bound, plus a server start each."""
    return trials * (args.trial_timeout_s + 30.0)


def machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads_per_server": threads,
        "python": platform.python_version(),
        "torch": torch_version,
    }


def run(args: argparse.Namespace) -> int:
    from cadenza.bench.agents_report import write_agents_report

    name = args.name or ("agents-quick" if args.quick else "agents")
    if args.render_only:
        results = json.loads(Path(args.render_only).read_text(encoding="utf-8"))
        print("\n".join(str(p) for p in write_agents_report(results, args.out_dir, name).values()))
        return 0
    if args.quick:
        apply_quick(args)
    modes = parse_modes(args.modes)
    pools = parse_pools(args.pools)
    turns, programs = load_programs(args)
    live = live_kv(programs, args.concurrency, BLOCK_SIZE)
    plans = [live.pool(p) for p in pools]
    say(describe_live(live, plans))
    trials = len(modes) * len(plans)
    say(f"{trials} trials; at most ~{estimate_s(args, trials) / 60:.0f} min")
    out_dir = Path(args.out_dir)
    trace_path = write_trace(out_dir / f"{name}-trace.jsonl", turns)
    results: dict[str, Any] = {
        "meta": {
            "command": "cadenza bench agents " + shlex.join(sys.argv[3:]),
            "model": args.model,
            "machine": machine(args.threads),
            "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
            "trace": str(trace_path),
            "programs": len(programs),
            "steps": sum(len(p.steps) for p in programs),
            "live_kv": {**asdict(live), "blocks": live.blocks, "floor_blocks": live.floor_blocks},
            "pools": [asdict(p) for p in plans],
            "noise": args.noise,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "trials": [],
    }
    work = Path(tempfile.mkdtemp(prefix="cadenza-agents-bench-"))
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    paths: dict[str, Path] = {}
    try:
        for plan in plans:
            for mode in modes:
                results["trials"].append(run_trial(mode, plan, args, programs, work))
                results["meta"]["wall_s"] = time.monotonic() - started
                # After every trial: a run stopped part way keeps what it measured.
                paths = write_agents_report(results, out_dir, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(str(p) for p in paths.values()))
    return 0


def describe_live(live: LiveKV, plans: list[PoolPlan]) -> str:
    lines = [
        f"live KV: {live.concurrency} programs x {live.mean_final_tokens:.0f} tokens mean final "
        f"context / {live.block_size} = {live.blocks} blocks (longest program "
        f"{live.max_final_tokens} tokens: floor {live.floor_blocks} blocks)"
    ]
    for p in plans:
        floor = f" (floored from {p.target_blocks})" if p.floored else ""
        lines.append(f"  pool {p.percent}%: {p.blocks} blocks{floor}")
    return "\n".join(lines)
