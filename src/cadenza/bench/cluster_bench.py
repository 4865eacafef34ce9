"""`cadenza bench cluster`: routing policies side by side on real workers of one machine.

For each policy (round-robin, sticky, kv-aware, symphony, mell) a fresh ``cadenza serve
--workers N --routing P`` is started (no cache carries over between policies) with a small
device KV pool and a host tier, so where a session's KV is matters. ShareGPT multi-turn
sessions arrive as a Poisson process; before each follow-up the user reads, then types, and
the client posts ``/v1/sessions/{id}/hint`` as typing starts (:mod:`cluster_workload`, with
missing and false hints). Every policy gets the same sessions, the same hints and the same
trial rates until their searches part.

Per policy, :func:`cadenza.bench.load_client.search_rate` finds the highest session rate whose
p90 TTFT stays within the SLO (doubling, then bisection). Each trial takes the next slice of
conversations and a fresh tag in its system prompt, so it cannot hit an earlier trial's cache;
during it the client polls ``/v1/cluster/workers`` (load imbalance over time), and ``/metrics``
is scraped before and after it (migrations, bytes, hint outcomes, routing reasons, prompt
tokens by source, redundant prefill). The report (:mod:`cluster_report`) shows every policy
at its sustainable rate.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from cadenza.bench.cluster_load import LoadSamples, imbalance, outstanding_of, series
from cadenza.bench.cluster_scrape import counters_by_label, diff_metrics, scrape
from cadenza.bench.cluster_turns import e2e_stats, landings, turns_by_worker
from cadenza.bench.cluster_workload import (
    hint_schedules,
    plan_cluster_sessions,
    trial_conversations,
)
from cadenza.bench.load_client import TrialConfig, meets_slo, run_trial, search_rate
from cadenza.bench.serve_bench import (
    ServerProcess,
    SystemSpec,
    _interrupt,
    _loadavg,
    _machine,
    _say,
    free_port,
    sessions_needed,
    thread_env,
)
from cadenza.bench.workloads import Conversation, load_sharegpt

POLICIES = ("round-robin", "sticky", "kv-aware", "symphony", "mell")
SYSTEM_PROMPT = "You are a helpful assistant."
# Bounded KV tiers per worker: 256 device blocks (4,096 tokens) and a host tier four times
# that, no disk tier (its write-through would compete for the two cores).
DEFAULT_SERVER_ARGS = "--num-kv-blocks 256 --host-num-blocks 1024 --kv-disk-gib 0"
STARTUP_ESTIMATE_S = 90.0  # Ray, two workers loading the model, warm-up; and the stop
# The trial settings that --quick changes, at their defaults.
DEFAULTS: dict[str, float] = {
    "duration_s": 90.0,
    "max_trials": 6,
    "hint_lead_s": 11.3,  # SYMPHONY's mean ShareGPT typing time
    "read_mean_s": 5.0,
    "turns_per_session": 4,
    "max_output": 48,
    "start_rate": 0.2,
}
# --quick: a smoke run of two policies, one short trial each (four to five minutes, mostly
# the two servers starting).
QUICK = {
    "duration_s": 20.0,
    "max_trials": 1,
    "hint_lead_s": 3.0,
    "read_mean_s": 2.0,
    "turns_per_session": 3,
    "max_output": 16,
    "start_rate": 0.3,
}
QUICK_POLICIES = "round-robin,symphony"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policies", default=None, help=f"comma-separated, of {', '.join(POLICIES)} (default: all)"
    )
    parser.add_argument("--model", default="smollm2-135m", help="model every worker serves")
    parser.add_argument("--workers", type=int, default=2, help="workers per server")
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument(
        "--backend", default="ray", choices=["ray", "local"], help="--cluster-backend of the server"
    )
    parser.add_argument(
        "--server-args",
        default=DEFAULT_SERVER_ARGS,
        help="extra `cadenza serve` flags (default: %(default)r)",
    )
    parser.add_argument("--data", default=None, help="ShareGPT jsonl(.gz); default: the sample")
    parser.add_argument(
        "--turns-per-session",
        type=int,
        default=DEFAULTS["turns_per_session"],
        help="turns per session at most (%(default)s)",
    )
    parser.add_argument("--max-chars", type=int, default=600, help="truncate each user message")
    parser.add_argument(
        "--max-output",
        type=int,
        default=DEFAULTS["max_output"],
        help="tokens generated per turn (%(default)s)",
    )
    parser.add_argument(
        "--read-mean-s",
        type=float,
        default=DEFAULTS["read_mean_s"],
        help="mean reading time before typing, s (%(default)s)",
    )
    parser.add_argument(
        "--hint-lead-s",
        type=float,
        default=DEFAULTS["hint_lead_s"],
        help="typing time: the hint goes out this long before the turn (0: no hints)",
    )
    parser.add_argument(
        "--hint-slack-s",
        type=float,
        default=10.0,
        help="a hint expires this long after its expected arrival (its ttl_s is lead + slack)",
    )
    parser.add_argument(
        "--missing-hints", type=float, default=0.1, help="fraction of follow-ups sent unhinted"
    )
    parser.add_argument(
        "--false-hints",
        type=float,
        default=0.1,
        help="fraction of sessions that send a hint after their last turn, no turn following",
    )
    parser.add_argument("--slo-ttft-s", type=float, default=2.0, help="p90 TTFT target")
    parser.add_argument(
        "--min-completed",
        type=float,
        default=0.9,
        help="a passing trial also finishes this fraction of the turns it sent",
    )
    parser.add_argument(
        "--duration-s",
        type=float,
        default=DEFAULTS["duration_s"],
        help="sessions start during this long, s (%(default)s)",
    )
    parser.add_argument(
        "--grace-s", type=float, default=None, help="time to finish after (default max(10, 2xSLO))"
    )
    parser.add_argument(
        "--start-rate",
        type=float,
        default=DEFAULTS["start_rate"],
        help="sessions/s of the first trial (%(default)s)",
    )
    parser.add_argument(
        "--max-trials",
        type=int,
        default=DEFAULTS["max_trials"],
        help="trials per policy (%(default)s)",
    )
    parser.add_argument("--growth", type=float, default=2.0, help="rate factor before bisection")
    parser.add_argument(
        "--precision", type=float, default=1.25, help="stop when the bracket is within this"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of arrivals and hints")
    parser.add_argument(
        "--start-timeout-s", type=float, default=300.0, help="how long a server may take to start"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: round-robin and symphony, one 20 s trial each (about 4-5 minutes)",
    )
    parser.add_argument("--out-dir", default="docs/benchmarks", help="where the report goes")
    parser.add_argument("--name", default="cluster", help="base name of the result files")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")
    parser.add_argument(
        "--render-only", default=None, metavar="JSON", help="re-render a previous run's JSON"
    )
    parser.set_defaults(func=run)


def apply_quick(args: argparse.Namespace) -> None:
    """``--quick`` changes the trial settings left at their defaults (and the policies,
    unless given); a flag given explicitly wins."""
    if not args.quick:
        return
    for key, value in QUICK.items():
        if getattr(args, key) == DEFAULTS[key]:
            setattr(args, key, value)
    if args.policies is None:
        args.policies = QUICK_POLICIES


def policy_names(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or ",".join(POLICIES)).split(",") if n.strip()]
    for n in names:
        if n not in POLICIES:
            raise ValueError(f"unknown policy {n!r}; choose from {', '.join(POLICIES)}")
    return names


def grace_of(args: argparse.Namespace) -> float:
    return args.grace_s if args.grace_s is not None else max(10.0, 2 * args.slo_ttft_s)


def hint_ttl_s(args: argparse.Namespace) -> float:
    return args.hint_lead_s + args.hint_slack_s


def trial_estimate_s(args: argparse.Namespace) -> float:
    """Sending, finishing, and waiting for the last false hints to expire (plus a drain)."""
    hints = hint_ttl_s(args) + 1.0 if args.hint_lead_s > 0 else 0.0
    return args.duration_s + max(grace_of(args), hints) + 5.0


def run_estimate_s(args: argparse.Namespace, n_policies: int) -> float:
    return n_policies * (STARTUP_ESTIMATE_S + args.max_trials * trial_estimate_s(args))


# ---------------------------------------------------------------------------------- servers


def server_spec(policy: str, args: argparse.Namespace, port: int, data_dir: Path) -> SystemSpec:
    cmd = [sys.executable, "-m", "cadenza.cli", "serve", "--model", args.model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    cmd += ["--workers", str(args.workers), "--worker-threads", str(args.worker_threads)]
    cmd += ["--routing", policy, "--cluster-backend", args.backend]
    cmd += ["--data-dir", str(data_dir / policy)]
    cmd += shlex.split(args.server_args or "")
    return SystemSpec(
        policy,
        f"cadenza serve --workers {args.workers} --routing {policy}",
        "session",
        cmd,
        env=thread_env(args.worker_threads),
        extra_body={"ignore_eos": True},
        hints=args.hint_lead_s > 0,
    )


def wait_idle(base_url: str, timeout_s: float) -> bool:
    """Poll the workers until nothing is outstanding (cut-off turns are aborted server-side),
    without sending a request of our own that the counters would see."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = httpx.get(f"{base_url}/v1/cluster/workers", timeout=5.0).json().get("data")
            if data is not None and all(outstanding_of(w) == 0 for w in data):
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    return False


