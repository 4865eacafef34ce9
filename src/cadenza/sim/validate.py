"""``cadenza bench sim-validation``: the CPU-calibrated simulator against the real engine.

    cadenza bench sim-validation                      # calibrate, 3 traces x 2 loads x 1|2 workers
    cadenza bench sim-validation --quick --out-dir /tmp/simval-quick
    cadenza bench sim-validation --calibration cal.json --data sharegpt.jsonl.gz

In one session on this machine: (i) calibrate the CPU cost model (``cadenza simulate
calibrate``'s profiling and fit; or take ``--calibration``), (ii) for each trace
(``validate_traces``: ShareGPT-like chat with hints, chat with exponential think times and no
hints, agents with tool calls) at each load, run it on the real engine
(``bench.trace_replay``: one engine, and the cluster router over in-process workers) and on
the simulator with the same settings and seed, (iii) compare mean and p90 TTFT, mean
end-to-end latency, throughput, cached tokens by tier and migrations (``validate_errors``),
explain the misses (``validate_diagnose``) and write ``sim-validation.json|md|png``
(``validate_report``).

The machine's speed drifts (the cores are shared): with ``--drift-probe`` (the default) a fixed
workload is timed right after the calibration and again before each real run, and that run's
simulation is priced at the calibration scaled by the ratio (``validate_drift``).

Calibration under the cluster's own conditions: the 2-worker cluster runs its workers as
threads of one process on the same cores, so with ``--cluster-calibration contention`` (the
default) the cluster's cost model is the single engine's scaled by the slowdown measured with
as many engines stepping at once (``validate_contention``), weighted by how busy the
simulation finds the neighbours (``validate_runs``). ``shared`` uses the single engine's
calibration for every worker count.

The real runs dominate the time (they take as long as the traces' arrivals plus the answers);
``--quick`` shrinks everything to a few minutes. Torch is imported only inside the real runs
and the calibration, as the calibration command does.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from cadenza.sim.trace import summarize
from cadenza.sim.validate_contention import Contention
from cadenza.sim.validate_drift import ROUNDS, Drift, SpeedProbe
from cadenza.sim.validate_errors import compare
from cadenza.sim.validate_errors import summarize as summarize_errors
from cadenza.sim.validate_runs import MODEL, calibrate_base, probe_contention, run_entry, run_pair
from cadenza.sim.validate_traces import KINDS, Shrink, TraceSpec, make_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out-dir", default="docs/benchmarks", help="where the JSON, markdown and plot go"
    )
    parser.add_argument("--name", default="sim-validation", help="base name of the result files")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test of a few minutes: quick calibration and contention probe, the agents"
        " trace at one load, 5 sessions of at most 3 turns, on 1 and 2 workers",
    )
    parser.add_argument(
        "--calibration",
        default=None,
        help="a `cadenza simulate calibrate` file to use instead of calibrating now",
    )
    parser.add_argument(
        "--cluster-calibration",
        choices=("contention", "shared"),
        default="contention",
        help="cost model of multi-worker runs: the single engine's scaled by the measured "
        "slowdown of that many engines stepping at once (contention), or the single "
        "engine's as is (shared) (default: %(default)s)",
    )
    parser.add_argument(
        "--data", default=None, help="ShareGPT file for the chat traces (default: made-up chats)"
    )
    parser.add_argument(
        "--traces",
        default=",".join(KINDS),
        help=f"trace kinds, comma-separated, of {', '.join(KINDS)} (default: all)",
    )
    parser.add_argument(
        "--rates", default="0.4,0.8", help="loads: sessions started per second, comma-separated"
    )
    parser.add_argument("--sessions", type=int, default=10, help="sessions per trace")
    parser.add_argument("--max-turns", type=int, default=4, help="turns per session at most")
    parser.add_argument("--max-input", type=int, default=48, help="new tokens per turn at most")
    parser.add_argument("--max-output", type=int, default=12, help="reply tokens at most")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.1,
        help="every time of the converted traces (think, tool, hint lead) times this",
    )
    parser.add_argument(
        "--workers", default="1,2", help="worker counts, comma-separated (>1: the cluster)"
    )
    parser.add_argument(
        "--routing", default="symphony", help="the cluster's placement policy (both sides)"
    )
    parser.add_argument(
        "--num-blocks", type=int, default=40, help="device KV blocks per worker (both sides)"
    )
    parser.add_argument(
        "--host-gib", type=float, default=0.03, help="host KV tier GiB per worker (both sides)"
    )
    parser.add_argument(
        "--disk-gib", type=float, default=0.5, help="disk KV tier GiB per worker (both sides)"
    )
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=512, help="step token budget (both sides)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=16, help="running cap (both sides)")
    parser.add_argument(
        "--drift-probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time a fixed workload right after the calibration and again before each real"
        " run, and price that run's simulation at the calibration times the ratio: the"
        " machine's speed drifts on shared cores (default: on)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    parser.add_argument("--seed", type=int, default=0, help="seed of traces and token ids")
    parser.set_defaults(func=run)


def _csv(text: str, kind: type = str) -> list[Any]:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def _log(message: str) -> None:
    print(f"[sim-validation] {message}", file=sys.stderr, flush=True)


def specs(args: argparse.Namespace) -> list[TraceSpec]:
    shrink = Shrink(args.max_input, args.max_output, args.time_scale)
    kinds = _csv(args.traces)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown trace kind(s) {unknown}; choose from {list(KINDS)}")
    return [
        TraceSpec(kind, args.sessions, rate, args.max_turns, args.seed, shrink)
        for kind in kinds
        for rate in _csv(args.rates, float)
    ]


def apply_quick(args: argparse.Namespace) -> argparse.Namespace:
    """``--quick``: the defaults shrunk (flags the user set explicitly are kept)."""
    defaults = {"traces": ",".join(KINDS), "rates": "0.4,0.8", "sessions": 10, "max_turns": 4}
    quick = {"traces": "agents", "rates": "0.8", "sessions": 5, "max_turns": 3}
    for key, value in quick.items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)
    return args


def run_validation(args: argparse.Namespace) -> dict[str, Any]:
    from cadenza.bench.trace_replay import TraceReplayConfig
    from cadenza.model.source import load_model_source
    from cadenza.sim.cpu_cost import load_calibration

    out_dir = Path(args.out_dir)
    workers = _csv(args.workers, int)
    started = time.perf_counter()
    calibration = args.calibration or calibrate_base(
        out_dir / f"{args.name}.calibration.json",
        threads=args.threads,
        quick=args.quick,
        log=_log,
    )
    contention: dict[int, Contention] = {}
    if args.cluster_calibration == "contention":
        for n in workers:
            if n > 1:
                contention[n] = probe_contention(
                    n, threads=args.threads, rounds=1 if args.quick else 2, log=_log
                )
    probe = reference = None
    if args.drift_probe:
        probe = SpeedProbe(MODEL, threads=args.threads, rounds=1 if args.quick else ROUNDS)
        reference = probe.read()
        _log(
            f"drift probe reference: prefill step {reference.prefill_s * 1e3:.0f} ms,"
            f" decode step {reference.decode_s * 1e3:.1f} ms"
        )
    source = load_model_source(MODEL)
    base = TraceReplayConfig(
        model=MODEL,
        routing=args.routing,
        seed=args.seed,
        num_blocks=args.num_blocks,
        host_gib=args.host_gib,
        disk_gib=args.disk_gib,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        threads=args.threads,
    )
    runs: list[dict[str, Any]] = []
    traces: dict[str, str] = {}
    for spec in specs(args):
        turns = make_trace(spec, args.data)
        traces[spec.name] = summarize(turns).format()
        for n in workers:
            config = replace(base, workers=n)
            t0 = time.perf_counter()
            drift = None
            if probe is not None and reference is not None:
                drift = Drift(reference, probe.read())
            real, simulated, extra = run_pair(
                turns, config, calibration, contention.get(n), source, drift
            )
            entry = run_entry(spec, n, real, simulated, extra)
            missed = [c["metric"] for c in entry["cells"] if not c["within"]]
            speed = (
                f" at prefill x{drift.prefill_factor:.2f}, decode x{drift.decode_factor:.2f};"
                if drift is not None
                else ";"
            )
            _log(
                f"{spec.name} x{n}: {len(turns)} turns in {time.perf_counter() - t0:.0f} s{speed}"
                f" TTFT mean {real['ttft_s']['mean']:.3f} real / "
                f"{simulated['ttft_s']['mean']:.3f} sim; missed: {', '.join(missed) or 'none'}"
            )
            runs.append(entry)
    if probe is not None:
        probe.close()
    cells_by_run = [compare(r["real"], r["simulated"]) for r in runs]
    meta = {
        "command": " ".join(["cadenza", *sys.argv[1:]]),
        "model": MODEL,
        "quick": args.quick,
        "calibration": load_calibration(calibration).to_json(),
        "calibration_file": calibration,
        "calibration_source": "given" if args.calibration else "calibrated in this run",
        "cluster_calibration": args.cluster_calibration,
        "drift_reference": reference.to_json() if reference is not None else None,
        "contention": {str(n): c.to_json() for n, c in contention.items()},
        "settings": {
            "device blocks": args.num_blocks,
            "host GiB": args.host_gib,
            "disk GiB": args.disk_gib,
            "step token budget": args.max_num_batched_tokens,
            "running cap": args.max_num_seqs,
            "torch threads": args.threads,
            "routing": args.routing,
            "cluster backend": "local",
            "seed": args.seed,
        },
        "traces": traces,
        "wall_s": time.perf_counter() - started,
        "notes": NOTES,
    }
    return {"meta": meta, "runs": runs, "summary": summarize_errors(cells_by_run)}


NOTES = [
    "**Known causes of error, in general.** (1) The machine: the real runs share two cores"
    " with whatever else runs, so a step's time drifts from the calibration; the cluster's"
    " workers also contend with each other and with the router and client (one process, one"
    " GIL) — `--cluster-calibration contention` scales the cluster's cost model by the"
    " probed slowdown of engines stepping at once, weighted by how busy the simulation says"
    " the neighbours were; the interpolation is linear and the probe's workload is not the"
    " trace's. (2) Step"
    " boundaries: a real engine takes a new request between steps and the client sees a"
    " token after the step that made it plus a thread hand-off; the simulator submits at"
    " arrival. (3) Migrations: a real in-process move runs on both workers' engine threads"
    " between their steps; the simulator prices a network link only. (4) Small counts: host"
    " and disk hits and migrations are a handful per run, so one block or one move is a"
    " large relative error.",
]


def run(args: argparse.Namespace) -> int:
    from cadenza.sim.validate_report import write_report

    if args.quick:
        apply_quick(args)
    doc = run_validation(args)
    paths = write_report(doc, args.out_dir, args.name)
    summary = doc["summary"]
    within = sum(s["within"] for s in summary.values())
    total = sum(s["runs"] for s in summary.values())
    _log(
        f"{within}/{total} cells within target in {doc['meta']['wall_s']:.0f} s; wrote "
        + ", ".join(str(p) for p in paths.values())
    )
    return 0
