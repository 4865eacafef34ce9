"""`cadenza bench serve`: multi-turn chat load over HTTP against Cadenza and three baselines.

Each system is started as a subprocess on its own port, one at a time, on the same model
(SmolLM2-135M-Instruct from the same GGUF) with the same thread count:

* ``cadenza`` — ``cadenza serve``; clients use ``X-Session-Id`` and send only the new message
  (the server keeps the history and its KV); with ``--hint-lead-s`` they also post
  ``/v1/sessions/{id}/hint`` before each follow-up;
* ``cadenza-stateless`` — ``cadenza serve --no-enable-prefix-caching``; clients resend the whole
  history and every turn recomputes it (same engine, no reuse);
* ``hf`` — :mod:`cadenza.bench.hf_server`, a plain transformers server (``model.generate``,
  one request at a time, stateless);
* ``llama.cpp`` — ``python -m llama_cpp.server`` (llama-cpp-python) with its prompt cache on,
  from a separate virtual environment (``make bench-serve`` builds it); clients resend the
  history. llama.cpp runs the GGUF's Q4_1 weights as they are (its quantized kernels), while
  the other three run them dequantized to float32.

For each system the benchmark searches for the **highest session rate whose p90 time to first
token is within the SLO** (:func:`cadenza.bench.load_client.search_rate`: doubling, then
bisection, at most ``--max-trials`` trials of ``--duration-s`` each). Every trial replays the
same ShareGPT conversations with the same random draws at its rate (so systems compare at equal
rates on identical work), and puts a fresh random tag at the start of the system prompt, so no
trial is served from a cache that an earlier trial filled. Output lengths are fixed
(``ignore_eos``, or an EOS logit bias for llama.cpp) so every system generates the same tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cadenza.bench.load_client import TrialConfig, meets_slo, run_trial, search_rate
from cadenza.bench.workloads import Conversation, load_sharegpt, plan_sessions

SYSTEMS = ("cadenza", "cadenza-stateless", "hf", "llama.cpp")
_REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_LLAMACPP_PYTHON = _REPO_ROOT / "build" / "llamacpp-venv" / "bin" / "python"
SYSTEM_PROMPT = "You are a helpful assistant."
# SmolLM2's end-of-turn and end-of-text tokens; llama.cpp gets them as a logit bias (it has no
# ignore_eos in its OpenAI API), the others get `ignore_eos`.
_SMOLLM2_EOS_IDS = (0, 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model every server serves")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}"
    )
    parser.add_argument("--data", default=None, help="ShareGPT jsonl(.gz); default: the sample")
    parser.add_argument(
        "--min-turns", type=int, default=2, help="use conversations with at least this many turns"
    )
    parser.add_argument("--max-turns", type=int, default=6, help="turns replayed per session")
    parser.add_argument("--max-chars", type=int, default=600, help="truncate each user message")
    parser.add_argument("--max-output", type=int, default=64, help="tokens generated per turn")
    parser.add_argument("--think-mean", type=float, default=5.0, help="seconds between turns")
    parser.add_argument("--slo-ttft-s", type=float, default=2.0, help="p90 TTFT target")
    parser.add_argument(
        "--min-completed",
        type=float,
        default=0.9,
        help="a passing trial also finishes this fraction of the turns it sent by its deadline",
    )
    parser.add_argument(
        "--slo-tpot-s", type=float, default=None, help="optional p90 TPOT target (default: none)"
    )
    parser.add_argument(
        "--duration-s", type=float, default=40.0, help="sessions start during this long"
    )
    parser.add_argument(
        "--min-sessions",
        type=int,
        default=6,
        help="low rates get longer trials, up to --max-duration-s, to start this many sessions",
    )
    parser.add_argument(
        "--max-duration-s", type=float, default=60.0, help="the longest a trial may start sessions"
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        default=None,
        help="after the last turn is sent, how long outstanding turns may finish "
        "(default: max(10, 2 x SLO))",
    )
    parser.add_argument(
        "--start-rate",
        default="0.05",
        help="sessions/s of the first trial, the same for every system (default %(default)s); "
        "auto: from the latency of one turn (the rate that would keep a one-request-at-a-time "
        "server 60%% busy; sensitive to other load on the machine)",
    )
    parser.add_argument("--max-trials", type=int, default=5, help="trials per system")
    parser.add_argument(
        "--growth", type=float, default=3.0, help="rate factor per step before bisection"
    )
    parser.add_argument(
        "--precision", type=float, default=1.25, help="stop when the bracket is within this"
    )
    parser.add_argument(
        "--rates", default=None, help="comma-separated fixed rates instead of the search"
    )
    parser.add_argument("--hint-lead-s", type=float, default=0.0, help="cadenza only; 0 = off")
    parser.add_argument("--threads", type=int, default=2, help="threads of every server")
    parser.add_argument(
        "--cadenza-args",
        default="",
        help="extra `cadenza serve` flags for both Cadenza systems, e.g. '--kv-disk-gib 0'",
    )
    parser.add_argument("--n-ctx", type=int, default=4096, help="llama.cpp context")
    parser.add_argument(
        "--llamacpp-python",
        default=str(DEFAULT_LLAMACPP_PYTHON),
        help="python of the venv with llama-cpp-python[server] (make llamacpp)",
    )
    parser.add_argument(
        "--start-timeout-s", type=float, default=300.0, help="how long a server may take to start"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    parser.add_argument(
        "--out-dir", default="docs/benchmarks", help="where the JSON, markdown and plot go"
    )
    parser.add_argument("--name", default="serve", help="base name of the result files")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")
    parser.add_argument(
        "--render-only",
        default=None,
        metavar="JSON",
        help="rewrite the markdown and plot from a previous run's JSON; run nothing",
    )
    parser.set_defaults(func=run)


# ------------------------------------------------------------------------------- servers


@dataclass
class SystemSpec:
    name: str
    description: str
    mode: str  # session | stateless (how the client talks to it)
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)
    hints: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def thread_env(threads: int) -> dict[str, str]:
    n = str(threads)
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "TOKENIZERS_PARALLELISM": "false",
    }


def system_spec(name: str, args: argparse.Namespace, port: int, data_dir: Path) -> SystemSpec:
    """How to start ``name`` on ``port`` (raises ``FileNotFoundError`` if it cannot be)."""
    py = sys.executable
    t = str(args.threads)
    host = ["--host", "127.0.0.1", "--port", str(port)]
    ignore_eos = {"ignore_eos": True}
    if name in ("cadenza", "cadenza-stateless"):
        cmd = [py, "-m", "cadenza.cli", "serve", "--model", args.model, *host]
        cmd += ["--num-threads", t, "--data-dir", str(data_dir / name), "--log-level", "warning"]
        cmd += shlex.split(args.cadenza_args or "")
        if name == "cadenza":
            return SystemSpec(
                name,
                "cadenza serve; X-Session-Id sessions, only the new message sent"
                + (f"; hints {args.hint_lead_s:g} s ahead" if args.hint_lead_s > 0 else ""),
                "session",
                cmd,
                extra_body=ignore_eos,
                hints=args.hint_lead_s > 0,
            )
        return SystemSpec(
            name,
            "cadenza serve --no-enable-prefix-caching; full history resent and recomputed",
            "stateless",
            [*cmd, "--no-enable-prefix-caching"],
            extra_body=ignore_eos,
        )
    if name == "hf":
        cmd = [py, "-m", "cadenza.bench.hf_server", "--model", args.model, *host]
        return SystemSpec(
            name,
            "transformers model.generate behind FastAPI, one request at a time; "
            "full history resent",
            "stateless",
            [*cmd, "--threads", t, "--served-model-name", args.model],
            extra_body=ignore_eos,
        )
    if name == "llama.cpp":
        python = Path(args.llamacpp_python)
        if not python.exists():
            raise FileNotFoundError(
                f"no llama-cpp-python environment at {python} (build it with `make llamacpp`)"
            )
        gguf = _gguf_path(args.model)
        cmd = [str(python), "-m", "llama_cpp.server", "--model", str(gguf), *host]
        cmd += ["--n_ctx", str(args.n_ctx), "--n_threads", t, "--n_threads_batch", t]
        # --interrupt_requests false: by default a new request cuts off the one being streamed
        # (a single-user setting); a multi-user server must queue it instead.
        cmd += ["--cache", "true", "--interrupt_requests", "false", "--model_alias", args.model]
        bias = {str(i): -100.0 for i in _SMOLLM2_EOS_IDS}
        return SystemSpec(
            name,
            "llama-cpp-python server (Q4_1 GGUF as is), prompt cache on (--cache true), "
            "requests queued, not interrupted (--interrupt_requests false); full history resent",
            "stateless",
            cmd,
            extra_body={"logit_bias": bias},
        )
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")


def _gguf_path(model: str) -> Path:
    from cadenza.model.source import SMOLLM2_ALIAS, smollm2_gguf_path

    if model.strip().lower() == SMOLLM2_ALIAS:
        return smollm2_gguf_path()
    path = Path(model).expanduser()
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise FileNotFoundError(f"llama.cpp needs a .gguf model, got {model!r}")
    return path


class ServerProcess:
    """A server subprocess: started, waited for, and stopped (its log kept for errors)."""

    def __init__(self, spec: SystemSpec, base_url: str, log_path: Path) -> None:
        self.spec, self.base_url, self.log_path = spec, base_url, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.model_name: str | None = None

    def start(self, timeout_s: float) -> None:
        env = {**os.environ, **self.spec.env}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.spec.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(_REPO_ROOT),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"exited with code {self.proc.returncode} while starting: {self.log_tail()}"
                )
            try:
                resp = httpx.get(f"{self.base_url}/v1/models", timeout=2.0)
                if resp.status_code == 200:
                    data = resp.json().get("data") or []
                    self.model_name = str(data[0]["id"]) if data else None
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 600) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return " ".join(text[-chars:].split())

    def probe(
        self,
        max_tokens: int = 2,
        timeout_s: float = 180.0,
        prompt_words: int = 0,
        ignore_eos: SystemSpec | None = None,
    ) -> float:
        """One non-streaming request; returns its latency. It waits behind anything still
        queued, so after a trial it doubles as "wait until the server is idle". With
        ``prompt_words`` and a spec (for its EOS suppression) it times one typical turn."""
        text = "Say hi." if not prompt_words else " ".join(["word"] * prompt_words)
        body = {
            "model": self.model_name or "default",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            **(ignore_eos.extra_body if ignore_eos is not None else {}),
        }
        start = time.monotonic()
        resp = httpx.post(f"{self.base_url}/v1/chat/completions", json=body, timeout=timeout_s)
        resp.raise_for_status()
        return time.monotonic() - start

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ---------------------------------------------------------------------------------- trials


def conversations_for(convs: Sequence[Conversation], count: int) -> list[Conversation]:
    """``count`` conversations: the list in order, cycled if it is too short."""
    if not convs:
        raise ValueError("no conversations")
    return [convs[i % len(convs)] for i in range(count)]


def trial_duration(rate: float, duration_s: float, min_sessions: int, max_s: float) -> float:
    """``duration_s``, stretched (up to ``max_s``) so ``min_sessions`` start on average."""
    return min(max(duration_s, min_sessions / rate), max_s)


def sessions_needed(rate: float, duration_s: float) -> int:
    """Enough plans that the Poisson starts run past ``duration_s`` (with a wide margin)."""
    mean = rate * duration_s
    return int(mean + 6 * math.sqrt(mean) + 10)


def run_system(
    name: str,
    args: argparse.Namespace,
    convs: Sequence[Conversation],
    work_dir: Path,
) -> dict[str, Any]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"name": name, "status": "skipped", "trials": []}
    try:
        spec = system_spec(name, args, port, work_dir)
    except (FileNotFoundError, ValueError) as exc:
        result["skip_reason"] = str(exc)
        return result
    spec.env = {**thread_env(args.threads), **spec.env}
    result.update(
        description=spec.description,
        mode=spec.mode,
        hints=spec.hints,
        server_command=shlex.join(spec.command),
    )
    server = ServerProcess(spec, base_url, work_dir / f"{name}.log")
    _say(f"[{name}] starting: {shlex.join(spec.command)}")
    try:
        started = time.monotonic()
        server.start(args.start_timeout_s)
        result["startup_s"] = time.monotonic() - started
        for _ in range(2):
            result["warmup_latency_s"] = server.probe()
    except (RuntimeError, httpx.HTTPError) as exc:
        server.stop()
        result["skip_reason"] = f"server could not be started: {exc}"
        _say(f"[{name}] skipped: {result['skip_reason']}")
        return result
    except BaseException:
        server.stop()
        raise
    result["status"] = "ok"
    grace = args.grace_s if args.grace_s is not None else max(10.0, 2 * args.slo_ttft_s)
    trials: list[dict[str, Any]] = result["trials"]

    mean_turns = sum(len(c.turns) for c in convs) / len(convs)
    try:
        if args.rates:
            start_rate = 0.0
        elif str(args.start_rate).strip().lower() == "auto":
            turn_s = server.probe(max_tokens=args.max_output, prompt_words=120, ignore_eos=spec)
            result["probe_turn_latency_s"] = turn_s
            start_rate = 0.6 / (mean_turns * turn_s)
        else:
            start_rate = float(args.start_rate)
    except BaseException:
        server.stop()
        raise
    result["start_rate"] = start_rate

    def trial(rate: float) -> bool:
        tag = secrets.token_hex(4)
        duration = trial_duration(
            rate, args.duration_s, args.min_sessions, max(args.max_duration_s, args.duration_s)
        )
        plans = plan_sessions(
            conversations_for(convs, sessions_needed(rate, duration)),
            session_rate=rate,
            mean_think_s=args.think_mean,
            seed=args.seed,
        )
        cfg = TrialConfig(
            base_url=base_url,
            model=server.model_name or args.model,
            mode=spec.mode,
            duration_s=duration,
            grace_s=grace,
            max_output=args.max_output,
            max_chars=args.max_chars,
            hint_lead_s=args.hint_lead_s if spec.hints else 0.0,
            system_prompt=f"[{tag}] {SYSTEM_PROMPT}",
            extra_body=spec.extra_body,
            session_prefix=f"bench-{tag}",
            label=f"[{name} @ {rate:.3g}/s]",
        )
        load_before = _loadavg()
        raw = run_trial(cfg, plans, progress=not args.no_progress)
        summary = raw["summary"]
        summary["duration_s"] = duration
        summary["loadavg_1m_before"] = load_before
        summary["loadavg_1m_after"] = _loadavg()
        passed = meets_slo(
            summary,
            args.slo_ttft_s,
            min_completed=args.min_completed,
            slo_tpot_s=args.slo_tpot_s,
        )
        try:
            server.probe(timeout_s=max(120.0, 4 * duration))  # drain before the next
        except httpx.HTTPError as exc:
            summary["drain_error"] = str(exc)
        trials.append({"rate": rate, "passed": passed, "summary": summary, "turns": raw["turns"]})
        _say(
            f"[{name}] rate {rate:.3g}/s: p90 TTFT {summary['ttft_p90_s']:.2f} s "
            f"({'pass' if passed else 'FAIL'}), {summary['turns_completed']} turns, "
            f"{summary['output_tok_per_s']:.1f} tok/s, cached {_pct(summary['cached_fraction'])}"
        )
        return passed

    try:
        if args.rates:
            for rate in _parse_rates(args.rates):
                trial(rate)
            best = max((t["rate"] for t in trials if t["passed"]), default=0.0)
        else:
            best, _ = search_rate(
                trial,
                start=start_rate,
                max_trials=args.max_trials,
                precision=args.precision,
                growth=args.growth,
            )
    finally:
        server.stop()
    result["sustainable_rate"] = best
    return result


def _parse_rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"--rates must be positive numbers, got {text!r}")
    return rates


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _pct(x: Any) -> str:
    return f"{100 * x:.0f}%" if isinstance(x, float) and math.isfinite(x) else "—"


# ---------------------------------------------------------------------------------- report


def _machine(threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads_per_server": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def ratios(systems: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Cadenza's sustainable rate over each other system's (None where one is missing or 0)."""
    rate = {s["name"]: s.get("sustainable_rate") for s in systems if s.get("status") == "ok"}
    ours = rate.get("cadenza")
    out: dict[str, float | None] = {}
    for other in ("hf", "llama.cpp", "cadenza-stateless"):
        theirs = rate.get(other)
        if ours is None or theirs is None:
            out[f"cadenza/{other}"] = None
        elif theirs <= 0:
            out[f"cadenza/{other}"] = math.inf if ours > 0 else None
        else:
            out[f"cadenza/{other}"] = ours / theirs
    return out