# ----------------------------------------------------------------------------------- trials


class PolicyRun:
    """One policy's server and its trials (each on the next slice of conversations)."""

    def __init__(
        self, policy: str, args: argparse.Namespace, convs: Sequence[Conversation], work: Path
    ) -> None:
        self.policy, self.args, self.convs = policy, args, convs
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.spec = server_spec(policy, args, port, work)
        self.server = ServerProcess(self.spec, self.base_url, work / f"{policy}.log")
        self.offset = 0
        self.trials: list[dict[str, Any]] = []

    def trial(self, rate: float) -> bool:
        args = self.args
        index = len(self.trials)
        count = sessions_needed(rate, args.duration_s)
        convs = trial_conversations(self.convs, self.offset, count)
        self.offset += count
        plans = plan_cluster_sessions(
            convs,
            session_rate=rate,
            read_mean_s=args.read_mean_s,
            typing_s=max(args.hint_lead_s, 0.0),
            seed=args.seed + index,
        )
        schedules = hint_schedules(
            plans,
            missing=args.missing_hints,
            false=args.false_hints,
            read_mean_s=args.read_mean_s,
            seed=args.seed + index,
        )
        samples = LoadSamples()
        tag = f"{self.policy}-t{index}-s{args.seed}"
        cfg = TrialConfig(
            base_url=self.base_url,
            model=self.server.model_name or args.model,
            duration_s=args.duration_s,
            grace_s=grace_of(args),
            max_output=args.max_output,
            max_chars=args.max_chars,
            hint_lead_s=max(args.hint_lead_s, 0.0),
            system_prompt=f"[{tag}] {SYSTEM_PROMPT}",
            extra_body=self.spec.extra_body,
            session_prefix=f"cl-{tag}",
            label=f"[{self.policy} @ {rate:.3g}/s]",
            hint_schedules=schedules,
            hint_ttl_s=hint_ttl_s(args) if args.hint_lead_s > 0 else None,
            monitor=samples.poll,
        )
        before = scrape(self.base_url)
        load_before = _loadavg()
        started = time.monotonic()
        raw = run_trial(cfg, plans, progress=not args.no_progress)
        idle = wait_idle(self.base_url, timeout_s=120.0)
        if args.hint_lead_s > 0:  # let unused hints expire, so they are counted as false
            time.sleep(max(0.0, started + trial_estimate_s(args) - 5.0 - time.monotonic()))
        counters = counters_by_label(diff_metrics(before, scrape(self.base_url)))
        summary = raw["summary"]
        summary.update(e2e_stats(raw["turns"]))
        summary.update(loadavg_1m_before=load_before, loadavg_1m_after=_loadavg(), idle=idle)
        passed = meets_slo(summary, args.slo_ttft_s, min_completed=args.min_completed)
        self.trials.append(
            {
                "rate": rate,
                "passed": passed,
                "conversation_offset": self.offset - count,
                "summary": summary,
                "counters": counters,
                "imbalance": imbalance(samples.samples),
                "load_series": series(samples.samples),
                "load_poll_errors": samples.errors,
                "hints_sent": raw.get("hints_sent"),
                "landings": landings(raw["turns"]),
                "turns_by_worker": turns_by_worker(raw["turns"]),
                "turns": raw["turns"],
            }
        )
        _say(trial_line(self.policy, self.trials[-1]))
        return passed

    def run(self) -> dict[str, Any]:
        args = self.args
        result: dict[str, Any] = {
            "name": self.policy,
            "status": "skipped",
            "server_command": shlex.join(self.spec.command),
            "trials": self.trials,
        }
        _say(f"[{self.policy}] starting: {result['server_command']}")
        try:
            started = time.monotonic()
            self.server.start(args.start_timeout_s)
            result["startup_s"] = time.monotonic() - started
            result["warmup_latency_s"] = self.server.probe()
        except (RuntimeError, httpx.HTTPError) as exc:
            self.server.stop()
            result["skip_reason"] = f"server could not be started: {exc}"
            _say(f"[{self.policy}] skipped: {result['skip_reason']}")
            return result
        except BaseException:
            self.server.stop()
            raise
        result["status"] = "ok"
        try:
            best, history = search_rate(
                self.trial,
                start=args.start_rate,
                max_trials=args.max_trials,
                precision=args.precision,
                growth=args.growth,
            )
        finally:
            self.server.stop()
        result["sustainable_rate"] = best
        result["search"] = [{"rate": r, "passed": ok} for r, ok in history]
        return result


