"""The cluster router over in-process workers (tiny random model): every cached, migrated,
live-migrated or failed-over path gives the tokens of a cold run on one engine.

The same router runs over Ray actors in ``test_cluster_ray.py``; here the workers are threads
of the test process, so each behaviour is checked in well under a second of model time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from tests.conftest import TINY_LLAMA

from cadenza.cluster.cluster_stats import MIGRATION_KINDS, ClusterStats, MigrationRecord
from cadenza.cluster.migration_budget import MigrationBudget
from cadenza.cluster.placement import CostParams
from cadenza.cluster.router import ClusterEngine
from cadenza.cluster.worker_handle import LocalWorker
from cadenza.config import EngineConfig
from cadenza.core.sampling_params import SamplingParams
from cadenza.engine import LLMEngine
from cadenza.engine_api import EndSession, EngineRequest, GetStats, HintSession
from cadenza.model.source import random_model_source
from cadenza.server.cluster_metrics import ClusterCollector

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=120, ignore_eos=True)
CONFIG = EngineConfig.from_options(
    block_size=4, num_kv_blocks=160, kv_cost_model="linear", kv_host_gib=0.01
)


@pytest.fixture(scope="module")
def source():
    return random_model_source(TINY_LLAMA, seed=3)


@pytest.fixture(scope="module")
def reference(source):
    return LLMEngine(CONFIG, source)


def cold(engine: LLMEngine, prompt: Sequence[int], params: SamplingParams) -> list[int]:
    """The tokens of a cold run on one engine (its prefix cache reset first)."""
    engine.reset_prefix_cache()
    rid = engine.add_request(None, list(prompt), params)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out.outputs[0].token_ids


def run(coro):
    return asyncio.run(coro)


async def make_cluster(source, routing: str, n: int = 2, **kw) -> ClusterEngine:
    handles = [LocalWorker(f"w{i}", lambda: LLMEngine(CONFIG, source)) for i in range(n)]
    router = await ClusterEngine.connect(handles, CONFIG, routing=routing, **kw)
    await router.start()
    return router


async def collect(router: ClusterEngine, request: EngineRequest):
    outs = [out async for out in router.generate(request)]
    return outs


def prompt_of(seed: int, n: int) -> list[int]:
    return [5 + (i * 7 + seed * 13) % 300 for i in range(n)]


async def wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def test_turns_alternating_workers_match_one_engine(source, reference):
    async def main():
        router = await make_cluster(source, "round-robin")
        try:
            history: list[int] = []
            workers = []
            for turn in range(4):
                history = history + prompt_of(turn, 9)
                request = EngineRequest.of(
                    f"t{turn}",
                    history,
                    sampling_params=GREEDY,
                    session_id="s",
                    num_history_tokens=max(len(history) - 9, 0),
                )
                outs = await collect(router, request)
                final = outs[-1]
                assert final.finished
                assert final.outputs[0].token_ids == cold(reference, history, GREEDY)
                # Streamed deltas add up to the final output.
                assert sum((o.outputs[0].delta_token_ids for o in outs), []) == (
                    final.outputs[0].token_ids
                )
                workers.append(router.stats.placements_by_worker.copy())
                history = history + final.outputs[0].token_ids
            assert set(router.stats.placements_by_worker) == {"w0", "w1"}
            assert router.stats.hint_outcomes["missing"] == 3
            assert router.stats.tokens_by_source["recomputed"] > 0
        finally:
            await router.aclose()

    run(main())


def test_a_hint_moves_the_session_to_the_less_loaded_worker_before_its_turn(source, reference):
    async def main():
        # Move for a difference of one request (the default waits for two).
        router = await make_cluster(source, "symphony", costs=CostParams(rebalance_margin=1))
        try:
            history = prompt_of(1, 30)
            first = await collect(
                router, EngineRequest.of("a", history, sampling_params=GREEDY, session_id="s")
            )
            history = history + first[-1].outputs[0].token_ids
            (home,) = router.stats.placements_by_worker
            # Ties go to the lowest worker id: a long request lands on the session's worker.
            busy = asyncio.ensure_future(
                collect(router, EngineRequest.of("busy", prompt_of(9, 20), sampling_params=LONG))
            )
            await wait_until(lambda: router.slots[home].view().outstanding > 0)
            assert "busy" in router.slots[home].requests
            result = await router.call(HintSession("s", tuple(history)))
            assert result.blocks_by_tier["moving"] > 0
            pending = router.migrations.hints["s"]
            assert pending.target != home and pending.task is not None
            await pending.task
            nxt = history + prompt_of(2, 6)
            request = EngineRequest.of(
                "b", nxt, sampling_params=GREEDY, session_id="s", num_history_tokens=len(history)
            )
            final = (await collect(router, request))[-1]
            assert final.outputs[0].token_ids == cold(reference, nxt, GREEDY)
            stats = router.stats
            assert stats.placements["hinted"] == 1
            assert stats.hint_outcomes["found"] == 1, stats.hint_outcomes
            assert stats.migrations["hint"] == 1 and stats.migration_bytes > 0
            assert stats.hinted_moves == {"found": 1}
            # The hinted turn found its history cached (all but the last partial block), and
            # the tokens count as migrated.
            assert final.num_cached_tokens >= len(history) - CONFIG.cache.block_size
            assert stats.tokens_by_source["migrated"] == final.num_cached_tokens
            await busy
        finally:
            await router.aclose()

    run(main())


def test_kv_aware_moves_kv_on_the_critical_path_when_copying_beats_recomputing(source, reference):
    async def main():
        # A fast link and a slow prefill: moving is always cheaper than recomputing.
        costs = CostParams(prefill_s_per_token=1.0, link_bytes_per_s=1e12, load_weight=1e6)
        router = await make_cluster(source, "kv-aware", costs=costs)
        try:
            history = prompt_of(4, 40)
            first = await collect(
                router, EngineRequest.of("a", history, sampling_params=GREEDY, session_id="s")
            )
            history = history + first[-1].outputs[0].token_ids
            home = next(iter(router.stats.placements_by_worker))
            busy = asyncio.ensure_future(
                collect(router, EngineRequest.of("busy", prompt_of(9, 20), sampling_params=LONG))
            )
            await wait_until(lambda: any("busy" in s.requests for s in router.slots.values()))
            busy_on = next(w for w, s in router.slots.items() if "busy" in s.requests)
            await wait_until(lambda: router.slots[busy_on].view().outstanding > 0)
            nxt = history + prompt_of(5, 5)
            outs = await collect(
                router,
                EngineRequest.of(
                    "b",
                    nxt,
                    sampling_params=GREEDY,
                    session_id="s",
                    num_history_tokens=len(history),
                ),
            )
            assert outs[-1].outputs[0].token_ids == cold(reference, nxt, GREEDY)
            # The session's worker is busy: the turn went to the idle one, its KV moved along.
            assert busy_on == home
            assert router.stats.placements["kv-moved"] == 1
            assert router.stats.migrations["turn"] == 1
            assert outs[-1].num_cached_tokens >= len(history) - CONFIG.cache.block_size
            await busy
        finally:
            await router.aclose()

    run(main())


@pytest.mark.parametrize("params", [LONG, SEEDED], ids=["greedy", "seeded"])
def test_live_migration_keeps_the_tokens_and_measures_downtime(source, reference, params):
    async def main():
        router = await make_cluster(source, "least-loaded")
        try:
            prompt = prompt_of(7, 45)
            outs: list = []

            async def consume():
                async for out in router.generate(
                    EngineRequest.of("m", prompt, sampling_params=params)
                ):
                    outs.append(out)

            task = asyncio.ensure_future(consume())
            await wait_until(lambda: outs and len(outs[-1].outputs[0].token_ids) >= 30)
            result = await router.migrate_request("m")
            assert result["migrated"], result
            await task
            final = outs[-1]
            assert final.outputs[0].token_ids == cold(reference, prompt, params)
            assert sum((o.outputs[0].delta_token_ids for o in outs), []) == (
                final.outputs[0].token_ids
            )
            ((downtime, length),) = router.stats.live_migration_downtimes
            assert 0 < downtime < 5 and length > len(prompt)
            assert router.stats.migrations["live"] >= 1
            stats = await router.call(GetStats())
            assert stats.num_aborted.get("migrated") == 1
        finally:
            await router.aclose()

    run(main())


def test_a_dead_worker_loses_only_cache_streams_continue_and_it_rejoins(source, reference):
    async def main():
        router = await make_cluster(source, "least-loaded", rejoin_poll_s=0.05)
        try:
            prompts = [prompt_of(20 + i, 30 + i) for i in range(4)]
            outs: dict[int, list] = {i: [] for i in range(4)}

            async def consume(i: int):
                request = EngineRequest.of(f"f{i}", prompts[i], sampling_params=LONG)
                async for out in router.generate(request):
                    outs[i].append(out)

            tasks = [asyncio.ensure_future(consume(i)) for i in range(4)]
            await wait_until(lambda: all(outs[i] for i in range(4)))
            victim = router.slots["w0"]
            assert victim.requests
            victim.handle.kill()
            await asyncio.gather(*tasks)
            for i in range(4):
                assert outs[i][-1].outputs[0].token_ids == cold(reference, prompts[i], LONG)
            assert router.stats.worker_failures == 1 and router.stats.failovers >= 1
            assert victim.state == "dead"
            assert router.index.prefix_hits("w0", ()).blocks == 0
            victim.handle.restart()
            await wait_until(lambda: victim.state == "alive")
            # It serves again.
            router.slots["w1"].state = "drained"
            again = await collect(
                router, EngineRequest.of("again", prompts[0], sampling_params=GREEDY)
            )
            assert again[-1].outputs[0].token_ids == cold(reference, prompts[0], GREEDY)
            assert router.stats.placements_by_worker["w0"] >= 1
        finally:
            await router.aclose()

    run(main())


def test_drain_moves_running_requests_away_and_marks_the_worker_releasable(source, reference):
    async def main():
        router = await make_cluster(source, "round-robin")
        try:
            prompts = [prompt_of(30 + i, 25) for i in range(2)]
            outs: dict[int, list] = {0: [], 1: []}

            async def consume(i: int):
                request = EngineRequest.of(f"d{i}", prompts[i], sampling_params=LONG)
                async for out in router.generate(request):
                    outs[i].append(out)

            tasks = [asyncio.ensure_future(consume(i)) for i in range(2)]
            await wait_until(lambda: outs[0] and outs[1])
            result = await router.drain("w0")
            assert result["state"] == "drained" and result["migrated"] >= 1
            assert not router.slots["w0"].requests
            await asyncio.gather(*tasks)
            for i in range(2):
                assert outs[i][-1].outputs[0].token_ids == cold(reference, prompts[i], LONG)
            (w0,) = [w for w in router.describe_workers() if w["id"] == "w0"]
            assert w0["state"] == "drained" and w0["releasable"]
            more = await collect(router, EngineRequest.of("x", prompts[0], sampling_params=GREEDY))
            assert more and router.stats.placements_by_worker["w1"] >= 2
            assert router.activate("w0")["state"] == "alive"
        finally:
            await router.aclose()

    run(main())


def test_mell_packs_requests_and_outputs_stay_exact(source, reference):
    async def main():
        router = await make_cluster(source, "mell", epoch_s=0.05)
        try:
            prompts = [prompt_of(40 + i, 20 + 3 * i) for i in range(3)]
            results = await asyncio.gather(
                *(
                    collect(router, EngineRequest.of(f"p{i}", p, sampling_params=LONG))
                    for i, p in enumerate(prompts)
                )
            )
            for prompt, outs in zip(prompts, results, strict=True):
                assert outs[-1].outputs[0].token_ids == cold(reference, prompt, LONG)
            assert sum(v for k, v in router.stats.placements.items() if k.startswith("mell")) == 3
            await asyncio.sleep(0.2)
            releasable = [w["id"] for w in router.describe_workers() if w["releasable"]]
            assert releasable  # idle workers are reported free once their requests left
        finally:
            await router.aclose()

    run(main())


def test_an_unused_hint_expires_as_false_and_releases_its_placement(source):
    now = [0.0]

    async def main():
        router = await make_cluster(source, "symphony", clock=lambda: now[0])
        try:
            history = tuple(prompt_of(50, 24))
            await router.call(HintSession("lonely", history, ttl_s=5.0))
            assert "lonely" in router.migrations.hints
            assert "lonely" in router.policy.hinted  # type: ignore[attr-defined]
            now[0] = 6.0
            router.migrations.expire_hints(now[0])
            assert router.stats.hint_outcomes["false"] == 1
            assert "lonely" not in router.policy.hinted  # type: ignore[attr-defined]
            await router.call(EndSession("lonely", history))
        finally:
            await router.aclose()

    run(main())


def test_migration_budget_bounds_bytes_in_flight_per_worker():
    async def main():
        budget = MigrationBudget(100)
        order: list[str] = []
        release = asyncio.Event()

        async def move(name: str, src: str, dst: str, size: int, hold: bool):
            async with budget.reserve(src, dst, size):
                order.append(name)
                if hold:
                    await release.wait()

        a = asyncio.ensure_future(move("a", "w0", "w1", 80, True))
        await asyncio.sleep(0)
        b = asyncio.ensure_future(move("b", "w0", "w2", 80, False))  # w0 is over budget
        c = asyncio.ensure_future(move("c", "w2", "w3", 500, False))  # idle workers: admitted
        await asyncio.sleep(0.01)
        assert order == ["a", "c"]
        release.set()
        await asyncio.gather(a, b, c)
        assert order == ["a", "c", "b"] and budget.in_flight["w0"] == 0

    run(main())


def test_cluster_stats_split_prompt_tokens_by_source():
    stats = ClusterStats()
    stats.record_prompt(100, 80, {"device": 48, "host": 16}, migrated=40)
    assert stats.tokens_by_source == {
        "device": 8,
        "host": 16,
        "disk": 0,
        "migrated": 40,
        "recomputed": 16,
        "new": 20,
    }
    stats.sample_load(0.0, [3, 1])
    stats.sample_load(1.0, [2, 2])
    assert stats.imbalance_ratio() == pytest.approx((1.5 + 1.0) / 2)


def test_migration_counters_show_every_kind_from_the_start():
    # A rate() over the first migration of a kind needs a sample (0) before it.
    stats = ClusterStats()
    registry = CollectorRegistry()
    registry.register(ClusterCollector(SimpleNamespace(stats=stats, slots={})))
    text = generate_latest(registry).decode()
    for kind in MIGRATION_KINDS:
        assert f'cadenza:cluster_migrations_total{{kind="{kind}"}} 0.0' in text
        assert f'cadenza:cluster_migrations_aborted_total{{kind="{kind}"}} 0.0' in text
    stats.record_migration(MigrationRecord("hint", "w0", "w1", 64, 0.5, True))
    text = generate_latest(registry).decode()
    assert 'cadenza:cluster_migrations_total{kind="hint"} 1.0' in text
    assert 'cadenza:cluster_migrations_total{kind="live"} 0.0' in text
