"""``cadenza bench migration``: what moving KV between workers costs, on real workers.

Two measurements on a cluster of two workers (Ray actors by default, ``--backend local`` for
threads of this process), with the model at ``--model``:

1. **Move or recompute.** For histories of several lengths: the time to move the history's KV
   from one worker to the other (export, object-store transfer, verified import) against the
   time the destination takes to prefill the same tokens cold (TTFT of a one-token request with
   the prefix cache empty there). Their ratio is where MELL's / ``kv-aware``'s adaptive choice
   flips; the measured bandwidth is what the router learns online.
2. **Live migration.** Requests of several lengths are moved mid-decode (pre-copy, then
   stop-and-copy) and their tokens compared with an unmoved run of the same request; the
   downtime (stop to the destination's first new token) is reported against the request's
   length.

Results: JSON + markdown + a plot under ``--out-dir`` (default ``docs/benchmarks``), medians of
``--repeats`` runs, since the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from cadenza.cluster.router import ClusterEngine
from cadenza.config import EngineConfig
from cadenza.core.sampling_params import SamplingParams
from cadenza.engine_api import EngineRequest

LENGTHS = (256, 512, 1024, 2048)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model (default: %(default)s)")
    parser.add_argument(
        "--lengths",
        default=",".join(str(n) for n in LENGTHS),
        help="history lengths in tokens (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per length (median)")
    parser.add_argument(
        "--decode-tokens", type=int, default=96, help="tokens each live-migrated request makes"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument(
        "--backend",
        choices=["ray", "local"],
        default="ray",
        help="workers as Ray actors, or as threads of this process (default: %(default)s)",
    )
    parser.add_argument("--out-dir", default="docs/benchmarks", help="where results go")
    parser.add_argument("--name", default="migration", help="result file stem")
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace) -> EngineConfig:
    longest = max(int(n) for n in args.lengths.split(","))
    blocks = 2 * (longest + args.decode_tokens) // 16 + 64
    return EngineConfig.from_options(
        model=args.model,
        num_kv_blocks=blocks,
        kv_host_gib=0.0,
        kv_cost_model="linear",
        num_threads=args.threads,
    )


def _handles(args: argparse.Namespace, config: EngineConfig) -> list[Any]:
    if args.backend == "local":
        from cadenza.cluster.worker_handle import LocalWorker, worker_config
        from cadenza.engine import LLMEngine

        def factory(cfg: EngineConfig) -> Any:
            return lambda: LLMEngine(cfg)

        return [LocalWorker(f"w{i}", factory(worker_config(config, f"w{i}"))) for i in range(2)]
    from cadenza.cluster.ray_backend import start_workers

    return start_workers(2, config, threads_per_worker=args.threads)


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    return [(1000 + 7919 * (i + 1) * (seed + 3)) % (vocab - 200) + 100 for i in range(n)]


async def _run_to_end(router: ClusterEngine, request: EngineRequest) -> list[Any]:
    return [out async for out in router.generate(request)]


async def _prefill_s(router: ClusterEngine, worker: str, tokens: list[int], rid: str) -> float:
    """TTFT of a cold one-token request on ``worker`` (the other one drained meanwhile)."""
    other = next(w for w in router.slots if w != worker)
    router.slots[other].state = "drained"
    try:
        start = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        await _run_to_end(router, EngineRequest.of(rid, tokens, sampling_params=params))
        return time.perf_counter() - start
    finally:
        router.slots[other].state = "alive"


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    config = _config(args)
    router = await ClusterEngine.connect(_handles(args, config), config, routing="least-loaded")
    await router.start()
    vocab = router.tokenizer.vocab_size if router.tokenizer is not None else 32000
    lengths = [int(n) for n in args.lengths.split(",")]
    moves: list[dict[str, Any]] = []
    live: list[dict[str, Any]] = []
    try:
        for n in lengths:
            move_s, recompute_s, sizes = [], [], []
            for r in range(args.repeats):
                tokens = _tokens(n, seed=100 * n + r, vocab=vocab)
                # Compute the history on w0, then move it to w1.
                router.slots["w1"].state = "drained"
                warm = EngineRequest.of(
                    f"warm-{n}-{r}",
                    tokens,
                    sampling_params=SamplingParams(temperature=0.0, max_tokens=1),
                    session_id=f"s-{n}-{r}",
                )
                await _run_to_end(router, warm)
                router.slots["w1"].state = "alive"
                await asyncio.sleep(0.3)  # the index hears of w0's blocks
                start = time.perf_counter()
                moved = await router.migrations.move_session(
                    "w0", "w1", f"s-{n}-{r}", tokens, None, kind="bench"
                )
                move_s.append(time.perf_counter() - start)
                sizes.append(router.stats.recent_migrations[-1].num_bytes if moved else 0)
                cold = _tokens(n, seed=100 * n + r + 50, vocab=vocab)
                recompute_s.append(await _prefill_s(router, "w1", cold, f"cold-{n}-{r}"))
            move, recompute = statistics.median(move_s), statistics.median(recompute_s)
            num_bytes = statistics.median(sizes)
            moves.append(
                {
                    "tokens": n,
                    "bytes": num_bytes,
                    "move_s": move,
                    "recompute_s": recompute,
                    "recompute_over_move": recompute / move if move else None,
                    "bandwidth_gbps": (num_bytes / move / 1e9) if move else None,
                    "move_runs_s": move_s,
                    "recompute_runs_s": recompute_s,
                }
            )
            print(
                f"  {n:5d} tokens: move {move * 1e3:7.1f} ms, recompute {recompute * 1e3:7.1f} ms"
            )
        for n in lengths:
            params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
            prompt = _tokens(n, seed=7 * n + 1, vocab=vocab)
            reference = await _run_to_end(
                router, EngineRequest.of(f"ref-{n}", prompt, sampling_params=params)
            )
            outs: list[Any] = []

            async def consume(request: EngineRequest, sink: list[Any] = outs) -> None:
                async for out in router.generate(request):
                    sink.append(out)

            task = asyncio.ensure_future(
                consume(EngineRequest.of(f"live-{n}", prompt, sampling_params=params))
            )
            while not outs or len(outs[-1].outputs[0].token_ids) < args.decode_tokens // 2:
                await asyncio.sleep(0.005)
            before = len(router.stats.live_migration_downtimes)
            result = await router.migrate_request(f"live-{n}")
            await task
            downtime = (
                router.stats.live_migration_downtimes[-1][0]
                if len(router.stats.live_migration_downtimes) > before
                else None
            )
            same = outs[-1].outputs[0].token_ids == reference[-1].outputs[0].token_ids
            live.append(
                {
                    "prompt_tokens": n,
                    "tokens_at_stop": result.get("tokens_at_stop"),
                    "context_at_stop": n + int(result.get("tokens_at_stop") or 0),
                    "downtime_s": downtime,
                    "migration_s": result.get("elapsed_s"),
                    "identical_tokens": same,
                }
            )
            print(f"  live {n:5d}: downtime {1e3 * (downtime or 0):6.1f} ms, identical={same}")
    finally:
        await router.aclose()
        if args.backend == "ray":
            from cadenza.cluster.ray_backend import shutdown

            shutdown()
    return {"moves": moves, "live": live, "link_bytes_per_s_learned": router.costs.link_bytes_per_s}


def render_markdown(results: dict[str, Any], png: str | None) -> str:
    meta = results["meta"]
    lines = [
        "# KV migration between workers",
        "",
        f"`{meta['command']}` — {meta['machine']}, backend `{meta['backend']}`, model "
        f"`{meta['model']}`, {meta['threads']} thread(s) per worker, medians of "
        f"{meta['repeats']} runs.",
        "",
        "## Moving a session's KV vs recomputing it at the destination",
        "",
        "| history (tokens) | KV bytes | move (ms) | recompute (ms) | recompute / move | GB/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results["moves"]:
        ratio = m["recompute_over_move"]
        lines.append(
            f"| {m['tokens']} | {m['bytes'] / 2**20:.1f} MiB | {1e3 * m['move_s']:.1f} | "
            f"{1e3 * m['recompute_s']:.1f} | {ratio:.1f}× | {m['bandwidth_gbps']:.2f} |"
            if ratio
            else f"| {m['tokens']} | — | — | — | — | — |"
        )
    lines += [
        "",
        "Move = export at the source (gather from the tier holding each block), the object-store"
        " transfer, and the verified, layer-by-layer import at the destination, as the router"
        " does it. Recompute = TTFT of a one-token request over the same number of uncached"
        " tokens on the destination. The router learns the bandwidth online from its own"
        f" migrations (last value here: {results['link_bytes_per_s_learned'] / 1e9:.2f} GB/s).",
        "",
        "## Live migration: downtime against request length",
        "",
        "| prompt | context at stop | downtime (ms) | whole migration (ms) | same tokens |",
        "|---:|---:|---:|---:|:---:|",
    ]
    for r in results["live"]:
        down = f"{1e3 * r['downtime_s']:.1f}" if r["downtime_s"] is not None else "—"
        whole = f"{1e3 * r['migration_s']:.1f}" if r["migration_s"] is not None else "—"
        lines.append(
            f"| {r['prompt_tokens']} | {r['context_at_stop']} | {down} | {whole} | "
            f"{'yes' if r['identical_tokens'] else 'NO'} |"
        )
    lines += [
        "",
        "Downtime is from the stop (the source stops the request and exports its remaining KV in"
        " the same engine step) to the destination's first new token; the pre-copy rounds before"
        " it run while the request keeps decoding on the source.",
    ]
    if png:
        lines += ["", f"![move vs recompute]({png})"]
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    moves = [m for m in results["moves"] if m["move_s"]]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [m["tokens"] for m in moves]
    ax[0].plot(xs, [1e3 * m["move_s"] for m in moves], "o-", label="move KV")
    ax[0].plot(xs, [1e3 * m["recompute_s"] for m in moves], "s-", label="recompute")
    ax[0].set_xlabel("history (tokens)")
    ax[0].set_ylabel("ms")
    ax[0].set_title("move vs recompute")
    ax[0].legend()
    live = [r for r in results["live"] if r["downtime_s"] is not None]
    ax[1].plot([r["context_at_stop"] for r in live], [1e3 * r["downtime_s"] for r in live], "o-")
    ax[1].set_xlabel("context at stop (tokens)")
    ax[1].set_ylabel("downtime (ms)")
    ax[1].set_title("live migration downtime")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    print(f"cadenza bench migration: 2 workers ({args.backend}), lengths {args.lengths}")
    results = asyncio.run(_measure(args))
    results["meta"] = {
        "command": "cadenza bench migration "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k not in ("func", "command", "bench_command")
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "backend": args.backend,
        "model": args.model,
        "threads": args.threads,
        "repeats": args.repeats,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    png = f"{args.name}.png" if _plot(results, out / f"{args.name}.png") else None
    (out / f"{args.name}.md").write_text(render_markdown(results, png))
    print(f"wrote {out / args.name}.json, .md" + (", .png" if png else ""))
    return 0