def trial_line(policy: str, trial: dict[str, Any]) -> str:
    s, c, land = trial["summary"], trial["counters"], trial["landings"]
    ratio = trial["imbalance"].get("max_over_mean")
    migrations = sum((c.get("cluster_migrations") or {}).values())
    moved_found = land.get("hinted_moved_found_fraction")
    return (
        f"[{policy}] rate {trial['rate']:.3g}/s: p90 TTFT {s['ttft_p90_s']:.2f} s "
        f"({'pass' if trial['passed'] else 'FAIL'}), {s['turns_completed']}/{s['turns_sent']} "
        f"turns, imbalance {_fmt(ratio)}, {migrations:.0f} migrations "
        f"({c.get('cluster_migration_bytes', 0) / 2**20:.1f} MiB), hinted+moved turns with KV "
        f"there {_fmt(moved_found)} of {land.get('hinted_moved')}"
    )


def _fmt(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, float) and math.isfinite(x) else "—"


# ------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    from cadenza.bench.cluster_report import compare, write_cluster_report

    if args.render_only:
        results = json.loads(Path(args.render_only).read_text(encoding="utf-8"))
        paths = write_cluster_report(results, args.out_dir, args.name)
        print("\n".join(str(p) for p in paths.values()))
        return 0
    apply_quick(args)
    names = policy_names(args.policies)
    convs = load_sharegpt(args.data, min_turns=2, max_turns=args.turns_per_session)
    if not convs:
        raise ValueError("no conversations with at least two turns")
    estimate = run_estimate_s(args, len(names))
    _say(
        f"cadenza bench cluster: {', '.join(names)}; {args.workers} workers x "
        f"{args.worker_threads} thread(s); up to {args.max_trials} trials of "
        f"{args.duration_s:g} s each; estimated {estimate / 60:.0f} min"
    )
    command = "cadenza bench cluster " + shlex.join(sys.argv[3:]) if len(sys.argv) > 3 else ""
    results: dict[str, Any] = {
        "meta": {
            "command": command.strip() or "cadenza bench cluster",
            "model": args.model,
            "machine": _machine(args.worker_threads),
            "slo": f"p90 TTFT <= {args.slo_ttft_s:g} s",
            "settings": {
                k: v for k, v in vars(args).items() if k not in ("func", "command", "bench_command")
            },
            "hint_ttl_s": hint_ttl_s(args),
            "conversations_available": len(convs),
            "estimate_s": estimate,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "policies": [],
    }
    work = Path(tempfile.mkdtemp(prefix="cadenza-cluster-bench-"))
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for name in names:
            results["policies"].append(PolicyRun(name, args, convs, work).run())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["meta"]["wall_s"] = time.monotonic() - started
    results["comparison"] = compare(results)
    paths = write_cluster_report(results, args.out_dir, args.name)
    for p in results["policies"]:
        if p["status"] == "ok":
            _say(f"{p['name']}: sustainable {p['sustainable_rate']:.3g} sessions/s")
        else:
            _say(f"{p['name']}: skipped ({p.get('skip_reason')})")
    print("\n".join(str(p) for p in paths.values()))
    return 0