def run(args: argparse.Namespace) -> int:
    if args.render_only:
        from cadenza.bench.serve_report import write_serve_report

        results = load_results(args.render_only)
        paths = write_serve_report(results, args.out_dir, args.name)
        print("\n".join(str(p) for p in paths.values()))
        return 0
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    for n in names:
        if n not in SYSTEMS:
            raise ValueError(f"unknown system {n!r}; choose from {', '.join(SYSTEMS)}")
    convs = load_sharegpt(args.data, min_turns=args.min_turns, max_turns=args.max_turns)
    if not convs:
        raise ValueError("no conversations with at least --min-turns turns")
    command = "cadenza bench serve " + shlex.join(sys.argv[3:]) if len(sys.argv) > 3 else ""
    results: dict[str, Any] = {
        "meta": {
            "command": command.strip() or "cadenza bench serve",
            "model": args.model,
            "machine": _machine(args.threads),
            "slo": f"p90 TTFT <= {args.slo_ttft_s:g} s",
            "settings": {
                k: v for k, v in vars(args).items() if k not in ("func", "command", "bench_command")
            },
            "conversations_available": len(convs),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "systems": [],
    }
    work_dir = Path(tempfile.mkdtemp(prefix="cadenza-serve-bench-"))
    started = time.monotonic()
    # Stopped with SIGTERM (or SIGINT where a shell ignores it): unwind, so servers are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for name in names:
            results["systems"].append(run_system(name, args, convs, work_dir))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    results["meta"]["wall_s"] = time.monotonic() - started
    results["ratios"] = ratios(results["systems"])
    from cadenza.bench.serve_report import write_serve_report

    paths = write_serve_report(results, args.out_dir, args.name)
    for s in results["systems"]:
        if s["status"] == "ok":
            _say(f"{s['name']}: sustainable {s['sustainable_rate']:.3g} sessions/s")
        else:
            _say(f"{s['name']}: skipped ({s.get('skip_reason')})")
    print("\n".join(str(p) for p in paths.values()))
    return 0


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
